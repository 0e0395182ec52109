//! Key extraction from arbitrary request parts: `HeaderKey`, `QueryKey` and `PathKey`
//! (behind a real axum router) never panic, never give an empty key, and give back
//! exactly the value a client encoded.

#![no_main]

use std::{cell::RefCell, convert::Infallible};

use arbitrary::Arbitrary;
use axum::{Router, body::Body, routing::get};
use http::{HeaderName, HeaderValue, Request, request::Parts};
use libfuzzer_sys::fuzz_target;
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
use tower::ServiceExt;
use tower_redis_lock::{HeaderKey, LockKey, MakeLockKey, PathKey, QueryKey};

#[derive(Arbitrary, Debug)]
struct Input {
    /// A raw path and query, as a client may send it.
    raw: Vec<u8>,
    header_name: String,
    header_value: Vec<u8>,
    query_name: String,
    /// A value a well-behaved client encodes into the path and the query.
    value: String,
}

/// What a client must escape in one path segment (RFC 3986 `pchar`, conservatively).
const SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'`')
    .add(b'{')
    .add(b'}')
    .add(b'/')
    .add(b'%')
    .add(b'\\')
    .add(b'^')
    .add(b'|')
    .add(b'[')
    .add(b']');

thread_local! {
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    static ROUTER: RefCell<Router> = RefCell::new(
        Router::new().route(
            "/p/{id}",
            get(|mut parts: Parts| async move {
                PathKey::new("id")
                    .make_lock_key(&mut parts)
                    .map_or_else(|| "none".to_owned(), |key| format!("key:{key}"))
            }),
        ),
    );
}

/// The path key the router finds for `uri`: `Some(None)` for "no key", `None` when the
/// route did not match.
fn path_key(uri: &str) -> Option<Option<String>> {
    let request = Request::get(uri).body(Body::empty()).ok()?;
    let router = ROUTER.with(|router| router.borrow().clone());
    RUNTIME.with(|runtime| {
        runtime.block_on(async {
            let response = router
                .oneshot(request)
                .await
                .unwrap_or_else(|e: Infallible| match e {});
            if response.status() != 200 {
                return None;
            }
            let body = axum::body::to_bytes(response.into_body(), usize::MAX)
                .await
                .ok()?;
            let text = String::from_utf8(body.to_vec()).expect("a string answer");
            Some(text.strip_prefix("key:").map(str::to_owned))
        })
    })
}

fn parts_for(path_and_query: &[u8]) -> Option<Parts> {
    let uri = http::uri::PathAndQuery::try_from(path_and_query).ok()?;
    Some(
        Request::get(http::Uri::from(uri))
            .body(())
            .ok()?
            .into_parts()
            .0,
    )
}

fuzz_target!(|input: Input| {
    // Arbitrary parts: no panic, no empty key; a header key is the header's text.
    if let Some(mut parts) = parts_for(&input.raw) {
        if let (Ok(name), Ok(value)) = (
            HeaderName::try_from(input.header_name.as_str()),
            HeaderValue::from_bytes(&input.header_value),
        ) {
            parts.headers.insert(name.clone(), value.clone());
            let key = HeaderKey::new(name).make_lock_key(&mut parts);
            match (&key, value.to_str()) {
                (Some(key), Ok(text)) => assert_eq!(key.as_str(), text),
                (None, Ok(text)) => assert!(text.is_empty()),
                (Some(_), Err(_)) => panic!("a key from a header that is not text"),
                (None, Err(_)) => {}
            }
        }
        let query_key = QueryKey::new(input.query_name.as_str()).make_lock_key(&mut parts);
        assert!(query_key.is_none_or(|key| !key.is_empty()));
        // The raw request through the router: whatever it finds is not empty.
        if let Ok(text) = std::str::from_utf8(&input.raw)
            && let Some(Some(key)) = path_key(text)
        {
            assert!(!key.is_empty());
        }
    }

    // A value a client encoded comes back whole: in the query, and in the path.
    let encoded: String = url_encoded(&input.query_name, &input.value);
    let mut parts = parts_for(format!("/x?a=1&{encoded}&{encoded}x").as_bytes())
        .expect("an encoded query is a valid URI");
    let found = QueryKey::new(input.query_name.as_str()).make_lock_key(&mut parts);
    let expected = (!input.value.is_empty()).then(|| LockKey::from(input.value.as_str()));
    if input.query_name != "a" {
        assert_eq!(found, expected, "query {encoded:?}");
    }
    let segment = utf8_percent_encode(&input.value, SEGMENT).to_string();
    if !segment.is_empty() {
        let found = path_key(&format!("/p/{segment}")).expect("the route matches");
        assert_eq!(
            found.as_deref(),
            Some(input.value.as_str()),
            "segment {segment:?}"
        );
    }
});

fn url_encoded(name: &str, value: &str) -> String {
    let name: String = form_urlencoded_byte_serialize(name);
    format!("{name}={}", form_urlencoded_byte_serialize(value))
}

/// `application/x-www-form-urlencoded` text of `text`, as a browser writes it.
fn form_urlencoded_byte_serialize(text: &str) -> String {
    const FORM: &AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'*')
        .remove(b'-')
        .remove(b'.')
        .remove(b'_');
    utf8_percent_encode(text, FORM).to_string()
}
