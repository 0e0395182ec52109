//! Per-request distributed locks for [tower] and [axum] services, on Redis.
//!
//! A [`LockLayer`] derives a lock key from each request (an order id in the path, a
//! header, a tenant…), takes the lock with a bounded wait before the inner service runs,
//! answers `409 Conflict` (or `423 Locked`) with `Retry-After` when the lock stays
//! contended, renews the lease while the handler runs, and releases the lock when the
//! response is ready or the request is dropped. Handlers see the lock through the
//! [`Held`] extractor; a [`Locker`] takes further locks inside a handler, for keys the
//! layer cannot know.
//!
//! # Quickstart
//!
//! ```
//! # #[cfg(feature = "axum")]
//! # async fn run() {
//! use std::time::Duration;
//! use axum::{Router, routing::post};
//! use tower_redis_lock::{Held, InMemoryBackend, LockLayer, PathKey};
//!
//! async fn pay(lock: Held) -> String {
//!     // Pass `lock.fencing_token()` to the storage you write (see `Held::fencing_token`).
//!     format!("paid under {}", lock.key())
//! }
//!
//! // `RedisBackend::from_url("redis://127.0.0.1:6379")?` in production; the in-process
//! // backend has the same semantics within one process.
//! let app: Router = Router::new()
//!     .route("/orders/{order_id}/pay", post(pay))
//!     .route_layer(
//!         LockLayer::new(InMemoryBackend::new(), PathKey::new("order_id"))
//!             .key_prefix("order:")
//!             .max_wait(Duration::from_millis(500)) // then 409 with Retry-After
//!             .ttl(Duration::from_secs(10)),         // renewed while `pay` runs
//!     );
//! # let _ = app;
//! # }
//! ```
//!
//! # A map of the crate
//!
//! | you want | use |
//! |---|---|
//! | lock each request of a route | [`LockLayer`] (built on a [`Locker`]: [`LockLayer::new`], [`Locker::layer`]) |
//! | the key from the path, a header, the query, or a closure | [`PathKey`], [`HeaderKey`], [`QueryKey`], any `Fn(&Parts) -> Option<K>` ([`MakeLockKey`], [`LockLayer::from_fn`]) |
//! | the lock inside the handler: key, tokens, lease, loss | [`Held`] (an axum extractor) |
//! | a lock taken inside a handler | [`Locker::lock`] → [`OwnedLock`] |
//! | at most N holders per key, readers and writers, several keys at once | [`LockLayer::permits`], [`LockLayer::read_write`], [`LockLayer::several_keys`] with [`KeySet`] ([`LockKind`], [`KindBackend`]) |
//! | what happens on contention, missing keys, failures, loss | [`LockRejection`], [`MissingKeyPolicy`], [`BackendErrorPolicy`], [`LossPolicy`] |
//! | where locks live | [`RedisBackend`] (one server or a Cluster), [`RedlockBackend`] (majority of independent servers), [`InMemoryBackend`] (one process); your own: [`LockBackend`] |
//! | waiters of all processes served first come, first served | [`Locker::fair`], [`LockLayer::fair`] (backends that implement [`FairBackend`]) |
//! | safe client retries | [`idempotency::IdempotencyLayer`] |
//!
//! # Guarantees and their conditions
//!
//! - Owner tokens are fresh UUIDs; release and extend are compare-and-act Lua scripts, so
//!   a holder never deletes or extends someone else's lock.
//! - The lease is tracked on the client's monotonic clock minus a drift margin (1 % of the
//!   ttl + 2 ms); past it the lock counts as lost even when Redis cannot be asked. Under
//!   [`LossPolicy::Abort`] the handler is dropped and the client gets 503.
//! - A lock alone cannot stop a holder that stalled past its lease from writing late:
//!   fencing tokens ([`Held::fencing_token`], [`RedisBackend::fencing`]) can, if the
//!   storage checks them.
//! - What the server must give (no eviction of keys with a TTL, durable counters and a
//!   clock that does not step back by more than the fence retention for fencing, hosts
//!   that are not suspended) is in the README's "What the environment must
//!   give"; the backend warns about eviction policies it sees.
//!
//! # Metrics and tracing
//!
//! Every locked request runs in a `lock` span (`key`, `class`, `outcome`, `wait_ms`). With
//! the `metrics` feature the crate records, labelled by class (by key only for the few
//! most contended keys, [`Locker::hot_keys`]):
//!
//! | metric | kind | labels |
//! |---|---|---|
//! | `lock_requests_total` | counter | `class`, `outcome` = acquired, contended, unavailable, no_key, invalid_key, already_held |
//! | `lock_lost_total` | counter | `class` |
//! | `lock_wait_seconds` | histogram | `class` |
//! | `lock_hold_seconds` | histogram | `class` |
//! | `lock_renewals_total` | counter | `result` = ok, failed |
//! | `lock_hand_offs_total` | counter | |
//! | `lock_hot_key_contentions` | gauge | `class`, `key` (the class's top 10 contended keys; 0 once a key drops out) |
//! | `lock_ttl_headroom` | gauge | `class`: ttl ÷ p99.9 hold |
//! | `lock_ttl_warnings_total` | counter | `class`, `reason` = hold_near_ttl, frequent_renewals |
//!
//! # Feature flags
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `redis` | yes | [`RedisBackend`], [`RedlockBackend`], over deadpool-redis |
//! | `cluster` | no | [`RedisBackend::cluster`], over a deadpool-redis Cluster pool |
//! | `axum` | yes | the [`Held`] and [`Locker`] extractors, [`PathKey`], `IntoResponse` for rejections |
//! | `idempotency` | yes | [`idempotency::IdempotencyLayer`] |
//! | `metrics` | yes | counters and histograms through the `metrics` facade |
//!
//! [tower]: https://docs.rs/tower
//! [axum]: https://docs.rs/axum

#![forbid(unsafe_code)]
#![warn(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    clippy::await_holding_lock
)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod backend;
mod held;
mod hot_keys;
#[cfg(feature = "idempotency")]
#[cfg_attr(docsrs, doc(cfg(feature = "idempotency")))]
pub mod idempotency;
mod key;
mod kind;
mod lease;
mod line;
mod locker;
mod middleware;
mod observe;
mod policy;
mod rejection;
mod ttl_advice;

#[cfg(fuzzing)]
#[doc(hidden)]
#[path = "fuzz.rs"]
pub mod __fuzz;

#[cfg(feature = "axum")]
mod extract;

pub use crate::{
    backend::{BackendError, FairBackend, InMemoryBackend, LockBackend},
    held::Held,
    hot_keys::HotKey,
    key::{HeaderKey, LockKey, MakeLockKey, QueryKey},
    kind::{KeySet, KindBackend, LockKind, LockMode},
    locker::{Locker, OwnedLock},
    middleware::{Lock, LockLayer, ReadWriteLayer, ReadWriteLock, ResponseFuture},
    policy::{BackendErrorPolicy, LossPolicy, MissingKeyPolicy},
    rejection::{InvalidKey, LockRejection},
};

#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use crate::backend::{RedisBackend, RedlockBackend};

#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
pub use crate::{extract::MissingLock, key::PathKey};

/// The deadpool-redis crate this one is built against, for pools of matching versions.
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use deadpool_redis;

/// The README's examples, compiled as doc-tests.
#[cfg(all(doctest, feature = "redis", feature = "axum", feature = "idempotency"))]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
