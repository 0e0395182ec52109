//! Hot-key benchmark: many workers, few keys, short critical sections.
//!
//! ```text
//! cargo bench --bench hot_key_bench -- --workers 64 --keys 1 --hold-ms 1 \
//!     --requests 3000 [--processes 2] [--mode polling,notify,local,fair] [--redis-url URL] [--http]
//! ```
//!
//! Without `--redis-url` it starts its own `redis-server` on a free port and stops it at
//! the end. Each worker takes a random key's lock (directly with a `Locker`, or through
//! `LockLayer` in an in-process router with `--http`), does a non-atomic read-modify-write
//! of a Redis counter around a `--hold-ms` sleep, and lets go. With `--processes P` the
//! work is shared by P copies of this program, each with `--workers` workers.
//!
//! Modes: `polling` waits on the backoff alone (the core's behaviour, the baseline),
//! `notify` adds release notifications, `local` adds the local line and hand-offs, `fair`
//! is `local` in fair mode (`Locker::fair`: a line in Redis, grants on release). One JSON
//! line per mode:
//!
//! - `ideal_ops_per_s` = min(workers·processes, keys) × 1000 / mean hold (measured inside
//!   the critical sections), and `pct_of_ideal` the share of it reached;
//! - `wait_*_ms`: from asking for the lock to holding it;
//! - `client_cmds_per_op`: commands the lock clients sent (a script call counts once) per
//!   critical section, and `redis_calls_per_op` every call Redis executed for them
//!   (script-internal calls included), both from `INFO commandstats` before and after,
//!   less the benchmark's own `HGET`/`HSET`/`INFO`;
//! - `same_worker_pct`: critical sections entered by the worker that held the key last;
//! - `handover_p50_ms` / `handover_p99_ms`: gap between the end of one critical section
//!   and the start of the next on the same key, and `cross_process_handover_p50_ms` the
//!   same when the two ran in different processes (the wake-up after a release
//!   elsewhere); `stalls_over_10ms` and `stalled_ms`: the gaps of more than 10 ms (a lock
//!   idle that long: a lost wake-up, or a process not scheduled), and their sum;
//! - `violations`: increments lost to overlapping critical sections (must be 0).
//!
//! With `--processes` above 1 a `wake_floor` line comes first: the delay from a `PUBLISH`
//! by one idle process to its delivery in another idle one (1000 messages, 2 ms apart),
//! measured in the same run. A cross-process hand-over cannot be shorter than it: on a VM
//! that halts idle virtual CPUs it is most of the hand-over.

#[path = "../tests/support/redis_server.rs"]
mod redis_server;

use std::{
    collections::HashMap,
    io::{BufRead, Write},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{
    Router,
    body::Body,
    extract::{Path, State},
    routing::post,
};
use http::{Request, StatusCode};
use serde::{Deserialize, Serialize};
use tower::ServiceExt;
use tower_redis_lock::{
    LockLayer, Locker, PathKey, RedisBackend,
    deadpool_redis::{
        self, Pool, Runtime,
        redis::{self, aio::MultiplexedConnection},
    },
};

#[derive(Clone, Debug)]
struct Args {
    workers: usize,
    keys: usize,
    hold_ms: u64,
    requests: usize,
    processes: usize,
    modes: Vec<Mode>,
    redis_url: Option<String>,
    http: bool,
    /// Set on the children: which share of the work is theirs.
    child: Option<usize>,
    /// Set on the child that measures the wake-up floor: how many messages it publishes.
    floor_publisher: Option<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Polling,
    Notify,
    Local,
    Fair,
}

impl Mode {
    fn parse(name: &str) -> Result<Self, String> {
        match name {
            "polling" => Ok(Mode::Polling),
            "notify" => Ok(Mode::Notify),
            "local" => Ok(Mode::Local),
            "fair" => Ok(Mode::Fair),
            other => Err(format!(
                "unknown mode {other}: polling, notify, local or fair"
            )),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Mode::Polling => "polling",
            Mode::Notify => "notify",
            Mode::Local => "local",
            Mode::Fair => "fair",
        }
    }
}

const USAGE: &str = "usage: hot_key_bench --workers W --keys K --hold-ms D --requests N \
    [--processes P] [--mode polling,notify,local,fair] [--redis-url URL] [--http]";

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        workers: 64,
        keys: 1,
        hold_ms: 1,
        requests: 3000,
        processes: 1,
        modes: vec![Mode::Polling, Mode::Notify, Mode::Local],
        redis_url: None,
        http: false,
        child: None,
        floor_publisher: None,
    };
    // `cargo bench` appends `--bench` to the arguments of a `harness = false` bench.
    let mut argv = std::env::args().skip(1).filter(|arg| arg != "--bench");
    while let Some(flag) = argv.next() {
        if flag == "--http" {
            args.http = true;
            continue;
        }
        let value = argv.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = || {
            value
                .parse::<usize>()
                .map_err(|_| format!("{flag} takes a number"))
        };
        match flag.as_str() {
            "--workers" => args.workers = number()?,
            "--keys" => args.keys = number()?,
            "--hold-ms" => args.hold_ms = number()? as u64,
            "--requests" => args.requests = number()?,
            "--processes" => args.processes = number()?,
            "--mode" => {
                args.modes = value
                    .split(',')
                    .map(Mode::parse)
                    .collect::<Result<_, _>>()?
            }
            "--redis-url" => args.redis_url = Some(value),
            "--child" => args.child = Some(number()?),
            "--floor-publisher" => args.floor_publisher = Some(number()?),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if args.workers == 0 || args.keys == 0 || args.requests == 0 || args.processes == 0 {
        return Err("--workers, --keys, --requests and --processes must be positive".into());
    }
    Ok(args)
}

/// One critical section, as its worker saw it. Times are µs of the wall clock, which all
/// processes on the machine share.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Section {
    key: usize,
    worker: usize,
    start_us: u64,
    end_us: u64,
    wait_us: u64,
}

fn wall_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// What one process reports: its sections and when it started and finished.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Report {
    sections: Vec<Section>,
    started_us: u64,
    finished_us: u64,
}

/// The benchmark's own connection for its data: one multiplexed connection, cloned, so
/// that no pool checkout (which pings) adds commands to the counts.
type Data = MultiplexedConnection;

async fn data_connection(url: &str) -> Data {
    let client = redis::Client::open(url).expect("redis url");
    client
        .get_multiplexed_async_connection()
        .await
        .expect("benchmark data connection")
}

/// The critical section: a read-modify-write of the key's counter that loses an increment
/// whenever two sections overlap.
async fn critical_section(data: &Data, key: usize, hold: Duration) {
    let mut conn = data.clone();
    let counter = format!("bench:{{{key}}}");
    let value: Option<u64> = redis::cmd("HGET")
        .arg(&counter)
        .arg("n")
        .query_async(&mut conn)
        .await
        .expect("HGET");
    tokio::time::sleep(hold).await;
    let () = redis::cmd("HSET")
        .arg(&counter)
        .arg("n")
        .arg(value.unwrap_or(0) + 1)
        .query_async(&mut conn)
        .await
        .expect("HSET");
}

fn backend(url: &str, mode: Mode, workers: usize) -> RedisBackend {
    let mut config = deadpool_redis::Config::from_url(url);
    config.pool = Some(deadpool_redis::PoolConfig::new(workers.max(16)));
    let pool = config
        .create_pool(Some(Runtime::Tokio1))
        .expect("redis url");
    let backend = RedisBackend::new(pool);
    match mode {
        Mode::Polling => backend,
        Mode::Notify | Mode::Local | Mode::Fair => {
            backend.notify_with(redis::Client::open(url).expect("redis url"))
        }
    }
}

fn locker(args: &Args, mode: Mode) -> Locker<RedisBackend> {
    let url = args.redis_url.as_deref().expect("children get a URL");
    let locker = Locker::new(backend(url, mode, args.workers)).max_wait(Duration::from_secs(120));
    match mode {
        Mode::Polling | Mode::Notify => locker.without_local_queue(),
        Mode::Local => locker,
        Mode::Fair => locker.fair(true),
    }
}

type Sections = Arc<Mutex<Vec<Section>>>;

#[derive(Clone)]
struct HttpState {
    data: Data,
    hold: Duration,
    sections: Sections,
}

/// The `--http` path: the same critical section behind `LockLayer`, called in-process.
fn router(args: &Args, mode: Mode, data: Data, sections: Sections) -> Router {
    async fn section(
        State(state): State<HttpState>,
        Path((key, worker, asked_us)): Path<(usize, usize, u64)>,
    ) -> StatusCode {
        let start_us = wall_us();
        critical_section(&state.data, key, state.hold).await;
        let section = Section {
            key,
            worker,
            start_us,
            end_us: wall_us(),
            wait_us: start_us - asked_us,
        };
        state.sections.lock().unwrap().push(section);
        StatusCode::OK
    }
    let url = args.redis_url.as_deref().expect("children get a URL");
    let layer = LockLayer::new(backend(url, mode, args.workers), PathKey::new("key"))
        .max_wait(Duration::from_secs(120));
    let layer = match mode {
        Mode::Polling | Mode::Notify => layer.without_local_queue(),
        Mode::Local => layer,
        Mode::Fair => layer.fair(true),
    };
    let state = HttpState {
        data,
        hold: Duration::from_millis(args.hold_ms),
        sections,
    };
    Router::new()
        .route("/{key}/{worker}/{asked_us}", post(section))
        .route_layer(layer)
        .with_state(state)
}

/// Runs this process's share of the requests with `args.workers` workers.
async fn run_share(args: &Args, mode: Mode, share: usize, first_worker: usize) -> Report {
    let url = args.redis_url.as_deref().expect("children get a URL");
    let data = data_connection(url).await;
    let sections: Sections = Arc::default();
    let locker = locker(args, mode);
    let router = router(args, mode, data.clone(), sections.clone());
    let hold = Duration::from_millis(args.hold_ms);
    let started_us = wall_us();
    let tasks: Vec<_> = (0..args.workers)
        .map(|w| {
            let count = share / args.workers + usize::from(w < share % args.workers);
            let worker = first_worker + w;
            let (args, locker, router, data, sections) = (
                args.clone(),
                locker.clone(),
                router.clone(),
                data.clone(),
                sections.clone(),
            );
            tokio::spawn(async move {
                for _ in 0..count {
                    let key = fastrand::usize(0..args.keys);
                    let asked_us = wall_us();
                    if args.http {
                        let uri = format!("/{key}/{worker}/{asked_us}");
                        let request = Request::post(uri).body(Body::empty()).unwrap();
                        let response = router.clone().oneshot(request).await.unwrap();
                        assert_eq!(response.status(), StatusCode::OK);
                    } else {
                        let lock = locker.lock(key as u64).await.expect("lock");
                        let start_us = wall_us();
                        critical_section(&data, key, hold).await;
                        let end_us = wall_us();
                        lock.release().await;
                        let wait_us = start_us - asked_us;
                        sections.lock().unwrap().push(Section {
                            key,
                            worker,
                            start_us,
                            end_us,
                            wait_us,
                        });
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("worker");
    }
    let sections = std::mem::take(&mut *sections.lock().unwrap());
    Report {
        sections,
        started_us,
        finished_us: wall_us(),
    }
}

/// A child: its share of the work, started when the parent says "go".
async fn child(args: Args, index: usize) {
    let share =
        args.requests / args.processes + usize::from(index < args.requests % args.processes);
    // Connect before the start, so that set-up is not measured.
    let mut stdout = std::io::stdout();
    writeln!(stdout, "ready").unwrap();
    stdout.flush().unwrap();
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).unwrap();
    let report = run_share(&args, args.modes[0], share, index * args.workers).await;
    writeln!(stdout, "{}", serde_json::to_string(&report).unwrap()).unwrap();
}

/// The channel of the wake-up floor's messages.
const FLOOR_CHANNEL: &str = "bench:floor";

/// Measures what no lock can beat across processes on this machine: the delay from a
/// `PUBLISH` by one process to its delivery in another, both idle before it (as a holder
/// after its critical section and a waiter in line are). Prints one JSON line.
async fn wake_floor(url: &str) -> Result<(), Box<dyn std::error::Error>> {
    use futures_util::StreamExt;
    const MESSAGES: usize = 1000;
    let mut pubsub = redis::Client::open(url)?.get_async_pubsub().await?;
    pubsub.subscribe(FLOOR_CHANNEL).await?;
    let mut publisher = Command::new(std::env::current_exe()?)
        .args([
            "--redis-url",
            url,
            "--floor-publisher",
            &MESSAGES.to_string(),
        ])
        .spawn()?;
    let mut delays = Vec::with_capacity(MESSAGES);
    let mut messages = pubsub.on_message();
    while delays.len() < MESSAGES {
        let Some(message) = messages.next().await else {
            break;
        };
        let sent: u64 = message.get_payload()?;
        delays.push(wall_us().saturating_sub(sent) as f64 / 1e3);
    }
    publisher.wait()?;
    let delays = sorted(delays);
    let line = serde_json::json!({
        "mode": "wake_floor",
        "messages": delays.len(),
        "publish_to_other_process_p50_ms": percentile(&delays, 0.5),
        "publish_to_other_process_p99_ms": percentile(&delays, 0.99),
    });
    println!("{line}");
    Ok(())
}

/// The floor's publisher: a message with its send time every 2 ms, idle in between.
async fn publish_for_floor(url: &str, messages: usize) -> redis::RedisResult<()> {
    let mut conn = redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await?;
    for _ in 0..messages {
        tokio::time::sleep(Duration::from_millis(2)).await;
        let _: i64 = redis::cmd("PUBLISH")
            .arg(FLOOR_CHANNEL)
            .arg(wall_us())
            .query_async(&mut conn)
            .await?;
    }
    Ok(())
}

/// Runs one mode over all processes and returns their reports.
async fn run_mode(args: &Args, mode: Mode) -> Vec<Report> {
    if args.processes == 1 {
        return vec![run_share(args, mode, args.requests, 0).await];
    }
    let exe = std::env::current_exe().expect("own path");
    let mut children: Vec<_> = (0..args.processes)
        .map(|index| {
            let mut command = Command::new(&exe);
            command
                .args([
                    "--workers",
                    &args.workers.to_string(),
                    "--keys",
                    &args.keys.to_string(),
                ])
                .args([
                    "--hold-ms",
                    &args.hold_ms.to_string(),
                    "--requests",
                    &args.requests.to_string(),
                ])
                .args([
                    "--processes",
                    &args.processes.to_string(),
                    "--mode",
                    mode.name(),
                ])
                .args([
                    "--redis-url",
                    args.redis_url.as_deref().unwrap(),
                    "--child",
                    &index.to_string(),
                ]);
            if args.http {
                command.arg("--http");
            }
            command
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("spawn child")
        })
        .collect();
    let mut outputs: Vec<_> = children
        .iter_mut()
        .map(|child| std::io::BufReader::new(child.stdout.take().unwrap()))
        .collect();
    for output in &mut outputs {
        let mut line = String::new();
        output.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready", "a child failed to start");
    }
    for child in &mut children {
        writeln!(child.stdin.as_mut().unwrap(), "go").unwrap();
    }
    let reports = tokio::task::spawn_blocking(move || {
        outputs
            .into_iter()
            .map(|mut output| {
                let mut line = String::new();
                output.read_line(&mut line).unwrap();
                serde_json::from_str::<Report>(&line).expect("child report")
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    for mut child in children {
        child.wait().unwrap();
    }
    reports
}

/// Calls per command from `INFO commandstats`.
async fn commandstats(data: &Pool) -> HashMap<String, u64> {
    let mut conn = data.get().await.expect("stats connection");
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    info.lines()
        .filter_map(|line| {
            let (name, rest) = line.strip_prefix("cmdstat_")?.split_once(":calls=")?;
            Some((name.to_owned(), rest.split(',').next()?.parse().ok()?))
        })
        .collect()
}

/// Commands a script makes inside Redis (never sent by the lock's clients directly).
const SCRIPT_INTERNAL: &[&str] = &[
    "set", "get", "del", "pexpire", "pttl", "incr", "time",
    "publish", // and fair mode's line:
    "exists", "lpop", "rpush", "lrange", "lrem", "zadd", "zscore", "zrem",
];
/// The benchmark's own commands.
const OWN: &[&str] = &["hget", "hset", "info"];

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn sorted(mut values: Vec<f64>) -> Vec<f64> {
    values.sort_by(f64::total_cmp);
    values
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = parse_args().map_err(|err| format!("{err}\n{USAGE}"))?;
    if let Some(index) = args.child {
        child(args, index).await;
        return Ok(());
    }
    if let Some(messages) = args.floor_publisher {
        publish_for_floor(args.redis_url.as_deref().expect("a URL"), messages).await?;
        return Ok(());
    }
    let server = args
        .redis_url
        .is_none()
        .then(redis_server::RedisServer::spawn);
    if let Some(server) = &server {
        args.redis_url = Some(server.url());
    }
    let url = args.redis_url.clone().unwrap();
    let data = deadpool_redis::Config::from_url(&url).create_pool(Some(Runtime::Tokio1))?;
    if args.processes > 1 {
        wake_floor(&url).await?;
    }
    let mut baseline: Option<(f64, f64)> = None;
    for mode in args.modes.clone() {
        let mut conn = data.get().await?;
        let () = redis::cmd("FLUSHALL").query_async(&mut conn).await?;
        drop(conn);
        let before = commandstats(&data).await;
        let reports = run_mode(&args, mode).await;
        let after = commandstats(&data).await;

        let calls = |names: &dyn Fn(&str) -> bool| -> u64 {
            after
                .iter()
                .filter(|(name, _)| names(name))
                .map(|(name, calls)| calls - before.get(name).copied().unwrap_or(0))
                .sum()
        };
        let redis_calls = calls(&|name| !OWN.contains(&name));
        let client_cmds = calls(&|name| !OWN.contains(&name) && !SCRIPT_INTERNAL.contains(&name));

        let started = reports.iter().map(|r| r.started_us).min().unwrap_or(0);
        let finished = reports.iter().map(|r| r.finished_us).max().unwrap_or(0);
        let per_worker: usize = args.workers;
        let mut sections: Vec<(usize, Section)> = reports
            .into_iter()
            .enumerate()
            .flat_map(|(process, report)| report.sections.into_iter().map(move |s| (process, s)))
            .collect();
        let ops = sections.len();
        let elapsed_s = (finished - started) as f64 / 1e6;
        let ops_per_s = ops as f64 / elapsed_s;
        let mean_hold_ms = sections
            .iter()
            .map(|(_, s)| (s.end_us - s.start_us) as f64)
            .sum::<f64>()
            / ops as f64
            / 1e3;
        let parallel = (args.workers * args.processes).min(args.keys) as f64;
        let ideal = parallel * 1000.0 / mean_hold_ms;
        let waits = sorted(
            sections
                .iter()
                .map(|(_, s)| s.wait_us as f64 / 1e3)
                .collect(),
        );

        // Order each key's sections by start to see who followed whom.
        sections.sort_by_key(|(_, s)| (s.key, s.start_us));
        let (mut same_worker, mut transitions) = (0usize, 0usize);
        let (mut gaps, mut cross_gaps) = (Vec::new(), Vec::new());
        for pair in sections.windows(2) {
            let ((p0, s0), (p1, s1)) = (&pair[0], &pair[1]);
            if s0.key != s1.key {
                continue;
            }
            transitions += 1;
            same_worker += usize::from(s0.worker == s1.worker);
            let gap = s1.start_us.saturating_sub(s0.end_us) as f64 / 1e3;
            gaps.push(gap);
            if p0 != p1 {
                cross_gaps.push(gap);
            }
        }
        let mut counted = 0u64;
        let mut conn = data.get().await?;
        for key in 0..args.keys {
            let value: Option<u64> = redis::cmd("HGET")
                .arg(format!("bench:{{{key}}}"))
                .arg("n")
                .query_async(&mut conn)
                .await?;
            counted += value.unwrap_or(0);
        }
        let violations = ops as u64 - counted;
        let client_per_op = client_cmds as f64 / ops as f64;
        let cross = sorted(cross_gaps);
        let gaps = sorted(gaps);
        // Gaps of more than 10 ms: a lock idle that long was granted to nobody who heard.
        let stalls: Vec<f64> = gaps.iter().copied().filter(|gap| *gap > 10.0).collect();
        let line = serde_json::json!({
            "mode": mode.name(),
            "http": args.http,
            "workers": per_worker,
            "keys": args.keys,
            "hold_ms": args.hold_ms,
            "processes": args.processes,
            "requests": ops,
            "ops_per_s": (ops_per_s * 10.0).round() / 10.0,
            "ideal_ops_per_s": (ideal * 10.0).round() / 10.0,
            "pct_of_ideal": (ops_per_s / ideal * 1000.0).round() / 10.0,
            "wait_p50_ms": percentile(&waits, 0.5),
            "wait_p99_ms": percentile(&waits, 0.99),
            "wait_max_ms": waits.last().copied().unwrap_or(0.0),
            "client_cmds_per_op": (client_per_op * 100.0).round() / 100.0,
            "redis_calls_per_op": ((redis_calls as f64 / ops as f64) * 100.0).round() / 100.0,
            "same_worker_pct": (same_worker as f64 / transitions.max(1) as f64 * 1000.0).round() / 10.0,
            "handover_p50_ms": percentile(&gaps, 0.5),
            "handover_p99_ms": percentile(&gaps, 0.99),
            "stalls_over_10ms": stalls.len(),
            "stalled_ms": (stalls.iter().sum::<f64>() * 10.0).round() / 10.0,
            "cross_process_handover_p50_ms": if cross.is_empty() { serde_json::Value::Null } else { percentile(&cross, 0.5).into() },
            "violations": violations,
        });
        println!("{line}");
        match baseline {
            None if mode == Mode::Polling => baseline = Some((ops_per_s, client_per_op)),
            Some((base_ops, base_cmds)) => eprintln!(
                "{} against polling: throughput x{:.2}, client commands per op x{:.3}",
                mode.name(),
                ops_per_s / base_ops,
                client_per_op / base_cmds
            ),
            None => {}
        }
    }
    drop(server);
    Ok(())
}
