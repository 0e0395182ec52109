//! Locks on several independent Redis servers, by majority (DESIGN §7).

use std::{fmt, sync::Arc, time::Duration};

use futures_util::future::{join_all, select_all};
use tokio::time::Instant;
use uuid::Uuid;

use super::{Acquire, BackendError, LockBackend, Released, redis::RedisBackend};
use crate::{key::LockKey, lease::drift};

/// Default bound on each node's answer during an acquisition: a node slower than this is
/// counted as a refusal rather than allowed to eat into the lease.
const DEFAULT_NODE_TIMEOUT: Duration = Duration::from_millis(100);

/// A backend on N independent Redis servers (3, 5, 7…): the Redlock algorithm.
///
/// An acquisition asks every node at once, each bounded by the node timeout, and holds
/// the lock when a majority (N/2 + 1) granted it and time is left of the lease: validity
/// = ttl − elapsed − drift, drift = ttl · 1 % + 2 ms. Otherwise it releases on every node
/// that granted it or did not answer, so no partial lock stays behind, and the layer's
/// backoff tries again with a fresh token (a late release of the failed attempt then
/// finds nothing of the new one to delete). Release and
/// extend go to every node; an extension needs a majority too.
///
/// Each node is a [`RedisBackend`] with its own pool, prefix and command timeout; the
/// scripts are the same as on one server. A waiter listens for release notifications on
/// every node that has them on (a holder's majority may skip any one node).
///
/// **Fencing**: no tokens. There is no single counter across nodes, and numbers made from
/// per-node counters (the largest of a majority's, say) do not grow with every
/// acquisition when successive majorities differ. Where a late write by a stalled holder
/// must be refused, use [`RedisBackend`] with fencing on one server that persists and
/// never evicts, or a consensus store.
///
/// **What holds**: while a majority of nodes is up and their clocks run at about the same
/// rate, at most one holder at a time, even with a minority down, frozen or restarted. A
/// node restarted *empty* during a hold lowers the holder's majority by one: when the
/// holder had a bare majority (2 of 3, say, with the third node busy or slow at the time),
/// one such restart is enough to let a second holder in (`tests/redlock_model.rs` finds
/// that sequence). Run nodes with persistence, or keep a crashed node down for a ttl
/// before it rejoins.
///
/// A node that did not answer an acquisition in time, and whose release then did not get
/// through either, may still run the acquisition later and hold the key for the failed
/// attempt's token until its lease ends; that token is never used again, and the node is
/// a minority of that attempt.
#[derive(Clone)]
pub struct RedlockBackend {
    nodes: Arc<[RedisBackend]>,
    node_timeout: Duration,
}

impl RedlockBackend {
    /// A backend on `nodes`, with a 100 ms node timeout.
    ///
    /// # Panics
    ///
    /// When `nodes` is empty.
    pub fn new(nodes: Vec<RedisBackend>) -> Self {
        assert!(!nodes.is_empty(), "RedlockBackend needs at least one node");
        Self {
            nodes: nodes.into(),
            node_timeout: DEFAULT_NODE_TIMEOUT,
        }
    }

    /// Bounds each node's answer during an acquisition, release or extension (default
    /// 100 ms). Keep it a small fraction of the ttl: the slowest answer counted is taken
    /// off the lease.
    pub fn node_timeout(mut self, timeout: Duration) -> Self {
        self.node_timeout = timeout;
        self
    }

    /// The nodes, in order.
    pub fn nodes(&self) -> &[RedisBackend] {
        &self.nodes
    }

    /// How many nodes make a majority.
    pub fn quorum(&self) -> usize {
        self.nodes.len() / 2 + 1
    }

    /// Runs `op` on every node at once, each bounded by the node timeout.
    async fn on_all<'a, T, F, Fut>(&'a self, op: F) -> Vec<Result<T, BackendError>>
    where
        F: Fn(&'a RedisBackend) -> Fut,
        Fut: Future<Output = Result<T, BackendError>> + 'a,
    {
        self.on_nodes(self.nodes.iter(), op).await
    }

    /// Runs `op` on `nodes` at once, each bounded by the node timeout.
    async fn on_nodes<'a, T, F, Fut>(
        &'a self,
        nodes: impl Iterator<Item = &'a RedisBackend>,
        op: F,
    ) -> Vec<Result<T, BackendError>>
    where
        F: Fn(&'a RedisBackend) -> Fut,
        Fut: Future<Output = Result<T, BackendError>> + 'a,
    {
        let timeout = self.node_timeout;
        join_all(nodes.map(|node| {
            let call = op(node);
            async move {
                tokio::time::timeout(timeout, call)
                    .await
                    .unwrap_or_else(|_| {
                        // Cut short before the node's own timeout could drop its connection:
                        // drop it here, or a black-holed connection would be reused.
                        node.reset_connection();
                        Err(BackendError::Timeout(timeout))
                    })
            }
        }))
        .await
    }
}

impl LockBackend for RedlockBackend {
    async fn try_acquire(
        &self,
        key: &LockKey,
        token: Uuid,
        ttl: Duration,
    ) -> Result<Acquire, BackendError> {
        let started = Instant::now();
        let answers = self
            .on_all(|node| node.attempt_in_script(key, token, ttl))
            .await;
        let validity = ttl
            .checked_sub(started.elapsed())
            .and_then(|left| left.checked_sub(drift(ttl)));
        let granted = answers
            .iter()
            .filter(|answer| matches!(answer, Ok(Acquire::Acquired { .. })))
            .count();
        if granted >= self.quorum() && validity.is_some_and(|left| !left.is_zero()) {
            return Ok(Acquire::Acquired {
                fencing_token: None,
            });
        }
        // No majority (or no time left): undo the attempt wherever it may have landed,
        // on the nodes that granted it and on those that did not answer (they may have
        // run it), so that nothing partial stays behind to block the next attempt. Only
        // a node that said "held by another" certainly holds nothing of ours. The layer
        // retries with a fresh token (`retry_with_same_token`), so a release of this one
        // that lands late cannot delete a later grant.
        let undo = self
            .nodes
            .iter()
            .zip(&answers)
            .filter(|(_, answer)| !matches!(answer, Ok(Acquire::Held { .. })))
            .map(|(node, _)| node);
        // Quietly: a published release would wake the waiters of this very attempt.
        let _ = self.on_nodes(undo, |node| node.undo(key, token)).await;
        let answered = answers.iter().filter(|answer| answer.is_ok()).count();
        if answered < self.quorum() {
            let last_error = answers.into_iter().filter_map(Result::err).last();
            return Err(last_error.unwrap_or_else(|| {
                BackendError::Unavailable("no majority of Redlock nodes answered".into())
            }));
        }
        // Held elsewhere: the shortest lease reported says when to look again.
        let remaining = answers
            .iter()
            .filter_map(|answer| match answer {
                Ok(Acquire::Held { remaining }) => *remaining,
                _ => None,
            })
            .min();
        Ok(Acquire::Held { remaining })
    }

    async fn release(&self, key: &LockKey, token: Uuid) -> Result<Released, BackendError> {
        let answers = self.on_all(|node| node.release(key, token)).await;
        let mut released = Released::default();
        let mut held_on = 0;
        let mut failures = Vec::new();
        for answer in answers {
            match answer {
                Ok(node) => {
                    held_on += usize::from(node.was_held);
                    released.notified += node.notified;
                    released.unnotified_waiters |= node.unnotified_waiters;
                }
                Err(err) => failures.push(err),
            }
        }
        // The lock was ours up to the release only if a majority still held our token;
        // when the nodes that did not answer could make the difference, nobody knows.
        // Nodes that did not answer keep the key until its lease ends.
        released.was_held = held_on >= self.quorum();
        match failures.pop() {
            Some(err) if !released.was_held && held_on + failures.len() + 1 >= self.quorum() => {
                Err(err)
            }
            _ => Ok(released),
        }
    }

    async fn extend(
        &self,
        key: &LockKey,
        token: Uuid,
        ttl: Duration,
    ) -> Result<bool, BackendError> {
        let answers = self.on_all(|node| node.extend(key, token, ttl)).await;
        let extended = answers
            .iter()
            .filter(|answer| matches!(answer, Ok(true)))
            .count();
        if extended >= self.quorum() {
            return Ok(true);
        }
        let answered = answers.iter().filter(|answer| answer.is_ok()).count();
        if answered >= self.quorum() {
            Ok(false) // a majority answered, and no majority still holds it for us
        } else {
            Err(answers
                .into_iter()
                .filter_map(Result::err)
                .last()
                .unwrap_or_else(|| {
                    BackendError::Unavailable("no majority of Redlock nodes answered".into())
                }))
        }
    }

    /// A failed attempt is released on every node, and such a release may land late on a
    /// node whose network is slow: a retry with the same token could then lose its grant
    /// there without knowing. Every attempt gets a fresh token instead.
    fn retry_with_same_token(&self) -> bool {
        false
    }
}

/// Release notifications (see `backend::wake`).
impl RedlockBackend {
    /// The releases heard on every node, summed: a holder's majority may skip any one
    /// node, and its release publishes only where it deleted.
    pub(crate) fn release_epoch(&self, key: &LockKey) -> u64 {
        self.nodes
            .iter()
            .fold(0u64, |sum, node| sum.wrapping_add(node.release_epoch(key)))
    }

    /// Waits on every node's notifications at once (each node that has them on), and
    /// returns at the first release heard anywhere.
    pub(crate) fn wait_for_release(
        &self,
        key: &LockKey,
        epoch: u64,
        timeout: Duration,
    ) -> impl Future<Output = ()> + Send {
        // Each node's wait starts from the epoch read here; the sum of those same readings
        // is compared with the caller's, so a release heard in between is not missed.
        let epochs: Vec<u64> = self
            .nodes
            .iter()
            .map(|node| node.release_epoch(key))
            .collect();
        let moved = epochs.iter().fold(0u64, |sum, e| sum.wrapping_add(*e)) != epoch;
        let nodes = self.nodes.clone();
        let key = key.clone();
        async move {
            if moved {
                return;
            }
            let waits = nodes
                .iter()
                .zip(epochs)
                .map(|(node, epoch)| Box::pin(node.wait_for_release(&key, epoch, timeout)));
            select_all(waits).await;
        }
    }
}

impl fmt::Debug for RedlockBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedlockBackend")
            .field("nodes", &self.nodes.len())
            .field("quorum", &self.quorum())
            .field("node_timeout", &self.node_timeout)
            .finish()
    }
}
