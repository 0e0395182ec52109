//! A soak against two app instances on one spawned Redis: 20,000 requests over 1,000 keys
//! from 128 concurrent clients, 10 % of them hanging up early and 5 % of the handlers
//! panicking. No two critical sections of one key may overlap, no lock may stay in Redis,
//! and nothing may stay behind per key in the app once the keys go idle.

mod support;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    extract::{Path, Query, State},
    routing::post,
};
use deadpool_redis::redis::cmd;
use support::{RedisServer, eventually, pool, serve};
use tower_http::catch_panic::CatchPanicLayer;
use tower_redis_lock::{LockLayer, PathKey, RedisBackend};

const REQUESTS: usize = 20_000;
const KEYS: usize = 1_000;
const CLIENTS: usize = 128;

/// Who is inside each key's critical section; entering an occupied one is a violation.
#[derive(Clone, Default)]
struct Sections {
    inside: Arc<Mutex<HashMap<String, Arc<AtomicBool>>>>,
    violations: Arc<AtomicUsize>,
}

/// Leaves the section when dropped: at the end, on a panic, or when the request is dropped.
struct Inside(Arc<AtomicBool>);

impl Drop for Inside {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

async fn section(
    State(sections): State<Sections>,
    Path(key): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> &'static str {
    let flag = sections
        .inside
        .lock()
        .unwrap()
        .entry(key)
        .or_default()
        .clone();
    if flag.swap(true, Ordering::SeqCst) {
        sections.violations.fetch_add(1, Ordering::SeqCst);
    }
    let _inside = Inside(flag);
    let work: u64 = params
        .get("work_ms")
        .and_then(|w| w.parse().ok())
        .unwrap_or(0);
    tokio::time::sleep(Duration::from_millis(work)).await;
    if params.contains_key("panic") {
        panic!("handler panicked on purpose");
    }
    "ok"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak() {
    // A thousand deliberate panics would bury the log; report only the others.
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !info.to_string().contains("on purpose") {
            report(info);
        }
    }));
    let server = RedisServer::spawn();
    let sections = Sections::default();
    let mut urls = Vec::new();
    let mut layers = Vec::new();
    for _ in 0..2 {
        let backend = RedisBackend::new(pool(&server.url()))
            .notify_with(deadpool_redis::redis::Client::open(server.url()).unwrap());
        let layer = LockLayer::new(backend, PathKey::new("key"))
            .key_prefix("soak:")
            .max_wait(Duration::from_secs(5));
        layers.push(layer.clone());
        let router = Router::new()
            .route("/{key}", post(section))
            .route_layer(layer)
            .layer(CatchPanicLayer::new())
            .with_state(sections.clone());
        urls.push(serve(router).await);
    }
    let client = reqwest::Client::new();
    let next = Arc::new(AtomicUsize::new(0));
    let answered = Arc::new(Mutex::new(HashMap::<u16, usize>::new()));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (client, urls, next, answered) =
                (client.clone(), urls.clone(), next.clone(), answered.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= REQUESTS {
                        return;
                    }
                    let key = fastrand::usize(0..KEYS);
                    let mut query = format!("work_ms={}", fastrand::u64(0..3));
                    if fastrand::u8(0..100) < 5 {
                        query.push_str("&panic=1");
                    }
                    let mut request = client.post(format!("{}/{key}?{query}", urls[i % 2]));
                    if fastrand::u8(0..100) < 10 {
                        request = request.timeout(Duration::from_millis(fastrand::u64(1..4)));
                    }
                    let status = request
                        .send()
                        .await
                        .map_or(0, |response| response.status().as_u16());
                    *answered.lock().unwrap().entry(status).or_default() += 1;
                }
            })
        })
        .collect();
    for client in clients {
        client.await.unwrap();
    }
    let answered = answered.lock().unwrap().clone();
    eprintln!("soak answers by status (0 = client hung up): {answered:?}");
    assert_eq!(
        sections.violations.load(Ordering::SeqCst),
        0,
        "critical sections overlapped"
    );
    assert!(
        answered.get(&200).copied().unwrap_or(0) > REQUESTS / 2,
        "{answered:?}"
    );
    assert!(
        answered.contains_key(&500) && answered.contains_key(&0),
        "the soak was not mixed: {answered:?}"
    );
    assert!(!answered.contains_key(&503), "{answered:?}");

    let locks = || -> usize {
        let keys: Vec<String> = server.query(cmd("KEYS").arg("lock:*"));
        keys.len()
    };
    assert!(
        eventually(Duration::from_secs(10), || locks() == 0).await,
        "{} locks left in Redis",
        locks()
    );
    assert!(
        eventually(Duration::from_secs(5), || layers
            .iter()
            .all(|l| l.keys_in_use() == 0))
        .await,
        "the app kept state for idle keys"
    );
}
