//! Release notifications over Redis pub/sub (DESIGN §5).
//!
//! One subscriber connection per backend (shared by its clones) serves every waiter of the
//! process. A channel is subscribed when its first waiter arrives and unsubscribed once it
//! has had no waiter for [`LINGER`], so a hot key is not re-subscribed between waits.
//! Pub/sub is at-most-once: waiters still wake on their backoff, and a lost connection
//! wakes them all and is re-established by the next wait.

use std::{
    collections::HashMap,
    future::poll_fn,
    pin::pin,
    sync::{Arc, Mutex, MutexGuard, PoisonError, Weak},
    time::Duration,
};

use deadpool_redis::redis::{
    Client,
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
}

#[derive(Default)]
struct State {
    channels: HashMap<String, Channel>,
    link: Option<Link>,
    generation: u64,
}

struct Channel {
    notify: Arc<Notify>,
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

impl Notifier {
    pub(crate) fn new(client: Client, timeout: Duration) -> Self {
        Self {
            client,
            timeout,
            state: Mutex::default(),
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

    /// Waits until a release is published on `channel`, or `timeout` passes. Returns
    /// early, too, right after a new subscription: a release may have slipped by before it.
    pub(crate) async fn wait(self: &Arc<Self>, channel: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let (notify, subscribed) = {
            let mut state = self.state();
            let generation = state.link.as_ref().map(|link| link.generation);
            let entry = state
                .channels
                .entry(channel.to_owned())
                .or_insert_with(|| Channel {
                    notify: Arc::default(),
                    waiting: 0,
                    subscribed_on: None,
                    idle_since: Instant::now(),
                });
            entry.waiting += 1;
            (
                entry.notify.clone(),
                entry.subscribed_on.is_some() && entry.subscribed_on == generation,
            )
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

    async fn subscribe(
        self: &Arc<Self>,
        channel: &str,
    ) -> Result<(), deadpool_redis::redis::RedisError> {
        let Link {
            mut sink,
            generation,
        } = self.link().await?;
        tokio::time::timeout(self.timeout, sink.subscribe(channel))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        if let Some(entry) = self.state().channels.get_mut(channel) {
            entry.subscribed_on = Some(generation);
        }
        Ok(())
    }

    /// The live subscriber connection, made if there is none.
    async fn link(self: &Arc<Self>) -> Result<Link, deadpool_redis::redis::RedisError> {
        if let Some(link) = self.state().link.clone() {
            return Ok(link);
        }
        let pubsub = tokio::time::timeout(self.timeout, self.client.get_async_pubsub())
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        let (sink, stream) = pubsub.split();
        let mut state = self.state();
        if let Some(link) = state.link.clone() {
            return Ok(link); // a concurrent wait connected first; ours closes on drop
        }
        state.generation += 1;
        let link = Link {
            sink: sink.clone(),
            generation: state.generation,
        };
        state.link = Some(link.clone());
        tokio::spawn(listen(Arc::downgrade(self), stream, sink, state.generation));
        Ok(link)
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
/// connection or the notifier goes away.
async fn listen(
    notifier: Weak<Notifier>,
    stream: PubSubStream,
    mut sink: PubSubSink,
    generation: u64,
) {
    let mut stream = Box::pin(stream);
    let mut sweep = tokio::time::interval(LINGER);
    sweep.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        let message = tokio::select! {
            message = poll_fn(|cx| stream.as_mut().poll_next(cx)) => message,
            _ = sweep.tick() => {
                let Some(notifier) = notifier.upgrade() else { return };
                let idle = notifier.idle_channels();
                if !idle.is_empty() {
                    let _ = tokio::time::timeout(notifier.timeout, sink.unsubscribe(&idle)).await;
                }
                continue;
            }
        };
        let Some(notifier) = notifier.upgrade() else {
            return;
        };
        let mut state = notifier.state();
        match message {
            Some(message) => {
                if let Some(entry) = state.channels.get(message.get_channel_name()) {
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
                    entry.notify.notify_waiters();
                }
                return;
            }
        }
    }
}

impl Notifier {
    /// Removes the channels idle for longer than [`LINGER`] and returns those that were
    /// subscribed, to unsubscribe.
    fn idle_channels(&self) -> Vec<String> {
        let mut state = self.state();
        let now = Instant::now();
        let mut idle = Vec::new();
        state.channels.retain(|name, entry| {
            let keep = entry.waiting > 0 || now.duration_since(entry.idle_since) < LINGER;
            if !keep && entry.subscribed_on.is_some() {
                idle.push(name.clone());
            }
            keep
        });
        idle
    }
}
