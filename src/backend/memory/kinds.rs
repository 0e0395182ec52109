//! The shared kinds of lock in process memory, with the Redis scripts' semantics (see
//! `backend::kind_scripts`): shares with leases of their own, writer preference through a
//! short-lived waiting-writer mark.

use std::{collections::HashMap, time::Duration};

use tokio::time::Instant;
use uuid::Uuid;

use super::{InMemoryBackend, Lease, Locks};
use crate::{
    backend::{Acquire, Released},
    key::LockKey,
    kind::LockKind,
    lease::saturating_add,
};

/// How long a refused writer keeps new readers out after its last attempt (as on Redis).
const WRITER_WAITING: Duration = Duration::from_millis(1000);

/// The holds of the shared kinds, per key; nothing is kept for a key once its holds and
/// marks are gone.
#[derive(Debug, Default)]
pub(super) struct KindLocks {
    permits: HashMap<LockKey, HashMap<Uuid, Instant>>,
    readers: HashMap<LockKey, HashMap<Uuid, Instant>>,
    writers: HashMap<LockKey, Lease>,
    writer_waiting: HashMap<LockKey, Lease>,
    /// Entries after the last sweep of ended leases (see `Locks::swept_at`).
    swept_at: usize,
}

impl KindLocks {
    /// How many holds are live now.
    pub(super) fn held_count(&self, now: Instant) -> usize {
        let shares = |map: &HashMap<LockKey, HashMap<Uuid, Instant>>| {
            map.values()
                .map(|shares| shares.values().filter(|end| **end > now).count())
                .sum::<usize>()
        };
        shares(&self.permits)
            + shares(&self.readers)
            + self.writers.values().filter(|l| l.expires_at > now).count()
    }

    fn entries(&self) -> usize {
        self.permits.len() + self.readers.len() + self.writers.len() + self.writer_waiting.len()
    }

    /// Drops every ended lease and mark once the maps have doubled since the last sweep:
    /// memory stays bounded by the live holds at amortised O(1) cost.
    fn sweep(&mut self, now: Instant) {
        if self.entries() < 2 * self.swept_at.max(64) {
            return;
        }
        for map in [&mut self.permits, &mut self.readers] {
            map.retain(|_, shares| {
                shares.retain(|_, end| *end > now);
                !shares.is_empty()
            });
        }
        self.writers.retain(|_, lease| lease.expires_at > now);
        self.writer_waiting.retain(|_, mark| mark.expires_at > now);
        self.swept_at = self.entries();
    }
}

/// The live shares of `key` in `map` (ended ones dropped), created if need be.
fn live<'a>(
    map: &'a mut HashMap<LockKey, HashMap<Uuid, Instant>>,
    key: &LockKey,
    now: Instant,
) -> &'a mut HashMap<Uuid, Instant> {
    let shares = map.entry(key.clone()).or_default();
    shares.retain(|_, end| *end > now);
    shares
}

/// Forgets `key` in `map` if it has no share left.
fn forget_if_empty(map: &mut HashMap<LockKey, HashMap<Uuid, Instant>>, key: &LockKey) {
    if map.get(key).is_some_and(HashMap::is_empty) {
        map.remove(key);
    }
}

fn live_lease<'a>(
    map: &'a HashMap<LockKey, Lease>,
    key: &LockKey,
    now: Instant,
) -> Option<&'a Lease> {
    map.get(key).filter(|lease| lease.expires_at > now)
}

impl InMemoryBackend {
    pub(super) fn acquire_kind_now(
        &self,
        kind: LockKind,
        key: &LockKey,
        token: Uuid,
        ttl: Duration,
    ) -> Acquire {
        if matches!(kind, LockKind::Exclusive | LockKind::Several) {
            // Several keys come through `try_acquire_many`, never here.
            return self.acquire_now(key, token, ttl);
        }
        let now = Instant::now();
        let end = saturating_add(now, ttl);
        self.with_locks(|locks| {
            locks.kinds.sweep(now);
            let answer = match kind {
                LockKind::Permits(n) => {
                    let shares = live(&mut locks.kinds.permits, key, now);
                    let limit = usize::try_from(n.get()).unwrap_or(usize::MAX);
                    if shares.contains_key(&token) || shares.len() < limit {
                        shares.insert(token, end);
                        Acquire::Acquired {
                            fencing_token: None,
                        }
                    } else {
                        let first = shares.values().min().copied();
                        Acquire::Held {
                            remaining: first.map(|first| first - now),
                        }
                    }
                }
                LockKind::Read => read(locks, key, token, now, end),
                LockKind::Write => self.write(locks, key, token, now, end),
                LockKind::Exclusive | LockKind::Several => unreachable!("taken above"),
            };
            forget_if_empty(&mut locks.kinds.permits, key);
            forget_if_empty(&mut locks.kinds.readers, key);
            answer
        })
    }

    fn write(
        &self,
        locks: &mut Locks,
        key: &LockKey,
        token: Uuid,
        now: Instant,
        end: Instant,
    ) -> Acquire {
        let kinds = &mut locks.kinds;
        let readers = live(&mut kinds.readers, key, now);
        let holder = live_lease(&kinds.writers, key, now).map(|lease| lease.token);
        if holder == Some(token) || (holder.is_none() && readers.is_empty()) {
            kinds.writers.insert(
                key.clone(),
                Lease {
                    token,
                    expires_at: end,
                },
            );
            if kinds
                .writer_waiting
                .get(key)
                .is_some_and(|mark| mark.token == token)
            {
                kinds.writer_waiting.remove(key);
            }
            return Acquire::Acquired {
                fencing_token: self.fence(locks, key),
            };
        }
        let until = match holder {
            Some(_) => kinds.writers.get(key).map(|lease| lease.expires_at),
            None => readers.values().max().copied(),
        };
        kinds.writer_waiting.insert(
            key.clone(),
            Lease {
                token,
                expires_at: saturating_add(now, WRITER_WAITING),
            },
        );
        Acquire::Held {
            remaining: until.map(|until| until - now),
        }
    }

    pub(super) fn release_kind_now(&self, kind: LockKind, key: &LockKey, token: Uuid) -> Released {
        let now = Instant::now();
        let shares = match kind {
            LockKind::Exclusive | LockKind::Several => return self.release_now(key, token),
            LockKind::Write => {
                return self.with_locks(|locks| match locks.kinds.writers.get(key) {
                    Some(lease) if lease.token == token => {
                        let was_held = lease.expires_at > now;
                        locks.kinds.writers.remove(key);
                        Released::new(was_held)
                    }
                    _ => Released::default(),
                });
            }
            LockKind::Permits(_) | LockKind::Read => kind,
        };
        self.with_locks(|locks| {
            let map = if shares == LockKind::Read {
                &mut locks.kinds.readers
            } else {
                &mut locks.kinds.permits
            };
            let was_held = map
                .get_mut(key)
                .and_then(|shares| shares.remove(&token))
                .map(|end| end > now);
            forget_if_empty(map, key);
            was_held.map_or_else(Released::default, Released::new)
        })
    }

    pub(super) fn extend_kind_now(
        &self,
        kind: LockKind,
        key: &LockKey,
        token: Uuid,
        ttl: Duration,
    ) -> bool {
        let now = Instant::now();
        let end = saturating_add(now, ttl);
        let map = match kind {
            LockKind::Exclusive | LockKind::Several => return self.extend_now(key, token, ttl),
            LockKind::Write => {
                return self.with_locks(|locks| match locks.kinds.writers.get_mut(key) {
                    Some(lease) if lease.token == token && lease.expires_at > now => {
                        lease.expires_at = end;
                        true
                    }
                    _ => false,
                });
            }
            LockKind::Permits(_) | LockKind::Read => kind,
        };
        self.with_locks(|locks| {
            let shares = if map == LockKind::Read {
                &mut locks.kinds.readers
            } else {
                &mut locks.kinds.permits
            };
            match shares
                .get_mut(key)
                .and_then(|shares| shares.get_mut(&token))
            {
                Some(lease_end) if *lease_end > now => {
                    *lease_end = end;
                    true
                }
                _ => false,
            }
        })
    }
}

/// A reader: in when it holds a share already, or when there is neither a live writer
/// nor a live waiting-writer mark.
fn read(locks: &mut Locks, key: &LockKey, token: Uuid, now: Instant, end: Instant) -> Acquire {
    let kinds = &mut locks.kinds;
    let writer = live_lease(&kinds.writers, key, now).map(|lease| lease.expires_at);
    let waiting = live_lease(&kinds.writer_waiting, key, now).map(|mark| mark.expires_at);
    let shares = live(&mut kinds.readers, key, now);
    if shares.contains_key(&token) || (writer.is_none() && waiting.is_none()) {
        shares.insert(token, end);
        return Acquire::Acquired {
            fencing_token: None,
        };
    }
    Acquire::Held {
        remaining: writer.or(waiting).map(|until| until - now),
    }
}
