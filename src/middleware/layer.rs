//! [`LockLayer`]: the builder, over a [`Locker`].

use std::{fmt, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Response, StatusCode, request::Parts};
use tower_layer::Layer;

use super::service::Lock;

mod kinds;

pub use self::kinds::{ReadWriteLayer, ReadWriteLock};
use crate::{
    backend::{FairBackend, LockBackend},
    key::{LockKey, MakeLockKey},
    locker::{Locker, Loss},
    policy::{BackendErrorPolicy, LossPolicy, MissingKeyPolicy},
    rejection::LockRejection,
};

/// Locks each request on a key derived from it, around the inner service.
///
/// The layer asks its [`MakeLockKey`] for the request's key, takes the lock in its
/// backend (waiting at most [`max_wait`](Self::max_wait)), calls the inner service with a
/// [`Held`](crate::Held) in the request's extensions, renews the lease every third of the
/// ttl while the service runs, and releases the lock when the response is ready, or in the
/// background as soon as the request is dropped.
///
/// | outcome | answer |
/// |---|---|
/// | acquired | the inner service's response |
/// | still held when `max_wait` ends | 409 (or [`contended_status`](Self::contended_status)), `Retry-After` |
/// | no key | 400, or the inner service unlocked with [`MissingKeyPolicy::PassThrough`] |
/// | empty or over-long key | 400 |
/// | backend unavailable | 503, `Retry-After`; the inner service unlocked with [`BackendErrorPolicy::Open`] |
/// | lock lost while the handler runs | 503 and the handler dropped ([`LossPolicy::Abort`]), or the handler told ([`LossPolicy::Signal`]) |
///
/// The layer is a face of a [`Locker`]: [`LockLayer::new`] makes a locker of its own,
/// [`Locker::layer`] shares one with the handlers' in-handler locks. Requests of this
/// process for one key line up in the locker's local line: only the first asks the
/// backend, and a finished holder hands the lock to the next without a backend round trip
/// (see [`max_hand_offs`](Self::max_hand_offs)). The settings methods below set the
/// layer's locker (see [`Locker`] for each); configure a shared locker before making
/// layers of it, since a setting changed on one face afterwards no longer reaches the
/// other.
///
/// While a request waits for its lock, it keeps the inner service instance that was polled
/// ready (and whatever that reserved, such as a `ConcurrencyLimit` permit): put this layer
/// inside backpressure layers, not around them. axum routes reserve nothing.
///
/// Rejections have an `application/problem+json` body. The response body type must be
/// `From<Bytes>`, as axum's `Body` is. Cloning the layer is cheap and shares the backend.
///
/// # Example
///
/// ```
/// # #[cfg(feature = "axum")]
/// # fn main() {
/// use std::time::Duration;
/// use axum::{Router, routing::post};
/// use tower_redis_lock::{Held, InMemoryBackend, LockLayer, PathKey};
///
/// async fn pay(lock: Held) -> String {
///     format!("paid under {}", lock.key())
/// }
///
/// let app: Router = Router::new()
///     .route("/orders/{order_id}/pay", post(pay))
///     .route_layer(
///         LockLayer::new(InMemoryBackend::new(), PathKey::new("order_id"))
///             .key_prefix("order:")
///             .max_wait(Duration::from_millis(500))
///             .ttl(Duration::from_secs(10)),
///     );
/// # }
/// # #[cfg(not(feature = "axum"))]
/// # fn main() {}
/// ```
#[must_use]
pub struct LockLayer<Backend: LockBackend, K> {
    locker: Locker<Backend>,
    make_key: K,
    settings: Arc<LayerSettings>,
}

type RejectionResponder = Arc<dyn Fn(&LockRejection) -> Response<Bytes> + Send + Sync>;

/// What only the layer decides: requests without a key, a failing backend, a lost lock,
/// and the shape of its answers.
#[derive(Clone, Default)]
pub(crate) struct LayerSettings {
    pub(crate) loss_policy: LossPolicy,
    pub(crate) missing_key: MissingKeyPolicy,
    pub(crate) fail_mode: BackendErrorPolicy,
    pub(crate) respond: Option<RejectionResponder>,
}

impl LayerSettings {
    /// The answer for `rejection`: the custom responder's, or the problem+json default.
    pub(crate) fn respond<ResBody: From<Bytes>>(
        &self,
        rejection: &LockRejection,
    ) -> Response<ResBody> {
        tracing::debug!(%rejection, "request answered by the lock layer");
        #[cfg_attr(not(feature = "idempotency"), allow(unused_mut))]
        let mut response = match &self.respond {
            Some(respond) => respond(rejection),
            None => rejection.to_response(),
        };
        // The handler did not run: an idempotency layer outside lets the key be retried.
        #[cfg(feature = "idempotency")]
        if !matches!(rejection, LockRejection::Lost { .. }) {
            response
                .extensions_mut()
                .insert(crate::idempotency::Retryable);
        }
        response.map(ResBody::from)
    }

    /// The answer for a lock lost while its handler ran (under `Abort`).
    pub(crate) fn loss(loss: Loss, retry_after_cap: Duration) -> LockRejection {
        LockRejection::Lost {
            expired: loss == Loss::Expired,
            retry_after: retry_after_cap,
        }
    }
}

impl fmt::Debug for LayerSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LayerSettings")
            .field("loss_policy", &self.loss_policy)
            .field("missing_key", &self.missing_key)
            .field("fail_mode", &self.fail_mode)
            .field("custom_rejection_response", &self.respond.is_some())
            .finish()
    }
}

impl<Backend: LockBackend, K: MakeLockKey> LockLayer<Backend, K> {
    /// A layer that locks each request on `make_key`'s key in `backend`, with a locker of
    /// its own and the defaults of [`Locker::new`]; 400 without a key, 503 when the
    /// backend fails or the lock is lost.
    pub fn new(backend: Backend, make_key: K) -> Self {
        Self::from_locker(Locker::new(backend), make_key)
    }

    pub(crate) fn from_locker(locker: Locker<Backend>, make_key: K) -> Self {
        Self {
            locker,
            make_key,
            settings: Arc::default(),
        }
    }
}

impl<Backend, F, Key> LockLayer<Backend, F>
where
    Backend: LockBackend,
    F: Fn(&Parts) -> Option<Key> + Clone + Send + Sync + 'static,
    Key: Into<LockKey>,
{
    /// [`new`](Self::new) for a closure, whose argument type is then inferred:
    /// `LockLayer::from_fn(backend, |parts| …)`.
    ///
    /// ```
    /// use tower_redis_lock::{InMemoryBackend, LockLayer};
    ///
    /// // Lock per tenant, from a header; requests without one get 400.
    /// let layer = LockLayer::from_fn(InMemoryBackend::new(), |parts| {
    ///     let tenant = parts.headers.get("x-tenant")?.to_str().ok()?;
    ///     Some(format!("tenant:{tenant}"))
    /// });
    /// # let _ = layer;
    /// ```
    pub fn from_fn(backend: Backend, make_key: F) -> Self {
        Self::new(backend, make_key)
    }
}

impl<Backend: LockBackend, K> LockLayer<Backend, K> {
    /// The locker under this layer.
    pub fn locker(&self) -> &Locker<Backend> {
        &self.locker
    }

    /// The most contended keys of this layer's locker: see [`Locker::hot_keys`].
    pub fn hot_keys(&self) -> Vec<crate::HotKey> {
        self.locker.hot_keys()
    }

    /// How many keys this layer's requests hold or wait for in this process right now;
    /// see [`Locker::keys_in_use`].
    pub fn keys_in_use(&self) -> usize {
        self.locker.keys_in_use()
    }

    fn map_locker(mut self, configure: impl FnOnce(Locker<Backend>) -> Locker<Backend>) -> Self {
        self.locker = configure(self.locker);
        self
    }

    fn settings_mut(&mut self) -> &mut LayerSettings {
        Arc::make_mut(&mut self.settings)
    }

    /// Sets the lease: see [`Locker::ttl`] (default 10 s).
    pub fn ttl(self, ttl: Duration) -> Self {
        self.map_locker(|locker| locker.ttl(ttl))
    }

    /// Sets the longest wait: see [`Locker::max_wait`] (default 1 s).
    pub fn max_wait(self, max_wait: Duration) -> Self {
        self.map_locker(|locker| locker.max_wait(max_wait))
    }

    /// Sets the retry schedule: see [`Locker::backoff`] (default 50 ms to 250 ms).
    pub fn backoff(self, base: Duration, max: Duration) -> Self {
        self.map_locker(|locker| locker.backoff(base, max))
    }

    /// Sets the key namespace: see [`Locker::key_prefix`] (default empty).
    pub fn key_prefix(self, prefix: impl Into<Arc<str>>) -> Self {
        self.map_locker(|locker| locker.key_prefix(prefix))
    }

    /// Sets the metrics label: see [`Locker::metrics_class`].
    pub fn metrics_class(self, class: impl Into<Arc<str>>) -> Self {
        self.map_locker(|locker| locker.metrics_class(class))
    }

    /// How many hot keys to track: see [`Locker::track_hot_keys`].
    pub fn track_hot_keys(self, k: usize) -> Self {
        self.map_locker(|locker| locker.track_hot_keys(k))
    }

    /// Sets the longest key: see [`Locker::max_key_len`] (default 512 bytes).
    pub fn max_key_len(self, max: usize) -> Self {
        self.map_locker(|locker| locker.max_key_len(max))
    }

    /// Sets the contended status: see [`Locker::contended_status`] (default 409).
    pub fn contended_status(self, status: StatusCode) -> Self {
        self.map_locker(|locker| locker.contended_status(status))
    }

    /// Sets the `Retry-After` cap: see [`Locker::retry_after_cap`] (default 1 s).
    pub fn retry_after_cap(self, cap: Duration) -> Self {
        self.map_locker(|locker| locker.retry_after_cap(cap))
    }

    /// Sets the release wait: see [`Locker::release_timeout`] (default 1 s).
    pub fn release_timeout(self, timeout: Duration) -> Self {
        self.map_locker(|locker| locker.release_timeout(timeout))
    }

    /// Sets the renewal period: see [`Locker::renew_every`] (default ttl / 3).
    pub fn renew_every(self, every: Duration) -> Self {
        self.map_locker(|locker| locker.renew_every(every))
    }

    /// Turns renewal off: see [`Locker::without_renewal`].
    pub fn without_renewal(self) -> Self {
        self.map_locker(Locker::without_renewal)
    }

    /// Serves waiters of all processes first come, first served: see [`Locker::fair`]
    /// (off by default). Only for backends that offer it ([`FairBackend`]).
    pub fn fair(self, on: bool) -> Self
    where
        Backend: FairBackend,
    {
        self.map_locker(|locker| locker.fair(on))
    }

    /// Sets the hand-off cap: see [`Locker::max_hand_offs`] (default 8).
    pub fn max_hand_offs(self, max: u32) -> Self {
        self.map_locker(|locker| locker.max_hand_offs(max))
    }

    /// Turns the local line off: see [`Locker::without_local_queue`].
    pub fn without_local_queue(self) -> Self {
        self.map_locker(Locker::without_local_queue)
    }

    /// What to do when a lock is lost while its handler runs (default:
    /// [`LossPolicy::Abort`]).
    pub fn on_lock_lost(mut self, policy: LossPolicy) -> Self {
        self.settings_mut().loss_policy = policy;
        self
    }

    /// What to do when the key function finds no key (default: 400).
    pub fn on_missing_key(mut self, missing: MissingKeyPolicy) -> Self {
        self.settings_mut().missing_key = missing;
        self
    }

    /// What to do when the backend fails (default: 503).
    pub fn on_backend_error(mut self, mode: BackendErrorPolicy) -> Self {
        self.settings_mut().fail_mode = mode;
        self
    }

    /// Replaces the default problem+json answers (every [`LockRejection`]: contended, no
    /// key, bad key, unavailable, lock lost) with your own. The body is converted with
    /// `From<Bytes>`.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http::{Response, header};
    /// use tower_redis_lock::{InMemoryBackend, LockLayer, LockRejection, QueryKey};
    ///
    /// let layer = LockLayer::new(InMemoryBackend::new(), QueryKey::new("cart"))
    ///     .rejection_response(|rejection: &LockRejection| {
    ///         let body = format!("{{\"error\":\"{}\"}}", rejection.status().as_u16());
    ///         let mut response = Response::new(Bytes::from(body));
    ///         *response.status_mut() = rejection.status();
    ///         response.headers_mut().insert(
    ///             header::CONTENT_TYPE,
    ///             header::HeaderValue::from_static("application/json"),
    ///         );
    ///         response
    ///     });
    /// # let _ = layer;
    /// ```
    pub fn rejection_response<F>(mut self, respond: F) -> Self
    where
        F: Fn(&LockRejection) -> Response<Bytes> + Send + Sync + 'static,
    {
        self.settings_mut().respond = Some(Arc::new(respond));
        self
    }
}

impl<S, Backend: LockBackend, K: Clone> Layer<S> for LockLayer<Backend, K> {
    type Service = Lock<S, Backend, K>;

    fn layer(&self, inner: S) -> Self::Service {
        Lock::new(
            inner,
            Arc::new(self.locker.clone()),
            self.make_key.clone(),
            self.settings.clone(),
        )
    }
}

impl<Backend: LockBackend, K: Clone> Clone for LockLayer<Backend, K> {
    fn clone(&self) -> Self {
        Self {
            locker: self.locker.clone(),
            make_key: self.make_key.clone(),
            settings: self.settings.clone(),
        }
    }
}

impl<Backend: LockBackend + fmt::Debug, K> fmt::Debug for LockLayer<Backend, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockLayer")
            .field("locker", &self.locker)
            .field("make_key", &std::any::type_name::<K>())
            .field("settings", &self.settings)
            .finish()
    }
}
