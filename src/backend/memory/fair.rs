//! Fair mode in memory: the same line and direct grant as `redis::fair`, under the
//! backend's one mutex, so the behaviour suite covers fair mode on both backends.

use std::{
    collections::VecDeque,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use tokio::{sync::Notify, time::Instant};
use uuid::Uuid;

use super::{
    super::{Released, fair::TurnEnd},
    Acquire, InMemoryBackend, Lease, Locks,
};
use crate::{key::LockKey, lease::saturating_add};

/// One key's line: waiters in arrival order.
pub(super) type KeyLine = VecDeque<Waiting>;

#[derive(Debug)]
pub(super) struct Waiting {
    token: Uuid,
    ttl: Duration,
    deadline: Instant,
}

/// Grants so far, and the waiters to wake on the next.
#[derive(Debug, Default)]
pub(super) struct Grants {
    count: AtomicU64,
    notify: Notify,
}

impl InMemoryBackend {
    /// This backend with fair mode on or off.
    pub(in crate::backend) fn fair_mode(mut self, on: bool) -> Self {
        self.fair = on;
        self
    }

    pub(in crate::backend) fn is_fair(&self) -> bool {
        self.fair
    }

    /// How many waiters stand in fair lines now, expired entries not counted (always 0
    /// outside fair mode): a line that empties leaves nothing behind.
    pub fn queued_count(&self) -> usize {
        let now = Instant::now();
        self.with_locks(|locks| {
            locks
                .lines
                .values()
                .flatten()
                .filter(|waiting| waiting.deadline > now)
                .count()
        })
    }

    pub(in crate::backend) fn grant_epoch(&self) -> u64 {
        self.grants.count.load(Ordering::Acquire)
    }

    /// Waits for the next grant after `epoch`, at most `timeout`.
    pub(in crate::backend) async fn wait_for_grant(&self, epoch: u64, timeout: Duration) {
        let notified = self.grants.notify.notified();
        let mut notified = std::pin::pin!(notified);
        notified.as_mut().enable();
        if self.grant_epoch() != epoch {
            return;
        }
        let _ = tokio::time::timeout(timeout, notified).await;
    }

    /// One fair attempt: see `scripts::FAIR_ACQUIRE`, which this follows step by step.
    pub(in crate::backend) fn fair_attempt(
        &self,
        key: &LockKey,
        token: Uuid,
        ttl: Duration,
        entry_for: Duration,
    ) -> Acquire {
        let now = Instant::now();
        let granted = self.with_locks(|locks| {
            let holder = locks
                .held
                .get(key)
                .filter(|lease| lease.expires_at > now)
                .map(|lease| lease.token);
            if holder == Some(token) {
                locks.held.insert(key.clone(), lease(token, now, ttl));
                return Ok(self.fence(locks, key));
            }
            let mut woke = false;
            if holder.is_none() {
                match grant_next(self, locks, key, now) {
                    None => {
                        locks.held.insert(key.clone(), lease(token, now, ttl));
                        return Ok(self.fence(locks, key));
                    }
                    Some((grantee, fenced)) if grantee == token => return Ok(fenced),
                    Some(_) => woke = true,
                }
            }
            let line = locks.lines.entry(key.clone()).or_default();
            let deadline = saturating_add(now, entry_for);
            match line.iter_mut().find(|waiting| waiting.token == token) {
                Some(waiting) => waiting.deadline = deadline,
                None => line.push_back(Waiting {
                    token,
                    ttl,
                    deadline,
                }),
            }
            let remaining = locks
                .held
                .get(key)
                .map(|lease| lease.expires_at.saturating_duration_since(now));
            Err((remaining, woke))
        });
        match granted {
            Ok(fencing_token) => Acquire::Acquired { fencing_token },
            Err((remaining, woke)) => {
                if woke {
                    self.wake();
                }
                Acquire::Held { remaining }
            }
        }
    }

    /// A fair release, which is also a queued waiter's cancellation: see
    /// `scripts::FAIR_RELEASE`, `keep_if_alone` included.
    pub(crate) fn fair_release(&self, key: &LockKey, token: Uuid, keep_if_alone: bool) -> TurnEnd {
        let now = Instant::now();
        let (end, granted) = self.with_locks(|locks| {
            if let Some(line) = locks.lines.get_mut(key) {
                line.retain(|waiting| waiting.token != token);
                if line.is_empty() {
                    locks.lines.remove(key);
                }
            }
            match locks.held.get(key) {
                Some(lease) if lease.token == token => {
                    let was_held = lease.expires_at > now;
                    let lease = locks.held.remove(key);
                    let granted = grant_next(self, locks, key, now).is_some();
                    if !granted && keep_if_alone && was_held {
                        locks.held.extend(lease.map(|lease| (key.clone(), lease)));
                        return (TurnEnd::Kept, false);
                    }
                    (TurnEnd::Released(Released::new(was_held)), granted)
                }
                _ => (TurnEnd::Released(Released::default()), false),
            }
        });
        if granted {
            self.wake();
        }
        end
    }

    fn wake(&self) {
        self.grants.count.fetch_add(1, Ordering::Release);
        self.grants.notify.notify_waiters();
    }
}

fn lease(token: Uuid, now: Instant, ttl: Duration) -> Lease {
    Lease {
        token,
        expires_at: saturating_add(now, ttl),
    }
}

/// Gives the free lock to the first live waiter in `key`'s line, dropping expired ones;
/// the grantee and its fencing token, or `None` when the line is empty (and gone).
fn grant_next(
    backend: &InMemoryBackend,
    locks: &mut Locks,
    key: &LockKey,
    now: Instant,
) -> Option<(Uuid, Option<u64>)> {
    let line = locks.lines.get_mut(key)?;
    let mut grantee = None;
    while let Some(waiting) = line.pop_front() {
        if waiting.deadline > now {
            grantee = Some(waiting);
            break;
        }
    }
    if line.is_empty() {
        locks.lines.remove(key);
    }
    let waiting = grantee?;
    locks
        .held
        .insert(key.clone(), lease(waiting.token, now, waiting.ttl));
    Some((waiting.token, backend.fence(locks, key)))
}
