//! The nemesis: three app instances, each a process of its own (this test binary run
//! again with `NEMESIS_APP` set), lock a few hot keys through the layer while clients
//! hammer them and a fault schedule hits Redis, the network and the apps. Each handler
//! records its critical section (key, instance, owner, fencing token, start, end, its own
//! lease deadline view) on `CLOCK_MONOTONIC`, which all processes share, and writes to a
//! fenced store (a second Redis, never faulted, that refuses a token not above the last it
//! took). The offline checker (`checker.rs`) then counts per fault: overlapping sections
//! whose holders both believed their lease valid, fenced writes out of order, requests
//! that hung past their bound, and lock keys left at the end.
//!
//! Run alone: `cargo test --test nemesis -- --nocapture` (prints the verdict table).

#[path = "../support/mod.rs"]
mod support;

mod checker;

use std::{
    fs::{File, OpenOptions},
    io::{BufRead, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    Router,
    extract::{Query, State},
    http::StatusCode,
    routing::post,
};
use checker::{Phase, Request, Section, Write};
use deadpool_redis::redis::{self, Script};
use serde::Deserialize;
use support::{RedisServer, proxy::Proxy, redis_server::signal};
use tower_redis_lock::{Held, LockLayer, LossPolicy, PathKey, RedisBackend};

/// The lease the apps take; every fault that should outlast a lease lasts 2.5 of them.
const TTL: Duration = Duration::from_secs(1);
/// How long a request may take, beyond the time its own instance was frozen: the wait
/// (500 ms), an acquire bounded by the command timeout (1 s), the handler, and room for a
/// loaded machine.
const BOUND: Duration = Duration::from_secs(4);
const INSTANCES: usize = 3;
const KEYS: [&str; 3] = ["a", "b", "c"];
const CLIENTS: usize = 6;

/// Nanoseconds of `CLOCK_MONOTONIC`: unlike `Instant`, a number every process on the
/// machine reads from the same clock (it does not stop for a SIGSTOPped process).
fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `clock_gettime` writes one `timespec`, which we own, and touches nothing else.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC)");
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// An `Instant` of this process on the shared clock (`Instant` is `CLOCK_MONOTONIC` on
/// Linux too, but opaque: only differences from now carry over).
fn shared_ns(instant: Instant) -> u64 {
    let (now, mono) = (Instant::now(), monotonic_ns());
    match instant.checked_duration_since(now) {
        Some(ahead) => mono + ahead.as_nanos() as u64,
        None => mono.saturating_sub(now.duration_since(instant).as_nanos() as u64),
    }
}

// ----- The app instance (a child process) -----

/// The fenced store's write: accepted only with a token above the last accepted one.
const FENCED_WRITE: &str = r"
local last = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) <= last then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('RPUSH', KEYS[2], ARGV[1])
return 1
";

struct App {
    instance: usize,
    store: deadpool_redis::Pool,
    script: Script,
    history: Mutex<File>,
}

#[derive(Deserialize)]
struct Work {
    ms: u64,
}

/// Writes the section to the history when the handler's future ends, by finishing or by
/// being dropped (the client went away, the layer aborted it).
struct Recorder {
    app: Arc<App>,
    held: Held,
    section: Section,
    lost_at: Option<u64>,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        let end = monotonic_ns();
        let deadline = shared_ns(self.held.lease_deadline().into_std());
        self.section.end = end;
        self.section.believed_until = deadline.min(self.lost_at.unwrap_or(u64::MAX));
        let mut line = serde_json::to_string(&self.section).expect("a section as JSON");
        line.push('\n');
        let _ = self.app.history.lock().unwrap().write_all(line.as_bytes());
    }
}

/// The critical section: some work, then the write the lock protects, with its fencing
/// token. A naive handler: it writes even after it learnt the lock was lost, and the
/// store's fencing must refuse it.
async fn work(State(app): State<Arc<App>>, held: Held, Query(work): Query<Work>) -> StatusCode {
    let key = held.key().as_str().to_owned();
    let fence = held.fencing_token().expect("fencing is on");
    let mut recorder = Recorder {
        app: app.clone(),
        held: held.clone(),
        section: Section {
            key: key.clone(),
            instance: app.instance,
            owner: held.token().to_string(),
            fence: Some(fence),
            start: monotonic_ns(),
            end: 0,
            believed_until: 0,
            write_accepted: None,
        },
        lost_at: None,
    };
    let pause = tokio::time::sleep(Duration::from_millis(work.ms));
    tokio::pin!(pause);
    tokio::select! {
        _ = &mut pause => {}
        _ = held.lost() => {
            recorder.lost_at = Some(monotonic_ns());
            pause.await;
        }
    }
    if held.is_lost() && recorder.lost_at.is_none() {
        recorder.lost_at = Some(monotonic_ns());
    }
    let write = async {
        let mut conn = app.store.get().await.ok()?;
        let accepted: i64 = app
            .script
            .key(format!("fence:{key}"))
            .key(format!("writes:{key}"))
            .arg(fence)
            .invoke_async(&mut conn)
            .await
            .ok()?;
        Some(accepted == 1)
    };
    recorder.section.write_accepted = write.await;
    match recorder.section.write_accepted {
        Some(true) => StatusCode::OK,
        Some(false) => StatusCode::CONFLICT,
        None => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// One app instance: `NEMESIS_APP=<instance>|<redis url>|<store url>|<history file>`.
/// Prints `NEMESIS-PORT <port>` once it listens, and exits when its stdin closes (the
/// harness went away).
#[test]
fn nemesis_app_instance() {
    let Ok(config) = std::env::var("NEMESIS_APP") else {
        return; // an ordinary test run: nothing to do
    };
    let parts: Vec<&str> = config.split('|').collect();
    let [instance, redis_url, store_url, history] = parts[..] else {
        panic!("NEMESIS_APP={config}");
    };
    std::thread::spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        std::process::exit(0);
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let backend = RedisBackend::from_url(redis_url)
            .expect("redis url")
            .fencing(true);
        let layer = LockLayer::new(backend, PathKey::new("key"))
            .ttl(TTL)
            .max_wait(Duration::from_millis(500))
            .on_lock_lost(LossPolicy::Signal);
        let app = Arc::new(App {
            instance: instance.parse().expect("instance number"),
            store: support::pool(store_url),
            script: Script::new(FENCED_WRITE),
            history: Mutex::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(history)
                    .expect("history file"),
            ),
        });
        let router = Router::new()
            .route("/work/{key}", post(work))
            .route_layer(layer)
            .with_state(app);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("NEMESIS-PORT {}", listener.local_addr().unwrap().port());
        axum::serve(listener, router).await.unwrap();
    });
}

// ----- The harness -----

/// A running app instance, killed (by pid) when dropped.
struct Instance {
    child: Child,
    url: String,
}

impl Instance {
    fn spawn(instance: usize, redis_url: &str, store_url: &str, history: &Path) -> Self {
        let config = format!("{instance}|{redis_url}|{store_url}|{}", history.display());
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "nemesis_app_instance",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("NEMESIS_APP", config)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn an app instance");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let port = lines
            .by_ref()
            .map_while(Result::ok)
            .find_map(|line| {
                line.split_once("NEMESIS-PORT ")?
                    .1
                    .trim()
                    .parse::<u16>()
                    .ok()
            })
            .expect("the app instance printed its port");
        // Keep draining its output so that it never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        signal(self.child.id(), "CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The clients: each picks an instance and a key at random and asks for 5–30 ms of work;
/// with `disconnect` on they give up after 15 ms, mid-section.
async fn client(
    urls: Arc<Vec<String>>,
    stop: Arc<AtomicBool>,
    disconnect: Arc<AtomicBool>,
    requests: Arc<Mutex<Vec<Request>>>,
) {
    let http = reqwest::Client::new();
    while !stop.load(Ordering::Relaxed) {
        let instance = fastrand::usize(..urls.len());
        let key = KEYS[fastrand::usize(..KEYS.len())];
        let ms = fastrand::u64(5..30);
        let client_timeout = disconnect
            .load(Ordering::Relaxed)
            .then_some(Duration::from_millis(15));
        let start = monotonic_ns();
        let status = http
            .post(format!("{}/work/{key}?ms={ms}", urls[instance]))
            .timeout(client_timeout.unwrap_or(Duration::from_secs(10)))
            .send()
            .await
            .map_or(0, |response| response.status().as_u16());
        requests.lock().unwrap().push(Request {
            instance,
            start,
            end: monotonic_ns(),
            status,
            client_timeout: client_timeout.map(|t| t.as_nanos() as u64),
        });
        if status == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// What the schedule needs to reach.
struct Targets {
    redis: RedisServer,
    redis_dir: PathBuf,
    proxies: Vec<Proxy>,
    instances: Vec<Instance>,
    disconnect: Arc<AtomicBool>,
    phases: Vec<Phase>,
}

/// One fault of the schedule.
struct Fault {
    name: &'static str,
    /// Whether README documents it as able to let a second holder in.
    expected_overlaps: bool,
    /// The instance it freezes, if any.
    paused_instance: Option<usize>,
    /// An instance made to hold every key (600 ms sections) when the fault strikes, so
    /// that it hits held locks and not only the gaps between short sections.
    holder: Option<usize>,
    /// How long the fault lasts.
    hold: Duration,
}

impl Targets {
    /// Runs one fault: `apply`, hold it, `clear`, then a recovery of 1.5 leases that
    /// still belongs to the phase.
    async fn phase(
        &mut self,
        fault: Fault,
        apply: impl FnOnce(&mut Self),
        clear: impl FnOnce(&mut Self),
    ) {
        let start = monotonic_ns();
        let held: Vec<_> = match fault.holder {
            Some(instance) => KEYS
                .iter()
                .map(|key| {
                    let url = format!("{}/work/{key}?ms=600", self.instances[instance].url);
                    tokio::spawn(async move { reqwest::Client::new().post(url).send().await })
                })
                .collect(),
            None => Vec::new(),
        };
        if fault.holder.is_some() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        apply(self);
        tokio::time::sleep(fault.hold).await;
        clear(self);
        self.phases.push(Phase {
            name: fault.name.to_owned(),
            start,
            end: monotonic_ns(),
            expected_overlaps: fault.expected_overlaps,
            paused_instance: fault.paused_instance,
        });
        for request in held {
            let _ = request.await;
        }
        tokio::time::sleep(TTL * 3 / 2).await;
    }
}

fn empty_dir(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nemesis_schedule_verdicts() {
    static RUN: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "trl-nemesis-{}-{}",
        std::process::id(),
        RUN.fetch_add(1, Ordering::Relaxed)
    ));
    empty_dir(&dir);
    let redis_dir = dir.join("redis");
    let redis = RedisServer::spawn_durable(&redis_dir);
    let store = RedisServer::spawn();
    let mut proxies = Vec::new();
    let mut instances = Vec::new();
    let histories: Vec<PathBuf> = (0..INSTANCES)
        .map(|i| dir.join(format!("history-{i}.jsonl")))
        .collect();
    for (i, history) in histories.iter().enumerate() {
        let proxy = Proxy::start(redis.port()).await;
        instances.push(Instance::spawn(i, &proxy.url(), &store.url(), history));
        proxies.push(proxy);
    }
    let urls = Arc::new(instances.iter().map(|i| i.url.clone()).collect::<Vec<_>>());
    let (stop, disconnect) = (Arc::new(AtomicBool::new(false)), Arc::default());
    let requests = Arc::new(Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            tokio::spawn(client(
                urls.clone(),
                stop.clone(),
                Arc::clone(&disconnect),
                requests.clone(),
            ))
        })
        .collect();
    let mut targets = Targets {
        redis,
        redis_dir,
        proxies,
        instances,
        disconnect,
        phases: Vec::new(),
    };

    let ms = Duration::from_millis;
    let fault = |name, hold| Fault {
        name,
        expected_overlaps: false,
        paused_instance: None,
        holder: None,
        hold,
    };
    let nothing = |_: &mut Targets| {};
    targets
        .phase(fault("none (baseline)", ms(2000)), nothing, nothing)
        .await;
    targets
        .phase(
            Fault {
                holder: Some(1),
                ..fault("Redis paused (SIGSTOP) 2.5 s, past the 1 s lease", ms(2500))
            },
            |t| t.redis.pause(),
            |t| t.redis.resume(),
        )
        .await;
    targets
        .phase(
            Fault {
                holder: Some(1),
                ..fault(
                    "Redis killed mid-hold, restarted with AOF (appendfsync always)",
                    ms(50),
                )
            },
            |t| t.redis.kill(),
            |t| t.redis.restart(),
        )
        .await;
    targets
        .phase(
            fault("proxy: every reply 300 ms late", ms(2000)),
            |t| t.proxies.iter().for_each(|p| p.delay_replies(ms(300))),
            |t| t.proxies.iter().for_each(|p| p.delay_replies(ms(0))),
        )
        .await;
    // Replies dropped mid-script: every 100 ms the next request through each proxy runs
    // on the server and its connection is cut before the reply gets back.
    {
        let start = monotonic_ns();
        let deadline = Instant::now() + ms(2000);
        while Instant::now() < deadline {
            targets.proxies.iter().for_each(Proxy::drop_next_reply);
            tokio::time::sleep(ms(100)).await;
        }
        targets.phases.push(Phase {
            name: "proxy: replies dropped mid-script (every 100 ms)".into(),
            start,
            end: monotonic_ns(),
            expected_overlaps: false,
            paused_instance: None,
        });
        tokio::time::sleep(TTL * 3 / 2).await;
    }
    targets
        .phase(
            fault(
                "proxy: instance 0's connections stalled 3 s (not closed)",
                ms(1500),
            ),
            |t| t.proxies[0].delay_replies(ms(3000)),
            |t| t.proxies[0].delay_replies(ms(0)),
        )
        .await;
    // Kleppmann's pause: instance 0 holds every key, then freezes past its lease. The
    // others take the keys meanwhile; when it wakes, its handlers (which write whatever
    // happened) present stale tokens to the store.
    targets
        .phase(
            Fault {
                paused_instance: Some(0),
                holder: Some(0),
                ..fault(
                    "app instance 0 paused (SIGSTOP) 2.5 s mid-hold, past its lease",
                    ms(2500),
                )
            },
            |t| signal(t.instances[0].child.id(), "STOP"),
            |t| signal(t.instances[0].child.id(), "CONT"),
        )
        .await;
    targets
        .phase(
            fault("clients disconnect after 15 ms, mid-section", ms(2000)),
            |t| t.disconnect.store(true, Ordering::Relaxed),
            |t| t.disconnect.store(false, Ordering::Relaxed),
        )
        .await;
    // Last: the fencing counter restarts too, so from here on the store refuses every
    // write until the counter passes the tokens it saw (what README says of fencing
    // without persistence); earlier, that would hide the other phases' writes.
    targets
        .phase(
            Fault {
                expected_overlaps: true,
                holder: Some(1),
                ..fault(
                    "Redis killed mid-hold, restarted empty (no persistence)",
                    ms(50),
                )
            },
            |t| {
                t.redis.kill();
                empty_dir(&t.redis_dir);
            },
            |t| t.redis.restart(),
        )
        .await;

    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.unwrap();
    }
    // Every lease has ended by now; what is left was left behind.
    tokio::time::sleep(TTL * 3 / 2).await;
    let keys: Vec<String> = targets.redis.query(redis::cmd("KEYS").arg("lock:*"));
    // The fencing counters stay by design (`:fence`, no expiry); a lock is `lock:{k}`.
    let leftovers: Vec<&String> = keys.iter().filter(|key| key.ends_with('}')).collect();
    targets.instances.clear(); // stops the apps; their histories are complete

    let mut sections = Vec::new();
    for history in &histories {
        let text = std::fs::read_to_string(history).unwrap_or_default();
        for line in text.lines() {
            sections.push(serde_json::from_str::<Section>(line).expect("a history line"));
        }
    }
    let mut writes = Vec::new();
    for key in KEYS {
        let fences: Vec<u64> = store.query(
            redis::cmd("LRANGE")
                .arg(format!("writes:{key}"))
                .arg(0)
                .arg(-1),
        );
        writes.extend(fences.into_iter().map(|fence| Write {
            key: key.to_owned(),
            fence,
        }));
    }
    let requests = requests.lock().unwrap().clone();
    let verdict = checker::check(
        &targets.phases,
        &sections,
        &requests,
        &writes,
        leftovers.len(),
        BOUND.as_nanos() as u64,
    );
    let table = verdict.table();
    eprintln!("\n{table}");
    let _ = std::fs::write(dir.join("verdict.md"), &table);
    let _ = std::fs::remove_dir_all(dir.join("redis"));

    // A run that did nothing proves nothing.
    let baseline = &verdict.rows[0].1;
    assert!(baseline.ok > 20 && baseline.sections > 20, "{table}");
    assert!(leftovers.is_empty(), "locks left: {leftovers:?}");
    assert!(verdict.passed(), "{table}");
}
