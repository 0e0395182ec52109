//! The response future of [`Lock`](super::Lock): acquire, call, release.

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
use tower_service::Service;

use super::layer::LayerSettings;
use crate::{
    backend::LockBackend,
    held::Held,
    locker::{
        AcquireError, Acquired, LockGuard, Locker, ReleaseOutcome, WaitStart, Watchdog,
        loss_on_release, note_loss,
    },
    observe::{self, Outcome},
    policy::{BackendErrorPolicy, LossPolicy},
    rejection::LockRejection,
};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The wait for the lock (see [`Locker::begin_wait`]).
pub(crate) type Acquisition<Backend> = BoxFuture<Result<Acquired<Backend>, AcquireError>>;

pin_project! {
    /// Response future of [`Lock`](super::Lock).
    ///
    /// Dropping it at any point releases what it may hold: during the wait, a lock whose
    /// acquire reply was not seen yet; during the call or the release, the lock itself.
    pub struct ResponseFuture<S, Backend, ReqBody>
    where
        S: Service<Request<ReqBody>>,
        Backend: LockBackend,
    {
        #[pin]
        state: State<S, Backend, ReqBody>,
        settings: Arc<LayerSettings>,
        span: tracing::Span,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, Backend, ReqBody>
    where
        S: Service<Request<ReqBody>>,
        Backend: LockBackend,
    {
        // Waiting for the lock. The service was polled ready before the wait began.
        Acquiring {
            acquire: Acquisition<Backend>,
            // Taken when the wait ends: the locker that records it, and when it began.
            begun: Option<(Arc<Locker<Backend>>, WaitStart)>,
            service: Option<S>,
            request: Option<Request<ReqBody>>,
        },
        // The inner service runs under the lock, renewed by the watchdog.
        Calling {
            #[pin]
            future: S::Future,
            locker: Arc<Locker<Backend>>,
            guard: Option<LockGuard<Backend>>,
            // `None` once it reported the loss (under `Signal`, the handler goes on).
            watchdog: Option<Watchdog<Backend>>,
            held: Held,
        },
        // The response is ready; the release is awaited (bounded) before it goes out, and
        // its answer says whether the lock was still ours.
        Releasing {
            release: BoxFuture<ReleaseOutcome>,
            output: Option<Result<S::Response, S::Error>>,
            locker: Arc<Locker<Backend>>,
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

impl<S, Backend, ReqBody> ResponseFuture<S, Backend, ReqBody>
where
    S: Service<Request<ReqBody>>,
    Backend: LockBackend,
{
    pub(crate) fn acquiring(
        locker: Arc<Locker<Backend>>,
        start: WaitStart,
        acquire: Acquisition<Backend>,
        service: S,
        request: Request<ReqBody>,
        settings: Arc<LayerSettings>,
        span: tracing::Span,
    ) -> Self {
        let state = State::Acquiring {
            acquire,
            begun: Some((locker, start)),
            service: Some(service),
            request: Some(request),
        };
        Self::with_state(state, settings, span)
    }

    pub(crate) fn unlocked(future: S::Future, settings: Arc<LayerSettings>) -> Self {
        Self::with_state(State::Unlocked { future }, settings, tracing::Span::none())
    }

    pub(crate) fn rejected(response: S::Response, settings: Arc<LayerSettings>) -> Self {
        let state = State::Rejected {
            response: Some(response),
        };
        Self::with_state(state, settings, tracing::Span::none())
    }

    fn with_state(
        state: State<S, Backend, ReqBody>,
        settings: Arc<LayerSettings>,
        span: tracing::Span,
    ) -> Self {
        Self {
            state,
            settings,
            span,
        }
    }
}

impl<S, Backend, ReqBody, ResBody> Future for ResponseFuture<S, Backend, ReqBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    Backend: LockBackend,
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
                    begun,
                    service,
                    request,
                } => {
                    let outcome = ready!(acquire.as_mut().poll(cx));
                    let mut service = service.take().expect("polled after completion");
                    let mut request = request.take().expect("polled after completion");
                    let (locker, start) = begun.take().expect("polled after completion");
                    if !this.span.is_disabled() {
                        let waited = start.started.elapsed();
                        this.span.record("wait_ms", waited.as_secs_f64() * 1e3);
                    }
                    let next = match locker.end_wait(start, outcome) {
                        Ok(Acquired { guard, held, .. }) => {
                            this.span.record("outcome", Outcome::Acquired.as_str());
                            let watchdog = Some(locker.watchdog(&held));
                            request.extensions_mut().insert(held.clone());
                            State::Calling {
                                future: service.call(request),
                                locker,
                                guard: Some(guard),
                                watchdog,
                                held,
                            }
                        }
                        Err(LockRejection::Unavailable { source, .. })
                            if this.settings.fail_mode == BackendErrorPolicy::Open =>
                        {
                            tracing::warn!(error = %source, "lock backend failed; serving unlocked (fail-open)");
                            this.span.record("outcome", Outcome::Unavailable.as_str());
                            State::Unlocked {
                                future: service.call(request),
                            }
                        }
                        Err(rejection) => {
                            this.span.record("outcome", rejection.outcome().as_str());
                            return Poll::Ready(Ok(this.settings.respond(&rejection)));
                        }
                    };
                    this.state.set(next);
                }
                StateProj::Calling {
                    future,
                    locker,
                    guard,
                    watchdog,
                    held,
                } => {
                    // The lease first: a handler is not polled on past a lost lock. While
                    // nothing is due, the watchdog would only arm its timer: then the
                    // handler goes first, and the timer is armed only if it is pending (a
                    // quick handler costs no timer).
                    let quiet = watchdog.as_ref().is_none_or(Watchdog::is_quiet);
                    if !quiet
                        && let Some(rejection) =
                            watch_lease(watchdog, locker, held, this.settings, cx)
                    {
                        this.span.record("outcome", Outcome::Lost.as_str());
                        this.state.set(State::Rejected { response: None });
                        return Poll::Ready(Ok(this.settings.respond(&rejection)));
                    }
                    let output = match future.poll(cx) {
                        Poll::Ready(output) => output,
                        Poll::Pending => {
                            if quiet
                                && let Some(rejection) =
                                    watch_lease(watchdog, locker, held, this.settings, cx)
                            {
                                this.span.record("outcome", Outcome::Lost.as_str());
                                this.state.set(State::Rejected { response: None });
                                return Poll::Ready(Ok(this.settings.respond(&rejection)));
                            }
                            return Poll::Pending;
                        }
                    };
                    // A handler that blocked its thread past the lease and finished in
                    // the same poll got past the watchdog: look at the deadline now.
                    let ran_out = held.is_lost();
                    locker.held_for(held.acquired_at().elapsed());
                    let guard = guard.take().expect("polled after completion");
                    let timeout = locker.settings().release_timeout;
                    let release = Box::pin(guard.release(timeout));
                    let (locker, held) = (locker.clone(), held.clone());
                    this.state.set(State::Releasing {
                        release,
                        output: Some(output),
                        locker,
                        held,
                        ran_out,
                    });
                }
                StateProj::Releasing {
                    release,
                    output,
                    locker,
                    held,
                    ran_out,
                } => {
                    let outcome = ready!(release.as_mut().poll(cx));
                    let output = output.take().expect("polled after completion");
                    // A loss the watchdog reported was handled in `Calling`; this one was
                    // found only now, after the handler answered.
                    if let Some(loss) = loss_on_release(outcome, *ran_out)
                        && note_loss(held, locker.class(), loss)
                    {
                        this.span.record("outcome", Outcome::Lost.as_str());
                        if this.settings.loss_policy == LossPolicy::Abort {
                            // The handler's answer is dropped: it was made without the lock.
                            drop(output);
                            let rejection =
                                LayerSettings::loss(loss, locker.settings().retry_after_cap);
                            return Poll::Ready(Ok(this.settings.respond(&rejection)));
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

/// Polls the watchdog of a lock whose handler runs. On a loss, counts it and, under
/// [`LossPolicy::Abort`], returns the answer that replaces the handler's (whose future the
/// caller then drops; the guard still releases, in case the lease was merely
/// unreachable). Under `Signal` the handler was told through `Held`; it decides.
fn watch_lease<Backend: LockBackend>(
    watchdog: &mut Option<Watchdog<Backend>>,
    locker: &Locker<Backend>,
    held: &Held,
    settings: &LayerSettings,
    cx: &mut Context<'_>,
) -> Option<LockRejection> {
    let Poll::Ready(loss) = watchdog.as_mut()?.poll_lost(cx) else {
        return None;
    };
    *watchdog = None;
    observe::lost(locker.class());
    if settings.loss_policy != LossPolicy::Abort {
        return None;
    }
    locker.held_for(held.acquired_at().elapsed());
    Some(LayerSettings::loss(loss, locker.settings().retry_after_cap))
}

impl<S, Backend, ReqBody> fmt::Debug for ResponseFuture<S, Backend, ReqBody>
where
    S: Service<Request<ReqBody>>,
    Backend: LockBackend,
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
