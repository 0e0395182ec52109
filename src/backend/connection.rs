//! The one connection a [`RedisBackend`](super::RedisBackend) shares among its operations,
//! from a single-server pool or a Cluster pool.
//!
//! Redis connections are multiplexed, so one is enough for every concurrent operation; a
//! checkout per operation would cost a round trip of its own (deadpool-redis pings every
//! connection it hands out). After a connection error or timeout the next operation takes
//! a fresh connection from the pool.

use std::{
    sync::{
        Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use deadpool_redis::{
    Connection, Pool, PoolError,
    redis::{
        Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, ServerErrorKind, Value,
        aio::ConnectionLike, aio::MultiplexedConnection,
    },
};
#[cfg(feature = "cluster")]
use deadpool_redis::{cluster, redis::cluster_async::ClusterConnection};

use super::{BackendError, environment};

/// Where connections come from.
#[derive(Clone)]
pub(super) enum Pools {
    Single(Pool),
    #[cfg(feature = "cluster")]
    Cluster(cluster::Pool),
    #[cfg(feature = "sentinel")]
    Sentinel(deadpool_redis::sentinel::Pool),
}

/// A connection to one server or to the cluster; cheap to clone.
#[derive(Clone)]
pub(super) enum Conn {
    Single(MultiplexedConnection),
    #[cfg(feature = "cluster")]
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(conn) => conn.req_packed_command(cmd),
            #[cfg(feature = "cluster")]
            Conn::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            #[cfg(feature = "cluster")]
            Conn::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(conn) => conn.get_db(),
            #[cfg(feature = "cluster")]
            Conn::Cluster(conn) => conn.get_db(),
        }
    }
}

/// The shared connection and the pool it comes from.
pub(super) struct SharedConnection {
    pools: Pools,
    current: Mutex<Option<Conn>>,
    /// Held while a connection is being made: operations that find none wait for it
    /// rather than each opening (and, with TLS, handshaking) one of their own, of which
    /// all but one would be dropped. A cold start under load made one per request.
    connecting: tokio::sync::Mutex<()>,
    /// Whether the server's settings were looked at (once, on the first connection).
    checked: AtomicBool,
    /// When a failure to connect was last logged, and how many were not since.
    failure_log: Mutex<Option<Instant>>,
    unlogged_failures: AtomicU64,
}

/// A backend that cannot connect logs it at WARN at most once per this interval (every
/// request tries anew, and each gets its 503).
const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(10);

impl SharedConnection {
    pub(super) fn new(pools: Pools) -> Self {
        Self {
            pools,
            current: Mutex::default(),
            connecting: tokio::sync::Mutex::const_new(()),
            checked: AtomicBool::new(false),
            failure_log: Mutex::default(),
            unlogged_failures: AtomicU64::new(0),
        }
    }

    /// Logs a failure to connect, at most once per [`FAILURE_LOG_INTERVAL`], with what it
    /// most likely means.
    fn log_failure(&self, err: &PoolError) {
        let now = Instant::now();
        {
            let mut last = self
                .failure_log
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if last.is_some_and(|at| now.duration_since(at) < FAILURE_LOG_INTERVAL) {
                self.unlogged_failures.fetch_add(1, Ordering::Relaxed);
                return;
            }
            *last = Some(now);
        }
        let since = self.unlogged_failures.swap(0, Ordering::Relaxed);
        tracing::warn!(
            error = %err,
            failures_not_logged = since,
            "cannot connect to Redis: {}; lock requests get 503",
            connect_failure_hint(err)
        );
    }

    fn slot(&self) -> MutexGuard<'_, Option<Conn>> {
        // The slot holds a plain value that no panic can leave half-written.
        self.current.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the pools are a Cluster's (where keys of different slots cannot meet in
    /// one script).
    pub(super) fn is_cluster(&self) -> bool {
        #[cfg(feature = "cluster")]
        if let Pools::Cluster(_) = self.pools {
            return true;
        }
        false
    }

    /// The shared connection, if there is one now.
    pub(super) fn current(&self) -> Option<Conn> {
        self.slot().clone()
    }

    /// The shared connection, taken from the pool when there is none yet.
    pub(super) async fn get(&self) -> Result<Conn, BackendError> {
        match self.current() {
            Some(conn) => Ok(conn),
            // Boxed: connecting is rare, and its future is large; inline, every
            // operation's future would carry (and move) its size.
            None => Box::pin(self.connect_once()).await,
        }
    }

    /// The connection another operation made while this one waited its turn to connect,
    /// or a fresh one. The wait is bounded by the caller's timer, like the connect.
    async fn connect_once(&self) -> Result<Conn, BackendError> {
        let _connecting = self.connecting.lock().await;
        match self.current() {
            Some(conn) => Ok(conn),
            None => self.connect().await,
        }
    }

    /// Takes a connection from the pool and shares it.
    async fn connect(&self) -> Result<Conn, BackendError> {
        let unavailable = |err: PoolError| {
            self.log_failure(&err);
            BackendError::Unavailable(err.into())
        };
        let fresh = match &self.pools {
            Pools::Single(pool) => {
                Conn::Single(Connection::take(pool.get().await.map_err(unavailable)?))
            }
            #[cfg(feature = "cluster")]
            Pools::Cluster(pool) => Conn::Cluster(cluster::Connection::take(
                pool.get().await.map_err(unavailable)?,
            )),
            #[cfg(feature = "sentinel")]
            Pools::Sentinel(pool) => Conn::Single(deadpool_redis::sentinel::Connection::take(
                pool.get().await.map_err(unavailable)?,
            )),
        };
        if !self.checked.swap(true, Ordering::Relaxed)
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            // In the background and on a connection of its own (back to the pool after):
            // the operation that connected is not kept waiting, not even behind it.
            let pools = self.pools.clone();
            runtime.spawn(async move {
                match pools {
                    Pools::Single(pool) => {
                        if let Ok(conn) = pool.get().await {
                            environment::check(conn).await;
                        }
                    }
                    #[cfg(feature = "cluster")]
                    Pools::Cluster(pool) => {
                        if let Ok(conn) = pool.get().await {
                            environment::check(conn).await;
                        }
                    }
                    #[cfg(feature = "sentinel")]
                    Pools::Sentinel(pool) => {
                        if let Ok(conn) = pool.get().await {
                            environment::check(conn).await;
                        }
                    }
                }
            });
        }
        // Connects run one at a time (`connect_once`); should one ever be stored
        // meanwhile, keep it and drop ours.
        Ok(self.slot().get_or_insert(fresh).clone())
    }

    /// Forgets the shared connection: the next call takes a fresh one.
    pub(super) fn reset(&self) {
        *self.slot() = None;
    }

    /// The pool's state, for `Debug`.
    pub(super) fn status(&self) -> deadpool_redis::Status {
        match &self.pools {
            Pools::Single(pool) => pool.status(),
            #[cfg(feature = "cluster")]
            Pools::Cluster(pool) => pool.status(),
            #[cfg(feature = "sentinel")]
            Pools::Sentinel(pool) => pool.status(),
        }
    }
}

/// What a failure to connect most likely means, for the log.
fn connect_failure_hint(err: &PoolError) -> &'static str {
    match err {
        PoolError::Backend(err) => redis_failure_hint(err),
        PoolError::Timeout(_) => "no connection within the pool's timeout",
        _ => "the pool gave no connection",
    }
}

/// The same for the error of the Redis client.
pub(super) fn redis_failure_hint(err: &RedisError) -> &'static str {
    if err.kind() == ErrorKind::AuthenticationFailed {
        return "the server refused the user name or password (check the URL's credentials)";
    }
    if err.kind() == ErrorKind::Server(ServerErrorKind::NoPerm) {
        return "the Redis user lacks a permission (see README, What the Redis user needs)";
    }
    let text = err.to_string();
    if text.contains("certificate") || text.contains("Certificate") {
        return "TLS: the server's certificate is not trusted or names another host";
    }
    if text.contains("tls") || text.contains("TLS") || text.contains("handshake") {
        return "the TLS handshake failed";
    }
    if err.is_connection_refusal() {
        return "the connection was refused (is the server up at that address?)";
    }
    if err.is_timeout() {
        return "connecting timed out";
    }
    "the connection failed"
}
