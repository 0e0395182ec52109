//! The one connection a [`RedisBackend`](super::RedisBackend) shares among its operations,
//! from a single-server pool or a Cluster pool.
//!
//! Redis connections are multiplexed, so one is enough for every concurrent operation; a
//! checkout per operation would cost a round trip of its own (deadpool-redis pings every
//! connection it hands out). After a connection error or timeout the next operation takes
//! a fresh connection from the pool.

use std::sync::{
    Mutex, MutexGuard, PoisonError,
    atomic::{AtomicBool, Ordering},
};

use deadpool_redis::{
    Connection, Pool,
    redis::{Cmd, Pipeline, RedisFuture, Value, aio::ConnectionLike, aio::MultiplexedConnection},
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
    /// Whether the server's settings were looked at (once, on the first connection).
    checked: AtomicBool,
}

impl SharedConnection {
    pub(super) fn new(pools: Pools) -> Self {
        Self {
            pools,
            current: Mutex::default(),
            checked: AtomicBool::new(false),
        }
    }

    fn slot(&self) -> MutexGuard<'_, Option<Conn>> {
        // The slot holds a plain value that no panic can leave half-written.
        self.current.lock().unwrap_or_else(PoisonError::into_inner)
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
            None => Box::pin(self.connect()).await,
        }
    }

    /// Takes a connection from the pool and shares it.
    async fn connect(&self) -> Result<Conn, BackendError> {
        let unavailable = |err: deadpool_redis::PoolError| BackendError::Unavailable(err.into());
        let fresh = match &self.pools {
            Pools::Single(pool) => {
                Conn::Single(Connection::take(pool.get().await.map_err(unavailable)?))
            }
            #[cfg(feature = "cluster")]
            Pools::Cluster(pool) => Conn::Cluster(cluster::Connection::take(
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
                }
            });
        }
        // If a concurrent call got there first, keep its connection and drop ours.
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
        }
    }
}
