//! The response future of [`Lock`](crate::Lock): acquire, call, release.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use http::{Request, Response};
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower_service::Service;

use crate::{
    Held, LockBackend,
    acquire::{AcquireError, Acquired},
    config::{FailMode, LockConfig, LossPolicy},
    guard::{LockGuard, ReleaseOutcome},
    observe::{self, Outcome},
    watchdog::{Watchdog, loss_on_release, note_loss},
};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

pin_project! {
    /// Response future of [`Lock`](crate::Lock).
    ///
    /// Dropping it at any point releases what it may hold: during the wait, a lock whose
    /// acquire reply was not seen yet; during the call or the release, the lock itself.
    pub struct ResponseFuture<S, B, ReqBody>
    where
        S: Service<Request<ReqBody>>,
        B: LockBackend,
    {
        #[pin]
        state: State<S, B, ReqBody>,
        config: Arc<LockConfig>,
        span: tracing::Span,
        started: Instant,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, B, ReqBody>
    where
        S: Service<Request<ReqBody>>,
        B: LockBackend,
    {
        // Waiting for the lock. The service was polled ready before the wait began.
        Acquiring {
            acquire: BoxFuture<Result<Acquired<B>, AcquireError>>,
            service: Option<S>,
            request: Option<Request<ReqBody>>,
        },
        // The inner service runs under the lock, renewed by the watchdog.
        Calling {
            #[pin]
            future: S::Future,
            guard: Option<LockGuard<B>>,
            // `None` once it reported the loss (under `Signal`, the handler goes on).
            watchdog: Option<Watchdog<B>>,
            held: Held,
            acquired_at: Instant,
        },
        // The response is ready; the release is awaited (bounded) before it goes out, and
        // its answer says whether the lock was still ours.
        Releasing {
            release: BoxFuture<ReleaseOutcome>,
            output: Option<Result<S::Response, S::Error>>,
            held: Held,
            // The lease deadline had passed when the handler finished.
            ran_out: bool,
        },
        // No lock needed (no key with pass-through, or fail-open).
        Unlocked {
            #[pin]
            future: S::Future,
        },
        // Answered by the layer itself.
        Rejected {
            response: Option<S::Response>,
        },
    }
}

impl<S, B, ReqBody> ResponseFuture<S, B, ReqBody>
where
    S: Service<Request<ReqBody>>,
    B: LockBackend,
{
    pub(crate) fn acquiring(
        acquire: BoxFuture<Result<Acquired<B>, AcquireError>>,
        service: S,
        request: Request<ReqBody>,
        config: Arc<LockConfig>,
        span: tracing::Span,
    ) -> Self {
        let state = State::Acquiring {
            acquire,
            service: Some(service),
            request: Some(request),
        };
        let started = Instant::now();
        Self {
            state,
            config,
            span,
            started,
        }
    }

    pub(crate) fn unlocked(future: S::Future, config: Arc<LockConfig>) -> Self {
        let (span, started) = (tracing::Span::none(), Instant::now());
        Self {
            state: State::Unlocked { future },
            config,
            span,
            started,
        }
    }

    pub(crate) fn rejected(response: S::Response, config: Arc<LockConfig>) -> Self {
        let (span, started) = (tracing::Span::none(), Instant::now());
        let state = State::Rejected {
            response: Some(response),
        };
        Self {
            state,
            config,
            span,
            started,
        }
    }
}

impl<S, B, ReqBody, ResBody> Future for ResponseFuture<S, B, ReqBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    B: LockBackend,
    ResBody: From<Bytes>,
{
    type Output = Result<Response<ResBody>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let _entered = this.span.enter();
        loop {
            match this.state.as_mut().project() {
                StateProj::Acquiring {
                    acquire,
                    service,
                    request,
                } => {
                    let outcome = ready!(acquire.as_mut().poll(cx));
                    let mut service = service.take().expect("polled after completion");
                    let mut request = request.take().expect("polled after completion");
                    let waited = this.started.elapsed();
                    this.span.record("wait_ms", waited.as_secs_f64() * 1e3);
                    let next = match outcome {
                        Ok(Acquired { guard, held }) => {
                            this.span.record("outcome", Outcome::Acquired.as_str());
                            observe::outcome(&this.config.class, Outcome::Acquired);
                            observe::waited(&this.config.class, waited);
                            let acquired_at = held.acquired_at();
                            let watchdog = Some(Watchdog::new(
                                guard.backend().clone(),
                                held.clone(),
                                this.config.wait.ttl,
                                this.config.renew_every(),
                            ));
                            request.extensions_mut().insert(held.clone());
                            let future = service.call(request);
                            State::Calling {
                                future,
                                guard: Some(guard),
                                watchdog,
                                held,
                                acquired_at,
                            }
                        }
                        Err(AcquireError::Unavailable(err))
                            if this.config.fail_mode == FailMode::Open =>
                        {
                            tracing::warn!(error = %err, "lock backend failed; serving unlocked (fail-open)");
                            this.span.record("outcome", Outcome::Unavailable.as_str());
                            observe::outcome(&this.config.class, Outcome::Unavailable);
                            State::Unlocked {
                                future: service.call(request),
                            }
                        }
                        Err(err) => {
                            let rejection = this.config.rejection(err);
                            this.span.record("outcome", rejection.outcome().as_str());
                            return Poll::Ready(Ok(this.config.respond(&rejection)));
                        }
                    };
                    this.state.set(next);
                }
                StateProj::Calling {
                    future,
                    guard,
                    watchdog,
                    held,
                    acquired_at,
                } => {
                    // The lease first: a handler is not polled on past a lost lock.
                    if let Some(Poll::Ready(loss)) = watchdog.as_mut().map(|w| w.poll_lost(cx)) {
                        *watchdog = None;
                        observe::lost(&this.config.class);
                        if this.config.loss_policy == LossPolicy::Abort {
                            // Dropping the state drops the handler's future; the guard
                            // still releases, in case the lease was merely unreachable.
                            let rejection = this.config.loss(loss);
                            this.span.record("outcome", Outcome::Lost.as_str());
                            observe::held(&this.config.class, acquired_at.elapsed());
                            this.state.set(State::Rejected { response: None });
                            return Poll::Ready(Ok(this.config.respond(&rejection)));
                        }
                        // `Signal`: the handler was told through `Held`; it decides.
                    }
                    let output = ready!(future.poll(cx));
                    // A handler that blocked its thread past the lease and finished in
                    // the same poll got past the watchdog: look at the deadline now.
                    let ran_out = held.is_lost();
                    observe::held(&this.config.class, acquired_at.elapsed());
                    let guard = guard.take().expect("polled after completion");
                    let release = Box::pin(guard.release(this.config.release_timeout));
                    let held = held.clone();
                    this.state.set(State::Releasing {
                        release,
                        output: Some(output),
                        held,
                        ran_out,
                    });
                }
                StateProj::Releasing {
                    release,
                    output,
                    held,
                    ran_out,
                } => {
                    let outcome = ready!(release.as_mut().poll(cx));
                    let output = output.take().expect("polled after completion");
                    // A loss the watchdog reported was handled in `Calling`; this one was
                    // found only now, after the handler answered.
                    if let Some(loss) = loss_on_release(outcome, *ran_out)
                        && note_loss(held, &this.config.class, loss)
                    {
                        this.span.record("outcome", Outcome::Lost.as_str());
                        if this.config.loss_policy == LossPolicy::Abort {
                            // The handler's answer is dropped: it was made without the lock.
                            drop(output);
                            let rejection = this.config.loss(loss);
                            return Poll::Ready(Ok(this.config.respond(&rejection)));
                        }
                    }
                    return Poll::Ready(output);
                }
                StateProj::Unlocked { future } => return future.poll(cx),
                StateProj::Rejected { response } => {
                    return Poll::Ready(Ok(response.take().expect("polled after completion")));
                }
            }
        }
    }
}

impl<S, B, ReqBody> fmt::Debug for ResponseFuture<S, B, ReqBody>
where
    S: Service<Request<ReqBody>>,
    B: LockBackend,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Acquiring { .. } => "acquiring",
            State::Calling { .. } => "calling",
            State::Releasing { .. } => "releasing",
            State::Unlocked { .. } => "unlocked",
            State::Rejected { .. } => "rejected",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
