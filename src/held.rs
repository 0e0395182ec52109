//! [`Held`]: the lock a request holds, as its handler sees it.

use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{sync::Notify, time::Instant};
use uuid::Uuid;

use crate::{key::LockKey, lease::lease_end};

/// The lock a request holds, as its handler sees it.
///
/// The layer puts it in the request's extensions; with the `axum` feature it is an
/// extractor (`Held`, or `Option<Held>` which never rejects). It is a view: the lock is
/// released by its owner (the layer, or an [`OwnedLock`](crate::OwnedLock)), not when a
/// `Held` drops. Its lease deadline moves forward with each renewal, and it learns when the
/// lock is lost.
#[derive(Clone)]
pub struct Held {
    inner: Arc<HeldInner>,
}

struct HeldInner {
    key: LockKey,
    token: Uuid,
    fencing_token: Option<u64>,
    acquired_at: Instant,
    /// The lease deadline, as nanoseconds after `acquired_at`; renewals move it.
    deadline_nanos: AtomicU64,
    /// `true` once the lock is known lost.
    lost: AtomicBool,
    /// Wakes the [`Held::lost`] futures when `lost` turns true. A flag and a `Notify`
    /// rather than a `watch` channel: nothing to allocate or drop beyond this struct on a
    /// path every acquisition takes, and most locks are never watched.
    lost_notify: Notify,
}

impl Held {
    /// `lease_start` is taken before the acquire command was sent, so the deadline errs
    /// early; the drift margin covers clock-rate differences with the server.
    pub(crate) fn new(
        key: LockKey,
        token: Uuid,
        fencing_token: Option<u64>,
        lease_start: Instant,
        ttl: Duration,
    ) -> Self {
        let held = Self::with_deadline(key, token, fencing_token, lease_start);
        held.renewed(lease_start, ttl);
        held
    }

    /// A view whose lease ends at `deadline` (drift already taken off): a lock handed over
    /// within the process keeps its predecessor's lease.
    pub(crate) fn with_deadline(
        key: LockKey,
        token: Uuid,
        fencing_token: Option<u64>,
        deadline: Instant,
    ) -> Self {
        let held = Self {
            inner: Arc::new(HeldInner {
                key,
                token,
                fencing_token,
                acquired_at: Instant::now(),
                deadline_nanos: AtomicU64::new(0),
                lost: AtomicBool::new(false),
                lost_notify: Notify::new(),
            }),
        };
        held.set_deadline(deadline);
        held
    }

    /// Moves the deadline to `lease_start + ttl − drift` after a renewal sent at `lease_start`.
    pub(crate) fn renewed(&self, lease_start: Instant, ttl: Duration) {
        self.set_deadline(lease_end(lease_start, ttl));
    }

    fn set_deadline(&self, deadline: Instant) {
        let nanos = deadline
            .saturating_duration_since(self.inner.acquired_at)
            .as_nanos();
        let nanos = u64::try_from(nanos).unwrap_or(u64::MAX);
        self.inner.deadline_nanos.store(nanos, Ordering::Release);
    }

    /// Records that the lock is lost and wakes every [`lost`](Self::lost) future. True
    /// the first time, so that a loss is counted once however it was found.
    pub(crate) fn mark_lost(&self) -> bool {
        let first = !self.inner.lost.swap(true, Ordering::AcqRel);
        if first {
            self.inner.lost_notify.notify_waiters();
        }
        first
    }

    /// The lock's key, with the layer's prefix.
    pub fn key(&self) -> &LockKey {
        &self.inner.key
    }

    /// Every key the lock holds, each with the layer's prefix: the members of a
    /// [`KeySet`](crate::KeySet) for a lock on several keys (in their global order), the
    /// one key otherwise. All of them are held under the one [`token`](Self::token).
    pub fn keys(&self) -> Vec<LockKey> {
        crate::kind::set_members(&self.inner.key).unwrap_or_else(|| vec![self.inner.key.clone()])
    }

    /// The owner token stored in the backend: a fresh UUID v4 for each acquisition from
    /// the backend, kept when the lock is handed from one request of this process to the
    /// next.
    pub fn token(&self) -> Uuid {
        self.inner.token
    }

    /// This acquisition's fencing token, when the backend hands them out (see
    /// `RedisBackend::fencing`): a number larger than that of every earlier acquisition
    /// of the same key. On Redis it is a hybrid logical clock, about the server's time in
    /// µs since 1970 (so about 1.8·10¹⁵), not a count.
    ///
    /// Pass it along with every write the lock protects, and have the storage refuse a
    /// token smaller than the largest it has accepted. A holder that stalled past its
    /// lease (a GC pause, a frozen VM) and wakes up to write late then presents a stale
    /// token and is refused, which the lock alone cannot ensure.
    pub fn fencing_token(&self) -> Option<u64> {
        self.inner.fencing_token
    }

    /// When the lock was acquired.
    pub fn acquired_at(&self) -> Instant {
        self.inner.acquired_at
    }

    /// The moment after which the lease may have expired, on the monotonic clock, with
    /// the drift margin already taken off. Renewals move it forward; work that must be
    /// covered by the lock should finish before it.
    pub fn lease_deadline(&self) -> Instant {
        let nanos = self.inner.deadline_nanos.load(Ordering::Acquire);
        self.inner.acquired_at + Duration::from_nanos(nanos)
    }

    /// How much of the lease is left (zero once past the deadline).
    pub fn lease_remaining(&self) -> Duration {
        self.lease_deadline()
            .saturating_duration_since(Instant::now())
    }

    /// Whether the lock is lost: a renewal found it gone or owned by someone else, or the
    /// lease deadline has passed without a renewal (whether or not the watchdog has run).
    pub fn is_lost(&self) -> bool {
        self.inner.lost.load(Ordering::Acquire) || Instant::now() >= self.lease_deadline()
    }

    /// Resolves when the lock is lost (as [`is_lost`](Self::is_lost) tells); pending for
    /// as long as it is held. For handlers under the `Signal` policy, to `select!` on
    /// beside their work.
    pub async fn lost(&self) {
        loop {
            // Registered before the flag is read, so a `mark_lost` in between still wakes
            // this future (`notify_waiters` wakes only registered waiters).
            let notified = self.inner.lost_notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.inner.lost.load(Ordering::Acquire) {
                return;
            }
            // The deadline moves with each renewal: sleep to the current one, then look again.
            let deadline = self.lease_deadline();
            tokio::select! {
                () = &mut notified => return,
                () = tokio::time::sleep_until(deadline) => {
                    if Instant::now() >= self.lease_deadline() {
                        return;
                    }
                }
            }
        }
    }
}

impl fmt::Debug for Held {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Held")
            .field("key", &self.inner.key)
            .field("token", &self.inner.token)
            .field("fencing_token", &self.inner.fencing_token)
            .field("lease_remaining", &self.lease_remaining())
            .field("lost", &self.is_lost())
            .finish()
    }
}
