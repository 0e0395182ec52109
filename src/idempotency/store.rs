//! Where idempotent responses are kept: the [`ResponseStore`] trait.

use std::{future::Future, time::Duration};

use bytes::Bytes;

use crate::{backend::BackendError, key::LockKey};

/// A response kept for replay, with the fingerprint of the request that produced it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredResponse {
    /// SHA-256 of the request's method, path and body, in hex.
    pub fingerprint: String,
    /// The response's status code.
    pub status: u16,
    /// The headers kept with it (the layer chooses which).
    pub headers: Vec<(String, String)>,
    /// The response body.
    pub body: Bytes,
}

/// Keeps responses by idempotency key, with an expiry. Implemented by
/// [`RedisBackend`](crate::RedisBackend), which stores them beside the key's lock in the
/// same Cluster hash slot, and by [`InMemoryBackend`](crate::InMemoryBackend).
pub trait ResponseStore: Clone + Send + Sync + 'static {
    /// The response kept under `key`, if any and not expired.
    fn load(
        &self,
        key: &LockKey,
    ) -> impl Future<Output = Result<Option<StoredResponse>, BackendError>> + Send;

    /// Keeps `response` under `key` for `ttl`, replacing any earlier one.
    fn store(
        &self,
        key: &LockKey,
        response: &StoredResponse,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;
}
