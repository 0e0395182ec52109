//! What the layer answers from a record, and which response headers a record keeps.

use std::time::Duration;

use axum::body::Body;
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode, header};

use super::{
    layer::IDEMPOTENT_REPLAYED,
    store::{Record, RecordState, StoredResponse, Unreplayable},
};
use crate::rejection::problem;

/// A short problem+json answer with an axum body.
pub(super) fn problem_response(
    status: StatusCode,
    detail: &str,
    retry_after: Option<Duration>,
) -> Response<Body> {
    problem(status, detail, retry_after).map(Body::from)
}

/// 409: the first request under the key still runs.
pub(super) fn in_progress(retry_after: Duration) -> Response<Body> {
    let detail = "a request with this idempotency key is still being processed";
    problem_response(StatusCode::CONFLICT, detail, Some(retry_after))
}

/// 503: the store could not be asked.
pub(super) fn unavailable(retry_after: Duration) -> Response<Body> {
    let detail = "the idempotency store is unavailable";
    problem_response(StatusCode::SERVICE_UNAVAILABLE, detail, Some(retry_after))
}

/// The answer a record gives a request with `fingerprint`.
pub(crate) fn from_record(
    record: Record,
    fingerprint: &str,
    retry_after: Duration,
) -> Response<Body> {
    if record.fingerprint != fingerprint {
        let detail = "this idempotency key was used with a different request";
        return problem_response(StatusCode::UNPROCESSABLE_ENTITY, detail, None);
    }
    match record.state {
        RecordState::Pending { owner_alive: true } => in_progress(retry_after),
        RecordState::Pending { owner_alive: false } => {
            let detail = "the first request with this idempotency key stopped without \
                          recording its answer, so its outcome is unknown; it will not run \
                          again under this key";
            problem_response(StatusCode::CONFLICT, detail, Some(retry_after))
        }
        RecordState::Complete(stored) => replay(stored),
        RecordState::Unreplayable(reason) => {
            let why = match reason {
                Unreplayable::TooLarge => "its body was too large or streamed",
                Unreplayable::BodyFailed => "its body failed",
                Unreplayable::Panicked => "the handler panicked",
            };
            let detail = format!(
                "the first request with this idempotency key ran, but its answer cannot be \
                 replayed ({why}); it will not run again under this key"
            );
            problem_response(StatusCode::CONFLICT, &detail, None)
        }
    }
}

/// The kept answer again, marked as a replay.
fn replay(stored: StoredResponse) -> Response<Body> {
    let mut response = Response::new(Body::from(stored.body));
    *response.status_mut() =
        StatusCode::from_u16(stored.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    *response.headers_mut() = stored.headers;
    response
        .headers_mut()
        .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    response
}

/// Headers that belong to one connection or one transmission, never to a replay.
const HOP_BY_HOP: [HeaderName; 10] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::TE,
    header::TRAILER,
    header::PROXY_AUTHENTICATE,
    header::CONTENT_LENGTH,
    header::DATE,
];

/// The headers of `headers` a record keeps: all but hop-by-hop ones (and those the
/// `Connection` header names), `Content-Length` and `Date` (made anew), our own
/// `Idempotent-Replayed`, `Set-Cookie` unless `keep_cookies`, and `skipped`.
pub(super) fn kept_headers(
    headers: &HeaderMap,
    keep_cookies: bool,
    skipped: &[HeaderName],
) -> HeaderMap {
    let named_by_connection: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::try_from(name.trim()).ok())
        .collect();
    let mut kept = HeaderMap::new();
    for (name, value) in headers {
        let dropped = HOP_BY_HOP.contains(name)
            || named_by_connection.contains(name)
            || name == IDEMPOTENT_REPLAYED
            || (name == header::SET_COOKIE && !keep_cookies)
            || skipped.contains(name);
        if !dropped {
            kept.append(name.clone(), value.clone());
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_keep_end_to_end_headers_only() {
        let mut headers = HeaderMap::new();
        headers.insert(header::ETAG, HeaderValue::from_static("\"v1\""));
        headers.insert(header::CONNECTION, HeaderValue::from_static("close, x-hop"));
        headers.insert("x-hop", HeaderValue::from_static("1"));
        headers.insert(header::SET_COOKIE, HeaderValue::from_static("a=1"));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        headers.insert("x-secret", HeaderValue::from_static("s"));
        let skipped = [HeaderName::from_static("x-secret")];
        let kept = kept_headers(&headers, false, &skipped);
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[header::ETAG], "\"v1\"");
        assert!(kept_headers(&headers, true, &[]).contains_key(header::SET_COOKIE));
    }
}
