//! Waking waiters when a lock they want is released (DESIGN §5): the plumbing between the
//! crate's Redis backends and the wait in [`acquire`](crate::Locker::lock).
//!
//! It is not part of [`LockBackend`](super::LockBackend): release notifications are a
//! feature of [`RedisBackend`](super::RedisBackend) and
//! [`RedlockBackend`](super::RedlockBackend), found here by their type. Any other backend
//! (a custom one, or a wrapper around these) is woken by its backoff alone.

use std::time::Duration;

use uuid::Uuid;

use super::{Acquire, BackendError, LockBackend};
use crate::key::LockKey;

/// One acquisition attempt, for the wait in [`acquire`](crate::Locker::lock): `again`
/// says that an earlier attempt with this token was refused or went unanswered (or that
/// the token holds the lock already), which [`RedisBackend`](super::RedisBackend) uses to
/// go straight to its script rather than try a plain `SET NX` first. Any other backend
/// gets [`LockBackend::try_acquire`].
#[allow(
    clippy::manual_async_fn,
    reason = "an `async fn` stores its arguments twice"
)]
pub(crate) fn attempt<B: LockBackend>(
    backend: &B,
    key: &LockKey,
    token: Uuid,
    ttl: Duration,
    again: bool,
) -> impl Future<Output = Result<Acquire, BackendError>> + Send {
    // A block: its captures are its variables (see `locker::acquire::from_backend`).
    async move {
        #[cfg(feature = "redis")]
        {
            let any: &dyn std::any::Any = backend;
            if let Some(redis) = any.downcast_ref::<super::RedisBackend>() {
                return redis.attempt(key, token, ttl, again).await;
            }
        }
        let _ = again;
        backend.try_acquire(key, token, ttl).await
    }
}

/// A count of the releases of `key` the backend has heard of, read before each attempt
/// and handed to [`wait_for_release`], so that a release heard between a failed attempt
/// and the wait is not slept through. Always 0 for backends that hear of nothing.
pub(crate) fn release_epoch<B: LockBackend>(backend: &B, key: &LockKey) -> u64 {
    #[cfg(feature = "redis")]
    {
        let any: &dyn std::any::Any = backend;
        if let Some(redis) = any.downcast_ref::<super::RedisBackend>() {
            return redis.release_epoch(key);
        }
        if let Some(redlock) = any.downcast_ref::<super::RedlockBackend>() {
            return redlock.release_epoch(key);
        }
        // Permits and read/write holds on Redis hear of releases on the lock's channel too.
        // (Several keys have no one channel: they wait on their backoff.)
        if let Some(kind) = any.downcast_ref::<crate::kind::KindBackend<super::RedisBackend>>()
            && kind.kind() != crate::kind::LockKind::Several
        {
            return kind.inner().release_epoch(key);
        }
    }
    let _ = (backend, key);
    0
}

/// Waits at most `timeout` for `key` to be released before the next attempt; returns at
/// once if a release was heard since `epoch`. Backends that hear of nothing sleep the
/// whole `timeout`: the backoff is then the only wake-up.
pub(crate) async fn wait_for_release<B: LockBackend>(
    backend: &B,
    key: &LockKey,
    epoch: u64,
    timeout: Duration,
) {
    #[cfg(feature = "redis")]
    {
        let any: &dyn std::any::Any = backend;
        if let Some(redis) = any.downcast_ref::<super::RedisBackend>() {
            return redis.wait_for_release(key, epoch, timeout).await;
        }
        if let Some(redlock) = any.downcast_ref::<super::RedlockBackend>() {
            return redlock.wait_for_release(key, epoch, timeout).await;
        }
        if let Some(kind) = any.downcast_ref::<crate::kind::KindBackend<super::RedisBackend>>()
            && kind.kind() != crate::kind::LockKind::Several
        {
            return kind.inner().wait_for_release(key, epoch, timeout).await;
        }
    }
    let _ = (backend, key, epoch);
    tokio::time::sleep(timeout).await;
}
