//! Stored responses read back from Redis: any bytes decode to headers or to `None`
//! (never a panic), whatever decodes survives an encode and decode, and a record
//! with any status, headers and body replays without a panic.

#![no_main]

use std::time::Duration;

use arbitrary::Arbitrary;
use bytes::Bytes;
use http::{StatusCode, header};
use libfuzzer_sys::fuzz_target;
use tower_redis_lock::{
    __fuzz::idempotency::{decode_headers, encode_headers, from_record},
    idempotency::{Record, RecordState, StoredResponse},
};

#[derive(Arbitrary, Debug)]
struct Input {
    headers: Vec<u8>,
    status: u16,
    body: Vec<u8>,
    same_fingerprint: bool,
}

fuzz_target!(|input: Input| {
    let Some(headers) = decode_headers(&input.headers) else {
        return;
    };
    // What decoded survives a round trip (the bytes may differ: names are normalised to
    // lower case, and a map groups the values of one name).
    let encoded = encode_headers(&headers);
    assert_eq!(decode_headers(&encoded).as_ref(), Some(&headers));

    let record = Record {
        fingerprint: "a".repeat(64),
        state: RecordState::Complete(StoredResponse {
            status: input.status,
            headers: headers.clone(),
            body: Bytes::from(input.body),
        }),
    };
    let fingerprint = if input.same_fingerprint {
        "a".repeat(64)
    } else {
        "b".repeat(64)
    };
    let response = from_record(record, &fingerprint, Duration::from_secs(1));
    if input.same_fingerprint {
        let status =
            StatusCode::from_u16(input.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(response.status(), status);
        assert_eq!(response.headers()["idempotent-replayed"], "true");
    } else {
        assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
    }
});
