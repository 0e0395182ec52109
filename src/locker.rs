//! Locks taken inside a handler, for keys the layer cannot know (a field of the body, a
//! value computed from several inputs).

use std::{
    fmt,
    future::poll_fn,
    ops::Deref,
    sync::{Arc, Mutex, PoisonError},
};

use tokio::task::AbortHandle;

use crate::{
    Held, LockBackend, LockKey, LockRejection,
    acquire::{Acquired, acquire},
    config::{DEFAULT_MAX_HAND_OFFS, LockConfig},
    guard::LockGuard,
    observe::{self, Outcome},
    queue::LocalQueues,
    watchdog::Watchdog,
};

/// Takes locks on demand, with the same wait, answers and release-on-drop as
/// [`LockLayer`](crate::LockLayer).
///
/// Build one for the app and put it in the router's state; with the `axum` feature it is
/// an extractor for any state `S` where `Locker<B>: FromRef<S>`. Extracted that way it
/// also knows the locks its request holds, and refuses at once to take one of them again
/// ([`LockRejection::AlreadyHeld`]) rather than wait for itself until `max_wait`. Locks
/// are not reentrant.
///
/// # Example
///
/// ```
/// # #[cfg(feature = "axum")]
/// # fn main() {
/// use axum::{Json, Router, routing::post};
/// use tower_redis_lock::{InMemoryBackend, Locker, LockRejection};
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
pub struct Locker<B: LockBackend> {
    backend: B,
    queues: Option<Arc<LocalQueues<B>>>,
    config: Arc<LockConfig>,
    /// The keys the request this locker was extracted for holds.
    request: Option<Arc<RequestLocks>>,
}

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

    fn keys(&self) -> std::sync::MutexGuard<'_, Vec<LockKey>> {
        // Every mutation is a single push or remove: a panic cannot leave it half-done.
        self.keys.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<B: LockBackend> Locker<B> {
    /// A locker on `backend` with the layer's defaults (ttl 10 s renewed every 3.3 s,
    /// max wait 1 s, 409 on contention, a local queue with up to 8 hand-offs in a row…).
    pub fn new(backend: B) -> Self {
        Self {
            backend,
            queues: Some(LocalQueues::new(DEFAULT_MAX_HAND_OFFS)),
            config: Arc::default(),
            request: None,
        }
    }

    /// Takes the lock on `key` (after the prefix), waiting at most `max_wait`.
    ///
    /// The lock is released when the returned [`OwnedLock`] is dropped or
    /// [released](OwnedLock::release); its lease is renewed until then. The error is the
    /// answer the layer would give, ready to return from a handler.
    pub async fn lock(&self, key: impl Into<LockKey>) -> Result<OwnedLock<B>, LockRejection> {
        let key = self.config.lock_key(key.into())?;
        if let Some(request) = &self.request
            && request.keys().contains(&key)
        {
            tracing::error!(%key, "a request asked again for a lock it holds");
            observe::outcome(&self.config.class, Outcome::AlreadyHeld);
            return Err(LockRejection::AlreadyHeld);
        }
        let acquisition = acquire(
            self.backend.clone(),
            key,
            self.config.wait,
            self.queues.clone(),
        );
        let started = tokio::time::Instant::now();
        let Acquired { guard, held } = acquisition.await.map_err(|err| {
            let rejection = self.config.rejection(err);
            observe::outcome(&self.config.class, rejection.outcome());
            rejection
        })?;
        observe::outcome(&self.config.class, Outcome::Acquired);
        observe::waited(&self.config.class, started.elapsed());
        let watchdog = self.config.renew_every().map(|every| {
            let mut watchdog = Watchdog::new(
                self.backend.clone(),
                held.clone(),
                self.config.wait.ttl,
                Some(every),
            );
            // No future of ours wraps the caller's work, so the watchdog gets a task.
            let class = self.config.class.clone();
            tokio::spawn(async move {
                poll_fn(|cx| watchdog.poll_lost(cx)).await;
                observe::lost(&class);
            })
            .abort_handle()
        });
        if let Some(request) = &self.request {
            request.keys().push(held.key().clone());
        }
        Ok(OwnedLock {
            guard: Some(guard),
            held,
            class: self.config.class.clone(),
            watchdog,
            request: self.request.clone(),
            release_timeout: self.config.release_timeout,
        })
    }

    /// This locker, knowing which locks its request holds.
    #[cfg(feature = "axum")]
    pub(crate) fn for_request(&self, held: Option<&Held>) -> Self {
        Self {
            request: Some(Arc::new(RequestLocks::new(held))),
            ..self.clone()
        }
    }
}

impl<B: LockBackend> Locker<B> {
    fn config_mut(&mut self) -> &mut LockConfig {
        Arc::make_mut(&mut self.config)
    }

    crate::config::lock_settings!("Locker");
}

impl<B: LockBackend> Clone for Locker<B> {
    fn clone(&self) -> Self {
        Self {
            backend: self.backend.clone(),
            queues: self.queues.clone(),
            config: self.config.clone(),
            request: self.request.clone(),
        }
    }
}

impl<B: LockBackend + fmt::Debug> fmt::Debug for Locker<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Locker")
            .field("backend", &self.backend)
            .field("config", &self.config)
            .field("request", &self.request)
            .finish()
    }
}

/// A lock taken by [`Locker::lock`]: released on drop (in the background) or by
/// [`release`](Self::release) (awaited); renewed until then. Derefs to [`Held`] for the
/// key, tokens and the lost signal.
///
/// There is no handler future for it to drop when the lock is lost, so a lost lock is
/// only signalled: check [`Held::is_lost`] before committing, or `select!` on
/// [`Held::lost`].
pub struct OwnedLock<B: LockBackend> {
    guard: Option<LockGuard<B>>,
    held: Held,
    class: Arc<str>,
    watchdog: Option<AbortHandle>,
    request: Option<Arc<RequestLocks>>,
    release_timeout: std::time::Duration,
}

impl<B: LockBackend> OwnedLock<B> {
    /// The lock's view: key, owner token, fencing token, lease deadline, lost signal.
    pub fn held(&self) -> &Held {
        &self.held
    }

    /// Releases the lock now, waiting at most the release timeout for the backend to
    /// confirm (then it goes on in the background).
    pub async fn release(mut self) {
        self.stop();
        if let Some(guard) = self.guard.take() {
            guard.release(self.release_timeout).await;
        }
    }

    /// Stops renewing and forgets the key in its request's set.
    fn stop(&mut self) {
        if self.guard.is_some() {
            observe::held(&self.class, self.held.acquired_at().elapsed());
        }
        if let Some(watchdog) = self.watchdog.take() {
            watchdog.abort();
        }
        if let Some(request) = self.request.take() {
            request.keys().retain(|key| key != self.held.key());
        }
    }
}

impl<B: LockBackend> Deref for OwnedLock<B> {
    type Target = Held;

    fn deref(&self) -> &Held {
        &self.held
    }
}

impl<B: LockBackend> Drop for OwnedLock<B> {
    fn drop(&mut self) {
        self.stop();
        // The guard's own `Drop` releases in the background.
    }
}

impl<B: LockBackend> fmt::Debug for OwnedLock<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OwnedLock")
            .field("held", &self.held)
            .finish()
    }
}
