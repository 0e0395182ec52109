//! A flash sale where overselling and double charging cannot happen: stock per SKU, each
//! buy under the SKU's lock, writes fenced by the lock's token, orders keyed by buyer and
//! idempotency key (a repeated commit is a no-op), retries made safe by
//! `IdempotencyLayer`, and overload shed with 429.
//!
//! ```text
//! REDIS_URL=redis://127.0.0.1:6379 cargo run --release --example flash_sale
//! curl -X PUT localhost:3000/items/tee -d '{"stock": 100}'
//! curl -X POST localhost:3000/items/tee/restock -d '{"add": 50}'
//! curl -X POST localhost:3000/items/tee/buy -H 'X-User: ann' -H 'Idempotency-Key: 7f1c' -d '{"qty": 1}'
//! cargo run --release --example flash_sale_load -- --url http://127.0.0.1:3000 --buyers 2000 --stock 100
//! ```
//!
//! `REDIS_URL` names the Redis to sell from; without it the service runs on the
//! in-process lock backend and in-memory stock (one instance only). With it, the service
//! never falls back: while Redis is unreachable it answers 503 and keeps trying it on
//! every request. `ADDR` (default `127.0.0.1:3000`).

#[path = "app.rs"]
mod app;

use std::time::Duration;

use metrics_exporter_prometheus::PrometheusBuilder;
use tower_redis_lock::{
    InMemoryBackend, RedisBackend,
    deadpool_redis::{self, Runtime, Timeouts},
};

/// A pool on `url` whose every wait is bounded: a request never hangs on the store.
fn pool(url: &str) -> Result<deadpool_redis::Pool, String> {
    let mut config = deadpool_redis::Config::from_url(url);
    let mut pool_config = deadpool_redis::PoolConfig::new(64);
    pool_config.timeouts = Timeouts {
        wait: Some(Duration::from_secs(1)),
        create: Some(Duration::from_secs(1)),
        recycle: Some(Duration::from_secs(1)),
    };
    config.pool = Some(pool_config);
    config
        .create_pool(Some(Runtime::Tokio1))
        .map_err(|err| err.to_string())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let metrics = Some(PrometheusBuilder::new().install_recorder()?);
    let addr = std::env::var("ADDR").unwrap_or_else(|_| "127.0.0.1:3000".to_owned());
    let router = match std::env::var("REDIS_URL") {
        Ok(url) => {
            // No probe at start-up: Redis may be down for a moment, and an instance that
            // fell back to memory would sell on its own for the rest of its life. Pools
            // connect on demand, so requests get 503 until Redis answers.
            let backend = RedisBackend::from_url(&url)?
                .command_timeout(Duration::from_millis(500))
                .fencing(true);
            println!("selling from Redis at {url}");
            let idempotency = backend.clone().fencing(false);
            let state = app::AppState {
                store: app::Store::Redis(pool(&url)?),
                metrics,
            };
            app::router(backend, idempotency, state)
        }
        Err(_) => {
            println!("no REDIS_URL: selling from memory, locks in-process (one instance only)");
            let store = app::Store::Memory(Default::default());
            let backend = InMemoryBackend::new();
            let state = app::AppState { store, metrics };
            app::router(backend.clone().fencing(true), backend, state)
        }
    };
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, router).await?;
    Ok(())
}
