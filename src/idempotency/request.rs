//! What the layer reads from a request: the key, the body, the fingerprint, the record's
//! name.

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderName, StatusCode, header, request::Parts};
use sha2::{Digest, Sha256};

use super::{IdempotencyKey, response::problem_response};
use crate::key::LockKey;

/// `Option<IdempotencyKey>`: the request's key, on routes behind an `IdempotencyLayer`.
impl<S: Send + Sync> axum::extract::OptionalFromRequestParts<S> for IdempotencyKey {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        _state: &S,
    ) -> Result<Option<Self>, Self::Rejection> {
        Ok(parts.extensions.get::<IdempotencyKey>().cloned())
    }
}

/// The longest idempotency key accepted.
const MAX_KEY_LEN: usize = 255;

/// The key from `header`: one header only, 1 to 255 characters after decoding. Either a
/// structured-field string (`"..."`, with `\"` and `\\` escapes, as the draft says) or,
/// leniently, a bare run of visible ASCII characters that does not start with `"`.
pub(crate) fn idempotency_key(
    parts: &Parts,
    header: &HeaderName,
) -> Result<Option<String>, &'static str> {
    let mut values = parts.headers.get_all(header).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err("send one idempotency key header, not several");
    }
    let raw = value.as_bytes();
    let key = match raw.strip_prefix(b"\"") {
        Some(quoted) => decode_sf_string(quoted)?,
        None if raw.iter().all(|byte| (0x21..=0x7e).contains(byte)) => {
            String::from_utf8_lossy(raw).into_owned()
        }
        None => return Err("the idempotency key must be visible ASCII"),
    };
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err("the idempotency key must be 1 to 255 characters");
    }
    Ok(Some(key))
}

/// The content of a structured-field string after its opening quote (RFC 8941 §4.2.5).
fn decode_sf_string(quoted: &[u8]) -> Result<String, &'static str> {
    const BAD: &str = "the quoted idempotency key is malformed (only \\\" and \\\\ escapes, \
                       printable ASCII, one closing quote at the end)";
    let mut key = String::with_capacity(quoted.len());
    let mut bytes = quoted.iter();
    while let Some(&byte) = bytes.next() {
        match byte {
            b'\\' => match bytes.next() {
                Some(&escaped @ (b'"' | b'\\')) => key.push(char::from(escaped)),
                _ => return Err(BAD),
            },
            b'"' if bytes.as_slice().is_empty() => return Ok(key),
            0x20..=0x7e if byte != b'"' => key.push(char::from(byte)),
            _ => return Err(BAD),
        }
    }
    Err(BAD) // no closing quote
}

/// Reads the request body, at most `max` bytes: 413 beyond, 400 if it fails.
pub(super) async fn read_body(
    parts: &Parts,
    body: Body,
    max: usize,
) -> Result<Bytes, http::Response<Body>> {
    let too_large = || {
        let detail = format!("the body is over {max} bytes");
        problem_response(StatusCode::PAYLOAD_TOO_LARGE, &detail, None)
    };
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|length| length > max as u64) {
        return Err(too_large());
    }
    axum::body::to_bytes(body, max).await.map_err(|err| {
        let over = std::error::Error::source(&err)
            .is_some_and(|source| source.is::<http_body_util::LengthLimitError>());
        if over {
            too_large()
        } else {
            problem_response(StatusCode::BAD_REQUEST, "the body could not be read", None)
        }
    })
}

/// The name of a key's lock and record: a hash of route, principal and key, so that no
/// combination of them can spell another's, and braces in a route (`/items/{sku}`) do not
/// pick the Cluster hash slot for every key of the route.
pub(crate) fn record_key(scope: &str, principal: &str, key: &str) -> LockKey {
    let mut hash = Sha256::new();
    for part in [scope, principal, key] {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part);
    }
    LockKey::from(format!("idem:{}", hex(&hash.finalize())))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// SHA-256 of method, path with query, and body, as raw bytes: what makes two requests
/// "the same". JSON with its keys in another order, or a query with its parameters in
/// another order, is another request.
pub(crate) fn fingerprint(parts: &Parts, body: &Bytes) -> String {
    let mut hash = Sha256::new();
    for part in [
        parts.method.as_str().as_bytes(),
        parts
            .uri
            .path_and_query()
            .map_or("", |p| p.as_str())
            .as_bytes(),
        body,
    ] {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part);
    }
    hex(&hash.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_of(values: &[&[u8]]) -> Result<Option<String>, &'static str> {
        let mut request = http::Request::builder();
        for value in values {
            request = request.header("idempotency-key", *value);
        }
        let (parts, ()) = request.body(()).unwrap().into_parts();
        idempotency_key(&parts, &HeaderName::from_static("idempotency-key"))
    }

    #[test]
    fn keys_are_structured_field_strings_or_bare_tokens() {
        assert_eq!(key_of(&[]), Ok(None));
        assert_eq!(key_of(&[b"abc"]), Ok(Some("abc".into())));
        assert_eq!(key_of(&[br#""a b""#]), Ok(Some("a b".into())));
        assert_eq!(key_of(&[br#""a\"b\\c""#]), Ok(Some(r#"a"b\c"#.into())));
        for bad in [
            &br#""a\b""#[..],
            br#""a"b""#,
            br#""open"#,
            br#""""#,
            b"caf\xc3\xa9",
        ] {
            assert!(key_of(&[bad]).is_err(), "{bad:?}");
        }
        assert!(key_of(&[b"a", b"b"]).is_err());
        assert!(key_of(&[&[b'k'; 256]]).is_err());
    }
}
