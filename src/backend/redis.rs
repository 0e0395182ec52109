//! Locks on one Redis server, through a deadpool-redis pool.

use std::{fmt, future::Future, sync::Arc, time::Duration};

use deadpool_redis::{
    Pool, Runtime,
    redis::{
        Client, Cmd, ErrorKind, FromRedisValue, RedisError, RedisWrite, Script, ServerErrorKind,
        ToRedisArgs, Value, aio::ConnectionLike,
    },
};
use uuid::Uuid;

use super::{
    Acquire, BackendError, ConfigError, LockBackend, Released,
    connection::{Conn, Pools, SharedConnection},
    notify::{Notifier, Source},
    scripts::{ACQUIRE, EXTEND, RELEASE, UNDO},
};
use crate::{key::LockKey, kind::LockKind};

mod kinds;

mod fair;

/// Default namespace of the Redis keys.
const DEFAULT_PREFIX: &str = "lock:";
/// Default bound on one operation, pool checkout included. Lock scripts take
/// microseconds; a server that needs longer is treated as unavailable.
const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(1);
/// Default time a fence counter outlives its last use: a day, far beyond any clock step
/// NTP makes, and short enough that a key locked once costs memory for one day only.
const DEFAULT_FENCE_RETENTION: Duration = Duration::from_secs(24 * 60 * 60);

/// A backend on one Redis server (DESIGN §3).
///
/// The lock for key `k` is the Redis string `<prefix>{k}` whose value is the owner's
/// token; the braces make `k` the Cluster hash tag, so every key of one lock shares a
/// slot. An uncontended acquire is one plain `SET NX PX`; a refused one runs the
/// acquire script next (and the same token's later attempts start with it), as every
/// acquire with fencing does. Release and extend are one Lua script each.
///
/// The backend takes one connection out of the pool and shares it among all its
/// operations (connections are multiplexed); after a connection error or timeout the next
/// operation takes a fresh one.
///
/// # Example
///
/// ```no_run
/// use std::time::Duration;
/// use deadpool_redis::{Config, Runtime};
/// use tower_redis_lock::RedisBackend;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let pool = Config::from_url("redis://127.0.0.1:6379").create_pool(Some(Runtime::Tokio1))?;
/// let backend = RedisBackend::new(pool)
///     .key_prefix("shop:lock:")
///     .command_timeout(Duration::from_millis(500));
/// # let _ = backend;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisBackend {
    connection: Arc<SharedConnection>,
    notifier: Option<Arc<Notifier>>,
    config: Arc<Config>,
}

#[derive(Clone, Debug)]
struct Config {
    prefix: Box<str>,
    command_timeout: Duration,
    fencing: bool,
    /// Fair mode (see `fair`): releases grant the lock to the next waiter in line.
    fair: bool,
    /// [`RedisBackend::fence_retention`], in whole ms.
    fence_retention_ms: u64,
}

impl RedisBackend {
    /// A backend over `pool`, with the key prefix `lock:` and a 1 s command timeout.
    pub fn new(pool: Pool) -> Self {
        Self::with_pools(Pools::Single(pool))
    }

    fn with_pools(pools: Pools) -> Self {
        Self {
            connection: Arc::new(SharedConnection::new(pools)),
            notifier: None,
            config: Arc::new(Config {
                prefix: DEFAULT_PREFIX.into(),
                command_timeout: DEFAULT_COMMAND_TIMEOUT,
                fencing: false,
                fair: false,
                fence_retention_ms: lease_millis(DEFAULT_FENCE_RETENTION),
            }),
        }
    }

    /// A backend on the Redis server at `url`, with a pool of default size and release
    /// notifications on: waiters wake as soon as a lock they wait for is released, instead
    /// of on their next backoff.
    ///
    /// The URL is `redis://[<user>][:<password>@]<host>:<port>[/<db>]`; with the `tls`
    /// feature also `rediss://…`, checked against the platform's root certificates (for a
    /// CA of your own, see [`from_client`](Self::from_client)). The lock and notification
    /// connections both log in with the URL's user and password.
    ///
    /// Nothing is connected yet: a malformed URL (or `rediss://` without the `tls`
    /// feature) is a [`ConfigError`]; an unreachable server, a wrong password or an
    /// untrusted certificate shows later, as 503s and a WARN log line.
    pub fn from_url(url: &str) -> Result<Self, ConfigError> {
        let client = Client::open(url).map_err(|err| ConfigError(err.into()))?;
        Self::from_client(client)
    }

    /// A backend on `client`'s server, with a pool of default size and release
    /// notifications over `client`, as [`from_url`](Self::from_url) but for a client
    /// built by hand: TLS with a CA of your own or a client certificate
    /// (`Client::build_with_tls`, with the `tls` feature), or connection settings that a URL
    /// cannot say.
    ///
    /// ```no_run
    /// # #[cfg(feature = "tls")]
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use deadpool_redis::redis::{Client, TlsCertificates};
    /// use tower_redis_lock::RedisBackend;
    ///
    /// let client = Client::build_with_tls(
    ///     "rediss://locker:password@redis.internal:6380",
    ///     TlsCertificates {
    ///         client_tls: None,
    ///         root_cert: Some(std::fs::read("/etc/redis/ca.crt")?),
    ///     },
    /// )?;
    /// let backend = RedisBackend::from_client(client)?;
    /// # let _ = backend;
    /// # Ok(())
    /// # }
    /// # #[cfg(not(feature = "tls"))]
    /// # fn main() {}
    /// ```
    ///
    /// Nothing is connected yet; a [`ConfigError`] means the pool could not be built from
    /// the client's settings.
    pub fn from_client(client: Client) -> Result<Self, ConfigError> {
        let manager = deadpool_redis::Manager::new(client.get_connection_info().clone())
            .map_err(|err| ConfigError(err.into()))?;
        let pool = Pool::builder(manager)
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|err| ConfigError(err.into()))?;
        Ok(Self::new(pool).notify_with(client))
    }

    /// Wakes waiters on release notifications (DESIGN §5), received over one pub/sub
    /// connection that `client` opens for this backend and its clones.
    ///
    /// A release publishes on the lock's channel `<prefix>{<key>}:released` when a waiter
    /// was refused the lock since it was taken (whether or not this is on here); with it
    /// on, a waiter subscribes to the channel and retries the moment a message arrives,
    /// rather than at the end of its backoff. Messages can be
    /// lost (pub/sub is at-most-once), so the backoff stays as the safety net, and a lost
    /// subscriber connection is made again by the next wait.
    pub fn notify_with(mut self, client: Client) -> Self {
        self.notifier = Some(Arc::new(Notifier::new(
            Source::Client(client),
            self.config.command_timeout,
        )));
        self
    }

    /// A backend on the primary of the Sentinel-monitored group `master_name`, found
    /// through the Sentinels at `sentinel_urls` (`redis://host:26379`, one per Sentinel),
    /// with a pool of default size and release notifications on.
    ///
    /// Every new connection (the first one, and the next after a connection error or a
    /// `READONLY` from a demoted primary) asks the Sentinels for the current primary, and
    /// so does the notification connection when it connects again: during a failover
    /// requests get 503, afterwards they go to the new primary. What a failover can do to
    /// a held lock: see the README (Sentinel). Credentials or TLS for the data nodes: build
    /// the pool yourself and use [`sentinel`](Self::sentinel).
    ///
    /// Nothing is connected yet: malformed URLs are a [`ConfigError`].
    #[cfg(feature = "sentinel")]
    pub fn from_sentinel(sentinel_urls: &[&str], master_name: &str) -> Result<Self, ConfigError> {
        use deadpool_redis::{redis::sentinel::SentinelClient, sentinel};
        let urls: Vec<String> = sentinel_urls.iter().map(|url| url.to_string()).collect();
        let config = sentinel::Config::from_urls(
            urls,
            master_name.to_owned(),
            sentinel::SentinelServerType::Master,
        );
        let pool = config
            .create_pool(Some(Runtime::Tokio1))
            .map_err(|err| ConfigError(err.into()))?;
        // `build` takes a `String` without redis's TLS feature, `impl AsRef<str>` with it.
        #[allow(clippy::unnecessary_to_owned)]
        let client = SentinelClient::build(
            sentinel_urls.to_vec(),
            master_name.to_owned(),
            None,
            deadpool_redis::redis::sentinel::SentinelServerType::Master,
        )
        .map_err(|err| ConfigError(err.into()))?;
        Ok(Self::sentinel(pool).notify_with_sentinel(client))
    }

    /// A backend over a deadpool-redis Sentinel pool (of `SentinelServerType::Master`),
    /// for settings [`from_sentinel`](Self::from_sentinel) does not take (the data nodes'
    /// credentials or TLS); release notifications with
    /// [`notify_with_sentinel`](Self::notify_with_sentinel).
    #[cfg(feature = "sentinel")]
    pub fn sentinel(pool: deadpool_redis::sentinel::Pool) -> Self {
        Self::with_pools(Pools::Sentinel(pool))
    }

    /// Release notifications as with [`notify_with`](Self::notify_with), over a connection
    /// to the current primary that `client` finds through the Sentinels (again at each
    /// reconnection, so after a failover too).
    #[cfg(feature = "sentinel")]
    pub fn notify_with_sentinel(
        mut self,
        client: deadpool_redis::redis::sentinel::SentinelClient,
    ) -> Self {
        self.notifier = Some(Arc::new(Notifier::new(
            Source::Sentinel(tokio::sync::Mutex::new(client)),
            self.config.command_timeout,
        )));
        self
    }

    /// A backend on a Redis Cluster, through a deadpool-redis cluster pool.
    ///
    /// Every key of one lock shares a hash slot (`<prefix>{<key>}` and its suffixes), so
    /// each script runs on the one primary that owns the lock. For release notifications,
    /// give [`notify_with`](Self::notify_with) a client for any one node: classic pub/sub
    /// messages reach every node of a cluster.
    #[cfg(feature = "cluster")]
    pub fn cluster(pool: deadpool_redis::cluster::Pool) -> Self {
        Self::with_pools(Pools::Cluster(pool))
    }

    /// Sets the namespace put before every Redis key (default `lock:`). It must not
    /// contain `{`, which would move the Cluster hash tag.
    ///
    /// # Panics
    ///
    /// When `prefix` contains `{` or `}`.
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        let prefix = prefix.into();
        assert!(
            !prefix.contains(['{', '}']),
            "RedisBackend::key_prefix must not contain braces: they would move the hash tag"
        );
        Arc::make_mut(&mut self.config).prefix = prefix.into();
        self
    }

    /// Bounds each operation, connection checkout included (default 1 s). Past it the
    /// operation fails with [`BackendError::Timeout`] and the request gets 503.
    ///
    /// # Panics
    ///
    /// When `timeout` is zero.
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        assert!(
            !timeout.is_zero(),
            "RedisBackend::command_timeout must be positive"
        );
        Arc::make_mut(&mut self.config).command_timeout = timeout;
        self
    }

    /// Hands out a fencing token with every acquisition (off by default); see
    /// [`Held::fencing_token`](crate::Held::fencing_token).
    ///
    /// The token is taken inside the acquire script (no extra round trip) from the
    /// lock's counter key, `<prefix>{<key>}:fence`, as a hybrid logical clock:
    /// `max(stored + 1, server time in µs)` (Redis `TIME`). The counter expires
    /// [`fence_retention`](Self::fence_retention) after its last use (default a day), so
    /// keys locked once cost memory for that long only; a counter that expired restarts
    /// from the server clock, above every token it gave, **as long as the server's clock
    /// does not step back by more than the retention**. Tokens are about 1.8·10¹⁵ (µs
    /// since 1970), not small counts.
    ///
    /// Tokens only grow while the counter survives for its retention: run Redis with
    /// `maxmemory-policy noeviction` (an `allkeys-*` policy may evict a counter early,
    /// and a clock that stepped back since then lets it restart below a token it gave)
    /// and with AOF persistence where a restart must not lose the last tokens.
    pub fn fencing(mut self, on: bool) -> Self {
        Arc::make_mut(&mut self.config).fencing = on;
        self
    }

    /// How long a fence counter outlives its last use (default one day): the clock step
    /// back the tokens survive. See [`fencing`](Self::fencing).
    ///
    /// A counter not used for this long expires; the next acquisition of its key takes
    /// its token from the server clock, which is then at least this much past the last
    /// token handed out, unless the clock stepped back by more. Shorter keeps less memory
    /// for keys locked once (a day of them) and tolerates a smaller step; it need not be
    /// longer than the ttl.
    ///
    /// # Panics
    ///
    /// When `retention` is under one millisecond.
    pub fn fence_retention(mut self, retention: Duration) -> Self {
        assert!(
            retention >= Duration::from_millis(1),
            "RedisBackend::fence_retention must be at least 1 ms"
        );
        Arc::make_mut(&mut self.config).fence_retention_ms = lease_millis(retention);
        self
    }

    /// The Redis key that stores the lock `key`: `<prefix>{<key>}`, where `}` and `%` in
    /// the key are written `%7D` and `%25` so that the braces always hold the whole key
    /// (one Cluster slot for every key of the lock, and no two keys alike).
    #[cfg(feature = "idempotency")]
    pub(crate) fn redis_key(&self, key: &LockKey) -> String {
        self.key_with_suffix(key, "")
    }

    /// The Redis key of the response kept for idempotency key `key`:
    /// `<prefix>{<key>}:response`, in the same slot as its lock.
    #[cfg(feature = "idempotency")]
    pub(crate) fn response_key(&self, key: &LockKey) -> String {
        self.key_with_suffix(key, ":response")
    }

    /// The pub/sub channel on which releases of `key` are announced:
    /// `<prefix>{<key>}:released`.
    pub(crate) fn release_channel(&self, key: &LockKey) -> String {
        self.key_with_suffix(key, ":released")
    }

    fn key_with_suffix(&self, key: &LockKey, suffix: &str) -> String {
        let prefix = &self.config.prefix;
        let mut redis_key = String::with_capacity(prefix.len() + key.len() + 2 + suffix.len());
        redis_key.push_str(prefix);
        redis_key.push('{');
        push_hash_tag(&mut redis_key, key.as_str());
        redis_key.push('}');
        redis_key.push_str(suffix);
        redis_key
    }

    /// The Redis key `<prefix>{<key>}<suffix>` as a command argument, written straight
    /// into the command (no `String` of its own).
    fn key_arg<'a>(&'a self, key: &'a LockKey, suffix: &'static str) -> KeyArg<'a> {
        KeyArg {
            prefix: &self.config.prefix,
            key,
            suffix,
        }
    }

    /// `EVALSHA <script> <keys>` with room for the rest; the keys are the lock's key and
    /// the given suffixes of it, in that order: `:fence` for the fencing counter (expiring
    /// the fence retention after its last use, see `scripts::FENCE_LUA`),
    /// `:waiters` for the mark a refused waiter leaves (its token, with a short expiry),
    /// `:released` for the release channel.
    fn evalsha(&self, script: &Script, key: &LockKey, suffixes: &[&'static str]) -> Cmd {
        // Room for the name, the hash, the keys and a token and two short arguments:
        // the command never grows its buffers.
        let mut cmd = Cmd::with_capacity(
            3 + (1 + suffixes.len()) + 5,
            128 + (1 + suffixes.len()) * (self.config.prefix.len() + key.len() + 12),
        );
        cmd.arg("EVALSHA")
            .arg(script.get_hash())
            .arg(1 + suffixes.len())
            .arg(self.key_arg(key, ""));
        for suffix in suffixes {
            cmd.arg(self.key_arg(key, suffix));
        }
        cmd
    }

    /// Runs `cmd` on the shared connection within the command timeout; when it is an
    /// `EVALSHA` of `script` that the server does not know (`NOSCRIPT`: restarted or
    /// flushed), loads the script and sends `cmd` again.
    ///
    /// On an established single-server connection the bound is the connection's own
    /// response timeout, set to the command timeout on our handle of it (the client
    /// library times every request anyway): no second timer per command. Connecting, and
    /// Cluster connections, are bounded by a timer of ours.
    #[allow(
        clippy::manual_async_fn,
        reason = "an `async fn` stores its arguments twice"
    )]
    fn query<T: FromRedisValue>(
        &self,
        cmd: &Cmd,
        script: Option<&'static Script>,
    ) -> impl Future<Output = Result<T, BackendError>> {
        // A block: its captures are its variables (see `locker::acquire::from_backend`).
        async move {
            // `let else`, not `if let`: the scrutinee's temporary (the `Option<Conn>`) ends
            // with the statement instead of living, a second copy of the connection, across
            // the send.
            let Some(Conn::Single(mut conn)) = self.connection.current() else {
                // Boxed: connecting (and every Cluster command) takes this way; inline, its
                // future (a timer, the connect, the send) would be carried and moved by every
                // operation's.
                return Box::pin(self.guarded(async {
                    let mut conn = self.connection.get().await?;
                    send(&mut conn, cmd, script).await.map_err(classify)
                }))
                .await;
            };
            conn.set_response_timeout(self.config.command_timeout);
            let result = send(&mut conn, cmd, script).await.map_err(|err| {
                if err.is_timeout() {
                    BackendError::Timeout(self.config.command_timeout)
                } else {
                    classify(err)
                }
            });
            if matches!(
                result,
                Err(BackendError::Unavailable(_)
                    | BackendError::Timeout(_)
                    | BackendError::Stale(_))
            ) {
                self.connection.reset();
            }
            result
        }
    }

    /// Whether every release of this backend ends within `timeout` on its own (see
    /// `bounded`): a plain (not fair) release on one server is one script, each round
    /// trip bounded by the command timeout. Only that case, the one measured, goes
    /// without the locker's timer; fair and Cluster releases are bounded as well (one
    /// script; a Cluster command by a timer of its own) and keep it for now.
    pub(crate) fn bounds_release_within(&self, timeout: Duration) -> bool {
        !self.config.fair && !self.connection.is_cluster() && self.config.command_timeout <= timeout
    }

    /// One acquisition attempt. Without fencing, the first attempt of a token is a plain
    /// `SET NX PX`, and the script runs only when that is refused; a token refused before
    /// (`again`), and every attempt with fencing, goes to the script at once.
    #[allow(
        clippy::manual_async_fn,
        reason = "an `async fn` stores its arguments twice"
    )]
    pub(crate) fn attempt(
        &self,
        key: &LockKey,
        token: Uuid,
        ttl: Duration,
        again: bool,
    ) -> impl Future<Output = Result<Acquire, BackendError>> + Send {
        // A block: its captures are its variables (see `locker::acquire::from_backend`).
        async move {
            let mut buffer = Uuid::encode_buffer();
            let token = &*token.hyphenated().encode_lower(&mut buffer);
            let lease = lease_millis(ttl);
            if !self.config.fencing && !again {
                let mut cmd = Cmd::with_capacity(6, 80 + self.config.prefix.len() + key.len());
                cmd.arg("SET")
                    .arg(self.key_arg(key, ""))
                    .arg(token)
                    .arg("NX")
                    .arg("PX")
                    .arg(lease);
                match self.query::<Value>(&cmd, None).await? {
                    Value::Okay => {
                        return Ok(Acquire::Acquired {
                            fencing_token: None,
                        });
                    }
                    // Held: the script tells by whom (our own token after a lost reply?) and
                    // for how long, and leaves the mark.
                    Value::Nil => {}
                    other => {
                        return Err(BackendError::Command(
                            format!("unexpected SET reply {other:?}").into(),
                        ));
                    }
                }
            }
            self.acquire_script(key, token, lease, again || !self.config.fencing)
                .await
        }
    }

    /// The acquire script (see `scripts::ACQUIRE`); `own_mark`: this token may have left a
    /// mark, to be cleared if it takes the lock.
    async fn acquire_script(
        &self,
        key: &LockKey,
        token: &str,
        lease: u64,
        own_mark: bool,
    ) -> Result<Acquire, BackendError> {
        let mut cmd = self.evalsha(&ACQUIRE, key, &[":fence", ":waiters"]);
        cmd.arg(token)
            .arg(lease)
            .arg(if self.config.fencing { "1" } else { "0" })
            .arg(if own_mark { "1" } else { "0" })
            .arg(self.config.fence_retention_ms);
        let reply: Vec<i64> = self.query(&cmd, Some(&ACQUIRE)).await?;
        match reply.as_slice() {
            [1] if !self.config.fencing => Ok(Acquire::Acquired {
                fencing_token: None,
            }),
            [1, fence] if self.config.fencing && *fence > 0 => Ok(Acquire::Acquired {
                fencing_token: Some(fence.unsigned_abs()),
            }),
            // PTTL is -1 for a key without expiry (not one of ours) and -2 if it vanished
            // between the calls; neither says when the lock frees up.
            [0, pttl] => Ok(Acquire::Held {
                remaining: u64::try_from(*pttl).ok().map(Duration::from_millis),
            }),
            other => Err(BackendError::Command(
                format!("unexpected acquire reply {other:?}").into(),
            )),
        }
    }

    /// An attempt in one script, as Redlock makes on each node: its fault tests (and
    /// their proxies) know the acquire by the fence key it names. Redlock gives every
    /// attempt a fresh token, so no mark of it can be there yet.
    pub(crate) async fn attempt_in_script(
        &self,
        key: &LockKey,
        token: Uuid,
        ttl: Duration,
    ) -> Result<Acquire, BackendError> {
        let mut buffer = Uuid::encode_buffer();
        let token = &*token.hyphenated().encode_lower(&mut buffer);
        self.acquire_script(key, token, lease_millis(ttl), false)
            .await
    }

    /// Runs the release script (`scripts::RELEASE`), which tells waiters elsewhere.
    async fn release_script(&self, key: &LockKey, token: Uuid) -> Result<Released, BackendError> {
        let mut buffer = Uuid::encode_buffer();
        let mut cmd = self.evalsha(&RELEASE, key, &[":waiters"]);
        cmd.arg(&*token.hyphenated().encode_lower(&mut buffer));
        let reply: u64 = self.query(&cmd, Some(&RELEASE)).await?;
        Ok(self.release_reply(key, reply))
    }

    /// The release script's one-integer answer (see `scripts::RELEASE`) as a release.
    fn release_reply(&self, key: &LockKey, reply: u64) -> Released {
        let (was_held, marked, receivers) = (reply >= 1, reply >= 2, reply.saturating_sub(2));
        self.released(Some(key), was_held, receivers, marked)
    }

    /// A release's answer: `receivers` told, less our own subscriber when it listens on
    /// `key`'s channel (it is not a waiter elsewhere); marked waiters that nobody told
    /// poll, when our notifications are off or failing (and so presumably theirs).
    fn released(
        &self,
        key: Option<&LockKey>,
        held: bool,
        receivers: u64,
        marked: bool,
    ) -> Released {
        let ours = marked
            && key.is_some_and(|key| {
                self.notifier
                    .as_ref()
                    .is_some_and(|n| n.listens_on(&self.release_channel(key)))
            });
        Released {
            was_held: held,
            notified: receivers.saturating_sub(u64::from(ours)),
            unnotified_waiters: marked
                && receivers == 0
                && !self.notifier.as_ref().is_some_and(|n| n.is_healthy()),
        }
    }

    /// Undoes an acquisition nobody may know of (a failed Redlock attempt): a release
    /// that tells no waiter.
    pub(crate) async fn undo(&self, key: &LockKey, token: Uuid) -> Result<Released, BackendError> {
        let mut buffer = Uuid::encode_buffer();
        let mut cmd = self.evalsha(&UNDO, key, &[]);
        cmd.arg(&*token.hyphenated().encode_lower(&mut buffer));
        let reply: u64 = self.query(&cmd, Some(&UNDO)).await?;
        Ok(self.release_reply(key, reply))
    }

    /// Drops the shared connection: the next operation takes a fresh one.
    pub(crate) fn reset_connection(&self) {
        self.connection.reset();
    }

    /// Runs a script on the shared connection within the command timeout (for the
    /// idempotency store; the lock's own calls have dedicated paths).
    #[cfg(feature = "idempotency")]
    pub(crate) async fn run<T: FromRedisValue>(
        &self,
        invocation: deadpool_redis::redis::ScriptInvocation<'static>,
    ) -> Result<T, BackendError> {
        self.guarded(async {
            let mut conn = self.connection.get().await?;
            invocation.invoke_async(&mut conn).await.map_err(classify)
        })
        .await
    }

    /// Bounds `call` by the command timeout, and drops the shared connection when the
    /// failure may lie with it.
    async fn guarded<T>(
        &self,
        call: impl Future<Output = Result<T, BackendError>>,
    ) -> Result<T, BackendError> {
        let timeout = self.config.command_timeout;
        let result = tokio::time::timeout(timeout, call)
            .await
            .unwrap_or(Err(BackendError::Timeout(timeout)));
        if matches!(
            result,
            Err(BackendError::Unavailable(_) | BackendError::Timeout(_) | BackendError::Stale(_))
        ) {
            // The next call starts afresh.
            self.connection.reset();
        }
        result
    }
}

/// Sends `cmd`; when it is an `EVALSHA` of `script` that the server does not know
/// (`NOSCRIPT`: restarted or flushed), loads the script and sends `cmd` again.
async fn send<T: FromRedisValue>(
    conn: &mut impl ConnectionLike,
    cmd: &Cmd,
    script: Option<&'static Script>,
) -> Result<T, RedisError> {
    match (cmd.query_async(conn).await, script) {
        (Err(err), Some(script)) if err.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
            // Boxed, as rare: the common path's future stays small.
            Box::pin(async move {
                script.prepare_invoke().load_async(conn).await?;
                cmd.query_async(conn).await
            })
            .await
        }
        (reply, _) => reply,
    }
}

/// Appends `key` as the content of a hash tag that nothing can end early or leave empty.
///
/// Redis hashes the text between the first `{` and the first `}` after it, unless that is
/// empty. A `}` in the key would end the tag early (and `}` first would empty it, so the
/// lock and its `:fence` key would land in different Cluster slots), so it is written
/// `%7D`, and `%` itself `%25`; every other character is kept, so ordinary keys read as
/// they are. The empty key, which the layer never sends, becomes a lone `%`, which no
/// other key can produce. Distinct keys give distinct tags.
fn push_hash_tag(out: &mut String, key: &str) {
    hash_tag_parts(key, |part| out.push_str(part));
}

/// [`push_hash_tag`]'s text, in pieces.
fn hash_tag_parts(key: &str, mut push: impl FnMut(&str)) {
    if key.is_empty() {
        push("%");
        return;
    }
    if !key.contains(['}', '%']) {
        push(key);
        return;
    }
    let mut rest = key;
    while let Some(at) = rest.find(['}', '%']) {
        push(&rest[..at]);
        push(if rest.as_bytes()[at] == b'}' {
            "%7D"
        } else {
            "%25"
        });
        rest = &rest[at + 1..];
    }
    push(rest);
}

/// A lock's Redis key (`<prefix>{<key>}<suffix>`, see [`RedisBackend::redis_key`]) as
/// one command argument.
struct KeyArg<'a> {
    prefix: &'a str,
    key: &'a LockKey,
    suffix: &'static str,
}

impl ToRedisArgs for KeyArg<'_> {
    fn write_redis_args<W: ?Sized + RedisWrite>(&self, out: &mut W) {
        use std::io::Write;
        let key = self.key.as_str();
        let len = self.prefix.len() + key.len() + 2 + self.suffix.len();
        let mut text = [0; 192];
        if len <= text.len() && !key.is_empty() && !key.bytes().any(|b| b == b'}' || b == b'%') {
            // The usual key, tagged as it is, assembled on the stack and written in one
            // piece: part by part through the argument's writer cost about 400
            // instructions an argument.
            let mut at = 0;
            for part in [self.prefix, "{", key, "}", self.suffix] {
                text[at..at + part.len()].copy_from_slice(part.as_bytes());
                at += part.len();
            }
            out.write_arg(&text[..len]);
            return;
        }
        let mut arg = out.writer_for_next_arg();
        // Writes into the command's buffer cannot fail.
        let _ = arg.write_all(self.prefix.as_bytes());
        let _ = arg.write_all(b"{");
        hash_tag_parts(self.key.as_str(), |part| {
            let _ = arg.write_all(part.as_bytes());
        });
        let _ = arg.write_all(b"}");
        let _ = arg.write_all(self.suffix.as_bytes());
    }
}

#[cfg(fuzzing)]
impl RedisBackend {
    /// For the fuzz targets: the Redis key `<prefix>{<key>}<suffix>` as the backend names
    /// it ([`key_with_suffix`](Self::key_with_suffix)) and as it writes it into a script's
    /// arguments ([`KeyArg`]).
    pub(crate) fn fuzz_key(&self, key: &LockKey, suffix: &'static str) -> (String, Vec<u8>) {
        let arg = self.key_arg(key, suffix).to_redis_args().concat();
        (self.key_with_suffix(key, suffix), arg)
    }
}

/// The longest lease sent to Redis, in ms (about 285,000 years): Redis refuses a `PX`
/// whose deadline overflows its clock, and 2⁵³ stays exact in the scripts' Lua numbers.
/// A longer ttl (`Duration::MAX` for "forever") is clamped to it.
const MAX_LEASE_MILLIS: u64 = 1 << 53;

/// A lease in whole milliseconds, at least one (`PX 0` is an error in Redis) and at most
/// [`MAX_LEASE_MILLIS`].
fn lease_millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis())
        .unwrap_or(u64::MAX)
        .clamp(1, MAX_LEASE_MILLIS)
}

/// Connection trouble means "unavailable"; a server that cannot take writes now (a former
/// primary demoted after a failover, one still loading) means the connection should be
/// made anew; anything else the server said is a command error.
fn classify(err: RedisError) -> BackendError {
    if matches!(
        err.kind(),
        ErrorKind::Server(
            ServerErrorKind::ReadOnly | ServerErrorKind::BusyLoading | ServerErrorKind::MasterDown
        )
    ) {
        return BackendError::Stale(err.into());
    }
    if err.is_io_error()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || err.is_timeout()
    {
        BackendError::Unavailable(err.into())
    } else {
        BackendError::Command(err.into())
    }
}

impl LockBackend for RedisBackend {
    // Not `async`: the attempt's own future, without a wrapper's copy of the arguments
    // around it (the wait's generic attempt carries this future's size).
    fn try_acquire(
        &self,
        key: &LockKey,
        token: Uuid,
        ttl: Duration,
    ) -> impl Future<Output = Result<Acquire, BackendError>> + Send {
        self.attempt(key, token, ttl, false)
    }

    async fn release(&self, key: &LockKey, token: Uuid) -> Result<Released, BackendError> {
        if self.config.fair {
            return Ok(self.fair_release(key, token, false).await?.released());
        }
        self.release_script(key, token).await
    }

    async fn extend(
        &self,
        key: &LockKey,
        token: Uuid,
        ttl: Duration,
    ) -> Result<bool, BackendError> {
        let mut buffer = Uuid::encode_buffer();
        let mut cmd = self.evalsha(&EXTEND, key, &[]);
        cmd.arg(&*token.hyphenated().encode_lower(&mut buffer))
            .arg(lease_millis(ttl));
        let extended: i64 = self.query(&cmd, Some(&EXTEND)).await?;
        Ok(extended == 1)
    }

    /// Every kind: permits and read/write in scripts of their own (see `kinds`).
    fn supports(&self, _kind: LockKind) -> bool {
        true
    }

    async fn try_acquire_kind(
        &self,
        kind: LockKind,
        key: &LockKey,
        token: Uuid,
        ttl: Duration,
    ) -> Result<Acquire, BackendError> {
        self.acquire_kind(kind, key, token, ttl).await
    }

    async fn release_kind(
        &self,
        kind: LockKind,
        key: &LockKey,
        token: Uuid,
    ) -> Result<Released, BackendError> {
        self.release_kind_script(kind, key, token).await
    }

    async fn extend_kind(
        &self,
        kind: LockKind,
        key: &LockKey,
        token: Uuid,
        ttl: Duration,
    ) -> Result<bool, BackendError> {
        self.extend_kind_script(kind, key, token, ttl).await
    }

    async fn try_acquire_many(
        &self,
        keys: &[LockKey],
        token: Uuid,
        ttl: Duration,
    ) -> Result<Acquire, BackendError> {
        self.acquire_many(keys, token, ttl).await
    }

    async fn release_many(&self, keys: &[LockKey], token: Uuid) -> Result<Released, BackendError> {
        self.release_many_script(keys, token).await
    }

    async fn extend_many(
        &self,
        keys: &[LockKey],
        token: Uuid,
        ttl: Duration,
    ) -> Result<bool, BackendError> {
        self.extend_many_script(keys, token, ttl).await
    }
}

/// Release notifications (see `backend::wake`).
impl RedisBackend {
    pub(crate) fn release_epoch(&self, key: &LockKey) -> u64 {
        self.notifier.as_ref().map_or(0, |notifier| {
            notifier.epoch_of(|| self.release_channel(key))
        })
    }

    pub(crate) async fn wait_for_release(&self, key: &LockKey, epoch: u64, timeout: Duration) {
        match &self.notifier {
            Some(notifier) => {
                let channel = self.release_channel(key);
                notifier.wait(&channel, epoch, timeout).await
            }
            None => tokio::time::sleep(timeout).await,
        }
    }
}

impl fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBackend")
            .field("prefix", &self.config.prefix)
            .field("command_timeout", &self.config.command_timeout)
            .field("fencing", &self.config.fencing)
            .field("fence_retention_ms", &self.config.fence_retention_ms)
            .field("pool", &self.connection.status())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_tags_hold_the_whole_key_and_keep_keys_apart() {
        let tag = |key: &str| {
            let mut out = String::new();
            push_hash_tag(&mut out, key);
            out
        };
        assert_eq!(tag("order:42"), "order:42");
        assert_eq!(tag("{a}"), "{a%7D");
        assert_eq!(tag("}x"), "%7Dx");
        assert_eq!(tag("50%"), "50%25");
        assert_eq!(tag(""), "%");
        let hostile = [
            "", "%", "}", "%7D", "%25", "}}", "%}", "}%", "a}b", "a%7Db", "{", "{}",
        ];
        let tags: std::collections::HashSet<_> = hostile.iter().map(|key| tag(key)).collect();
        assert_eq!(tags.len(), hostile.len(), "two keys share a tag");
        for key in hostile {
            assert!(!tag(key).contains('}'), "{key:?} ends its tag early");
            assert!(!tag(key).is_empty());
        }
    }

    #[test]
    fn a_key_argument_is_the_key_the_backend_names() {
        let backend = RedisBackend::from_url("redis://127.0.0.1:1").expect("a valid URL");
        let long = "k".repeat(300);
        for key in ["order:42", "{a}", "50%", "", &long] {
            let key = LockKey::from(key);
            for suffix in ["", ":fence", ":waiters"] {
                let written = backend.key_arg(&key, suffix).to_redis_args().concat();
                let named = backend.key_with_suffix(&key, suffix);
                assert_eq!(written, named.as_bytes(), "{key:?} with {suffix:?}");
            }
        }
    }

    #[test]
    fn lease_is_whole_positive_milliseconds() {
        assert_eq!(lease_millis(Duration::from_micros(10)), 1);
        assert_eq!(lease_millis(Duration::from_millis(1500)), 1500);
        assert_eq!(lease_millis(Duration::MAX), MAX_LEASE_MILLIS);
    }
}
