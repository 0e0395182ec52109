//! [`LockLayer`]: the builder and its defaults.

use std::{fmt, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Response, StatusCode};
use tower_layer::Layer;

use crate::{
    Lock, LockBackend, LockKey, MakeLockKey,
    acquire::{AcquireError, Backoff, WaitPolicy},
    rejection::{InvalidKey, LockRejection},
};

/// Default lease: long enough for ordinary handlers, short enough that a crashed holder
/// frees the key soon (Redisson and redsync use 30 s and 8 s).
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);
/// Default bound on the wait for a contended lock before answering 409.
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(1);
/// Default first backoff ceiling; it doubles on each retry…
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(50);
/// …up to this ceiling (redsync retries every 50–250 ms).
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_millis(250);
/// Default upper bound for `Retry-After`.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);
/// Default bound on awaiting the release before the response is returned.
pub const DEFAULT_RELEASE_TIMEOUT: Duration = Duration::from_millis(200);
/// Default longest accepted key, in bytes.
pub const DEFAULT_MAX_KEY_LEN: usize = 512;

/// What to do with a request whose key function found no key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MissingKey {
    /// Answer 400 (the default).
    #[default]
    Reject,
    /// Call the inner service without a lock.
    PassThrough,
}

/// What to do when the backend cannot be reached or fails.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FailMode {
    /// Answer 503 with `Retry-After` (the default): no handler runs unlocked.
    #[default]
    Closed,
    /// Call the inner service without a lock. Only for work that tolerates running twice.
    Open,
}

type RejectionResponder = Arc<dyn Fn(&LockRejection) -> Response<Bytes> + Send + Sync>;

/// Everything a layer's services share, behind one `Arc`.
#[derive(Clone)]
pub(crate) struct LockConfig {
    pub(crate) wait: WaitPolicy,
    pub(crate) key_prefix: Arc<str>,
    pub(crate) max_key_len: usize,
    pub(crate) contended_status: StatusCode,
    pub(crate) retry_after: Duration,
    pub(crate) release_timeout: Duration,
    pub(crate) missing_key: MissingKey,
    pub(crate) fail_mode: FailMode,
    pub(crate) respond: Option<RejectionResponder>,
}

impl Default for LockConfig {
    fn default() -> Self {
        Self {
            wait: WaitPolicy {
                ttl: DEFAULT_TTL,
                max_wait: DEFAULT_MAX_WAIT,
                backoff: Backoff {
                    base: DEFAULT_BACKOFF_BASE,
                    max: DEFAULT_BACKOFF_MAX,
                },
            },
            key_prefix: Arc::from(""),
            max_key_len: DEFAULT_MAX_KEY_LEN,
            contended_status: StatusCode::CONFLICT,
            retry_after: DEFAULT_RETRY_AFTER,
            release_timeout: DEFAULT_RELEASE_TIMEOUT,
            missing_key: MissingKey::Reject,
            fail_mode: FailMode::Closed,
            respond: None,
        }
    }
}

impl LockConfig {
    /// The key to lock for a request: `Ok(None)` to pass it through unlocked.
    pub(crate) fn lock_key(&self, key: Option<LockKey>) -> Result<Option<LockKey>, LockRejection> {
        let Some(key) = key else {
            return match self.missing_key {
                MissingKey::Reject => Err(LockRejection::MissingKey),
                MissingKey::PassThrough => Ok(None),
            };
        };
        if key.is_empty() {
            return Err(LockRejection::InvalidKey(InvalidKey::Empty));
        }
        if key.len() > self.max_key_len {
            return Err(LockRejection::InvalidKey(InvalidKey::TooLong {
                max: self.max_key_len,
            }));
        }
        Ok(Some(key.prefixed(&self.key_prefix)))
    }

    pub(crate) fn rejection(&self, err: AcquireError) -> LockRejection {
        match err {
            AcquireError::Contended { remaining } => LockRejection::Contended {
                status: self.contended_status,
                retry_after: remaining.map_or(self.retry_after, |r| r.min(self.retry_after)),
            },
            AcquireError::Unavailable(source) => LockRejection::Unavailable {
                source,
                retry_after: self.retry_after,
            },
        }
    }

    pub(crate) fn respond<B: From<Bytes>>(&self, rejection: &LockRejection) -> Response<B> {
        tracing::debug!(%rejection, "request rejected by the lock layer");
        let response = match &self.respond {
            Some(respond) => respond(rejection),
            None => rejection.to_response(),
        };
        response.map(B::from)
    }
}

/// Locks each request on a key derived from it, around the inner service.
///
/// The layer asks its [`MakeLockKey`] for the request's key, takes the lock in its
/// backend (waiting at most [`max_wait`](Self::max_wait)), calls the inner service with a
/// [`Held`](crate::Held) in the request's extensions, and releases the lock when the
/// response is ready, or in the background as soon as the request is dropped.
///
/// | outcome | answer |
/// |---|---|
/// | acquired | the inner service's response |
/// | still held when `max_wait` ends | 409 (or [`contended_status`](Self::contended_status)), `Retry-After` |
/// | no key | 400, or the inner service unlocked with [`MissingKey::PassThrough`] |
/// | empty or over-long key | 400 |
/// | backend unavailable | 503, `Retry-After`; the inner service unlocked with [`FailMode::Open`] |
///
/// Rejections have an `application/problem+json` body. The response body type must be
/// `From<Bytes>`, as axum's `Body` is. Cloning the layer is cheap and shares the backend.
///
/// # Example
///
/// ```
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
/// ```
#[must_use]
pub struct LockLayer<B, K> {
    backend: B,
    make_key: K,
    config: Arc<LockConfig>,
}

impl<B: LockBackend, K: MakeLockKey> LockLayer<B, K> {
    /// A layer that locks each request on `make_key`'s key in `backend`, with the
    /// defaults: ttl 10 s, max wait 1 s, backoff 50 ms doubling to 250 ms with full
    /// jitter, 409 on contention, `Retry-After` at most 1 s, 400 without a key, 503 when
    /// the backend fails, keys up to 512 bytes, release awaited up to 200 ms.
    pub fn new(backend: B, make_key: K) -> Self {
        Self {
            backend,
            make_key,
            config: Arc::new(LockConfig::default()),
        }
    }
}

impl<B, K> LockLayer<B, K> {
    fn config_mut(&mut self) -> &mut LockConfig {
        Arc::make_mut(&mut self.config)
    }

    /// The lease of each lock (default 10 s). A holder that crashes frees its key after
    /// at most this long; a handler that runs longer may lose the lock to another request.
    ///
    /// # Panics
    ///
    /// When `ttl` is under one millisecond.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        assert!(
            ttl >= Duration::from_millis(1),
            "LockLayer::ttl must be at least 1 ms"
        );
        self.config_mut().wait.ttl = ttl;
        self
    }

    /// How long a request waits for a held lock before it is answered 409 (default 1 s).
    /// Zero makes a single attempt. The answer can come one backend operation later.
    pub fn max_wait(mut self, max_wait: Duration) -> Self {
        self.config_mut().wait.max_wait = max_wait;
        self
    }

    /// The retry schedule while waiting: attempt `n` sleeps a random time up to
    /// `min(max, base · 2ⁿ)`, never past the holder's lease or the wait's end
    /// (default 50 ms and 250 ms).
    ///
    /// # Panics
    ///
    /// When `base` is zero or larger than `max`.
    pub fn backoff(mut self, base: Duration, max: Duration) -> Self {
        assert!(
            !base.is_zero() && base <= max,
            "LockLayer::backoff needs 0 < base <= max"
        );
        self.config_mut().wait.backoff = Backoff { base, max };
        self
    }

    /// A namespace put before every key of this layer, so that two routes can lock the
    /// same id separately (`"pay:"`, `"refund:"`). Empty by default.
    pub fn key_prefix(mut self, prefix: impl Into<Arc<str>>) -> Self {
        self.config_mut().key_prefix = prefix.into();
        self
    }

    /// The longest key accepted, in bytes, before the prefix (default 512). Longer keys
    /// get 400: keys come from requests, and Redis keys should stay small.
    pub fn max_key_len(mut self, max: usize) -> Self {
        self.config_mut().max_key_len = max;
        self
    }

    /// The status for a lock still contended when the wait ends: 409 Conflict by
    /// default, or 423 Locked.
    ///
    /// # Panics
    ///
    /// When `status` is not a 4xx.
    pub fn contended_status(mut self, status: StatusCode) -> Self {
        assert!(
            status.is_client_error(),
            "LockLayer::contended_status must be a 4xx"
        );
        self.config_mut().contended_status = status;
        self
    }

    /// The longest `Retry-After` given (default 1 s). A contended answer says the smaller
    /// of this and the holder's remaining lease; a 503 says this. Sent in whole seconds,
    /// rounded up, at least 1.
    pub fn retry_after(mut self, hint: Duration) -> Self {
        self.config_mut().retry_after = hint;
        self
    }

    /// How long the response waits for the release to be confirmed (default 200 ms), so
    /// that the client's next request does not meet its own lock. Past it the response
    /// goes out and the release is retried in the background.
    pub fn release_timeout(mut self, timeout: Duration) -> Self {
        self.config_mut().release_timeout = timeout;
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

    /// Replaces the default problem+json answers (contended, no key, bad key,
    /// unavailable) with your own. The body is converted with `From<Bytes>`.
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

impl<S, B: Clone, K: Clone> Layer<S> for LockLayer<B, K> {
    type Service = Lock<S, B, K>;

    fn layer(&self, inner: S) -> Self::Service {
        Lock::from_parts(
            inner,
            self.backend.clone(),
            self.make_key.clone(),
            self.config.clone(),
        )
    }
}

impl<B: Clone, K: Clone> Clone for LockLayer<B, K> {
    fn clone(&self) -> Self {
        Self {
            backend: self.backend.clone(),
            make_key: self.make_key.clone(),
            config: self.config.clone(),
        }
    }
}

impl<B: fmt::Debug, K> fmt::Debug for LockLayer<B, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockLayer")
            .field("backend", &self.backend)
            .field("make_key", &std::any::type_name::<K>())
            .field("config", &self.config)
            .finish()
    }
}

impl fmt::Debug for LockConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockConfig")
            .field("wait", &self.wait)
            .field("key_prefix", &self.key_prefix)
            .field("max_key_len", &self.max_key_len)
            .field("contended_status", &self.contended_status)
            .field("retry_after", &self.retry_after)
            .field("release_timeout", &self.release_timeout)
            .field("missing_key", &self.missing_key)
            .field("fail_mode", &self.fail_mode)
            .field("custom_rejection_response", &self.respond.is_some())
            .finish()
    }
}
