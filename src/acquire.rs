//! The bounded wait: attempt, back off, attempt again until the deadline.
//!
//! Kept apart from the response future so that smarter waiting (release notifications,
//! local queues) changes this module and the backends, not the layer.

use std::time::Duration;

use tokio::time::Instant;
use uuid::Uuid;

use crate::{
    Held, LockBackend, LockKey,
    backend::{Acquire, BackendError},
    guard::LockGuard,
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
}

/// A lock taken: the guard that releases it and the handle the handler sees.
pub(crate) struct Acquired<B: LockBackend> {
    pub(crate) guard: LockGuard<B>,
    pub(crate) held: Held,
}

/// Why the wait ended without the lock.
#[derive(Debug)]
pub(crate) enum AcquireError {
    /// Still held by another token at the deadline.
    Contended { remaining: Option<Duration> },
    /// The last attempt failed in the backend.
    Unavailable(BackendError),
}

/// Takes `key` with a fresh token, waiting at most `policy.max_wait` (plus one backend
/// operation) for it.
///
/// Backend errors are retried like contention while time remains: a dropped connection
/// or a lost reply is often over by the next attempt, and a retry with the same token
/// recognises an attempt of ours that did land.
pub(crate) async fn acquire<B: LockBackend>(
    backend: B,
    key: LockKey,
    policy: WaitPolicy,
) -> Result<Acquired<B>, AcquireError> {
    let deadline = Instant::now() + policy.max_wait;
    // Armed whenever an attempt might have taken the lock without us knowing: if this
    // future is dropped or gives up then, the guard releases the token in the background.
    let mut guard = LockGuard::disarmed(backend, key, Uuid::new_v4());
    let mut attempt = 0;
    loop {
        let lease_start = Instant::now();
        guard.arm();
        let outcome = guard
            .backend()
            .try_acquire(guard.key(), guard.token(), policy.ttl)
            .await;
        let remaining = match outcome {
            Ok(Acquire::Acquired { fencing_token }) => {
                let held = Held::new(
                    guard.key().clone(),
                    guard.token(),
                    fencing_token,
                    lease_start,
                    policy.ttl,
                );
                return Ok(Acquired { guard, held });
            }
            Ok(Acquire::Held { remaining }) => {
                guard.disarm();
                if Instant::now() >= deadline {
                    return Err(AcquireError::Contended { remaining });
                }
                remaining
            }
            Err(err) => {
                tracing::debug!(key = %guard.key(), error = %err, "lock attempt failed");
                if Instant::now() >= deadline {
                    return Err(AcquireError::Unavailable(err));
                }
                None
            }
        };
        let mut pause = policy.backoff.delay(attempt).min(deadline - Instant::now());
        if let Some(remaining) = remaining {
            // The lock is free by the end of the holder's lease at the latest.
            pause = pause.min(remaining + Duration::from_millis(1));
        }
        guard.backend().wait_for_release(guard.key(), pause).await;
        attempt = attempt.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::InMemoryBackend;

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
        }
    }

    #[tokio::test(start_paused = true)]
    async fn waits_until_the_deadline_then_reports_the_holders_lease() {
        let backend = InMemoryBackend::new();
        let key = LockKey::from("k");
        let first = acquire(backend.clone(), key.clone(), policy(Duration::ZERO))
            .await
            .unwrap();
        let started = Instant::now();
        let err = acquire(backend.clone(), key, policy(Duration::from_millis(700)))
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
        let mut first = acquire(backend.clone(), key.clone(), short).await.unwrap();
        first.guard.disarm(); // let it expire instead of releasing
        let second = acquire(backend.clone(), key, policy(Duration::from_secs(2))).await;
        assert!(second.is_ok());
    }
}
