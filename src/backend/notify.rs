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
    collections::{HashMap, VecDeque},
    future::poll_fn,
    pin::pin,
    sync::{Arc, Mutex, MutexGuard, PoisonError, Weak},
    time::Duration,
};

use deadpool_redis::redis::{
    Client, ErrorKind, RedisError,
    aio::{PubSubSink, PubSubStream},
};
use futures_core::Stream;
use tokio::{
    sync::Notify,
    time::{Instant, MissedTickBehavior},
};
use uuid::Uuid;

/// How long a channel stays subscribed without waiters.
const LINGER: Duration = Duration::from_secs(2);
/// After a failed connection or subscription, waiters rely on their backoff alone for this
/// long before one tries again; it doubles with each failure in a row, up to
/// [`MAX_RETRY_PAUSE`]. A server that refuses (no channel permission, a node down) then
/// costs one attempt per pause, not one connection per wait.
const FIRST_RETRY_PAUSE: Duration = Duration::from_secs(1);
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(30);
/// The channel map is swept of idle, unsubscribed entries once it has doubled since the
/// last sweep (and holds at least this many): bounded by the live waiters and the
/// subscriptions, whether or not a connection is up.
const SWEEP_AT_LEAST: usize = 64;

/// Where the subscriber connection comes from.
pub(crate) enum Source {
    /// One server, always the same.
    Client(Client),
    /// The current primary of a Sentinel-monitored group, asked of the Sentinels at each
    /// connection (so a new connection after a failover goes to the new primary).
    #[cfg(feature = "sentinel")]
    Sentinel(tokio::sync::Mutex<deadpool_redis::redis::sentinel::SentinelClient>),
}

impl Source {
    async fn pubsub(&self) -> Result<deadpool_redis::redis::aio::PubSub, RedisError> {
        match self {
            Source::Client(client) => client.get_async_pubsub().await,
            #[cfg(feature = "sentinel")]
            Source::Sentinel(sentinel) => {
                let client = sentinel.lock().await.async_get_client().await?;
                client.get_async_pubsub().await
            }
        }
    }
}

pub(crate) struct Notifier {
    source: Source,
    /// Names this process's grant channel (see [`grant_channel`](Self::grant_channel)).
    id: Uuid,
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
    /// Size of `channels` after the last sweep.
    swept_at: usize,
    /// Connection or subscription failures in a row, and when to try again.
    failures: u32,
    retry_at: Option<Instant>,
}

struct Channel {
    notify: Arc<Notify>,
    epoch: u64,
    waiting: usize,
    /// The link this channel is subscribed on, if any.
    subscription: Option<Subscription>,
    idle_since: Instant,
    /// The last few fair-mode grants heard on the channel (see `redis::fair`), for the
    /// waiter of this process they name to take.
    grants: VecDeque<Grant>,
    /// This process's grant channel: kept subscribed (never swept), and its messages are
    /// grants for the waiters of other channels, delivered there.
    grant_channel: bool,
}

impl Channel {
    fn new(now: Instant, grant_channel: bool) -> Self {
        Self {
            notify: Arc::default(),
            epoch: 0,
            waiting: 0,
            subscription: None,
            idle_since: now,
            grants: VecDeque::new(),
            grant_channel,
        }
    }

    /// A message heard on this channel, with the grant it carried if any: kept for its
    /// waiter (the last [`GRANTS_KEPT`]), and every waiter woken.
    fn heard(&mut self, grant: Option<Grant>) {
        if let Some(grant) = grant {
            if self.grants.len() == GRANTS_KEPT {
                self.grants.pop_front();
            }
            self.grants.push_back(grant);
        }
        self.epoch += 1;
        self.notify.notify_waiters();
    }
}

/// A fair-mode grant as published by the release script: the grantee's token, the
/// server's time of the grant in ms, and the fencing token that came with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Grant {
    pub(crate) token: Uuid,
    pub(crate) server_ms: u64,
    pub(crate) fencing_token: Option<u64>,
}

/// How many grants a channel remembers: more than the waiters of one process that can be
/// granted between two of its polls (one, with the local line), fewer than a memory cost.
const GRANTS_KEPT: usize = 16;

impl Grant {
    /// A grant on a process's own channel: `<token> <server ms> <fencing token or ->
    /// <release channel>` (the channel last: a key may hold spaces), and that channel.
    fn parse_directed(payload: &[u8]) -> Option<(&str, Self)> {
        let text = std::str::from_utf8(payload).ok()?;
        let mut words = text.splitn(4, ' ');
        let token = Uuid::try_parse(words.next()?).ok()?;
        let server_ms = words.next()?.parse().ok()?;
        let fencing_token = match words.next()? {
            "-" => None,
            word => Some(word.parse().ok()?),
        };
        let channel = words.next()?;
        Some((
            channel,
            Self {
                token,
                server_ms,
                fencing_token,
            },
        ))
    }

    /// `<token> <server ms> [<fencing token>]`; `None` for anything else (a plain
    /// release's empty message).
    fn parse(payload: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(payload).ok()?;
        let mut words = text.split(' ');
        let token = Uuid::try_parse(words.next()?).ok()?;
        let server_ms = words.next()?.parse().ok()?;
        let fencing_token = match words.next() {
            Some(word) => Some(word.parse().ok()?),
            None => None,
        };
        Some(Self {
            token,
            server_ms,
            fencing_token,
        })
    }
}

/// A channel's subscription on the link of generation `generation`.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Subscription {
    generation: u64,
    /// Redis confirmed the `SUBSCRIBE`: from then on every release is heard. Until then
    /// the channel does not count as listened to.
    confirmed: bool,
}

impl State {
    fn generation(&self) -> Option<u64> {
        self.link.as_ref().map(|link| link.generation)
    }

    /// Whether `channel` is subscribed, confirmed, on the live link.
    fn listens_on(&self, channel: &str) -> bool {
        let live = self.generation();
        self.channels.get(channel).is_some_and(|c| {
            c.subscription
                .is_some_and(|sub| sub.confirmed && Some(sub.generation) == live)
        })
    }

    /// Forgets channels nobody waits on that are not subscribed on the live link (those
    /// the listener unsubscribes once idle). Needs no connection.
    fn sweep_unsubscribed(&mut self) {
        let live = self.generation();
        self.channels.retain(|_, entry| {
            entry.waiting > 0
                || entry.grant_channel
                || entry
                    .subscription
                    .is_some_and(|sub| Some(sub.generation) == live)
        });
        self.swept_at = self.channels.len();
    }

    fn failed(&mut self) {
        self.failures = self.failures.saturating_add(1);
        let pause = FIRST_RETRY_PAUSE
            .saturating_mul(1 << (self.failures - 1).min(8))
            .min(MAX_RETRY_PAUSE);
        self.retry_at = Some(Instant::now() + pause);
    }

    fn succeeded(&mut self) {
        self.failures = 0;
        self.retry_at = None;
    }
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
    pub(crate) fn new(source: Source, timeout: Duration) -> Self {
        Self {
            source,
            id: Uuid::new_v4(),
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
        self.state().listens_on(channel)
    }

    /// Whether subscriptions work: none failed since the last success.
    pub(crate) fn is_healthy(&self) -> bool {
        self.state().failures == 0
    }

    /// This process's grant channel for keys under `prefix`: `<prefix>grants:<uuid>`.
    /// It cannot be a key's channel, which always holds a `{`.
    pub(crate) fn grant_channel(&self, prefix: &str) -> String {
        format!("{prefix}grants:{}", self.id)
    }

    /// Subscribes this process's grant channel `channel` unless it is already; true
    /// when it is listened to (confirmed), so that a line entry may name it.
    pub(crate) async fn listen_for_grants(self: &Arc<Self>, channel: &str) -> bool {
        {
            let mut state = self.state();
            if state.listens_on(channel) {
                return true;
            }
            if state.retry_at.is_some_and(|at| Instant::now() < at) {
                return false;
            }
            state
                .channels
                .entry(channel.to_owned())
                .or_insert_with(|| Channel::new(Instant::now(), true));
        }
        self.subscribe(channel).await.is_ok() && self.listens_on(channel)
    }

    /// Releases heard on `channel` so far.
    pub(crate) fn epoch(&self, channel: &str) -> u64 {
        self.state().channels.get(channel).map_or(0, |c| c.epoch)
    }

    /// Takes the grant to `token` heard on `channel`, if one was.
    pub(crate) fn take_grant(&self, channel: &str, token: Uuid) -> Option<Grant> {
        let mut state = self.state();
        let grants = &mut state.channels.get_mut(channel)?.grants;
        let at = grants.iter().position(|grant| grant.token == token)?;
        grants.remove(at)
    }

    /// [`epoch`](Self::epoch) of the channel `channel` names, which is only built when
    /// some channel is known at all: with none (nobody of this process waits, the common
    /// case), every epoch is 0.
    pub(crate) fn epoch_of(&self, channel: impl FnOnce() -> String) -> u64 {
        let state = self.state();
        if state.channels.is_empty() {
            return 0;
        }
        state.channels.get(&channel()).map_or(0, |c| c.epoch)
    }

    /// Waits until a release is published on `channel`, or `timeout` passes. Returns at
    /// once if a release was heard since `epoch`, and right after a new subscription (a
    /// release may have slipped by before it).
    pub(crate) async fn wait(self: &Arc<Self>, channel: &str, epoch: u64, timeout: Duration) {
        let now = Instant::now();
        let deadline = now + timeout;
        let (notify, subscribed, may_subscribe) = {
            let mut state = self.state();
            if state.channels.len() >= 2 * state.swept_at.max(SWEEP_AT_LEAST) {
                state.sweep_unsubscribed();
            }
            let subscribed = state.listens_on(channel);
            let may_subscribe = state.retry_at.is_none_or(|at| now >= at);
            let entry = state
                .channels
                .entry(channel.to_owned())
                .or_insert_with(|| Channel::new(now, false));
            if entry.epoch != epoch {
                return;
            }
            entry.waiting += 1;
            (entry.notify.clone(), subscribed, may_subscribe)
        };
        let _interest = Interest {
            notifier: self,
            channel,
        };
        let mut notified = pin!(notify.notified());
        notified.as_mut().enable();
        // A release heard after the check above and before `enable` moved the epoch.
        if self.epoch(channel) != epoch {
            return;
        }
        if !subscribed && may_subscribe {
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
        let link = match self.link().await {
            Ok(link) => link,
            Err(err) => {
                let first = {
                    let mut state = self.state();
                    state.failed();
                    state.failures == 1
                };
                if first {
                    // Once per run of failures: the retries back off, each logged at DEBUG.
                    tracing::warn!(
                        error = %err,
                        "cannot connect for release notifications: {}; waiters rely on their backoff",
                        super::connection::redis_failure_hint(&err)
                    );
                }
                return Err(err);
            }
        };
        let Link {
            mut sink,
            generation,
        } = link;
        if self.listens_on(channel) {
            return Ok(()); // another waiter did it while we queued
        }
        // Marked (unconfirmed) first: if this future is cut short, Redis still runs the
        // SUBSCRIBE, and the sweep must know to undo it.
        self.mark(
            channel,
            Some(Subscription {
                generation,
                confirmed: false,
            }),
        );
        let outcome = tokio::time::timeout(self.timeout, sink.subscribe(channel))
            .await
            .unwrap_or_else(|_| Err(timed_out()));
        match &outcome {
            Ok(()) => {
                self.mark(
                    channel,
                    Some(Subscription {
                        generation,
                        confirmed: true,
                    }),
                );
                self.state().succeeded();
            }
            Err(err) => {
                self.mark(channel, None);
                self.state().failed();
                // A refusal (NOPERM) leaves the connection usable; anything else may mean
                // it is open but dead, and the next attempt makes a new one.
                if !matches!(err.kind(), ErrorKind::Server(_)) {
                    self.drop_link(generation);
                }
            }
        }
        outcome
    }

    fn mark(&self, channel: &str, subscription: Option<Subscription>) {
        if let Some(entry) = self.state().channels.get_mut(channel) {
            entry.subscription = subscription;
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
        let pubsub = tokio::time::timeout(self.timeout, self.source.pubsub())
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
                let keep = entry.waiting > 0
                    || entry.grant_channel
                    || now.duration_since(entry.idle_since) < LINGER;
                if !keep
                    && entry
                        .subscription
                        .is_some_and(|sub| sub.generation == generation)
                {
                    idle.push(name.clone());
                }
                keep
            });
            state.swept_at = state.channels.len();
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
                let name = message.get_channel_name();
                if state.channels.get(name).is_some_and(|c| c.grant_channel) {
                    // A grant to one of this process's waiters, for the lock whose release
                    // channel it names: delivered as if heard there.
                    // The entry is made if need be: the grant may come before its waiter,
                    // back from the attempt that queued it, starts to wait.
                    if let Some((channel, grant)) =
                        Grant::parse_directed(message.get_payload_bytes())
                    {
                        state
                            .channels
                            .entry(channel.to_owned())
                            .or_insert_with(|| Channel::new(Instant::now(), false))
                            .heard(Some(grant));
                    }
                } else if let Some(entry) = state.channels.get_mut(name) {
                    entry.heard(Grant::parse(message.get_payload_bytes()));
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
                    entry.subscription = None;
                    entry.heard(None);
                }
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A grant on a process's own channel names the lock's release channel last, whole,
    /// spaces and all; `-` is "no fencing token"; anything malformed is no grant.
    #[test]
    fn a_directed_grant_names_its_release_channel() {
        let token = Uuid::new_v4();
        let message = format!("{token} 1700000000000 - lock:{{a key with spaces}}:released");
        let (channel, grant) = Grant::parse_directed(message.as_bytes()).expect("a grant");
        assert_eq!(channel, "lock:{a key with spaces}:released");
        assert_eq!(grant.token, token);
        assert_eq!(grant.server_ms, 1_700_000_000_000);
        assert_eq!(grant.fencing_token, None);
        let fenced = format!("{token} 5 1796215701989123 lock:{{k}}:released");
        let (_, grant) = Grant::parse_directed(fenced.as_bytes()).expect("a fenced grant");
        assert_eq!(grant.fencing_token, Some(1_796_215_701_989_123));
        for bad in [
            String::new(),
            format!("{token} 5 -"),
            format!("{token} x - lock:{{k}}:released"),
            format!("{token} 5 12x lock:{{k}}:released"),
            "not-a-token 5 - lock:{k}:released".to_owned(),
        ] {
            assert!(Grant::parse_directed(bad.as_bytes()).is_none(), "{bad:?}");
        }
    }

    /// With the notification server unreachable (a node down; the same holds for one that
    /// refuses every `SUBSCRIBE`), waits on ever new keys keep the channel map bounded by
    /// the live waiters, and only the first wait of a pause tries to connect.
    #[tokio::test]
    async fn the_channel_map_stays_bounded_without_a_connection() {
        // Port 1 on loopback: nothing listens, the connection is refused at once.
        let client = Client::open("redis://127.0.0.1:1").unwrap();
        let notifier = Arc::new(Notifier::new(
            Source::Client(client),
            Duration::from_millis(200),
        ));
        let started = Instant::now();
        for i in 0..500 {
            let channel = format!("lock:{{k{i}}}:released");
            notifier.wait(&channel, 0, Duration::from_millis(1)).await;
            if i == 0 {
                assert_eq!(notifier.state().failures, 1);
            }
        }
        let state = notifier.state();
        // One attempt per pause (1 s, 2 s, 4 s…), not one per wait.
        let pauses = started.elapsed().as_secs() + 2;
        assert!(
            u64::from(state.failures) <= pauses,
            "{} attempts",
            state.failures
        );
        assert!(state.link.is_none());
        assert!(
            state.channels.len() <= 2 * SWEEP_AT_LEAST,
            "{} channels kept",
            state.channels.len()
        );
    }
}
