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

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

/// Buckets of the lock's wait and hold histograms, in seconds: what the dashboard and the
/// rules in `examples/flash_sale/ops/` read (`_bucket` series; summaries otherwise).
const SECONDS_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[tokio::main]
async fn main() -> Result<(), tower::BoxError> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let metrics = Some(
        PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS_BUCKETS)?
            .install_recorder()?,
    );
    let addr = std::env::var("ADDR").unwrap_or_else(|_| "127.0.0.1:3000".to_owned());
    let redis_url = std::env::var("REDIS_URL").ok();
    let router = app::service(redis_url.as_deref(), metrics)?;
    match &redis_url {
        Some(url) => println!("selling from Redis at {url}"),
        None => println!("no REDIS_URL: selling from memory, locks in-process (one instance only)"),
    }
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, router).await?;
    Ok(())
}
