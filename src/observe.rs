//! What the crate tells operators: `tracing` spans and events (always), and counters and
//! histograms through the `metrics` facade (feature `metrics`).
//!
//! Metrics are labelled by the layer's *class* (its `metrics_class`, by default its key
//! prefix), never by the raw key: keys come from requests and are unbounded.
//!
//! | metric | kind | labels |
//! |---|---|---|
//! | `lock_requests_total` | counter | `class`, `outcome` = acquired, contended, unavailable, no_key, invalid_key, already_held: how each request's acquisition ended |
//! | `lock_lost_total` | counter | `class`: locks lost while held, whatever the policy |
//! | `lock_wait_seconds` | histogram | `class`: from asking to holding (acquired requests) |
//! | `lock_hold_seconds` | histogram | `class`: from holding to releasing |
//! | `lock_renewals_total` | counter | `result` = ok, failed |
//! | `lock_hand_offs_total` | counter | |

use std::{sync::Arc, time::Duration};

/// How a request's encounter with the lock ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Acquired,
    Contended,
    Unavailable,
    NoKey,
    InvalidKey,
    Lost,
    AlreadyHeld,
}

impl Outcome {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Outcome::Acquired => "acquired",
            Outcome::Contended => "contended",
            Outcome::Unavailable => "unavailable",
            Outcome::NoKey => "no_key",
            Outcome::InvalidKey => "invalid_key",
            Outcome::Lost => "lost",
            Outcome::AlreadyHeld => "already_held",
        }
    }
}

pub(crate) fn outcome(class: &Arc<str>, outcome: Outcome) {
    #[cfg(feature = "metrics")]
    metrics::counter!("lock_requests_total", "class" => class.clone(), "outcome" => outcome.as_str())
        .increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = (class, outcome);
}

pub(crate) fn lost(class: &Arc<str>) {
    #[cfg(feature = "metrics")]
    metrics::counter!("lock_lost_total", "class" => class.clone()).increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = class;
}

pub(crate) fn waited(class: &Arc<str>, wait: Duration) {
    #[cfg(feature = "metrics")]
    metrics::histogram!("lock_wait_seconds", "class" => class.clone()).record(wait);
    #[cfg(not(feature = "metrics"))]
    let _ = (class, wait);
}

pub(crate) fn held(class: &Arc<str>, hold: Duration) {
    #[cfg(feature = "metrics")]
    metrics::histogram!("lock_hold_seconds", "class" => class.clone()).record(hold);
    #[cfg(not(feature = "metrics"))]
    let _ = (class, hold);
}

pub(crate) fn renewal(ok: bool) {
    #[cfg(feature = "metrics")]
    metrics::counter!("lock_renewals_total", "result" => if ok { "ok" } else { "failed" })
        .increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = ok;
}

pub(crate) fn hand_off() {
    #[cfg(feature = "metrics")]
    metrics::counter!("lock_hand_offs_total").increment(1);
}
