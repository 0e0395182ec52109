//! The bounded wait: attempt, back off, attempt again until the deadline.
//!
//! Kept apart from the faces (layer, in-handler locks) so that smarter waiting (release
//! notifications, the local line) changes this module and the backends, not them.

use std::{sync::Arc, time::Duration};

use tokio::time::Instant;
use uuid::Uuid;

use super::guard::{HandOff, LockGuard, LockLine, LockTurn};
use crate::{
    backend::{self, Acquire, BackendError, LockBackend},
    held::Held,
    key::LockKey,
    lease::saturating_add,
    line::{Entry, Grant, Place, StepAside},
};

/// Exponential backoff with full jitter: attempt `n` sleeps a uniformly random time in
/// `[0, min(max, base · 2ⁿ)]`, further capped by the holder's remaining lease and by the
/// wait's deadline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Backoff {
    pub(crate) base: Duration,
    pub(crate) max: Duration,
}

impl Backoff {
    fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self.base.saturating_mul(1 << attempt.min(20)).min(self.max);
        let ceiling_nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(fastrand::u64(0..=ceiling_nanos))
    }
}

/// What one acquisition needs to know.
#[derive(Clone, Copy, Debug)]
pub(crate) struct WaitPolicy {
    pub(crate) ttl: Duration,
    pub(crate) max_wait: Duration,
    pub(crate) backoff: Backoff,
    /// Whether a watchdog will renew the lease (a handed-off lease may then run short).
    pub(crate) renews: bool,
}

/// How long a waiter whose turn came from a release that other processes heard of lets
/// them try first: long enough for a notified waiter elsewhere to get its attempt in.
const STEP_ASIDE: Duration = Duration::from_millis(5);

/// A lock taken: the guard that releases it and the handle the handler sees.
pub(crate) struct Acquired<B: LockBackend> {
    pub(crate) guard: LockGuard<B>,
    pub(crate) held: Held,
    /// Whether the lock was not free at once: the wait met another holder (refused in
    /// the backend, queued behind a request of this process, or handed the lock).
    pub(crate) contended: bool,
}

/// Why the wait ended without the lock.
#[derive(Debug)]
pub(crate) enum AcquireError {
    /// Still held by another token at the deadline.
    Contended { remaining: Option<Duration> },
    /// The last attempt failed in the backend.
    Unavailable(BackendError),
}

/// Takes `key`, waiting at most `policy.max_wait` (plus one backend operation) for it.
///
/// With local queues, requests of this process line up for the key and only the first
/// asks the backend; a finished holder hands the lock to the next in line.
///
/// Every acquisition carries this future (the layer boxes it per request), so it is kept
/// to one inline wait, in the backend: the wait in line is boxed, as the contended path.
#[allow(
    clippy::manual_async_fn,
    reason = "an `async fn` stores its arguments twice"
)]
pub(crate) fn acquire<B: LockBackend>(
    backend: B,
    key: LockKey,
    policy: WaitPolicy,
    queues: Option<Arc<LockLine<B>>>,
) -> impl Future<Output = Result<Acquired<B>, AcquireError>> + Send {
    // A block: its captures are its variables (see `from_backend`).
    async move {
        let deadline = saturating_add(Instant::now(), policy.max_wait);
        let turn = match queues.as_ref().map(|line| line.enter(&key)) {
            None => None,
            Some(Entry::Turn(turn)) => Some((turn, false)),
            Some(Entry::Queued(place)) => {
                match Box::pin(wait_in_line(place, policy, deadline)).await? {
                    InLine::HandedOff(acquired) => return Ok(acquired),
                    InLine::Turn(turn) => Some((turn, true)),
                }
            }
        };
        // On failure the unused turn passes to the next in line as it drops.
        let guard = LockGuard::disarmed(backend, key, Uuid::new_v4());
        let mut acquired = from_backend(guard, &policy, deadline, queues).await?;
        if let Some((turn, queued)) = turn {
            acquired.contended |= queued;
            if backend::fair::is_fair(acquired.guard.backend()) {
                turn.used_fairly();
            } else {
                turn.used();
            }
        }
        Ok(acquired)
    }
}

/// How a wait in the local line ended, when not in a refusal.
enum InLine<B: LockBackend> {
    /// The holder handed the lock over.
    HandedOff(Acquired<B>),
    /// The turn to ask the backend came.
    Turn(LockTurn<B>),
}

/// Waits in the local line until the lock is handed over or the turn to ask the backend
/// comes (after stepping aside for other processes, when the release told them).
async fn wait_in_line<B: LockBackend>(
    place: Place<HandOff<B>>,
    policy: WaitPolicy,
    deadline: Instant,
) -> Result<InLine<B>, AcquireError> {
    match place.wait(deadline).await {
        Some(Grant::HandOff(offer)) => take_over(offer, policy, deadline)
            .await
            .map(InLine::HandedOff),
        Some(Grant::Turn { turn, step_aside }) => {
            let pause = match step_aside {
                StepAside::No => Duration::ZERO,
                StepAside::Notified => STEP_ASIDE,
                // A waiter that polls tries again within one backoff (ours, assumed to be
                // the other process's too).
                StepAside::Polling => policy.backoff.max + STEP_ASIDE,
            };
            if !pause.is_zero() {
                let pause = pause.min(deadline.saturating_duration_since(Instant::now()));
                tokio::time::sleep(pause).await;
            }
            Ok(InLine::Turn(turn))
        }
        // The holder is here; its lease is unknown to us.
        None => Err(AcquireError::Contended { remaining: None }),
    }
}

/// Attempts in the backend with the guard's token until acquired or the deadline passes.
///
/// Backend errors are retried like contention while time remains: a dropped connection
/// or a lost reply is often over by the next attempt, and a retry with the same token
/// recognises an attempt of ours that did land. Backends that undo a failed attempt
/// themselves (Redlock) get a fresh token for each attempt instead.
#[allow(
    clippy::manual_async_fn,
    reason = "an `async fn` stores its arguments twice"
)]
fn from_backend<B: LockBackend>(
    mut guard: LockGuard<B>,
    policy: &WaitPolicy,
    deadline: Instant,
    queue: Option<Arc<LockLine<B>>>,
) -> impl Future<Output = Result<Acquired<B>, AcquireError>> + Send {
    // A block, not an `async fn`: its captures are its variables, where an `async fn`
    // keeps its arguments and a copy of each (this future is inside every acquisition).
    async move {
        if backend::fair::is_fair(guard.backend()) {
            // Boxed: only fair lockers carry the fair wait's future.
            return Box::pin(super::fair::from_line(guard, *policy, deadline, queue)).await;
        }
        // The guard is armed whenever an attempt might have taken the lock without us
        // knowing: if this future is dropped or gives up then, it releases the token in the
        // background. Once an attempt failed without an answer, it may still run on the
        // server later (a stalled connection), so the token stays suspect until the end.
        let mut in_doubt = guard.is_armed();
        let mut attempt = 0;
        loop {
            let lease_start = Instant::now();
            let epoch = backend::release_epoch(guard.backend(), guard.key());
            let again = attempt > 0 || in_doubt;
            guard.arm();
            let outcome = backend::attempt(
                guard.backend(),
                guard.key(),
                guard.token(),
                policy.ttl,
                again,
            )
            .await;
            let remaining = match outcome {
                Ok(Acquire::Acquired { fencing_token }) => {
                    let (key, token) = (guard.key().clone(), guard.token());
                    let held = Held::new(key, token, fencing_token, lease_start, policy.ttl);
                    guard.acquired(&held, queue);
                    let contended = attempt > 0;
                    return Ok(Acquired {
                        guard,
                        held,
                        contended,
                    });
                }
                Ok(Acquire::Held { remaining }) => {
                    if !in_doubt {
                        guard.disarm();
                    }
                    if Instant::now() >= deadline {
                        return Err(AcquireError::Contended { remaining });
                    }
                    remaining
                }
                Err(err) => {
                    tracing::debug!(key = %guard.key(), error = %err, "lock attempt failed");
                    in_doubt = true;
                    if Instant::now() >= deadline {
                        return Err(AcquireError::Unavailable(err));
                    }
                    None
                }
            };
            let mut pause = policy
                .backoff
                .delay(attempt)
                .min(deadline.saturating_duration_since(Instant::now()));
            if let Some(remaining) = remaining {
                // The lock is free by the end of the holder's lease at the latest.
                pause = pause.min(remaining + Duration::from_millis(1));
            }
            if !guard.backend().retry_with_same_token() {
                guard.new_token();
                in_doubt = false;
            }
            let (backend, key) = (guard.backend(), guard.key());
            // Boxed: the wait (which may subscribe, and connect) is large and only for the
            // contended path; inline, every acquisition's future would carry its size.
            Box::pin(backend::wait_for_release(backend, key, epoch, pause)).await;
            attempt = attempt.saturating_add(1);
        }
    }
}

/// Takes over a lock handed off within the process. No backend call when the lease is
/// renewed, has two thirds of the ttl left and no fencing token is due; otherwise one call
/// resets the lease (and takes a new fencing token) under the same owner token.
async fn take_over<B: LockBackend>(
    offer: HandOff<B>,
    policy: WaitPolicy,
    deadline: Instant,
) -> Result<Acquired<B>, AcquireError> {
    let HandOff {
        mut guard,
        lease_deadline,
        fenced,
    } = offer;
    let (key, token) = (guard.key().clone(), guard.token());
    let lease_start = Instant::now();
    let lease_left = lease_deadline.saturating_duration_since(lease_start);
    if policy.renews && !fenced && lease_left > policy.ttl * 2 / 3 {
        let held = Held::with_deadline(key, token, None, lease_deadline);
        guard.acquired(&held, None);
        return Ok(Acquired {
            guard,
            held,
            contended: true,
        });
    }
    // The token holds the lock (or did): straight to the backend's full attempt.
    match backend::attempt(guard.backend(), &key, token, policy.ttl, true).await {
        Ok(Acquire::Acquired { fencing_token }) => {
            let held = Held::new(key, token, fencing_token, lease_start, policy.ttl);
            guard.acquired(&held, None);
            Ok(Acquired {
                guard,
                held,
                contended: true,
            })
        }
        // The lease ran out on the way and someone else has the lock now: ask for it
        // like the first in line, with a token of our own, if time is left (the take-over
        // was this wait's one operation past its deadline).
        Ok(Acquire::Held { remaining }) => {
            let backend = guard.backend().clone();
            let Some((turn, queue)) = guard.into_turn() else {
                return Err(AcquireError::Contended { remaining });
            };
            if Instant::now() >= deadline {
                return Err(AcquireError::Contended { remaining });
            }
            let fresh = LockGuard::disarmed(backend, key, Uuid::new_v4());
            let mut acquired = from_backend(fresh, &policy, deadline, Some(queue)).await?;
            acquired.contended = true;
            if backend::fair::is_fair(acquired.guard.backend()) {
                turn.used_fairly();
            } else {
                turn.used();
            }
            Ok(acquired)
        }
        // In doubt: keep trying with the same token until the deadline, and never hand
        // the lock on unless one of those attempts confirms it.
        Err(err) => {
            tracing::debug!(key = %guard.key(), error = %err, "taking over a handed-off lock failed");
            guard.keep_from_hand_off();
            if Instant::now() >= deadline {
                // The guard releases the token in the background as it drops.
                return Err(AcquireError::Unavailable(err));
            }
            if !guard.backend().retry_with_same_token() {
                guard.new_token();
            }
            let mut acquired = from_backend(guard, &policy, deadline, None).await?;
            acquired.contended = true;
            Ok(acquired)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::InMemoryBackend;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let backoff = Backoff {
            base: Duration::from_millis(50),
            max: Duration::from_millis(250),
        };
        for _ in 0..200 {
            assert!(backoff.delay(0) <= Duration::from_millis(50));
            assert!(backoff.delay(2) <= Duration::from_millis(200));
            assert!(backoff.delay(30) <= Duration::from_millis(250));
        }
        // Full jitter: the delays of one attempt number are spread, not constant.
        let delays: std::collections::HashSet<_> = (0..50).map(|_| backoff.delay(3)).collect();
        assert!(delays.len() > 10);
    }

    fn policy(max_wait: Duration) -> WaitPolicy {
        WaitPolicy {
            ttl: Duration::from_secs(10),
            max_wait,
            backoff: Backoff {
                base: Duration::from_millis(50),
                max: Duration::from_millis(250),
            },
            renews: true,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn waits_until_the_deadline_then_reports_the_holders_lease() {
        let backend = InMemoryBackend::new();
        let key = LockKey::from("k");
        let first = acquire(backend.clone(), key.clone(), policy(Duration::ZERO), None)
            .await
            .unwrap();
        let started = Instant::now();
        let err = acquire(
            backend.clone(),
            key,
            policy(Duration::from_millis(700)),
            None,
        )
        .await
        .err();
        assert!(Instant::now() - started >= Duration::from_millis(700));
        match err {
            Some(AcquireError::Contended {
                remaining: Some(remaining),
            }) => {
                assert!(remaining <= Duration::from_secs(10) - Duration::from_millis(700));
            }
            other => panic!("expected contention, got {other:?}"),
        }
        drop(first);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_gets_the_lock_when_the_holders_lease_ends() {
        let backend = InMemoryBackend::new();
        let key = LockKey::from("k");
        let short = WaitPolicy {
            ttl: Duration::from_millis(300),
            ..policy(Duration::ZERO)
        };
        let mut first = acquire(backend.clone(), key.clone(), short, None)
            .await
            .unwrap();
        first.guard.disarm(); // let it expire instead of releasing
        let second = acquire(backend.clone(), key, policy(Duration::from_secs(2)), None).await;
        assert!(second.is_ok());
    }
}

#[cfg(test)]
mod line_tests {
    //! The local line and hand-offs, driven through `acquire` on the in-process backend.
    use std::{
        sync::{
            Mutex,
            atomic::{AtomicUsize, Ordering},
        },
        time::Duration,
    };

    use uuid::Uuid;

    use super::*;
    use crate::{
        backend::{InMemoryBackend, Released},
        line::Line,
    };

    /// The in-process backend, counting the calls that reach it; each acquire attempt
    /// takes `acquire_delay` (zero by default).
    #[derive(Clone, Default)]
    struct Counting {
        inner: InMemoryBackend,
        acquires: Arc<AtomicUsize>,
        releases: Arc<AtomicUsize>,
        acquire_delay: Duration,
    }

    impl LockBackend for Counting {
        async fn try_acquire(
            &self,
            key: &LockKey,
            token: Uuid,
            ttl: Duration,
        ) -> Result<Acquire, BackendError> {
            if !self.acquire_delay.is_zero() {
                tokio::time::sleep(self.acquire_delay).await;
            }
            self.acquires.fetch_add(1, Ordering::SeqCst);
            self.inner.try_acquire(key, token, ttl).await
        }
        async fn release(&self, key: &LockKey, token: Uuid) -> Result<Released, BackendError> {
            self.releases.fetch_add(1, Ordering::SeqCst);
            self.inner.release(key, token).await
        }
        async fn extend(
            &self,
            key: &LockKey,
            token: Uuid,
            ttl: Duration,
        ) -> Result<bool, BackendError> {
            self.inner.extend(key, token, ttl).await
        }
    }

    fn policy() -> WaitPolicy {
        WaitPolicy {
            ttl: Duration::from_secs(10),
            max_wait: Duration::from_secs(60),
            backoff: Backoff {
                base: Duration::from_millis(50),
                max: Duration::from_millis(250),
            },
            renews: true,
        }
    }

    /// Twenty requests for one key, arriving one after another while it is held: they get
    /// it in arrival order, each from its predecessor, with one backend acquire and, at
    /// the cap, a release.
    #[tokio::test(start_paused = true)]
    async fn waiters_get_the_lock_in_arrival_order() {
        let backend = Counting::default();
        let queues = Line::new(100);
        let key = LockKey::from("hot");
        let order = Arc::new(Mutex::new(Vec::new()));
        let first = acquire(backend.clone(), key.clone(), policy(), Some(queues.clone())).await;
        let first = first.unwrap();
        let mut tasks = Vec::new();
        for i in 0..20 {
            let (backend, key, queues, order) =
                (backend.clone(), key.clone(), queues.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let acquired = acquire(backend, key, policy(), Some(queues)).await.unwrap();
                order.lock().unwrap().push(i);
                tokio::time::sleep(Duration::from_millis(1)).await;
                acquired.guard.release(Duration::from_secs(1)).await;
            }));
            tokio::task::yield_now().await; // let it join the line before the next comes
        }
        first.guard.release(Duration::from_secs(1)).await;
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), (0..20).collect::<Vec<_>>());
        assert_eq!(
            backend.acquires.load(Ordering::SeqCst),
            1,
            "hand-offs need no backend call"
        );
        assert_eq!(backend.releases.load(Ordering::SeqCst), 1);
        assert_eq!(queues.busy_keys(), 0);
        assert_eq!(backend.inner.held_count(), 0);
    }

    /// With a cap of 2, the lock goes back to the backend after every third holder.
    #[tokio::test(start_paused = true)]
    async fn hand_offs_stop_at_the_cap() {
        let backend = Counting::default();
        let queues = Line::new(2);
        let key = LockKey::from("hot");
        let first = acquire(backend.clone(), key.clone(), policy(), Some(queues.clone()))
            .await
            .unwrap();
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (backend, key, queues) = (backend.clone(), key.clone(), queues.clone());
                tokio::spawn(async move {
                    let acquired = acquire(backend, key, policy(), Some(queues)).await.unwrap();
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    acquired.guard.release(Duration::from_secs(1)).await;
                })
            })
            .collect();
        tokio::task::yield_now().await;
        first.guard.release(Duration::from_secs(1)).await;
        for task in tasks {
            task.await.unwrap();
        }
        // 9 holders in runs of 3: 3 acquires and 3 releases in the backend.
        assert_eq!(backend.acquires.load(Ordering::SeqCst), 3);
        assert_eq!(backend.releases.load(Ordering::SeqCst), 3);
        assert_eq!(queues.busy_keys(), 0);
    }

    /// A waiter whose request is dropped leaves the line and never receives the lock; the
    /// one behind it gets it.
    #[tokio::test(start_paused = true)]
    async fn cancelled_waiters_leave_the_line() {
        let backend = Counting::default();
        let queues = Line::new(8);
        let key = LockKey::from("hot");
        let first = acquire(backend.clone(), key.clone(), policy(), Some(queues.clone()))
            .await
            .unwrap();
        let cancelled = tokio::spawn(acquire(
            backend.clone(),
            key.clone(),
            policy(),
            Some(queues.clone()),
        ));
        tokio::task::yield_now().await;
        let next = tokio::spawn(acquire(
            backend.clone(),
            key.clone(),
            policy(),
            Some(queues.clone()),
        ));
        tokio::task::yield_now().await;
        cancelled.abort();
        assert!(cancelled.await.is_err_and(|err| err.is_cancelled()));
        first.guard.release(Duration::from_secs(1)).await;
        let next = next.await.unwrap().unwrap();
        assert_eq!(next.held.key(), &key);
        drop(next);
        tokio::task::yield_now().await;
        assert_eq!(queues.busy_keys(), 0);
        assert_eq!(
            backend.inner.held_count(),
            0,
            "the lock outlived its last holder"
        );
    }

    /// A waiter that runs out of time leaves the line with "contended", and the line goes on.
    #[tokio::test(start_paused = true)]
    async fn a_waiter_past_its_deadline_gives_up_its_place() {
        let backend = Counting::default();
        let queues = Line::new(8);
        let key = LockKey::from("hot");
        let first = acquire(backend.clone(), key.clone(), policy(), Some(queues.clone()))
            .await
            .unwrap();
        let impatient = WaitPolicy {
            max_wait: Duration::from_millis(100),
            ..policy()
        };
        let gave_up = acquire(
            backend.clone(),
            key.clone(),
            impatient,
            Some(queues.clone()),
        )
        .await;
        assert!(matches!(gave_up, Err(AcquireError::Contended { .. })));
        first.guard.release(Duration::from_secs(1)).await;
        assert_eq!(queues.busy_keys(), 0);
        assert_eq!(backend.inner.held_count(), 0);
    }

    /// A hand-off whose take-over finds the lock taken by someone else (its lease ran out
    /// on the way): the waiter answers "contended" after that one call, instead of asking
    /// again past its deadline.
    #[tokio::test(start_paused = true)]
    async fn a_failed_take_over_makes_no_call_past_the_deadline() {
        let backend = Counting {
            acquire_delay: Duration::from_secs(1),
            ..Counting::default()
        };
        let line = Line::new(8);
        let key = LockKey::from("k");
        let policy = WaitPolicy {
            ttl: Duration::from_secs(10),
            max_wait: Duration::from_millis(500),
            backoff: Backoff {
                base: Duration::from_millis(50),
                max: Duration::from_millis(250),
            },
            // Without renewal a take-over always asks the backend.
            renews: false,
        };
        let holder = acquire(backend.clone(), key.clone(), policy, Some(line.clone()))
            .await
            .unwrap();
        let started = Instant::now();
        let waiter = tokio::spawn(acquire(
            backend.clone(),
            key.clone(),
            policy,
            Some(line.clone()),
        ));
        tokio::task::yield_now().await;
        // Behind the holder's back, its lock goes to another owner.
        backend
            .inner
            .release(&key, holder.held.token())
            .await
            .unwrap();
        backend
            .inner
            .try_acquire(&key, Uuid::new_v4(), Duration::from_secs(60))
            .await
            .unwrap();
        let before = backend.acquires.load(Ordering::SeqCst);
        holder.guard.release(Duration::from_secs(1)).await; // hands off to the waiter
        let answer = waiter.await.unwrap();
        assert!(matches!(answer, Err(AcquireError::Contended { .. })));
        assert_eq!(
            backend.acquires.load(Ordering::SeqCst) - before,
            1,
            "a second call after the take-over"
        );
        assert!(Instant::now() - started <= Duration::from_millis(1600));
    }
}
