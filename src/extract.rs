//! [`Held`] as an axum extractor.

use std::convert::Infallible;

use axum::{
    extract::{FromRef, FromRequestParts, OptionalFromRequestParts},
    response::{IntoResponse, Response},
};
use http::{StatusCode, request::Parts};

use crate::{backend::LockBackend, held::Held, locker::Locker, rejection::LockRejection};

impl<S: Send + Sync> FromRequestParts<S> for Held {
    type Rejection = MissingLock;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Held>().cloned().ok_or(MissingLock)
    }
}

/// `Option<Held>` never rejects: `None` on routes without the layer, or when the layer
/// let the request through unlocked.
impl<S: Send + Sync> OptionalFromRequestParts<S> for Held {
    type Rejection = Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        _state: &S,
    ) -> Result<Option<Self>, Self::Rejection> {
        Ok(parts.extensions.get::<Held>().cloned())
    }
}

/// Rejection of the [`Held`] extractor on a request that holds no lock: the route has no
/// `LockLayer`, or the layer let the request through unlocked. Answers 500, since it is
/// a wiring mistake, not the client's.
#[derive(Clone, Copy, Debug, thiserror::Error)]
#[error(
    "the `Held` extractor found no lock: add `LockLayer` to this route (with `Router::route_layer`, \
     `Router::layer` or `MethodRouter::layer`), or take `Option<Held>` where locking is optional"
)]
#[non_exhaustive]
pub struct MissingLock;

impl IntoResponse for MissingLock {
    fn into_response(self) -> Response {
        tracing::error!("{self}");
        (StatusCode::INTERNAL_SERVER_ERROR, self.to_string()).into_response()
    }
}

/// The layer's rejections as axum responses, for handlers and middleware that reuse them.
impl IntoResponse for LockRejection {
    fn into_response(self) -> Response {
        self.to_response().map(axum::body::Body::from)
    }
}

/// The request's [`Locker`]: the one in the router's state, told which locks this
/// request already holds (so that asking for one of them again fails at once).
impl<S, B> FromRequestParts<S> for Locker<B>
where
    S: Send + Sync,
    B: LockBackend,
    Locker<B>: FromRef<S>,
{
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Ok(Locker::from_ref(state).for_request(parts.extensions.get::<Held>()))
    }
}
