//! Idempotency keys (DESIGN §8), after the IETF `Idempotency-Key` header draft: a
//! request runs once per key, and retries get its answer again.
//!
//! [`IdempotencyLayer`] (with the `axum` feature) does it for a route; the answers are
//! kept in a [`ResponseStore`], which both backends are.

#[cfg(feature = "axum")]
mod layer;
mod store;

#[cfg(feature = "axum")]
pub use self::layer::{
    DEFAULT_MAX_REQUEST_BODY, DEFAULT_MAX_STORED_BODY, DEFAULT_RESPONSE_TTL, IDEMPOTENT_REPLAYED,
    Idempotency, IdempotencyLayer,
};
pub use self::store::{ResponseStore, StoredResponse};
