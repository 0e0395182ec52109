//! Who owns a lock: the private [`LockGuard`] that releases it, and the public [`Held`]
//! handle that handlers see.

use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{sync::watch, time::Instant};
use uuid::Uuid;

use crate::{
    LockBackend, LockKey,
    queue::{HandOff, LocalQueues, PassTurnOnDrop, StepAside, Turn},
};

/// The lock a request holds, as its handler sees it.
///
/// The layer puts it in the request's extensions; with the `axum` feature it is an
/// extractor (`Held`, or `Option<Held>` which never rejects). It is a view: the lock is
/// released by its owner (the layer, or an [`OwnedLock`](crate::OwnedLock)), not when a
/// `Held` drops. Its lease deadline moves forward with each renewal, and it learns when the
/// lock is lost.
#[derive(Clone)]
pub struct Held {
    inner: Arc<HeldInner>,
}

struct HeldInner {
    key: LockKey,
    token: Uuid,
    fencing_token: Option<u64>,
    acquired_at: Instant,
    /// The lease deadline, as nanoseconds after `acquired_at`; renewals move it.
    deadline_nanos: AtomicU64,
    /// `true` once the lock is known lost.
    lost: watch::Sender<bool>,
}

impl Held {
    /// `lease_start` is taken before the acquire command was sent, so the deadline errs
    /// early; the drift margin covers clock-rate differences with the server.
    pub(crate) fn new(
        key: LockKey,
        token: Uuid,
        fencing_token: Option<u64>,
        lease_start: Instant,
        ttl: Duration,
    ) -> Self {
        let held = Self::with_deadline(key, token, fencing_token, lease_start);
        held.renewed(lease_start, ttl);
        held
    }

    /// A view whose lease ends at `deadline` (drift already taken off): a lock handed over
    /// within the process keeps its predecessor's lease.
    pub(crate) fn with_deadline(
        key: LockKey,
        token: Uuid,
        fencing_token: Option<u64>,
        deadline: Instant,
    ) -> Self {
        let held = Self {
            inner: Arc::new(HeldInner {
                key,
                token,
                fencing_token,
                acquired_at: Instant::now(),
                deadline_nanos: AtomicU64::new(0),
                lost: watch::Sender::new(false),
            }),
        };
        held.set_deadline(deadline);
        held
    }

    /// Moves the deadline to `lease_start + ttl − drift` after a renewal sent at `lease_start`.
    pub(crate) fn renewed(&self, lease_start: Instant, ttl: Duration) {
        self.set_deadline(lease_end(lease_start, ttl));
    }

    fn set_deadline(&self, deadline: Instant) {
        let nanos = deadline
            .saturating_duration_since(self.inner.acquired_at)
            .as_nanos();
        let nanos = u64::try_from(nanos).unwrap_or(u64::MAX);
        self.inner.deadline_nanos.store(nanos, Ordering::Release);
    }

    /// Records that the lock is lost and wakes every [`lost`](Self::lost) future. True
    /// the first time, so that a loss is counted once however it was found.
    pub(crate) fn mark_lost(&self) -> bool {
        !self.inner.lost.send_replace(true)
    }

    /// The lock's key, with the layer's prefix.
    pub fn key(&self) -> &LockKey {
        &self.inner.key
    }

    /// The owner token stored in the backend: a fresh UUID v4 for each acquisition from
    /// the backend, kept when the lock is handed from one request of this process to the
    /// next.
    pub fn token(&self) -> Uuid {
        self.inner.token
    }

    /// This acquisition's fencing token, when the backend hands them out (see
    /// `RedisBackend::fencing`): a number larger than that of every earlier acquisition
    /// of the same key.
    ///
    /// Pass it along with every write the lock protects, and have the storage refuse a
    /// token smaller than the largest it has accepted. A holder that stalled past its
    /// lease (a GC pause, a frozen VM) and wakes up to write late then presents a stale
    /// token and is refused, which the lock alone cannot ensure.
    pub fn fencing_token(&self) -> Option<u64> {
        self.inner.fencing_token
    }

    /// When the lock was acquired.
    pub fn acquired_at(&self) -> Instant {
        self.inner.acquired_at
    }

    /// The moment after which the lease may have expired, on the monotonic clock, with
    /// the drift margin already taken off. Renewals move it forward; work that must be
    /// covered by the lock should finish before it.
    pub fn lease_deadline(&self) -> Instant {
        let nanos = self.inner.deadline_nanos.load(Ordering::Acquire);
        self.inner.acquired_at + Duration::from_nanos(nanos)
    }

    /// How much of the lease is left (zero once past the deadline).
    pub fn lease_remaining(&self) -> Duration {
        self.lease_deadline()
            .saturating_duration_since(Instant::now())
    }

    /// Whether the lock is lost: a renewal found it gone or owned by someone else, or the
    /// lease deadline has passed without a renewal (whether or not the watchdog has run).
    pub fn is_lost(&self) -> bool {
        *self.inner.lost.borrow() || Instant::now() >= self.lease_deadline()
    }

    /// Resolves when the lock is lost (as [`is_lost`](Self::is_lost) tells); pending for
    /// as long as it is held. For handlers under the `Signal` policy, to `select!` on
    /// beside their work.
    pub async fn lost(&self) {
        let mut lost = self.inner.lost.subscribe();
        loop {
            // The deadline moves with each renewal: sleep to the current one, then look again.
            let deadline = self.lease_deadline();
            tokio::select! {
                // `wait_for` fails only once the sender is gone, and `self` keeps it alive.
                _ = lost.wait_for(|lost| *lost) => return,
                _ = tokio::time::sleep_until(deadline) => {
                    if Instant::now() >= self.lease_deadline() {
                        return;
                    }
                }
            }
        }
    }
}

impl fmt::Debug for Held {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Held")
            .field("key", &self.inner.key)
            .field("token", &self.inner.token)
            .field("fencing_token", &self.inner.fencing_token)
            .field("lease_remaining", &self.lease_remaining())
            .field("lost", &self.is_lost())
            .finish()
    }
}

/// Clock drift allowance on a lease: 1 % of the TTL plus 2 ms (the Redlock paper's figure).
pub(crate) fn drift(ttl: Duration) -> Duration {
    ttl / 100 + Duration::from_millis(2)
}

/// When a lease taken at `lease_start` ends on our clock: `ttl` minus the drift margin.
pub(crate) fn lease_end(lease_start: Instant, ttl: Duration) -> Instant {
    saturating_add(lease_start, ttl.saturating_sub(drift(ttl)))
}

/// `instant + duration`, or a point a century away when that overflows (a "forever"
/// setting such as `Duration::MAX`).
pub(crate) fn saturating_add(instant: Instant, duration: Duration) -> Instant {
    instant
        .checked_add(duration)
        .unwrap_or_else(|| instant + Duration::from_secs(100 * 365 * 24 * 3600))
}

/// How a release ended, as far as its caller waited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReleaseOutcome {
    /// Passed to the next waiter of this process: the lease was still good.
    HandedOff,
    /// The backend answered; `was_held` says whether our token still held the lock (if
    /// not, it was lost before the release, whatever the holder believed).
    Released { was_held: bool },
    /// No answer in time (or nothing to release); it goes on in the background.
    Unconfirmed,
}

/// Releases a lock that may be held, on every path: explicitly with [`release`], or from
/// `Drop` when the future that owns it is dropped (client gone, outer timeout, panic).
///
/// "May be held" includes an acquire whose reply never came: the server may have run it,
/// and releasing a token that holds nothing is harmless (compare-and-delete).
///
/// A guard that belongs to a local queue first offers its lock to the next waiter of this
/// process (a hand-off, no backend call); only when there is none, or the hand-off cap is
/// reached, does it release in the backend and then give the queue's next waiter its turn
/// to ask the backend.
///
/// [`release`]: LockGuard::release
pub(crate) struct LockGuard<B: LockBackend> {
    backend: B,
    key: LockKey,
    token: Uuid,
    armed: bool,
    /// The lock's view once acquired: its lease deadline and lost flag travel with a
    /// hand-off.
    held: Option<Held>,
    /// The local queue the lock belongs to, and whether it may still be handed on (not
    /// once a release has been sent, or an outcome is in doubt).
    queue: Option<Arc<LocalQueues<B>>>,
    may_hand_off: bool,
}

impl<B: LockBackend> LockGuard<B> {
    /// A guard for `token` on `key` that releases nothing until armed.
    pub(crate) fn disarmed(backend: B, key: LockKey, token: Uuid) -> Self {
        Self {
            backend,
            key,
            token,
            armed: false,
            held: None,
            queue: None,
            may_hand_off: false,
        }
    }

    pub(crate) fn arm(&mut self) {
        self.armed = true;
    }

    pub(crate) fn disarm(&mut self) {
        self.armed = false;
    }

    /// Takes a fresh token for the next attempt, for a backend that already undid the
    /// last one (see [`LockBackend::retry_with_same_token`]). The old token is never sent
    /// again, so a release of it that lands late deletes nothing of ours.
    pub(crate) fn new_token(&mut self) {
        self.token = Uuid::new_v4();
        self.armed = false;
    }

    pub(crate) fn backend(&self) -> &B {
        &self.backend
    }

    pub(crate) fn key(&self) -> &LockKey {
        &self.key
    }

    pub(crate) fn token(&self) -> Uuid {
        self.token
    }

    /// Records the acquired lock's view and, with a local queue (given now, or already
    /// joined by a hand-off), lets it be handed on.
    pub(crate) fn acquired(&mut self, held: &Held, queue: Option<Arc<LocalQueues<B>>>) {
        self.held = Some(held.clone());
        if queue.is_some() {
            self.queue = queue;
        }
        self.may_hand_off = self.queue.is_some();
    }

    /// Forbids handing this lock on: its state in the backend is in doubt.
    pub(crate) fn keep_from_hand_off(&mut self) {
        self.may_hand_off = false;
    }

    pub(crate) fn is_armed(&self) -> bool {
        self.armed
    }

    /// Gives up a lock that turned out not to be held (a hand-off whose lease had gone):
    /// nothing to release, and the caller takes over the queue's turn to ask the backend.
    pub(crate) fn into_turn(mut self) -> Option<(Turn<B>, Arc<LocalQueues<B>>)> {
        self.armed = false;
        let queue = self.queue.take()?;
        Some((Turn::new(queue.clone(), self.key.clone()), queue))
    }

    /// Offers the lock to the next local waiter. True when one took it.
    fn try_hand_off(&mut self) -> bool {
        let (true, Some(queue), Some(held)) = (self.may_hand_off, &self.queue, &self.held) else {
            return false;
        };
        if !self.armed || held.is_lost() {
            return false;
        }
        let offer = HandOff {
            guard: LockGuard {
                backend: self.backend.clone(),
                key: self.key.clone(),
                token: self.token,
                armed: true,
                held: None,
                queue: Some(queue.clone()),
                may_hand_off: true,
            },
            lease_deadline: held.lease_deadline(),
            fenced: held.fencing_token().is_some(),
        };
        match queue.hand_off(&self.key, offer) {
            Ok(()) => {
                self.armed = false;
                self.queue = None;
                true
            }
            Err(offer) => {
                offer.into_guard().defuse();
                false
            }
        }
    }

    /// Makes the guard's drop do nothing (for a copy that was never handed over).
    fn defuse(mut self) {
        self.armed = false;
        self.queue = None;
    }

    /// Hands the lock to a local waiter, or releases it now, waiting at most `timeout`.
    /// If the backend does not confirm in time, the guard's `Drop` tries once more in the
    /// background; the lease is the last resort.
    pub(crate) async fn release(mut self, timeout: Duration) -> ReleaseOutcome {
        if self.try_hand_off() {
            return ReleaseOutcome::HandedOff;
        }
        self.may_hand_off = false;
        if !self.armed {
            return ReleaseOutcome::Unconfirmed; // Drop gives the queue its next turn
        }
        match tokio::time::timeout(timeout, self.backend.release(&self.key, self.token)).await {
            Ok(Ok(released)) => {
                self.armed = false;
                if let Some(queue) = self.queue.take() {
                    queue.pass_turn(&self.key, StepAside::after(&released));
                }
                ReleaseOutcome::Released {
                    was_held: released.was_held,
                }
            }
            Ok(Err(err)) => {
                tracing::warn!(key = %self.key, error = %err, "lock release failed; retrying in the background");
                ReleaseOutcome::Unconfirmed
            }
            Err(_) => {
                tracing::warn!(key = %self.key, ?timeout, "lock release timed out; retrying in the background");
                ReleaseOutcome::Unconfirmed
            }
        }
    }
}

impl<B: LockBackend> Drop for LockGuard<B> {
    fn drop(&mut self) {
        if self.try_hand_off() {
            return;
        }
        let queue = self.queue.take();
        if !self.armed {
            if let Some(queue) = queue {
                queue.pass_turn(&self.key, StepAside::No);
            }
            return;
        }
        // Drop must neither block nor panic: hand the release to the runtime if there is
        // one, and otherwise let the lease expire.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(key = %self.key, "no tokio runtime to release the lock; it will expire with its lease");
            if let Some(queue) = queue {
                queue.pass_turn(&self.key, StepAside::No);
            }
            return;
        };
        let backend = self.backend.clone();
        let key = self.key.clone();
        let token = self.token;
        let mut next_turn = queue.map(|queues| PassTurnOnDrop {
            queues,
            key: key.clone(),
            step_aside: StepAside::No,
        });
        runtime.spawn(async move {
            let released = backend.release(&key, token).await;
            if let Err(err) = &released {
                tracing::warn!(key = %key, error = %err, "background lock release failed; it will expire with its lease");
            }
            if let (Some(next_turn), Ok(released)) = (&mut next_turn, &released) {
                next_turn.step_aside = StepAside::after(released);
            }
        });
    }
}

impl<B: LockBackend> fmt::Debug for LockGuard<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockGuard")
            .field("key", &self.key)
            .field("token", &self.token)
            .field("armed", &self.armed)
            .field("queued", &self.queue.is_some())
            .finish()
    }
}
