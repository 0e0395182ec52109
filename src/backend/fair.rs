//! Fair mode (DESIGN §5): waiters of every process queue in the backend in arrival order,
//! and a release grants the lock straight to the first live one.
//!
//! The queue and its scripts live with each backend (`redis::fair`, `memory::fair`); this
//! module is the seam the wait in [`acquire`](crate::Locker::lock) calls, found by type
//! like the release notifications of [`wake`](super::wake): fair mode is not part of
//! [`LockBackend`], and only the backends that implement [`FairBackend`] offer it.

use std::time::Duration;

use uuid::Uuid;

use super::{Acquire, BackendError, LockBackend, Released};
use crate::key::LockKey;

/// How long a queue entry outlives its waiter's deadline: long enough for a waiter that
/// gives up to take its entry out itself (one round trip), short enough that a waiter
/// that died while queued holds up nobody for long.
pub(crate) const ENTRY_MARGIN: Duration = Duration::from_millis(500);

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::super::InMemoryBackend {}
    #[cfg(feature = "redis")]
    impl Sealed for super::super::RedisBackend {}
}

/// A backend that can serve waiters first come, first served across processes: the
/// bound of [`Locker::fair`](crate::Locker::fair) and
/// [`LockLayer::fair`](crate::LockLayer::fair).
///
/// Implemented by [`RedisBackend`](super::RedisBackend) (the line is a Redis list in the
/// lock's hash slot) and [`InMemoryBackend`](super::InMemoryBackend). Not by
/// [`RedlockBackend`](super::RedlockBackend), so asking a Redlock locker to be fair does
/// not compile: a line needs one place that orders the waiters, and N independent nodes
/// each with a line of its own can each grant to a different waiter, leaving none of them
/// a majority (every waiter would then give up and try again, which is the unfair race
/// fair mode is meant to end).
///
/// ```
/// use tower_redis_lock::{InMemoryBackend, Locker};
///
/// let locker = Locker::new(InMemoryBackend::new()).fair(true);
/// # let _ = locker;
/// ```
///
/// ```compile_fail
/// use tower_redis_lock::{Locker, RedlockBackend};
///
/// fn fair(locker: Locker<RedlockBackend>) -> Locker<RedlockBackend> {
///     locker.fair(true) // error: `RedlockBackend` is not a `FairBackend`
/// }
/// ```
///
/// The trait is sealed: its one method is the crate's plumbing.
pub trait FairBackend: LockBackend + sealed::Sealed {
    /// This backend with fair mode on or off: its releases then grant the lock to the
    /// next waiter in line.
    #[doc(hidden)]
    fn with_fairness(self, on: bool) -> Self;
}

impl FairBackend for super::InMemoryBackend {
    fn with_fairness(self, on: bool) -> Self {
        self.fair_mode(on)
    }
}

#[cfg(feature = "redis")]
impl FairBackend for super::RedisBackend {
    fn with_fairness(self, on: bool) -> Self {
        self.fair_mode(on)
    }
}

/// Whether `backend` is in fair mode (see [`FairBackend`]): then its waiters queue.
pub(crate) fn is_fair<B: LockBackend>(backend: &B) -> bool {
    let any: &dyn std::any::Any = backend;
    #[cfg(feature = "redis")]
    if let Some(redis) = any.downcast_ref::<super::RedisBackend>() {
        return redis.is_fair();
    }
    any.downcast_ref::<super::InMemoryBackend>()
        .is_some_and(|memory| memory.is_fair())
}

/// One attempt in fair mode: the lock, or a place in line kept (or taken) until
/// `entry_for` from now. A refusal comes with the server's time when the backend tells
/// it, for [`wait_for_grant`].
pub(crate) async fn attempt<B: LockBackend>(
    backend: &B,
    key: &LockKey,
    token: Uuid,
    ttl: Duration,
    entry_for: Duration,
) -> Result<(Acquire, Option<u64>), BackendError> {
    let any: &dyn std::any::Any = backend;
    #[cfg(feature = "redis")]
    if let Some(redis) = any.downcast_ref::<super::RedisBackend>() {
        return redis.fair_attempt(key, token, ttl, entry_for).await;
    }
    if let Some(memory) = any.downcast_ref::<super::InMemoryBackend>() {
        return Ok((memory.fair_attempt(key, token, ttl, entry_for), None));
    }
    Ok((backend.try_acquire(key, token, ttl).await?, None))
}

/// How a fair turn ended in the backend (see [`end_turn`]).
#[derive(Debug)]
pub(crate) enum TurnEnd {
    /// Nobody else waited: the lock is still held by the token.
    Kept,
    /// Released (and granted to the next in line, if anyone was).
    Released(Released),
}

impl TurnEnd {
    /// What a plain release, which never keeps, reports.
    pub(crate) fn released(self) -> Released {
        match self {
            Self::Released(released) => released,
            Self::Kept => Released::new(true),
        }
    }
}

/// Ends a turn whose holder's process has more requests waiting for `key` but may hand
/// it on no more: grants the lock to the next process in the backend's line, or, when
/// nobody else is in it, leaves it held by `token` so that the process's next request
/// gets it by hand-off (there is nobody to be fair to). One backend call either way.
pub(crate) async fn end_turn<B: LockBackend>(
    backend: &B,
    key: &LockKey,
    token: Uuid,
) -> Result<TurnEnd, BackendError> {
    let any: &dyn std::any::Any = backend;
    #[cfg(feature = "redis")]
    if let Some(redis) = any.downcast_ref::<super::RedisBackend>() {
        return redis.fair_release(key, token, true).await;
    }
    if let Some(memory) = any.downcast_ref::<super::InMemoryBackend>() {
        return Ok(memory.fair_release(key, token, true));
    }
    Ok(TurnEnd::Released(backend.release(key, token).await?))
}

/// A count of the grants of `key` heard of, read before each attempt and handed to
/// [`wait_for_grant`] (as [`release_epoch`](super::release_epoch) is to the plain wait).
pub(crate) fn epoch<B: LockBackend>(backend: &B, key: &LockKey) -> u64 {
    let any: &dyn std::any::Any = backend;
    if let Some(memory) = any.downcast_ref::<super::InMemoryBackend>() {
        return memory.grant_epoch();
    }
    super::release_epoch(backend, key)
}

/// Waits at most `timeout` for a grant of `key` to `token`. `Some(fencing token)` when one
/// was heard that came after the refusal at the server's `refused_at` (ms); `None` when
/// the wait ended without one, or with news the caller should check with an attempt (a
/// grant in a backend that does not say to whom, a new subscription).
pub(crate) async fn wait_for_grant<B: LockBackend>(
    backend: &B,
    key: &LockKey,
    token: Uuid,
    epoch: u64,
    refused_at: Option<u64>,
    timeout: Duration,
) -> Option<Option<u64>> {
    let any: &dyn std::any::Any = backend;
    #[cfg(feature = "redis")]
    if let Some(redis) = any.downcast_ref::<super::RedisBackend>() {
        return redis
            .wait_for_grant(key, token, epoch, refused_at, timeout)
            .await;
    }
    if let Some(memory) = any.downcast_ref::<super::InMemoryBackend>() {
        memory.wait_for_grant(epoch, timeout).await;
        return None;
    }
    let _ = (key, token, epoch, refused_at);
    tokio::time::sleep(timeout).await;
    None
}
