//! [`Idempotency`]: the service [`IdempotencyLayer`](super::IdempotencyLayer) builds, and
//! one request's trip through it.

use std::{
    any::Any,
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
use http::{Request, StatusCode};
use tower_service::Service;
use uuid::Uuid;

use super::{
    IdempotencyKey, Retryable,
    layer::Config,
    request::{fingerprint, idempotency_key, read_body, record_key},
    response::{from_record, in_progress, kept_headers, problem_response, unavailable},
    store::{Finished, ResponseStore, StoredResponse, Unreplayable},
};
use crate::{
    backend::LockBackend,
    key::LockKey,
    locker::{Locker, OwnedLock},
    policy::LossPolicy,
    rejection::LockRejection,
};

/// The service built by [`IdempotencyLayer`](super::IdempotencyLayer).
pub struct Idempotency<S, Backend: LockBackend> {
    inner: S,
    shared: Shared<Backend>,
}

/// What every request of the layer uses.
struct Shared<Backend: LockBackend> {
    backend: Backend,
    locker: Locker<Backend>,
    config: Arc<Config>,
}

impl<Backend: LockBackend> Clone for Shared<Backend> {
    fn clone(&self) -> Self {
        Self {
            backend: self.backend.clone(),
            locker: self.locker.clone(),
            config: self.config.clone(),
        }
    }
}

impl<S, Backend: LockBackend> Idempotency<S, Backend> {
    pub(super) fn new(
        inner: S,
        backend: Backend,
        locker: Locker<Backend>,
        config: Arc<Config>,
    ) -> Self {
        Self {
            inner,
            shared: Shared {
                backend,
                locker,
                config,
            },
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

    /// The inner service, consuming this one.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone, Backend: LockBackend> Clone for Idempotency<S, Backend> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: fmt::Debug, Backend: LockBackend + fmt::Debug> fmt::Debug for Idempotency<S, Backend> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotency")
            .field("inner", &self.inner)
            .field("backend", &self.shared.backend)
            .finish()
    }
}

impl<S, Backend> Service<Request<Body>> for Idempotency<S, Backend>
where
    S: Service<Request<Body>, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
    Backend: LockBackend + ResponseStore,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        // The instance that was polled ready goes with the request (and with it any
        // reservation it made, such as a concurrency-limit permit).
        let clone = self.inner.clone();
        let inner = mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        Box::pin(async move { Ok(shared.run(inner, request).await) })
    }
}

/// How long a record write that failed (store unreachable, out of memory) is retried in
/// the background before the record is left pending until it expires.
pub(super) const STORE_RETRY_FOR: Duration = Duration::from_secs(30);

/// How the detached work ended, for the request still waiting on it.
enum Ended {
    Answered(Response),
    Panicked(Box<dyn Any + Send>),
}

impl<Backend: LockBackend + ResponseStore> Shared<Backend> {
    async fn run<S>(self, mut inner: S, request: Request<Body>) -> Response
    where
        S: Service<Request<Body>, Response = Response, Error = Infallible> + Send + 'static,
        S::Future: Send + 'static,
    {
        let config = self.config.clone();
        let (parts, body) = request.into_parts();
        let key = match idempotency_key(&parts, &config.header) {
            Ok(Some(key)) => key,
            Ok(None) if !config.required => {
                return call(&mut inner, Request::from_parts(parts, body)).await;
            }
            Ok(None) => {
                let detail = format!("this request needs an `{}` header", config.header);
                return problem_response(StatusCode::BAD_REQUEST, &detail, None);
            }
            Err(detail) => return problem_response(StatusCode::BAD_REQUEST, detail, None),
        };
        let principal = match &config.principal {
            None => String::new(),
            Some(principal) => match principal(&parts) {
                Some(principal) => principal,
                None => {
                    let detail = "the request names no caller to scope its idempotency key";
                    return problem_response(StatusCode::BAD_REQUEST, detail, None);
                }
            },
        };
        let body = match read_body(&parts, body, config.max_request_body).await {
            Ok(body) => body,
            Err(refusal) => return refusal,
        };
        let fingerprint = fingerprint(&parts, &body);
        let scope = parts.extensions.get::<MatchedPath>().map_or_else(
            || parts.uri.path().to_owned(),
            |path| path.as_str().to_owned(),
        );
        let record = record_key(&scope, &principal, &key);

        // A record answers without any lock.
        if let Some(answer) = self.answer_from_record(&record, &fingerprint, None).await {
            return answer;
        }
        let lock = match self.locker.lock(record.clone()).await {
            Ok(lock) => lock,
            Err(LockRejection::Contended { retry_after, .. }) => {
                // Its holder may have begun the record since we looked.
                return self
                    .answer_from_record(&record, &fingerprint, Some(retry_after))
                    .await
                    .unwrap_or_else(|| in_progress(retry_after));
            }
            Err(rejection) => return rejection.into_response(),
        };
        // From here on nothing the client does can interrupt: the record is begun, the
        // work runs to the end and its end is recorded in a task of its own, so a retry
        // finds it rather than run the work again.
        let mut request = Request::from_parts(parts, Body::from(body));
        request
            .extensions_mut()
            .insert(IdempotencyKey { key, principal });
        let work = tokio::spawn(self.begin_and_work(inner, request, lock, record, fingerprint));
        match work.await {
            Ok(Ended::Answered(response)) => response,
            // The handler panicked: let it unwind here, where the stack expects it.
            Ok(Ended::Panicked(payload)) => std::panic::resume_unwind(payload),
            Err(_) => problem_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "the server is shutting down",
                None,
            ),
        }
    }

    /// Begins the record under `lock`, then runs the work if it was begun.
    async fn begin_and_work<S>(
        self,
        inner: S,
        request: Request<Body>,
        lock: OwnedLock<Backend>,
        record: LockKey,
        fingerprint: String,
    ) -> Ended
    where
        S: Service<Request<Body>, Response = Response, Error = Infallible> + Send + 'static,
        S::Future: Send + 'static,
    {
        let owner = lock.token();
        let begun = self
            .backend
            .begin(&record, owner, &fingerprint, self.config.ttl)
            .await;
        match begun {
            Ok(true) => self.work(inner, request, lock, record, owner).await,
            Ok(false) => {
                // A record appeared between our look and our lock.
                lock.release().await;
                let answer = self
                    .answer_from_record(&record, &fingerprint, None)
                    .await
                    .unwrap_or_else(|| in_progress(self.config.retry_after));
                Ended::Answered(answer)
            }
            Err(err) => {
                tracing::warn!(error = %err, key = %record, "idempotency record could not be begun");
                // The script may have run and only its reply been lost: take back a record
                // of ours, or the key would stay refused though nothing ran.
                self.forget(&record, owner).await;
                lock.release().await;
                Ended::Answered(unavailable(self.config.retry_after))
            }
        }
    }

    /// Calls the handler under `lock` and records how it ended.
    async fn work<S>(
        self,
        mut inner: S,
        request: Request<Body>,
        lock: OwnedLock<Backend>,
        record: LockKey,
        owner: Uuid,
    ) -> Ended
    where
        S: Service<Request<Body>, Response = Response, Error = Infallible> + Send + 'static,
        S::Future: Send + 'static,
    {
        // The handler in a task of its own, so that a panic is caught and a lost lock can
        // stop it.
        let mut handler = tokio::spawn(async move { call(&mut inner, request).await });
        let abort = self.config.loss_policy == LossPolicy::Abort;
        let joined = tokio::select! {
            biased;
            () = lock.lost(), if abort => None,
            joined = &mut handler => Some(joined),
        };
        let ended = match joined {
            None => {
                handler.abort();
                tracing::error!(key = %record, "idempotency key's lock lost while its handler ran: handler stopped, record left pending");
                let detail = "the lock on this idempotency key was lost while the request ran, \
                              so it was stopped; its outcome is unknown, and it will not run \
                              again under this key";
                let response = problem_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    detail,
                    Some(self.config.retry_after),
                );
                // Releasing is harmless (compare-and-delete) and may free a lock that was
                // only unreachable.
                lock.release().await;
                return Ended::Answered(response);
            }
            Some(Ok(response)) => self.keep(&record, owner, response).await,
            Some(Err(err)) if err.is_panic() => {
                self.finish(
                    &record,
                    owner,
                    Finished::Unreplayable(Unreplayable::Panicked),
                )
                .await;
                Ended::Panicked(err.into_panic())
            }
            Some(Err(_)) => Ended::Answered(problem_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "the server is shutting down",
                None,
            )),
        };
        lock.release().await;
        ended
    }

    /// Records `response` (or that it cannot be replayed) and returns it, for its client.
    async fn keep(&self, record: &LockKey, owner: Uuid, response: Response) -> Ended {
        if response.extensions().get::<Retryable>().is_some() {
            // The work did not run (or may run again): free the key.
            self.forget(record, owner).await;
            return Ended::Answered(response);
        }
        let max = self.config.max_stored_body;
        let fits = response
            .body()
            .size_hint()
            .upper()
            .is_some_and(|upper| upper <= max as u64);
        if !fits {
            // A streamed or large body goes out as it is; retries are told why it is not
            // replayed.
            self.finish(
                record,
                owner,
                Finished::Unreplayable(Unreplayable::TooLarge),
            )
            .await;
            return Ended::Answered(response);
        }
        let (parts, body) = response.into_parts();
        let Ok(body) = axum::body::to_bytes(body, max).await else {
            self.finish(
                record,
                owner,
                Finished::Unreplayable(Unreplayable::BodyFailed),
            )
            .await;
            let failed =
                problem_response(StatusCode::BAD_GATEWAY, "the response body failed", None);
            return Ended::Answered(failed);
        };
        let stored = StoredResponse {
            status: parts.status.as_u16(),
            headers: kept_headers(
                &parts.headers,
                self.config.keep_cookies,
                &self.config.skipped_headers,
            ),
            body: body.clone(),
        };
        self.finish(record, owner, Finished::Complete(stored)).await;
        Ended::Answered(Response::from_parts(parts, Body::from(body)))
    }

    /// Ends the record. If the store fails, the write is retried in the background for
    /// [`STORE_RETRY_FOR`]; meanwhile the record stays pending (retries get 409).
    async fn finish(&self, record: &LockKey, owner: Uuid, finished: Finished) {
        let result = self
            .backend
            .finish(record, owner, &finished, self.config.ttl)
            .await;
        match result {
            Ok(true) => {}
            Ok(false) => {
                tracing::error!(key = %record, "idempotency record no longer this request's: its answer is not kept")
            }
            Err(err) => {
                tracing::error!(error = %err, key = %record, "idempotency record could not be ended: retrying in the background");
                self.retry_in_background(record.clone(), owner, Some(finished));
            }
        }
    }

    /// Deletes the record, for an answer marked [`Retryable`]; retried in the background
    /// if the store fails.
    async fn forget(&self, record: &LockKey, owner: Uuid) {
        if let Err(err) = self.backend.forget(record, owner).await {
            tracing::warn!(error = %err, key = %record, "idempotency record could not be deleted: retrying in the background");
            self.retry_in_background(record.clone(), owner, None);
        }
    }

    /// Retries a failed [`finish`](Self::finish) (`Some`) or [`forget`](Self::forget)
    /// (`None`) with a jittered, doubling backoff, for at most [`STORE_RETRY_FOR`].
    fn retry_in_background(&self, record: LockKey, owner: Uuid, finished: Option<Finished>) {
        let this = self.clone();
        tokio::spawn(async move {
            let give_up = tokio::time::Instant::now() + STORE_RETRY_FOR;
            let mut pause = Duration::from_millis(100);
            while tokio::time::Instant::now() < give_up {
                let jitter = Duration::from_millis(fastrand::u64(0..=pause.as_millis() as u64 / 2));
                tokio::time::sleep(pause + jitter).await;
                let result = match &finished {
                    Some(finished) => {
                        this.backend
                            .finish(&record, owner, finished, this.config.ttl)
                            .await
                    }
                    None => this.backend.forget(&record, owner).await,
                };
                match result {
                    Ok(true) => {
                        tracing::info!(key = %record, "idempotency record written after a retry");
                        return;
                    }
                    Ok(false) => return, // no longer ours: nothing to do
                    Err(_) => pause = (pause * 2).min(Duration::from_secs(2)),
                }
            }
            tracing::error!(key = %record, "idempotency record still not written: it stays pending (409) until it expires");
        });
    }

    /// The answer the record under `record` gives, if there is one; 503 if the store
    /// cannot say. `retry_after` overrides the hint for "still running".
    async fn answer_from_record(
        &self,
        record: &LockKey,
        fingerprint: &str,
        retry_after: Option<Duration>,
    ) -> Option<Response> {
        let retry_after = retry_after.unwrap_or(self.config.retry_after);
        match self.backend.load(record).await {
            Ok(found) => found.map(|found| from_record(found, fingerprint, retry_after)),
            Err(err) => {
                tracing::warn!(error = %err, "idempotency store unavailable");
                Some(unavailable(self.config.retry_after))
            }
        }
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
