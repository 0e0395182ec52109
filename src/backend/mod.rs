//! Where locks live: the [`LockBackend`] trait and its implementations.
//!
//! A backend does single attempts; waiting, backoff and the HTTP answers belong to the
//! layer, so every backend behaves the same behind it.

use std::{future::Future, time::Duration};

use uuid::Uuid;

use crate::{key::LockKey, kind::LockKind};

mod bounded;
#[cfg(feature = "redis")]
mod connection;
#[cfg(feature = "redis")]
mod environment;
pub(crate) mod fair;
#[cfg(feature = "redis")]
mod kind_scripts;
mod memory;
#[cfg(feature = "redis")]
mod notify;
mod one_at_a_time;
#[cfg(feature = "redis")]
mod redis;
#[cfg(feature = "redis")]
mod redlock;
#[cfg(feature = "redis")]
mod scripts;
mod wake;

pub(crate) use self::bounded::release_within;
pub use self::fair::FairBackend;
pub use self::memory::InMemoryBackend;
pub(crate) use self::wake::{attempt, release_epoch, wait_for_release};
#[cfg(feature = "redis")]
pub use self::{redis::RedisBackend, redlock::RedlockBackend};

/// A boxed error from a backend's client library.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The answer to one acquisition attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Acquire {
    /// The lock is now held by the token that asked (or already was: an attempt retried
    /// after a lost reply recognises its own token and refreshes the lease).
    Acquired {
        /// With fencing on, this acquisition's fencing token: larger than that of every
        /// earlier acquisition of the same key.
        fencing_token: Option<u64>,
    },
    /// Another token holds the lock.
    Held {
        /// How long the holder's lease still runs, when the backend knows.
        remaining: Option<Duration>,
    },
}

/// The answer to a release.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Released {
    /// Whether the token held the lock (and so freed it); on Redlock, on a majority of
    /// the nodes. `false` means the lock was lost before the release.
    pub was_held: bool,
    /// How many waiters elsewhere were told of the release, when the backend notifies
    /// (0 otherwise). The local queue uses it to step aside for them.
    pub(crate) notified: u64,
    /// Whether a waiter elsewhere had been refused the lock since it was last released
    /// (it left a mark) and is not known to hear of releases (notifications are off or
    /// failing here, and so presumably there): it retries on its backoff, and the local
    /// queue steps aside long enough for that.
    pub(crate) unnotified_waiters: bool,
}

impl Released {
    /// A release that freed the lock (`was_held`), or found it not held by the token.
    pub fn new(was_held: bool) -> Self {
        Self {
            was_held,
            ..Self::default()
        }
    }
}

/// A backend could not answer: the request gets 503, never an unlocked handler
/// (unless the layer was told to fail open).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// The operation, connection checkout included, did not finish in time.
    #[error("lock backend did not answer within {0:?}")]
    Timeout(Duration),
    /// No connection could be had (server down, pool exhausted, connection dropped).
    #[error("lock backend unavailable")]
    Unavailable(#[source] BoxError),
    /// The server cannot take writes on this connection now (`READONLY` from a replica
    /// or a demoted primary, `LOADING`, `MASTERDOWN`); the next operation reconnects.
    #[error("lock backend cannot take writes now")]
    Stale(#[source] BoxError),
    /// The backend answered with an error (a failing script, out of memory) or with a
    /// reply the protocol does not allow.
    #[error("lock backend refused the command")]
    Command(#[source] BoxError),
    /// The backend does not take this kind of lock (see [`LockBackend::supports`]).
    #[error("lock backend does not take {0} locks")]
    Unsupported(LockKind),
}

/// A backend could not be built from what it was given (a malformed URL, say): a mistake
/// in the service's configuration, found at start-up, unlike a [`BackendError`].
#[derive(Debug, thiserror::Error)]
#[error("invalid lock backend configuration: {0}")]
pub struct ConfigError(#[source] pub(crate) BoxError);

/// Storage for locks: single, atomic attempts on one key.
///
/// Tokens are the owners' identities: only the token that acquired a lock can release or
/// extend it. Implementations must bound every operation in time and report what they
/// cannot do as a [`BackendError`].
///
/// Cloning a backend must be cheap and share its state (a pool, a map behind an `Arc`).
pub trait LockBackend: Clone + Send + Sync + 'static {
    /// Takes `key` for `token` with a lease of `ttl`, if it is free or already `token`'s.
    ///
    /// When `token` holds it already (an attempt retried after a lost reply, or a lock
    /// handed over within the process), the lease is reset and, with fencing on, a new
    /// fencing token taken.
    fn try_acquire(
        &self,
        key: &LockKey,
        token: Uuid,
        ttl: Duration,
    ) -> impl Future<Output = Result<Acquire, BackendError>> + Send;

    /// Frees `key` if `token` holds it, and tells the waiters of other processes.
    fn release(
        &self,
        key: &LockKey,
        token: Uuid,
    ) -> impl Future<Output = Result<Released, BackendError>> + Send;

    /// Resets the lease of `key` to `ttl` if `token` holds it. Returns whether it did.
    fn extend(
        &self,
        key: &LockKey,
        token: Uuid,
        ttl: Duration,
    ) -> impl Future<Output = Result<bool, BackendError>> + Send;

    /// Whether an attempt that did not take the lock may be retried with the same token
    /// (the default, `true`). A retry with the same token recognises an earlier attempt of
    /// its own that did land although its reply was lost.
    ///
    /// A backend that undoes a failed attempt itself by releasing it (Redlock) returns
    /// `false`: such a release may reach a slow node late, and must then find a different
    /// token there, so every attempt gets a fresh one.
    fn retry_with_same_token(&self) -> bool {
        true
    }

    /// Whether the backend takes holds of `kind` through
    /// [`try_acquire_kind`](Self::try_acquire_kind) and its siblings. By default only
    /// [`LockKind::Exclusive`], which they pass to the plain methods: a backend of your
    /// own keeps compiling and refuses the other kinds when a locker is built with them
    /// ([`Locker::permits`](crate::Locker::permits) panics with a clear message).
    fn supports(&self, kind: LockKind) -> bool {
        kind == LockKind::Exclusive
    }

    /// Takes a hold of `kind` on `key` for `token` with a lease of `ttl`, if the kind's
    /// rule allows it now (fewer than `n` permits out; no writer and no waiting writer for
    /// a reader; nobody at all for a writer) or `token` holds one already (its lease is
    /// then reset). A refused writer leaves a short-lived mark that refuses new readers
    /// until it gets in, so that writers do not starve.
    ///
    /// The default takes [`LockKind::Exclusive`] with [`try_acquire`](Self::try_acquire)
    /// and refuses the other kinds with [`BackendError::Unsupported`].
    fn try_acquire_kind(
        &self,
        kind: LockKind,
        key: &LockKey,
        token: Uuid,
        ttl: Duration,
    ) -> impl Future<Output = Result<Acquire, BackendError>> + Send {
        async move {
            match kind {
                LockKind::Exclusive => self.try_acquire(key, token, ttl).await,
                other => Err(BackendError::Unsupported(other)),
            }
        }
    }

    /// Gives back `token`'s hold of `kind` on `key`, and tells waiters elsewhere when it
    /// may let one in. The default: [`release`](Self::release) for
    /// [`LockKind::Exclusive`], [`BackendError::Unsupported`] otherwise.
    fn release_kind(
        &self,
        kind: LockKind,
        key: &LockKey,
        token: Uuid,
    ) -> impl Future<Output = Result<Released, BackendError>> + Send {
        async move {
            match kind {
                LockKind::Exclusive => self.release(key, token).await,
                other => Err(BackendError::Unsupported(other)),
            }
        }
    }

    /// Resets the lease of `token`'s hold of `kind` on `key` to `ttl`, if it still holds
    /// it. The default: [`extend`](Self::extend) for [`LockKind::Exclusive`],
    /// [`BackendError::Unsupported`] otherwise.
    fn extend_kind(
        &self,
        kind: LockKind,
        key: &LockKey,
        token: Uuid,
        ttl: Duration,
    ) -> impl Future<Output = Result<bool, BackendError>> + Send {
        async move {
            match kind {
                LockKind::Exclusive => self.extend(key, token, ttl).await,
                other => Err(BackendError::Unsupported(other)),
            }
        }
    }

    /// Takes every key of `keys` (sorted, without duplicates) for `token`, or none: the
    /// lock on several keys at once. Each key is an exclusive lock, the same as
    /// [`try_acquire`](Self::try_acquire) takes.
    ///
    /// The default takes them one at a time in the given (global) order and, when one is
    /// refused or fails, releases those it took before answering: all or nothing, with no
    /// deadlock between overlapping sets (nobody waits while holding a key). It costs one
    /// round trip per key, and twice that for the keys taken before a refusal; a backend
    /// that can do better in one step (one script on one Redis) overrides it.
    fn try_acquire_many(
        &self,
        keys: &[LockKey],
        token: Uuid,
        ttl: Duration,
    ) -> impl Future<Output = Result<Acquire, BackendError>> + Send {
        one_at_a_time::acquire(self, keys, token, ttl)
    }

    /// Releases every key of `keys` that `token` holds. `was_held` is whether it held
    /// them all. The default releases them one at a time.
    fn release_many(
        &self,
        keys: &[LockKey],
        token: Uuid,
    ) -> impl Future<Output = Result<Released, BackendError>> + Send {
        one_at_a_time::release(self, keys, token)
    }

    /// Resets the lease of every key of `keys` to `ttl` if `token` holds them all;
    /// returns whether it did. The default extends them one at a time.
    fn extend_many(
        &self,
        keys: &[LockKey],
        token: Uuid,
        ttl: Duration,
    ) -> impl Future<Output = Result<bool, BackendError>> + Send {
        one_at_a_time::extend(self, keys, token, ttl)
    }
}
