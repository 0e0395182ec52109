//! The one-Redis protocol and its faults, against servers spawned by each test: the key
//! layout, a server killed and restarted, a server frozen, scripts flushed.

mod support;

use std::time::{Duration, Instant};

use deadpool_redis::redis::cmd;
use http::StatusCode;
use support::{Counter, RedisServer, app, eventually, pool, serve};
use tower_redis_lock::{LockBackend, LockKey, RedisBackend, backend::Acquire};
use uuid::Uuid;

fn backend(server: &RedisServer) -> RedisBackend {
    RedisBackend::new(pool(&server.url())).command_timeout(Duration::from_millis(500))
}

async fn pay(url: &str, order: &str, query: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{url}/orders/{order}/pay?{query}"))
        .send()
        .await
        .expect("request")
}

/// While a request holds its lock, Redis has `lock:{order:<id>}` = the owner's token,
/// with a lease no longer than the ttl; afterwards the key is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_key_layout_and_value() {
    let server = RedisServer::spawn();
    let router = app(
        backend(&server),
        Counter::Redis(pool(&server.url())),
        |layer| layer.ttl(Duration::from_secs(20)),
    );
    let url = serve(router).await;
    let request = tokio::spawn({
        let url = url.clone();
        async move { pay(&url, "31", "work_ms=800").await.status() }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let token: String = server.query(cmd("GET").arg("lock:{order:31}"));
    assert!(
        Uuid::parse_str(&token).is_ok(),
        "value {token:?} is not a UUID token"
    );
    let pttl: i64 = server.query(cmd("PTTL").arg("lock:{order:31}"));
    assert!(pttl > 0 && pttl <= 20_000, "lease {pttl} ms");
    assert_eq!(request.await.unwrap(), StatusCode::OK);
    let exists: i64 = server.query(cmd("EXISTS").arg("lock:{order:31}"));
    assert_eq!(exists, 0, "the lock outlived its request");
}

/// Redis killed: requests get 503 with `Retry-After` within a bounded time, never run
/// the handler; a new server on the same port brings success back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_answers_503_then_recovers() {
    let mut server = RedisServer::spawn();
    let counter = Counter::Local(Default::default());
    let router = app(backend(&server), counter.clone(), |layer| {
        layer.max_wait(Duration::from_millis(200))
    });
    let url = serve(router).await;
    assert_eq!(pay(&url, "1", "").await.status(), StatusCode::OK);

    server.kill();
    let started = Instant::now();
    let response = pay(&url, "1", "").await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(response.headers()["retry-after"], "1");
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    assert_eq!(counter.get("1").await, 1, "a handler ran without its lock");

    server.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = pay(&url, "1", "").await.status();
        if status == StatusCode::OK {
            break;
        }
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(Instant::now() < deadline, "no recovery after restart");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A frozen Redis (SIGSTOP) accepts connections and never answers: the command timeout
/// turns that into 503 instead of a hung request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_redis_answers_503_within_the_timeout() {
    let server = RedisServer::spawn();
    let router = app(
        backend(&server),
        Counter::Local(Default::default()),
        |layer| layer.max_wait(Duration::from_millis(200)),
    );
    let url = serve(router).await;
    assert_eq!(pay(&url, "1", "").await.status(), StatusCode::OK);

    server.pause();
    let started = Instant::now();
    let status = pay(&url, "1", "").await.status();
    let elapsed = started.elapsed();
    server.resume();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    // max_wait 200 ms + one 500 ms command timeout, with room for a slow machine.
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
    assert_eq!(
        pay(&url, "1", "").await.status(),
        StatusCode::OK,
        "no recovery after SIGCONT"
    );
}

/// The release is bounded by the command timeout alone when that is no longer than the
/// release wait (no timer of the locker's own, see `Locker::release_timeout`): a Redis
/// that freezes while a handler works delays its response by about the command timeout,
/// never for good, and the release goes on in the background once Redis is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_that_redis_does_not_answer_delays_the_response_by_the_command_timeout() {
    let server = RedisServer::spawn();
    // The release wait (default 1 s) is longer than this backend's 500 ms command timeout.
    let router = app(
        backend(&server),
        Counter::Local(Default::default()),
        |layer| layer,
    );
    let url = serve(router).await;
    let request = tokio::spawn({
        let url = url.clone();
        async move { pay(&url, "frozen", "work_ms=800").await.status() }
    });
    let exists = || server.query::<i64>(cmd("EXISTS").arg("lock:{order:frozen}")) == 1;
    assert!(
        eventually(Duration::from_secs(2), exists).await,
        "the handler never held its lock"
    );
    server.pause();
    let paused = Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(10), request)
        .await
        .expect("the response never came")
        .unwrap();
    let waited = paused.elapsed();
    server.resume();
    assert_eq!(status, StatusCode::OK);
    // The rest of the work (under 800 ms) and one 500 ms command timeout, with room.
    assert!(waited < Duration::from_secs(5), "took {waited:?}");
    assert!(
        eventually(Duration::from_secs(3), || !exists()).await,
        "the lock outlived its request once Redis was back"
    );
}

/// `SCRIPT FLUSH` (as after a restart or failover) makes EVALSHA fail with NOSCRIPT; the
/// backend loads the script again and carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushed_scripts_are_reloaded() {
    let server = RedisServer::spawn();
    let backend = backend(&server);
    let key = LockKey::from("noscript");
    for _ in 0..3 {
        let () = server.query(cmd("SCRIPT").arg("FLUSH"));
        let token = Uuid::new_v4();
        assert_eq!(
            backend
                .try_acquire(&key, token, Duration::from_secs(5))
                .await
                .unwrap(),
            Acquire::Acquired {
                fencing_token: None
            }
        );
        let () = server.query(cmd("SCRIPT").arg("FLUSH"));
        assert!(
            backend
                .extend(&key, token, Duration::from_secs(5))
                .await
                .unwrap()
        );
        let () = server.query(cmd("SCRIPT").arg("FLUSH"));
        assert!(backend.release(&key, token).await.unwrap().was_held);
    }
}

/// A key someone wrote without expiry says nothing about when it frees: the answer falls
/// back to the `Retry-After` hint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_key_without_ttl_is_contended_with_the_hint() {
    let server = RedisServer::spawn();
    let () = server.query(cmd("SET").arg("lock:{order:5}").arg("someone-else"));
    let router = app(
        backend(&server),
        Counter::Local(Default::default()),
        |layer| {
            layer
                .max_wait(Duration::from_millis(100))
                .retry_after_cap(Duration::from_secs(3))
        },
    );
    let url = serve(router).await;
    let response = pay(&url, "5", "").await;
    assert_eq!(response.status(), StatusCode::CONFLICT);
    assert_eq!(response.headers()["retry-after"], "3");
    let value: String = server.query(cmd("GET").arg("lock:{order:5}"));
    assert_eq!(value, "someone-else", "a lock we do not own was touched");
}

/// The app's pool is exhausted (its only connection is checked out elsewhere) when the
/// backend needs a connection: the pool's bounded wait ends in 503, not a hung request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_pool_answers_503() {
    let server = RedisServer::spawn();
    let mut config = deadpool_redis::Config::from_url(server.url());
    let mut pool_config = deadpool_redis::PoolConfig::new(1);
    pool_config.timeouts.wait = Some(Duration::from_millis(200));
    config.pool = Some(pool_config);
    let pool = config
        .create_pool(Some(deadpool_redis::Runtime::Tokio1))
        .unwrap();
    let busy = pool.get().await.unwrap();

    let router = app(
        RedisBackend::new(pool),
        Counter::Local(Default::default()),
        |layer| layer.max_wait(Duration::from_millis(100)),
    );
    let url = serve(router).await;
    let started = Instant::now();
    let response = pay(&url, "1", "").await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );

    drop(busy);
    assert_eq!(pay(&url, "1", "").await.status(), StatusCode::OK);
}

/// Issue 11, finding 7. Every duration setting at its extremes: `Duration::MAX` (which a
/// user may pass to mean "forever") and the smallest accepted value. Redis refuses a
/// `PX` beyond its range, so the lease is clamped; nothing may turn into a 503 or a panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_duration_setting_takes_its_extremes() {
    let server = RedisServer::spawn();
    let forever = Duration::MAX;
    let huge_backend = RedisBackend::new(pool(&server.url())).command_timeout(forever);
    let holder = tokio::spawn({
        let url = serve(app(
            huge_backend,
            Counter::Local(Default::default()),
            |layer| {
                layer
                    .ttl(forever)
                    .max_wait(forever)
                    .backoff(forever, forever)
                    .retry_after_cap(forever)
                    .release_timeout(forever)
                    .renew_every(forever)
            },
        ))
        .await;
        async move { pay(&url, "x", "work_ms=600").await }
    });
    // The lease Redis got is the clamped one: positive, and far beyond any real ttl.
    let mut pttl = -2;
    for _ in 0..50 {
        pttl = server.query(cmd("PTTL").arg("lock:{order:x}"));
        if pttl > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(pttl > 100 * 365 * 24 * 3600 * 1000_i64, "PTTL {pttl}");

    // A contended request with the smallest settings, then with huge hints.
    let smallest = serve(app(
        backend(&server),
        Counter::Local(Default::default()),
        |layer| {
            layer
                .ttl(Duration::from_millis(10))
                .max_wait(Duration::ZERO)
                .backoff(Duration::from_nanos(1), Duration::from_nanos(1))
                .retry_after_cap(Duration::ZERO)
                .release_timeout(Duration::ZERO)
                .renew_every(Duration::from_nanos(1))
        },
    ))
    .await;
    let contended = pay(&smallest, "x", "").await;
    assert_eq!(contended.status(), StatusCode::CONFLICT);
    assert_eq!(contended.headers()["retry-after"], "1");
    let hinted = serve(app(
        backend(&server),
        Counter::Local(Default::default()),
        |layer| layer.max_wait(Duration::ZERO).retry_after_cap(forever),
    ))
    .await;
    let contended = pay(&hinted, "x", "").await;
    assert_eq!(contended.status(), StatusCode::CONFLICT);
    let retry_after: u64 = contended.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after > 1, "the holder's lease is long: {retry_after}");

    assert_eq!(holder.await.unwrap().status(), StatusCode::OK);
    let left: i64 = server.query(cmd("EXISTS").arg("lock:{order:x}"));
    assert_eq!(left, 0, "the lock outlived its request");
}

/// A ttl shorter than the drift margin could never be held: refused when the layer is built.
#[test]
#[should_panic(expected = "ttl must be at least 10 ms")]
fn a_ttl_under_ten_milliseconds_is_refused() {
    let _ = tower_redis_lock::LockLayer::new(
        tower_redis_lock::InMemoryBackend::new(),
        |_: &http::request::Parts| Some("k"),
    )
    .ttl(Duration::from_millis(9));
}
