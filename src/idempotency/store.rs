//! Where idempotency records are kept: the [`ResponseStore`] trait and what it stores.

use std::{future::Future, time::Duration};

use bytes::Bytes;
#[cfg(feature = "redis")]
use bytes::{Buf, BufMut, BytesMut};
use http::HeaderMap;
#[cfg(feature = "redis")]
use http::{HeaderName, HeaderValue};
use uuid::Uuid;

use crate::{backend::BackendError, key::LockKey};

/// A response kept for replay: status, headers (as bytes) and body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredResponse {
    /// The response's status code.
    pub status: u16,
    /// The headers kept with it (the layer chooses which).
    pub headers: HeaderMap,
    /// The response body.
    pub body: Bytes,
}

/// Why the first answer under a key cannot be replayed, though its request ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Unreplayable {
    /// The body was larger than the layer keeps, or of unknown size (a stream).
    TooLarge,
    /// The body failed while it was read.
    BodyFailed,
    /// The handler panicked.
    Panicked,
}

impl Unreplayable {
    /// The name stored in a record.
    pub fn as_str(self) -> &'static str {
        match self {
            Unreplayable::TooLarge => "too-large",
            Unreplayable::BodyFailed => "body-failed",
            Unreplayable::Panicked => "panicked",
        }
    }

    /// The reason named `name`, as stored by [`as_str`](Self::as_str).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "too-large" => Some(Unreplayable::TooLarge),
            "body-failed" => Some(Unreplayable::BodyFailed),
            "panicked" => Some(Unreplayable::Panicked),
            _ => None,
        }
    }
}

/// How the first request under a key ended, as far as the record knows.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RecordState {
    /// It started and has recorded no answer yet.
    Pending {
        /// Whether its owner still holds the key's lock (it is running). When not, it
        /// stopped without recording its answer (lost its lock, failed to store, crashed),
        /// or has yet to write it after a lost lease.
        owner_alive: bool,
    },
    /// It finished and its answer is kept.
    Complete(StoredResponse),
    /// It ran, and its answer cannot be replayed (a tombstone).
    Unreplayable(Unreplayable),
}

/// What is kept under one idempotency key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// SHA-256 of the request that made it (method, path with query, body), in hex.
    pub fingerprint: String,
    /// How that request ended.
    pub state: RecordState,
}

/// The end of a request under a key, written by [`ResponseStore::finish`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Finished {
    /// Its answer, for replay.
    Complete(StoredResponse),
    /// It ran; its answer cannot be replayed.
    Unreplayable(Unreplayable),
}

/// Keeps idempotency records by key, with an expiry. Implemented by
/// [`RedisBackend`](crate::RedisBackend), which stores them beside the key's lock in the
/// same Cluster hash slot, and by [`InMemoryBackend`](crate::InMemoryBackend).
///
/// A record is created *pending* when its first request starts ([`begin`](Self::begin),
/// set-if-absent) and ends *complete* or *unreplayable* ([`finish`](Self::finish), only
/// by the owner that began it), so that no second request ever runs under a key whose
/// record exists.
pub trait ResponseStore: Clone + Send + Sync + 'static {
    /// The record under `key`, if any and not expired.
    fn load(
        &self,
        key: &LockKey,
    ) -> impl Future<Output = Result<Option<Record>, BackendError>> + Send;

    /// Creates a pending record under `key` for `owner` (the token of its lock) and
    /// `fingerprint`, expiring after `ttl`, unless a record exists. Returns whether it
    /// created one.
    fn begin(
        &self,
        key: &LockKey,
        owner: Uuid,
        fingerprint: &str,
        ttl: Duration,
    ) -> impl Future<Output = Result<bool, BackendError>> + Send;

    /// Ends the pending record under `key` with `finished`, expiring after `ttl`, if it is
    /// still `owner`'s and pending (one atomic step). Returns whether it did.
    fn finish(
        &self,
        key: &LockKey,
        owner: Uuid,
        finished: &Finished,
        ttl: Duration,
    ) -> impl Future<Output = Result<bool, BackendError>> + Send;

    /// Deletes the pending record under `key` if it is still `owner`'s: its answer says
    /// the work did not run, and a retry may run it. Returns whether it did.
    fn forget(
        &self,
        key: &LockKey,
        owner: Uuid,
    ) -> impl Future<Output = Result<bool, BackendError>> + Send;
}

/// Headers as bytes (for the Redis record): for each, the name's length (u32), the name, the value's length, the
/// value.
#[cfg(feature = "redis")]
pub(crate) fn encode_headers(headers: &HeaderMap) -> Bytes {
    let mut out = BytesMut::new();
    for (name, value) in headers {
        for part in [name.as_str().as_bytes(), value.as_bytes()] {
            out.put_u32(u32::try_from(part.len()).unwrap_or(u32::MAX));
            out.put_slice(part);
        }
    }
    out.freeze()
}

/// The headers [`encode_headers`] wrote; `None` if the bytes are not such.
#[cfg(feature = "redis")]
pub(crate) fn decode_headers(mut bytes: &[u8]) -> Option<HeaderMap> {
    fn part<'a>(bytes: &mut &'a [u8]) -> Option<&'a [u8]> {
        if bytes.remaining() < 4 {
            return None;
        }
        let len = usize::try_from(bytes.get_u32()).ok()?;
        let (part, rest) = bytes.split_at_checked(len)?;
        *bytes = rest;
        Some(part)
    }
    let mut headers = HeaderMap::new();
    while !bytes.is_empty() {
        let name = HeaderName::from_bytes(part(&mut bytes)?).ok()?;
        let value = HeaderValue::from_bytes(part(&mut bytes)?).ok()?;
        headers.append(name, value);
    }
    Some(headers)
}

#[cfg(all(test, feature = "redis"))]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_as_bytes() {
        let mut headers = HeaderMap::new();
        headers.append("link", HeaderValue::from_static("</a>"));
        headers.append("link", HeaderValue::from_static("</b>"));
        headers.insert("x-name", HeaderValue::from_bytes(b"caf\xe9").unwrap());
        let decoded = decode_headers(&encode_headers(&headers)).unwrap();
        assert_eq!(decoded, headers);
        assert!(decode_headers(&[0, 0, 0, 9, b'x']).is_none());
        assert_eq!(decode_headers(&[]).unwrap(), HeaderMap::new());
    }
}
