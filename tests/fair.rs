//! Fair mode on a real Redis: the line across processes, dead and stopped waiters,
//! cancellations, and what is left in Redis afterwards.
//!
//! "Processes" are separate backends (pools, notification connections) in this test
//! process where nothing but the order matters, and a child process (this test binary,
//! running the ignored `helper_process` test) where a waiter must die or stop for real.

mod support;

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use deadpool_redis::redis::{self, Client};
use support::{RedisServer, backend_on, eventually, redis_server::signal};
use tokio::time::Instant;
use tower_redis_lock::{LockRejection, Locker, RedisBackend};

/// The Redis keys of the lock on `k` (the default prefix, no locker prefix).
const LOCK: &str = "lock:{k}";
const QUEUE: &str = "lock:{k}:queue";
const TIMEOUTS: &str = "lock:{k}:timeouts";

/// A fair locker of its own (its own pool and subscriber): one "process".
fn process(server: &RedisServer, max_wait: Duration) -> Locker<RedisBackend> {
    let client = Client::open(server.url()).expect("redis url");
    Locker::new(backend_on(&client))
        .fair(true)
        .max_wait(max_wait)
}

fn queue_len(server: &RedisServer) -> usize {
    server.query(redis::cmd("LLEN").arg(QUEUE))
}

fn timeouts_len(server: &RedisServer) -> usize {
    server.query(redis::cmd("ZCARD").arg(TIMEOUTS))
}

/// Every key of the lock on `k` and its line.
fn keys_of_k(server: &RedisServer) -> Vec<String> {
    server.query(redis::cmd("KEYS").arg("lock:{k}*"))
}

/// Once the line is empty, no key of it (nor the lock) is left in Redis.
async fn nothing_left(server: &RedisServer) {
    assert!(
        eventually(Duration::from_secs(5), || keys_of_k(server).is_empty()).await,
        "left in Redis: {:?}",
        keys_of_k(server)
    );
}

async fn queue_reaches(server: &RedisServer, len: usize) {
    assert!(
        eventually(Duration::from_secs(10), || queue_len(server) == len).await,
        "the line never reached {len} (it has {})",
        queue_len(server)
    );
}

/// Three processes queue in a known order while the lock is held; on release they get it
/// in exactly that order, each by grant, and the line leaves nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_are_served_in_arrival_order() {
    let server = RedisServer::spawn();
    let holder = process(&server, Duration::ZERO).lock("k").await.unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..3 {
        let locker = process(&server, Duration::from_secs(20));
        let order = order.clone();
        tasks.push(tokio::spawn(async move {
            let lock = locker.lock("k").await.expect("served");
            order.lock().unwrap().push(i);
            tokio::time::sleep(Duration::from_millis(20)).await;
            lock.release().await;
        }));
        queue_reaches(&server, i + 1).await;
    }
    holder.release().await;
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(*order.lock().unwrap(), [0, 1, 2]);
    nothing_left(&server).await;
}

/// A process alone in line keeps the lock from turn to turn (one token from the first
/// section to the last: never released and taken again while its requests wait), and
/// still lets another process in at its next turn's end once that one queues.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_alone_keeps_the_lock_until_another_queues() {
    const WORKERS: usize = 3;
    const SECTIONS: usize = 120;
    let server = RedisServer::spawn();
    let p = process(&server, Duration::from_secs(20));
    let tokens = Arc::new(Mutex::new(Vec::new()));
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let workers: Vec<_> = (0..WORKERS)
        .map(|_| {
            let (p, tokens, done) = (p.clone(), tokens.clone(), done.clone());
            tokio::spawn(async move {
                for _ in 0..SECTIONS / WORKERS + 1 {
                    let lock = p.lock("k").await.expect("served");
                    tokens.lock().unwrap().push(lock.held().token());
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    lock.release().await;
                    done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            })
        })
        .collect();
    assert!(
        eventually(Duration::from_secs(10), || tokens.lock().unwrap().len()
            >= 10)
        .await,
        "the process's requests were not served"
    );
    {
        let tokens = tokens.lock().unwrap();
        assert!(
            tokens.iter().all(|t| *t == tokens[0]),
            "released between turns: {tokens:?}"
        );
    }
    assert_eq!(queue_len(&server), 0, "nobody else is in line");
    // Another process queues: it is served at the end of a turn, while P's requests still
    // come (a turn is at most the requests waiting at its start and one more).
    let q = process(&server, Duration::from_secs(5));
    let lock = q.lock("k").await.expect("the other process is let in");
    let served_before = done.load(std::sync::atomic::Ordering::SeqCst);
    lock.release().await;
    for worker in workers {
        worker.await.unwrap();
    }
    let total = WORKERS * (SECTIONS / WORKERS + 1);
    assert!(
        served_before + WORKERS < total,
        "the other process waited for (nearly) all of P's requests: {served_before} of {total}"
    );
    nothing_left(&server).await;
}

/// Waiters that are dropped, or give up at their deadline, take their entries out of the
/// line; once everyone is served, no key of the line remains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_waiters_leave_no_entry() {
    let server = RedisServer::spawn();
    let holder = process(&server, Duration::ZERO).lock("k").await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..4 {
        let locker = process(&server, Duration::from_secs(20));
        tasks.push(tokio::spawn(async move {
            let lock = locker.lock("k").await.expect("served");
            lock.release().await;
        }));
        queue_reaches(&server, i + 1).await;
    }
    // Dropped requests (client gone): their entries go in the background.
    tasks[0].abort();
    tasks[2].abort();
    assert!(
        eventually(Duration::from_secs(5), || queue_len(&server) == 2
            && timeouts_len(&server) == 2)
        .await,
        "dropped waiters left entries: {} queued, {} timeouts",
        queue_len(&server),
        timeouts_len(&server)
    );
    // A waiter that runs out of time.
    let impatient = process(&server, Duration::from_millis(300));
    let gave_up = impatient.lock("k").await;
    assert!(matches!(gave_up, Err(LockRejection::Contended { .. })));
    assert!(
        eventually(Duration::from_secs(5), || queue_len(&server) == 2
            && timeouts_len(&server) == 2)
        .await,
        "a waiter that gave up left its entry"
    );
    holder.release().await;
    for task in [tasks.remove(3), tasks.remove(1)] {
        task.await.unwrap();
    }
    nothing_left(&server).await;
}

/// A grant and a cancellation that cross: the lock is granted to a waiter (its message
/// lost, as a grant made in the instant it gives up would be), and the waiter is dropped.
/// Its cancellation finds the lock its own and grants it on at once, instead of leaving it
/// held by nobody for the waiter's 30 s lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_crossing_a_cancellation_is_passed_on() {
    let server = RedisServer::spawn();
    let holder = process(&server, Duration::ZERO).lock("k").await.unwrap();
    let crossing = process(&server, Duration::from_secs(20)).ttl(Duration::from_secs(30));
    let crossing = tokio::spawn(async move { crossing.lock("k").await.map(|_| ()) });
    queue_reaches(&server, 1).await;
    let next = process(&server, Duration::from_secs(10));
    let next = tokio::spawn(async move {
        let lock = next.lock("k").await;
        let at = Instant::now();
        lock.map(|lock| (lock, at))
    });
    queue_reaches(&server, 2).await;
    // The grant, without its message: what the release script does, minus the PUBLISH.
    let entry: String = server.query(redis::cmd("LPOP").arg(QUEUE));
    let (token, lease) = entry.split_once(':').expect("entry is token:lease");
    server.query::<()>(redis::cmd("ZREM").arg(TIMEOUTS).arg(token));
    server.query::<()>(redis::cmd("SET").arg(LOCK).arg(token).arg("PX").arg(lease));
    let cancelled_at = Instant::now();
    crossing.abort();
    let (lock, acquired_at) = next.await.unwrap().expect("the next waiter got the lock");
    let idle = acquired_at - cancelled_at;
    println!("held by nobody for {idle:?} after the crossing");
    assert!(
        idle < Duration::from_secs(10),
        "the crossed grant sat for {idle:?}"
    );
    lock.release().await;
    drop(holder);
    nothing_left(&server).await;
}

/// A waiter process SIGKILLed while queued: once its entry's deadline (its `max_wait`
/// plus the margin) has passed, the release skips it, and the next process is served at
/// once rather than after the dead one's 30 s lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_waiter_is_skipped_after_its_entry_deadline() {
    let server = RedisServer::spawn();
    let holder = process(&server, Duration::ZERO).lock("k").await.unwrap();
    let mut dead = Helper::spawn(&server, Duration::from_secs(30), Duration::from_secs(1));
    queue_reaches(&server, 1).await;
    dead.kill();
    let next = process(&server, Duration::from_secs(20));
    let next = tokio::spawn(async move { next.lock("k").await.map(|lock| (lock, Instant::now())) });
    queue_reaches(&server, 2).await;
    // The dead entry's deadline: 1 s of max_wait and 0.5 s of margin after it queued.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let released_at = Instant::now();
    holder.release().await;
    let (lock, acquired_at) = next.await.unwrap().expect("the next waiter got the lock");
    let delay = acquired_at - released_at;
    println!("served {delay:?} after the release");
    assert!(
        delay < Duration::from_secs(10),
        "the dead waiter held the line for {delay:?}"
    );
    lock.release().await;
    nothing_left(&server).await;
}

/// A process that holds a grant and is SIGSTOPped (no renewals, no release) loses the
/// lock at its lease end, and the next in line gets it then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_grantee_loses_the_lock_at_its_lease_end() {
    let server = RedisServer::spawn();
    let holder = process(&server, Duration::ZERO).lock("k").await.unwrap();
    let mut grantee = Helper::spawn(&server, Duration::from_secs(1), Duration::from_secs(20));
    queue_reaches(&server, 1).await;
    let next = process(&server, Duration::from_secs(20));
    let next = tokio::spawn(async move { next.lock("k").await.map(|lock| (lock, Instant::now())) });
    queue_reaches(&server, 2).await;
    holder.release().await;
    let token = tokio::task::spawn_blocking({
        let mut lines = grantee.lines();
        move || lines.find_map(|line| line.strip_prefix("granted ").map(str::to_owned))
    })
    .await
    .unwrap()
    .expect("the helper was granted the lock");
    signal(grantee.child.id(), "STOP");
    let stopped_at = Instant::now();
    let lock_value: Option<String> = server.query(redis::cmd("GET").arg(LOCK));
    let (lock, acquired_at) = next.await.unwrap().expect("the next waiter got the lock");
    let after = acquired_at - stopped_at;
    println!("taken over {after:?} after the grantee stopped (its lease: 1 s)");
    // The grantee still held it when stopped, unless this machine is slower than its
    // lease (then the take-over proves less, but nothing wrong).
    if lock_value.as_deref() == Some(token.as_str()) {
        assert!(lock.held().token().to_string() != token);
    }
    let now: Option<String> = server.query(redis::cmd("GET").arg(LOCK));
    assert_eq!(now, Some(lock.held().token().to_string()));
    lock.release().await;
    grantee.kill();
}

/// A waiter in a process of its own: the ignored test `helper_process` of this binary.
struct Helper {
    child: Child,
}

impl Helper {
    /// Starts a process that waits fairly for `k` on `server` with `ttl` and `max_wait`,
    /// prints `granted <token>` when it has the lock, and holds it until killed.
    fn spawn(server: &RedisServer, ttl: Duration, max_wait: Duration) -> Self {
        let child = Command::new(std::env::current_exe().expect("test binary"))
            .args(["helper_process", "--exact", "--ignored", "--nocapture"])
            .env("FAIR_HELPER_URL", server.url())
            .env("FAIR_HELPER_TTL_MS", ttl.as_millis().to_string())
            .env("FAIR_HELPER_MAX_WAIT_MS", max_wait.as_millis().to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the helper");
        Self { child }
    }

    fn lines(&mut self) -> impl Iterator<Item = String> + Send + 'static {
        let stdout = self.child.stdout.take().expect("stdout piped");
        BufReader::new(stdout).lines().map_while(Result::ok)
    }

    /// SIGKILL: no release, no cancellation, nothing.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        self.kill();
    }
}

fn env_ms(name: &str) -> Duration {
    let ms = std::env::var(name).ok().and_then(|v| v.parse().ok());
    Duration::from_millis(ms.unwrap_or(1000))
}

/// The helper process's body (run by [`Helper::spawn`]; does nothing when run by hand).
#[test]
#[ignore = "run by the tests of this file as a process of its own"]
fn helper_process() {
    let Ok(url) = std::env::var("FAIR_HELPER_URL") else {
        return;
    };
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async move {
        let client = Client::open(url).expect("redis url");
        let locker = Locker::new(backend_on(&client))
            .fair(true)
            .ttl(env_ms("FAIR_HELPER_TTL_MS"))
            .max_wait(env_ms("FAIR_HELPER_MAX_WAIT_MS"));
        match locker.lock("k").await {
            Ok(lock) => {
                println!("granted {}", lock.held().token());
                std::future::pending::<()>().await;
            }
            Err(err) => println!("refused {err}"),
        }
    });
}

/// A grant wakes only the process it is for: once a process listens on its own grant
/// channel (from its first wait on), its line entries name that channel and the release
/// script publishes the grant there, not on the key's release channel that every
/// waiting process of the key listens to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_is_published_to_its_process_alone() {
    use futures_util::StreamExt;

    let server = RedisServer::spawn();
    let client = Client::open(server.url()).expect("redis url");
    let mut pubsub = client.get_async_pubsub().await.expect("pubsub");
    pubsub
        .subscribe("lock:{k}:released")
        .await
        .expect("subscribe");
    pubsub
        .psubscribe("lock:grants:*")
        .await
        .expect("psubscribe");
    let heard: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let listener = tokio::spawn({
        let heard = heard.clone();
        async move {
            let mut messages = pubsub.on_message();
            while let Some(message) = messages.next().await {
                let payload: String = message.get_payload().unwrap_or_default();
                heard
                    .lock()
                    .unwrap()
                    .push((message.get_channel_name().to_owned(), payload));
            }
        }
    });

    let holder = process(&server, Duration::ZERO);
    let waiters = [
        process(&server, Duration::from_secs(20)),
        process(&server, Duration::from_secs(20)),
    ];
    for round in 0..2 {
        let held = holder.lock("k").await.expect("the holder's lock");
        let tasks: Vec<_> = waiters
            .iter()
            .cloned()
            .map(|waiter| {
                tokio::spawn(async move {
                    let lock = waiter.lock("k").await.expect("served");
                    lock.release().await;
                })
            })
            .collect();
        queue_reaches(&server, 2).await;
        held.release().await;
        for task in tasks {
            task.await.unwrap();
        }
        nothing_left(&server).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        if round == 0 {
            // The first wait of each process subscribed its grant channel; from now on
            // its entries name it.
            heard.lock().unwrap().clear();
        }
    }
    listener.abort();

    let heard = heard.lock().unwrap().clone();
    let grants_on_release_channel: Vec<_> = heard
        .iter()
        .filter(|(channel, payload)| channel == "lock:{k}:released" && !payload.is_empty())
        .collect();
    assert!(
        grants_on_release_channel.is_empty(),
        "grants broadcast on the key's channel: {grants_on_release_channel:?}"
    );
    let directed: Vec<_> = heard
        .iter()
        .filter(|(channel, _)| channel.starts_with("lock:grants:"))
        .collect();
    assert_eq!(directed.len(), 2, "one grant per waiter: {heard:?}");
    assert_ne!(
        directed[0].0, directed[1].0,
        "each grant on its own process's channel"
    );
    assert!(
        directed
            .iter()
            .all(|(_, payload)| payload.ends_with(" lock:{k}:released")),
        "a directed grant names the lock's release channel: {directed:?}"
    );
}
