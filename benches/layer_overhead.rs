//! What the layer adds to an uncontended request, next to a Redis PING measured in the
//! same run.
//!
//! ```text
//! cargo bench --all-features --bench layer_overhead -- [--requests N] [--redis-url URL]
//! ```
//!
//! Without `--redis-url` it starts its own `redis-server` on a free port and stops it at
//! the end. Requests go through an axum `Router` in-process (no sockets), one at a time,
//! each on a distinct key, so the figures are the layer's own cost: key extraction, one
//! acquire script, one release script, and the bookkeeping around them.

#[path = "../tests/support/redis_server.rs"]
mod redis_server;

use std::time::{Duration, Instant};

use axum::{Router, body::Body, routing::post};
use http::Request;
use tower::ServiceExt;
use tower_redis_lock::{
    BackendError, InMemoryBackend, LockBackend, LockKey, LockLayer, PathKey, RedisBackend,
    RedlockBackend,
    deadpool_redis::{self, Runtime},
};
use uuid::Uuid;

struct Args {
    requests: usize,
    redis_url: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        requests: 20_000,
        redis_url: None,
    };
    // `cargo bench` appends `--bench` to the arguments of a `harness = false` bench.
    let mut argv = std::env::args().skip(1).filter(|arg| arg != "--bench");
    while let Some(flag) = argv.next() {
        let value = argv.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--requests" => {
                args.requests = value.parse().map_err(|_| "--requests takes a number")?
            }
            "--redis-url" => args.redis_url = Some(value),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(args)
}

/// Latency percentiles of one series, in microseconds.
struct Summary {
    p50: f64,
    p99: f64,
}

fn summarize(mut samples: Vec<Duration>) -> Summary {
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6;
    Summary {
        p50: at(0.50),
        p99: at(0.99),
    }
}

fn router(lock: Option<LockLayer<impl LockBackend, PathKey>>) -> Router {
    let router = Router::new().route("/orders/{order_id}/pay", post(|| async { "ok" }));
    match lock {
        Some(layer) => router.route_layer(layer),
        None => router,
    }
}

/// Sends `n` requests one after another, each for a fresh order id.
async fn measure(router: &Router, n: usize, round: usize) -> Vec<Duration> {
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let request = Request::post(format!("/orders/{round}-{i}/pay"))
            .body(Body::empty())
            .unwrap();
        let started = Instant::now();
        let response = router.clone().oneshot(request).await.unwrap();
        samples.push(started.elapsed());
        assert!(
            response.status().is_success(),
            "unexpected {}",
            response.status()
        );
    }
    samples
}

/// Times `n` uncontended acquire+release cycles straight on a backend, distinct keys.
async fn measure_lock_cycles(
    backend: &impl LockBackend,
    n: usize,
) -> Result<Vec<Duration>, BackendError> {
    let ttl = Duration::from_secs(10);
    let mut samples = Vec::with_capacity(n);
    for i in 0..n + n / 10 {
        let (key, token) = (LockKey::from(format!("cycle:{i}")), Uuid::new_v4());
        let started = Instant::now();
        backend.try_acquire(&key, token, ttl).await?;
        backend.release(&key, token).await?;
        if i >= n / 10 {
            samples.push(started.elapsed()); // the first tenth warms up
        }
    }
    Ok(samples)
}

/// Times `n` lease renewals of one held lock: what the watchdog spends every ttl/3.
async fn measure_renewals(backend: &RedisBackend, n: usize) -> Result<Vec<Duration>, BackendError> {
    let (key, token, ttl) = (
        LockKey::from("renewed"),
        Uuid::new_v4(),
        Duration::from_secs(10),
    );
    backend.try_acquire(&key, token, ttl).await?;
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        let extended = backend.extend(&key, token, ttl).await?;
        samples.push(started.elapsed());
        assert!(extended, "the lock was lost during the benchmark");
    }
    backend.release(&key, token).await?;
    Ok(samples)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()
        .map_err(|err| format!("{err}\nusage: layer_overhead [--requests N] [--redis-url URL]"))?;
    let server = args
        .redis_url
        .is_none()
        .then(redis_server::RedisServer::spawn);
    let url = args
        .redis_url
        .clone()
        .unwrap_or_else(|| server.as_ref().unwrap().url());
    let pool = deadpool_redis::Config::from_url(&url).create_pool(Some(Runtime::Tokio1))?;

    let bare = router(None::<LockLayer<InMemoryBackend, PathKey>>);
    let memory = router(Some(LockLayer::new(
        InMemoryBackend::new(),
        PathKey::new("order_id"),
    )));
    let redis = router(Some(LockLayer::new(
        RedisBackend::new(pool.clone()),
        PathKey::new("order_id"),
    )));
    let fenced_backend = RedisBackend::new(pool.clone()).fencing(true);
    let fenced = router(Some(LockLayer::new(
        fenced_backend.clone(),
        PathKey::new("order_id"),
    )));

    let n = args.requests;
    let warm_up = (n / 10).max(100);
    let mut conn = pool.get().await?;
    for _ in 0..warm_up {
        let _: String = deadpool_redis::redis::cmd("PING")
            .query_async(&mut conn)
            .await?;
    }
    let _ = measure(&bare, warm_up, 0).await;
    let _ = measure(&memory, warm_up, 0).await;
    let _ = measure(&redis, warm_up, 0).await;
    let _ = measure(&fenced, warm_up, 0).await;

    let mut ping = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        let _: String = deadpool_redis::redis::cmd("PING")
            .query_async(&mut conn)
            .await?;
        ping.push(started.elapsed());
    }
    drop(conn);
    let ping = summarize(ping);
    let bare = summarize(measure(&bare, n, 1).await);
    let memory = summarize(measure(&memory, n, 1).await);
    let redis = summarize(measure(&redis, n, 1).await);
    let fenced = summarize(measure(&fenced, n, 1).await);
    let renewal = summarize(measure_renewals(&fenced_backend, n).await?);
    // Redlock on 3 and 5 servers of its own (the first one is the server above).
    let extra: Vec<_> = (0..4).map(|_| redis_server::RedisServer::spawn()).collect();
    let mut node_urls = vec![url.clone()];
    node_urls.extend(extra.iter().map(|server| server.url()));
    let redlock = |nodes: usize| -> Result<RedlockBackend, Box<dyn std::error::Error>> {
        let nodes = node_urls[..nodes]
            .iter()
            .map(|url| {
                Ok(RedisBackend::new(
                    deadpool_redis::Config::from_url(url).create_pool(Some(Runtime::Tokio1))?,
                ))
            })
            .collect::<Result<Vec<_>, Box<dyn std::error::Error>>>()?;
        Ok(RedlockBackend::new(nodes))
    };
    let one_node = summarize(measure_lock_cycles(&RedisBackend::new(pool.clone()), n).await?);
    let redlock3 = summarize(measure_lock_cycles(&redlock(3)?, n).await?);
    let redlock5 = summarize(measure_lock_cycles(&redlock(5)?, n).await?);
    let cluster = redis_server::RedisCluster::spawn(3);
    let cluster_pool = deadpool_redis::cluster::Config::from_urls(cluster.urls())
        .create_pool(Some(Runtime::Tokio1))?;
    let cluster3 = summarize(measure_lock_cycles(&RedisBackend::cluster(cluster_pool), n).await?);

    println!("{n} sequential uncontended requests per series, latency in µs");
    println!("{:<32} {:>9} {:>9}", "series", "p50", "p99");
    for (name, s) in [
        ("redis PING (one round trip)", &ping),
        ("router, no layer", &bare),
        ("router + in-process lock", &memory),
        ("router + Redis lock", &redis),
        ("router + Redis lock, fencing", &fenced),
        ("one renewal (extend script)", &renewal),
        ("acquire+release, 1 node", &one_node),
        ("acquire+release, Redlock-3", &redlock3),
        ("acquire+release, Redlock-5", &redlock5),
        ("acquire+release, Cluster-3", &cluster3),
    ] {
        println!("{name:<32} {:>9.1} {:>9.1}", s.p50, s.p99);
    }
    let added = |s: &Summary| (s.p50 - bare.p50, s.p99 - bare.p99);
    let (redis_p50, redis_p99) = added(&redis);
    let (memory_p50, memory_p99) = added(&memory);
    println!(
        "added by the Redis lock: p50 {redis_p50:.1} µs ({:.2}× a PING), p99 {redis_p99:.1} µs ({:.2}× a PING)",
        redis_p50 / ping.p50,
        redis_p99 / ping.p99,
    );
    println!("added by the in-process lock: p50 {memory_p50:.1} µs, p99 {memory_p99:.1} µs");
    println!(
        "fencing: p50 difference {:.1} µs per acquisition (no extra round trip); a renewal costs p50 {:.1} µs ({:.2}× a PING)",
        fenced.p50 - redis.p50,
        renewal.p50,
        renewal.p50 / ping.p50,
    );
    println!(
        "{}",
        serde_json::json!({
            "requests": n,
            "ping_p50_us": ping.p50, "ping_p99_us": ping.p99,
            "bare_p50_us": bare.p50, "bare_p99_us": bare.p99,
            "memory_p50_us": memory.p50, "memory_p99_us": memory.p99,
            "redis_p50_us": redis.p50, "redis_p99_us": redis.p99,
            "redis_added_p50_us": redis_p50, "redis_added_p99_us": redis_p99,
            "redis_added_p50_in_pings": redis_p50 / ping.p50,
            "fenced_p50_us": fenced.p50, "fenced_p99_us": fenced.p99,
            "renewal_p50_us": renewal.p50, "renewal_p99_us": renewal.p99,
            "cycle_1_node_p50_us": one_node.p50, "cycle_1_node_p99_us": one_node.p99,
            "cycle_redlock3_p50_us": redlock3.p50, "cycle_redlock3_p99_us": redlock3.p99,
            "cycle_redlock5_p50_us": redlock5.p50, "cycle_redlock5_p99_us": redlock5.p99,
            "cycle_cluster3_p50_us": cluster3.p50, "cycle_cluster3_p99_us": cluster3.p99,
        })
    );
    drop(server);
    Ok(())
}
