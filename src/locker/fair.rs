//! The wait in fair mode (DESIGN §5): join the backend's line once, then wait to be
//! granted the lock, checking on a slow backoff only in case the grant's message is lost.
//!
//! Kept apart from `acquire`'s racing wait: the two share the guard and the answers but
//! not the loop. A racing waiter retries on every release it hears; a fair one ignores
//! the grants to others (it has nothing to try until its own) and learns of its own
//! without a round trip.

use std::{sync::Arc, time::Duration};

use tokio::time::Instant;

use super::{
    acquire::{AcquireError, Acquired, WaitPolicy},
    guard::{LockGuard, LockLine},
};
use crate::{
    backend::{Acquire, LockBackend, fair},
    held::Held,
};

/// Attempts with the guard's token until it holds the lock or the deadline passes. The
/// first refused attempt puts the token in line; later ones keep its place.
///
/// From the first attempt on the guard stays armed: the token may be in line or granted
/// at any moment, so every way out (the deadline, an error, the future dropped) runs the
/// release, which in fair mode also takes the token out of line and, if a grant crossed
/// the cancellation, passes the lock on at once.
pub(super) async fn from_line<B: LockBackend>(
    mut guard: LockGuard<B>,
    policy: WaitPolicy,
    deadline: Instant,
    queue: Option<Arc<LockLine<B>>>,
) -> Result<Acquired<B>, AcquireError> {
    // Whether an attempt was refused (or failed) before: for the hot-key count.
    let mut contended = false;
    loop {
        let sent = Instant::now();
        let epoch = fair::epoch(guard.backend(), guard.key());
        guard.arm();
        let entry_for = deadline.saturating_duration_since(sent) + fair::ENTRY_MARGIN;
        let outcome = fair::attempt(
            guard.backend(),
            guard.key(),
            guard.token(),
            policy.ttl,
            entry_for,
        )
        .await;
        let (remaining, refused_at) = match outcome {
            Ok((Acquire::Acquired { fencing_token }, _)) => {
                return Ok(acquired(
                    guard,
                    fencing_token,
                    sent,
                    policy,
                    queue,
                    contended,
                ));
            }
            Ok((Acquire::Held { remaining }, refused_at)) => {
                if Instant::now() >= deadline {
                    return Err(AcquireError::Contended { remaining });
                }
                (remaining, refused_at)
            }
            Err(err) => {
                tracing::debug!(key = %guard.key(), error = %err, "fair lock attempt failed");
                if Instant::now() >= deadline {
                    return Err(AcquireError::Unavailable(err));
                }
                (None, None)
            }
        };
        let pause =
            check_after(&policy, remaining).min(deadline.saturating_duration_since(Instant::now()));
        // Boxed, as in `acquire`: the wait may subscribe and connect.
        let granted = Box::pin(fair::wait_for_grant(
            guard.backend(),
            guard.key(),
            guard.token(),
            epoch,
            refused_at,
            pause,
        ))
        .await;
        if let Some(fencing_token) = granted {
            // The grant came after the refusal, which came after `sent`: the lease runs
            // from `sent` at the earliest. No round trip to confirm it.
            return Ok(acquired(guard, fencing_token, sent, policy, queue, true));
        }
        contended = true;
    }
}

/// When a waiter in line checks the lock itself: a grant tells it at once, so the check
/// only matters when the message was lost or the holder died without a release (its
/// lease end is when the lock frees up, and the check then grants it to the first in
/// line). A random time in the upper half of the longest backoff, and no later than
/// just past the holder's lease: rare enough that waiting costs no commands, soon enough
/// that a lost message costs at most one backoff.
fn check_after(policy: &WaitPolicy, remaining: Option<Duration>) -> Duration {
    let max = policy.backoff.max;
    let half = u64::try_from((max / 2).as_nanos()).unwrap_or(u64::MAX);
    let pause = max / 2 + Duration::from_nanos(fastrand::u64(0..=half));
    match remaining {
        Some(remaining) => pause.min(remaining + Duration::from_millis(1)),
        None => pause,
    }
}

fn acquired<B: LockBackend>(
    mut guard: LockGuard<B>,
    fencing_token: Option<u64>,
    lease_start: Instant,
    policy: WaitPolicy,
    queue: Option<Arc<LockLine<B>>>,
    contended: bool,
) -> Acquired<B> {
    let (key, token) = (guard.key().clone(), guard.token());
    let held = Held::new(key, token, fencing_token, lease_start, policy.ttl);
    guard.acquired(&held, queue);
    Acquired {
        guard,
        held,
        contended,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::{
        backend::{FairBackend, InMemoryBackend},
        key::LockKey,
        line::Line,
        locker::{LockSettings, ReleaseOutcome, acquire::acquire},
    };

    /// The defaults, with time enough for every waiter.
    fn policy() -> WaitPolicy {
        WaitPolicy {
            max_wait: Duration::from_secs(60),
            ..LockSettings::default().wait_policy()
        }
    }

    /// Two processes (two local lines) on one fair backend. Process P is granted the lock
    /// with one more request already waiting in its line: that one gets it by hand-off,
    /// and so does the first request of P that comes later (the one late arrival a turn
    /// serves), but the second late one queues behind process Q's, which was in the
    /// backend's line first.
    #[tokio::test(start_paused = true)]
    async fn hand_offs_go_to_those_waiting_when_the_grant_came_and_one_more() {
        let backend = InMemoryBackend::new().with_fairness(true);
        let key = LockKey::from("hot");
        let (p, q) = (Line::new(8), Line::new(8));
        let order = Arc::new(Mutex::new(Vec::new()));
        let holder = acquire(backend.clone(), key.clone(), policy(), None)
            .await
            .unwrap();
        let request = |name: &'static str, line: &Arc<LockLine<InMemoryBackend>>| {
            let (backend, key, line, order) =
                (backend.clone(), key.clone(), line.clone(), order.clone());
            tokio::spawn(async move {
                let acquired = acquire(backend, key, policy(), Some(line)).await.unwrap();
                order.lock().unwrap().push(name);
                tokio::time::sleep(Duration::from_millis(10)).await;
                acquired.guard.release(Duration::from_secs(1)).await;
            })
        };
        let p1 = request("p1", &p); // P's entry in the backend's line
        tokio::task::yield_now().await;
        let p2 = request("p2", &p); // waits in P's local line
        tokio::task::yield_now().await;
        let q1 = request("q1", &q); // Q's entry, behind P's
        tokio::task::yield_now().await;
        assert_eq!(backend.queued_count(), 2);
        holder.guard.release(Duration::from_secs(1)).await;
        tokio::time::sleep(Duration::from_millis(15)).await; // p1 holds, p2 is next
        let p3 = request("p3", &p); // came after the grant: the turn's late arrival
        tokio::task::yield_now().await;
        let p4 = request("p4", &p); // came after the grant, one too many
        for task in [p1, p2, q1, p3, p4] {
            task.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), ["p1", "p2", "p3", "q1", "p4"]);
        assert_eq!(backend.queued_count(), 0);
        assert_eq!(backend.held_count(), 0);
        assert_eq!(p.busy_keys() + q.busy_keys(), 0);
    }

    /// A process alone in line: when its turn's hand-offs are used up, nobody else waits
    /// in the backend, so the lock stays held and goes on down the local line (same
    /// token: never released and taken again), until the line is empty.
    #[tokio::test(start_paused = true)]
    async fn a_process_alone_in_line_keeps_the_lock_between_turns() {
        let backend = InMemoryBackend::new().with_fairness(true);
        let key = LockKey::from("hot");
        let line = Line::new(8);
        let tokens = Arc::new(Mutex::new(Vec::new()));
        let request = || {
            let (backend, key, line, tokens) =
                (backend.clone(), key.clone(), line.clone(), tokens.clone());
            tokio::spawn(async move {
                let acquired = acquire(backend, key, policy(), Some(line)).await.unwrap();
                tokens.lock().unwrap().push(acquired.held.token());
                tokio::time::sleep(Duration::from_millis(10)).await;
                acquired.guard.release(Duration::from_secs(1)).await
            })
        };
        let first = request(); // takes it from the backend: a turn of one more section
        tokio::task::yield_now().await;
        let rest: Vec<_> = (0..4).map(|_| request()).collect();
        let mut outcomes = vec![first.await.unwrap()];
        for task in rest {
            outcomes.push(task.await.unwrap());
        }
        let tokens = tokens.lock().unwrap();
        assert_eq!(tokens.len(), 5);
        assert!(tokens.iter().all(|token| *token == tokens[0]), "{tokens:?}");
        assert_eq!(outcomes[..4], [ReleaseOutcome::HandedOff; 4]);
        assert_eq!(outcomes[4], ReleaseOutcome::Released { was_held: true });
        assert_eq!(backend.held_count(), 0);
        assert_eq!(backend.queued_count(), 0);
        assert_eq!(line.busy_keys(), 0);
    }
}
