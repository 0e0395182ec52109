//! Locks in this process's memory.

use std::{
    collections::HashMap,
    future::{Future, ready},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
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
    /// Idempotency records (`ResponseStore`).
    #[cfg(feature = "idempotency")]
    pub(crate) records: MemoryRecords,
}

#[derive(Debug, Default)]
struct Locks {
    held: HashMap<LockKey, Lease>,
    /// Last fencing token per key; kept forever, like the Redis counter keys.
    fences: HashMap<LockKey, u64>,
    /// The fair lines, by key; a key has one only while someone waits in it.
    lines: HashMap<LockKey, fair::KeyLine>,
    /// Size of `held` after the last sweep of expired leases; sweeping again once the map
    /// has doubled keeps the cost amortised O(1) and memory bounded by the live locks.
    swept_at: usize,
    /// Permits and read/write holds (see `kinds`).
    kinds: kinds::KindLocks,
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
    /// [`RedisBackend::fencing`](crate::RedisBackend::fencing) does: one counter per key
    /// ever locked, kept for the life of the backend.
    pub fn fencing(mut self, on: bool) -> Self {
        self.fencing = on;
        self
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

    /// A new fencing token for `key`, when fencing is on.
    fn fence(&self, locks: &mut Locks, key: &LockKey) -> Option<u64> {
        if !self.fencing {
            return None;
        }
        let counter = locks.fences.entry(key.clone()).or_default();
        *counter += 1;
        Some(*counter)
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
            return ready(Ok(self.fair_release(key, token)));
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
