//! Kinds benchmark: readers on one hot key against no lock at all, writers against the
//! exclusive lock.
//!
//! ```text
//! cargo bench --bench kinds_bench -- [--workers 32] [--hold-ms 1] [--ops 6000] \
//!     [--mode none,read,write,exclusive,permits] [--redis-url URL]
//! ```
//!
//! Without `--redis-url` it starts its own `redis-server` on a free port. `--workers`
//! tasks share `--ops` critical sections on one key; each section is a `--hold-ms` sleep
//! under the mode's lock, taken with a `Locker` on a `RedisBackend` with release
//! notifications (`none`: no lock at all; `permits`: as many permits as workers). One
//! JSON line per mode: `ops_per_s`, and `pct_of_none` (or `pct_of_exclusive` for
//! `write`), the throughput against the baseline measured in the same run.

#[path = "../tests/support/redis_server.rs"]
mod redis_server;

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tower_redis_lock::{KindBackend, LockBackend, Locker, RedisBackend, deadpool_redis};

#[derive(Clone, Debug)]
struct Args {
    workers: usize,
    hold: Duration,
    ops: usize,
    modes: Vec<String>,
    redis_url: Option<String>,
}

const USAGE: &str = "usage: kinds_bench [--workers W] [--hold-ms D] [--ops N] \
    [--mode none,read,write,exclusive,permits] [--redis-url URL]";

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        workers: 32,
        hold: Duration::from_millis(1),
        ops: 6000,
        modes: ["none", "read", "exclusive", "write", "permits"]
            .map(String::from)
            .to_vec(),
        redis_url: None,
    };
    // `cargo bench` appends `--bench` to the arguments of a `harness = false` bench.
    let mut argv = std::env::args().skip(1).filter(|arg| arg != "--bench");
    while let Some(flag) = argv.next() {
        let value = argv.next().ok_or(format!("{flag} needs a value"))?;
        let number = || value.parse::<u64>().map_err(|err| format!("{flag}: {err}"));
        match flag.as_str() {
            "--workers" => args.workers = number()? as usize,
            "--hold-ms" => args.hold = Duration::from_millis(number()?),
            "--ops" => args.ops = number()? as usize,
            "--mode" => args.modes = value.split(',').map(String::from).collect(),
            "--redis-url" => args.redis_url = Some(value),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if args.workers == 0 || args.ops == 0 {
        return Err("--workers and --ops must be positive".into());
    }
    Ok(args)
}

/// `workers` tasks run `ops` sections in all, each `section()`; returns sections per second.
async fn run<F, Fut>(args: &Args, section: F) -> f64
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let left = Arc::new(AtomicUsize::new(args.ops));
    let started = Instant::now();
    let tasks: Vec<_> = (0..args.workers)
        .map(|_| {
            let (left, section) = (left.clone(), section.clone());
            tokio::spawn(async move {
                while left
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
                {
                    section().await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("worker");
    }
    args.ops as f64 / started.elapsed().as_secs_f64()
}

/// Sections under `locker`'s lock on one key; a refused lock (409 after the wait) is
/// counted and retried.
async fn locked<B: LockBackend>(args: &Args, locker: Locker<B>) -> (f64, usize) {
    let refused = Arc::new(AtomicUsize::new(0));
    let hold = args.hold;
    let counted = refused.clone();
    let ops = run(args, move || {
        let (locker, refused) = (locker.clone(), counted.clone());
        async move {
            loop {
                match locker.lock("hot").await {
                    Ok(lock) => {
                        tokio::time::sleep(hold).await;
                        lock.release().await;
                        return;
                    }
                    Err(_) => {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    })
    .await;
    (ops, refused.load(Ordering::Relaxed))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args().map_err(|err| format!("{err}\n{USAGE}"))?;
    let server = args
        .redis_url
        .is_none()
        .then(redis_server::RedisServer::spawn);
    let url = match (&args.redis_url, &server) {
        (Some(url), _) => url.clone(),
        (None, Some(server)) => server.url(),
        (None, None) => unreachable!("a server is spawned without a URL"),
    };
    let backend = || -> Result<RedisBackend, Box<dyn std::error::Error>> {
        let mut config = deadpool_redis::Config::from_url(&url);
        config.pool = Some(deadpool_redis::PoolConfig::new(args.workers.max(8)));
        let pool = config.create_pool(Some(deadpool_redis::Runtime::Tokio1))?;
        let client = deadpool_redis::redis::Client::open(url.as_str())?;
        Ok(RedisBackend::new(pool).notify_with(client))
    };
    let max_wait = Duration::from_secs(5);
    let mut none = None;
    let mut exclusive = None;
    for mode in &args.modes {
        let locker = Locker::new(backend()?).max_wait(max_wait);
        let (ops_per_s, refused) = match mode.as_str() {
            "none" => {
                let hold = args.hold;
                (run(&args, move || tokio::time::sleep(hold)).await, 0)
            }
            "exclusive" => locked(&args, locker).await,
            "read" => locked(&args, locker.read()).await,
            "write" => locked(&args, locker.write()).await,
            "permits" => {
                let n = u32::try_from(args.workers)?;
                locked(&args, locker.permits(n)).await
            }
            other => return Err(format!("unknown mode {other}\n{USAGE}").into()),
        };
        let baseline = match mode.as_str() {
            "none" => {
                none = Some(ops_per_s);
                None
            }
            "exclusive" => {
                exclusive = Some(ops_per_s);
                none.map(|none| ("pct_of_none", none))
            }
            "write" => exclusive.map(|exclusive| ("pct_of_exclusive", exclusive)),
            _ => none.map(|none| ("pct_of_none", none)),
        };
        let pct = baseline
            .map(|(name, base)| format!(", \"{name}\": {:.1}", 100.0 * ops_per_s / base))
            .unwrap_or_default();
        println!(
            "{{\"mode\": \"{mode}\", \"workers\": {}, \"hold_ms\": {}, \"ops\": {}, \"ops_per_s\": {ops_per_s:.0}, \"refused\": {refused}{pct}}}",
            args.workers,
            args.hold.as_millis(),
            args.ops
        );
    }
    // The type is named for the docs: a read locker is a `Locker<KindBackend<RedisBackend>>`.
    let _: Option<Locker<KindBackend<RedisBackend>>> = None;
    Ok(())
}
