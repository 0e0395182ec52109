//! Requests per second and latency of a trivial handler over HTTP, with and without the
//! lock layer (uncontended: every request locks a key of its own).
//!
//! ```text
//! cargo bench --bench load_bench -- [--requests N] [--concurrency C] [--redis-url URL]
//! ```
//!
//! The server and the client (reqwest, C requests in flight) run in this process, on
//! loopback; without `--redis-url` it starts its own `redis-server`. Prints one line per
//! series and the ratios against the bare route.

#[path = "../tests/support/redis_server.rs"]
mod redis_server;

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{Router, routing::post};
use tower_redis_lock::{InMemoryBackend, LockLayer, PathKey, RedisBackend};

struct Args {
    requests: usize,
    concurrency: usize,
    redis_url: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        requests: 20_000,
        concurrency: 32,
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
            "--concurrency" => {
                args.concurrency = value.parse().map_err(|_| "--concurrency takes a number")?
            }
            "--redis-url" => args.redis_url = Some(value),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(args)
}

struct Series {
    per_second: f64,
    p50: Duration,
    p99: Duration,
}

/// `requests` POSTs to `{url}{path}/<n>`, `concurrency` at a time, each with its own n.
async fn run(
    client: &reqwest::Client,
    url: &str,
    path: &str,
    requests: usize,
    concurrency: usize,
    round: usize,
) -> Series {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, next) = (client.clone(), next.clone());
            let base = format!("{url}{path}/{round}-");
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= requests {
                        return latencies;
                    }
                    let sent = Instant::now();
                    let response = client
                        .post(format!("{base}{i}"))
                        .send()
                        .await
                        .expect("request");
                    assert!(response.status().is_success(), "{}", response.status());
                    latencies.push(sent.elapsed());
                }
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(requests);
    for worker in workers {
        latencies.extend(worker.await.unwrap());
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    Series {
        per_second: requests as f64 / elapsed.as_secs_f64(),
        p50: at(0.5),
        p99: at(0.99),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args().map_err(|err| {
        format!("{err}\nusage: load_bench [--requests N] [--concurrency C] [--redis-url URL]")
    })?;
    let server = args
        .redis_url
        .is_none()
        .then(redis_server::RedisServer::spawn);
    let redis_url = args
        .redis_url
        .clone()
        .unwrap_or_else(|| server.as_ref().unwrap().url());

    let ok = || async { "ok" };
    let router = Router::new()
        .route("/bare/{key}", post(ok))
        .route(
            "/memory/{key}",
            post(ok).layer(LockLayer::new(InMemoryBackend::new(), PathKey::new("key"))),
        )
        .route(
            "/redis/{key}",
            post(ok).layer(LockLayer::new(
                RedisBackend::from_url(&redis_url)?,
                PathKey::new("key"),
            )),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, router).await });

    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .build()?;
    let (requests, concurrency) = (args.requests, args.concurrency);
    for path in ["/bare", "/memory", "/redis"] {
        run(&client, &url, path, requests / 10, concurrency, 0).await;
    }
    let bare = run(&client, &url, "/bare", requests, concurrency, 1).await;
    let memory = run(&client, &url, "/memory", requests, concurrency, 1).await;
    let redis = run(&client, &url, "/redis", requests, concurrency, 1).await;

    println!(
        "{} requests per series, {} in flight, client and server in one process",
        args.requests, args.concurrency
    );
    println!(
        "{:<26} {:>10} {:>10} {:>10}",
        "series", "req/s", "p50", "p99"
    );
    for (name, s) in [
        ("no layer", &bare),
        ("layer, in-process lock", &memory),
        ("layer, Redis lock", &redis),
    ] {
        println!(
            "{name:<26} {:>10.0} {:>10.1?} {:>10.1?}",
            s.per_second, s.p50, s.p99
        );
    }
    println!(
        "with the Redis lock: {:.2}x the throughput, p50 {:.2}x, p99 {:.2}x of no layer",
        redis.per_second / bare.per_second,
        redis.p50.as_secs_f64() / bare.p50.as_secs_f64(),
        redis.p99.as_secs_f64() / bare.p99.as_secs_f64(),
    );
    println!(
        "with the in-process lock: {:.2}x the throughput of no layer",
        memory.per_second / bare.per_second
    );
    drop(server);
    Ok(())
}
