//! Settings shared by [`LockLayer`](crate::LockLayer) and [`Locker`](crate::Locker), their
//! defaults, and the builder methods both expose.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Response, StatusCode};

use crate::{
    LockKey,
    acquire::{AcquireError, Backoff, WaitPolicy},
    observe,
    rejection::{InvalidKey, LockRejection},
    watchdog::Loss,
};

/// Default lease: long enough for ordinary handlers, short enough that a crashed holder
/// frees the key soon (Redisson and redsync use 30 s and 8 s). The watchdog renews it
/// while the handler runs.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);
/// Default bound on the wait for a contended lock before answering 409.
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(1);
/// Default first backoff ceiling; it doubles on each retry…
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(50);
/// …up to this ceiling (redsync retries every 50–250 ms).
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_millis(250);
/// Default upper bound for `Retry-After`.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);
/// Default bound on awaiting the release before the response is returned.
pub const DEFAULT_RELEASE_TIMEOUT: Duration = Duration::from_millis(200);
/// Default longest accepted key, in bytes.
pub const DEFAULT_MAX_KEY_LEN: usize = 512;
/// Default number of hand-offs in a row within one process before a real release.
pub const DEFAULT_MAX_HAND_OFFS: u32 = 8;

/// What to do with a request whose key function found no key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MissingKey {
    /// Answer 400 (the default).
    #[default]
    Reject,
    /// Call the inner service without a lock.
    PassThrough,
}

/// What to do when the backend cannot be reached or fails.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FailMode {
    /// Answer 503 with `Retry-After` (the default): no handler runs unlocked.
    #[default]
    Closed,
    /// Call the inner service without a lock. Only for work that tolerates running twice.
    Open,
}

/// What the layer does when a lock is lost while its handler runs: a renewal found the
/// key gone or taken, or renewals failed until the lease deadline.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LossPolicy {
    /// Drop the handler's future at once (it runs no further than its current `.await`)
    /// and answer 503 with a problem body saying the lock was lost. The default: work
    /// that needed the lock does not go on without it.
    #[default]
    Abort,
    /// Let the handler run on; it learns of the loss through
    /// [`Held::is_lost`](crate::Held::is_lost) and [`Held::lost`](crate::Held::lost) and
    /// answers its own way. For handlers that can roll back or compensate.
    Signal,
}

/// How often the watchdog extends the lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Renewal {
    /// Every third of the ttl.
    Auto,
    Every(Duration),
    Off,
}

type RejectionResponder = Arc<dyn Fn(&LockRejection) -> Response<Bytes> + Send + Sync>;

/// Everything a layer's services (or a locker's clones) share, behind one `Arc`.
#[derive(Clone)]
pub(crate) struct LockConfig {
    pub(crate) wait: WaitPolicy,
    pub(crate) key_prefix: Arc<str>,
    /// The metrics label of this layer's locks; follows the key prefix until set.
    pub(crate) class: Arc<str>,
    pub(crate) class_set: bool,
    pub(crate) max_key_len: usize,
    pub(crate) contended_status: StatusCode,
    pub(crate) retry_after: Duration,
    pub(crate) release_timeout: Duration,
    pub(crate) renewal: Renewal,
    pub(crate) loss_policy: LossPolicy,
    pub(crate) missing_key: MissingKey,
    pub(crate) fail_mode: FailMode,
    pub(crate) respond: Option<RejectionResponder>,
}

impl Default for LockConfig {
    fn default() -> Self {
        Self {
            wait: WaitPolicy {
                ttl: DEFAULT_TTL,
                max_wait: DEFAULT_MAX_WAIT,
                backoff: Backoff {
                    base: DEFAULT_BACKOFF_BASE,
                    max: DEFAULT_BACKOFF_MAX,
                },
                renews: true,
            },
            key_prefix: Arc::from(""),
            class: Arc::from("default"),
            class_set: false,
            max_key_len: DEFAULT_MAX_KEY_LEN,
            contended_status: StatusCode::CONFLICT,
            retry_after: DEFAULT_RETRY_AFTER,
            release_timeout: DEFAULT_RELEASE_TIMEOUT,
            renewal: Renewal::Auto,
            loss_policy: LossPolicy::Abort,
            missing_key: MissingKey::Reject,
            fail_mode: FailMode::Closed,
            respond: None,
        }
    }
}

impl LockConfig {
    /// The key to lock for a request: `Ok(None)` to pass it through unlocked.
    pub(crate) fn request_key(
        &self,
        key: Option<LockKey>,
    ) -> Result<Option<LockKey>, LockRejection> {
        match key {
            Some(key) => self.lock_key(key).map(Some),
            None => match self.missing_key {
                MissingKey::Reject => Err(LockRejection::MissingKey),
                MissingKey::PassThrough => Ok(None),
            },
        }
    }

    /// `key`, validated, with the prefix.
    pub(crate) fn lock_key(&self, key: LockKey) -> Result<LockKey, LockRejection> {
        if key.is_empty() {
            return Err(LockRejection::InvalidKey(InvalidKey::Empty));
        }
        if key.len() > self.max_key_len {
            return Err(LockRejection::InvalidKey(InvalidKey::TooLong {
                max: self.max_key_len,
            }));
        }
        Ok(key.prefixed(&self.key_prefix))
    }

    /// How often the watchdog renews, if at all. Never less often than every half ttl,
    /// so that one failed renewal can be retried before the lease ends.
    pub(crate) fn renew_every(&self) -> Option<Duration> {
        let ttl = self.wait.ttl;
        match self.renewal {
            Renewal::Off => None,
            Renewal::Auto => Some(ttl / 3),
            Renewal::Every(every) => Some(every.min(ttl / 2)),
        }
    }

    pub(crate) fn rejection(&self, err: AcquireError) -> LockRejection {
        match err {
            AcquireError::Contended { remaining } => LockRejection::Contended {
                status: self.contended_status,
                retry_after: remaining.map_or(self.retry_after, |r| r.min(self.retry_after)),
            },
            AcquireError::Unavailable(source) => LockRejection::Unavailable {
                source,
                retry_after: self.retry_after,
            },
        }
    }

    pub(crate) fn loss(&self, loss: Loss) -> LockRejection {
        LockRejection::Lost {
            expired: loss == Loss::Expired,
            retry_after: self.retry_after,
        }
    }

    pub(crate) fn respond<B: From<Bytes>>(&self, rejection: &LockRejection) -> Response<B> {
        tracing::debug!(%rejection, "request answered by the lock layer");
        // A loss was counted when it happened; the request's acquisition already was.
        if !matches!(rejection, LockRejection::Lost { .. }) {
            observe::outcome(&self.class, rejection.outcome());
        }
        let mut response = match &self.respond {
            Some(respond) => respond(rejection),
            None => rejection.to_response(),
        };
        // The handler did not run: an idempotency layer outside lets the key be retried.
        if !matches!(rejection, LockRejection::Lost { .. }) {
            response
                .extensions_mut()
                .insert(crate::idempotency::Retryable);
        }
        response.map(B::from)
    }
}

impl std::fmt::Debug for LockConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockConfig")
            .field("wait", &self.wait)
            .field("key_prefix", &self.key_prefix)
            .field("class", &self.class)
            .field("max_key_len", &self.max_key_len)
            .field("contended_status", &self.contended_status)
            .field("retry_after", &self.retry_after)
            .field("release_timeout", &self.release_timeout)
            .field("renewal", &self.renewal)
            .field("loss_policy", &self.loss_policy)
            .field("missing_key", &self.missing_key)
            .field("fail_mode", &self.fail_mode)
            .field("custom_rejection_response", &self.respond.is_some())
            .finish()
    }
}

/// The builder methods of the lock settings, for a type with
/// `fn config_mut(&mut self) -> &mut LockConfig`.
macro_rules! lock_settings {
    ($name:literal) => {
        /// The lease of each lock (default 10 s). The watchdog extends it while the lock
        /// is held; a holder that crashes frees its key after at most this long.
        ///
        /// # Panics
        ///
        /// When `ttl` is under one millisecond.
        pub fn ttl(mut self, ttl: std::time::Duration) -> Self {
            assert!(
                ttl >= std::time::Duration::from_millis(1),
                concat!($name, "::ttl must be at least 1 ms")
            );
            self.config_mut().wait.ttl = ttl;
            self
        }

        /// How long to wait for a held lock before giving up with 409 (default 1 s).
        /// Zero makes a single attempt. The answer can come one backend operation later.
        pub fn max_wait(mut self, max_wait: std::time::Duration) -> Self {
            self.config_mut().wait.max_wait = max_wait;
            self
        }

        /// The retry schedule while waiting: attempt `n` sleeps a random time up to
        /// `min(max, base · 2ⁿ)`, never past the holder's lease or the wait's end
        /// (default 50 ms and 250 ms).
        ///
        /// # Panics
        ///
        /// When `base` is zero or larger than `max`.
        pub fn backoff(mut self, base: std::time::Duration, max: std::time::Duration) -> Self {
            assert!(
                !base.is_zero() && base <= max,
                concat!($name, "::backoff needs 0 < base <= max")
            );
            self.config_mut().wait.backoff = $crate::acquire::Backoff { base, max };
            self
        }

        /// A namespace put before every key, so that two routes can lock the same id
        /// separately (`"pay:"`, `"refund:"`). Empty by default.
        pub fn key_prefix(mut self, prefix: impl Into<std::sync::Arc<str>>) -> Self {
            let config = self.config_mut();
            config.key_prefix = prefix.into();
            if !config.class_set {
                let class = config.key_prefix.trim_end_matches(':');
                config.class = if class.is_empty() {
                    "default".into()
                } else {
                    class.into()
                };
            }
            self
        }

        /// The `class` label of this layer's metrics (default: the key prefix without
        /// its trailing `:`, or `default`). Locks are never labelled by key.
        pub fn metrics_class(mut self, class: impl Into<std::sync::Arc<str>>) -> Self {
            let config = self.config_mut();
            config.class = class.into();
            config.class_set = true;
            self
        }

        /// The longest key accepted, in bytes, before the prefix (default 512). Longer
        /// keys get 400: keys come from requests, and Redis keys should stay small.
        pub fn max_key_len(mut self, max: usize) -> Self {
            self.config_mut().max_key_len = max;
            self
        }

        /// The status for a lock still contended when the wait ends: 409 Conflict by
        /// default, or 423 Locked.
        ///
        /// # Panics
        ///
        /// When `status` is not a 4xx.
        pub fn contended_status(mut self, status: http::StatusCode) -> Self {
            assert!(
                status.is_client_error(),
                concat!($name, "::contended_status must be a 4xx")
            );
            self.config_mut().contended_status = status;
            self
        }

        /// The longest `Retry-After` given (default 1 s). A contended answer says the
        /// smaller of this and the holder's remaining lease; a 503 says this. Sent in
        /// whole seconds, rounded up, at least 1.
        pub fn retry_after(mut self, hint: std::time::Duration) -> Self {
            self.config_mut().retry_after = hint;
            self
        }

        /// How long to wait for a release to be confirmed (default 200 ms), so that the
        /// client's next request does not meet its own lock. Past it the release goes on
        /// in the background.
        pub fn release_timeout(mut self, timeout: std::time::Duration) -> Self {
            self.config_mut().release_timeout = timeout;
            self
        }

        /// How often the watchdog extends the lease while the lock is held (default: a
        /// third of the ttl; at most half of it, so a failed renewal can be retried).
        ///
        /// # Panics
        ///
        /// When `every` is zero.
        pub fn renew_every(mut self, every: std::time::Duration) -> Self {
            assert!(
                !every.is_zero(),
                concat!($name, "::renew_every must be positive")
            );
            self.config_mut().renewal = $crate::config::Renewal::Every(every);
            self.config_mut().wait.renews = true;
            self
        }

        /// Turns the watchdog off: the lease is the ttl, however long the holder runs.
        /// The lock still counts as lost past its lease deadline.
        pub fn without_renewal(mut self) -> Self {
            self.config_mut().renewal = $crate::config::Renewal::Off;
            self.config_mut().wait.renews = false;
            self
        }

        /// How many times in a row a finished holder may hand the lock straight to the
        /// next request of this process waiting for the same key (default 8), before it
        /// releases in the backend for real.
        ///
        /// A hand-off needs no backend round trip (one, when a fencing token is due or
        /// the lease runs low), so a hot key served by one process runs close to the
        /// speed of its critical sections. The cap is the price of fairness: after it,
        /// the lock goes back to the backend, where waiters of other processes, told of
        /// the release, get the first try. 0 keeps the queue (one request of this
        /// process asks the backend at a time) without hand-offs.
        pub fn max_hand_offs(mut self, max: u32) -> Self {
            self.queues = Some($crate::queue::LocalQueues::new(max));
            self
        }

        /// No local queue: every waiting request asks the backend itself, as it would
        /// across processes. Mostly a baseline for benchmarks.
        pub fn without_local_queue(mut self) -> Self {
            self.queues = None;
            self
        }
    };
}

pub(crate) use lock_settings;
