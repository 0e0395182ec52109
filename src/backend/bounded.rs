//! A release awaited for at most a given time, with a timer of the locker's own only when
//! the backend does not bound it as tightly itself.
//!
//! Every [`LockBackend`] bounds its operations, and [`RedisBackend`](super::RedisBackend)
//! bounds each round trip on its shared connection by its command timeout. A release
//! timer on top of that costs the common path twice: the timer, and (when it is due
//! before the runtime's other timers) a wake of a parked worker thread to re-arm its
//! clock. So a release whose wait is no shorter than the Redis command timeout goes
//! without one, found here by the backend's type as in `wake`.

use std::time::Duration;

use uuid::Uuid;

use super::{BackendError, LockBackend, Released};
use crate::key::LockKey;

/// Releases `key` held by `token`, waiting at most `timeout` for the answer; `None` when
/// none came in time. On [`RedisBackend`](super::RedisBackend) with a command timeout no
/// longer than `timeout`, the command timeout is the bound (per round trip: a release
/// that must first load its script into a restarted server makes three).
pub(crate) async fn release_within<B: LockBackend>(
    backend: &B,
    key: &LockKey,
    token: Uuid,
    timeout: Duration,
) -> Option<Result<Released, BackendError>> {
    #[cfg(feature = "redis")]
    {
        let any: &dyn std::any::Any = backend;
        if any
            .downcast_ref::<super::RedisBackend>()
            .is_some_and(|redis| redis.bounds_release_within(timeout))
        {
            return Some(backend.release(key, token).await);
        }
    }
    tokio::time::timeout(timeout, backend.release(key, token))
        .await
        .ok()
}
