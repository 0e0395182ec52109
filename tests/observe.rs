//! What operators see: metrics labelled by class (never by key), and a `lock` span per
//! locked request with its outcome. One global recorder and subscriber for this binary.

mod support;

use std::{
    io::Write,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use axum::{Router, body::Body, routing::post};
use deadpool_redis::redis;
use http::{Request, StatusCode};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use support::{RedisServer, pool};
use tower::ServiceExt;
use tower_redis_lock::{
    InMemoryBackend, LockBackend, LockKey, LockLayer, Locker, PathKey, RedisBackend,
    backend::Acquire,
};
use tracing_subscriber::fmt::format::FmtSpan;
use uuid::Uuid;

/// Log lines written by the test subscriber.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn observed() -> &'static (PrometheusHandle, Captured) {
    static OBSERVED: OnceLock<(PrometheusHandle, Captured)> = OnceLock::new();
    OBSERVED.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::set_global_recorder(recorder).expect("one recorder per test binary");
        let captured = Captured::default();
        let writer = captured.clone();
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_span_events(FmtSpan::CLOSE)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .init();
        (handle, captured)
    })
}

async fn call(router: &Router, uri: &str) -> StatusCode {
    let request = Request::post(uri).body(Body::empty()).unwrap();
    router.clone().oneshot(request).await.unwrap().status()
}

#[tokio::test]
async fn metrics_and_spans_tell_each_outcome_by_class() {
    let (metrics, logs) = observed();
    let backend = InMemoryBackend::new();
    let router = Router::new()
        .route(
            "/pay/{id}",
            post(|| async {
                tokio::time::sleep(Duration::from_millis(5)).await;
                "ok"
            }),
        )
        .route_layer(
            LockLayer::new(backend.clone(), PathKey::new("id"))
                .key_prefix("pay:")
                .max_wait(Duration::ZERO),
        );
    assert_eq!(call(&router, "/pay/secret-order-1").await, StatusCode::OK);
    assert_eq!(call(&router, "/pay/secret-order-2").await, StatusCode::OK);
    let token = Uuid::new_v4();
    let held = backend
        .try_acquire(&LockKey::from("pay:busy"), token, Duration::from_secs(30))
        .await;
    assert!(matches!(held, Ok(Acquire::Acquired { .. })));
    assert_eq!(call(&router, "/pay/busy").await, StatusCode::CONFLICT);

    let text = metrics.render();
    assert!(
        text.contains(r#"lock_requests_total{class="pay",outcome="acquired"} 2"#),
        "{text}"
    );
    assert!(
        text.contains(r#"lock_requests_total{class="pay",outcome="contended"} 1"#),
        "{text}"
    );
    assert!(text.contains("lock_wait_seconds"), "{text}");
    assert!(text.contains("lock_hold_seconds"), "{text}");
    assert!(
        !text.contains("secret-order"),
        "a raw key leaked into the metrics"
    );

    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let spans: Vec<_> = logs
        .lines()
        .filter(|line| line.contains("lock{") && line.contains("close"))
        .collect();
    assert!(
        spans
            .iter()
            .any(|line| line.contains("key=pay:secret-order-1")
                && line.contains("outcome=\"acquired\"")),
        "{logs}"
    );
    assert!(
        spans
            .iter()
            .any(|line| line.contains("key=pay:busy") && line.contains("outcome=\"contended\"")),
        "{logs}"
    );
    assert!(spans.iter().all(|line| line.contains("wait_ms=")), "{logs}");
}

/// Issue 11, finding 8. Lock keys carry a TTL, so under a `volatile-*` eviction policy
/// they are the first keys Redis evicts when memory runs out: the crate says so in the log
/// as soon as it connects, and this test shows why (a held lock evicted, a second holder
/// in while the first still believes it holds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volatile_eviction_policy_is_reported_because_it_evicts_held_locks() {
    let (_, logs) = observed();
    let server =
        RedisServer::spawn_with(&["--maxmemory", "2mb", "--maxmemory-policy", "volatile-lru"]);
    let backend = || RedisBackend::new(pool(&server.url()));
    let first = Locker::new(backend()).ttl(Duration::from_secs(30));
    let held = first.lock("order:1").await.unwrap();
    let warned = support::eventually(Duration::from_secs(5), || {
        let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
        logs.contains("volatile-lru") && logs.contains("held locks can vanish")
    })
    .await;
    assert!(warned, "no warning about the eviction policy");

    // Fill memory with keys without a TTL: the lock is the only key Redis may evict.
    let mut conn = server.connection();
    let filler = vec![b'x'; 16 * 1024];
    for i in 0..1_000 {
        let written: redis::RedisResult<()> = redis::cmd("SET")
            .arg(format!("filler:{i}"))
            .arg(&filler)
            .query(&mut conn);
        if written.is_err() {
            break; // OOM: nothing volatile left to evict
        }
    }
    let exists: i64 = server.query(redis::cmd("EXISTS").arg("lock:{order:1}"));
    assert_eq!(exists, 0, "the held lock was not evicted");
    let _: () = server.query(&mut redis::cmd("FLUSHDB")); // memory for the next holder
    let second = Locker::new(backend()).max_wait(Duration::ZERO);
    let intruder = second.lock("order:1").await;
    assert!(intruder.is_ok(), "{intruder:?}");
    assert!(
        !held.is_lost(),
        "the first holder cannot know before its next renewal"
    );
}

/// A key that requests wait for is counted in the locker's hot keys and exported (its
/// class, the key, the count); keys locked without contention are neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contended_key_shows_up_in_the_hot_keys() {
    let (metrics, _) = observed();
    let server = RedisServer::spawn();
    let locker = Locker::new(RedisBackend::new(pool(&server.url())))
        .key_prefix("sale:")
        .max_wait(Duration::from_secs(5));
    for n in 0..20 {
        let lock = locker.lock(format!("order-{n}")).await.expect("lock");
        lock.release().await;
    }
    assert_eq!(locker.hot_keys(), [], "uncontended keys were counted");
    // Two processes' worth of lockers, eight workers on one key.
    let other = Locker::new(RedisBackend::new(pool(&server.url())))
        .key_prefix("sale:")
        .max_wait(Duration::from_secs(5));
    let tasks: Vec<_> = (0..8)
        .map(|worker| {
            let locker = if worker % 2 == 0 { &locker } else { &other }.clone();
            tokio::spawn(async move {
                for _ in 0..10 {
                    let lock = locker.lock("sku-1").await.expect("lock");
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    lock.release().await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let hot = locker.hot_keys();
    assert_eq!(hot.len(), 1, "{hot:?}");
    assert_eq!(hot[0].key.as_str(), "sale:sku-1");
    assert!(hot[0].count >= 10, "{hot:?}"); // 40 acquisitions here, most waited
    let text = metrics.render();
    assert!(
        text.lines()
            .any(|line| line
                .starts_with(r#"lock_hot_key_contentions{class="sale",key="sale:sku-1"}"#)),
        "{text}"
    );
    assert!(!text.contains("order-"), "an uncontended key was exported");
}

/// Holds that come close to an unrenewed ttl warn (once in the log, every time in the
/// counter) and set the headroom gauge; the same holds with renewal do not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_near_an_unrenewed_ttl_are_reported() {
    let (metrics, logs) = observed();
    let hold = |locker: Locker<InMemoryBackend>| async move {
        for n in 0..3 {
            let lock = locker.lock(format!("k{n}")).await.expect("lock");
            // Over two thirds of the 300 ms ttl.
            tokio::time::sleep(Duration::from_millis(220)).await;
            lock.release().await;
        }
    };
    let ttl = Duration::from_millis(300);
    hold(
        Locker::new(InMemoryBackend::new())
            .metrics_class("slow_unrenewed")
            .ttl(ttl)
            .without_renewal(),
    )
    .await;
    hold(
        Locker::new(InMemoryBackend::new())
            .metrics_class("slow_renewed")
            .ttl(ttl),
    )
    .await;
    let text = metrics.render();
    assert!(
        text.contains(
            r#"lock_ttl_warnings_total{class="slow_unrenewed",reason="hold_near_ttl"} 3"#
        ),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|line| line.starts_with(r#"lock_ttl_headroom{class="slow_unrenewed"}"#)),
        "{text}"
    );
    assert!(!text.contains(r#"class="slow_renewed",reason"#), "{text}");
    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let warnings = logs
        .lines()
        .filter(|line| line.contains("WARN") && line.contains("class=slow_unrenewed"))
        .count();
    assert_eq!(warnings, 1, "{logs}");
}
