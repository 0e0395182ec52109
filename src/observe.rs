//! What the crate tells operators: `tracing` spans and events (always), and counters and
//! histograms through the `metrics` facade (feature `metrics`).
//!
//! Metrics are labelled by the layer's *class* (its `metrics_class`, by default its key
//! prefix), never by the raw key: keys come from requests and are unbounded. The one
//! exception names the few most contended keys of each class (a bounded set at any time,
//! `Locker::track_hot_keys`).
//!
//! | metric | kind | labels |
//! |---|---|---|
//! | `lock_requests_total` | counter | `class`, `outcome` = acquired, contended, unavailable, no_key, invalid_key, already_held: how each request's acquisition ended |
//! | `lock_lost_total` | counter | `class`: locks lost while held, whatever the policy |
//! | `lock_wait_seconds` | histogram | `class`: from asking to holding (acquired requests) |
//! | `lock_hold_seconds` | histogram | `class`: from holding to releasing |
//! | `lock_renewals_total` | counter | `result` = ok, failed |
//! | `lock_hand_offs_total` | counter | |
//! | `lock_hot_key_contentions` | gauge | `class`, `key`: the contended acquisitions of each of the class's most contended keys (its top 10 by default, `Locker::track_hot_keys`); a key that drops out is set to 0 |
//! | `lock_ttl_headroom` | gauge | `class`: ttl ÷ p99.9 hold, over the last 1,000 holds, or ttl ÷ the last hold over two thirds of an unrenewed ttl (at least this; 100 at most) |
//! | `lock_ttl_warnings_total` | counter | `class`, `reason` = hold_near_ttl (no renewal, p99.9 hold over a third of the ttl, or one hold over two thirds), frequent_renewals (over half the holds renewed) |

use std::{sync::Arc, time::Duration};

use crate::{
    hot_keys::HotKeys,
    key::LockKey,
    ttl_advice::{TtlAdvice, Verdict},
};

/// What a locker learns from its locks over time: its hot keys and its hold times against
/// the ttl. Shared by its clones and the layers made from it; made anew when its metrics
/// class changes.
pub(crate) struct Observed {
    pub(crate) hot_keys: HotKeys,
    pub(crate) ttl: TtlAdvice,
    /// The keys of the class's per-request metrics.
    pub(crate) metrics: ClassMetrics,
}

impl std::fmt::Debug for Observed {
    // The sketch's keys and the hold buckets would drown a locker's `Debug`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observed").finish_non_exhaustive()
    }
}

impl Observed {
    pub(crate) fn new(class: &Arc<str>, hot_keys: usize) -> Arc<Self> {
        Arc::new(Self {
            hot_keys: HotKeys::new(hot_keys),
            ttl: TtlAdvice::default(),
            metrics: ClassMetrics::new(class),
        })
    }
}

/// The keys of the metrics every request of a class records, built once per class: the
/// `metrics` macros would build (allocate and hash) a labelled key on every call, even
/// with no recorder installed. The recorder is still looked up on every call, so one
/// installed later (or a thread's local one) sees every request after it.
pub(crate) struct ClassMetrics {
    #[cfg(feature = "metrics")]
    requests: [metrics::Key; Outcome::ALL.len()],
    #[cfg(feature = "metrics")]
    wait: metrics::Key,
    #[cfg(feature = "metrics")]
    hold: metrics::Key,
}

/// What the macros would give these metrics: this module as target, at INFO.
#[cfg(feature = "metrics")]
static METADATA: metrics::Metadata<'static> =
    metrics::Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

impl ClassMetrics {
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    fn new(class: &Arc<str>) -> Self {
        #[cfg(feature = "metrics")]
        let labelled = |name: &'static str, more: Option<&'static str>| {
            let mut labels = vec![metrics::Label::new("class", class.clone())];
            labels.extend(more.map(|outcome| metrics::Label::new("outcome", outcome)));
            metrics::Key::from_parts(name, labels)
        };
        Self {
            #[cfg(feature = "metrics")]
            requests: Outcome::ALL
                .map(|outcome| labelled("lock_requests_total", Some(outcome.as_str()))),
            #[cfg(feature = "metrics")]
            wait: labelled("lock_wait_seconds", None),
            #[cfg(feature = "metrics")]
            hold: labelled("lock_hold_seconds", None),
        }
    }
}

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
    /// Every outcome, each at its [`index`](Self::index).
    #[cfg(feature = "metrics")]
    const ALL: [Outcome; 7] = [
        Outcome::Acquired,
        Outcome::Contended,
        Outcome::Unavailable,
        Outcome::NoKey,
        Outcome::InvalidKey,
        Outcome::Lost,
        Outcome::AlreadyHeld,
    ];

    /// Where the outcome is in [`ALL`](Self::ALL) (a match, so that a new outcome cannot
    /// compile without a place there).
    #[cfg(feature = "metrics")]
    const fn index(self) -> usize {
        match self {
            Outcome::Acquired => 0,
            Outcome::Contended => 1,
            Outcome::Unavailable => 2,
            Outcome::NoKey => 3,
            Outcome::InvalidKey => 4,
            Outcome::Lost => 5,
            Outcome::AlreadyHeld => 6,
        }
    }

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

pub(crate) fn outcome(class: &ClassMetrics, outcome: Outcome) {
    #[cfg(feature = "metrics")]
    metrics::with_recorder(|recorder| {
        recorder.register_counter(&class.requests[outcome.index()], &METADATA)
    })
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

pub(crate) fn waited(class: &ClassMetrics, wait: Duration) {
    #[cfg(feature = "metrics")]
    metrics::with_recorder(|recorder| recorder.register_histogram(&class.wait, &METADATA))
        .record(wait);
    #[cfg(not(feature = "metrics"))]
    let _ = (class, wait);
}

pub(crate) fn held(class: &ClassMetrics, hold: Duration) {
    #[cfg(feature = "metrics")]
    metrics::with_recorder(|recorder| recorder.register_histogram(&class.hold, &METADATA))
        .record(hold);
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

/// A hot key's count (0: it left the top).
pub(crate) fn hot_key(class: &Arc<str>, key: &LockKey, count: u64) {
    #[cfg(feature = "metrics")]
    metrics::gauge!(
        "lock_hot_key_contentions",
        "class" => class.clone(),
        "key" => key.as_str().to_owned()
    )
    .set(count as f64);
    #[cfg(not(feature = "metrics"))]
    let _ = (class, key, count);
}

/// What a window of holds (or one long hold) said about the ttl.
pub(crate) fn ttl_verdict(
    class: &Arc<str>,
    advice: &TtlAdvice,
    verdict: Verdict,
    ttl: Duration,
    renew_every: Option<Duration>,
) {
    #[cfg(feature = "metrics")]
    metrics::gauge!("lock_ttl_headroom", "class" => class.clone()).set(verdict.headroom);
    let Some(reason) = verdict.warning else {
        return;
    };
    #[cfg(feature = "metrics")]
    metrics::counter!("lock_ttl_warnings_total", "class" => class.clone(), "reason" => reason.as_str())
        .increment(1);
    if advice.warn_due(reason) {
        tracing::warn!(
            %class,
            reason = reason.as_str(),
            ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
            renew_every_ms = renew_every.map(|every| u64::try_from(every.as_millis()).unwrap_or(u64::MAX)),
            headroom = verdict.headroom,
            "{}",
            match reason {
                crate::ttl_advice::Reason::HoldNearTtl =>
                    "lock holds come close to the ttl without renewal: a slower one loses its lock; \
                     raise the ttl to at least 3 x the p99.9 hold, or turn renewal on",
                crate::ttl_advice::Reason::FrequentRenewals =>
                    "most lock holds outlive the renewal interval: the ttl is shorter than the usual \
                     hold; raise it to about 3 x the p99.9 hold to save a renewal per hold",
            }
        );
    }
}

#[cfg(all(test, feature = "metrics"))]
mod tests {
    use super::*;

    #[test]
    fn each_outcome_finds_its_own_requests_key() {
        let metrics = ClassMetrics::new(&Arc::from("orders"));
        for outcome in Outcome::ALL {
            assert_eq!(Outcome::ALL[outcome.index()], outcome);
            let key = &metrics.requests[outcome.index()];
            let label = key.labels().find(|label| label.key() == "outcome");
            assert_eq!(label.map(|label| label.value()), Some(outcome.as_str()));
        }
    }
}
