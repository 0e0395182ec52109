//! The Redis backend on a 3-primary Redis Cluster started by the test: exclusion through
//! the layer over keys in different slots, and release notifications across nodes.

mod support;

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use deadpool_redis::redis;
use http::StatusCode;
use support::{Counter, app, cluster_backend, redis_server::RedisCluster, serve};
use tower_redis_lock::{LockBackend, LockKey, Locker, backend::Acquire};
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exclusion_and_wake_up_on_a_cluster() {
    let cluster = RedisCluster::spawn(3);

    // The orders' locks land on different slots (and so, here, on different nodes).
    let slots: HashSet<i64> = (1..=4)
        .map(|order| {
            cluster.nodes[0].query(
                redis::cmd("CLUSTER")
                    .arg("KEYSLOT")
                    .arg(format!("lock:{{order:{order}}}")),
            )
        })
        .collect();
    assert!(
        slots.len() > 1,
        "all test keys share a slot: the test would prove little"
    );

    // Two app instances, 32 clients, four orders: every 200 is one increment.
    let counter = Counter::Local(Default::default());
    let mut urls = Vec::new();
    for node in 0..2 {
        let router = app(cluster_backend(&cluster, node), counter.clone(), |layer| {
            layer.max_wait(Duration::from_secs(2))
        });
        urls.push(serve(router).await);
    }
    let client = reqwest::Client::new();
    let ok = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let url = format!("{}/orders/{}/pay?work_ms=3", urls[i % 2], 1 + i % 4);
            let (client, ok) = (client.clone(), ok.clone());
            tokio::spawn(async move {
                for _ in 0..40 {
                    let status = client.post(&url).send().await.unwrap().status();
                    assert!(!status.is_server_error(), "got {status}");
                    if status == StatusCode::OK {
                        ok.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let mut counted = 0;
    for order in 1..=4 {
        counted += counter.get(&order.to_string()).await;
    }
    assert_eq!(
        counted,
        ok.load(Ordering::Relaxed) as u64,
        "lost updates: the lock leaked"
    );
    assert!(counted >= 16, "too few requests got through ({counted})");

    // A waiter with a ten-second backoff, listening on another node than the holder's
    // key may live on, acquires right after the release.
    let holder = cluster_backend(&cluster, 0);
    let key = LockKey::from("order:9");
    let token = Uuid::new_v4();
    assert!(matches!(
        holder
            .try_acquire(&key, token, Duration::from_secs(30))
            .await
            .unwrap(),
        Acquire::Acquired {
            fencing_token: Some(_)
        }
    ));
    let locker = Locker::new(cluster_backend(&cluster, 2))
        .max_wait(Duration::from_secs(30))
        .backoff(Duration::from_secs(10), Duration::from_secs(10));
    let waiting = tokio::spawn(async move {
        let _lock = locker.lock("order:9").await.unwrap();
        Instant::now()
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let released_at = Instant::now();
    assert!(holder.release(&key, token).await.unwrap().was_held);
    let woke_after = waiting
        .await
        .unwrap()
        .saturating_duration_since(released_at);
    assert!(
        woke_after < Duration::from_millis(1500),
        "woke {woke_after:?} after the release"
    );
}

/// Issue 11, finding 6. Keys that would end or empty the hash tag (`}` first, under an
/// empty layer prefix) must still keep every key of their lock in one slot: each one is
/// acquired (with a fencing token), extended and released on the cluster, all at once,
/// without a `CROSSSLOT` error and without two of them sharing a lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_keys_keep_their_lock_in_one_slot() {
    let cluster = RedisCluster::spawn(3);
    let backend = cluster_backend(&cluster, 0);
    let hostile = [
        "}", "}x", "}}", "{", "{}", "{}}", "a}b", "%", "%7D", "%25", "}%", "{1}", "1}", "*", "[1]",
        "a b", "é}", "order:1",
    ];
    let ttl = Duration::from_secs(30);
    let mut held = Vec::new();
    for raw in hostile {
        let (key, token) = (LockKey::from(raw), Uuid::new_v4());
        let answer = backend.try_acquire(&key, token, ttl).await;
        assert!(
            matches!(
                answer,
                Ok(Acquire::Acquired {
                    fencing_token: Some(_)
                })
            ),
            "{raw:?}: {answer:?}"
        );
        held.push((key, token));
    }
    for (key, token) in &held {
        assert!(backend.extend(key, *token, ttl).await.unwrap(), "{key:?}");
    }
    for (key, token) in &held {
        let released = backend.release(key, *token).await;
        assert!(released.is_ok_and(|r| r.was_held), "{key:?}");
    }
}
