//! Kinds of lock beyond the exclusive one (DESIGN §10): permits (at most `n` holders per
//! key) and read/write (readers share, a writer excludes everyone).
//!
//! A kind is a property of a [`Locker`](crate::Locker): [`Locker::permits`](crate::Locker::permits),
//! [`Locker::read`](crate::Locker::read) and [`Locker::write`](crate::Locker::write) (and
//! the same methods on [`LockLayer`](crate::LockLayer)) wrap its backend in a
//! [`KindBackend`], whose single attempts take, release and renew that kind of hold
//! through [`LockBackend::try_acquire_kind`] and its siblings. The wait, the answers, the
//! watchdog and the release on drop are the exclusive lock's, unchanged.
//!
//! Every holder of a shared kind (a permit, a read share) has a lease of its own, renewed
//! by its own watchdog: a holder that crashes gives its share back when its lease ends.

use std::{fmt, num::NonZeroU32, time::Duration};

use http::Method;
use uuid::Uuid;

use crate::{
    backend::{Acquire, BackendError, LockBackend, Released},
    key::LockKey,
};

/// What a hold on a key allows others.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LockKind {
    /// One holder at a time (the default, and what [`LockBackend::try_acquire`] takes).
    Exclusive,
    /// At most this many holders at once, each with a lease of its own (a semaphore).
    Permits(NonZeroU32),
    /// A reader: readers share the key, but not with a writer, and not once a writer waits.
    Read,
    /// A writer: alone on the key, without readers or other writers; with fencing on, it
    /// gets a fencing token from the same counter the exclusive lock uses.
    Write,
}

impl LockKind {
    /// The name used in messages and appended to the metrics class (`exclusive`,
    /// `permits`, `read`, `write`).
    pub fn name(&self) -> &'static str {
        match self {
            LockKind::Exclusive => "exclusive",
            LockKind::Permits(_) => "permits",
            LockKind::Read => "read",
            LockKind::Write => "write",
        }
    }

    /// Whether several holders may hold one key at once (permits, readers). Shared kinds
    /// take no local line: requests of one process that want the same key ask the backend
    /// each for a share of their own.
    pub fn is_shared(&self) -> bool {
        matches!(self, LockKind::Permits(_) | LockKind::Read)
    }
}

impl fmt::Display for LockKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LockKind::Permits(n) => write!(f, "permits({n})"),
            other => f.write_str(other.name()),
        }
    }
}

/// Whether a request reads or writes, for a layer that takes read/write locks
/// ([`LockLayer::read_write`](crate::LockLayer::read_write)).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LockMode {
    /// A shared hold ([`LockKind::Read`]).
    Read,
    /// An exclusive hold ([`LockKind::Write`]).
    Write,
}

impl LockMode {
    /// The default choice: `GET`, `HEAD` and `OPTIONS` read, every other method writes.
    pub fn from_method(method: &Method) -> Self {
        if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
            LockMode::Read
        } else {
            LockMode::Write
        }
    }
}

/// A backend that takes holds of one [`LockKind`] on `B`: its [`LockBackend`] methods
/// call `B`'s [`try_acquire_kind`](LockBackend::try_acquire_kind),
/// [`release_kind`](LockBackend::release_kind) and
/// [`extend_kind`](LockBackend::extend_kind) with that kind.
///
/// Made by [`Locker::permits`](crate::Locker::permits), [`Locker::read`](crate::Locker::read),
/// [`Locker::write`](crate::Locker::write) and the layer's methods of the same names; a
/// handler that takes a [`Locker`](crate::Locker) of such a route names it as
/// `Locker<KindBackend<RedisBackend>>`. Cloning is cheap and shares `B`.
#[derive(Clone, Debug)]
pub struct KindBackend<B> {
    inner: B,
    kind: LockKind,
}

impl<B: LockBackend> KindBackend<B> {
    /// `inner`, taking holds of `kind`.
    ///
    /// # Panics
    ///
    /// When `inner` does not take holds of `kind` ([`LockBackend::supports`]): Redlock,
    /// for instance, takes only exclusive locks.
    pub fn new(inner: B, kind: LockKind) -> Self {
        assert!(
            inner.supports(kind),
            "this lock backend does not take {kind} locks (see LockBackend::supports)"
        );
        Self { inner, kind }
    }

    /// The backend underneath.
    pub fn inner(&self) -> &B {
        &self.inner
    }

    /// The kind of hold it takes.
    pub fn kind(&self) -> LockKind {
        self.kind
    }
}

impl<B: LockBackend> LockBackend for KindBackend<B> {
    fn try_acquire(
        &self,
        key: &LockKey,
        token: Uuid,
        ttl: Duration,
    ) -> impl Future<Output = Result<Acquire, BackendError>> + Send {
        self.inner.try_acquire_kind(self.kind, key, token, ttl)
    }

    fn release(
        &self,
        key: &LockKey,
        token: Uuid,
    ) -> impl Future<Output = Result<Released, BackendError>> + Send {
        self.inner.release_kind(self.kind, key, token)
    }

    fn extend(
        &self,
        key: &LockKey,
        token: Uuid,
        ttl: Duration,
    ) -> impl Future<Output = Result<bool, BackendError>> + Send {
        self.inner.extend_kind(self.kind, key, token, ttl)
    }

    fn retry_with_same_token(&self) -> bool {
        self.inner.retry_with_same_token()
    }

    /// A `KindBackend` takes its own kind only (through its plain methods); it does not
    /// nest.
    fn supports(&self, kind: LockKind) -> bool {
        kind == LockKind::Exclusive
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_pick_the_mode() {
        assert_eq!(LockMode::from_method(&Method::GET), LockMode::Read);
        assert_eq!(LockMode::from_method(&Method::HEAD), LockMode::Read);
        assert_eq!(LockMode::from_method(&Method::OPTIONS), LockMode::Read);
        assert_eq!(LockMode::from_method(&Method::PUT), LockMode::Write);
        assert_eq!(LockMode::from_method(&Method::POST), LockMode::Write);
        assert_eq!(LockMode::from_method(&Method::DELETE), LockMode::Write);
    }

    #[test]
    #[should_panic(expected = "does not take")]
    fn kinds_do_not_nest() {
        let read = KindBackend::new(crate::InMemoryBackend::new(), LockKind::Read);
        let _ = KindBackend::new(read, LockKind::Read);
    }
}
