//! Keys from hostile requests, against a spawned Redis: empty, 64 KiB, not UTF-8, or full
//! of braces and glob characters. Decision: keys are stored inside the hash tag
//! (`lock:{<prefix><key>}`, with `}` and `%` escaped as `%7D` and `%25` so nothing ends
//! the tag early), so braces and globs are safe and never collide; empty keys,
//! keys over `max_key_len` and header values that are not visible ASCII get 400, before
//! Redis is asked anything.

mod support;

use std::time::Duration;

use axum::{Router, routing::post};
use deadpool_redis::redis::cmd;
use http::{HeaderName, HeaderValue, StatusCode};
use support::{RedisServer, pool, serve};
use tower_redis_lock::{
    HeaderKey, LockBackend, LockKey, LockLayer, RedisBackend, backend::Acquire,
};
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_keys_are_refused_or_kept_apart() {
    let server = RedisServer::spawn();
    let backend = RedisBackend::new(pool(&server.url()));
    let layer = LockLayer::new(
        backend.clone(),
        HeaderKey::new(HeaderName::from_static("x-key")),
    )
    .key_prefix("x:")
    .max_wait(Duration::ZERO);
    let url = serve(
        Router::new()
            .route("/", post(|| async { "ok" }))
            .route_layer(layer),
    )
    .await;
    let client = reqwest::Client::new();
    let send = |value: HeaderValue| {
        let client = client.clone();
        let url = url.clone();
        async move {
            let response = client
                .post(format!("{url}/"))
                .header("x-key", value)
                .send()
                .await
                .unwrap();
            let status = response.status();
            (status, response.text().await.unwrap())
        }
    };

    let script_calls = || -> u64 {
        let info: String = server.query(cmd("INFO").arg("commandstats"));
        info.lines()
            .filter(|line| line.starts_with("cmdstat_eval"))
            .filter_map(|line| {
                line.split("calls=")
                    .nth(1)?
                    .split(',')
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .sum()
    };
    // Connect and load the scripts first, so that only the bad keys are measured.
    assert_eq!(
        send(HeaderValue::from_static("warm-up")).await.0,
        StatusCode::OK
    );
    let calls_before = script_calls();
    let (status, body) = send(HeaderValue::from_static("")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = send(HeaderValue::from_str(&"k".repeat(64 * 1024)).unwrap()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("longer than 512 bytes"), "{body}");
    let (status, _) = send(HeaderValue::from_bytes(b"caf\xe9").unwrap()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(script_calls(), calls_before, "bad keys reached Redis");

    // Braces and globs: a held `x:{1}` blocks only itself.
    let token = Uuid::new_v4();
    let held = backend
        .try_acquire(&LockKey::from("x:{1}"), token, Duration::from_secs(30))
        .await;
    assert!(matches!(held, Ok(Acquire::Acquired { .. })));
    // `}` is written `%7D`, so the braces hold the whole key (one Cluster slot).
    let exists: i64 = server.query(cmd("EXISTS").arg("lock:{x:{1%7D}"));
    assert_eq!(exists, 1, "the key is not stored as documented");
    assert_eq!(
        send(HeaderValue::from_static("{1}")).await.0,
        StatusCode::CONFLICT
    );
    for other in [
        "{1", "1}", "1", "{1}}", "*", "?", "[1]", "{*}", "x:{1}", "{1%7D", "%",
    ] {
        let (status, body) = send(HeaderValue::from_static(other)).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "{other:?} collided with {{1}}: {body}"
        );
    }
    assert!(
        backend
            .release(&LockKey::from("x:{1}"), token)
            .await
            .unwrap()
            .was_held
    );
    let keys: Vec<String> = server.query(cmd("KEYS").arg("lock:*"));
    assert!(keys.is_empty(), "locks left: {keys:?}");
}
