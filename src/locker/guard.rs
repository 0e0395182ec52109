//! [`LockGuard`]: the owner of a lock, which releases it on every path.

use std::{fmt, sync::Arc, time::Duration};

use tokio::time::Instant;
use uuid::Uuid;

use crate::{
    backend::{LockBackend, Released, fair::TurnEnd},
    held::Held,
    key::LockKey,
    line::{Line, NotHandedOff, PassTurnOnDrop, StepAside, Turn},
};

/// The local line of a locker: what passes down it is the lock itself.
pub(crate) type LockLine<B> = Line<HandOff<B>>;
/// The turn, in a locker's line, to ask the backend.
pub(crate) type LockTurn<B> = Turn<HandOff<B>>;

/// A lock passed from its holder to the next waiter, with what the waiter needs to know
/// to take it over: the lease left, and whether a new fencing token is due.
pub(crate) struct HandOff<B: LockBackend> {
    pub(crate) guard: LockGuard<B>,
    pub(crate) lease_deadline: Instant,
    pub(crate) fenced: bool,
}

/// How long the next local asker steps aside after `released`.
fn step_aside_after(released: &Released) -> StepAside {
    if released.notified > 0 {
        StepAside::Notified
    } else if released.unnotified_waiters {
        StepAside::Polling
    } else {
        StepAside::No
    }
}

/// What an offer to the local line came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HandOffOutcome {
    HandedOff,
    /// Requests wait here, but the turn's hand-offs are used up.
    TurnOver,
    /// Nobody took it (or it may not be handed on).
    Nobody,
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
    queue: Option<Arc<LockLine<B>>>,
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
    pub(crate) fn acquired(&mut self, held: &Held, queue: Option<Arc<LockLine<B>>>) {
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
    pub(crate) fn into_turn(mut self) -> Option<(LockTurn<B>, Arc<LockLine<B>>)> {
        self.armed = false;
        let queue = self.queue.take()?;
        Some((Turn::new(queue.clone(), self.key.clone()), queue))
    }

    /// Offers the lock to the next local waiter.
    fn try_hand_off(&mut self) -> HandOffOutcome {
        let (true, true, Some(queue), Some(held)) =
            (self.may_hand_off, self.armed, &self.queue, &self.held)
        else {
            return HandOffOutcome::Nobody;
        };
        // Made only when someone waits: a copy of the guard, and a clock read.
        let offer = || {
            (!held.is_lost()).then(|| HandOff {
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
            })
        };
        match queue.hand_off(&self.key, offer) {
            Ok(()) => {
                self.armed = false;
                self.queue = None;
                HandOffOutcome::HandedOff
            }
            Err(NotHandedOff::TurnOver) => HandOffOutcome::TurnOver,
            Err(NotHandedOff::Back(offer)) => {
                offer.guard.defuse();
                HandOffOutcome::Nobody
            }
            Err(NotHandedOff::Nobody) => HandOffOutcome::Nobody,
        }
    }

    /// Ends a fair turn whose hand-offs are used up while requests of this process still
    /// wait: one backend call grants the lock to the next process in line or, with nobody
    /// else in it, keeps it, and then the next request here gets it by hand-off in a new
    /// turn. `None` when it was kept but nobody here wanted it any more: the caller
    /// releases as usual.
    async fn end_turn(&mut self, timeout: Duration) -> Option<ReleaseOutcome> {
        // In doubt until the answer: a drop meanwhile releases in the background.
        self.may_hand_off = false;
        let end = crate::backend::fair::end_turn(&self.backend, &self.key, self.token);
        match tokio::time::timeout(timeout, end).await {
            Ok(Ok(TurnEnd::Kept)) => {
                if let Some(queue) = &self.queue {
                    queue.continue_turn(&self.key);
                }
                self.may_hand_off = true;
                if self.try_hand_off() == HandOffOutcome::HandedOff {
                    return Some(ReleaseOutcome::HandedOff);
                }
                self.may_hand_off = false;
                None
            }
            Ok(Ok(TurnEnd::Released(released))) => Some(self.released(&released)),
            Ok(Err(err)) => {
                tracing::warn!(key = %self.key, error = %err, "lock release failed; retrying in the background");
                Some(ReleaseOutcome::Unconfirmed)
            }
            Err(_) => {
                tracing::warn!(key = %self.key, ?timeout, "lock release timed out; retrying in the background");
                Some(ReleaseOutcome::Unconfirmed)
            }
        }
    }

    /// The backend confirmed the release: the next local waiter gets its turn to ask.
    fn released(&mut self, released: &Released) -> ReleaseOutcome {
        self.armed = false;
        if let Some(queue) = self.queue.take() {
            queue.pass_turn(&self.key, step_aside_after(released));
        }
        ReleaseOutcome::Released {
            was_held: released.was_held,
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
        match self.try_hand_off() {
            HandOffOutcome::HandedOff => return ReleaseOutcome::HandedOff,
            // Boxed: only the end of a fair turn with waiters takes this way.
            HandOffOutcome::TurnOver if crate::backend::fair::is_fair(&self.backend) => {
                if let Some(outcome) = Box::pin(self.end_turn(timeout)).await {
                    return outcome;
                }
            }
            HandOffOutcome::TurnOver | HandOffOutcome::Nobody => {}
        }
        self.may_hand_off = false;
        if !self.armed {
            return ReleaseOutcome::Unconfirmed; // Drop gives the queue its next turn
        }
        match crate::backend::release_within(&self.backend, &self.key, self.token, timeout).await {
            Some(Ok(released)) => self.released(&released),
            Some(Err(err)) => {
                tracing::warn!(key = %self.key, error = %err, "lock release failed; retrying in the background");
                ReleaseOutcome::Unconfirmed
            }
            None => {
                tracing::warn!(key = %self.key, ?timeout, "lock release timed out; retrying in the background");
                ReleaseOutcome::Unconfirmed
            }
        }
    }
}

impl<B: LockBackend> Drop for LockGuard<B> {
    fn drop(&mut self) {
        if self.try_hand_off() == HandOffOutcome::HandedOff {
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
                next_turn.step_aside = step_aside_after(released);
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
