//! A small payment service whose `pay` route is locked per order.
//!
//! ```text
//! cargo run --example basic                        # in-process locks
//! REDIS_URL=redis://127.0.0.1:6379 cargo run --example basic
//! curl -X POST 'http://127.0.0.1:3000/orders/42/pay?work_ms=2000' &
//! curl -i -X POST 'http://127.0.0.1:3000/orders/42/pay'   # 409 while the first runs
//! ```
//!
//! `REDIS_URL` picks the Redis server (unset or unreachable: the in-process backend, which
//! locks within this process only); `ADDR` the listening address (default 127.0.0.1:3000).

use std::time::Duration;

use axum::{
    Json, Router,
    extract::{Path, Query},
    http::{StatusCode, header},
    response::IntoResponse,
    routing::post,
};
use serde::Deserialize;
use tower_redis_lock::{
    Held, InMemoryBackend, LockBackend, LockLayer, PathKey, RedisBackend,
    deadpool_redis::{self, Runtime},
};

/// The longest simulated payment, in milliseconds.
const MAX_WORK_MS: u64 = 10_000;

#[derive(Deserialize)]
struct PayParams {
    /// How long the simulated payment provider takes (default 50 ms).
    work_ms: Option<u64>,
}

async fn pay(
    Path(order_id): Path<String>,
    Query(params): Query<PayParams>,
    lock: Held,
) -> Result<Json<serde_json::Value>, impl IntoResponse> {
    let work_ms = params.work_ms.unwrap_or(50);
    if work_ms > MAX_WORK_MS {
        let problem = serde_json::json!({
            "type": "about:blank",
            "title": "Bad Request",
            "status": 400,
            "detail": format!("work_ms must be at most {MAX_WORK_MS}"),
        });
        return Err((
            StatusCode::BAD_REQUEST,
            [(header::CONTENT_TYPE, "application/problem+json")],
            problem.to_string(),
        ));
    }
    // The payment provider is slow; the lock keeps a second payment of this order out.
    tokio::time::sleep(Duration::from_millis(work_ms)).await;
    tracing::info!(key = %lock.key(), token = %lock.token(), "paid");
    // The fencing token goes with every write the lock protects: a payment store that
    // refuses tokens older than the newest it saw cannot be written by a stale holder.
    Ok(Json(serde_json::json!({
        "order_id": order_id,
        "paid": true,
        "fencing_token": lock.fencing_token(),
    })))
}

fn app<B: LockBackend>(backend: B) -> Router {
    Router::new()
        .route("/orders/{order_id}/pay", post(pay))
        .route_layer(
            LockLayer::new(backend, PathKey::new("order_id"))
                .key_prefix("order:")
                .max_wait(Duration::from_millis(100)),
        )
}

/// A backend on `REDIS_URL` if it answers a PING within a second.
async fn redis_backend(url: &str) -> Result<RedisBackend, String> {
    let pool = deadpool_redis::Config::from_url(url)
        .create_pool(Some(Runtime::Tokio1))
        .map_err(|err| err.to_string())?;
    let ping = async {
        let mut conn = pool.get().await.map_err(|err| err.to_string())?;
        deadpool_redis::redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map_err(|err| err.to_string())
    };
    match tokio::time::timeout(Duration::from_secs(1), ping).await {
        Ok(Ok(_)) => Ok(RedisBackend::new(pool).fencing(true)),
        Ok(Err(err)) => Err(err),
        Err(_) => Err("no answer within 1 s".to_owned()),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let addr = std::env::var("ADDR").unwrap_or_else(|_| "127.0.0.1:3000".to_owned());
    let router = match std::env::var("REDIS_URL") {
        Err(_) => {
            println!("REDIS_URL is not set: using the in-process lock backend");
            app(InMemoryBackend::new().fencing(true))
        }
        Ok(url) => match redis_backend(&url).await {
            Ok(backend) => {
                println!("locking on Redis at {url}");
                app(backend)
            }
            Err(err) => {
                println!(
                    "Redis at {url} is unreachable ({err}): using the in-process lock backend"
                );
                app(InMemoryBackend::new().fencing(true))
            }
        },
    };
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, router).await?;
    Ok(())
}
