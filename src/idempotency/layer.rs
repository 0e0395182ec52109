//! [`IdempotencyLayer`]: run a request at most once per `Idempotency-Key`, replay its
//! answer after.

use std::{fmt, sync::Arc, time::Duration};

use http::{HeaderName, request::Parts};
use tower_layer::Layer;

use super::{ResponseStore, service::Idempotency};
use crate::{backend::LockBackend, locker::Locker, policy::LossPolicy};

/// Default time a record is kept (and a started request's key stays taken).
pub(crate) const DEFAULT_RESPONSE_TTL: Duration = Duration::from_secs(24 * 3600);
/// Default largest request body read for the fingerprint.
pub(crate) const DEFAULT_MAX_REQUEST_BODY: usize = 1 << 20;
/// Default largest response body kept for replay.
pub(crate) const DEFAULT_MAX_STORED_BODY: usize = 64 << 10;

/// The header that says a response is a replay.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

pub(super) type Principal = Arc<dyn Fn(&Parts) -> Option<String> + Send + Sync>;

#[derive(Clone)]
pub(super) struct Config {
    pub(super) header: HeaderName,
    pub(super) required: bool,
    pub(super) ttl: Duration,
    pub(super) max_request_body: usize,
    pub(super) max_stored_body: usize,
    pub(super) keep_cookies: bool,
    pub(super) skipped_headers: Vec<HeaderName>,
    /// `None`: keys are shared by every caller of the route (an explicit opt-in).
    pub(super) principal: Option<Principal>,
    pub(super) loss_policy: LossPolicy,
    pub(super) retry_after: Duration,
}

/// Makes a route safe to retry: the first request with a given `Idempotency-Key` runs,
/// and its answer is kept and replayed to every retry with that key (IETF
/// `draft-ietf-httpapi-idempotency-key-header`). No request runs twice under one key.
///
/// | request | answer |
/// |---|---|
/// | first with its key | the route's answer (5xx included), kept for `ttl` (24 h) |
/// | same key while the first still runs | 409 with `Retry-After` |
/// | same key later | the kept answer again, with `Idempotent-Replayed: true` |
/// | same key, different request (method, path with query, or body) | 422, while the first runs and after |
/// | same key, the first's answer could not be kept (body over `max_stored_body` or streamed, body error, panic) | 409 without `Retry-After`: "cannot be replayed" |
/// | same key, the first stopped without recording its answer (lost its lock, store failed) | 409 with `Retry-After`: "outcome unknown", until the record expires (`ttl`) |
/// | no key where one is required; several key headers; malformed key | 400 |
/// | no principal for the request | 400 |
/// | body over `max_request_body` | 413 |
/// | store unreachable | 503 with `Retry-After` |
///
/// A request that may run leaves a *pending* record before its handler is called
/// (set-if-absent, kept for `ttl`); its end replaces it, by one conditional write that
/// only the request that began it can make. So a retry never runs the work while the
/// record exists, whatever became of the first request's lock. Answers marked
/// [`Retryable`](super::Retryable) delete the record instead, and a retry runs: the inner
/// `LockLayer`'s answers carry it when the handler did not run (409/423 contended, 400,
/// 503 when the lock could not be taken; not the 503 of a lock lost mid-run).
///
/// Keys are scoped by route (the matched path) and by the caller: [`new`](Self::new)
/// takes the function that names the caller (a user id, an API key);
/// [`shared_by_all_callers`](Self::shared_by_all_callers) is the explicit opt-in to keys
/// that every caller of the route shares.
///
/// While the handler runs the key is held as a lock, renewed by a watchdog. If the lock is
/// lost, the [`on_lock_lost`](Self::on_lock_lost) policy applies (default: abort the
/// handler, answer 503; the record stays pending). Once the handler is called, it runs in
/// a task of its own, to the end, and its answer is kept even if the client hangs up
/// meanwhile: the retry finds it. That task holds what the inner services hand it, so put
/// concurrency limits *inside* this layer for detached work to count against them.
///
/// Works on axum's `Body`; put it on the routes that need it, outside their `LockLayer`.
/// Give it a backend with fencing off: a fencing counter would be left behind for every
/// idempotency key, for the fence retention.
///
/// # Example
///
/// ```
/// use axum::{Router, routing::post};
/// use tower_redis_lock::{InMemoryBackend, idempotency::IdempotencyLayer};
///
/// // Each caller's keys are its own: here the caller is named by an `X-Api-Key` header.
/// let by_api_key = |parts: &http::request::Parts| {
///     Some(parts.headers.get("x-api-key")?.to_str().ok()?.to_owned())
/// };
/// let app: Router = Router::new()
///     .route("/payments", post(|| async { "charged once" }))
///     .route_layer(IdempotencyLayer::new(InMemoryBackend::new(), by_api_key));
/// ```
#[must_use]
pub struct IdempotencyLayer<Backend: LockBackend> {
    backend: Backend,
    locker: Locker<Backend>,
    config: Arc<Config>,
}

impl<Backend: LockBackend + ResponseStore> IdempotencyLayer<Backend> {
    /// Idempotency on `backend`, keys scoped by the caller that `principal` names (a
    /// request it names no one for gets 400): the `Idempotency-Key` header required,
    /// records kept 24 h, request bodies up to 1 MiB, kept bodies up to 64 KiB.
    pub fn new<F>(backend: Backend, principal: F) -> Self
    where
        F: Fn(&Parts) -> Option<String> + Send + Sync + 'static,
    {
        Self::with_principal(backend, Some(Arc::new(principal)))
    }

    /// Idempotency with keys shared by **every caller** of the route: a client that sends
    /// a key another client used gets that client's answer (its status, its `Location`,
    /// its body), and its own request never runs. Only for routes where that is intended
    /// (one trusted caller, keys that are unguessable and never reused); otherwise use
    /// [`new`](Self::new).
    pub fn shared_by_all_callers(backend: Backend) -> Self {
        Self::with_principal(backend, None)
    }

    fn with_principal(backend: Backend, principal: Option<Principal>) -> Self {
        let locker = Locker::new(backend.clone())
            .metrics_class("idempotency")
            .max_wait(Duration::ZERO)
            .max_key_len(usize::MAX);
        Self {
            backend,
            locker,
            config: Arc::new(Config {
                header: HeaderName::from_static("idempotency-key"),
                required: true,
                ttl: DEFAULT_RESPONSE_TTL,
                max_request_body: DEFAULT_MAX_REQUEST_BODY,
                max_stored_body: DEFAULT_MAX_STORED_BODY,
                keep_cookies: false,
                skipped_headers: Vec::new(),
                principal,
                loss_policy: LossPolicy::Abort,
                retry_after: Duration::from_secs(1),
            }),
        }
    }
}

impl<Backend: LockBackend> IdempotencyLayer<Backend> {
    fn config_mut(&mut self) -> &mut Config {
        Arc::make_mut(&mut self.config)
    }

    /// Lets requests without the header through, unprotected (default: 400).
    pub fn optional(mut self) -> Self {
        self.config_mut().required = false;
        self
    }

    /// Reads the key from another header than `Idempotency-Key`.
    pub fn header(mut self, name: HeaderName) -> Self {
        self.config_mut().header = name;
        self
    }

    /// How long a record is kept (default 24 h): the answer's replay window, and how long
    /// a key whose request stopped without an answer stays refused.
    pub fn retention(mut self, ttl: Duration) -> Self {
        self.config_mut().ttl = ttl;
        self
    }

    /// The largest request body read (default 1 MiB); larger ones get 413.
    pub fn max_request_body(mut self, max: usize) -> Self {
        self.config_mut().max_request_body = max;
        self
    }

    /// The largest response body kept (default 64 KiB). A larger or streamed answer goes
    /// to its client as it is; retries are told it cannot be replayed (409).
    pub fn max_stored_body(mut self, max: usize) -> Self {
        self.config_mut().max_stored_body = max;
        self
    }

    /// Keeps `Set-Cookie` headers for replay too (default: dropped, so one session's
    /// cookie is never handed out again).
    pub fn replay_set_cookie(mut self) -> Self {
        self.config_mut().keep_cookies = true;
        self
    }

    /// Never keeps the response header `name` for replay. Every header is kept but
    /// hop-by-hop ones, `Content-Length`, `Date` and `Set-Cookie`.
    pub fn skip_header(mut self, name: HeaderName) -> Self {
        self.config_mut().skipped_headers.push(name);
        self
    }

    /// The lease of a key's lock while its request runs (default 10 s), renewed by a
    /// watchdog until the request ends.
    ///
    /// # Panics
    ///
    /// When `ttl` is under one millisecond.
    pub fn lease(mut self, ttl: Duration) -> Self {
        self.locker = self.locker.ttl(ttl);
        self
    }

    /// What happens when a key's lock is lost while its handler runs (renewals failed
    /// until the lease ended, or the lock was found gone): [`LossPolicy::Abort`] (the
    /// default) drops the handler and answers 503; [`LossPolicy::Signal`] lets it run on
    /// and keeps its answer if the record is still its own. Either way the record stays,
    /// so no retry runs the work again.
    pub fn on_lock_lost(mut self, policy: LossPolicy) -> Self {
        self.config_mut().loss_policy = policy;
        self
    }

    /// The longest `Retry-After` of answers that invite a retry (default 1 s).
    pub fn retry_after_cap(mut self, hint: Duration) -> Self {
        self.locker = self.locker.retry_after_cap(hint);
        self.config_mut().retry_after = hint;
        self
    }
}

impl<S, Backend: LockBackend> Layer<S> for IdempotencyLayer<Backend> {
    type Service = Idempotency<S, Backend>;

    fn layer(&self, inner: S) -> Self::Service {
        Idempotency::new(
            inner,
            self.backend.clone(),
            self.locker.clone(),
            self.config.clone(),
        )
    }
}

impl<Backend: LockBackend> Clone for IdempotencyLayer<Backend> {
    fn clone(&self) -> Self {
        Self {
            backend: self.backend.clone(),
            locker: self.locker.clone(),
            config: self.config.clone(),
        }
    }
}

impl<Backend: LockBackend + fmt::Debug> fmt::Debug for IdempotencyLayer<Backend> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("backend", &self.backend)
            .field("header", &self.config.header)
            .field("required", &self.config.required)
            .field("ttl", &self.config.ttl)
            .field("per_caller", &self.config.principal.is_some())
            .field("loss_policy", &self.config.loss_policy)
            .finish()
    }
}
