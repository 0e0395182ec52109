//! Watchdogs for the locks handlers take themselves ([`OwnedLock`](super::OwnedLock)),
//! started only when needed.
//!
//! A lock taken in a handler has no future of ours around the handler's work, so its
//! watchdog needs a task. Most such locks are released long before their first renewal
//! is due (ttl / 3), so a task (and a timer) per lock would mostly be spawned to be
//! aborted. Instead each [`Locker`](super::Locker) keeps one queue of the watchdogs to
//! be, ordered by when their first renewal is due, and one task that sleeps until the
//! earliest and then starts the watchdog (in a task of its own, as before) of every lock
//! still held. A lock released earlier leaves the queue without costing a task.
//!
//! Nothing is detected later than before: until its first renewal is due, a watchdog only
//! waits (the lease deadline comes after it), and [`Held`](crate::Held) judges the lease
//! deadline itself.

use std::{
    collections::VecDeque,
    future::poll_fn,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError, Weak,
        atomic::{AtomicUsize, Ordering},
    },
};

use tokio::{sync::Notify, task::AbortHandle, time::Instant};

use super::watchdog::Watchdog;
use crate::{backend::LockBackend, observe};

/// The queue of one locker's watchdogs to be, and its task.
pub(crate) struct Renewals<B: LockBackend> {
    state: Mutex<Queue<B>>,
    /// Entries neither started nor stopped (for compacting the queue).
    waiting: AtomicUsize,
    /// Wakes the task: an entry due earlier than it sleeps, or the queue dropped.
    wake: Arc<Notify>,
}

struct Queue<B: LockBackend> {
    entries: VecDeque<Arc<Pending<B>>>,
    /// Whether the task runs (it clears this when it ends or its runtime drops it).
    serving: bool,
    /// When the task wakes next, if it sleeps on a deadline.
    wakes_at: Option<Instant>,
}

/// One lock's watchdog, from its registration until the lock is released.
pub(crate) struct Pending<B: LockBackend> {
    /// The first renewal.
    due: Instant,
    state: Mutex<PendingState<B>>,
}

enum PendingState<B: LockBackend> {
    Waiting(Watchdog<B>, Arc<str>),
    Running(AbortHandle),
    Done,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves its value consistent.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<B: LockBackend> Pending<B> {
    fn is_done(&self) -> bool {
        matches!(*lock(&self.state), PendingState::Done)
    }

    /// Stops the watchdog (running or not): the lock is released.
    pub(crate) fn stop(&self, renewals: &Renewals<B>) {
        match std::mem::replace(&mut *lock(&self.state), PendingState::Done) {
            PendingState::Waiting(..) => {
                renewals.waiting.fetch_sub(1, Ordering::Relaxed);
            }
            PendingState::Running(task) => task.abort(),
            PendingState::Done => {}
        }
    }

    /// Starts the watchdog in a task of its own, unless the lock was released.
    fn start(&self, renewals: &Renewals<B>) {
        let mut state = lock(&self.state);
        if !matches!(*state, PendingState::Waiting(..)) {
            return;
        }
        let PendingState::Waiting(mut watchdog, class) =
            std::mem::replace(&mut *state, PendingState::Done)
        else {
            unreachable!("checked above")
        };
        renewals.waiting.fetch_sub(1, Ordering::Relaxed);
        let task = tokio::spawn(async move {
            poll_fn(|cx| watchdog.poll_lost(cx)).await;
            observe::lost(&class);
        });
        *state = PendingState::Running(task.abort_handle());
    }
}

impl<B: LockBackend> Default for Renewals<B> {
    fn default() -> Self {
        Self {
            state: Mutex::new(Queue {
                entries: VecDeque::new(),
                serving: false,
                wakes_at: None,
            }),
            waiting: AtomicUsize::new(0),
            wake: Arc::default(),
        }
    }
}

impl<B: LockBackend> Renewals<B> {
    /// Queues `watchdog` (of a lock just taken, counted under `class` if lost) to start
    /// when its first renewal is due. Must be called within a tokio runtime.
    pub(crate) fn register(
        self: &Arc<Self>,
        watchdog: Watchdog<B>,
        class: Arc<str>,
    ) -> Arc<Pending<B>> {
        let due = watchdog.first_renewal();
        let pending = Arc::new(Pending {
            due,
            state: Mutex::new(PendingState::Waiting(watchdog, class)),
        });
        let waiting = self.waiting.fetch_add(1, Ordering::Relaxed) + 1;
        let mut queue = lock(&self.state);
        // Released locks leave from the front; the rest now and then (one held long at
        // the front keeps those behind it).
        while queue.entries.front().is_some_and(|p| p.is_done()) {
            queue.entries.pop_front();
        }
        if queue.entries.len() > 2 * waiting + 64 {
            queue.entries.retain(|p| !p.is_done());
        }
        // Locks come in nearly in order of their due times (a lease starts when its
        // acquire is sent); the few that overtook one another are put in place.
        let at = queue.entries.partition_point(|p| p.due <= due);
        queue.entries.insert(at, pending.clone());
        if !queue.serving {
            queue.serving = true;
            queue.wakes_at = None;
            tokio::spawn(serve(Arc::downgrade(self), self.wake.clone()));
        } else if queue.wakes_at.is_none_or(|at| due < at) {
            self.wake.notify_one();
        }
        pending
    }

    /// Starts the watchdogs that are due; returns when to look again.
    fn start_due(&self) -> Option<Instant> {
        let mut queue = lock(&self.state);
        let now = Instant::now();
        let mut latest = None;
        while let Some(front) = queue.entries.front() {
            if front.due > now && !front.is_done() {
                break;
            }
            let front = queue.entries.pop_front().expect("looked at above");
            latest = latest.max(Some(front.due));
            front.start(self);
        }
        // With the queue empty, the task still sleeps until the latest due time it
        // passed: locks taken from now on are due later, so they need not wake it (a
        // locker whose locks come and go wakes its task once per renewal period, not
        // once per lock).
        queue.wakes_at = match queue.entries.front() {
            Some(front) => Some(front.due),
            None => latest.filter(|at| *at > now),
        };
        queue.wakes_at
    }
}

impl<B: LockBackend> Drop for Renewals<B> {
    fn drop(&mut self) {
        // The task ends when it finds the queue gone.
        self.wake.notify_one();
    }
}

/// Clears `serving` when the task ends, or is dropped with its runtime: the next
/// registration starts a new one.
struct Serving<B: LockBackend>(Weak<Renewals<B>>);

impl<B: LockBackend> Drop for Serving<B> {
    fn drop(&mut self) {
        if let Some(renewals) = self.0.upgrade() {
            lock(&renewals.state).serving = false;
        }
    }
}

/// The queue's task: sleeps until the next first renewal is due, and starts it.
async fn serve<B: LockBackend>(renewals: Weak<Renewals<B>>, wake: Arc<Notify>) {
    let _serving = Serving(renewals.clone());
    loop {
        let Some(queue) = renewals.upgrade() else {
            return;
        };
        let next = queue.start_due();
        drop(queue);
        match next {
            Some(at) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = wake.notified() => {}
                }
            }
            None => wake.notified().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use uuid::Uuid;

    use crate::{
        InMemoryBackend, LockRejection, Locker,
        backend::{Acquire, LockBackend},
        key::LockKey,
    };

    fn locker(backend: &InMemoryBackend) -> Locker<InMemoryBackend> {
        Locker::new(backend.clone())
            .ttl(Duration::from_millis(300))
            .max_wait(Duration::ZERO)
    }

    /// An in-handler lock held for several leases is renewed: its watchdog starts when
    /// the first renewal is due, and nobody else gets the key meanwhile.
    #[tokio::test(start_paused = true)]
    async fn a_lock_held_long_is_renewed() {
        let backend = InMemoryBackend::new();
        let locker = locker(&backend);
        let lock = locker.lock("k").await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!lock.is_lost());
        let other = Locker::new(backend.clone()).max_wait(Duration::ZERO);
        assert!(matches!(
            other.lock("k").await,
            Err(LockRejection::Contended { .. })
        ));
        lock.release().await;
        assert_eq!(backend.held_count(), 0);
    }

    /// A lock taken from its holder is found lost at the first renewal.
    #[tokio::test(start_paused = true)]
    async fn a_lock_taken_away_is_lost() {
        let backend = InMemoryBackend::new();
        let locker = locker(&backend);
        let lock = locker.lock("k").await.unwrap();
        let key = LockKey::from("k");
        assert!(backend.release(&key, lock.token()).await.unwrap().was_held);
        let intruder = Uuid::new_v4();
        let taken = backend
            .try_acquire(&key, intruder, Duration::from_secs(10))
            .await
            .unwrap();
        assert!(matches!(taken, Acquire::Acquired { .. }));
        assert!(!lock.is_lost());
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(lock.is_lost(), "the first renewal did not notice");
        drop(lock);
    }

    /// Locks released before their first renewal leave nothing behind: no watchdog
    /// waits, and the queue does not grow with them.
    #[tokio::test(start_paused = true)]
    async fn locks_released_early_leave_nothing() {
        let backend = InMemoryBackend::new();
        let locker = locker(&backend);
        let long = locker.lock("long").await.unwrap();
        for i in 0..1000 {
            locker.lock(format!("k{i}")).await.unwrap().release().await;
        }
        let renewals = &locker.renewals;
        assert_eq!(
            renewals.waiting.load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        // One waiting entry: the queue is compacted at 2 × 1 + 64.
        assert!(super::lock(&renewals.state).entries.len() <= 67);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!long.is_lost());
        assert_eq!(
            renewals.waiting.load(std::sync::atomic::Ordering::Relaxed),
            0
        );
        long.release().await;
    }
}
