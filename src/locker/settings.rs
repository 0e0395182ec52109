//! What a [`Locker`](super::Locker) and the layers made from it share: the lease, the
//! wait, the key rules and the answers, behind one `Arc`.

use std::{sync::Arc, time::Duration};

use http::StatusCode;

use super::acquire::{AcquireError, Backoff, WaitPolicy};
use crate::{
    hot_keys::DEFAULT_HOT_KEYS,
    key::LockKey,
    kind::LockKind,
    observe::Observed,
    rejection::{InvalidKey, LockRejection},
};

/// Default lease: long enough for ordinary handlers, short enough that a crashed holder
/// frees the key soon (Redisson and redsync use 30 s and 8 s). The watchdog renews it
/// while the handler runs.
pub(crate) const DEFAULT_TTL: Duration = Duration::from_secs(10);
/// The shortest ttl accepted: leases shorter than this would be mostly drift margin.
pub(crate) const MIN_TTL: Duration = Duration::from_millis(10);
/// Default bound on the wait for a contended lock before answering 409.
pub(crate) const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(1);
/// Default backoff: the first ceiling, doubling on each retry up to the second (redsync
/// retries every 50–250 ms).
pub(crate) const DEFAULT_BACKOFF: Backoff = Backoff {
    base: Duration::from_millis(50),
    max: Duration::from_millis(250),
};
/// Default cap on `Retry-After`.
pub(crate) const DEFAULT_RETRY_AFTER_CAP: Duration = Duration::from_secs(1);
/// Default bound on awaiting the release before the response is returned: Redis's
/// default command timeout, which bounds the release anyway, so that no timer of ours is
/// needed (`backend::release_within`). A shorter wait costs its timer and a wake of a
/// parked worker thread, once per release (about 0.85× the hand-rolled lock's
/// uncontended throughput with 200 ms, 0.97–1.0× with 1 s; `benches/common_path.rs`).
pub(crate) const DEFAULT_RELEASE_TIMEOUT: Duration = Duration::from_secs(1);
/// Default longest accepted key, in bytes.
pub(crate) const DEFAULT_MAX_KEY_LEN: usize = 512;
/// Default number of hand-offs in a row within one process before a real release.
pub(crate) const DEFAULT_MAX_HAND_OFFS: u32 = 8;

/// How often the watchdog extends the lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Renewal {
    /// Every third of the ttl.
    Auto,
    Every(Duration),
    Off,
}

/// The `class` label of a locker's metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum MetricsClass {
    /// Follows the key prefix (without its trailing `:`), or `default`.
    FromPrefix(Arc<str>),
    /// Set with `metrics_class`.
    Named(Arc<str>),
}

impl MetricsClass {
    fn from_prefix(prefix: &str) -> Self {
        let class = prefix.trim_end_matches(':');
        MetricsClass::FromPrefix(if class.is_empty() {
            "default".into()
        } else {
            class.into()
        })
    }

    /// The class with `:kind` appended, when there is a kind.
    fn with_kind(self, kind: Option<LockKind>) -> Self {
        let Some(kind) = kind.map(|kind| kind.name()) else {
            return self;
        };
        match self {
            MetricsClass::FromPrefix(class) => {
                MetricsClass::FromPrefix(format!("{class}:{kind}").into())
            }
            MetricsClass::Named(class) => MetricsClass::Named(format!("{class}:{kind}").into()),
        }
    }

    pub(crate) fn label(&self) -> &Arc<str> {
        match self {
            MetricsClass::FromPrefix(class) | MetricsClass::Named(class) => class,
        }
    }
}

/// The settings; see the builder methods of [`Locker`](super::Locker) for each.
#[derive(Clone, Debug)]
pub(crate) struct LockSettings {
    pub(crate) ttl: Duration,
    pub(crate) max_wait: Duration,
    pub(crate) backoff: Backoff,
    pub(crate) key_prefix: Arc<str>,
    pub(crate) class: MetricsClass,
    pub(crate) max_key_len: usize,
    pub(crate) contended_status: StatusCode,
    pub(crate) retry_after_cap: Duration,
    pub(crate) release_timeout: Duration,
    pub(crate) renewal: Renewal,
    /// The kind of lock when not exclusive (`permits`, `read`, `write`): appended to the
    /// metrics class, so that the modes of one route count apart.
    pub(crate) kind: Option<LockKind>,
    /// How many hot keys to track.
    pub(crate) hot_keys: usize,
    /// Hot keys and hold times, for this class.
    pub(crate) observed: Arc<Observed>,
}

impl Default for LockSettings {
    fn default() -> Self {
        let class = MetricsClass::from_prefix("");
        Self {
            observed: Observed::new(class.label(), DEFAULT_HOT_KEYS),
            ttl: DEFAULT_TTL,
            max_wait: DEFAULT_MAX_WAIT,
            backoff: DEFAULT_BACKOFF,
            key_prefix: Arc::from(""),
            class,
            max_key_len: DEFAULT_MAX_KEY_LEN,
            contended_status: StatusCode::CONFLICT,
            retry_after_cap: DEFAULT_RETRY_AFTER_CAP,
            release_timeout: DEFAULT_RELEASE_TIMEOUT,
            renewal: Renewal::Auto,
            kind: None,
            hot_keys: DEFAULT_HOT_KEYS,
        }
    }
}

impl LockSettings {
    pub(crate) fn set_key_prefix(&mut self, prefix: Arc<str>) {
        if let MetricsClass::FromPrefix(_) = self.class {
            self.set_class(MetricsClass::from_prefix(&prefix));
        }
        self.key_prefix = prefix;
    }

    /// Names the metrics class (with the kind appended, for a kind other than exclusive);
    /// a new class starts with nothing observed.
    pub(crate) fn set_class(&mut self, class: MetricsClass) {
        let class = class.with_kind(self.kind);
        if class != self.class {
            self.observed = Observed::new(class.label(), self.hot_keys);
        }
        self.class = class;
    }

    /// Makes these the settings of a kind of lock other than exclusive: `class:kind`.
    pub(crate) fn set_kind(&mut self, kind: LockKind) {
        self.kind = Some(kind);
        let class = match &self.class {
            MetricsClass::FromPrefix(_) => MetricsClass::from_prefix(&self.key_prefix),
            MetricsClass::Named(class) => MetricsClass::Named(class.clone()),
        };
        self.set_class(class);
    }

    /// Tracks the `capacity` most contended keys, starting afresh.
    pub(crate) fn set_hot_keys(&mut self, capacity: usize) {
        self.hot_keys = capacity;
        self.observed = Observed::new(self.class(), capacity);
    }

    /// The metrics label of these locks.
    pub(crate) fn class(&self) -> &Arc<str> {
        self.class.label()
    }

    /// What one acquisition needs to know.
    pub(crate) fn wait_policy(&self) -> WaitPolicy {
        WaitPolicy {
            ttl: self.ttl,
            max_wait: self.max_wait,
            backoff: self.backoff,
            renews: self.renewal != Renewal::Off,
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
        match self.renewal {
            Renewal::Off => None,
            Renewal::Auto => Some(self.ttl / 3),
            Renewal::Every(every) => Some(every.min(self.ttl / 2)),
        }
    }

    /// The answer to a wait that ended without the lock.
    pub(crate) fn rejection(&self, err: AcquireError) -> LockRejection {
        match err {
            AcquireError::Contended { remaining } => LockRejection::Contended {
                status: self.contended_status,
                retry_after: remaining
                    .map_or(self.retry_after_cap, |r| r.min(self.retry_after_cap)),
            },
            AcquireError::Unavailable(source) => LockRejection::Unavailable {
                source,
                retry_after: self.retry_after_cap,
            },
        }
    }
}
