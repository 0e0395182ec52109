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

use std::{
    collections::HashMap,
    fmt,
    num::NonZeroU32,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use http::Method;
use tokio::time::Instant;
use uuid::Uuid;

use crate::{
    backend::{Acquire, BackendError, LockBackend, Released},
    key::LockKey,
    lease::drift,
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
    /// Several keys at once ([`KeySet`]), each an exclusive lock, taken all or none.
    Several,
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
            LockKind::Several => "several",
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
/// `Locker<KindBackend<RedisBackend>>`. Cloning is cheap and shares `B` (and the read
/// groups below).
///
/// **Readers of one process share one hold.** A reader that finds a hold of this
/// backend (or a clone) on its key taken less than half the drift margin ago (ttl/200 +
/// 1 ms: 51 ms for a 10 s ttl) joins it, without a backend call; the hold is released
/// when its last member leaves, and each member's watchdog renews it. Past that window a
/// reader asks the backend for a hold of its own (refused while a writer waits), which
/// new readers then join. So a hot key costs its process one acquire and one release per
/// window rather than per request, a waiting writer waits at most one window longer for
/// the readers of each process, and a joiner's lease, counted from its own start, still
/// ends before the shared hold's (the other half of the margin covers clock drift).
#[derive(Clone, Debug)]
pub struct KindBackend<B> {
    inner: B,
    kind: LockKind,
    groups: Arc<Mutex<ReadGroups>>,
}

/// The read holds of this process, and which reader belongs to which.
#[derive(Debug, Default)]
struct ReadGroups {
    /// The hold new readers of a key join, and when it was taken (before its attempt).
    open: HashMap<LockKey, (Uuid, Instant)>,
    /// Members per hold (by the hold's token, the first reader's).
    members: HashMap<Uuid, usize>,
    /// The hold each reader belongs to.
    member_of: HashMap<Uuid, Uuid>,
}

impl ReadGroups {
    /// Takes `reader` out of its hold; returns the hold's token when it was the last.
    fn leave(&mut self, key: &LockKey, reader: Uuid) -> Option<Option<Uuid>> {
        let hold = self.member_of.remove(&reader)?;
        let left = self.members.get_mut(&hold).map(|n| {
            *n -= 1;
            *n
        });
        if left.unwrap_or(0) > 0 {
            return Some(None);
        }
        self.members.remove(&hold);
        if self.open.get(key).is_some_and(|(open, _)| *open == hold) {
            self.open.remove(key);
        }
        Some(Some(hold))
    }
}

impl<B: LockBackend> KindBackend<B> {
    /// `inner`, taking holds of `kind`.
    ///
    /// # Panics
    ///
    /// When `inner` does not take holds of `kind` ([`LockBackend::supports`]): Redlock,
    /// for instance, takes only exclusive locks.
    pub fn new(inner: B, kind: LockKind) -> Self {
        // Every backend takes several keys (one at a time, by default).
        assert!(
            kind == LockKind::Several || inner.supports(kind),
            "this lock backend does not take {kind} locks (see LockBackend::supports)"
        );
        Self {
            inner,
            kind,
            groups: Arc::default(),
        }
    }

    fn groups<T>(&self, f: impl FnOnce(&mut ReadGroups) -> T) -> T {
        // Every update is a few map operations that cannot panic halfway.
        let mut groups = self.groups.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut groups)
    }

    /// A reader: joins the process's open hold on `key` if it is young enough, or asks
    /// the backend for a hold of its own, which later readers join.
    async fn read(
        &self,
        key: &LockKey,
        token: Uuid,
        ttl: Duration,
    ) -> Result<Acquire, BackendError> {
        let now = Instant::now();
        let window = drift(ttl) / 2;
        let joined = self.groups(|groups| {
            if let Some(hold) = groups.member_of.get(&token) {
                return Err(*hold); // a retry: renew the hold it belongs to
            }
            match groups.open.get(key) {
                Some((hold, taken)) if now.saturating_duration_since(*taken) <= window => {
                    let hold = *hold;
                    *groups.members.entry(hold).or_default() += 1;
                    groups.member_of.insert(token, hold);
                    Ok(true)
                }
                _ => Ok(false),
            }
        });
        let hold = match joined {
            Ok(true) => {
                return Ok(Acquire::Acquired {
                    fencing_token: None,
                });
            }
            Ok(false) => token,
            Err(hold) => hold,
        };
        let answer = self
            .inner
            .try_acquire_kind(LockKind::Read, key, hold, ttl)
            .await?;
        if matches!(answer, Acquire::Acquired { .. }) && hold == token {
            self.groups(|groups| {
                if groups.member_of.insert(token, token).is_none() {
                    *groups.members.entry(token).or_default() += 1;
                }
                groups.open.insert(key.clone(), (token, now));
            });
        }
        Ok(answer)
    }

    /// A reader leaves its hold; the last one out releases it in the backend.
    async fn unread(&self, key: &LockKey, token: Uuid) -> Result<Released, BackendError> {
        match self.groups(|groups| groups.leave(key, token)) {
            // Others still read under the hold, which we believe is live.
            Some(None) => Ok(Released::new(true)),
            Some(Some(hold)) => self.inner.release_kind(LockKind::Read, key, hold).await,
            // Not a member (an attempt whose answer was lost): its own hold, if any.
            None => self.inner.release_kind(LockKind::Read, key, token).await,
        }
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
    async fn try_acquire(
        &self,
        key: &LockKey,
        token: Uuid,
        ttl: Duration,
    ) -> Result<Acquire, BackendError> {
        match self.kind {
            LockKind::Read => self.read(key, token, ttl).await,
            LockKind::Several => {
                let keys = several(key)?;
                self.inner.try_acquire_many(&keys, token, ttl).await
            }
            kind => self.inner.try_acquire_kind(kind, key, token, ttl).await,
        }
    }

    async fn release(&self, key: &LockKey, token: Uuid) -> Result<Released, BackendError> {
        match self.kind {
            LockKind::Read => self.unread(key, token).await,
            LockKind::Several => self.inner.release_many(&several(key)?, token).await,
            kind => self.inner.release_kind(kind, key, token).await,
        }
    }

    async fn extend(
        &self,
        key: &LockKey,
        token: Uuid,
        ttl: Duration,
    ) -> Result<bool, BackendError> {
        let hold = match self.kind {
            LockKind::Several => {
                return self.inner.extend_many(&several(key)?, token, ttl).await;
            }
            LockKind::Read => self
                .groups(|groups| groups.member_of.get(&token).copied())
                .unwrap_or(token),
            _ => token,
        };
        self.inner.extend_kind(self.kind, key, hold, ttl).await
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

/// The keys of one lock on several keys, as a key function returns them: deduplicated
/// and sorted (the global order in which a Cluster takes them one at a time), so that
/// requests for overlapping sets never wait for each other in a cycle.
///
/// A layer or locker made with `several_keys()` locks every key of the set, all or
/// none; it is `Into<LockKey>`, so a key function returns it like any key. Empty keys are
/// left out; a set with no key is the empty key (400).
///
/// ```
/// use tower_redis_lock::KeySet;
///
/// let accounts = KeySet::new(["acct:9", "acct:2", "acct:9"]);
/// assert_eq!(accounts.keys().len(), 2);
/// assert_eq!(accounts.keys()[0].as_str(), "acct:2");
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KeySet(Vec<LockKey>);

/// Starts the set's key: the layer's prefix comes before it, the members after it.
const SET_MARK: char = '\0';

impl KeySet {
    /// The set of `keys`, deduplicated and sorted, without empty ones.
    pub fn new<I, K>(keys: I) -> Self
    where
        I: IntoIterator<Item = K>,
        K: Into<LockKey>,
    {
        let mut keys: Vec<LockKey> = keys
            .into_iter()
            .map(Into::into)
            .filter(|key| !key.is_empty())
            .collect();
        keys.sort();
        keys.dedup();
        Self(keys)
    }

    /// The keys, in order.
    pub fn keys(&self) -> &[LockKey] {
        &self.0
    }
}

impl From<KeySet> for LockKey {
    /// The set as one key: a NUL, then each member as `<length>:<key>`; the locker puts
    /// its prefix before it and the backend reads the members (each with the prefix)
    /// back. The empty set gives the empty key.
    fn from(set: KeySet) -> Self {
        if set.0.is_empty() {
            return LockKey::from("");
        }
        let mut text = String::from(SET_MARK);
        for key in &set.0 {
            text.push_str(&key.len().to_string());
            text.push(':');
            text.push_str(key.as_str());
        }
        LockKey::from(text)
    }
}

/// The members of a set's key (see `From<KeySet> for LockKey`), each with the prefix
/// found before the set; `None` for a key that is not a set.
pub(crate) fn set_members(key: &LockKey) -> Option<Vec<LockKey>> {
    let (prefix, mut rest) = key.as_str().split_once(SET_MARK)?;
    let mut keys = Vec::new();
    while !rest.is_empty() {
        let (len, tail) = rest.split_once(':')?;
        let len: usize = len.parse().ok()?;
        let member = tail.get(..len)?;
        keys.push(LockKey::from(format!("{prefix}{member}")));
        rest = &tail[len..];
    }
    (!keys.is_empty()).then_some(keys)
}

/// The keys a several-keys hold takes: the set's members, or the key alone when the key
/// function gave a plain key.
fn several(key: &LockKey) -> Result<Vec<LockKey>, BackendError> {
    Ok(set_members(key).unwrap_or_else(|| vec![key.clone()]))
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
    fn sets_round_trip_through_their_key() {
        let set = KeySet::new(["b:2", "a", "", "b:2", "c}\0:9"]);
        let key = LockKey::from(set.clone()).prefixed("acct:");
        let members = set_members(&key).unwrap();
        let expected: Vec<LockKey> = set.keys().iter().map(|key| key.prefixed("acct:")).collect();
        assert_eq!(members, expected);
        assert_eq!(members.len(), 3);
        assert!(set_members(&LockKey::from("plain")).is_none());
        assert!(LockKey::from(KeySet::new([""])).is_empty());
    }

    #[test]
    #[should_panic(expected = "does not take")]
    fn kinds_do_not_nest() {
        let read = KindBackend::new(crate::InMemoryBackend::new(), LockKind::Read);
        let _ = KindBackend::new(read, LockKind::Read);
    }
}
