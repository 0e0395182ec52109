//! The answers the layer gives instead of calling the inner service.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use crate::{backend::BackendError, observe::Outcome};

/// Why a request did not reach the inner service.
///
/// Each kind becomes a short `application/problem+json` response (RFC 9457); a custom
/// answer can be set with [`LockLayer::rejection_response`](crate::LockLayer::rejection_response).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LockRejection {
    /// The lock was still held by another request when the wait ended.
    #[error("the resource is locked by another request")]
    #[non_exhaustive]
    Contended {
        /// The status to answer with: 409 by default, 423 when configured.
        status: StatusCode,
        /// When to try again: the smaller of the holder's remaining lease and the
        /// layer's hint.
        retry_after: Duration,
    },
    /// The key function found no key in the request.
    #[error("the request does not name the resource to lock")]
    MissingKey,
    /// The key was empty or too long.
    #[error("the lock key is {0}")]
    InvalidKey(InvalidKey),
    /// The lock was lost while the handler ran (under [`LossPolicy::Abort`](crate::LossPolicy::Abort)).
    #[error("{}", if *.expired {
        "the lock expired while the request was handled: it could not be renewed in time"
    } else {
        "the lock was taken away while the request was handled"
    })]
    #[non_exhaustive]
    Lost {
        /// Whether renewals failed until the lease ended (rather than finding the lock gone).
        expired: bool,
        /// When to try again (the layer's hint).
        retry_after: Duration,
    },
    /// The request already holds this lock; locks are not reentrant, and waiting for it
    /// would wait for ourselves.
    #[error("this request already holds the lock it asked for; locks are not reentrant")]
    AlreadyHeld,
    /// The backend could not be reached or refused the command.
    #[error("the lock service is unavailable")]
    #[non_exhaustive]
    Unavailable {
        /// What went wrong.
        #[source]
        source: BackendError,
        /// When to try again (the layer's hint).
        retry_after: Duration,
    },
}

/// What is wrong with a lock key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidKey {
    /// The key is the empty string.
    #[error("empty")]
    Empty,
    /// The key is longer than the layer's `max_key_len`.
    #[error("longer than {max} bytes")]
    TooLong {
        /// The limit in bytes.
        max: usize,
    },
}

impl LockRejection {
    /// The HTTP status of the default answer.
    pub fn status(&self) -> StatusCode {
        match self {
            LockRejection::Contended { status, .. } => *status,
            LockRejection::MissingKey | LockRejection::InvalidKey(_) => StatusCode::BAD_REQUEST,
            LockRejection::Unavailable { .. } | LockRejection::Lost { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            LockRejection::AlreadyHeld => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub(crate) fn outcome(&self) -> Outcome {
        match self {
            LockRejection::Contended { .. } => Outcome::Contended,
            LockRejection::MissingKey => Outcome::NoKey,
            LockRejection::InvalidKey(_) => Outcome::InvalidKey,
            LockRejection::Lost { .. } => Outcome::Lost,
            LockRejection::AlreadyHeld => Outcome::AlreadyHeld,
            LockRejection::Unavailable { .. } => Outcome::Unavailable,
        }
    }

    /// How long the client should wait before retrying, for the answers that say so.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            LockRejection::Contended { retry_after, .. }
            | LockRejection::Unavailable { retry_after, .. }
            | LockRejection::Lost { retry_after, .. } => Some(*retry_after),
            LockRejection::MissingKey
            | LockRejection::InvalidKey(_)
            | LockRejection::AlreadyHeld => None,
        }
    }

    /// The default answer: the status, `Retry-After` where it applies, and a problem
    /// body `{"type","title","status","detail"}`.
    pub fn to_response(&self) -> Response<Bytes> {
        problem(self.status(), &self.to_string(), self.retry_after())
    }
}

/// A short `application/problem+json` answer (RFC 9457), with `Retry-After` when given.
pub(crate) fn problem(
    status: StatusCode,
    detail: &str,
    retry_after: Option<Duration>,
) -> Response<Bytes> {
    let mut detail = detail.to_owned();
    if let Some(after) = retry_after {
        detail.push_str(&format!("; retry after {} s", retry_after_secs(after)));
    }
    let body = serde_json::json!({
        "type": "about:blank",
        "title": status.canonical_reason().unwrap_or("Error"),
        "status": status.as_u16(),
        "detail": detail,
    });
    let mut response = Response::new(Bytes::from(body.to_string()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    if let Some(after) = retry_after {
        headers.insert(
            header::RETRY_AFTER,
            HeaderValue::from(retry_after_secs(after)),
        );
    }
    response
}

/// `Retry-After` in whole seconds: rounded up, and at least 1 (a 0 invites a retry storm).
pub(crate) fn retry_after_secs(after: Duration) -> u64 {
    let secs = after
        .as_secs()
        .saturating_add(u64::from(after.subsec_nanos() > 0));
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1000)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(7)), 7);
    }

    #[test]
    fn contended_answer_is_problem_json_with_retry_after() {
        let rejection = LockRejection::Contended {
            status: StatusCode::LOCKED,
            retry_after: Duration::from_millis(2500),
        };
        let response = rejection.to_response();
        assert_eq!(response.status(), StatusCode::LOCKED);
        assert_eq!(response.headers()[header::RETRY_AFTER], "3");
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
        let body: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
        assert_eq!(body["status"], 423);
        assert_eq!(body["title"], "Locked");
    }

    #[test]
    fn bad_key_answer_has_no_retry_after() {
        let response = LockRejection::InvalidKey(InvalidKey::TooLong { max: 8 }).to_response();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert!(response.headers().get(header::RETRY_AFTER).is_none());
    }
}
