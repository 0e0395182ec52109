//! Idempotency keys (DESIGN §8), after the IETF `Idempotency-Key` header draft: a
//! request runs at most once per key, and retries get its answer again.
//!
//! [`IdempotencyLayer`] (with the `axum` feature) does it for a route; the records are
//! kept in a [`ResponseStore`], which both backends are. See the layer's docs for what
//! "at most once" means under each fault.

#[cfg(feature = "axum")]
mod layer;
mod memory_store;
#[cfg(feature = "redis")]
mod redis_store;
#[cfg(feature = "axum")]
pub(crate) mod request;
#[cfg(feature = "axum")]
pub(crate) mod response;
#[cfg(feature = "axum")]
mod service;
pub(crate) mod store;

pub(crate) use self::memory_store::MemoryRecords;
pub use self::store::{Finished, Record, RecordState, ResponseStore, StoredResponse, Unreplayable};
#[cfg(feature = "axum")]
pub use self::{
    layer::{IDEMPOTENT_REPLAYED, IdempotencyLayer},
    service::Idempotency,
};

/// A request extension that [`IdempotencyLayer`] sets before it calls the handler: the
/// request's idempotency key, decoded, and the caller it is scoped to. A handler can
/// derive its own ids from it (an order id), so that a repeated run is a no-op even
/// where the layer allowed one ([`Retryable`] answers).
///
/// With the `axum` feature, `Option<IdempotencyKey>` is an extractor (it never rejects).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdempotencyKey {
    pub(crate) key: String,
    pub(crate) principal: String,
}

impl IdempotencyKey {
    /// The key, as the client sent it (quotes and escapes decoded).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The caller the key is scoped to; empty for keys shared by all callers.
    pub fn principal(&self) -> &str {
        &self.principal
    }
}

/// A response extension saying "a retry with the same key may run the handler again":
/// the answer was given before the work started (the lock layer's rejections carry it,
/// but for a lock lost while the handler ran), or the work is itself idempotent. [`IdempotencyLayer`] then keeps nothing and
/// frees the key, instead of replaying the answer.
///
/// ```
/// use http::{Response, StatusCode};
/// use tower_redis_lock::idempotency::Retryable;
///
/// fn shed() -> Response<String> {
///     let mut response = Response::new("too many requests; retry shortly".to_owned());
///     *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
///     response.extensions_mut().insert(Retryable);
///     response
/// }
/// # let _ = shed();
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Retryable;
