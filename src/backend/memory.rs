//! Locks in this process's memory.

use std::{
    collections::HashMap,
    future::{Future, ready},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::time::Instant;
use uuid::Uuid;

use super::{Acquire, BackendError, LockBackend, Released};
#[cfg(feature = "idempotency")]
use crate::idempotency::MemoryRecords;
use crate::{key::LockKey, kind::LockKind, lease::saturating_add};

mod kinds;

mod fair;

/// A backend that keeps locks in this process, with the same semantics as Redis: owner
/// tokens, leases that expire, compare-and-delete release.
///
/// For tests, for single-instance services, and as the fallback when no Redis is
/// configured. It excludes only requests served by this process. Clones share the locks.
///
/// Leases run on tokio's clock, so tests can drive them with `tokio::time::pause()`.
#[derive(Clone, Debug, Default)]
pub struct InMemoryBackend {
    locks: Arc<Mutex<Locks>>,
    fencing: bool,
    /// Fair mode (see `fair`): releases grant the lock to the next waiter in line.
    fair: bool,
    /// Wakes fair waiters on every grant.
    grants: Arc<fair::Grants>,
    fence_retention: FenceRetention,
    /// Idempotency records (`ResponseStore`).
    #[cfg(feature = "idempotency")]
    pub(crate) records: MemoryRecords,
}

#[derive(Debug, Default)]
struct Locks {
    held: HashMap<LockKey, Lease>,
    /// Last fencing token per key, forgotten once unused for the fence retention, like
    /// the Redis counter keys.
    fences: HashMap<LockKey, Fence>,
    /// The largest token of a forgotten entry: new entries start above it, so that here,
    /// unlike on Redis, even a wall clock that stepped back cannot repeat a token.
    forgotten_fence: u64,
    /// Size of `fences` after its last sweep (as `swept_at` for `held`).
    fences_swept_at: usize,
    /// When `fences` is swept next whatever its size: one retention after the last
    /// sweep, so entries unused for the retention are gone within twice that.
    fences_sweep_due: Option<Instant>,
    /// The fair lines, by key; a key has one only while someone waits in it.
    lines: HashMap<LockKey, fair::KeyLine>,
    /// Size of `held` after the last sweep of expired leases; sweeping again once the map
    /// has doubled keeps the cost amortised O(1) and memory bounded by the live locks.
    swept_at: usize,
    /// Permits and read/write holds (see `kinds`).
    kinds: kinds::KindLocks,
}

#[derive(Debug)]
struct Fence {
    token: u64,
    forget_at: Instant,
}

/// How long a key's last fencing token is kept after its last use.
#[derive(Clone, Copy, Debug)]
struct FenceRetention(Duration);

impl Default for FenceRetention {
    fn default() -> Self {
        Self(Duration::from_secs(24 * 60 * 60))
    }
}

#[derive(Debug)]
struct Lease {
    token: Uuid,
    expires_at: Instant,
}

impl InMemoryBackend {
    /// An empty set of locks.
    pub fn new() -> Self {
        Self::default()
    }

    /// Hands out a fencing token with every acquisition (off by default), as
    /// [`RedisBackend::fencing`](crate::RedisBackend::fencing) does: `max(last + 1, wall
    /// clock in µs since 1970)`, the key's last token kept for the
    /// [`fence_retention`](Self::fence_retention) after its last use. A key whose entry
    /// was forgotten starts above every token ever forgotten, so tokens of one key grow
    /// whatever the clock does.
    pub fn fencing(mut self, on: bool) -> Self {
        self.fencing = on;
        self
    }

    /// How long a key's last fencing token is kept after its last use (default one day,
    /// on tokio's clock), as [`RedisBackend::fence_retention`](crate::RedisBackend::fence_retention).
    pub fn fence_retention(mut self, retention: Duration) -> Self {
        self.fence_retention = FenceRetention(retention);
        self
    }

    /// How many keys' fencing tokens are remembered right now (forgotten ones not
    /// counted).
    pub fn fence_count(&self) -> usize {
        let now = Instant::now();
        self.with_locks(|locks| locks.fences.values().filter(|f| f.forget_at > now).count())
    }

    /// How many locks are held right now (expired leases not counted), each permit and
    /// read share counting as one.
    pub fn held_count(&self) -> usize {
        let now = Instant::now();
        self.with_locks(|locks| {
            locks.held.values().filter(|l| l.expires_at > now).count() + locks.kinds.held_count(now)
        })
    }

    /// Whether `token` holds the lock on `key` now (for the idempotency store).
    #[cfg(feature = "idempotency")]
    pub(crate) fn holds(&self, key: &LockKey, token: Uuid) -> bool {
        let now = Instant::now();
        self.with_locks(|locks| {
            locks
                .held
                .get(key)
                .is_some_and(|lease| lease.token == token && lease.expires_at > now)
        })
    }

    fn with_locks<T>(&self, f: impl FnOnce(&mut Locks) -> T) -> T {
        // A panic while the lock was held cannot leave `Locks` half-updated (every
        // mutation is a single map operation), so a poisoned mutex is still sound.
        let mut locks = self.locks.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut locks)
    }

    fn acquire_now(&self, key: &LockKey, token: Uuid, ttl: Duration) -> Acquire {
        let now = Instant::now();
        let lease = Lease {
            token,
            expires_at: saturating_add(now, ttl),
        };
        self.with_locks(|locks| {
            match locks.held.get(key) {
                Some(held) if held.expires_at > now && held.token != token => {
                    let remaining = Some(held.expires_at - now);
                    return Acquire::Held { remaining };
                }
                Some(_) => {}
                None if locks.held.len() >= 2 * locks.swept_at.max(64) => {
                    locks.held.retain(|_, held| held.expires_at > now);
                    locks.swept_at = locks.held.len();
                }
                None => {}
            }
            locks.held.insert(key.clone(), lease);
            Acquire::Acquired {
                fencing_token: self.fence(locks, key),
            }
        })
    }

    /// A new fencing token for `key`, when fencing is on: `max(last + 1, wall clock µs)`,
    /// where a forgotten (or never seen) key's last token is the largest forgotten one.
    fn fence(&self, locks: &mut Locks, key: &LockKey) -> Option<u64> {
        if !self.fencing {
            return None;
        }
        let now = Instant::now();
        if locks.fences.len() >= 2 * locks.fences_swept_at.max(64)
            || locks.fences_sweep_due.is_none_or(|due| now >= due)
        {
            let mut forgotten = locks.forgotten_fence;
            locks.fences.retain(|_, fence| {
                let keep = fence.forget_at > now;
                if !keep {
                    forgotten = forgotten.max(fence.token);
                }
                keep
            });
            locks.forgotten_fence = forgotten;
            locks.fences_swept_at = locks.fences.len();
            locks.fences_sweep_due = Some(saturating_add(now, self.fence_retention.0));
        }
        let floor = locks.forgotten_fence;
        let forget_at = saturating_add(now, self.fence_retention.0);
        let clock = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| {
                u64::try_from(since.as_micros()).unwrap_or(u64::MAX)
            });
        let fence = locks.fences.entry(key.clone()).or_insert(Fence {
            token: floor,
            forget_at,
        });
        if fence.forget_at <= now {
            // Unused for the retention: as good as forgotten.
            locks.forgotten_fence = locks.forgotten_fence.max(fence.token);
            fence.token = fence.token.max(floor);
        }
        fence.token = fence.token.saturating_add(1).max(clock);
        fence.forget_at = forget_at;
        Some(fence.token)
    }

    fn release_now(&self, key: &LockKey, token: Uuid) -> Released {
        let now = Instant::now();
        self.with_locks(|locks| match locks.held.get(key) {
            Some(lease) if lease.token == token => {
                let was_held = lease.expires_at > now;
                locks.held.remove(key);
                Released::new(was_held)
            }
            _ => Released::default(),
        })
    }

    fn extend_now(&self, key: &LockKey, token: Uuid, ttl: Duration) -> bool {
        let now = Instant::now();
        self.with_locks(|locks| match locks.held.get_mut(key) {
            Some(lease) if lease.token == token && lease.expires_at > now => {
                lease.expires_at = saturating_add(now, ttl);
                true
            }
            _ => false,
        })
    }
}

impl LockBackend for InMemoryBackend {
    fn try_acquire(
        &self,
        key: &LockKey,
        token: Uuid,
        ttl: Duration,
    ) -> impl Future<Output = Result<Acquire, BackendError>> + Send {
        ready(Ok(self.acquire_now(key, token, ttl)))
    }

    fn release(
        &self,
        key: &LockKey,
        token: Uuid,
    ) -> impl Future<Output = Result<Released, BackendError>> + Send {
        if self.fair {
            return ready(Ok(self.fair_release(key, token, false).released()));
        }
        ready(Ok(self.release_now(key, token)))
    }

    fn extend(
        &self,
        key: &LockKey,
        token: Uuid,
        ttl: Duration,
    ) -> impl Future<Output = Result<bool, BackendError>> + Send {
        ready(Ok(self.extend_now(key, token, ttl)))
    }

    fn supports(&self, _kind: LockKind) -> bool {
        true
    }

    fn try_acquire_kind(
        &self,
        kind: LockKind,
        key: &LockKey,
        token: Uuid,
        ttl: Duration,
    ) -> impl Future<Output = Result<Acquire, BackendError>> + Send {
        ready(Ok(self.acquire_kind_now(kind, key, token, ttl)))
    }

    fn release_kind(
        &self,
        kind: LockKind,
        key: &LockKey,
        token: Uuid,
    ) -> impl Future<Output = Result<Released, BackendError>> + Send {
        ready(Ok(self.release_kind_now(kind, key, token)))
    }

    fn extend_kind(
        &self,
        kind: LockKind,
        key: &LockKey,
        token: Uuid,
        ttl: Duration,
    ) -> impl Future<Output = Result<bool, BackendError>> + Send {
        ready(Ok(self.extend_kind_now(kind, key, token, ttl)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(backend: &InMemoryBackend, key: &LockKey) -> u64 {
        let token = Uuid::new_v4();
        let Acquire::Acquired {
            fencing_token: Some(fence),
        } = backend.acquire_now(key, token, Duration::from_secs(1))
        else {
            panic!("no fencing token");
        };
        backend.release_now(key, token);
        fence
    }

    #[tokio::test(start_paused = true)]
    async fn fence_entries_are_forgotten_and_tokens_still_grow() {
        let retention = Duration::from_secs(60);
        let backend = InMemoryBackend::new()
            .fencing(true)
            .fence_retention(retention);
        let hot = LockKey::from("hot");
        let mut last = 0;
        for _ in 0..1000 {
            let next = token(&backend, &hot);
            assert!(next > last, "{next} <= {last}");
            last = next;
        }
        for n in 0..10_000 {
            token(&backend, &LockKey::from(format!("order:{n}")));
        }
        assert_eq!(backend.fence_count(), 10_001);
        tokio::time::advance(retention * 2 + Duration::from_secs(1)).await;
        assert_eq!(backend.fence_count(), 0);
        // Forgotten, and yet above every token the key had.
        let next = token(&backend, &hot);
        assert!(
            next > last,
            "{next} <= {last} after the entry was forgotten"
        );
        // The map itself let go of them, not just the count.
        assert_eq!(backend.with_locks(|locks| locks.fences.len()), 1);
    }
}
