//! [`ResponseStore`] on [`InMemoryBackend`]: records in a map beside the locks, with the
//! same semantics as the Redis scripts.

use std::{
    collections::HashMap,
    future::{Future, ready},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use tokio::time::Instant;
use uuid::Uuid;

use super::store::{Finished, Record, RecordState, ResponseStore};
use crate::{
    backend::{BackendError, InMemoryBackend},
    key::LockKey,
    lease::saturating_add,
};

/// The records of one [`InMemoryBackend`] and its clones.
#[derive(Clone, Debug, Default)]
pub(crate) struct MemoryRecords {
    inner: Arc<Mutex<Records>>,
}

#[derive(Debug, Default)]
struct Records {
    map: HashMap<LockKey, Entry>,
    /// Size of `map` after the last sweep of expired records (swept again once doubled).
    swept_at: usize,
}

#[derive(Debug)]
struct Entry {
    owner: Uuid,
    fingerprint: String,
    /// `None` while pending.
    finished: Option<Finished>,
    expires_at: Instant,
}

impl MemoryRecords {
    fn with<T>(&self, f: impl FnOnce(&mut Records, Instant) -> T) -> T {
        // Every mutation is a single map operation: a poisoned mutex is still sound.
        let mut records = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut records, Instant::now())
    }
}

impl Records {
    /// The live entry under `key`, dropping it if expired.
    fn live(&mut self, key: &LockKey, now: Instant) -> Option<&mut Entry> {
        if self
            .map
            .get(key)
            .is_some_and(|entry| entry.expires_at <= now)
        {
            self.map.remove(key);
        }
        self.map.get_mut(key)
    }
}

impl ResponseStore for InMemoryBackend {
    fn load(
        &self,
        key: &LockKey,
    ) -> impl Future<Output = Result<Option<Record>, BackendError>> + Send {
        let found = self.records.with(|records, now| {
            let entry = records.live(key, now)?;
            let state = match &entry.finished {
                None => RecordState::Pending {
                    owner_alive: false, // filled in below, outside the records' mutex
                },
                Some(Finished::Complete(response)) => RecordState::Complete(response.clone()),
                Some(Finished::Unreplayable(reason)) => RecordState::Unreplayable(*reason),
            };
            Some((entry.owner, entry.fingerprint.clone(), state))
        });
        let record = found.map(|(owner, fingerprint, mut state)| {
            if let RecordState::Pending { owner_alive } = &mut state {
                *owner_alive = self.holds(key, owner);
            }
            Record { fingerprint, state }
        });
        ready(Ok(record))
    }

    fn begin(
        &self,
        key: &LockKey,
        owner: Uuid,
        fingerprint: &str,
        ttl: Duration,
    ) -> impl Future<Output = Result<bool, BackendError>> + Send {
        let created = self.records.with(|records, now| {
            if records.live(key, now).is_some() {
                return false;
            }
            if records.map.len() >= 2 * records.swept_at.max(64) {
                records.map.retain(|_, entry| entry.expires_at > now);
                records.swept_at = records.map.len();
            }
            let entry = Entry {
                owner,
                fingerprint: fingerprint.to_owned(),
                finished: None,
                expires_at: saturating_add(now, ttl),
            };
            records.map.insert(key.clone(), entry);
            true
        });
        ready(Ok(created))
    }

    fn finish(
        &self,
        key: &LockKey,
        owner: Uuid,
        finished: &Finished,
        ttl: Duration,
    ) -> impl Future<Output = Result<bool, BackendError>> + Send {
        let written = self
            .records
            .with(|records, now| match records.live(key, now) {
                Some(entry) if entry.owner == owner && entry.finished.is_none() => {
                    entry.finished = Some(finished.clone());
                    entry.expires_at = saturating_add(now, ttl);
                    true
                }
                _ => false,
            });
        ready(Ok(written))
    }

    fn forget(
        &self,
        key: &LockKey,
        owner: Uuid,
    ) -> impl Future<Output = Result<bool, BackendError>> + Send {
        let deleted = self.records.with(|records, now| {
            let ours = records
                .live(key, now)
                .is_some_and(|entry| entry.owner == owner && entry.finished.is_none());
            if ours {
                records.map.remove(key);
            }
            ours
        });
        ready(Ok(deleted))
    }
}
