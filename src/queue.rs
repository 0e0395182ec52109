//! Waiting in line within one process, and handing the lock down the line (DESIGN §5).
//!
//! All requests of one layer (or [`Locker`](crate::Locker)) that want the same key queue
//! here, first come first served. Only the one whose *turn* it is talks to the backend;
//! the others wait on a channel of their own, costing the backend nothing. When the
//! holder finishes and someone is queued, the lock passes straight to them without
//! leaving the backend (a *hand-off*). After `max_hand_offs` consecutive hand-offs the
//! lock is released for real, so that other processes get their chance.

use std::{
    collections::{HashMap, VecDeque, hash_map},
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::{sync::oneshot, time::Instant};

use crate::{LockBackend, LockKey, backend::Released, guard::LockGuard};

/// The queues of one layer or locker, by key. A key has an entry while someone of this
/// process holds its lock or has the turn to ask for it.
pub(crate) struct LocalQueues<B: LockBackend> {
    keys: Mutex<HashMap<LockKey, KeyQueue<B>>>,
    max_hand_offs: u32,
    next_id: AtomicU64,
}

struct KeyQueue<B: LockBackend> {
    waiters: VecDeque<Waiter<B>>,
    /// Hand-offs since the lock last came from the backend.
    hand_offs: u32,
}

struct Waiter<B: LockBackend> {
    id: u64,
    grant: oneshot::Sender<Grant<B>>,
}

/// What a queued waiter is given when it reaches the front.
pub(crate) enum Grant<B: LockBackend> {
    /// The lock itself.
    HandOff(HandOff<B>),
    /// The turn to ask the backend, after the release that made it. `step_aside`: whether
    /// to give waiters of other processes a moment first.
    Turn {
        turn: Turn<B>,
        step_aside: StepAside,
    },
}

/// How long the next local asker lets waiters of other processes try first, after a
/// release in the backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum StepAside {
    /// Nobody elsewhere waits: ask at once.
    #[default]
    No,
    /// Waiters elsewhere were told of the release: they try within a round trip.
    Notified,
    /// Waiters elsewhere were refused but could not be told (notifications off or not
    /// permitted): they try on their backoff, so the step aside lasts one backoff.
    Polling,
}

impl StepAside {
    pub(crate) fn after(released: &Released) -> Self {
        if released.notified > 0 {
            StepAside::Notified
        } else if released.unnotified_waiters {
            StepAside::Polling
        } else {
            StepAside::No
        }
    }
}

/// A lock passed from its holder to the next waiter, with what the waiter needs to know
/// to take it over: the lease left, and whether a new fencing token is due.
pub(crate) struct HandOff<B: LockBackend> {
    pub(crate) guard: LockGuard<B>,
    pub(crate) lease_deadline: Instant,
    pub(crate) fenced: bool,
}

impl<B: LockBackend> HandOff<B> {
    pub(crate) fn into_guard(self) -> LockGuard<B> {
        self.guard
    }
}

/// The right, and the duty, to ask the backend for a key on behalf of this process.
/// Dropped unused (the asker gave up or was cancelled), it passes to the next waiter.
pub(crate) struct Turn<B: LockBackend> {
    queues: Option<Arc<LocalQueues<B>>>,
    key: LockKey,
}

impl<B: LockBackend> Turn<B> {
    pub(crate) fn new(queues: Arc<LocalQueues<B>>, key: LockKey) -> Self {
        Self {
            queues: Some(queues),
            key,
        }
    }

    /// The lock was acquired from the backend: the key stays busy here, now under its
    /// holder's guard, and the hand-off count starts again.
    pub(crate) fn used(mut self) {
        if let Some(queues) = self.queues.take()
            && let Some(queue) = queues.keys().get_mut(&self.key)
        {
            queue.hand_offs = 0;
        }
    }
}

/// Gives the queue its next turn when dropped: after a background release, even if the
/// runtime drops the release task before it runs.
pub(crate) struct PassTurnOnDrop<B: LockBackend> {
    pub(crate) queues: Arc<LocalQueues<B>>,
    pub(crate) key: LockKey,
    pub(crate) step_aside: StepAside,
}

impl<B: LockBackend> Drop for PassTurnOnDrop<B> {
    fn drop(&mut self) {
        self.queues.pass_turn(&self.key, self.step_aside);
    }
}

impl<B: LockBackend> Drop for Turn<B> {
    fn drop(&mut self) {
        if let Some(queues) = self.queues.take() {
            queues.pass_turn(&self.key, StepAside::No);
        }
    }
}

/// Where a request stands on arrival.
pub(crate) enum Entry<B: LockBackend> {
    /// Nobody here holds or asks for the key: this request asks the backend.
    Turn(Turn<B>),
    /// Someone does: wait in line.
    Queued(Place<B>),
}

/// A place in a key's line. Dropping it (a cancelled request) leaves the line.
pub(crate) struct Place<B: LockBackend> {
    queues: Arc<LocalQueues<B>>,
    key: LockKey,
    id: u64,
    grant: oneshot::Receiver<Grant<B>>,
}

impl<B: LockBackend> Place<B> {
    /// Waits for the front of the line until `deadline`. `None` when the deadline came
    /// first: the place is given up.
    pub(crate) async fn wait(mut self, deadline: Instant) -> Option<Grant<B>> {
        match tokio::time::timeout_at(deadline, &mut self.grant).await {
            Ok(grant) => grant.ok(),
            Err(_) => {
                // Leave the line, then take a grant that may have been sent just before.
                self.leave();
                self.grant.close();
                self.grant.try_recv().ok()
            }
        }
    }

    fn leave(&self) {
        if let Some(queue) = self.queues.keys().get_mut(&self.key) {
            queue.waiters.retain(|waiter| waiter.id != self.id);
        }
    }
}

impl<B: LockBackend> Drop for Place<B> {
    fn drop(&mut self) {
        // A grant already sent to this place drops with the receiver, after the queues'
        // lock is released: a lock goes on to the next waiter, a turn passes on.
        self.leave();
    }
}

impl<B: LockBackend> LocalQueues<B> {
    pub(crate) fn new(max_hand_offs: u32) -> Arc<Self> {
        Arc::new(Self {
            keys: Mutex::default(),
            max_hand_offs,
            next_id: AtomicU64::new(0),
        })
    }

    fn keys(&self) -> MutexGuard<'_, HashMap<LockKey, KeyQueue<B>>> {
        // Grants are never dropped while this lock is held (their drop re-enters), and
        // each critical section leaves the map consistent.
        self.keys.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Joins the line for `key`, or gets the turn if there is no line.
    pub(crate) fn enter(self: &Arc<Self>, key: &LockKey) -> Entry<B> {
        let mut keys = self.keys();
        match keys.entry(key.clone()) {
            hash_map::Entry::Vacant(vacant) => {
                vacant.insert(KeyQueue {
                    waiters: VecDeque::new(),
                    hand_offs: 0,
                });
                Entry::Turn(Turn::new(self.clone(), key.clone()))
            }
            hash_map::Entry::Occupied(mut occupied) => {
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                let (sender, receiver) = oneshot::channel();
                occupied
                    .get_mut()
                    .waiters
                    .push_back(Waiter { id, grant: sender });
                Entry::Queued(Place {
                    queues: self.clone(),
                    key: key.clone(),
                    id,
                    grant: receiver,
                })
            }
        }
    }

    /// Gives the lock to the first waiter still waiting, unless the hand-off cap is
    /// reached. The offer comes back when nobody took it.
    pub(crate) fn hand_off(&self, key: &LockKey, mut offer: HandOff<B>) -> Result<(), HandOff<B>> {
        let mut keys = self.keys();
        let Some(queue) = keys.get_mut(key) else {
            return Err(offer);
        };
        if queue.hand_offs >= self.max_hand_offs {
            return Err(offer);
        }
        while let Some(waiter) = queue.waiters.pop_front() {
            match waiter.grant.send(Grant::HandOff(offer)) {
                Ok(()) => {
                    queue.hand_offs += 1;
                    crate::observe::hand_off();
                    tracing::trace!(%key, hand_offs = queue.hand_offs, "lock handed off");
                    return Ok(());
                }
                // That waiter was cancelled; try the next.
                Err(Grant::HandOff(back)) => offer = back,
                Err(Grant::Turn { .. }) => unreachable!("a hand-off came back as a turn"),
            }
        }
        Err(offer)
    }

    /// After a release in the backend (or a turn given up), gives the turn to ask the
    /// backend to the first waiter still waiting; with none, the key is idle here.
    pub(crate) fn pass_turn(self: &Arc<Self>, key: &LockKey, step_aside: StepAside) {
        let mut keys = self.keys();
        let Some(queue) = keys.get_mut(key) else {
            return;
        };
        queue.hand_offs = 0;
        while let Some(waiter) = queue.waiters.pop_front() {
            let turn = Turn::new(self.clone(), key.clone());
            match waiter.grant.send(Grant::Turn { turn, step_aside }) {
                Ok(()) => return,
                // Cancelled; this unused turn must not pass itself on while we hold the lock.
                Err(Grant::Turn { mut turn, .. }) => turn.queues = None,
                Err(Grant::HandOff(_)) => unreachable!("a turn came back as a hand-off"),
            }
        }
        keys.remove(key);
    }

    /// How many keys are busy here (held or asked for).
    pub(crate) fn busy_keys(&self) -> usize {
        self.keys().len()
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::atomic::AtomicUsize, time::Duration};

    use uuid::Uuid;

    use super::*;
    use crate::{
        Acquire, BackendError, InMemoryBackend, Released,
        acquire::{Backoff, WaitPolicy, acquire},
    };

    /// The in-process backend, counting the calls that reach it.
    #[derive(Clone, Default)]
    struct Counting {
        inner: InMemoryBackend,
        acquires: Arc<AtomicUsize>,
        releases: Arc<AtomicUsize>,
    }

    impl LockBackend for Counting {
        async fn try_acquire(
            &self,
            key: &LockKey,
            token: Uuid,
            ttl: Duration,
        ) -> Result<Acquire, BackendError> {
            self.acquires.fetch_add(1, Ordering::SeqCst);
            self.inner.try_acquire(key, token, ttl).await
        }
        async fn release(&self, key: &LockKey, token: Uuid) -> Result<Released, BackendError> {
            self.releases.fetch_add(1, Ordering::SeqCst);
            self.inner.release(key, token).await
        }
        async fn extend(
            &self,
            key: &LockKey,
            token: Uuid,
            ttl: Duration,
        ) -> Result<bool, BackendError> {
            self.inner.extend(key, token, ttl).await
        }
    }

    fn policy() -> WaitPolicy {
        WaitPolicy {
            ttl: Duration::from_secs(10),
            max_wait: Duration::from_secs(60),
            backoff: Backoff {
                base: Duration::from_millis(50),
                max: Duration::from_millis(250),
            },
            renews: true,
        }
    }

    /// Twenty requests for one key, arriving one after another while it is held: they get
    /// it in arrival order, each from its predecessor, with one backend acquire and, at
    /// the cap, a release.
    #[tokio::test(start_paused = true)]
    async fn waiters_get_the_lock_in_arrival_order() {
        let backend = Counting::default();
        let queues = LocalQueues::new(100);
        let key = LockKey::from("hot");
        let order = Arc::new(Mutex::new(Vec::new()));
        let first = acquire(backend.clone(), key.clone(), policy(), Some(queues.clone())).await;
        let first = first.unwrap();
        let mut tasks = Vec::new();
        for i in 0..20 {
            let (backend, key, queues, order) =
                (backend.clone(), key.clone(), queues.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let acquired = acquire(backend, key, policy(), Some(queues)).await.unwrap();
                order.lock().unwrap().push(i);
                tokio::time::sleep(Duration::from_millis(1)).await;
                acquired.guard.release(Duration::from_secs(1)).await;
            }));
            tokio::task::yield_now().await; // let it join the line before the next comes
        }
        first.guard.release(Duration::from_secs(1)).await;
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), (0..20).collect::<Vec<_>>());
        assert_eq!(
            backend.acquires.load(Ordering::SeqCst),
            1,
            "hand-offs need no backend call"
        );
        assert_eq!(backend.releases.load(Ordering::SeqCst), 1);
        assert_eq!(queues.busy_keys(), 0);
        assert_eq!(backend.inner.held_count(), 0);
    }

    /// With a cap of 2, the lock goes back to the backend after every third holder.
    #[tokio::test(start_paused = true)]
    async fn hand_offs_stop_at_the_cap() {
        let backend = Counting::default();
        let queues = LocalQueues::new(2);
        let key = LockKey::from("hot");
        let first = acquire(backend.clone(), key.clone(), policy(), Some(queues.clone()))
            .await
            .unwrap();
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (backend, key, queues) = (backend.clone(), key.clone(), queues.clone());
                tokio::spawn(async move {
                    let acquired = acquire(backend, key, policy(), Some(queues)).await.unwrap();
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    acquired.guard.release(Duration::from_secs(1)).await;
                })
            })
            .collect();
        tokio::task::yield_now().await;
        first.guard.release(Duration::from_secs(1)).await;
        for task in tasks {
            task.await.unwrap();
        }
        // 9 holders in runs of 3: 3 acquires and 3 releases in the backend.
        assert_eq!(backend.acquires.load(Ordering::SeqCst), 3);
        assert_eq!(backend.releases.load(Ordering::SeqCst), 3);
        assert_eq!(queues.busy_keys(), 0);
    }

    /// A waiter whose request is dropped leaves the line and never receives the lock; the
    /// one behind it gets it.
    #[tokio::test(start_paused = true)]
    async fn cancelled_waiters_leave_the_line() {
        let backend = Counting::default();
        let queues = LocalQueues::new(8);
        let key = LockKey::from("hot");
        let first = acquire(backend.clone(), key.clone(), policy(), Some(queues.clone()))
            .await
            .unwrap();
        let cancelled = tokio::spawn(acquire(
            backend.clone(),
            key.clone(),
            policy(),
            Some(queues.clone()),
        ));
        tokio::task::yield_now().await;
        let next = tokio::spawn(acquire(
            backend.clone(),
            key.clone(),
            policy(),
            Some(queues.clone()),
        ));
        tokio::task::yield_now().await;
        cancelled.abort();
        assert!(cancelled.await.is_err_and(|err| err.is_cancelled()));
        first.guard.release(Duration::from_secs(1)).await;
        let next = next.await.unwrap().unwrap();
        assert_eq!(next.held.key(), &key);
        drop(next);
        tokio::task::yield_now().await;
        assert_eq!(queues.busy_keys(), 0);
        assert_eq!(
            backend.inner.held_count(),
            0,
            "the lock outlived its last holder"
        );
    }

    /// A waiter that runs out of time leaves the line with "contended", and the line goes on.
    #[tokio::test(start_paused = true)]
    async fn a_waiter_past_its_deadline_gives_up_its_place() {
        let backend = Counting::default();
        let queues = LocalQueues::new(8);
        let key = LockKey::from("hot");
        let first = acquire(backend.clone(), key.clone(), policy(), Some(queues.clone()))
            .await
            .unwrap();
        let impatient = WaitPolicy {
            max_wait: Duration::from_millis(100),
            ..policy()
        };
        let gave_up = acquire(
            backend.clone(),
            key.clone(),
            impatient,
            Some(queues.clone()),
        )
        .await;
        assert!(matches!(
            gave_up,
            Err(crate::acquire::AcquireError::Contended { .. })
        ));
        first.guard.release(Duration::from_secs(1)).await;
        assert_eq!(queues.busy_keys(), 0);
        assert_eq!(backend.inner.held_count(), 0);
    }
}
