//! The common path against the cheapest correct lock written by hand, in the same run.
//!
//! ```text
//! cargo bench --bench common_path -- [--scenario uncontended,spread,hot] \
//!     [--mode baseline,locker,layer] [--ops N] [--rounds R] [--redis-url URL]
//! ```
//!
//! Without `--redis-url` it starts its own `redis-server` on a free port and stops it at
//! the end. Modes:
//!
//! - `baseline`: the hand-rolled lock, written here only: `SET key token NX PX ttl`, and a
//!   compare-and-delete script (`redis::Script`, `EVALSHA`), on one shared multiplexed
//!   connection (redis-rs through `deadpool_redis::redis`). A refused `SET` is retried
//!   after 0.5–1.5 ms.
//! - `locker`: `Locker::new(RedisBackend::from_url(..))` with its defaults (release
//!   notifications, local line, renewal), `lock` then `release`.
//! - `layer`: `LockLayer` around a `service_fn`, called in process with
//!   `tower::ServiceExt::ready` and `Service::call`; the key comes from the URI path.
//!
//! Scenarios: `uncontended` (1 worker, 1 key, no hold), `spread` (32 workers, 1000 keys,
//! no hold), `hot` (32 workers, 1 key, 1 ms hold). Each worker takes a random key's lock,
//! runs the critical section (an in-process occupancy check, then the hold), and lets go.
//! One JSON line per mode and round:
//!
//! - `ops_per_s`: critical sections per second; `acquire_p50_us`/`acquire_p99_us`: from
//!   asking for the lock to holding it;
//! - `client_cmds_per_op`: commands the clients sent per critical section, and
//!   `redis_calls_per_op` every call Redis executed (script-internal calls included), from
//!   `INFO commandstats` before and after, less the benchmark's own `INFO`. `GET`, `DEL`,
//!   `PEXPIRE`, `PTTL`, `INCR`, `APPEND` and `PUBLISH` count as script-internal; `SET`
//!   counts as sent by the client (it is, for the plain `SET NX PX`);
//! - `redis_cpu_us_per_op`: the server's user + system CPU (`INFO cpu`) per critical
//!   section; `client_cpu_us_per_op`: this process's (getrusage), which includes the
//!   benchmark's own bookkeeping, the same in every mode;
//! - `pct_of_ideal` (with a hold): against min(workers, keys) × 1000 / mean hold, the
//!   hold measured inside the critical sections;
//! - `violations`: critical sections that found their key occupied (must be 0).
//!
//! Then, per scenario, one line of ratios against the baseline: each round's against the
//! same round's baseline, the median over the rounds (each round starts with the next
//! mode).

#[path = "../tests/support/redis_server.rs"]
mod redis_server;

use std::{
    collections::HashMap,
    convert::Infallible,
    sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response, Uri, request::Parts};
use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
use tower_redis_lock::{
    LockKey, LockLayer, Locker, RedisBackend,
    deadpool_redis::redis::{self, Script, Value, aio::MultiplexedConnection},
};
use uuid::Uuid;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Baseline,
    Locker,
    Layer,
}

impl Mode {
    fn parse(name: &str) -> Result<Self, String> {
        match name {
            "baseline" => Ok(Mode::Baseline),
            "locker" => Ok(Mode::Locker),
            "layer" => Ok(Mode::Layer),
            other => Err(format!("unknown mode {other}: baseline, locker or layer")),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Mode::Baseline => "baseline",
            Mode::Locker => "locker",
            Mode::Layer => "layer",
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Scenario {
    name: &'static str,
    workers: usize,
    keys: usize,
    hold: Duration,
    default_ops: usize,
}

const SCENARIOS: [Scenario; 3] = [
    Scenario {
        name: "uncontended",
        workers: 1,
        keys: 1,
        hold: Duration::ZERO,
        default_ops: 20_000,
    },
    Scenario {
        name: "spread",
        workers: 32,
        keys: 1000,
        hold: Duration::ZERO,
        default_ops: 100_000,
    },
    Scenario {
        name: "hot",
        workers: 32,
        keys: 1,
        hold: Duration::from_millis(1),
        default_ops: 2_000,
    },
];

struct Args {
    scenarios: Vec<Scenario>,
    modes: Vec<Mode>,
    ops: Option<usize>,
    rounds: usize,
    redis_url: Option<String>,
}

const USAGE: &str = "usage: common_path [--scenario uncontended,spread,hot] \
    [--mode baseline,locker,layer] [--ops N] [--rounds R] [--redis-url URL]";

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        scenarios: SCENARIOS.to_vec(),
        modes: vec![Mode::Baseline, Mode::Locker, Mode::Layer],
        ops: None,
        rounds: 1,
        redis_url: None,
    };
    // `cargo bench` appends `--bench` to the arguments of a `harness = false` bench.
    let mut argv = std::env::args().skip(1).filter(|arg| arg != "--bench");
    while let Some(flag) = argv.next() {
        let value = argv.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = || {
            value
                .parse::<usize>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("{flag} takes a positive number"))
        };
        match flag.as_str() {
            "--scenario" => {
                args.scenarios = value
                    .split(',')
                    .map(|name| {
                        SCENARIOS
                            .iter()
                            .find(|s| s.name == name)
                            .copied()
                            .ok_or_else(|| format!("unknown scenario {name}"))
                    })
                    .collect::<Result<_, _>>()?
            }
            "--mode" => {
                args.modes = value
                    .split(',')
                    .map(Mode::parse)
                    .collect::<Result<_, _>>()?
            }
            "--ops" => args.ops = Some(number()?),
            "--rounds" => args.rounds = number()?,
            "--redis-url" => args.redis_url = Some(value),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(args)
}

/// The lease of every lock, in every mode.
const TTL: Duration = Duration::from_secs(10);

/// The hand-rolled release: delete only if the value is our token.
static COMPARE_AND_DELETE: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#,
    )
});

/// What every critical section of one run shares: who is inside, and how long they held.
struct Shared {
    occupied: Vec<AtomicBool>,
    violations: AtomicU64,
    held_nanos: AtomicU64,
    hold: Duration,
}

impl Shared {
    async fn critical_section(&self, key: usize) {
        if self.occupied[key].swap(true, Ordering::AcqRel) {
            self.violations.fetch_add(1, Ordering::Relaxed);
        }
        if !self.hold.is_zero() {
            let started = Instant::now();
            tokio::time::sleep(self.hold).await;
            let held = started.elapsed().as_nanos() as u64;
            self.held_nanos.fetch_add(held, Ordering::Relaxed);
        }
        self.occupied[key].store(false, Ordering::Release);
    }
}

/// A layer worker's mailbox: which key its next request is for, and when its handler
/// started (ns after `epoch`).
struct Slot {
    key: AtomicUsize,
    entered: AtomicU64,
    epoch: Instant,
}

/// One mode, set up for one scenario.
enum Client {
    Baseline {
        conn: MultiplexedConnection,
        keys: &'static [String],
    },
    Locker {
        locker: Locker<RedisBackend>,
        keys: &'static [LockKey],
    },
    Layer {
        layer: LockLayer<RedisBackend, KeyFromPath>,
        uris: &'static [Uri],
    },
}

type KeyFromPath = fn(&Parts) -> Option<String>;

fn key_from_path(parts: &Parts) -> Option<String> {
    Some(parts.uri.path().get(1..)?.to_owned())
}

fn leak<T>(values: Vec<T>) -> &'static [T] {
    Box::leak(values.into_boxed_slice())
}

async fn client(mode: Mode, url: &str, keys: usize) -> Client {
    match mode {
        Mode::Baseline => {
            let client = redis::Client::open(url).expect("redis url");
            let conn = client
                .get_multiplexed_async_connection()
                .await
                .expect("baseline connection");
            Client::Baseline {
                conn,
                keys: leak((0..keys).map(|k| format!("base:{{{k}}}")).collect()),
            }
        }
        Mode::Locker => Client::Locker {
            locker: Locker::new(RedisBackend::from_url(url).expect("redis url")),
            keys: leak((0..keys).map(|k| LockKey::from(k.to_string())).collect()),
        },
        Mode::Layer => Client::Layer {
            layer: LockLayer::new(
                RedisBackend::from_url(url).expect("redis url"),
                key_from_path as KeyFromPath,
            ),
            uris: leak(
                (0..keys)
                    .map(|k| Uri::from_static(Box::leak(format!("/{k}").into_boxed_str())))
                    .collect(),
            ),
        },
    }
}

/// Runs `ops` critical sections with `workers` workers; returns each one's wait in ns.
async fn run(
    client: &Client,
    shared: &'static Shared,
    workers: usize,
    keys: usize,
    ops: usize,
) -> Vec<u64> {
    let tasks: Vec<_> = (0..workers)
        .map(|w| {
            let count = ops / workers + usize::from(w < ops % workers);
            let task = worker(client, shared, keys, count);
            tokio::spawn(task)
        })
        .collect();
    let mut waits = Vec::with_capacity(ops);
    for task in tasks {
        waits.extend(task.await.expect("worker"));
    }
    waits
}

fn worker(
    client: &Client,
    shared: &'static Shared,
    keys: usize,
    count: usize,
) -> impl Future<Output = Vec<u64>> + Send + 'static {
    enum Work {
        Baseline(MultiplexedConnection, &'static [String]),
        Locker(Locker<RedisBackend>, &'static [LockKey]),
        Layer(LockLayer<RedisBackend, KeyFromPath>, &'static [Uri]),
    }
    let work = match client {
        Client::Baseline { conn, keys } => Work::Baseline(conn.clone(), keys),
        Client::Locker { locker, keys } => Work::Locker(locker.clone(), keys),
        Client::Layer { layer, uris } => Work::Layer(layer.clone(), uris),
    };
    async move {
        let mut waits = Vec::with_capacity(count);
        match work {
            Work::Baseline(mut conn, names) => {
                let ttl_ms = TTL.as_millis() as u64;
                for _ in 0..count {
                    let key = fastrand::usize(0..keys);
                    let name = names[key].as_str();
                    let mut buffer = Uuid::encode_buffer();
                    let token = &*Uuid::new_v4().hyphenated().encode_lower(&mut buffer);
                    let asked = Instant::now();
                    loop {
                        let reply: Value = redis::cmd("SET")
                            .arg(name)
                            .arg(token)
                            .arg("NX")
                            .arg("PX")
                            .arg(ttl_ms)
                            .query_async(&mut conn)
                            .await
                            .expect("SET");
                        match reply {
                            Value::Okay => break,
                            Value::Nil => {
                                let pause = Duration::from_micros(fastrand::u64(500..=1500));
                                tokio::time::sleep(pause).await;
                            }
                            other => panic!("unexpected SET reply {other:?}"),
                        }
                    }
                    waits.push(asked.elapsed().as_nanos() as u64);
                    shared.critical_section(key).await;
                    let deleted: i64 = COMPARE_AND_DELETE
                        .key(name)
                        .arg(token)
                        .invoke_async(&mut conn)
                        .await
                        .expect("release");
                    assert_eq!(deleted, 1, "the lock was lost");
                }
            }
            Work::Locker(locker, names) => {
                for _ in 0..count {
                    let key = fastrand::usize(0..keys);
                    let asked = Instant::now();
                    let lock = locker.lock(names[key].clone()).await.expect("lock");
                    waits.push(asked.elapsed().as_nanos() as u64);
                    shared.critical_section(key).await;
                    lock.release().await;
                }
            }
            Work::Layer(layer, uris) => {
                let slot: &'static Slot = Box::leak(Box::new(Slot {
                    key: AtomicUsize::new(0),
                    entered: AtomicU64::new(0),
                    epoch: Instant::now(),
                }));
                let handler = service_fn(move |_request: Request<()>| async move {
                    slot.entered
                        .store(slot.epoch.elapsed().as_nanos() as u64, Ordering::Relaxed);
                    shared
                        .critical_section(slot.key.load(Ordering::Relaxed))
                        .await;
                    Ok::<_, Infallible>(Response::new(Bytes::new()))
                });
                let mut service = ServiceBuilder::new().layer(layer).service(handler);
                for _ in 0..count {
                    let key = fastrand::usize(0..keys);
                    slot.key.store(key, Ordering::Relaxed);
                    let mut request = Request::new(());
                    *request.uri_mut() = uris[key].clone();
                    let asked = slot.epoch.elapsed().as_nanos() as u64;
                    let ready = service.ready().await.expect("ready");
                    let response = ready.call(request).await.expect("infallible");
                    assert!(response.status().is_success(), "{}", response.status());
                    let entered = slot.entered.load(Ordering::Relaxed);
                    waits.push(entered.saturating_sub(asked));
                }
            }
        }
        waits
    }
}

/// Calls per command from `INFO commandstats`.
async fn commandstats(conn: &mut MultiplexedConnection) -> HashMap<String, u64> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .expect("INFO commandstats");
    info.lines()
        .filter_map(|line| {
            let (name, rest) = line.strip_prefix("cmdstat_")?.split_once(":calls=")?;
            Some((name.to_owned(), rest.split(',').next()?.parse().ok()?))
        })
        .collect()
}

/// The server's user + system CPU so far, in µs, from `INFO cpu`.
async fn redis_cpu_us(conn: &mut MultiplexedConnection) -> f64 {
    let info: String = redis::cmd("INFO")
        .arg("cpu")
        .query_async(conn)
        .await
        .expect("INFO cpu");
    let field = |name: &str| -> f64 {
        info.lines()
            .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or(0.0)
    };
    (field("used_cpu_sys:") + field("used_cpu_user:")) * 1e6
}

/// `struct rusage` on 64-bit Linux: two `timeval`s, then fourteen longs.
#[repr(C)]
struct Rusage {
    utime: [i64; 2],
    stime: [i64; 2],
    _rest: [i64; 14],
}

unsafe extern "C" {
    fn getrusage(who: i32, usage: *mut Rusage) -> i32;
}

/// This process's user + system CPU so far, in µs.
fn client_cpu_us() -> f64 {
    let mut usage = Rusage {
        utime: [0; 2],
        stime: [0; 2],
        _rest: [0; 14],
    };
    // SAFETY: `usage` has the layout of `struct rusage` on this target; 0 is RUSAGE_SELF.
    let status = unsafe { getrusage(0, &mut usage) };
    assert_eq!(status, 0, "getrusage failed");
    let us = |tv: [i64; 2]| tv[0] as f64 * 1e6 + tv[1] as f64;
    us(usage.utime) + us(usage.stime)
}

/// Commands scripts make inside Redis (never sent by the lock clients directly).
const SCRIPT_INTERNAL: &[&str] = &[
    "get", "del", "pexpire", "pttl", "incr", "time", "append", "publish",
];

fn percentile(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize] as f64 / 1e3
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// What one mode measured in one round.
struct Measured {
    ops_per_s: f64,
    redis_cpu: f64,
    client_cpu: f64,
    redis_calls: f64,
}

async fn measure(
    scenario: Scenario,
    mode: Mode,
    round: usize,
    url: &str,
    ops: usize,
    stats: &mut MultiplexedConnection,
) -> Measured {
    let shared: &'static Shared = Box::leak(Box::new(Shared {
        occupied: (0..scenario.keys).map(|_| AtomicBool::new(false)).collect(),
        violations: AtomicU64::new(0),
        held_nanos: AtomicU64::new(0),
        hold: scenario.hold,
    }));
    let client = client(mode, url, scenario.keys).await;
    // Warm up: connections, scripts, subscriptions; not measured.
    let warm_up = (ops / 10).clamp(scenario.workers, 2_000);
    run(&client, shared, scenario.workers, scenario.keys, warm_up).await;
    shared.violations.store(0, Ordering::Relaxed);
    shared.held_nanos.store(0, Ordering::Relaxed);

    let before = commandstats(stats).await;
    let redis_before = redis_cpu_us(stats).await;
    let client_before = client_cpu_us();
    let started = Instant::now();
    let mut waits = run(&client, shared, scenario.workers, scenario.keys, ops).await;
    let elapsed = started.elapsed();
    let client_after = client_cpu_us();
    let redis_after = redis_cpu_us(stats).await;
    let after = commandstats(stats).await;

    let calls = |counted: &dyn Fn(&str) -> bool| -> u64 {
        after
            .iter()
            .filter(|(name, _)| name.as_str() != "info" && counted(name))
            .map(|(name, calls)| calls - before.get(name).copied().unwrap_or(0))
            .sum()
    };
    let redis_calls = calls(&|_| true) as f64 / ops as f64;
    let client_cmds = calls(&|name| !SCRIPT_INTERNAL.contains(&name)) as f64 / ops as f64;
    waits.sort_unstable();
    let ops_per_s = ops as f64 / elapsed.as_secs_f64();
    let redis_cpu = (redis_after - redis_before) / ops as f64;
    let client_cpu = (client_after - client_before) / ops as f64;
    let pct_of_ideal = (!scenario.hold.is_zero()).then(|| {
        let mean_hold_ms = shared.held_nanos.load(Ordering::Relaxed) as f64 / ops as f64 / 1e6;
        let ideal = scenario.workers.min(scenario.keys) as f64 * 1000.0 / mean_hold_ms;
        (ops_per_s / ideal * 1000.0).round() / 10.0
    });
    let line = serde_json::json!({
        "scenario": scenario.name,
        "mode": mode.name(),
        "round": round,
        "workers": scenario.workers,
        "keys": scenario.keys,
        "hold_ms": scenario.hold.as_millis() as u64,
        "ops": ops,
        "ops_per_s": ops_per_s.round(),
        "acquire_p50_us": round2(percentile(&waits, 0.5)),
        "acquire_p99_us": round2(percentile(&waits, 0.99)),
        "client_cmds_per_op": round2(client_cmds),
        "redis_calls_per_op": round2(redis_calls),
        "redis_cpu_us_per_op": round2(redis_cpu),
        "client_cpu_us_per_op": round2(client_cpu),
        "pct_of_ideal": pct_of_ideal,
        "violations": shared.violations.load(Ordering::Relaxed),
    });
    println!("{line}");
    drop(client);
    Measured {
        ops_per_s,
        redis_cpu,
        client_cpu,
        redis_calls,
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = parse_args().map_err(|err| format!("{err}\n{USAGE}"))?;
    let server = args
        .redis_url
        .is_none()
        .then(redis_server::RedisServer::spawn);
    if let Some(server) = &server {
        args.redis_url = Some(server.url());
    }
    let url = args.redis_url.clone().unwrap();
    let mut stats = redis::Client::open(url.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    for scenario in args.scenarios.clone() {
        let ops = args.ops.unwrap_or(scenario.default_ops);
        let mut results: HashMap<&str, Vec<Measured>> = HashMap::new();
        for round in 0..args.rounds {
            // Each round starts with the next mode, so that a machine that slows down or
            // speeds up during the run favours no mode.
            let modes = args.modes.len();
            for turn in 0..modes {
                let mode = args.modes[(round + turn) % modes];
                let measured = measure(scenario, mode, round, &url, ops, &mut stats).await;
                results.entry(mode.name()).or_default().push(measured);
            }
        }
        let Some(baseline) = results.get("baseline") else {
            continue;
        };
        // Each round's figure against the same round's baseline, then the median of those
        // ratios: the rounds move by up to ±20 % on a shared machine, the modes of one
        // round far less.
        let ratio = |runs: &[Measured], figure: fn(&Measured) -> f64| {
            round2(median(
                runs.iter()
                    .zip(baseline)
                    .map(|(this, base)| figure(this) / figure(base))
                    .collect(),
            ))
        };
        let mut ratios = serde_json::Map::new();
        for mode in [Mode::Locker, Mode::Layer] {
            if let Some(runs) = results.get(mode.name()) {
                ratios.insert(
                    mode.name().into(),
                    serde_json::json!({
                        "ops_per_s": ratio(runs, |m| m.ops_per_s),
                        "redis_cpu_per_op": ratio(runs, |m| m.redis_cpu),
                        "client_cpu_per_op": ratio(runs, |m| m.client_cpu),
                        "redis_calls_per_op": ratio(runs, |m| m.redis_calls),
                    }),
                );
            }
        }
        println!(
            "{}",
            serde_json::json!({
                "scenario": scenario.name,
                "rounds": args.rounds,
                "vs_baseline": ratios,
            })
        );
    }
    drop(server);
    Ok(())
}
