//! [`LockLayer`]: the builder and its defaults.

use std::{fmt, sync::Arc};

use bytes::Bytes;
use http::Response;
use tower_layer::Layer;

use crate::{
    Lock, LockBackend, LockRejection, MakeLockKey,
    config::{DEFAULT_MAX_HAND_OFFS, FailMode, LockConfig, LossPolicy, MissingKey},
    queue::LocalQueues,
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
/// | no key | 400, or the inner service unlocked with [`MissingKey::PassThrough`] |
/// | empty or over-long key | 400 |
/// | backend unavailable | 503, `Retry-After`; the inner service unlocked with [`FailMode::Open`] |
/// | lock lost while the handler runs | 503 and the handler dropped ([`LossPolicy::Abort`]), or the handler told ([`LossPolicy::Signal`]) |
///
/// Requests of this process for one key line up in a local queue: only the first asks the
/// backend, and a finished holder hands the lock to the next without a backend round trip
/// (see [`max_hand_offs`](Self::max_hand_offs)).
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
/// use tower_redis_lock::{Held, InMemoryBackend, LockLayer, PathParam};
///
/// async fn pay(lock: Held) -> String {
///     format!("paid under {}", lock.key())
/// }
///
/// let app: Router = Router::new()
///     .route("/orders/{order_id}/pay", post(pay))
///     .route_layer(
///         LockLayer::new(InMemoryBackend::new(), PathParam::new("order_id"))
///             .key_prefix("order:")
///             .max_wait(Duration::from_millis(500))
///             .ttl(Duration::from_secs(10)),
///     );
/// # }
/// # #[cfg(not(feature = "axum"))]
/// # fn main() {}
/// ```
#[must_use]
pub struct LockLayer<B: LockBackend, K> {
    backend: B,
    /// Shared by the layer's clones and services: requests of this process for one key
    /// line up here.
    queues: Option<Arc<LocalQueues<B>>>,
    make_key: K,
    config: Arc<LockConfig>,
}

impl<B: LockBackend, K: MakeLockKey> LockLayer<B, K> {
    /// A layer that locks each request on `make_key`'s key in `backend`, with the
    /// defaults: ttl 10 s renewed every 3.3 s, max wait 1 s, backoff 50 ms doubling to
    /// 250 ms with full jitter, 409 on contention, `Retry-After` at most 1 s, 400 without
    /// a key, 503 when the backend fails or the lock is lost, keys up to 512 bytes,
    /// release awaited up to 200 ms, requests of this process for one key queued locally
    /// with up to 8 hand-offs in a row.
    pub fn new(backend: B, make_key: K) -> Self {
        Self {
            backend,
            queues: Some(LocalQueues::new(DEFAULT_MAX_HAND_OFFS)),
            make_key,
            config: Arc::new(LockConfig::default()),
        }
    }
}

impl<B: LockBackend, K> LockLayer<B, K> {
    /// How many keys this layer's requests hold or wait for in this process right now
    /// (0 without a local queue). Back to 0 whenever the layer is idle: nothing is kept
    /// per key once its requests are done.
    pub fn keys_in_use(&self) -> usize {
        self.queues.as_ref().map_or(0, |queues| queues.busy_keys())
    }

    fn config_mut(&mut self) -> &mut LockConfig {
        Arc::make_mut(&mut self.config)
    }

    crate::config::lock_settings!("LockLayer");

    /// What to do when a lock is lost while its handler runs (default:
    /// [`LossPolicy::Abort`]).
    pub fn on_lock_lost(mut self, policy: LossPolicy) -> Self {
        self.config_mut().loss_policy = policy;
        self
    }

    /// What to do when the key function finds no key (default: 400).
    pub fn on_missing_key(mut self, missing: MissingKey) -> Self {
        self.config_mut().missing_key = missing;
        self
    }

    /// What to do when the backend fails (default: 503).
    pub fn on_backend_error(mut self, mode: FailMode) -> Self {
        self.config_mut().fail_mode = mode;
        self
    }

    /// Replaces the default problem+json answers (every [`LockRejection`]: contended, no
    /// key, bad key, unavailable, lock lost) with your own. The body is converted with
    /// `From<Bytes>`.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http::{Response, header};
    /// use tower_redis_lock::{InMemoryBackend, LockLayer, LockRejection, QueryParam};
    ///
    /// let layer = LockLayer::new(InMemoryBackend::new(), QueryParam::new("cart"))
    ///     .rejection_response(|rejection: &LockRejection| {
    ///         let mut response = Response::new(Bytes::from(format!("{{\"error\":\"{}\"}}", rejection.status().as_u16())));
    ///         *response.status_mut() = rejection.status();
    ///         response.headers_mut().insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
    ///         response
    ///     });
    /// # let _ = layer;
    /// ```
    pub fn rejection_response<F>(mut self, respond: F) -> Self
    where
        F: Fn(&LockRejection) -> Response<Bytes> + Send + Sync + 'static,
    {
        self.config_mut().respond = Some(Arc::new(respond));
        self
    }
}

impl<S, B: LockBackend, K: Clone> Layer<S> for LockLayer<B, K> {
    type Service = Lock<S, B, K>;

    fn layer(&self, inner: S) -> Self::Service {
        Lock::from_parts(
            inner,
            self.backend.clone(),
            self.queues.clone(),
            self.make_key.clone(),
            self.config.clone(),
        )
    }
}

impl<B: LockBackend, K: Clone> Clone for LockLayer<B, K> {
    fn clone(&self) -> Self {
        Self {
            backend: self.backend.clone(),
            queues: self.queues.clone(),
            make_key: self.make_key.clone(),
            config: self.config.clone(),
        }
    }
}

impl<B: LockBackend + fmt::Debug, K> fmt::Debug for LockLayer<B, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockLayer")
            .field("backend", &self.backend)
            .field("local_queue", &self.queues.is_some())
            .field("make_key", &std::any::type_name::<K>())
            .field("config", &self.config)
            .finish()
    }
}
