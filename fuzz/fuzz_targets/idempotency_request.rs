//! The idempotency layer's reading of a request: the `Idempotency-Key` header (a
//! structured-field string or a bare token), the request fingerprint, and the record key.
//! Distinct requests never share a fingerprint, distinct (route, principal, key) never
//! share a record, and a key that is accepted is exactly what the header spelled.

#![no_main]

use arbitrary::Arbitrary;
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, request::Parts};
use libfuzzer_sys::fuzz_target;
use tower_redis_lock::__fuzz::idempotency::{fingerprint, idempotency_key, record_key};

#[derive(Arbitrary, Debug)]
struct Req {
    method: Vec<u8>,
    uri: Vec<u8>,
    body: Vec<u8>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    header: Vec<u8>,
    second_header: Option<Vec<u8>>,
    key_text: String,
    a: Req,
    b: Req,
    record_a: (String, String, String),
    record_b: (String, String, String),
}

const HEADER: HeaderName = HeaderName::from_static("idempotency-key");

fn parts(req: &Req) -> Parts {
    let method = Method::from_bytes(&req.method).unwrap_or(Method::POST);
    let uri = http::uri::PathAndQuery::try_from(req.uri.as_slice())
        .map_or_else(|_| http::Uri::from_static("/"), http::Uri::from);
    let mut parts = Request::new(()).into_parts().0;
    parts.method = method;
    parts.uri = uri;
    parts
}

/// A structured-field string: the one way to write `key` (only `\"` and `\\` escape).
fn sf_string(key: &str) -> String {
    let mut out = String::from("\"");
    for c in key.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

fuzz_target!(|input: Input| {
    // Whatever the header, an accepted key is 1..=255 printable ASCII characters and is
    // what the header said: the bare token itself, or the quoted string unescaped.
    let mut p = parts(&input.a);
    if let Ok(value) = HeaderValue::from_bytes(&input.header) {
        p.headers.insert(HEADER, value);
        if let Some(second) = input.second_header.as_deref()
            && let Ok(second) = HeaderValue::from_bytes(second)
        {
            p.headers.append(HEADER, second);
        }
    }
    let several = p.headers.get_all(HEADER).iter().count() > 1;
    match idempotency_key(&p, &HEADER) {
        Ok(Some(key)) => {
            assert!(!several, "several headers must be refused");
            assert!((1..=255).contains(&key.len()));
            assert!(key.bytes().all(|b| (0x20..=0x7e).contains(&b)));
            let raw = p.headers[HEADER].as_bytes();
            if raw.first() == Some(&b'"') {
                assert_eq!(sf_string(&key).as_bytes(), raw);
            } else {
                assert_eq!(key.as_bytes(), raw);
            }
        }
        Ok(None) => assert!(p.headers.get(HEADER).is_none()),
        Err(_) => {}
    }

    // Any printable key written as a structured-field string reads back as itself.
    let text: String = input
        .key_text
        .chars()
        .filter(|c| (' '..='~').contains(c))
        .collect();
    if (1..=255).contains(&text.len()) {
        let mut p = parts(&input.a);
        p.headers
            .insert(HEADER, HeaderValue::from_str(&sf_string(&text)).unwrap());
        assert_eq!(idempotency_key(&p, &HEADER), Ok(Some(text)));
    }

    // Fingerprints: equal exactly when method, path-and-query and body are.
    let (pa, pb) = (parts(&input.a), parts(&input.b));
    let same = pa.method == pb.method
        && pa.uri.path_and_query().map(|p| p.as_str())
            == pb.uri.path_and_query().map(|p| p.as_str())
        && input.a.body == input.b.body;
    let fa = fingerprint(&pa, &Bytes::from(input.a.body.clone()));
    let fb = fingerprint(&pb, &Bytes::from(input.b.body.clone()));
    assert_eq!(fa.len(), 64);
    assert_eq!(fa == fb, same);

    // Record keys: equal exactly when route, principal and key are.
    let (s, p, k) = &input.record_a;
    let ra = record_key(s, p, k);
    let (s, p, k) = &input.record_b;
    let rb = record_key(s, p, k);
    assert!(
        !ra.as_str().contains(['{', '}']),
        "no braces to move the hash tag"
    );
    assert_eq!(ra == rb, input.record_a == input.record_b);
});
