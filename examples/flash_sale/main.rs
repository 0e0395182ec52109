//! A flash sale where overselling, double charging and lost updates cannot happen: stock
//! per SKU, each buy under the SKU's lock, writes fenced by the lock's token, retries made
//! safe by idempotency keys, and overload shed with 429.
//!
//! ```text
//! cargo run --release --example flash_sale
//! curl -X PUT localhost:3000/items/tee -d '{"stock": 100}'
//! curl -X POST localhost:3000/items/tee/buy -H 'Idempotency-Key: 7f1c' -d '{"user": "ann", "qty": 1}'
//! cargo run --release --example flash_sale_load -- --url http://127.0.0.1:3000 --buyers 2000 --stock 100
//! ```
//!
//! `REDIS_URL` (default `redis://127.0.0.1:6379`) and `ADDR` (default `127.0.0.1:3000`).
//! Without a reachable Redis it runs on the in-process lock backend and in-memory stock.

#[path = "app.rs"]
mod app;

use std::time::Duration;

use metrics_exporter_prometheus::PrometheusBuilder;
use tower_redis_lock::{
    InMemoryBackend, RedisBackend,
    deadpool_redis::{self, Runtime, redis},
};

/// A Redis backend and store on `url`, if it answers a PING within a second.
async fn connect(url: &str) -> Result<(RedisBackend, deadpool_redis::Pool), String> {
    let pool = deadpool_redis::Config::from_url(url)
        .create_pool(Some(Runtime::Tokio1))
        .map_err(|err| err.to_string())?;
    let ping = async {
        let mut conn = pool.get().await.map_err(|err| err.to_string())?;
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map_err(|err| err.to_string())
    };
    tokio::time::timeout(Duration::from_secs(1), ping)
        .await
        .map_err(|_| "no answer within 1 s".to_owned())??;
    let backend = RedisBackend::from_url(url)
        .map_err(|err| err.to_string())?
        .fencing(true);
    Ok((backend, pool))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let metrics = Some(PrometheusBuilder::new().install_recorder()?);
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let addr = std::env::var("ADDR").unwrap_or_else(|_| "127.0.0.1:3000".to_owned());
    let router = match connect(&url).await {
        Ok((backend, pool)) => {
            println!("selling from Redis at {url}");
            let idempotency = backend.clone().fencing(false);
            let state = app::AppState {
                store: app::Store::Redis(pool),
                metrics,
            };
            app::router(backend, idempotency, state)
        }
        Err(err) => {
            println!(
                "Redis at {url} is unreachable ({err}): selling from memory, locks in-process"
            );
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
