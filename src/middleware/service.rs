//! [`Lock`]: the service a [`LockLayer`](super::LockLayer) wraps around another.

use std::{
    fmt, mem,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{Request, Response};
use tower_service::Service;

use super::{future::ResponseFuture, layer::LayerSettings};
use crate::{
    backend::LockBackend, key::MakeLockKey, locker::Locker, observe, policy::MissingKeyPolicy,
    rejection::LockRejection,
};

/// Locks each request around the inner service. Built by [`LockLayer`](super::LockLayer);
/// see its docs.
pub struct Lock<S, Backend: LockBackend, K> {
    inner: S,
    /// Shared: a request clones one `Arc`, not the locker's handles one by one.
    locker: Arc<Locker<Backend>>,
    make_key: K,
    settings: Arc<LayerSettings>,
}

impl<S, Backend: LockBackend, K> Lock<S, Backend, K> {
    pub(crate) fn new(
        inner: S,
        locker: Arc<Locker<Backend>>,
        make_key: K,
        settings: Arc<LayerSettings>,
    ) -> Self {
        Self {
            inner,
            locker,
            make_key,
            settings,
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

impl<S, Backend, K, ReqBody, ResBody> Service<Request<ReqBody>> for Lock<S, Backend, K>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    Backend: LockBackend,
    K: MakeLockKey,
    ResBody: From<Bytes>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S, Backend, ReqBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        self.call_with(None, request)
    }
}

impl<S, Backend, K> Lock<S, Backend, K>
where
    Backend: LockBackend,
    K: MakeLockKey,
{
    /// [`call`](Service::call), with the lock taken by `locker` instead of the service's
    /// own, when given (the read locker of a read/write layer).
    pub(crate) fn call_with<ReqBody, ResBody>(
        &mut self,
        locker: Option<&Arc<Locker<Backend>>>,
        request: Request<ReqBody>,
    ) -> ResponseFuture<S, Backend, ReqBody>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
        ResBody: From<Bytes>,
    {
        let locker = locker.unwrap_or(&self.locker);
        let (mut parts, body) = request.into_parts();
        let key = self.make_key.make_lock_key(&mut parts);
        let request = Request::from_parts(parts, body);
        let class = locker.class();
        let key = match key {
            Some(key) => locker.settings().lock_key(key),
            None if self.settings.missing_key == MissingKeyPolicy::PassThrough => {
                return ResponseFuture::unlocked(self.inner.call(request), self.settings.clone());
            }
            None => Err(LockRejection::MissingKey),
        };
        let key = match key {
            Ok(key) => key,
            Err(rejection) => {
                observe::outcome(locker.metrics(), rejection.outcome());
                let response = self.settings.respond(&rejection);
                return ResponseFuture::rejected(response, self.settings.clone());
            }
        };
        // The future calls the service later, so it must own the instance that was polled
        // ready; `self` keeps a fresh clone (tower-service docs).
        let clone = self.inner.clone();
        let ready = mem::replace(&mut self.inner, clone);
        // Disabled spans cost nothing: the key is only formatted when recorded.
        let span = tracing::debug_span!(
            "lock",
            key = %key,
            class = %class,
            outcome = tracing::field::Empty,
            wait_ms = tracing::field::Empty,
        );
        let (start, wait) = locker.begin_wait(key);
        let (locker, settings) = (locker.clone(), self.settings.clone());
        ResponseFuture::acquiring(
            locker,
            start,
            Box::pin(wait),
            ready,
            request,
            settings,
            span,
        )
    }
}

impl<S: Clone, Backend: LockBackend, K: Clone> Clone for Lock<S, Backend, K> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            locker: self.locker.clone(),
            make_key: self.make_key.clone(),
            settings: self.settings.clone(),
        }
    }
}

impl<S: fmt::Debug, Backend: LockBackend + fmt::Debug, K> fmt::Debug for Lock<S, Backend, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lock")
            .field("inner", &self.inner)
            .field("locker", &self.locker)
            .field("make_key", &std::any::type_name::<K>())
            .field("settings", &self.settings)
            .finish()
    }
}
