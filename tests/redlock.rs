//! Redlock across independently spawned Redis servers, with nodes killed, frozen and
//! restarted empty. (The shared behaviour suite also runs on Redlock: `tests/behaviour.rs`.)

mod support;

use std::time::{Duration, Instant};

use deadpool_redis::redis::cmd;
use http::StatusCode;
use support::{Counter, Harness, Redlock, app, pool, proxy::Proxy, redis_node, serve};
use tower_redis_lock::{
    BackendError, LockBackend, LockKey, Locker, RedisBackend, RedlockBackend, backend::Acquire,
};
use uuid::Uuid;

const TTL: Duration = Duration::from_secs(10);

fn keys(redlock: &Redlock, node: usize) -> Vec<String> {
    redlock.servers[node].query(cmd("KEYS").arg("lock:*"))
}

/// With 2 of 5 nodes dead, a majority is still there: the lock works, through the
/// backend and through the layer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_dead_nodes_of_five_leave_a_majority() {
    let mut redlock = Redlock::spawn(5);
    redlock.servers[0].kill();
    redlock.servers[3].kill();
    let backend = redlock.instance();
    let key = LockKey::from("order:1");
    let (owner, other) = (Uuid::new_v4(), Uuid::new_v4());
    assert!(matches!(
        backend.try_acquire(&key, owner, TTL).await.unwrap(),
        Acquire::Acquired { .. }
    ));
    assert!(matches!(
        backend.try_acquire(&key, other, TTL).await.unwrap(),
        Acquire::Held { remaining: Some(_) }
    ));
    assert!(backend.extend(&key, owner, TTL).await.unwrap());
    assert!(backend.release(&key, owner).await.unwrap().was_held);
    for node in [1, 2, 4] {
        assert!(keys(&redlock, node).is_empty(), "node {node} kept the lock");
    }

    let url = serve(app(
        redlock.instance(),
        Counter::Local(Default::default()),
        |l| l,
    ))
    .await;
    let response = reqwest::Client::new()
        .post(format!("{url}/orders/1/pay"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

/// With 3 of 5 dead there is no majority: 503, and the two live nodes keep nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_dead_nodes_of_five_fail_cleanly() {
    let mut redlock = Redlock::spawn(5);
    for node in [0, 2, 4] {
        redlock.servers[node].kill();
    }
    let backend = redlock.instance();
    let attempt = backend
        .try_acquire(&LockKey::from("order:2"), Uuid::new_v4(), TTL)
        .await;
    assert!(
        matches!(
            attempt,
            Err(BackendError::Unavailable(_) | BackendError::Timeout(_))
        ),
        "{attempt:?}"
    );
    for node in [1, 3] {
        assert!(
            keys(&redlock, node).is_empty(),
            "node {node} kept a partial lock"
        );
    }

    let url = serve(app(
        redlock.instance(),
        Counter::Local(Default::default()),
        |layer| layer.max_wait(Duration::from_millis(200)),
    ))
    .await;
    let started = Instant::now();
    let response = reqwest::Client::new()
        .post(format!("{url}/orders/2/pay"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    for node in [1, 3] {
        assert!(
            keys(&redlock, node).is_empty(),
            "node {node} kept a partial lock"
        );
    }
}

/// A frozen node (SIGSTOP) answers nothing: the acquisition goes on with the others as
/// soon as the node timeout passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_node_does_not_stall_an_acquisition() {
    let redlock = Redlock::spawn(5);
    let backend = redlock.instance(); // node timeout 300 ms
    redlock.servers[2].pause();
    let started = Instant::now();
    let acquired = backend
        .try_acquire(&LockKey::from("order:3"), Uuid::new_v4(), TTL)
        .await;
    let elapsed = started.elapsed();
    redlock.servers[2].resume();
    assert!(
        matches!(acquired, Ok(Acquire::Acquired { .. })),
        "{acquired:?}"
    );
    assert!(
        elapsed < Duration::from_secs(2),
        "stalled {elapsed:?} on the frozen node"
    );
}

/// Three nodes; one restarts empty while the lock is held. The other two still hold it,
/// so a second client gets one node of three: no majority, no entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_empty_does_not_let_a_second_holder_in() {
    let mut redlock = Redlock::spawn(3);
    let (first, second) = (redlock.instance(), redlock.instance());
    let key = LockKey::from("order:4");
    let owner = Uuid::new_v4();
    assert!(matches!(
        first.try_acquire(&key, owner, TTL).await.unwrap(),
        Acquire::Acquired { .. }
    ));
    redlock.servers[0].restart();
    assert!(
        keys(&redlock, 0).is_empty(),
        "the restarted node should be empty"
    );

    let intruder = Uuid::new_v4();
    let mut answer = second.try_acquire(&key, intruder, TTL).await;
    for _ in 0..20 {
        // The second client's connection to the restarted node may need a moment.
        if answer.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        answer = second.try_acquire(&key, intruder, TTL).await;
    }
    assert!(matches!(answer, Ok(Acquire::Held { .. })), "{answer:?}");
    assert!(
        keys(&redlock, 0).is_empty(),
        "the refused attempt left a partial lock"
    );
    assert!(first.release(&key, owner).await.unwrap().was_held);
    assert!(matches!(
        second.try_acquire(&key, intruder, TTL).await.unwrap(),
        Acquire::Acquired { .. }
    ));
}

/// Node 0 reached through the tests' proxy (no notifications), the others directly.
async fn behind_a_proxy(redlock: &Redlock) -> (Proxy, RedlockBackend) {
    let proxy = Proxy::start(redlock.servers[0].port()).await;
    let slow = RedisBackend::new(pool(&proxy.url())).command_timeout(Duration::from_secs(5));
    let mut nodes = vec![slow];
    nodes.extend(redlock.servers[1..].iter().map(redis_node));
    let backend = RedlockBackend::new(nodes).node_timeout(Duration::from_millis(300));
    // Load the scripts and open the connections first: a fault must meet the script
    // itself, not a `NOSCRIPT` round or the connection's handshake.
    let (warm_up, token) = (LockKey::from("warm-up"), Uuid::new_v4());
    backend.try_acquire(&warm_up, token, TTL).await.unwrap();
    backend.release(&warm_up, token).await.unwrap();
    // And the undo's: an attempt that only X grants is undone there.
    let blocker = Uuid::new_v4();
    for server in &redlock.servers[1..] {
        redis_node(server)
            .try_acquire(&warm_up, blocker, TTL)
            .await
            .unwrap();
    }
    let refused = backend.try_acquire(&warm_up, token, TTL).await.unwrap();
    assert!(matches!(refused, Acquire::Held { .. }), "{refused:?}");
    for server in &redlock.servers[1..] {
        redis_node(server).release(&warm_up, blocker).await.unwrap();
    }
    (proxy, backend)
}

/// The value of the lock key on `node` (the owner's token), if any.
fn owner_on(redlock: &Redlock, node: usize, key: &str) -> Option<String> {
    redlock.servers[node].query(cmd("GET").arg(key))
}

/// Issue 11, finding 1. Nodes X (behind the proxy), Y, Z; Z is held by someone else. The
/// first attempt takes Y, X's reply is late (its `SET` did run), so the attempt fails and
/// releases everywhere; the release to X is held back by the network and lands later.
/// Whatever the next attempts do, that late release must not delete a later grant on X:
/// once Z's holder leaves, a third client must still find the lock held by a majority.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_release_of_a_failed_attempt_cannot_delete_a_later_grant() {
    let redlock = Redlock::spawn(3);
    let (proxy, backend) = behind_a_proxy(&redlock).await;
    let key = LockKey::from("order:late");
    let z = redis_node(&redlock.servers[2]);
    let other = Uuid::new_v4();
    assert!(matches!(
        z.try_acquire(&key, other, Duration::from_secs(30))
            .await
            .unwrap(),
        Acquire::Acquired { .. }
    ));
    // The acquire script names the fence key; the undo script names the lock key alone,
    // followed by the token (36 bytes).
    proxy.delay_reply_to_request_containing(":fence", Duration::from_secs(1));
    proxy.delay_request_containing("{order:late}\r\n$36\r\n", Duration::from_secs(1));

    let locker = Locker::new(backend)
        .without_local_queue()
        .ttl(Duration::from_secs(30))
        .max_wait(Duration::from_secs(10));
    let lock = locker
        .lock(key.clone())
        .await
        .expect("a majority in the end");
    // Let the held-back release land on X.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let ours = lock.token().to_string();
    let redis_key = "lock:{order:late}";
    assert_eq!(
        owner_on(&redlock, 0, redis_key).as_deref(),
        Some(ours.as_str()),
        "a late release of an earlier attempt deleted our grant on X"
    );
    assert!(z.release(&key, other).await.unwrap().was_held);
    let third = RedlockBackend::new(redlock.servers.iter().map(redis_node).collect())
        .node_timeout(Duration::from_millis(300));
    let answer = third
        .try_acquire(&key, Uuid::new_v4(), Duration::from_secs(30))
        .await;
    assert!(
        matches!(answer, Ok(Acquire::Held { .. })),
        "two holders at once: {answer:?}"
    );
    assert!(!lock.is_lost());
    lock.release().await;
}

/// Issue 11, finding 1 (second part). X runs our `SET` but its reply comes too late; Y and
/// Z are held by someone else. The failed attempt must release on X too, or X keeps an
/// orphan grant for a whole ttl.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_timed_out_keeps_no_orphan_grant() {
    let redlock = Redlock::spawn(3);
    let (proxy, backend) = behind_a_proxy(&redlock).await;
    let key = LockKey::from("order:orphan");
    let other = Uuid::new_v4();
    for node in [1, 2] {
        let direct = redis_node(&redlock.servers[node]);
        assert!(matches!(
            direct
                .try_acquire(&key, other, Duration::from_secs(30))
                .await
                .unwrap(),
            Acquire::Acquired { .. }
        ));
    }
    proxy.delay_reply_to_request_containing(":fence", Duration::from_secs(1));
    let answer = backend
        .try_acquire(&key, Uuid::new_v4(), Duration::from_secs(30))
        .await;
    assert!(matches!(answer, Ok(Acquire::Held { .. })), "{answer:?}");
    // The late reply arrives; nothing of ours may be left on X.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        owner_on(&redlock, 0, "lock:{order:orphan}"),
        None,
        "X kept an orphan grant of the failed attempt"
    );
}

/// Issue 11, finding 5. The holder's majority skips node 0 (held by someone else at the
/// time), so its release publishes on nodes 1 and 2 only. A waiter with a ten-second
/// backoff must still wake at once: only a notification heard off node 0 explains it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_wakes_waiters_whichever_nodes_held_the_lock() {
    let redlock = Redlock::spawn(3);
    let key = LockKey::from("order:quiet");
    let redis_key = "lock:{order:quiet}";
    let _: () = redlock.servers[0].query(
        cmd("SET")
            .arg(redis_key)
            .arg("someone")
            .arg("PX")
            .arg(30_000),
    );
    let holder = redlock.instance();
    let token = Uuid::new_v4();
    assert!(matches!(
        holder.try_acquire(&key, token, TTL).await.unwrap(),
        Acquire::Acquired { .. }
    ));
    let _: i64 = redlock.servers[0].query(cmd("DEL").arg(redis_key));

    let locker = Locker::new(redlock.instance())
        .max_wait(Duration::from_secs(30))
        .backoff(Duration::from_secs(10), Duration::from_secs(10));
    let attempts = || redlock.servers[1].command_calls("evalsha");
    let before = attempts();
    let waiting = tokio::spawn(async move {
        let lock = locker.lock("order:quiet").await.unwrap();
        let woke = Instant::now();
        lock.release().await;
        woke
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    // Undoing its failed attempts must not wake the waiter itself: a few attempts (one,
    // and one after each node's new subscription), no storm (over a thousand before).
    let made = attempts() - before;
    assert!(made <= 10, "{made} attempts in 700 ms with a 10 s backoff");
    let released_at = Instant::now();
    assert!(holder.release(&key, token).await.unwrap().was_held);
    let woke_after = waiting
        .await
        .unwrap()
        .saturating_duration_since(released_at);
    assert!(
        woke_after < Duration::from_secs(3),
        "woke {woke_after:?} after the release"
    );
}
