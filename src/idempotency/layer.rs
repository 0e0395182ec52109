//! [`IdempotencyLayer`]: run a request once per `Idempotency-Key`, replay its answer after.

use std::{
    convert::Infallible,
    fmt,
    future::Future,
    mem,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    body::{Body, HttpBody},
    extract::MatchedPath,
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, StatusCode, header, request::Parts};
use sha2::{Digest, Sha256};
use tower_layer::Layer;
use tower_service::Service;

use super::{ResponseStore, StoredResponse};
use crate::{
    backend::LockBackend,
    key::LockKey,
    locker::Locker,
    rejection::{LockRejection, problem},
};

/// Default time a response is kept for replay.
pub const DEFAULT_RESPONSE_TTL: Duration = Duration::from_secs(24 * 3600);
/// Default largest request body read for the fingerprint.
pub const DEFAULT_MAX_REQUEST_BODY: usize = 1 << 20;
/// Default largest response body kept for replay.
pub const DEFAULT_MAX_STORED_BODY: usize = 64 << 10;
/// The longest idempotency key accepted.
const MAX_KEY_LEN: usize = 255;

/// The header that says a response is a replay.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

type Principal = Arc<dyn Fn(&Parts) -> Option<String> + Send + Sync>;

#[derive(Clone)]
struct Config {
    header: HeaderName,
    required: bool,
    ttl: Duration,
    max_request_body: usize,
    max_stored_body: usize,
    kept_headers: Vec<HeaderName>,
    principal: Option<Principal>,
}

/// Makes a route safe to retry: the first request with a given `Idempotency-Key` runs,
/// and its answer is kept and replayed to every retry with that key (IETF
/// `draft-ietf-httpapi-idempotency-key-header`).
///
/// | request | answer |
/// |---|---|
/// | first with its key | the route's answer, kept for `ttl` (24 h) unless 5xx, 408, 409, 423, 425 or 429, which a retry should try again |
/// | same key while the first still runs | 409 with `Retry-After` |
/// | same key later | the kept answer again, with `Idempotent-Replayed: true` |
/// | same key, different request (method, path or body) | 422 |
/// | no key where one is required | 400 |
/// | body over `max_request_body` | 413 |
/// | store unreachable | 503 with `Retry-After` |
///
/// Keys are scoped by route (the matched path) and, when set, by a principal, so that two
/// clients cannot replay each other's answers. A key is held as a lock in the backend
/// while its request runs; the kept answer (status, chosen headers, body up to
/// `max_stored_body`) sits beside that lock, in the same Cluster hash slot.
///
/// Once its key's lock is taken, a request runs to the end in a task of its own, and its
/// answer is kept even if the client hangs up meanwhile: the retry finds it. If the answer
/// cannot be kept (the store fails), the key stays locked until its lease ends, so quick
/// retries get 409 rather than run the work twice. Answers whose body size is not known
/// to fit `max_stored_body` (streams, large bodies) go out unkept.
///
/// Works on axum's `Body`; put it on the routes that need it, outside their `LockLayer`.
/// Give it a backend with fencing off: a fencing counter would be left behind for every
/// idempotency key.
///
/// # Example
///
/// ```
/// use axum::{Router, routing::post};
/// use tower_redis_lock::{InMemoryBackend, idempotency::IdempotencyLayer};
///
/// let app: Router = Router::new()
///     .route("/payments", post(|| async { "charged once" }))
///     .route_layer(IdempotencyLayer::new(InMemoryBackend::new()));
/// ```
#[must_use]
pub struct IdempotencyLayer<B: LockBackend> {
    backend: B,
    locker: Locker<B>,
    config: Arc<Config>,
}

impl<B: LockBackend + ResponseStore> IdempotencyLayer<B> {
    /// Idempotency on `backend`: the `Idempotency-Key` header required, answers kept 24 h,
    /// request bodies up to 1 MiB, kept bodies up to 64 KiB, `Content-Type` and `Location`
    /// kept with them.
    pub fn new(backend: B) -> Self {
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
                kept_headers: vec![header::CONTENT_TYPE, header::LOCATION],
                principal: None,
            }),
        }
    }
}

impl<B: LockBackend> IdempotencyLayer<B> {
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

    /// How long an answer is kept for replay (default 24 h).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.config_mut().ttl = ttl;
        self
    }

    /// The largest request body read (default 1 MiB); larger ones get 413.
    pub fn max_request_body(mut self, max: usize) -> Self {
        self.config_mut().max_request_body = max;
        self
    }

    /// The largest response body kept (default 64 KiB). A larger answer is returned but
    /// not kept, so a retry runs the request again.
    pub fn max_stored_body(mut self, max: usize) -> Self {
        self.config_mut().max_stored_body = max;
        self
    }

    /// Keeps this response header too, beside `Content-Type` and `Location`.
    pub fn keep_header(mut self, name: HeaderName) -> Self {
        self.config_mut().kept_headers.push(name);
        self
    }

    /// Scopes keys by a principal derived from the request (a user id, an API key), so
    /// that one client's key never replays another's answer. `None` answers 400.
    pub fn principal<F>(mut self, principal: F) -> Self
    where
        F: Fn(&Parts) -> Option<String> + Send + Sync + 'static,
    {
        self.config_mut().principal = Some(Arc::new(principal));
        self
    }
}

impl<S, B: LockBackend> Layer<S> for IdempotencyLayer<B> {
    type Service = Idempotency<S, B>;

    fn layer(&self, inner: S) -> Self::Service {
        Idempotency {
            inner,
            backend: self.backend.clone(),
            locker: self.locker.clone(),
            config: self.config.clone(),
        }
    }
}

impl<B: LockBackend> Clone for IdempotencyLayer<B> {
    fn clone(&self) -> Self {
        Self {
            backend: self.backend.clone(),
            locker: self.locker.clone(),
            config: self.config.clone(),
        }
    }
}

impl<B: LockBackend + fmt::Debug> fmt::Debug for IdempotencyLayer<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("backend", &self.backend)
            .field("header", &self.config.header)
            .field("required", &self.config.required)
            .field("ttl", &self.config.ttl)
            .finish()
    }
}

/// The service built by [`IdempotencyLayer`].
pub struct Idempotency<S, B: LockBackend> {
    inner: S,
    backend: B,
    locker: Locker<B>,
    config: Arc<Config>,
}

impl<S: Clone, B: LockBackend> Clone for Idempotency<S, B> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            backend: self.backend.clone(),
            locker: self.locker.clone(),
            config: self.config.clone(),
        }
    }
}

impl<S: fmt::Debug, B: LockBackend + fmt::Debug> fmt::Debug for Idempotency<S, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotency")
            .field("inner", &self.inner)
            .field("backend", &self.backend)
            .finish()
    }
}

impl<S, B> Service<Request<Body>> for Idempotency<S, B>
where
    S: Service<Request<Body>, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
    B: LockBackend + ResponseStore,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let clone = self.inner.clone();
        let inner = mem::replace(&mut self.inner, clone);
        let shared = Shared {
            backend: self.backend.clone(),
            locker: self.locker.clone(),
            config: self.config.clone(),
        };
        let once = Once { inner, shared };
        Box::pin(async move { Ok(once.run(request).await) })
    }
}

/// One request's trip through the layer.
struct Once<S, B: LockBackend> {
    inner: S,
    shared: Shared<B>,
}

/// What every request of the layer uses.
struct Shared<B: LockBackend> {
    backend: B,
    locker: Locker<B>,
    config: Arc<Config>,
}

fn bad_request(status: StatusCode, detail: &str) -> Response {
    problem(status, detail, None).map(Body::from)
}

impl<S, B> Once<S, B>
where
    S: Service<Request<Body>, Response = Response, Error = Infallible> + Send + 'static,
    S::Future: Send,
    B: LockBackend + ResponseStore,
{
    async fn run(self, request: Request<Body>) -> Response {
        let Once { mut inner, shared } = self;
        let (parts, body) = request.into_parts();
        let key = match idempotency_key(&parts, &shared.config.header) {
            Ok(Some(key)) => key,
            Ok(None) if !shared.config.required => {
                return call(&mut inner, Request::from_parts(parts, body)).await;
            }
            Ok(None) => {
                let detail = format!("this request needs an `{}` header", shared.config.header);
                return bad_request(StatusCode::BAD_REQUEST, &detail);
            }
            Err(detail) => return bad_request(StatusCode::BAD_REQUEST, detail),
        };
        let principal = match &shared.config.principal {
            None => String::new(),
            Some(principal) => match principal(&parts) {
                Some(principal) => principal,
                None => {
                    return bad_request(StatusCode::BAD_REQUEST, "the request names no principal");
                }
            },
        };
        let body = match read_body(&parts, body, shared.config.max_request_body).await {
            Ok(body) => body,
            Err(refusal) => return refusal,
        };
        let fingerprint = fingerprint(&parts, &body);
        let scope = parts.extensions.get::<MatchedPath>().map_or_else(
            || parts.uri.path().to_owned(),
            |path| path.as_str().to_owned(),
        );
        let record = record_key(&scope, &principal, &key);

        // A finished first request answers retries without any lock.
        match shared.replay(&record, &fingerprint).await {
            Ok(Some(replay)) => return replay,
            Ok(None) => {}
            Err(unavailable) => return unavailable,
        }
        let lock = match shared.locker.lock(record.clone()).await {
            Ok(lock) => lock,
            Err(LockRejection::Contended { retry_after, .. }) => {
                let detail = "a request with this idempotency key is still being processed";
                return problem(StatusCode::CONFLICT, detail, Some(retry_after)).map(Body::from);
            }
            Err(rejection) => return rejection.into_response(),
        };
        // It may have finished between our look and our lock.
        match shared.replay(&record, &fingerprint).await {
            Ok(Some(replay)) => return replay,
            Ok(None) => {}
            Err(unavailable) => return unavailable,
        }
        // From here on the work runs to the end and its answer is kept even if the client
        // hangs up: a retry must find it, not run the work again.
        let request = Request::from_parts(parts, Body::from(body));
        let work = tokio::spawn(async move {
            let response = call(&mut inner, request).await;
            let (response, kept) = shared.keep(&record, fingerprint, response).await;
            if kept {
                lock.release().await;
            } else {
                // Not stored: hold the key until the lease ends, so that quick retries get
                // 409 rather than run the work a second time.
                lock.abandon();
            }
            response
        });
        match work.await {
            Ok(response) => response,
            // The handler panicked: let it unwind here, where the stack expects it.
            Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
            Err(_) => problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "the server is shutting down",
                None,
            )
            .map(Body::from),
        }
    }
}

impl<B: LockBackend + ResponseStore> Shared<B> {
    /// The kept answer for `record`, or 422 if it was for another request.
    async fn replay(
        &self,
        record: &LockKey,
        fingerprint: &str,
    ) -> Result<Option<Response>, Response> {
        let stored = self.backend.load(record).await.map_err(|err| {
            tracing::warn!(error = %err, "idempotency store unavailable");
            let detail = "the idempotency store is unavailable";
            problem(
                StatusCode::SERVICE_UNAVAILABLE,
                detail,
                Some(Duration::from_secs(1)),
            )
            .map(Body::from)
        })?;
        let Some(stored) = stored else {
            return Ok(None);
        };
        if stored.fingerprint != fingerprint {
            let detail = "this idempotency key was used with a different request";
            return Ok(Some(bad_request(StatusCode::UNPROCESSABLE_ENTITY, detail)));
        }
        let mut response = Response::new(Body::from(stored.body));
        *response.status_mut() = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
        for (name, value) in &stored.headers {
            if let (Ok(name), Ok(value)) =
                (HeaderName::try_from(name), HeaderValue::try_from(value))
            {
                response.headers_mut().append(name, value);
            }
        }
        response
            .headers_mut()
            .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
        Ok(Some(response))
    }

    /// Keeps `response` for replay when it is final and its body is known to be small
    /// enough; returns it, and whether all went as intended (false: it should have been
    /// kept and could not be).
    async fn keep(
        &self,
        record: &LockKey,
        fingerprint: String,
        response: Response,
    ) -> (Response, bool) {
        let status = response.status();
        let transient =
            status.is_server_error() || matches!(status.as_u16(), 408 | 409 | 423 | 425 | 429);
        let max = self.config.max_stored_body;
        let small = response
            .body()
            .size_hint()
            .upper()
            .is_some_and(|upper| upper <= max as u64);
        if transient || !small {
            // A streamed or large body goes out as it is, unkept: a retry runs again.
            return (response, true);
        }
        let (parts, body) = response.into_parts();
        let Ok(body) = axum::body::to_bytes(body, max).await else {
            let failed = problem(StatusCode::BAD_GATEWAY, "the response body failed", None);
            return (failed.map(Body::from), true);
        };
        let headers = self
            .config
            .kept_headers
            .iter()
            .flat_map(|name| {
                parts
                    .headers
                    .get_all(name)
                    .iter()
                    .map(move |value| (name, value))
            })
            .filter_map(|(name, value)| Some((name.to_string(), value.to_str().ok()?.to_owned())))
            .collect();
        let stored = StoredResponse {
            fingerprint,
            status: status.as_u16(),
            headers,
            body: body.clone(),
        };
        let kept = match self.backend.store(record, &stored, self.config.ttl).await {
            Ok(()) => true,
            Err(err) => {
                tracing::error!(error = %err, key = %record, "idempotent response could not be kept");
                false
            }
        };
        (Response::from_parts(parts, Body::from(body)), kept)
    }
}

async fn call<S>(inner: &mut S, request: Request<Body>) -> Response
where
    S: Service<Request<Body>, Response = Response, Error = Infallible>,
{
    match inner.call(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    }
}

/// Reads the request body, at most `max` bytes: 413 beyond, 400 if it fails.
async fn read_body(parts: &Parts, body: Body, max: usize) -> Result<Bytes, Response> {
    let too_large = || {
        let detail = format!("the body is over {max} bytes");
        bad_request(StatusCode::PAYLOAD_TOO_LARGE, &detail)
    };
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|length| length > max as u64) {
        return Err(too_large());
    }
    axum::body::to_bytes(body, max).await.map_err(|err| {
        let over = std::error::Error::source(&err)
            .is_some_and(|source| source.is::<http_body_util::LengthLimitError>());
        if over {
            too_large()
        } else {
            bad_request(StatusCode::BAD_REQUEST, "the body could not be read")
        }
    })
}

/// The name of a key's lock and kept answer: a hash of route, principal and key, so that
/// no combination of them can spell another's, and braces in a route (`/items/{sku}`) do
/// not pick the Cluster hash slot for every key of the route.
fn record_key(scope: &str, principal: &str, key: &str) -> LockKey {
    let mut hash = Sha256::new();
    for part in [scope, principal, key] {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part);
    }
    LockKey::from(format!("idem:{}", hex(&hash.finalize())))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// The key from `header`: 1 to 255 visible characters, optionally quoted (the draft's
/// structured-field string).
fn idempotency_key(parts: &Parts, header: &HeaderName) -> Result<Option<String>, &'static str> {
    let Some(value) = parts.headers.get(header) else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| "the idempotency key must be visible ASCII")?;
    let key = value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value);
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err("the idempotency key must be 1 to 255 characters");
    }
    Ok(Some(key.to_owned()))
}

/// SHA-256 of method, path with query, and body: what makes two requests "the same".
fn fingerprint(parts: &Parts, body: &Bytes) -> String {
    let mut hash = Sha256::new();
    hash.update(parts.method.as_str());
    hash.update(b"\n");
    hash.update(parts.uri.path_and_query().map_or("", |p| p.as_str()));
    hash.update(b"\n");
    hash.update(body);
    hash.finalize()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}
