//! Does the ttl fit the work: per locker, the hold times against the ttl.
//!
//! Every hold lands in one of [`BUCKETS`] buckets of a hundredth of the ttl (the last
//! one: three ttls or more), a few atomic additions. Every [`WINDOW`] holds the window is
//! read and emptied:
//!
//! - the gauge `lock_ttl_headroom` is set to ttl ÷ the window's p99.9 hold (the upper edge
//!   of its bucket, so the headroom is at least that; 100 when the p99.9 hold is under a
//!   hundredth of the ttl);
//! - without renewal, a p99.9 hold over a third of the ttl is a warning (`hold_near_ttl`):
//!   the tail comes within two thirds of losing the lock, and a third is what a renewal
//!   schedule would leave too;
//! - with renewal, more than half of the holds outliving the renewal interval is a warning
//!   (`frequent_renewals`): most holds then cost a round trip more and depend on Redis
//!   answering while they run, because the ttl is shorter than the usual hold.
//!
//! Without renewal, a single hold over two thirds of the ttl warns at once: a class with
//! few requests may never fill a window, and such a hold nearly lost its lock.
//!
//! Each warning counts in `lock_ttl_warnings_total{class, reason}`; the WARN log line
//! comes at most once an hour per locker and reason.

use std::{
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicU32, AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use tokio::time::Instant;

/// Holds per window: enough for a p99.9 (the largest one or two of them).
pub(crate) const WINDOW: u64 = 1000;
/// Buckets of a hundredth of the ttl; the last takes every hold of three ttls or more.
const BUCKETS: usize = 301;
/// The headroom reported when the p99.9 hold is under a hundredth of the ttl.
const MAX_HEADROOM: f64 = 100.0;
/// The least time between two WARN lines of one locker for one reason.
const WARN_EVERY: Duration = Duration::from_secs(60 * 60);

/// Why the ttl looks wrong for the work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reason {
    /// Without renewal, holds come close to the ttl.
    HoldNearTtl,
    /// With renewal, most holds need one.
    FrequentRenewals,
}

impl Reason {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Reason::HoldNearTtl => "hold_near_ttl",
            Reason::FrequentRenewals => "frequent_renewals",
        }
    }
}

/// What a full window said.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Verdict {
    /// ttl ÷ p99.9 hold (at least this).
    pub(crate) headroom: f64,
    pub(crate) warning: Option<Reason>,
}

/// The hold times of one locker, against its ttl.
#[derive(Debug)]
pub(crate) struct TtlAdvice {
    buckets: Box<[AtomicU32]>,
    holds: AtomicU64,
    /// Holds in this window that outlived the renewal interval.
    renewed: AtomicU64,
    /// When each reason was last logged.
    last_warned: Mutex<[Option<Instant>; 2]>,
}

impl Default for TtlAdvice {
    fn default() -> Self {
        Self {
            buckets: (0..BUCKETS).map(|_| AtomicU32::new(0)).collect(),
            holds: AtomicU64::new(0),
            renewed: AtomicU64::new(0),
            last_warned: Mutex::new([None; 2]),
        }
    }
}

impl TtlAdvice {
    /// Counts one hold of `hold` under a lease of `ttl`, renewed every `renew_every` (or
    /// not at all); returns the verdict when it completed a window, or at once for a hold
    /// over two thirds of an unrenewed ttl.
    pub(crate) fn hold(
        &self,
        hold: Duration,
        ttl: Duration,
        renew_every: Option<Duration>,
    ) -> Option<Verdict> {
        let ttl_nanos = ttl.as_nanos().max(1);
        let hundredths = hold.as_nanos().saturating_mul(100) / ttl_nanos;
        let bucket = usize::try_from(hundredths).map_or(BUCKETS - 1, |b| b.min(BUCKETS - 1));
        self.buckets[bucket].fetch_add(1, Relaxed);
        if renew_every.is_some_and(|every| hold > every) {
            self.renewed.fetch_add(1, Relaxed);
        }
        let holds = self.holds.fetch_add(1, Relaxed) + 1;
        if holds.is_multiple_of(WINDOW) {
            return Some(self.close_window(renew_every.is_some()));
        }
        if renew_every.is_none() && hold.as_nanos().saturating_mul(3) > ttl_nanos * 2 {
            return Some(Verdict {
                headroom: 100.0 / (bucket as f64 + 1.0),
                warning: Some(Reason::HoldNearTtl),
            });
        }
        None
    }

    /// Reads and empties the window.
    fn close_window(&self, renews: bool) -> Verdict {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|bucket| u64::from(bucket.swap(0, Relaxed)))
            .collect();
        let renewed = self.renewed.swap(0, Relaxed);
        let total: u64 = counts.iter().sum();
        // The p99.9: the bucket where the largest 0.1 % begin.
        let beyond = total / 1000;
        let mut above = 0;
        let mut p999 = 0;
        for (bucket, count) in counts.iter().enumerate().rev() {
            above += count;
            if above > beyond {
                p999 = bucket;
                break;
            }
        }
        let headroom = (100.0 / (p999 as f64 + 1.0)).min(MAX_HEADROOM);
        let warning = if renews {
            (renewed * 2 > total).then_some(Reason::FrequentRenewals)
        } else {
            // Over a third of the ttl: bucket 34 and above (34 hundredths and more).
            (p999 >= 34).then_some(Reason::HoldNearTtl)
        };
        Verdict { headroom, warning }
    }

    /// Whether a WARN line for `reason` is due (at most one an hour), noting it if so.
    pub(crate) fn warn_due(&self, reason: Reason) -> bool {
        let now = Instant::now();
        let mut last = self
            .last_warned
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let slot = &mut last[reason as usize];
        if slot.is_some_and(|at| now < at + WARN_EVERY) {
            return false;
        }
        *slot = Some(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(10);

    fn window(
        advice: &TtlAdvice,
        hold: impl Fn(u64) -> Duration,
        renew: Option<Duration>,
    ) -> Verdict {
        let mut verdict = None;
        for n in 0..WINDOW {
            verdict = advice.hold(hold(n), TTL, renew).or(verdict);
        }
        verdict.expect("a full window gives a verdict")
    }

    #[test]
    fn short_holds_leave_headroom_and_no_warning() {
        let advice = TtlAdvice::default();
        let verdict = window(&advice, |_| Duration::from_millis(150), None);
        // 150 ms is in the bucket of 1–2 % of 10 s: at least 50 times the p99.9 hold.
        assert_eq!(verdict.warning, None);
        assert_eq!(verdict.headroom, 50.0);
    }

    #[test]
    fn a_p999_over_a_third_of_the_ttl_warns_without_renewal_only() {
        // Two holds in a thousand at 4 s (40 % of the ttl): the p99.9 is there.
        let hold = |n| {
            if n % 500 == 0 {
                Duration::from_secs(4)
            } else {
                Duration::from_millis(100)
            }
        };
        let verdict = window(&TtlAdvice::default(), hold, None);
        assert_eq!(verdict.warning, Some(Reason::HoldNearTtl));
        assert!(verdict.headroom < 3.0, "{verdict:?}");
        let renewed = window(&TtlAdvice::default(), hold, Some(TTL / 3));
        assert_eq!(renewed.warning, None);
        // One such hold in a thousand is the p99.9's edge, not past it.
        let once = |n| {
            if n == 0 {
                Duration::from_secs(4)
            } else {
                Duration::from_millis(100)
            }
        };
        assert_eq!(window(&TtlAdvice::default(), once, None).warning, None);
    }

    #[test]
    fn renewals_most_of_the_time_warn() {
        let hold = |n| Duration::from_secs(if n % 3 == 0 { 1 } else { 5 });
        let verdict = window(&TtlAdvice::default(), hold, Some(TTL / 3));
        assert_eq!(verdict.warning, Some(Reason::FrequentRenewals));
        let rare = |n| Duration::from_secs(if n % 3 == 0 { 5 } else { 1 });
        assert_eq!(
            window(&TtlAdvice::default(), rare, Some(TTL / 3)).warning,
            None
        );
    }

    #[test]
    fn a_single_hold_near_an_unrenewed_ttl_warns_at_once() {
        let advice = TtlAdvice::default();
        assert_eq!(advice.hold(Duration::from_secs(6), TTL, None), None);
        let verdict = advice.hold(Duration::from_secs(7), TTL, None).unwrap();
        assert_eq!(verdict.warning, Some(Reason::HoldNearTtl));
        assert_eq!(
            advice.hold(Duration::from_secs(7), TTL, Some(TTL / 3)),
            None
        );
    }

    #[tokio::test(start_paused = true)]
    async fn warnings_are_logged_at_most_hourly() {
        let advice = TtlAdvice::default();
        assert!(advice.warn_due(Reason::HoldNearTtl));
        assert!(!advice.warn_due(Reason::HoldNearTtl));
        assert!(advice.warn_due(Reason::FrequentRenewals));
        tokio::time::advance(WARN_EVERY).await;
        assert!(advice.warn_due(Reason::HoldNearTtl));
    }
}
