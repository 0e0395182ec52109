//! [`Lock`]: the service a [`LockLayer`](crate::LockLayer) wraps around another.

use std::{
    fmt, mem,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{Request, Response};
use tower_service::Service;

use crate::{
    LockBackend, MakeLockKey, acquire::acquire, config::LockConfig, future::ResponseFuture,
    queue::LocalQueues,
};

/// Locks each request around the inner service. Built by [`LockLayer`](crate::LockLayer);
/// see its docs.
pub struct Lock<S, B: LockBackend, K> {
    inner: S,
    backend: B,
    queues: Option<Arc<LocalQueues<B>>>,
    make_key: K,
    config: Arc<LockConfig>,
}

impl<S, B: LockBackend, K> Lock<S, B, K> {
    pub(crate) fn from_parts(
        inner: S,
        backend: B,
        queues: Option<Arc<LocalQueues<B>>>,
        make_key: K,
        config: Arc<LockConfig>,
    ) -> Self {
        Self {
            inner,
            backend,
            queues,
            make_key,
            config,
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes `self`, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B, K, ReqBody, ResBody> Service<Request<ReqBody>> for Lock<S, B, K>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    B: LockBackend,
    K: MakeLockKey,
    ResBody: From<Bytes>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S, B, ReqBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let (mut parts, body) = request.into_parts();
        let key = self.make_key.make_lock_key(&mut parts);
        let request = Request::from_parts(parts, body);
        match self.config.request_key(key) {
            Ok(Some(key)) => {
                // The future calls the service later, so it must own the instance that was
                // polled ready; `self` keeps a fresh clone (tower-service docs).
                let clone = self.inner.clone();
                let ready = mem::replace(&mut self.inner, clone);
                // Disabled spans cost nothing: the key is only formatted when recorded.
                let span = tracing::debug_span!(
                    "lock",
                    key = %key,
                    class = %self.config.class,
                    outcome = tracing::field::Empty,
                    wait_ms = tracing::field::Empty,
                );
                let acquire = acquire(
                    self.backend.clone(),
                    key,
                    self.config.wait,
                    self.queues.clone(),
                );
                let config = self.config.clone();
                ResponseFuture::acquiring(Box::pin(acquire), ready, request, config, span)
            }
            Ok(None) => ResponseFuture::unlocked(self.inner.call(request), self.config.clone()),
            Err(rejection) => {
                ResponseFuture::rejected(self.config.respond(&rejection), self.config.clone())
            }
        }
    }
}

impl<S: Clone, B: LockBackend, K: Clone> Clone for Lock<S, B, K> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            backend: self.backend.clone(),
            queues: self.queues.clone(),
            make_key: self.make_key.clone(),
            config: self.config.clone(),
        }
    }
}

impl<S: fmt::Debug, B: LockBackend + fmt::Debug, K> fmt::Debug for Lock<S, B, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lock")
            .field("inner", &self.inner)
            .field("backend", &self.backend)
            .field("make_key", &std::any::type_name::<K>())
            .field("config", &self.config)
            .finish()
    }
}
