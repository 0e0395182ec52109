//! Leases under faults, against Redis servers spawned by each test: a frozen server past
//! the lease (abort and signal policies), and a lock deleted or overwritten behind the
//! holder's back.

mod support;

use std::{
    sync::OnceLock,
    time::{Duration, Instant},
};

use axum::{Router, routing::post};
use deadpool_redis::redis::cmd;
use http::StatusCode;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use support::{Counter, RedisServer, app, pool, serve};
use tower_redis_lock::{Held, LockLayer, LossPolicy, PathKey, RedisBackend};

const TTL: Duration = Duration::from_secs(1);

fn backend(server: &RedisServer) -> RedisBackend {
    RedisBackend::new(pool(&server.url())).command_timeout(Duration::from_millis(300))
}

/// Redis frozen while a handler runs: renewals cannot get through, so at the lease
/// deadline the layer drops the handler and answers 503; the handler's write, due after
/// the deadline, never happens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_drops_the_handler_when_the_lease_runs_out() {
    let server = RedisServer::spawn();
    let counter = Counter::Local(Default::default());
    let url = serve(app(backend(&server), counter.clone(), |layer| {
        layer.ttl(TTL)
    }))
    .await;

    let started = Instant::now();
    let request = tokio::spawn({
        let url = url.clone();
        async move {
            let response = reqwest::Client::new()
                .post(format!("{url}/orders/1/pay?work_ms=3000"))
                .send()
                .await
                .unwrap();
            (
                response.status(),
                started.elapsed(),
                response.text().await.unwrap(),
            )
        }
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    server.pause();
    let (status, elapsed, body) = request.await.unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("expired"), "{body}");
    assert!(
        elapsed < TTL + Duration::from_millis(1500),
        "lost lock noticed late: {elapsed:?}"
    );

    // Past the moment the handler would have written: it never did.
    tokio::time::sleep(Duration::from_millis(3500).saturating_sub(started.elapsed())).await;
    server.resume();
    assert_eq!(
        counter.get("1").await,
        0,
        "the handler ran on without its lock"
    );
}

/// The same fault under `Signal`: the handler learns of the loss and answers its own way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signal_lets_the_handler_decide() {
    async fn careful(lock: Held) -> (StatusCode, &'static str) {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(3)) => (StatusCode::OK, "committed"),
            _ = lock.lost() => {
                assert!(lock.is_lost());
                (StatusCode::CONFLICT, "lock lost; rolled back")
            }
        }
    }
    let server = RedisServer::spawn();
    let layer = LockLayer::new(backend(&server), PathKey::new("id"))
        .ttl(TTL)
        .on_lock_lost(LossPolicy::Signal);
    let url = serve(
        Router::new()
            .route("/careful/{id}", post(careful))
            .route_layer(layer),
    )
    .await;

    let started = Instant::now();
    let request = tokio::spawn(async move {
        reqwest::Client::new()
            .post(format!("{url}/careful/1"))
            .send()
            .await
            .unwrap()
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    server.pause();
    let response = request.await.unwrap();
    let elapsed = started.elapsed();
    server.resume();
    assert_eq!(response.status(), StatusCode::CONFLICT);
    assert_eq!(response.text().await.unwrap(), "lock lost; rolled back");
    assert!(
        elapsed < TTL + Duration::from_millis(1500),
        "lost lock noticed late: {elapsed:?}"
    );
}

/// A lock deleted (or overwritten by another owner) behind the holder's back is noticed
/// at the next renewal, long before the handler ends; the holder's release then leaves
/// the other owner's lock alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_taken_behind_our_back_is_noticed_at_the_next_renewal() {
    let server = RedisServer::spawn();
    let router = app(
        backend(&server),
        Counter::Local(Default::default()),
        |layer| {
            layer
                .ttl(Duration::from_secs(5))
                .renew_every(Duration::from_millis(200))
        },
    );
    let url = serve(router).await;
    let client = reqwest::Client::new();

    for (order, tamper) in [
        ("10", &["DEL"][..]),
        ("11", &["SET", "intruder", "PX", "60000"][..]),
    ] {
        let started = Instant::now();
        let request = client
            .post(format!("{url}/orders/{order}/pay?work_ms=3000"))
            .send();
        let tampering = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let key = format!("lock:{{order:{order}}}");
            let exists: i64 = server.query(cmd("EXISTS").arg(&key));
            assert_eq!(exists, 1, "the lock should be held by now");
            let _: deadpool_redis::redis::Value =
                server.query(cmd(tamper[0]).arg(&key).arg(&tamper[1..]));
        };
        let (response, ()) = tokio::join!(request, tampering);
        let response = response.unwrap();
        assert_eq!(
            response.status(),
            StatusCode::SERVICE_UNAVAILABLE,
            "after {tamper:?}"
        );
        assert!(response.text().await.unwrap().contains("taken away"));
        assert!(
            started.elapsed() < Duration::from_millis(2000),
            "noticed late: {:?}",
            started.elapsed()
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let intruder: String = server.query(cmd("GET").arg("lock:{order:11}"));
    assert_eq!(
        intruder, "intruder",
        "our release deleted someone else's lock"
    );
}

/// The metrics of this test binary.
fn metrics() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::set_global_recorder(recorder).expect("one recorder per test binary");
        handle
    })
}

/// `lock_lost_total` of `class`, 0 before the first loss.
fn lost_total(class: &str) -> u64 {
    let label = format!("lock_lost_total{{class=\"{class}\"}} ");
    metrics()
        .render()
        .lines()
        .find_map(|line| line.strip_prefix(&label)?.trim().parse().ok())
        .unwrap_or(0)
}

/// Issue 11, finding 2. A handler that blocks its thread past the lease (a synchronous
/// driver, heavy CPU) and finishes in the same poll gets past the watchdog, which is
/// polled only between the handler's polls. Meanwhile a second instance takes the
/// expired lock. The first request must not answer 2xx, and the loss must be counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_blocks_past_its_lease_does_not_answer_success() {
    async fn blocking() -> &'static str {
        std::thread::sleep(Duration::from_millis(1500));
        "done"
    }
    let server = RedisServer::spawn();
    let class = "blocking";
    let before = lost_total(class);
    let instance = || {
        let layer = LockLayer::new(backend(&server), PathKey::new("id"))
            .ttl(TTL)
            .max_wait(Duration::from_secs(3))
            .metrics_class(class);
        Router::new()
            .route("/block/{id}", post(blocking))
            .route("/quick/{id}", post(|| async { "quick" }))
            .route_layer(layer)
    };
    let (first, second) = (serve(instance()).await, serve(instance()).await);
    let client = reqwest::Client::new();
    let blocked = tokio::spawn({
        let client = client.clone();
        async move { client.post(format!("{first}/block/1")).send().await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The lease ends at 1 s, unrenewed: the second instance gets the lock then.
    let overlapping = client
        .post(format!("{second}/quick/1"))
        .send()
        .await
        .unwrap();
    assert_eq!(overlapping.status(), StatusCode::OK);

    let blocked = blocked.await.unwrap().unwrap();
    assert_eq!(blocked.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = blocked.text().await.unwrap();
    assert!(body.contains("the lock expired"), "{body}");
    assert_eq!(lost_total(class), before + 1, "the loss was not counted");
}
