//! What the layer does when a request has no key, the backend fails, or a lock is lost.

/// What to do with a request whose key function found no key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum MissingKeyPolicy {
    /// Answer 400 (the default).
    #[default]
    Reject,
    /// Call the inner service without a lock.
    PassThrough,
}

/// What to do when the backend cannot be reached or fails.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum BackendErrorPolicy {
    /// Answer 503 with `Retry-After` (the default): no handler runs unlocked.
    #[default]
    Closed,
    /// Call the inner service without a lock. Only for work that tolerates running twice.
    Open,
}

/// What the layer does when a lock is lost while its handler runs: a renewal found the
/// key gone or taken, or renewals failed until the lease deadline.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum LossPolicy {
    /// Drop the handler's future at once (it runs no further than its current `.await`)
    /// and answer 503 with a problem body saying the lock was lost. The default: work
    /// that needed the lock does not go on without it.
    ///
    /// A handler that blocks its thread past the lease cannot be stopped mid-way; its
    /// answer is replaced by the 503 when it finishes (the loss is found from the lease
    /// deadline or the release's answer), but what it did meanwhile was unprotected.
    #[default]
    Abort,
    /// Let the handler run on; it learns of the loss through
    /// [`Held::is_lost`](crate::Held::is_lost) and [`Held::lost`](crate::Held::lost) and
    /// answers its own way. For handlers that can roll back or compensate.
    Signal,
}
