//! Lease renewal while a lock is held (DESIGN §6).
//!
//! The watchdog is polled, not spawned: the layer's response future polls it beside the
//! inner service, so it costs no task and stops the instant the future completes or is
//! dropped. [`OwnedLock`](crate::OwnedLock), which has no future of its own to ride on,
//! runs it in a task. After the holder is done, [`loss_on_release`] judges from the
//! release's answer what the watchdog could not see (a handler that blocked its thread).

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tokio::time::{Instant, Sleep};

use super::guard::ReleaseOutcome;
use crate::{
    backend::{BackendError, LockBackend},
    held::Held,
    lease::{drift, saturating_add},
    observe,
};

type Renewal = Pin<Box<dyn Future<Output = Result<bool, BackendError>> + Send>>;

/// How a lock was lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Loss {
    /// A renewal found the key gone or owned by another token.
    Taken,
    /// Renewals failed until the lease deadline passed: the lock may have expired.
    Expired,
}

/// Extends a lease every `every` until told to stop, and reports when the lock is lost.
/// Without `every` it renews nothing and only watches the lease deadline.
pub(crate) struct Watchdog<B: LockBackend> {
    backend: B,
    held: Held,
    ttl: Duration,
    every: Option<Duration>,
    next_renewal: Instant,
    /// One timer for whichever comes first: the next renewal or the lease deadline; made
    /// when first needed, so that a holder done before anything is due costs no timer.
    timer: Option<Pin<Box<Sleep>>>,
    /// The renewal in flight, with the moment it was sent.
    renewing: Option<(Instant, Renewal)>,
}

impl<B: LockBackend> Watchdog<B> {
    pub(crate) fn new(backend: B, held: Held, ttl: Duration, every: Option<Duration>) -> Self {
        // Renewals are due from the lease's start (taken before the acquire was sent),
        // not from now: a slow acquire reply must not push the first one past the deadline.
        let lease_start = held
            .lease_deadline()
            .checked_sub(ttl.saturating_sub(drift(ttl)))
            .unwrap_or_else(Instant::now);
        let next_renewal = saturating_add(lease_start, every.unwrap_or(Duration::MAX));
        Self {
            backend,
            held,
            ttl,
            every,
            next_renewal,
            timer: None,
            renewing: None,
        }
    }

    /// When the first renewal is due (or the far future, without renewals).
    pub(crate) fn first_renewal(&self) -> Instant {
        self.next_renewal
    }

    /// Whether nothing is due: no renewal in flight or due, the lease not past its
    /// deadline, no timer armed yet. [`poll_lost`](Self::poll_lost) would then only arm
    /// its timer, so a caller may first see whether the holder is done already.
    pub(crate) fn is_quiet(&self) -> bool {
        if self.renewing.is_some() || self.timer.is_some() {
            return false;
        }
        let now = Instant::now();
        now < self.next_renewal && now < self.held.lease_deadline()
    }

    /// Drives the renewals. `Ready` once the lock is lost (and `Held` told so); the
    /// watchdog must not be polled after that.
    pub(crate) fn poll_lost(&mut self, cx: &mut Context<'_>) -> Poll<Loss> {
        loop {
            let now = Instant::now();
            let deadline = self.held.lease_deadline();
            if now >= deadline {
                return self.lost(Loss::Expired);
            }
            if let Some((sent, renewal)) = &mut self.renewing {
                let sent = *sent;
                if let Poll::Ready(outcome) = renewal.as_mut().poll(cx) {
                    self.renewing = None;
                    match outcome {
                        Ok(true) => {
                            observe::renewal(true);
                            self.held.renewed(sent, self.ttl);
                            self.next_renewal =
                                saturating_add(sent, self.every.unwrap_or(Duration::MAX));
                            tracing::trace!(key = %self.held.key(), "lease renewed");
                        }
                        Ok(false) => return self.lost(Loss::Taken),
                        Err(err) => {
                            observe::renewal(false);
                            // Try again soon; the deadline check above ends the retries.
                            tracing::warn!(key = %self.held.key(), error = %err, "lease renewal failed");
                            let retry = self.every.unwrap_or(self.ttl) / 4;
                            self.next_renewal = saturating_add(
                                Instant::now(),
                                retry.max(Duration::from_millis(10)),
                            );
                        }
                    }
                    continue;
                }
            } else if now >= self.next_renewal {
                let (backend, key, token, ttl) = (
                    self.backend.clone(),
                    self.held.key().clone(),
                    self.held.token(),
                    self.ttl,
                );
                let renewal = async move { backend.extend(&key, token, ttl).await };
                self.renewing = Some((now, Box::pin(renewal)));
                continue;
            }
            let wake_at = match self.renewing {
                Some(_) => deadline,
                None => self.next_renewal.min(deadline),
            };
            let timer = self
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(wake_at)));
            if timer.deadline() != wake_at {
                timer.as_mut().reset(wake_at);
            }
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }

    fn lost(&mut self, loss: Loss) -> Poll<Loss> {
        tracing::warn!(key = %self.held.key(), ?loss, "lock lost");
        self.renewing = None;
        let _first = self.held.mark_lost();
        Poll::Ready(loss)
    }
}

/// Whether a lock was lost while its holder ran, judged once the holder is done: from
/// the release's answer, and from the lease deadline as it stood when the holder
/// finished (`ran_out`). The watchdog cannot see a handler that blocks its thread past
/// the lease and finishes in the same poll; this catches it.
///
/// A release that found our token proves the lock was ours throughout (nobody can take a
/// key that still holds our value), even if our deadline, which errs early, had passed.
/// A release that found no token of ours proves the loss. Without an answer, a lease past
/// its deadline counts as lost.
pub(crate) fn loss_on_release(outcome: ReleaseOutcome, ran_out: bool) -> Option<Loss> {
    match outcome {
        ReleaseOutcome::Released { was_held: true } | ReleaseOutcome::HandedOff => None,
        ReleaseOutcome::Released { was_held: false } if ran_out => Some(Loss::Expired),
        ReleaseOutcome::Released { was_held: false } => Some(Loss::Taken),
        ReleaseOutcome::Unconfirmed => ran_out.then_some(Loss::Expired),
    }
}

/// Records a loss found after the fact, once: `Held` is told, the loss is counted and
/// logged. False when it was known already.
pub(crate) fn note_loss(held: &Held, class: &std::sync::Arc<str>, loss: Loss) -> bool {
    if !held.mark_lost() {
        return false;
    }
    observe::lost(class);
    tracing::warn!(key = %held.key(), ?loss, "lock lost while held; found when its holder finished");
    true
}
