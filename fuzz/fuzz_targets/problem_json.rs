//! The problem+json rejection bodies: valid JSON for any status, detail and retry hint,
//! with the detail intact and `Retry-After` a whole number of seconds, at least 1.

#![no_main]

use std::time::Duration;

use arbitrary::Arbitrary;
use http::{StatusCode, header};
use libfuzzer_sys::fuzz_target;
use tower_redis_lock::__fuzz::{problem, retry_after_secs};

#[derive(Arbitrary, Debug)]
struct Input {
    status: u16,
    detail: String,
    retry_after: Option<(u64, u32)>,
}

fuzz_target!(|input: Input| {
    let Ok(status) = StatusCode::from_u16(input.status) else {
        return;
    };
    let retry_after = input
        .retry_after
        .map(|(secs, nanos)| Duration::new(secs, nanos % 1_000_000_000));
    let response = problem(status, &input.detail, retry_after);
    assert_eq!(response.status(), status);
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "application/problem+json"
    );
    let body: serde_json::Value =
        serde_json::from_slice(response.body()).expect("the body is JSON");
    assert_eq!(body["status"], u64::from(status.as_u16()));
    assert_eq!(body["type"], "about:blank");
    assert!(body["title"].is_string());
    let detail = body["detail"].as_str().expect("a string detail");
    assert!(
        detail.starts_with(&input.detail),
        "the detail is kept whole"
    );
    match retry_after {
        Some(after) => {
            let secs = retry_after_secs(after);
            assert!(
                secs >= 1 && Duration::from_secs(secs) >= after.min(Duration::from_secs(u64::MAX))
            );
            let header = response.headers()[header::RETRY_AFTER].to_str().unwrap();
            assert_eq!(header.parse::<u64>().ok(), Some(secs));
        }
        None => assert!(response.headers().get(header::RETRY_AFTER).is_none()),
    }
});
