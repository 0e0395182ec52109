//! Shared fixtures: spawned Redis servers, the two backends behind one harness trait,
//! a test app, and an HTTP server on a loopback port.

#![allow(dead_code)]

pub mod netns;
pub mod proxy;
pub mod redis_server;
#[cfg(feature = "tls")]
pub mod tls;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Json, Router,
    extract::{Path, Query, State},
    http::StatusCode,
    routing::post,
};
use deadpool_redis::{Pool, Runtime, Timeouts, redis::AsyncCommands};
use serde::Deserialize;
use tower_http::{catch_panic::CatchPanicLayer, timeout::TimeoutLayer};
use tower_redis_lock::{
    FairBackend, Held, InMemoryBackend, LockBackend, LockLayer, PathKey, RedisBackend,
    RedlockBackend,
};

pub use self::redis_server::RedisServer;

/// How long the test app lets a handler run before its outer timeout cancels it.
pub const APP_TIMEOUT: Duration = Duration::from_secs(5);

/// A pool to `url` whose every wait is bounded.
pub fn pool(url: &str) -> Pool {
    let mut config = deadpool_redis::Config::from_url(url);
    let mut pool_config = deadpool_redis::PoolConfig::new(64);
    pool_config.timeouts = Timeouts {
        wait: Some(Duration::from_secs(2)),
        create: Some(Duration::from_secs(2)),
        recycle: Some(Duration::from_secs(2)),
    };
    config.pool = Some(pool_config);
    config
        .create_pool(Some(Runtime::Tokio1))
        .expect("valid redis url")
}

/// A backend family under test: what an app instance gets, and how to look inside.
pub trait Harness: Send + Sync + 'static {
    /// The backend type.
    type Backend: LockBackend;
    /// The backend of one app instance (for Redis: its own pool).
    fn instance(&self) -> Self::Backend;
    /// The same, handing out fencing tokens.
    fn fenced_instance(&self) -> Self::Backend;
    /// Storage for the handlers' counters, shared by every instance.
    fn counter(&self) -> Counter;
    /// How many locks exist right now.
    fn held_locks(&self) -> usize;
}

/// Locks in process memory; every "instance" shares them, as requests of one process do.
#[derive(Default)]
pub struct Memory {
    backend: InMemoryBackend,
    counters: Arc<Mutex<HashMap<String, u64>>>,
}

impl Memory {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Harness for Memory {
    type Backend = InMemoryBackend;

    fn instance(&self) -> InMemoryBackend {
        self.backend.clone()
    }

    fn fenced_instance(&self) -> InMemoryBackend {
        self.backend.clone().fencing(true)
    }

    fn counter(&self) -> Counter {
        Counter::Local(self.counters.clone())
    }

    fn held_locks(&self) -> usize {
        self.backend.held_count()
    }
}

/// Locks in a Redis server of the test's own.
pub struct Redis {
    pub server: RedisServer,
    /// How the backends connect when not as the server's admin: an ACL user, a password,
    /// TLS. With it, they also receive release notifications over that connection.
    client: Option<deadpool_redis::redis::Client>,
    /// The ACL user the backends log in as; every refusal it met is a test failure.
    acl_user: Option<String>,
}

/// The user name and password of [`Redis::acl`].
pub const ACL_USER: (&str, &str) = ("locker", "password");

impl Redis {
    pub fn spawn() -> Self {
        Self {
            server: RedisServer::spawn(),
            client: None,
            acl_user: None,
        }
    }

    /// Backends get release notifications (as `RedisBackend::from_url` gives them), which
    /// fair mode needs to hear of its grants.
    pub fn notifying() -> Self {
        let server = RedisServer::spawn();
        let client = deadpool_redis::redis::Client::open(server.url()).expect("redis url");
        Self {
            server,
            client: Some(client),
            acl_user: None,
        }
    }

    /// Backends log in as [`ACL_USER`], created with exactly the rule README documents
    /// (see [`acl_rule`]). When the harness drops, `ACL LOG` must be empty: no command
    /// of the lock, the pool or the notifier was refused.
    pub fn acl() -> Self {
        let server = RedisServer::spawn();
        create_acl_user(&server);
        let (user, password) = ACL_USER;
        let client =
            deadpool_redis::redis::Client::open(server.url_as(user, password)).expect("redis url");
        Self {
            server,
            client: Some(client),
            acl_user: Some(user.to_owned()),
        }
    }

    /// The default user needs a password (`--requirepass`); the backends give it in the
    /// URL (`redis://:<password>@…`).
    pub fn password() -> Self {
        let server = RedisServer::spawn_with_password("s3cret");
        let client = deadpool_redis::redis::Client::open(server.url()).expect("redis url");
        Self {
            server,
            client: Some(client),
            acl_user: None,
        }
    }

    /// Backends talk TLS (`rediss://`) to the server, trusting the test CA; `None`
    /// (with a message) when this `redis-server` has no TLS.
    #[cfg(feature = "tls")]
    pub fn tls() -> Option<Self> {
        let certificates = tls::Certificates::new();
        let server = match RedisServer::spawn_tls(&certificates.files) {
            Ok(server) => server,
            Err(err) => {
                eprintln!("skipped: this redis-server cannot serve TLS ({err})");
                return None;
            }
        };
        let client = certificates.client(&server.tls_url());
        Some(Self {
            server,
            client: Some(client),
            acl_user: None,
        })
    }
}

/// The ACL rule of README's "What the Redis user needs (ACL)", word by word after
/// `ACL SETUSER <user>`.
pub fn acl_rule() -> Vec<&'static str> {
    let readme = include_str!("../../README.md");
    let section = readme
        .split_once("### What the Redis user needs (ACL)")
        .expect("README has the ACL section")
        .1;
    let block = section
        .split_once("```text")
        .and_then(|(_, rest)| rest.split_once("```"))
        .expect("the ACL section has a ```text block")
        .0;
    let mut words = block.split_whitespace();
    assert_eq!(
        (words.next(), words.next(), words.next()),
        (Some("ACL"), Some("SETUSER"), Some(ACL_USER.0)),
        "the README rule should start with `ACL SETUSER {}`",
        ACL_USER.0
    );
    let words: Vec<&str> = words.collect();
    assert!(
        words.contains(&format!(">{}", ACL_USER.1).as_str()),
        "the README rule should set the password `{}`",
        ACL_USER.1
    );
    words
}

/// Creates [`ACL_USER`] with [`acl_rule`]; on servers that know `CLIENT SETINFO` (Redis
/// 7.2 and later, Valkey) with `+client|setinfo` too, as README says.
pub fn create_acl_user(server: &RedisServer) {
    let mut setuser = deadpool_redis::redis::cmd("ACL");
    setuser.arg("SETUSER").arg(ACL_USER.0).arg(acl_rule());
    let () = server.query(&mut setuser);
    let mut setinfo = deadpool_redis::redis::cmd("ACL");
    setinfo
        .arg("SETUSER")
        .arg(ACL_USER.0)
        .arg("+client|setinfo");
    let _: Result<(), _> = setinfo.query(&mut server.connection());
    let () = server.query(deadpool_redis::redis::cmd("ACL").arg("LOG").arg("RESET"));
}

/// `ACL LOG`, one line per refusal: what was refused (`object`) for whom and why.
pub fn acl_refusals(server: &RedisServer) -> Vec<String> {
    let entries: Vec<HashMap<String, deadpool_redis::redis::Value>> =
        server.query(deadpool_redis::redis::cmd("ACL").arg("LOG"));
    entries
        .iter()
        .map(|entry| {
            let field = |name: &str| match entry.get(name) {
                Some(deadpool_redis::redis::Value::BulkString(bytes)) => {
                    String::from_utf8_lossy(bytes).into_owned()
                }
                Some(other) => format!("{other:?}"),
                None => String::new(),
            };
            format!(
                "{} refused {} {:?} ({})",
                field("username"),
                field("reason"),
                field("object"),
                field("context")
            )
        })
        .collect()
}

impl Drop for Redis {
    fn drop(&mut self) {
        if self.acl_user.is_some() && !std::thread::panicking() && self.server.pid_alive() {
            let refusals = acl_refusals(&self.server);
            assert!(
                refusals.is_empty(),
                "the README's ACL rule is not enough: {refusals:#?}"
            );
        }
    }
}

/// A backend on `client`'s server through a pool of its own (bounded waits, as
/// [`pool`]), with release notifications over `client`.
pub fn backend_on(client: &deadpool_redis::redis::Client) -> RedisBackend {
    let manager = deadpool_redis::Manager::new(client.get_connection_info().clone())
        .expect("connection info");
    let pool = Pool::builder(manager)
        .max_size(64)
        .wait_timeout(Some(Duration::from_secs(2)))
        .create_timeout(Some(Duration::from_secs(2)))
        .recycle_timeout(Some(Duration::from_secs(2)))
        .runtime(Runtime::Tokio1)
        .build()
        .expect("pool");
    RedisBackend::new(pool)
        .command_timeout(Duration::from_millis(500))
        .notify_with(client.clone())
}

impl Harness for Redis {
    type Backend = RedisBackend;

    fn instance(&self) -> RedisBackend {
        match &self.client {
            Some(client) => backend_on(client),
            None => RedisBackend::new(pool(&self.server.url()))
                .command_timeout(Duration::from_millis(500)),
        }
    }

    fn fenced_instance(&self) -> RedisBackend {
        self.instance().fencing(true)
    }

    fn counter(&self) -> Counter {
        Counter::Redis(pool(&self.server.url()))
    }

    fn held_locks(&self) -> usize {
        let keys: Vec<String> = self
            .server
            .query(deadpool_redis::redis::cmd("KEYS").arg("lock:*"));
        keys.len()
    }
}

/// Another harness's backends in fair mode, as `Locker::fair(true)` sets them: every
/// layer and locker on them waits in the backend's line.
pub struct Fair<H>(pub H);

impl<H: Harness> Harness for Fair<H>
where
    H::Backend: FairBackend,
{
    type Backend = H::Backend;

    fn instance(&self) -> H::Backend {
        self.0.instance().with_fairness(true)
    }

    fn fenced_instance(&self) -> H::Backend {
        self.0.fenced_instance().with_fairness(true)
    }

    fn counter(&self) -> Counter {
        self.0.counter()
    }

    /// Locks held, and on Redis any key of a line left behind (`lock:*` covers both).
    fn held_locks(&self) -> usize {
        self.0.held_locks()
    }
}

/// Locks on several Redis servers of the test's own, by majority.
pub struct Redlock {
    pub servers: Vec<RedisServer>,
}

impl Redlock {
    pub fn spawn(nodes: usize) -> Self {
        Self {
            servers: (0..nodes).map(|_| RedisServer::spawn()).collect(),
        }
    }
}

/// One node as an app instance sees it: its own pool and subscriber.
pub fn redis_node(server: &RedisServer) -> RedisBackend {
    redis_node_at(&server.url())
}

/// [`redis_node`] for the server at `url`.
pub fn redis_node_at(url: &str) -> RedisBackend {
    let client = deadpool_redis::redis::Client::open(url).expect("redis url");
    RedisBackend::new(pool(url))
        .command_timeout(Duration::from_millis(500))
        .notify_with(client)
}

impl Harness for Redlock {
    type Backend = RedlockBackend;

    fn instance(&self) -> RedlockBackend {
        let nodes = self.servers.iter().map(redis_node).collect();
        // Generous for a loaded 2-core machine; production would use tens of ms.
        RedlockBackend::new(nodes).node_timeout(Duration::from_millis(300))
    }

    fn fenced_instance(&self) -> RedlockBackend {
        self.instance()
    }

    fn counter(&self) -> Counter {
        Counter::Redis(pool(&self.servers[0].url()))
    }

    fn held_locks(&self) -> usize {
        self.servers
            .iter()
            .filter(|server| server.pid_alive())
            .map(|server| {
                let keys: Vec<String> =
                    server.query(deadpool_redis::redis::cmd("KEYS").arg("lock:*"));
                keys.len()
            })
            .sum()
    }
}

/// An app instance's backend on `cluster` (fencing on), hearing releases through node
/// `notify_node`.
#[cfg(feature = "cluster")]
pub fn cluster_backend(cluster: &redis_server::RedisCluster, notify_node: usize) -> RedisBackend {
    let pool = deadpool_redis::cluster::Config::from_urls(cluster.urls())
        .create_pool(Some(Runtime::Tokio1))
        .expect("cluster urls");
    let client =
        deadpool_redis::redis::Client::open(cluster.urls()[notify_node].clone()).expect("url");
    RedisBackend::cluster(pool)
        .command_timeout(Duration::from_secs(1))
        .notify_with(client)
        .fencing(true)
}

/// Locks on a Redis Cluster of the test's own (three primaries).
#[cfg(feature = "cluster")]
pub struct Cluster {
    pub cluster: redis_server::RedisCluster,
    counters: Arc<Mutex<HashMap<String, u64>>>,
}

#[cfg(feature = "cluster")]
impl Cluster {
    pub fn spawn() -> Self {
        Self {
            cluster: redis_server::RedisCluster::spawn(3),
            counters: Arc::default(),
        }
    }
}

#[cfg(feature = "cluster")]
impl Harness for Cluster {
    type Backend = RedisBackend;

    fn instance(&self) -> RedisBackend {
        let pool = deadpool_redis::cluster::Config::from_urls(self.cluster.urls())
            .create_pool(Some(Runtime::Tokio1))
            .expect("cluster urls");
        let client =
            deadpool_redis::redis::Client::open(self.cluster.urls()[0].clone()).expect("redis url");
        // Longer than the single server's 500 ms: with 500 ms, 64 requests at once on two
        // cores (Redis 6.2 in CI) got a 503; likely the fresh pool's first use, which
        // connects to every node and reads the slot map (not confirmed).
        RedisBackend::cluster(pool)
            .command_timeout(Duration::from_secs(2))
            .notify_with(client)
    }

    fn fenced_instance(&self) -> RedisBackend {
        self.instance().fencing(true)
    }

    /// In this process: both app instances of a test live here, and the counter need not
    /// be on the cluster to show an overlap.
    fn counter(&self) -> Counter {
        Counter::Local(self.counters.clone())
    }

    fn held_locks(&self) -> usize {
        self.cluster
            .nodes
            .iter()
            .map(|node| {
                let keys: Vec<String> =
                    node.query(deadpool_redis::redis::cmd("KEYS").arg("lock:*"));
                // Waiter marks expire by themselves; they are not locks.
                keys.iter().filter(|key| !key.ends_with(":waiters")).count()
            })
            .sum()
    }
}

/// A counter per order, read and written in two steps on purpose: two handlers that
/// overlap lose an increment, which is how the tests see a broken lock.
#[derive(Clone)]
pub enum Counter {
    Local(Arc<Mutex<HashMap<String, u64>>>),
    Redis(Pool),
}

impl Counter {
    pub async fn get(&self, name: &str) -> u64 {
        match self {
            Counter::Local(map) => map.lock().unwrap().get(name).copied().unwrap_or(0),
            Counter::Redis(pool) => {
                let mut conn = pool.get().await.expect("counter connection");
                let value: Option<u64> = conn.get(format!("counter:{name}")).await.expect("GET");
                value.unwrap_or(0)
            }
        }
    }

    pub async fn set(&self, name: &str, value: u64) {
        match self {
            Counter::Local(map) => {
                map.lock().unwrap().insert(name.to_owned(), value);
            }
            Counter::Redis(pool) => {
                let mut conn = pool.get().await.expect("counter connection");
                let () = conn
                    .set(format!("counter:{name}"), value)
                    .await
                    .expect("SET");
            }
        }
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct PayParams {
    /// How long the handler works between reading and writing the counter.
    #[serde(default)]
    pub work_ms: u64,
    /// `error` answers 500 after the work, `panic` panics.
    pub outcome: Option<String>,
}

/// `POST /orders/{order_id}/pay`: increments the order's counter non-atomically.
async fn pay(
    State(counter): State<Counter>,
    Path(order_id): Path<String>,
    Query(params): Query<PayParams>,
    lock: Held,
) -> Result<Json<serde_json::Value>, StatusCode> {
    let count = counter.get(&order_id).await;
    tokio::time::sleep(Duration::from_millis(params.work_ms)).await;
    counter.set(&order_id, count + 1).await;
    match params.outcome.as_deref() {
        Some("error") => Err(StatusCode::INTERNAL_SERVER_ERROR),
        Some("panic") => panic!("handler panicked on purpose"),
        _ => Ok(Json(serde_json::json!({
            "order_id": order_id,
            "count": count + 1,
            "key": lock.key().as_str(),
            "fencing_token": lock.fencing_token(),
        }))),
    }
}

/// The test app: `pay` behind `LockLayer` keyed on `order_id` (prefix `order:`), inside
/// a panic catcher and an outer timeout of [`APP_TIMEOUT`] (answering 408).
pub fn app<B: LockBackend>(
    backend: B,
    counter: Counter,
    configure: impl FnOnce(LockLayer<B, PathKey>) -> LockLayer<B, PathKey>,
) -> Router {
    let lock = configure(LockLayer::new(backend, PathKey::new("order_id")).key_prefix("order:"));
    Router::new()
        .route("/orders/{order_id}/pay", post(pay))
        .route_layer(lock)
        .layer(CatchPanicLayer::new())
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            APP_TIMEOUT,
        ))
        .with_state(counter)
}

/// Serves `router` on a free loopback port until the test's runtime ends.
pub async fn serve(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr: SocketAddr = listener.local_addr().expect("local addr");
    tokio::spawn(async move { axum::serve(listener, router).await.expect("serve") });
    format!("http://{addr}")
}

/// An HTTP client whose every request is bounded, generously for a loaded machine.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("http client")
}

/// Posts to `url` until it answers 200, for up to `within` (after a fault heals, broken
/// connections are replaced on their next use); panics with the last answer otherwise.
pub async fn post_until_ok(http: &reqwest::Client, url: &str, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let response = http.post(url).send().await.expect("the app answers");
        if response.status() == StatusCode::OK {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{url} still answers {} after {within:?}",
            response.status()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `condition` every 20 ms for up to `within`; returns whether it came true.
pub async fn eventually(within: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if condition() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
