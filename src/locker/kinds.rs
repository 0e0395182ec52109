//! A [`Locker`] of another kind: permits, readers, writers (see [`crate::kind`]).

use std::{num::NonZeroU32, sync::Arc};

use super::{Locker, Renewals, settings::DEFAULT_MAX_HAND_OFFS};
use crate::{
    backend::LockBackend,
    kind::{KindBackend, LockKind},
    line::Line,
};

impl<Backend: LockBackend> Locker<Backend> {
    /// This locker, taking holds of `kind` instead of exclusive locks, with the same
    /// settings; the metrics class gets `:<kind>` appended (`order:read`).
    ///
    /// Shared kinds (permits, readers) take no local line: requests of one process for the
    /// same key each ask the backend for a share of their own, so that they can hold at
    /// once. Writers get a line of their own (hand-offs between the writers of one
    /// process, as for exclusive locks).
    ///
    /// # Panics
    ///
    /// When the backend does not take holds of `kind` ([`LockBackend::supports`]):
    /// [`RedlockBackend`](crate::RedlockBackend) and backends of your own that do not
    /// say otherwise take exclusive locks only. Also when the locker is in fair mode
    /// ([`fair`](Self::fair)) and `kind` is not exclusive: the line in the backend is the
    /// exclusive lock's, and its grants would not reach shares, writers or key sets.
    pub fn kind(self, kind: LockKind) -> Locker<KindBackend<Backend>> {
        let Locker {
            backend,
            line,
            mut settings,
            renewals: _,
            #[cfg(feature = "axum")]
            request,
        } = self;
        assert!(
            kind == LockKind::Exclusive || !crate::backend::fair::is_fair(&backend),
            "fair mode takes exclusive locks only: build the {} locker without .fair(true)",
            kind.name()
        );
        let backend = KindBackend::new(backend, kind);
        Arc::make_mut(&mut settings).set_kind(kind);
        let line = match kind {
            _ if kind.is_shared() => None,
            _ if line.is_none() => None,
            _ => Some(Line::new(DEFAULT_MAX_HAND_OFFS)),
        };
        Locker {
            backend,
            line,
            settings,
            renewals: Arc::new(Renewals::default()),
            #[cfg(feature = "axum")]
            request,
        }
    }

    /// This locker, handing out at most `n` permits per key at once across every process
    /// on the backend (a distributed semaphore): [`kind`](Self::kind) with
    /// [`LockKind::Permits`].
    ///
    /// Each holder has a lease of its own, renewed by its own watchdog and given back on
    /// release, on drop, or, for a holder that crashed, when the lease ends. A request
    /// that finds all `n` taken waits as for a held lock and gets the same answers (409 or
    /// 423 with `Retry-After` at the end of the wait).
    ///
    /// ```
    /// use tower_redis_lock::{InMemoryBackend, Locker};
    ///
    /// // At most 3 exports per tenant at once.
    /// let exports = Locker::new(InMemoryBackend::new()).key_prefix("export:").permits(3);
    /// # let _ = exports;
    /// ```
    ///
    /// # Panics
    ///
    /// When `n` is 0, or as [`kind`](Self::kind) does.
    pub fn permits(self, n: u32) -> Locker<KindBackend<Backend>> {
        let n = NonZeroU32::new(n).expect("permits(n) needs n >= 1");
        self.kind(LockKind::Permits(n))
    }

    /// This locker, taking read shares: [`kind`](Self::kind) with [`LockKind::Read`].
    /// Readers of a key hold it together, each with a lease of its own, but never with a
    /// writer, and a waiting writer keeps new readers out until it got in.
    pub fn read(self) -> Locker<KindBackend<Backend>> {
        self.kind(LockKind::Read)
    }

    /// This locker, taking write locks: [`kind`](Self::kind) with [`LockKind::Write`]. A
    /// writer holds its key alone (no reader, no other writer); with fencing on it gets a
    /// fencing token, from the same counter as the exclusive lock on that key.
    pub fn write(self) -> Locker<KindBackend<Backend>> {
        self.kind(LockKind::Write)
    }

    /// Whether this locker takes shared holds (permits, readers), which take no line.
    pub(super) fn takes_shares(&self) -> bool {
        self.settings.kind.is_some_and(|kind| kind.is_shared())
    }

    /// This locker, taking several keys at once: [`kind`](Self::kind) with
    /// [`LockKind::Several`]. Give [`lock`](Self::lock) (or the layer's key function) a
    /// [`KeySet`](crate::KeySet); every key of it is locked, all or none, each as the
    /// exclusive lock on that key (so they also exclude the exclusive locks of a locker
    /// with the same prefix), under one owner token. [`Held::keys`](crate::Held::keys)
    /// lists them.
    ///
    /// On one Redis server the set is taken in one script; on a Redis Cluster, where keys
    /// of different slots cannot meet in a script, and on any other backend, the keys are
    /// taken one at a time in the set's order and, on a refusal, the ones taken are
    /// released before the answer: a round trip per key, twice that for those undone.
    /// Nobody holds a key while waiting, so overlapping sets cannot deadlock. No fencing
    /// token (each key has its own counter), and waiting is on the backoff, not on
    /// release notifications (there is no one channel for a set).
    ///
    /// Every backend takes several keys, Redlock too (one key at a time).
    ///
    /// ```
    /// use tower_redis_lock::{InMemoryBackend, KeySet, Locker};
    ///
    /// # async fn transfer() -> Result<(), tower_redis_lock::LockRejection> {
    /// let accounts = Locker::new(InMemoryBackend::new()).key_prefix("acct:").several_keys();
    /// let lock = accounts.lock(KeySet::new(["7", "3"])).await?;
    /// assert_eq!(lock.held().keys().len(), 2); // acct:3, acct:7
    /// # Ok(())
    /// # }
    /// ```
    pub fn several_keys(self) -> Locker<KindBackend<Backend>> {
        self.kind(LockKind::Several)
    }
}

#[cfg(test)]
mod tests {
    use crate::{InMemoryBackend, Locker};

    #[test]
    fn the_kind_is_part_of_the_metrics_class() {
        let backend = InMemoryBackend::new();
        let read = Locker::new(backend.clone()).key_prefix("doc:").read();
        assert_eq!(&**read.class(), "doc:read");
        let write = Locker::new(backend.clone()).write().key_prefix("doc:");
        assert_eq!(&**write.class(), "doc:write");
        let permits = Locker::new(backend.clone())
            .permits(3)
            .metrics_class("exports");
        assert_eq!(&**permits.class(), "exports:permits");
        let several = Locker::new(backend.clone()).several_keys();
        assert_eq!(&**several.class(), "default:several");
        assert_eq!(&**Locker::new(backend).class(), "default");
    }

    #[test]
    fn shared_kinds_take_no_local_line() {
        let locker = Locker::new(InMemoryBackend::new()).read().max_hand_offs(4);
        assert!(locker.line.is_none());
        let locker = Locker::new(InMemoryBackend::new()).write();
        assert!(locker.line.is_some());
    }

    #[test]
    #[should_panic(expected = "fair mode takes exclusive locks only")]
    fn fair_mode_is_refused_for_other_kinds() {
        let _ = Locker::new(InMemoryBackend::new()).fair(true).permits(2);
    }

    #[test]
    #[should_panic(expected = "permits(n) needs n >= 1")]
    fn zero_permits_are_refused() {
        let _ = Locker::new(InMemoryBackend::new()).permits(0);
    }
}
