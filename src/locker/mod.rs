//! The lock engine: [`Locker`] owns a backend, the settings and the local line; the
//! layer and in-handler locks are its two faces.
//!
//! - `settings`: what every lock of a locker shares.
//! - `acquire`: the bounded wait (attempt, back off or wait in line, attempt again).
//! - `guard`: the owner of a lock, which releases it (or hands it down the line).
//! - `watchdog`: lease renewal and loss detection.
//! - `renewals`: the watchdogs of in-handler locks, started when their first renewal is due.
//! - `owned`: [`OwnedLock`], the lock a handler takes itself.

mod acquire;
mod fair;
mod guard;
mod kinds;
mod owned;
mod renewals;
mod settings;
mod watchdog;

use std::{fmt, sync::Arc, time::Duration};

use http::StatusCode;

pub use self::owned::OwnedLock;
pub(crate) use self::owned::RequestLocks;
pub(crate) use self::{
    acquire::{AcquireError, Acquired},
    guard::{LockGuard, ReleaseOutcome},
    settings::{LockSettings, MetricsClass},
    watchdog::{Loss, Watchdog, loss_on_release, note_loss},
};
use self::{
    acquire::{Backoff, acquire},
    guard::LockLine,
    renewals::Renewals,
    settings::{DEFAULT_MAX_HAND_OFFS, MIN_TTL, Renewal},
};
use crate::{
    backend::{FairBackend, LockBackend},
    held::Held,
    hot_keys::HotKey,
    key::{LockKey, MakeLockKey},
    line::Line,
    middleware::LockLayer,
    observe::{self, ClassMetrics, Outcome},
    rejection::LockRejection,
};

/// Takes locks on a backend: the engine under [`LockLayer`] and under locks taken inside
/// handlers, with the same wait, answers and release-on-drop.
///
/// A `Locker` holds the backend, the settings and the *local line*: requests of this
/// process that want the same key queue here, only the first asks the backend, and a
/// finished holder hands the lock to the next without a round trip. Clones share all of
/// it. Make the route's layers from the locker ([`layer`](Self::layer)) and give the same
/// locker to the handlers (in the router's state), and the layer's requests and the
/// handlers' own locks wait in one line under one set of settings.
///
/// With the `axum` feature a `Locker` is an extractor for any state `S` where
/// `Locker<Backend>: FromRef<S>`. Extracted that way it knows the locks its request holds,
/// and refuses at once to take one of them again ([`LockRejection::AlreadyHeld`]) rather
/// than wait for itself until `max_wait`: locks are not reentrant.
///
/// # Example
///
/// ```
/// # #[cfg(feature = "axum")]
/// # fn main() {
/// use axum::{Json, Router, routing::post};
/// use tower_redis_lock::{InMemoryBackend, LockRejection, Locker};
///
/// #[derive(serde::Deserialize)]
/// struct Transfer {
///     account: String,
/// }
///
/// async fn transfer(
///     locker: Locker<InMemoryBackend>,
///     Json(body): Json<Transfer>,
/// ) -> Result<String, LockRejection> {
///     let lock = locker.lock(body.account).await?; // 409, 503… as the layer answers
///     Ok(format!("moved money under {}", lock.key()))
/// } // the lock is released here, and on every early return
///
/// // Any state works that gives a `Locker` through `FromRef`; here it is the whole state.
/// let app: Router = Router::new()
///     .route("/transfers", post(transfer))
///     .with_state(Locker::new(InMemoryBackend::new()).key_prefix("account:"));
/// # }
/// # #[cfg(not(feature = "axum"))]
/// # fn main() {}
/// ```
#[must_use]
pub struct Locker<Backend: LockBackend> {
    backend: Backend,
    line: Option<Arc<LockLine<Backend>>>,
    settings: Arc<LockSettings>,
    /// The watchdogs of its in-handler locks, until they start.
    renewals: Arc<Renewals<Backend>>,
    /// The keys the request this locker was extracted for holds.
    #[cfg(feature = "axum")]
    request: Option<Arc<RequestLocks>>,
}

/// When a wait for a lock began, and for which key: what [`Locker::end_wait`] records.
pub(crate) struct WaitStart {
    pub(crate) started: tokio::time::Instant,
    asked: LockKey,
}

impl<Backend: LockBackend> Locker<Backend> {
    /// A locker on `backend` with the defaults: ttl 10 s renewed every 3.3 s, max wait
    /// 1 s, backoff 50 ms doubling to 250 ms with full jitter, 409 on contention,
    /// `Retry-After` at most 1 s, keys up to 512 bytes, release awaited up to 1 s, a
    /// local line with up to 8 hand-offs in a row.
    pub fn new(backend: Backend) -> Self {
        Self {
            backend,
            line: Some(Line::new(DEFAULT_MAX_HAND_OFFS)),
            settings: Arc::default(),
            renewals: Arc::default(),
            #[cfg(feature = "axum")]
            request: None,
        }
    }

    /// A layer that locks each request on `make_key`'s key with this locker: its
    /// settings, and its local line, which the handlers' own locks share.
    ///
    /// ```
    /// use http::request::Parts;
    /// use tower_redis_lock::{InMemoryBackend, Locker};
    ///
    /// let locker = Locker::new(InMemoryBackend::new()).key_prefix("order:");
    /// let layer = locker.layer(|parts: &Parts| parts.uri.path().strip_prefix("/orders/").map(str::to_owned));
    /// # let _ = layer;
    /// ```
    pub fn layer<K: MakeLockKey>(&self, make_key: K) -> LockLayer<Backend, K> {
        LockLayer::from_locker(self.clone(), make_key)
    }

    /// Takes the lock on `key` (after the prefix), waiting at most `max_wait`.
    ///
    /// The lock is released when the returned [`OwnedLock`] is dropped or
    /// [released](OwnedLock::release); its lease is renewed until then. The error is the
    /// answer the layer would give, ready to return from a handler.
    pub async fn lock(&self, key: impl Into<LockKey>) -> Result<OwnedLock<Backend>, LockRejection> {
        let key = self
            .settings
            .lock_key(key.into())
            .inspect_err(|rejection| {
                observe::outcome(self.metrics(), rejection.outcome());
            })?;
        #[cfg(feature = "axum")]
        if let Some(request) = &self.request
            && request.keys().contains(&key)
        {
            tracing::error!(%key, "a request asked again for a lock it holds");
            observe::outcome(self.metrics(), Outcome::AlreadyHeld);
            return Err(LockRejection::AlreadyHeld);
        }
        let Acquired { guard, held, .. } = self.acquire(key).await?;
        let renews = self.settings.renew_every().is_some();
        // No future of ours wraps the caller's work, so the watchdog gets a task of its
        // own, started when the first renewal is due: most locks are released before.
        let watchdog = renews.then(|| {
            let pending = self
                .renewals
                .register(self.watchdog(&held), self.class().clone());
            (self.renewals.clone(), pending)
        });
        #[cfg(feature = "axum")]
        let request = self.request.clone();
        #[cfg(not(feature = "axum"))]
        let request: Option<Arc<RequestLocks>> = None;
        if let Some(request) = &request {
            request.keys().push(held.key().clone());
        }
        Ok(OwnedLock::new(
            guard,
            held,
            self.class().clone(),
            watchdog,
            request,
            self.settings.clone(),
        ))
    }

    /// Waits for the lock on `key` (already prefixed and validated) and records how the
    /// wait ended: [`begin_wait`](Self::begin_wait), then [`end_wait`](Self::end_wait).
    pub(crate) async fn acquire(&self, key: LockKey) -> Result<Acquired<Backend>, LockRejection> {
        let (start, wait) = self.begin_wait(key);
        let outcome = wait.await;
        self.end_wait(start, outcome)
    }

    /// Begins the wait for `key`'s lock: the wait itself, which owns what it needs (no
    /// borrow of the locker: the layer boxes it alone, small enough for the allocator's
    /// per-thread cache), and what its end is recorded against.
    pub(crate) fn begin_wait(
        &self,
        key: LockKey,
    ) -> (
        WaitStart,
        impl Future<Output = Result<Acquired<Backend>, AcquireError>> + Send + 'static,
    ) {
        let start = WaitStart {
            started: tokio::time::Instant::now(),
            // For the hot keys, should the wait end contended (a reference count).
            asked: key.clone(),
        };
        let policy = self.settings.wait_policy();
        let wait = acquire(self.backend.clone(), key, policy, self.line.clone());
        (start, wait)
    }

    /// Records how the wait begun at `start` ended, and turns a failure into the answer.
    pub(crate) fn end_wait(
        &self,
        start: WaitStart,
        outcome: Result<Acquired<Backend>, AcquireError>,
    ) -> Result<Acquired<Backend>, LockRejection> {
        match outcome {
            Ok(acquired) => {
                observe::outcome(self.metrics(), Outcome::Acquired);
                observe::waited(self.metrics(), start.started.elapsed());
                if acquired.contended {
                    let hot_keys = &self.settings.observed.hot_keys;
                    hot_keys.contended(self.class(), acquired.held.key());
                }
                Ok(acquired)
            }
            Err(err) => {
                let rejection = self.settings.rejection(err);
                observe::outcome(self.metrics(), rejection.outcome());
                if let LockRejection::Contended { .. } = rejection {
                    let hot_keys = &self.settings.observed.hot_keys;
                    hot_keys.contended(self.class(), &start.asked);
                }
                Err(rejection)
            }
        }
    }

    /// Records a hold of `hold` that just ended: its histogram, and what it says about
    /// the ttl (`ttl_advice`).
    pub(crate) fn held_for(&self, hold: std::time::Duration) {
        hold_ended(&self.settings, hold);
    }

    /// The most contended keys of this locker (and of its clones and layers) since it
    /// was made, the most contended first: at most as many as
    /// [`track_hot_keys`](Self::track_hot_keys) says (10 by default).
    ///
    /// A key counts once for each acquisition of it that met contention: one that waited
    /// (refused by the backend, or queued behind a request of this process) or ended
    /// contended (409). Uncontended acquisitions are not counted and cost nothing here.
    /// The counts come from a space-saving sketch in constant memory: every key
    /// contended more than `n / k` times out of `n` (k keys tracked) is listed, and each
    /// count is at most [`HotKey::overcount`] above the true one. With the `metrics`
    /// feature the same keys are the gauge `lock_hot_key_contentions{class, key}`, set to
    /// 0 when a key drops out.
    pub fn hot_keys(&self) -> Vec<HotKey> {
        self.settings.observed.hot_keys.top()
    }

    /// Tracks the `k` most contended keys for [`hot_keys`](Self::hot_keys) and the
    /// `lock_hot_key_contentions` gauge (default 10; 0 turns it off). Memory is
    /// constant: `k` counters. Starts the count afresh.
    pub fn track_hot_keys(mut self, k: usize) -> Self {
        self.settings_mut().set_hot_keys(k);
        self
    }

    /// A watchdog for a lock just taken: it renews the lease (unless renewal is off) and
    /// reports the loss.
    pub(crate) fn watchdog(&self, held: &Held) -> Watchdog<Backend> {
        Watchdog::new(
            self.backend.clone(),
            held.clone(),
            self.settings.ttl,
            self.settings.renew_every(),
        )
    }

    pub(crate) fn settings(&self) -> &LockSettings {
        &self.settings
    }

    pub(crate) fn class(&self) -> &Arc<str> {
        self.settings.class()
    }

    /// The keys of this locker's per-request metrics.
    pub(crate) fn metrics(&self) -> &ClassMetrics {
        &self.settings.observed.metrics
    }

    /// How many keys this locker's requests hold or wait for in this process right now
    /// (0 without a local line). Back to 0 whenever the locker is idle: nothing is kept
    /// per key once its requests are done.
    pub fn keys_in_use(&self) -> usize {
        self.line.as_ref().map_or(0, |line| line.busy_keys())
    }

    /// This locker, knowing which locks its request holds.
    #[cfg(feature = "axum")]
    pub(crate) fn for_request(&self, held: Option<&Held>) -> Self {
        Self {
            request: Some(Arc::new(RequestLocks::new(held))),
            ..self.clone()
        }
    }

    fn settings_mut(&mut self) -> &mut LockSettings {
        Arc::make_mut(&mut self.settings)
    }

    /// The lease of each lock (default 10 s). The watchdog extends it while the lock is
    /// held; a holder that crashes frees its key after at most this long. A ttl beyond
    /// what Redis accepts (`Duration::MAX`, say) is clamped to about 285,000 years.
    ///
    /// # Panics
    ///
    /// When `ttl` is under 10 ms: the client counts a lease as over 1 % + 2 ms early
    /// (clock drift), so a shorter one would leave no time to hold the lock.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        assert!(
            ttl >= MIN_TTL,
            "ttl must be at least 10 ms (the drift margin alone is 2 ms)"
        );
        self.settings_mut().ttl = ttl;
        self
    }

    /// How long to wait for a held lock before giving up with 409 (default 1 s). Zero
    /// makes a single attempt. The answer can come one backend operation later.
    pub fn max_wait(mut self, max_wait: Duration) -> Self {
        self.settings_mut().max_wait = max_wait;
        self
    }

    /// The retry schedule while waiting: attempt `n` sleeps a random time up to
    /// `min(max, base · 2ⁿ)`, never past the holder's lease or the wait's end (default
    /// 50 ms and 250 ms).
    ///
    /// # Panics
    ///
    /// When `base` is zero or larger than `max`.
    pub fn backoff(mut self, base: Duration, max: Duration) -> Self {
        assert!(
            !base.is_zero() && base <= max,
            "backoff needs 0 < base <= max"
        );
        self.settings_mut().backoff = Backoff { base, max };
        self
    }

    /// A namespace put before every key, so that two routes can lock the same id
    /// separately (`"pay:"`, `"refund:"`). Empty by default. Unless
    /// [`metrics_class`](Self::metrics_class) is set, it also names the metrics class
    /// (without its trailing `:`).
    pub fn key_prefix(mut self, prefix: impl Into<Arc<str>>) -> Self {
        self.settings_mut().set_key_prefix(prefix.into());
        self
    }

    /// The `class` label of these locks' metrics (default: the key prefix without its
    /// trailing `:`, or `default`). Locks are never labelled by key.
    pub fn metrics_class(mut self, class: impl Into<Arc<str>>) -> Self {
        self.settings_mut()
            .set_class(MetricsClass::Named(class.into()));
        self
    }

    /// The longest key accepted, in bytes, before the prefix (default 512). Longer keys
    /// get 400: keys come from requests, and Redis keys should stay small.
    pub fn max_key_len(mut self, max: usize) -> Self {
        self.settings_mut().max_key_len = max;
        self
    }

    /// The status for a lock still contended when the wait ends: 409 Conflict by
    /// default, or 423 Locked.
    ///
    /// # Panics
    ///
    /// When `status` is not a 4xx.
    pub fn contended_status(mut self, status: StatusCode) -> Self {
        assert!(status.is_client_error(), "contended_status must be a 4xx");
        self.settings_mut().contended_status = status;
        self
    }

    /// The longest `Retry-After` given (default 1 s). A contended answer says the smaller
    /// of this and the holder's remaining lease (a renewed lease says nothing about how
    /// soon a short critical section ends); a 503 says this. Sent in whole seconds,
    /// rounded up, at least 1.
    pub fn retry_after_cap(mut self, cap: Duration) -> Self {
        self.settings_mut().retry_after_cap = cap;
        self
    }

    /// How long to wait for a release to be confirmed (default 1 s, the Redis command
    /// timeout's default), so that the client's next request does not meet its own lock.
    /// Past it the release goes on in the background.
    ///
    /// On a single-server [`RedisBackend`](crate::backend::RedisBackend) (not fair)
    /// whose command timeout is no longer, no timer of the locker's own is set: the command timeout bounds each round
    /// trip of the release (a release that must first load its script into a restarted
    /// server makes three). A shorter wait answers sooner when Redis is slow, at a price
    /// on the common path: its timer, and, on a multi-threaded runtime, a wake of a
    /// parked worker thread on every release (the timer is due before the others).
    pub fn release_timeout(mut self, timeout: Duration) -> Self {
        self.settings_mut().release_timeout = timeout;
        self
    }

    /// How often the watchdog extends the lease while the lock is held (default: a third
    /// of the ttl; at most half of it, so a failed renewal can be retried).
    ///
    /// # Panics
    ///
    /// When `every` is zero.
    pub fn renew_every(mut self, every: Duration) -> Self {
        assert!(!every.is_zero(), "renew_every must be positive");
        self.settings_mut().renewal = Renewal::Every(every);
        self
    }

    /// Turns the watchdog off: the lease is the ttl, however long the holder runs. The
    /// lock still counts as lost past its lease deadline.
    pub fn without_renewal(mut self) -> Self {
        self.settings_mut().renewal = Renewal::Off;
        self
    }

    /// How many times in a row a finished holder may hand the lock straight to the next
    /// request of this process waiting for the same key (default 8), before it releases
    /// in the backend for real. Gives the locker a new local line.
    ///
    /// A hand-off needs no backend round trip (one, when a fencing token is due or the
    /// lease runs low), so a hot key served by one process runs close to the speed of its
    /// critical sections. The cap is the price of fairness: after it, the lock goes back
    /// to the backend, where waiters of other processes get the first try (told of the
    /// release, or given one backoff when they cannot be told). 0 keeps the line (one
    /// request of this process asks the backend at a time) without hand-offs.
    pub fn max_hand_offs(mut self, max: u32) -> Self {
        // Shared kinds (permits, readers) take no line: each request asks for its share.
        if !self.takes_shares() {
            self.line = Some(Line::new(max));
        }
        self
    }

    /// No local line: every waiting request asks the backend itself, as it would across
    /// processes. Mostly a baseline for benchmarks.
    pub fn without_local_queue(mut self) -> Self {
        self.line = None;
        self
    }
}

/// Fair mode, for the backends that offer it.
impl<Backend: FairBackend> Locker<Backend> {
    /// Serves the waiters of all processes first come, first served (off by default).
    ///
    /// Without it, the local line is first come, first served within this process, but
    /// across processes a release starts a race: every notified process tries, one wins,
    /// and a process can lose many races in a row, so that a request waits far longer
    /// than its place in line warrants, or gets 409 while later ones get through.
    ///
    /// In fair mode the process whose request finds the lock held takes a place in a line
    /// kept in the backend (on Redis, the list `<prefix>{<key>}:queue` and the sorted set
    /// `<prefix>{<key>}:timeouts`, in the lock's hash slot; one entry per process and key,
    /// standing for the head of its local line). A release gives the lock straight to the
    /// first live entry, in the same script, and tells that process alone on a channel
    /// of its own: the grantee holds the lock without another round trip. It then passes
    /// the lock down its local line to the requests that were already waiting there and
    /// to one that came later (at most [`max_hand_offs`](Self::max_hand_offs) in all),
    /// and releases to the next process in line; with nobody else in line, the same call
    /// keeps the lock for the process's next request, in a new turn.
    ///
    /// Entries expire with their waiter's `max_wait` plus 500 ms, so a waiter that died
    /// holds up nobody once that has passed; a waiter that gives up or is dropped takes
    /// its entry out (in the background), and passes on a grant that crossed it. A grant
    /// to a process that died after its last check ends with the lease, like any lock.
    /// Waiters hear of grants through [release
    /// notifications](crate::RedisBackend::notify_with); without them each grant is
    /// found by the grantee's next check, up to a backoff later. All lockers of one key
    /// should agree: a racing locker's `SET NX` cannot see the line (mutual exclusion
    /// holds either way). See the README (Fairness) for what it costs.
    pub fn fair(mut self, on: bool) -> Self {
        // The mode lives in the backend, which the layers and in-handler locks of this
        // locker share: its releases grant, and its waiters wait in line.
        self.backend = self.backend.with_fairness(on);
        self
    }
}

impl<Backend: LockBackend> Clone for Locker<Backend> {
    fn clone(&self) -> Self {
        Self {
            backend: self.backend.clone(),
            line: self.line.clone(),
            settings: self.settings.clone(),
            renewals: self.renewals.clone(),
            #[cfg(feature = "axum")]
            request: self.request.clone(),
        }
    }
}

impl<Backend: LockBackend + fmt::Debug> fmt::Debug for Locker<Backend> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Locker")
            .field("backend", &self.backend)
            .field("settings", &self.settings)
            .field("local_line", &self.line.is_some())
            .finish()
    }
}

/// The bookkeeping of a hold that ended, under `settings`: the hold-time histogram, and
/// the ttl advice (a gauge, and a warning when the ttl looks wrong for the work).
pub(crate) fn hold_ended(settings: &LockSettings, hold: std::time::Duration) {
    let class = settings.class();
    observe::held(&settings.observed.metrics, hold);
    let renew_every = settings.renew_every();
    let advice = &settings.observed.ttl;
    if let Some(verdict) = advice.hold(hold, settings.ttl, renew_every) {
        observe::ttl_verdict(class, advice, verdict, settings.ttl, renew_every);
    }
}
