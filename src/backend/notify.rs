//! Release notifications over Redis pub/sub (DESIGN §5).
//!
//! One subscriber connection per backend (shared by its clones) serves every waiter of the
//! process. A channel is subscribed when its first waiter arrives and unsubscribed once it
//! has had no waiter for [`LINGER`], so a hot key is not re-subscribed between waits.
//! Pub/sub is at-most-once: waiters still wake on their backoff, and a lost connection
//! wakes them all and is re-established by the next wait.
//!
//! Each channel counts the releases heard on it (its *epoch*). A waiter reads the epoch
//! before its attempt and returns at once if it moved by the time it starts waiting: a
//! release that lands between a failed attempt and the wait is not missed.

use std::{
    collections::HashMap,
    future::poll_fn,
    pin::pin,
    sync::{Arc, Mutex, MutexGuard, PoisonError, Weak},
    time::Duration,
};

use deadpool_redis::redis::{
    Client, RedisError,
    aio::{PubSubSink, PubSubStream},
};
use futures_core::Stream;
use tokio::{
    sync::Notify,
    time::{Instant, MissedTickBehavior},
};

/// How long a channel stays subscribed without waiters.
const LINGER: Duration = Duration::from_secs(2);

pub(crate) struct Notifier {
    client: Client,
    /// Bounds connecting and each (un)subscribe.
    timeout: Duration,
    state: Mutex<State>,
    /// Serialises subscribes and unsubscribes, so that an unsubscribe of an idle channel
    /// can never overtake a new waiter's subscribe to it.
    changes: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct State {
    channels: HashMap<String, Channel>,
    link: Option<Link>,
    generation: u64,
}

struct Channel {
    notify: Arc<Notify>,
    epoch: u64,
    waiting: usize,
    /// The generation of the link this channel is subscribed on.
    subscribed_on: Option<u64>,
    idle_since: Instant,
}

#[derive(Clone)]
struct Link {
    sink: PubSubSink,
    generation: u64,
}

fn timed_out() -> RedisError {
    std::io::Error::from(std::io::ErrorKind::TimedOut).into()
}

impl Notifier {
    pub(crate) fn new(client: Client, timeout: Duration) -> Self {
        Self {
            client,
            timeout,
            state: Mutex::default(),
            changes: tokio::sync::Mutex::new(()),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Each critical section leaves the maps consistent, even if a panic cut it short.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether this process is listening on `channel` (then a release's receiver count
    /// includes us).
    pub(crate) fn listens_on(&self, channel: &str) -> bool {
        let state = self.state();
        let generation = state.link.as_ref().map(|link| link.generation);
        state
            .channels
            .get(channel)
            .is_some_and(|c| c.subscribed_on.is_some() && c.subscribed_on == generation)
    }

    /// Releases heard on `channel` so far.
    pub(crate) fn epoch(&self, channel: &str) -> u64 {
        self.state().channels.get(channel).map_or(0, |c| c.epoch)
    }

    /// Waits until a release is published on `channel`, or `timeout` passes. Returns at
    /// once if a release was heard since `epoch`, and right after a new subscription (a
    /// release may have slipped by before it).
    pub(crate) async fn wait(self: &Arc<Self>, channel: &str, epoch: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let (notify, subscribed) = {
            let mut state = self.state();
            let generation = state.link.as_ref().map(|link| link.generation);
            let entry = state
                .channels
                .entry(channel.to_owned())
                .or_insert_with(|| Channel {
                    notify: Arc::default(),
                    epoch: 0,
                    waiting: 0,
                    subscribed_on: None,
                    idle_since: Instant::now(),
                });
            if entry.epoch != epoch {
                return;
            }
            entry.waiting += 1;
            let subscribed = entry.subscribed_on.is_some() && entry.subscribed_on == generation;
            (entry.notify.clone(), subscribed)
        };
        let _interest = Interest {
            notifier: self,
            channel,
        };
        let mut notified = pin!(notify.notified());
        notified.as_mut().enable();
        if !subscribed {
            match tokio::time::timeout_at(deadline, self.subscribe(channel)).await {
                Ok(Ok(())) => return,
                Ok(Err(err)) => {
                    tracing::debug!(%err, "release notifications unavailable; backing off")
                }
                Err(_) => return,
            }
        }
        let _ = tokio::time::timeout_at(deadline, notified).await;
    }

    async fn subscribe(self: &Arc<Self>, channel: &str) -> Result<(), RedisError> {
        let _changing = self.changes.lock().await;
        let Link {
            mut sink,
            generation,
        } = self.link().await?;
        if self.listens_on(channel) {
            return Ok(()); // another waiter did it while we queued
        }
        // Marked first: if this future is cut short, Redis still runs the SUBSCRIBE, and
        // the sweep must know to undo it.
        self.mark(channel, Some(generation));
        let outcome = tokio::time::timeout(self.timeout, sink.subscribe(channel))
            .await
            .unwrap_or_else(|_| Err(timed_out()));
        if outcome.is_err() {
            // The connection may be open but dead: the next wait makes a new one.
            self.mark(channel, None);
            self.drop_link(generation);
        }
        outcome
    }

    fn mark(&self, channel: &str, generation: Option<u64>) {
        if let Some(entry) = self.state().channels.get_mut(channel) {
            entry.subscribed_on = generation;
        }
    }

    fn drop_link(&self, generation: u64) {
        let mut state = self.state();
        if state
            .link
            .as_ref()
            .is_some_and(|link| link.generation == generation)
        {
            state.link = None;
        }
    }

    /// The live subscriber connection, made if there is none.
    async fn link(self: &Arc<Self>) -> Result<Link, RedisError> {
        if let Some(link) = self.state().link.clone() {
            return Ok(link);
        }
        let pubsub = tokio::time::timeout(self.timeout, self.client.get_async_pubsub())
            .await
            .map_err(|_| timed_out())??;
        let (sink, stream) = pubsub.split();
        let mut state = self.state();
        if let Some(link) = state.link.clone() {
            return Ok(link); // a concurrent wait connected first; ours closes on drop
        }
        state.generation += 1;
        let link = Link {
            sink,
            generation: state.generation,
        };
        state.link = Some(link.clone());
        tokio::spawn(listen(Arc::downgrade(self), stream, state.generation));
        Ok(link)
    }

    /// Unsubscribes the channels idle for longer than [`LINGER`], and forgets them.
    async fn sweep(&self, generation: u64) {
        let _changing = self.changes.lock().await;
        let (idle, sink) = {
            let mut state = self.state();
            let Some(link) = state
                .link
                .clone()
                .filter(|link| link.generation == generation)
            else {
                return;
            };
            let now = Instant::now();
            let mut idle = Vec::new();
            state.channels.retain(|name, entry| {
                let keep = entry.waiting > 0 || now.duration_since(entry.idle_since) < LINGER;
                if !keep && entry.subscribed_on == Some(generation) {
                    idle.push(name.clone());
                }
                keep
            });
            (idle, link.sink)
        };
        if !idle.is_empty() {
            let mut sink = sink;
            let _ = tokio::time::timeout(self.timeout, sink.unsubscribe(&idle)).await;
        }
    }
}

/// A waiter's registration on a channel, withdrawn on drop.
struct Interest<'a> {
    notifier: &'a Notifier,
    channel: &'a str,
}

impl Drop for Interest<'_> {
    fn drop(&mut self) {
        if let Some(entry) = self.notifier.state().channels.get_mut(self.channel) {
            entry.waiting -= 1;
            if entry.waiting == 0 {
                entry.idle_since = Instant::now();
            }
        }
    }
}

/// Delivers messages to their channel's waiters and unsubscribes idle channels, until the
/// connection, its link or the notifier goes away.
async fn listen(notifier: Weak<Notifier>, stream: PubSubStream, generation: u64) {
    let mut stream = Box::pin(stream);
    let mut sweep = tokio::time::interval(LINGER);
    sweep.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        let message = tokio::select! {
            message = poll_fn(|cx| stream.as_mut().poll_next(cx)) => message,
            _ = sweep.tick() => {
                let Some(notifier) = notifier.upgrade() else { return };
                let current = notifier.state().link.as_ref().map(|link| link.generation);
                if current != Some(generation) {
                    return; // replaced: dropping the stream closes this connection
                }
                notifier.sweep(generation).await;
                continue;
            }
        };
        let Some(notifier) = notifier.upgrade() else {
            return;
        };
        let mut state = notifier.state();
        match message {
            Some(message) => {
                if let Some(entry) = state.channels.get_mut(message.get_channel_name()) {
                    entry.epoch += 1;
                    entry.notify.notify_waiters();
                }
            }
            None => {
                // The connection is gone: forget it, and wake everyone so that they retry
                // now and subscribe again on a new connection.
                tracing::warn!(
                    "release notification connection lost; reconnecting on the next wait"
                );
                if state
                    .link
                    .as_ref()
                    .is_some_and(|link| link.generation == generation)
                {
                    state.link = None;
                }
                for entry in state.channels.values_mut() {
                    entry.subscribed_on = None;
                    entry.epoch += 1;
                    entry.notify.notify_waiters();
                }
                return;
            }
        }
    }
}
