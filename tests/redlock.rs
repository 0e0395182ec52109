//! Redlock across independently spawned Redis servers, with nodes killed, frozen and
//! restarted empty. (The shared behaviour suite also runs on Redlock: `tests/behaviour.rs`.)

mod support;

use std::time::{Duration, Instant};

use deadpool_redis::redis::cmd;
use http::StatusCode;
use support::{Counter, Harness, Redlock, app, serve};
use tower_redis_lock::{Acquire, BackendError, LockBackend, LockKey};
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
