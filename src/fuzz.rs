//! Crate-private functions for the fuzz targets in `fuzz/`, and nothing else.
//!
//! Built only under `--cfg fuzzing`, which `cargo fuzz` sets; hidden from the docs and
//! absent from every ordinary build, so none of this is public API.

use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode};

/// [`crate::rejection::problem`]: a problem+json answer.
pub fn problem(status: StatusCode, detail: &str, retry_after: Option<Duration>) -> Response<Bytes> {
    crate::rejection::problem(status, detail, retry_after)
}

/// [`crate::rejection::retry_after_secs`]: `Retry-After` in whole seconds.
pub fn retry_after_secs(after: Duration) -> u64 {
    crate::rejection::retry_after_secs(after)
}

/// The Redis key of lock `key` with `suffix` under a backend with key prefix `prefix`
/// (which must hold no brace): as the backend names it, and as it writes it into a
/// script's arguments.
#[cfg(feature = "redis")]
pub fn redis_key(prefix: &str, key: &str, suffix: &'static str) -> (String, Vec<u8>) {
    use std::sync::LazyLock;

    use deadpool_redis::{Config, Pool, Runtime};

    // A pool connects on first use only, and these backends are never used.
    static POOL: LazyLock<Pool> = LazyLock::new(|| {
        Config::from_url("redis://127.0.0.1:1")
            .create_pool(Some(Runtime::Tokio1))
            .expect("a pool for a well-formed URL")
    });
    let backend = crate::RedisBackend::new(POOL.clone()).key_prefix(prefix);
    backend.fuzz_key(&crate::LockKey::from(key), suffix)
}

/// The idempotency layer's request and record functions.
#[cfg(feature = "idempotency")]
pub mod idempotency {
    use std::time::Duration;

    use axum::body::Body;
    use bytes::Bytes;
    use http::{HeaderMap, HeaderName, Response, request::Parts};

    use crate::{LockKey, idempotency::Record};

    /// [`crate::idempotency::request::idempotency_key`]: the key a request names.
    pub fn idempotency_key(
        parts: &Parts,
        header: &HeaderName,
    ) -> Result<Option<String>, &'static str> {
        crate::idempotency::request::idempotency_key(parts, header)
    }

    /// [`crate::idempotency::request::fingerprint`]: what makes two requests the same.
    pub fn fingerprint(parts: &Parts, body: &Bytes) -> String {
        crate::idempotency::request::fingerprint(parts, body)
    }

    /// [`crate::idempotency::request::record_key`]: the lock and record of a key.
    pub fn record_key(scope: &str, principal: &str, key: &str) -> LockKey {
        crate::idempotency::request::record_key(scope, principal, key)
    }

    /// [`crate::idempotency::response::from_record`]: the answer a record gives.
    pub fn from_record(record: Record, fingerprint: &str, retry_after: Duration) -> Response<Body> {
        crate::idempotency::response::from_record(record, fingerprint, retry_after)
    }

    /// [`crate::idempotency::store::encode_headers`]: headers as a Redis record keeps them.
    #[cfg(feature = "redis")]
    pub fn encode_headers(headers: &HeaderMap) -> Bytes {
        crate::idempotency::store::encode_headers(headers)
    }

    /// [`crate::idempotency::store::decode_headers`]: a record's headers read back.
    #[cfg(feature = "redis")]
    pub fn decode_headers(bytes: &[u8]) -> Option<HeaderMap> {
        crate::idempotency::store::decode_headers(bytes)
    }
}
