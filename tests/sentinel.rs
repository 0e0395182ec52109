//! A backend that follows a Sentinel failover: a primary, a replica and three Sentinels,
//! locks held and asked for, the primary killed. Requests get 503 while there is no
//! primary and succeed on the new one afterwards, release notifications included.

mod support;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use deadpool_redis::redis::cmd;
use http::StatusCode;
use support::{
    Counter, RedisServer, app, eventually,
    redis_server::{MASTER_NAME, SentinelGroup},
    serve,
};
use tower_redis_lock::{LockBackend, LockKey, Locker, RedisBackend, backend::Acquire};
use uuid::Uuid;

fn backend(group: &SentinelGroup) -> RedisBackend {
    let urls = group.sentinel_urls();
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    RedisBackend::from_sentinel(&urls, MASTER_NAME)
        .expect("sentinel URLs")
        .command_timeout(Duration::from_millis(500))
}

fn subscribers(server: &RedisServer, channel: &str) -> i64 {
    let reply: (String, i64) = server.query(cmd("PUBSUB").arg("NUMSUB").arg(channel));
    reply.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_gives_503_then_the_new_primary_with_notifications() {
    let mut group = SentinelGroup::spawn();
    let backend = backend(&group);
    // The handlers' counter lives in the process: it must not fail over itself.
    let counter = Counter::Local(Arc::new(Mutex::new(HashMap::new())));
    let url = serve(app(backend.clone(), counter, |layer| {
        layer.max_wait(Duration::from_millis(200))
    }))
    .await;
    let client = reqwest::Client::new();
    let pay = |order: String| {
        let client = client.clone();
        let url = format!("{url}/orders/{order}/pay");
        async move { client.post(url).send().await.expect("request").status() }
    };
    assert_eq!(pay("before".into()).await, StatusCode::OK);

    // A lock held across the failover, and a request that finds it held.
    let held = LockKey::from("order:held");
    let token = Uuid::new_v4();
    let acquired = backend
        .try_acquire(&held, token, Duration::from_secs(60))
        .await;
    assert!(
        matches!(acquired, Ok(Acquire::Acquired { .. })),
        "{acquired:?}"
    );
    assert_eq!(pay("held".into()).await, StatusCode::CONFLICT);

    // The primary dies. Until the Sentinels promote the replica there is no primary:
    // 503 (never a hang, never an unlocked handler); then the new primary answers.
    group.primary.kill();
    let started = Instant::now();
    let mut unavailable = 0;
    loop {
        let asked = Instant::now();
        let status = pay(format!("during-{unavailable}")).await;
        assert!(
            asked.elapsed() < Duration::from_secs(4),
            "a request took {:?}",
            asked.elapsed()
        );
        match status {
            StatusCode::OK => break,
            StatusCode::SERVICE_UNAVAILABLE => unavailable += 1,
            other => panic!("during the failover: {other}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no success within 60 s of the primary's death"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(unavailable > 0, "no request saw the failover");
    assert_eq!(
        group.primary_port(),
        Some(group.replica.port()),
        "the requests succeed, but not on the promoted replica"
    );
    eprintln!(
        "failover: {unavailable} answers 503 over {:?}; the held lock {} the failover",
        started.elapsed(),
        if group
            .replica
            .query::<i64>(cmd("EXISTS").arg("lock:{order:held}"))
            == 1
        {
            "survived"
        } else {
            "did not survive"
        }
    );

    // Notifications come from the new primary: a waiter with a 10 s backoff takes the
    // lock within seconds of its release.
    let key = LockKey::from("order:wake");
    let token = Uuid::new_v4();
    let acquired = backend
        .try_acquire(&key, token, Duration::from_secs(60))
        .await;
    assert!(
        matches!(acquired, Ok(Acquire::Acquired { .. })),
        "{acquired:?}"
    );
    let waiter = tokio::spawn({
        let locker = Locker::new(backend.clone())
            .without_local_queue()
            .max_wait(Duration::from_secs(60))
            .backoff(Duration::from_secs(10), Duration::from_secs(10));
        async move {
            let lock = locker.lock("order:wake").await.map_err(|e| e.to_string())?;
            let acquired = Instant::now();
            lock.release().await;
            Ok::<_, String>(acquired)
        }
    });
    // The notifier's last attempts failed while there was no primary: it waits out its
    // pause (up to 30 s) before it connects again.
    assert!(
        eventually(Duration::from_secs(45), || {
            subscribers(&group.replica, "lock:{order:wake}:released") >= 1
        })
        .await,
        "the waiter never subscribed on the new primary"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let released = Instant::now();
    assert!(backend.release(&key, token).await.unwrap().was_held);
    let acquired = waiter.await.unwrap().expect("the waiter got the lock");
    let waited = acquired.saturating_duration_since(released);
    assert!(
        waited < Duration::from_secs(5),
        "the waiter took {waited:?}: no notification reached it"
    );
}
