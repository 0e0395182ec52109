//! Lease arithmetic on the client's monotonic clock (DESIGN §3): the drift margin, and
//! instants that saturate instead of overflowing for "forever" settings.

use std::time::Duration;

use tokio::time::Instant;

/// Clock drift allowance on a lease: 1 % of the TTL plus 2 ms (the Redlock paper's figure).
pub(crate) fn drift(ttl: Duration) -> Duration {
    ttl / 100 + Duration::from_millis(2)
}

/// When a lease taken at `lease_start` ends on our clock: `ttl` minus the drift margin.
pub(crate) fn lease_end(lease_start: Instant, ttl: Duration) -> Instant {
    saturating_add(lease_start, ttl.saturating_sub(drift(ttl)))
}

/// `instant + duration`, or a point a century away when that overflows (a "forever"
/// setting such as `Duration::MAX`).
pub(crate) fn saturating_add(instant: Instant, duration: Duration) -> Instant {
    instant
        .checked_add(duration)
        .unwrap_or_else(|| instant + Duration::from_secs(100 * 365 * 24 * 3600))
}
