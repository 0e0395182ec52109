//! The layer's kinds of lock: permits, readers and writers, and [`ReadWriteLayer`], which
//! picks the mode of each request.

use std::{
    fmt,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{Request, Response, request::Parts};
use tower_layer::Layer;
use tower_service::Service;

use super::LockLayer;
use crate::{
    backend::LockBackend,
    key::MakeLockKey,
    kind::{KindBackend, LockKind, LockMode},
    locker::Locker,
    middleware::{Lock, ResponseFuture},
};

impl<Backend: LockBackend, K> LockLayer<Backend, K> {
    /// This layer, taking holds of `kind` instead of exclusive locks: see
    /// [`Locker::kind`]. Set the other options first; they carry over.
    ///
    /// # Panics
    ///
    /// When the backend does not take holds of `kind` (Redlock takes exclusive locks
    /// only).
    pub fn kind(self, kind: LockKind) -> LockLayer<KindBackend<Backend>, K> {
        LockLayer {
            locker: self.locker.kind(kind),
            make_key: self.make_key,
            settings: self.settings,
        }
    }

    /// At most `n` requests per key inside at once, across every process on the backend:
    /// see [`Locker::permits`]. The rest wait, then get 409 (or 423) with `Retry-After`.
    ///
    /// ```
    /// use http::HeaderName;
    /// use tower_redis_lock::{HeaderKey, InMemoryBackend, LockLayer};
    ///
    /// // At most 3 exports per tenant at once, whatever the number of instances.
    /// let tenant = HeaderKey::new(HeaderName::from_static("x-tenant"));
    /// let exports = LockLayer::new(InMemoryBackend::new(), tenant)
    ///     .key_prefix("export:")
    ///     .permits(3);
    /// # let _ = exports;
    /// ```
    ///
    /// # Panics
    ///
    /// When `n` is 0, or as [`kind`](Self::kind) does.
    pub fn permits(self, n: u32) -> LockLayer<KindBackend<Backend>, K> {
        LockLayer {
            locker: self.locker.permits(n),
            make_key: self.make_key,
            settings: self.settings,
        }
    }

    /// Every request a reader: see [`Locker::read`]. For a layer on the reading routes
    /// of a key whose writing routes have a [`write`](Self::write) layer on the same
    /// backend, prefix and key.
    pub fn read(self) -> LockLayer<KindBackend<Backend>, K> {
        self.kind(LockKind::Read)
    }

    /// Every request a writer: see [`Locker::write`].
    pub fn write(self) -> LockLayer<KindBackend<Backend>, K> {
        self.kind(LockKind::Write)
    }

    /// Several keys per request, all or none: the key function returns a
    /// [`KeySet`](crate::KeySet) (both accounts of a transfer, say). See
    /// [`Locker::several_keys`].
    ///
    /// ```
    /// use http::request::Parts;
    /// use tower_redis_lock::{InMemoryBackend, KeySet, LockLayer};
    ///
    /// // POST /transfers?from=…&to=… locks both accounts.
    /// let layer = LockLayer::new(InMemoryBackend::new(), |parts: &Parts| {
    ///     let query = parts.uri.query()?;
    ///     let accounts = form_urlencoded::parse(query.as_bytes())
    ///         .filter(|(name, _)| name == "from" || name == "to")
    ///         .map(|(_, account)| account.into_owned());
    ///     Some(KeySet::new(accounts))
    /// })
    /// .key_prefix("acct:")
    /// .several_keys();
    /// # let _ = layer;
    /// ```
    pub fn several_keys(self) -> LockLayer<KindBackend<Backend>, K> {
        self.kind(LockKind::Several)
    }

    /// One layer for readers and writers of the same key: `GET`, `HEAD` and `OPTIONS`
    /// read, every other method writes ([`LockMode::from_method`]). Set the other options
    /// first; they carry over to both modes, whose metrics classes end in `:read` and
    /// `:write`.
    ///
    /// ```
    /// # #[cfg(feature = "axum")]
    /// # fn main() {
    /// use axum::{Router, routing::get};
    /// use tower_redis_lock::{InMemoryBackend, LockLayer, PathKey};
    ///
    /// let app: Router = Router::new()
    ///     .route("/docs/{id}", get(|| async { "the doc" }).put(|| async { "saved" }))
    ///     .route_layer(
    ///         LockLayer::new(InMemoryBackend::new(), PathKey::new("id"))
    ///             .key_prefix("doc:")
    ///             .read_write(),
    ///     );
    /// # }
    /// # #[cfg(not(feature = "axum"))]
    /// # fn main() {}
    /// ```
    pub fn read_write(self) -> ReadWriteLayer<Backend, K, fn(&Parts) -> LockMode>
    where
        K: Clone,
    {
        self.read_write_by(|parts: &Parts| LockMode::from_method(&parts.method))
    }

    /// [`read_write`](Self::read_write), with the mode of each request chosen by `mode`.
    ///
    /// ```
    /// use http::request::Parts;
    /// use tower_redis_lock::{InMemoryBackend, LockLayer, LockMode, QueryKey};
    ///
    /// // POST /reports?doc=… only reads the document.
    /// let layer = LockLayer::new(InMemoryBackend::new(), QueryKey::new("doc"))
    ///     .read_write_by(|parts: &Parts| {
    ///         if parts.uri.path() == "/reports" {
    ///             LockMode::Read
    ///         } else {
    ///             LockMode::from_method(&parts.method)
    ///         }
    ///     });
    /// # let _ = layer;
    /// ```
    pub fn read_write_by<M>(self, mode: M) -> ReadWriteLayer<Backend, K, M>
    where
        K: Clone,
        M: Fn(&Parts) -> LockMode + Clone,
    {
        let read = self.locker.clone().read();
        ReadWriteLayer {
            write: self.write(),
            read,
            mode,
        }
    }
}

/// A layer that locks each request for reading or for writing the same key, as its mode
/// function says. Made by [`LockLayer::read_write`] and [`LockLayer::read_write_by`];
/// the answers are [`LockLayer`]'s.
#[must_use]
pub struct ReadWriteLayer<Backend: LockBackend, K, M> {
    write: LockLayer<KindBackend<Backend>, K>,
    read: Locker<KindBackend<Backend>>,
    mode: M,
}

impl<Backend: LockBackend, K, M> ReadWriteLayer<Backend, K, M> {
    /// The locker of the readers.
    pub fn read_locker(&self) -> &Locker<KindBackend<Backend>> {
        &self.read
    }

    /// The locker of the writers.
    pub fn write_locker(&self) -> &Locker<KindBackend<Backend>> {
        self.write.locker()
    }
}

impl<S, Backend: LockBackend, K: Clone, M: Clone> Layer<S> for ReadWriteLayer<Backend, K, M> {
    type Service = ReadWriteLock<S, Backend, K, M>;

    fn layer(&self, inner: S) -> Self::Service {
        ReadWriteLock {
            lock: self.write.layer(inner),
            read: Arc::new(self.read.clone()),
            mode: self.mode.clone(),
        }
    }
}

impl<Backend: LockBackend, K: Clone, M: Clone> Clone for ReadWriteLayer<Backend, K, M> {
    fn clone(&self) -> Self {
        Self {
            write: self.write.clone(),
            read: self.read.clone(),
            mode: self.mode.clone(),
        }
    }
}

impl<Backend: LockBackend + fmt::Debug, K, M> fmt::Debug for ReadWriteLayer<Backend, K, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadWriteLayer")
            .field("write", &self.write)
            .field("read", &self.read)
            .field("mode", &std::any::type_name::<M>())
            .finish()
    }
}

/// Locks each request for reading or writing around the inner service. Built by
/// [`ReadWriteLayer`]; see [`LockLayer::read_write`].
pub struct ReadWriteLock<S, Backend: LockBackend, K, M> {
    lock: Lock<S, KindBackend<Backend>, K>,
    read: Arc<Locker<KindBackend<Backend>>>,
    mode: M,
}

impl<S, Backend: LockBackend, K, M> ReadWriteLock<S, Backend, K, M> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        self.lock.get_ref()
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        self.lock.get_mut()
    }

    /// Consumes `self`, returning the inner service.
    pub fn into_inner(self) -> S {
        self.lock.into_inner()
    }
}

impl<S, Backend, K, M, ReqBody, ResBody> Service<Request<ReqBody>>
    for ReadWriteLock<S, Backend, K, M>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    Backend: LockBackend,
    K: MakeLockKey,
    M: Fn(&Parts) -> LockMode,
    ResBody: From<Bytes>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S, KindBackend<Backend>, ReqBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.lock.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let (parts, body) = request.into_parts();
        let mode = (self.mode)(&parts);
        let request = Request::from_parts(parts, body);
        match mode {
            LockMode::Read => self.lock.call_with(Some(&self.read), request),
            LockMode::Write => self.lock.call_with(None, request),
        }
    }
}

impl<S: Clone, Backend: LockBackend, K: Clone, M: Clone> Clone for ReadWriteLock<S, Backend, K, M> {
    fn clone(&self) -> Self {
        Self {
            lock: self.lock.clone(),
            read: self.read.clone(),
            mode: self.mode.clone(),
        }
    }
}

impl<S: fmt::Debug, Backend: LockBackend + fmt::Debug, K, M> fmt::Debug
    for ReadWriteLock<S, Backend, K, M>
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadWriteLock")
            .field("lock", &self.lock)
            .field("read", &self.read)
            .field("mode", &std::any::type_name::<M>())
            .finish()
    }
}
