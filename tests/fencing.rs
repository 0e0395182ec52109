//! Fencing tokens on one Redis as a hybrid logical clock (`scripts::FENCE_LUA`):
//! `max(stored + 1, server µs)`, the counter expiring a retention after its last use.

mod support;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use deadpool_redis::redis::cmd;
use support::{RedisServer, eventually, pool};
use tower_redis_lock::{LockBackend, LockKey, Locker, RedisBackend, backend::Acquire};
use uuid::Uuid;

fn fenced(server: &RedisServer, retention: Duration) -> RedisBackend {
    RedisBackend::new(pool(&server.url()))
        .command_timeout(Duration::from_secs(2))
        .fencing(true)
        .fence_retention(retention)
}

/// Acquires `key` for `owner` and returns the fencing token.
async fn token_for(backend: &RedisBackend, key: &LockKey, owner: Uuid) -> u64 {
    match backend
        .try_acquire(key, owner, Duration::from_secs(5))
        .await
        .expect("acquire")
    {
        Acquire::Acquired {
            fencing_token: Some(token),
        } => token,
        other => panic!("expected a fenced acquisition, got {other:?}"),
    }
}

/// Acquires and releases `key` once; returns the token.
async fn lock_once(backend: &RedisBackend, key: &LockKey) -> u64 {
    let owner = Uuid::new_v4();
    let token = token_for(backend, key, owner).await;
    assert!(backend.release(key, owner).await.expect("release").was_held);
    token
}

/// The server's clock in µs since 1970 (`TIME`).
fn server_micros(server: &RedisServer) -> u64 {
    let (secs, micros): (u64, u64) = server.query(&mut cmd("TIME"));
    secs * 1_000_000 + micros
}

/// A counter that expired restarts from the server clock, above every token it gave;
/// while it lives it carries an expiry no longer than the retention.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_counter_restarts_above_every_token_it_gave() {
    let server = RedisServer::spawn();
    let retention = Duration::from_millis(300);
    let backend = fenced(&server, retention);
    let key = LockKey::from("order:1");
    let mut last = 0;
    for _ in 0..200 {
        let token = lock_once(&backend, &key).await;
        assert!(token > last, "token {token} after {last}");
        last = token;
    }
    let pttl: i64 = server.query(cmd("PTTL").arg("lock:{order:1}:fence"));
    assert!(
        pttl > 0 && pttl <= 300,
        "the counter's expiry is {pttl} ms, not within the 300 ms retention"
    );
    assert!(
        eventually(Duration::from_secs(10), || {
            server.query::<i64>(cmd("EXISTS").arg("lock:{order:1}:fence")) == 0
        })
        .await,
        "the counter did not expire"
    );
    let after = lock_once(&backend, &key).await;
    assert!(
        after > last,
        "the restarted counter gave {after}, not above the last token {last}"
    );
}

/// A counter ahead of the clock (a clock that stepped back, or one older than a clock
/// step) keeps counting up from its value; an old `INCR` counter (a small number) is
/// overtaken by the clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_the_larger_of_the_counter_plus_one_and_the_clock() {
    let server = RedisServer::spawn();
    let backend = fenced(&server, Duration::from_secs(60));
    let ahead = server_micros(&server) + 3_600_000_000; // an hour ahead
    let _: () = server.query(cmd("SET").arg("lock:{ahead}:fence").arg(ahead));
    let key = LockKey::from("ahead");
    assert_eq!(lock_once(&backend, &key).await, ahead + 1);
    assert_eq!(lock_once(&backend, &key).await, ahead + 2);
    let stored: String = server.query(cmd("GET").arg("lock:{ahead}:fence"));
    assert_eq!(stored, (ahead + 2).to_string(), "stored inexactly");

    let _: () = server.query(cmd("SET").arg("lock:{legacy}:fence").arg(7));
    let before = server_micros(&server);
    let token = lock_once(&backend, &LockKey::from("legacy")).await;
    assert!(
        token >= before,
        "token {token} below the clock {before} at the acquisition"
    );
}

/// Tokens strictly increase in the order holders enter, through hand-offs down the local
/// line (each takes a new token in the backend), two lockers (two processes), and a
/// holder's own retried acquisition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_strictly_increase_across_hand_offs_and_retries() {
    let server = RedisServer::spawn();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let lockers: Vec<_> = (0..2)
        .map(|_| {
            Locker::new(fenced(&server, Duration::from_secs(60))).max_wait(Duration::from_secs(10))
        })
        .collect();
    let tasks: Vec<_> = (0..8)
        .map(|worker| {
            let (locker, seen) = (lockers[worker % 2].clone(), seen.clone());
            tokio::spawn(async move {
                for _ in 0..40 {
                    let lock = locker.lock("hot").await.expect("lock");
                    let token = lock.held().fencing_token().expect("fencing is on");
                    seen.lock().unwrap().push(token);
                    tokio::task::yield_now().await;
                    lock.release().await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    assert_eq!(seen.len(), 320);
    assert!(
        seen.windows(2).all(|pair| pair[0] < pair[1]),
        "tokens out of order: {seen:?}"
    );

    // A retried acquisition of the holder (its reply lost, say) moves the token on.
    let backend = fenced(&server, Duration::from_secs(60));
    let key = LockKey::from("hot");
    let owner = Uuid::new_v4();
    let first = token_for(&backend, &key, owner).await;
    let retried = token_for(&backend, &key, owner).await;
    assert!(first > *seen.last().unwrap() && retried > first);
}

/// 10,000 keys locked once with fencing leave their counters for the retention, and
/// nothing after it. Prints the memory they took (`INFO memory`, `used_memory`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_keys_locked_once_leave_nothing_after_the_retention() {
    const KEYS: usize = 10_000;
    let server = RedisServer::spawn();
    let retention = Duration::from_secs(3);
    let backend = fenced(&server, retention);
    let used_memory = || -> i64 {
        let info: String = server.query(cmd("INFO").arg("memory"));
        info.lines()
            .find_map(|line| line.strip_prefix("used_memory:")?.trim().parse().ok())
            .expect("used_memory in INFO memory")
    };
    // One lock first, so that the scripts are loaded and the connection made.
    lock_once(&backend, &LockKey::from("warm-up")).await;
    assert!(
        eventually(Duration::from_secs(10), || {
            server.query::<i64>(&mut cmd("DBSIZE")) == 0
        })
        .await
    );
    let before = used_memory();
    let tasks: Vec<_> = (0..32)
        .map(|worker| {
            let backend = backend.clone();
            tokio::spawn(async move {
                for n in (worker..KEYS).step_by(32) {
                    lock_once(&backend, &LockKey::from(format!("order:{n}"))).await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let keys: i64 = server.query(&mut cmd("DBSIZE"));
    let during = used_memory();
    assert!(
        keys > 0 && keys <= KEYS as i64,
        "{keys} keys right after the locks"
    );
    assert!(
        eventually(Duration::from_secs(30), || {
            server.query::<i64>(&mut cmd("DBSIZE")) == 0
        })
        .await,
        "keys left after the retention: {}",
        server.query::<i64>(&mut cmd("DBSIZE"))
    );
    let after = used_memory();
    eprintln!(
        "{KEYS} keys locked once with fencing: {keys} counters, used_memory {before} B before, \
         {during} B after the locks (+{} B, {} B a key), {after} B after the {retention:?} \
         retention ({:+} B)",
        during - before,
        (during - before) / KEYS as i64,
        after - before,
    );
}
