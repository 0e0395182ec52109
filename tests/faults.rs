//! The failure suite: a slow network, a reply lost mid-script, Redis restarted empty
//! mid-hold, out of memory, a read-only replica. Each gives its documented answer, nothing
//! hangs, no lock is left behind, and service resumes when the fault clears.

mod support;

use std::time::{Duration, Instant};

use deadpool_redis::redis::cmd;
use http::StatusCode;
use support::{Counter, RedisServer, app, eventually, pool, proxy::Proxy, serve};
use tower_redis_lock::RedisBackend;

fn locks(server: &RedisServer) -> usize {
    let keys: Vec<String> = server.query(cmd("KEYS").arg("lock:*"));
    keys.len()
}

async fn pay(url: &str, order: &str, query: &str) -> (StatusCode, Duration) {
    let started = Instant::now();
    let response = reqwest::Client::new()
        .post(format!("{url}/orders/{order}/pay?{query}"))
        .send()
        .await
        .expect("request");
    (response.status(), started.elapsed())
}

/// Every reply 200 ms late. With a 1 s command timeout requests still succeed, slower;
/// with a 100 ms one they get 503 fast. Either way nothing hangs and no lock stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_network_gives_bounded_answers() {
    let server = RedisServer::spawn();
    let proxy = Proxy::start(server.port()).await;
    proxy.delay_replies(Duration::from_millis(200));
    let counter = Counter::Local(Default::default());
    let patient = RedisBackend::new(pool(&proxy.url())).command_timeout(Duration::from_secs(1));
    let impatient =
        RedisBackend::new(pool(&proxy.url())).command_timeout(Duration::from_millis(100));
    let patient = serve(app(patient, counter.clone(), |layer| {
        layer.max_wait(Duration::from_millis(300))
    }))
    .await;
    let impatient = serve(app(impatient, counter.clone(), |layer| {
        layer.max_wait(Duration::from_millis(300))
    }))
    .await;

    let (status, took) = pay(&patient, "1", "").await;
    assert_eq!(status, StatusCode::OK);
    assert!(took < Duration::from_secs(4), "took {took:?}");
    let contended = tokio::join!(pay(&patient, "2", "work_ms=1500"), async {
        tokio::time::sleep(Duration::from_millis(600)).await;
        pay(&patient, "2", "").await
    });
    assert_eq!(contended.0.0, StatusCode::OK);
    assert_eq!(contended.1.0, StatusCode::CONFLICT);
    assert!(
        contended.1.1 < Duration::from_secs(3),
        "contended answer took {:?}",
        contended.1.1
    );

    let (status, took) = pay(&impatient, "3", "").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert_eq!(counter.get("3").await, 0, "a handler ran without its lock");

    proxy.delay_replies(Duration::ZERO);
    assert!(
        eventually(Duration::from_secs(10), || locks(&server) == 0).await,
        "a lock leaked"
    );
}

/// The connection is cut after the acquire script reached Redis and before its reply came
/// back. The retry, with the same token, is recognised: one grant, no orphan lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_lost_mid_script_is_recognised_on_retry() {
    let server = RedisServer::spawn();
    let proxy = Proxy::start(server.port()).await;
    let counter = Counter::Local(Default::default());
    let backend = RedisBackend::new(pool(&proxy.url())).command_timeout(Duration::from_millis(500));
    // A 30 s lease: had the retry not recognised its own token, it would wait for itself
    // past max_wait and answer 409.
    let url = serve(app(backend, counter.clone(), |layer| {
        layer
            .ttl(Duration::from_secs(30))
            .max_wait(Duration::from_secs(2))
    }))
    .await;
    assert_eq!(pay(&url, "0", "").await.0, StatusCode::OK); // connections made, scripts loaded

    proxy.drop_next_reply();
    let (status, _) = pay(&url, "7", "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(counter.get("7").await, 1);
    assert!(
        eventually(Duration::from_secs(5), || locks(&server) == 0).await,
        "an orphan lock stayed"
    );
}

/// Redis restarts empty while a handler holds its lock: the next renewal finds the lock
/// gone, the handler is dropped and the client gets 503; then service resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_empty_mid_hold_ends_the_hold() {
    let mut server = RedisServer::spawn();
    let counter = Counter::Local(Default::default());
    let backend =
        RedisBackend::new(pool(&server.url())).command_timeout(Duration::from_millis(500));
    let url = serve(app(backend, counter.clone(), |layer| {
        layer.ttl(Duration::from_secs(2))
    }))
    .await;
    let request = tokio::spawn({
        let url = url.clone();
        async move { pay(&url, "4", "work_ms=4000").await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.restart();
    let (status, took) = request.await.unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        took < Duration::from_secs(4),
        "the loss was noticed late: {took:?}"
    );
    assert_eq!(
        counter.get("4").await,
        0,
        "the handler ran on without its lock"
    );
    let mut status = StatusCode::SERVICE_UNAVAILABLE;
    for _ in 0..50 {
        status = pay(&url, "4", "").await.0;
        if status == StatusCode::OK {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, StatusCode::OK);
}

/// Redis out of memory (`maxmemory` reached, `noeviction`): the acquire script's write is
/// refused, the client gets 503; with memory back, service resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_memory_answers_503_then_recovers() {
    let server = RedisServer::spawn();
    let url = serve(app(
        RedisBackend::new(pool(&server.url())),
        Counter::Local(Default::default()),
        |layer| layer.max_wait(Duration::from_millis(100)),
    ))
    .await;
    assert_eq!(pay(&url, "5", "").await.0, StatusCode::OK);
    let () = server.query(
        cmd("CONFIG")
            .arg("SET")
            .arg("maxmemory-policy")
            .arg("noeviction"),
    );
    let () = server.query(cmd("CONFIG").arg("SET").arg("maxmemory").arg("1"));
    assert_eq!(pay(&url, "5", "").await.0, StatusCode::SERVICE_UNAVAILABLE);
    let () = server.query(cmd("CONFIG").arg("SET").arg("maxmemory").arg("0"));
    assert_eq!(pay(&url, "5", "").await.0, StatusCode::OK);
    assert_eq!(locks(&server), 0);
}

/// The URL points at a read-only replica: writes are refused (`READONLY`), the client
/// gets 503; once the replica is promoted, service resumes on a fresh connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_replica_answers_503_until_promoted() {
    let primary = RedisServer::spawn();
    let port = primary.port().to_string();
    let replica = RedisServer::spawn_with(&["--replicaof", "127.0.0.1", &port]);
    let url = serve(app(
        RedisBackend::new(pool(&replica.url())),
        Counter::Local(Default::default()),
        |layer| layer.max_wait(Duration::from_millis(100)),
    ))
    .await;
    assert_eq!(pay(&url, "6", "").await.0, StatusCode::SERVICE_UNAVAILABLE);
    let () = replica.query(cmd("REPLICAOF").arg("NO").arg("ONE"));
    assert_eq!(pay(&url, "6", "").await.0, StatusCode::OK);
    assert_eq!(locks(&replica), 0);
}
