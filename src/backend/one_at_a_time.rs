//! Several keys at once on any backend: one key at a time in the callers' global order,
//! all or nothing (the defaults of `LockBackend::try_acquire_many` and its siblings, and
//! what a Redis Cluster does when the keys live in different slots).

use std::time::Duration;

use uuid::Uuid;

use super::{Acquire, BackendError, LockBackend, Released};
use crate::key::LockKey;

/// Takes `keys` in order; on the first refusal or failure, releases those taken and
/// answers with it. Nobody waits while holding a key, so overlapping sets never deadlock.
pub(super) async fn acquire<B: LockBackend>(
    backend: &B,
    keys: &[LockKey],
    token: Uuid,
    ttl: Duration,
) -> Result<Acquire, BackendError> {
    let mut taken = 0;
    let mut refusal = None;
    for key in keys {
        match backend.try_acquire(key, token, ttl).await {
            Ok(Acquire::Acquired { .. }) => taken += 1,
            other => {
                refusal = Some(other);
                break;
            }
        }
    }
    let Some(refusal) = refusal else {
        // One token for several counters: no single fencing token fits them all.
        return Ok(Acquire::Acquired {
            fencing_token: None,
        });
    };
    for key in &keys[..taken] {
        // Best effort: what is not released here ends with its lease, and the caller's
        // guard releases the whole set again.
        if let Err(err) = backend.release(key, token).await {
            tracing::debug!(%key, error = %err, "undoing part of a several-keys attempt failed");
        }
    }
    refusal
}

/// Releases each key `token` holds; `was_held` when it held them all.
pub(super) async fn release<B: LockBackend>(
    backend: &B,
    keys: &[LockKey],
    token: Uuid,
) -> Result<Released, BackendError> {
    let mut all = Released::new(true);
    let mut failure = None;
    for key in keys {
        match backend.release(key, token).await {
            Ok(released) => {
                all.was_held &= released.was_held;
                all.notified += released.notified;
                all.unnotified_waiters |= released.unnotified_waiters;
            }
            Err(err) => failure = Some(err),
        }
    }
    failure.map_or(Ok(all), Err)
}

/// Extends each key; `true` when `token` held them all.
pub(super) async fn extend<B: LockBackend>(
    backend: &B,
    keys: &[LockKey],
    token: Uuid,
    ttl: Duration,
) -> Result<bool, BackendError> {
    let mut all = true;
    for key in keys {
        all &= backend.extend(key, token, ttl).await?;
    }
    Ok(all)
}
