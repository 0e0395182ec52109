//! Waiting in line within one process, and handing the lock down the line (DESIGN §5).
//!
//! All requests of one [`Locker`](crate::Locker) (and the layers made from it) that want
//! the same key queue here, first come first served. Only the one whose *turn* it is
//! talks to the backend; the others wait on a channel of their own, costing the backend
//! nothing. When the holder finishes and someone is queued, the lock passes straight to
//! them without leaving the backend (a *hand-off*). After `max_hand_offs` consecutive
//! hand-offs the lock is released for real, so that other processes get their chance.
//!
//! The line knows nothing of backends or guards: what is handed off is a `T` (the
//! locker's guard, with the lease it carries).

use std::{
    collections::{HashMap, VecDeque, hash_map},
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::{sync::oneshot, time::Instant};

use crate::{key::LockKey, observe};

/// In fair mode, how many requests that join a process's line after its grant may still
/// be served in that turn. Strict first come, first served (0) makes every turn of a small
/// process (2 workers) two critical sections for one cross-process hand-over; one more
/// spreads that hand-over over three, and a turn stays at most one section longer than
/// its waiters, so a request waits at most one round of the line plus one request per
/// process ahead of it.
pub(crate) const LATE_ARRIVALS_PER_TURN: u32 = 1;

/// The queues of one layer or locker, by key. A key has an entry while someone of this
/// process holds its lock or has the turn to ask for it.
pub(crate) struct Line<T> {
    keys: Mutex<Keys<T>>,
    max_hand_offs: u32,
    next_id: AtomicU64,
}

/// The lines by key. Hashed with foldhash, seeded per map: SipHash cost three hashes of
/// the key per uncontended critical section about 500 instructions more.
type Keys<T> = HashMap<LockKey, KeyLine<T>, foldhash::fast::RandomState>;

/// One key's line.
struct KeyLine<T> {
    waiters: VecDeque<Waiter<T>>,
    /// Hand-offs since the lock last came from the backend.
    hand_offs: u32,
    /// In fair mode, the hand-offs this holding may make: the waiters already in line
    /// when the lock came from the backend and [`LATE_ARRIVALS_PER_TURN`] more (at most
    /// the cap). `None`: the cap.
    budget: Option<u32>,
}

struct Waiter<T> {
    id: u64,
    grant: oneshot::Sender<Grant<T>>,
}

/// What a queued waiter is given when it reaches the front.
pub(crate) enum Grant<T> {
    /// The lock itself.
    HandOff(T),
    /// The turn to ask the backend, after the release that made it. `step_aside`: whether
    /// to give waiters of other processes a moment first.
    Turn {
        turn: Turn<T>,
        step_aside: StepAside,
    },
}

/// Why [`Line::hand_off`] did not hand the lock on.
pub(crate) enum NotHandedOff<T> {
    /// Nobody waits, hand-offs are off, or the offer was declined: release it.
    Nobody,
    /// Requests wait, but this turn's hand-offs are used up.
    TurnOver,
    /// Every waiter had gone by the time the offer was made: the offer, back.
    Back(T),
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

/// The right, and the duty, to ask the backend for a key on behalf of this process.
/// Dropped unused (the asker gave up or was cancelled), it passes to the next waiter.
pub(crate) struct Turn<T> {
    queues: Option<Arc<Line<T>>>,
    key: LockKey,
}

impl<T> Turn<T> {
    pub(crate) fn new(queues: Arc<Line<T>>, key: LockKey) -> Self {
        Self {
            queues: Some(queues),
            key,
        }
    }

    /// The lock was acquired from the backend: the key stays busy here, now under its
    /// holder's guard. No look-up: the hand-off count is already 0 and the fair budget
    /// unset, as a turn is only made for a new line or by `pass_turn`, which resets both,
    /// and nobody here holds the lock (so nobody hands it off) while a turn is out.
    pub(crate) fn used(mut self) {
        self.queues = None;
    }

    /// As [`used`](Self::used), in fair mode: the lock came from the line in the backend,
    /// where waiters of other processes stand. It may pass down this process's line to
    /// the waiters already queued here (they stood behind this process's entry) and to
    /// [`LATE_ARRIVALS_PER_TURN`] who come later, up to the cap; the rest queue again in
    /// the backend, behind the others.
    pub(crate) fn used_fairly(mut self) {
        if let Some(queues) = self.queues.take() {
            queues.continue_turn(&self.key);
        }
    }
}

/// Gives the queue its next turn when dropped: after a background release, even if the
/// runtime drops the release task before it runs.
pub(crate) struct PassTurnOnDrop<T> {
    pub(crate) queues: Arc<Line<T>>,
    pub(crate) key: LockKey,
    pub(crate) step_aside: StepAside,
}

impl<T> Drop for PassTurnOnDrop<T> {
    fn drop(&mut self) {
        self.queues.pass_turn(&self.key, self.step_aside);
    }
}

impl<T> Drop for Turn<T> {
    fn drop(&mut self) {
        if let Some(queues) = self.queues.take() {
            queues.pass_turn(&self.key, StepAside::No);
        }
    }
}

/// Where a request stands on arrival.
pub(crate) enum Entry<T> {
    /// Nobody here holds or asks for the key: this request asks the backend.
    Turn(Turn<T>),
    /// Someone does: wait in line.
    Queued(Place<T>),
}

/// A place in a key's line. Dropping it (a cancelled request) leaves the line.
pub(crate) struct Place<T> {
    queues: Arc<Line<T>>,
    key: LockKey,
    id: u64,
    grant: oneshot::Receiver<Grant<T>>,
}

impl<T> Place<T> {
    /// Waits for the front of the line until `deadline`. `None` when the deadline came
    /// first: the place is given up.
    pub(crate) async fn wait(mut self, deadline: Instant) -> Option<Grant<T>> {
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

impl<T> Drop for Place<T> {
    fn drop(&mut self) {
        // A grant already sent to this place drops with the receiver, after the queues'
        // lock is released: a lock goes on to the next waiter, a turn passes on.
        self.leave();
    }
}

impl<T> Line<T> {
    pub(crate) fn new(max_hand_offs: u32) -> Arc<Self> {
        Arc::new(Self {
            keys: Mutex::default(),
            max_hand_offs,
            next_id: AtomicU64::new(0),
        })
    }

    fn keys(&self) -> MutexGuard<'_, Keys<T>> {
        // Grants are never dropped while this lock is held (their drop re-enters), and
        // each critical section leaves the map consistent.
        self.keys.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Joins the line for `key`, or gets the turn if there is no line.
    pub(crate) fn enter(self: &Arc<Self>, key: &LockKey) -> Entry<T> {
        let mut keys = self.keys();
        match keys.entry(key.clone()) {
            hash_map::Entry::Vacant(vacant) => {
                vacant.insert(KeyLine {
                    waiters: VecDeque::new(),
                    hand_offs: 0,
                    budget: None,
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
    /// reached. The offer is made (by `offer`, which may decline with `None`) only when
    /// someone waits, as the lock's release is usually uncontended; it comes back when
    /// made and nobody took it.
    pub(crate) fn hand_off(
        &self,
        key: &LockKey,
        offer: impl FnOnce() -> Option<T>,
    ) -> Result<(), NotHandedOff<T>> {
        let mut keys = self.keys();
        let Some(queue) = keys.get_mut(key) else {
            return Err(NotHandedOff::Nobody);
        };
        if queue.waiters.is_empty() || self.max_hand_offs == 0 {
            return Err(NotHandedOff::Nobody);
        }
        if queue.hand_offs >= queue.budget.unwrap_or(self.max_hand_offs) {
            return Err(NotHandedOff::TurnOver);
        }
        let Some(mut offer) = offer() else {
            return Err(NotHandedOff::Nobody);
        };
        while let Some(waiter) = queue.waiters.pop_front() {
            match waiter.grant.send(Grant::HandOff(offer)) {
                Ok(()) => {
                    queue.hand_offs += 1;
                    observe::hand_off();
                    tracing::trace!(%key, hand_offs = queue.hand_offs, "lock handed off");
                    return Ok(());
                }
                // That waiter was cancelled; try the next.
                Err(Grant::HandOff(back)) => offer = back,
                Err(Grant::Turn { .. }) => unreachable!("a hand-off came back as a turn"),
            }
        }
        Err(NotHandedOff::Back(offer))
    }

    /// Starts a new fair turn of `key` in this process without a grant: the backend kept
    /// the lock for it as nobody else was in line (see [`Turn::used_fairly`]).
    pub(crate) fn continue_turn(&self, key: &LockKey) {
        if let Some(queue) = self.keys().get_mut(key) {
            self.begin_fair_turn(queue);
        }
    }

    /// A fair turn serves the requests waiting at its start and
    /// [`LATE_ARRIVALS_PER_TURN`] more, within the hand-off cap.
    fn begin_fair_turn(&self, queue: &mut KeyLine<T>) {
        queue.hand_offs = 0;
        let waiting = u32::try_from(queue.waiters.len()).unwrap_or(u32::MAX);
        let budget = waiting.saturating_add(LATE_ARRIVALS_PER_TURN);
        queue.budget = Some(budget.min(self.max_hand_offs));
    }

    /// After a release in the backend (or a turn given up), gives the turn to ask the
    /// backend to the first waiter still waiting; with none, the key is idle here.
    pub(crate) fn pass_turn(self: &Arc<Self>, key: &LockKey, step_aside: StepAside) {
        let mut keys = self.keys();
        // One look-up, whether the turn passes on or the key's line goes.
        let hash_map::Entry::Occupied(mut entry) = keys.entry(key.clone()) else {
            return;
        };
        let queue = entry.get_mut();
        queue.hand_offs = 0;
        queue.budget = None;
        while let Some(waiter) = queue.waiters.pop_front() {
            let turn = Turn::new(self.clone(), key.clone());
            match waiter.grant.send(Grant::Turn { turn, step_aside }) {
                Ok(()) => return,
                // Cancelled; this unused turn must not pass itself on while we hold the lock.
                Err(Grant::Turn { mut turn, .. }) => turn.queues = None,
                Err(Grant::HandOff(_)) => unreachable!("a turn came back as a hand-off"),
            }
        }
        entry.remove();
    }

    /// How many keys are busy here (held or asked for).
    pub(crate) fn busy_keys(&self) -> usize {
        self.keys().len()
    }
}
