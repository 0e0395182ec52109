//! [`OwnedLock`]: a lock taken in a handler, and the set of locks one request holds.

use std::{
    fmt,
    ops::Deref,
    sync::{Arc, Mutex, PoisonError},
};

use super::{
    LockSettings,
    guard::LockGuard,
    hold_ended,
    renewals::{Pending, Renewals},
    watchdog::{loss_on_release, note_loss},
};
use crate::{backend::LockBackend, held::Held, key::LockKey};

/// Keys held by one request: its layer's lock and those its `OwnedLock`s still hold.
#[derive(Debug, Default)]
pub(crate) struct RequestLocks {
    keys: Mutex<Vec<LockKey>>,
}

impl RequestLocks {
    #[cfg(feature = "axum")]
    pub(crate) fn new(held: Option<&Held>) -> Self {
        Self {
            keys: Mutex::new(held.map(|held| held.key().clone()).into_iter().collect()),
        }
    }

    pub(super) fn keys(&self) -> std::sync::MutexGuard<'_, Vec<LockKey>> {
        // Every mutation is a single push or remove: a panic cannot leave it half-done.
        self.keys.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A lock taken by [`Locker::lock`](crate::Locker::lock): released on drop (in the background) or by
/// [`release`](Self::release) (awaited); renewed until then. Derefs to [`Held`] for the
/// key, tokens and the lost signal.
///
/// There is no handler future for it to drop when the lock is lost, so a lost lock is
/// only signalled: check [`Held::is_lost`] before committing, or `select!` on
/// [`Held::lost`].
#[must_use = "the lock is released as soon as the `OwnedLock` is dropped"]
pub struct OwnedLock<Backend: LockBackend> {
    guard: Option<LockGuard<Backend>>,
    held: Held,
    class: Arc<str>,
    watchdog: Option<Watchdog<Backend>>,
    request: Option<Arc<RequestLocks>>,
    /// Its locker's settings: the release timeout, the hold bookkeeping.
    settings: Arc<LockSettings>,
}

/// The lock's watchdog, queued or running, and the queue it belongs to.
type Watchdog<Backend> = (Arc<Renewals<Backend>>, Arc<Pending<Backend>>);

impl<Backend: LockBackend> OwnedLock<Backend> {
    pub(super) fn new(
        guard: LockGuard<Backend>,
        held: Held,
        class: Arc<str>,
        watchdog: Option<Watchdog<Backend>>,
        request: Option<Arc<RequestLocks>>,
        settings: Arc<LockSettings>,
    ) -> Self {
        Self {
            guard: Some(guard),
            held,
            class,
            watchdog,
            request,
            settings,
        }
    }

    /// The lock's view: key, owner token, fencing token, lease deadline, lost signal.
    pub fn held(&self) -> &Held {
        &self.held
    }

    /// Releases the lock now, waiting at most the release timeout for the backend to
    /// confirm (then it goes on in the background).
    ///
    /// A release that finds the lock no longer ours (its lease ran out while the holder
    /// was blocked, say) marks [`Held::is_lost`] and counts the loss.
    pub async fn release(mut self) {
        let ran_out = self.held.is_lost();
        self.stop();
        if let Some(guard) = self.guard.take() {
            let outcome = guard.release(self.settings.release_timeout).await;
            if let Some(loss) = loss_on_release(outcome, ran_out) {
                note_loss(&self.held, &self.class, loss);
            }
        }
    }

    /// Stops renewing and forgets the key in its request's set.
    fn stop(&mut self) {
        if self.guard.is_some() {
            hold_ended(&self.settings, self.held.acquired_at().elapsed());
        }
        if let Some((renewals, watchdog)) = self.watchdog.take() {
            watchdog.stop(&renewals);
        }
        if let Some(request) = self.request.take() {
            request.keys().retain(|key| key != self.held.key());
        }
    }
}

impl<Backend: LockBackend> Deref for OwnedLock<Backend> {
    type Target = Held;

    fn deref(&self) -> &Held {
        &self.held
    }
}

impl<Backend: LockBackend> Drop for OwnedLock<Backend> {
    fn drop(&mut self) {
        self.stop();
        // The guard's own `Drop` releases in the background.
    }
}

impl<Backend: LockBackend> fmt::Debug for OwnedLock<Backend> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OwnedLock")
            .field("held", &self.held)
            .finish()
    }
}
