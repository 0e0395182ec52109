#![cfg_attr(all(feature = "redis", feature = "axum"), doc = include_str!("../README.md"))]
#![cfg_attr(
    not(all(feature = "redis", feature = "axum")),
    doc = "Per-request distributed locks for tower and axum services. See README.md."
)]
#![forbid(unsafe_code)]
#![warn(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    clippy::await_holding_lock
)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod acquire;
pub mod backend;
mod config;
mod future;
mod guard;
pub mod idempotency;
mod key;
mod layer;
mod locker;
mod observe;
mod queue;
mod rejection;
mod service;
mod watchdog;

#[cfg(feature = "axum")]
mod extract;

pub use crate::{
    backend::{Acquire, BackendError, InMemoryBackend, LockBackend, Released},
    config::{
        DEFAULT_BACKOFF_BASE, DEFAULT_BACKOFF_MAX, DEFAULT_MAX_HAND_OFFS, DEFAULT_MAX_KEY_LEN,
        DEFAULT_MAX_WAIT, DEFAULT_RELEASE_TIMEOUT, DEFAULT_RETRY_AFTER, DEFAULT_TTL, FailMode,
        LossPolicy, MissingKey,
    },
    future::ResponseFuture,
    guard::Held,
    key::{HeaderKey, LockKey, MakeLockKey, QueryParam},
    layer::LockLayer,
    locker::{Locker, OwnedLock},
    rejection::{InvalidKey, LockRejection, retry_after_secs},
    service::Lock,
};

#[cfg(feature = "redis")]
pub use crate::backend::{RedisBackend, RedlockBackend};

#[cfg(feature = "axum")]
pub use crate::{extract::MissingLock, key::PathParam};

/// The deadpool-redis crate this one is built against, for pools of matching versions.
#[cfg(feature = "redis")]
pub use deadpool_redis;

/// The README's examples, compiled as doc-tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
