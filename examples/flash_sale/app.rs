//! The flash-sale service: its routes, its storage, and the locks that keep it honest.
//!
//! Shared by `main.rs` and the tests (`tests/flash_sale.rs` includes this file).

use std::{collections::HashMap, sync::Arc, time::Duration};

use axum::{
    Json, Router,
    body::Bytes,
    error_handling::HandleErrorLayer,
    extract::{Path, State},
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tower::{BoxError, ServiceBuilder};
use tower_redis_lock::{
    Held, LockBackend, LockLayer, PathParam,
    deadpool_redis::{Pool, redis},
    idempotency::{IdempotencyLayer, ResponseStore},
};
use uuid::Uuid;

/// At most this many buy requests run at once per instance; more are shed with 429.
pub const MAX_CONCURRENT_BUYS: usize = 256;

/// An item on sale.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    pub sku: String,
    pub stock: u64,
    pub sold: u64,
}

/// A sale the handler wants to write: the stock it read, minus what was bought.
pub struct Sale<'a> {
    pub sku: &'a str,
    pub fencing_token: u64,
    pub stock: u64,
    pub qty: u64,
    pub order_id: String,
    pub order: String,
}

/// Why a write failed.
#[derive(Debug)]
pub enum StoreError {
    /// A newer lock holder has written: this one's lock is stale.
    Fenced,
    /// The store cannot be reached.
    Unavailable(String),
}

/// Stock and orders: in Redis (per-SKU hashes), or in memory when there is no Redis.
#[derive(Clone)]
pub enum Store {
    Redis(Pool),
    Memory(Arc<Mutex<HashMap<String, MemoryItem>>>),
}

#[derive(Debug, Default)]
pub struct MemoryItem {
    stock: u64,
    sold: u64,
    fence: u64,
    orders: HashMap<String, String>,
}

/// Reads an item for a sale under fencing token `ARGV[1]`, and records the token as the
/// newest seen: from then on, writes by older holders are refused, even ones already on
/// their way. `{0, stock, sold}`, `{-1}` for a stale token, `{-2}` for an unknown item.
const READ: &str = r#"
local fence = tonumber(redis.call('HGET', KEYS[1], 'fence') or '0')
if tonumber(ARGV[1]) < fence then return {-1} end
if redis.call('EXISTS', KEYS[1]) == 0 then return {-2} end
redis.call('HSET', KEYS[1], 'fence', ARGV[1])
local item = redis.call('HMGET', KEYS[1], 'stock', 'sold')
return {0, tonumber(item[1]), tonumber(item[2])}
"#;

/// Sets the stock under fencing token `ARGV[1]`; returns 1 if the item is new, 0 if not,
/// -1 for a stale token.
const PUT: &str = r#"
local fence = tonumber(redis.call('HGET', KEYS[1], 'fence') or '0')
if tonumber(ARGV[1]) < fence then return -1 end
local created = 1 - redis.call('EXISTS', KEYS[1])
redis.call('HSET', KEYS[1], 'stock', ARGV[2], 'sold', 0, 'fence', ARGV[1])
redis.call('DEL', KEYS[2])
return created
"#;

/// Writes a sale only if its fencing token is not older than the newest seen for the item:
/// a lock holder that stalled past its lease cannot write over a newer holder's read.
const COMMIT: &str = r#"
local fence = tonumber(redis.call('HGET', KEYS[1], 'fence') or '0')
if tonumber(ARGV[1]) < fence then return -1 end
redis.call('HSET', KEYS[1], 'stock', ARGV[2], 'fence', ARGV[1])
redis.call('HINCRBY', KEYS[1], 'sold', ARGV[3])
redis.call('HSET', KEYS[2], ARGV[4], ARGV[5])
return 0
"#;

fn item_key(sku: &str) -> String {
    format!("sale:{{{sku}}}")
}

fn orders_key(sku: &str) -> String {
    format!("sale:{{{sku}}}:orders")
}

fn unavailable(err: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(err.to_string())
}

impl Store {
    /// Sets the stock and zeroes the sold count under the item's lock; `true` when the
    /// item is new. The fencing high-water mark only grows.
    pub async fn put(&self, sku: &str, stock: u64, fencing_token: u64) -> Result<bool, StoreError> {
        match self {
            Store::Redis(pool) => {
                let mut conn = pool.get().await.map_err(unavailable)?;
                let outcome: i64 = redis::Script::new(PUT)
                    .key(item_key(sku))
                    .key(orders_key(sku))
                    .arg(fencing_token)
                    .arg(stock)
                    .invoke_async(&mut conn)
                    .await
                    .map_err(unavailable)?;
                if outcome < 0 {
                    Err(StoreError::Fenced)
                } else {
                    Ok(outcome == 1)
                }
            }
            Store::Memory(items) => {
                let mut items = items.lock().await;
                let created = !items.contains_key(sku);
                let item = items.entry(sku.to_owned()).or_default();
                if fencing_token < item.fence {
                    return Err(StoreError::Fenced);
                }
                (item.stock, item.sold, item.fence) = (stock, 0, fencing_token);
                item.orders.clear();
                Ok(created)
            }
        }
    }

    /// The item, read for a sale: records `fencing_token` as the newest seen.
    pub async fn read_for_sale(
        &self,
        sku: &str,
        fencing_token: u64,
    ) -> Result<Option<Item>, StoreError> {
        match self {
            Store::Redis(pool) => {
                let mut conn = pool.get().await.map_err(unavailable)?;
                let reply: Vec<i64> = redis::Script::new(READ)
                    .key(item_key(sku))
                    .arg(fencing_token)
                    .invoke_async(&mut conn)
                    .await
                    .map_err(unavailable)?;
                match reply.as_slice() {
                    [0, stock, sold] => Ok(Some(Item {
                        sku: sku.to_owned(),
                        stock: stock.unsigned_abs(),
                        sold: sold.unsigned_abs(),
                    })),
                    [-2] => Ok(None),
                    _ => Err(StoreError::Fenced),
                }
            }
            Store::Memory(items) => {
                let mut items = items.lock().await;
                let Some(item) = items.get_mut(sku) else {
                    return Ok(None);
                };
                if fencing_token < item.fence {
                    return Err(StoreError::Fenced);
                }
                item.fence = fencing_token;
                Ok(Some(Item {
                    sku: sku.to_owned(),
                    stock: item.stock,
                    sold: item.sold,
                }))
            }
        }
    }

    pub async fn get(&self, sku: &str) -> Result<Option<Item>, StoreError> {
        match self {
            Store::Redis(pool) => {
                let mut conn = pool.get().await.map_err(unavailable)?;
                let (stock, sold): (Option<u64>, Option<u64>) = redis::cmd("HMGET")
                    .arg(item_key(sku))
                    .arg(&["stock", "sold"])
                    .query_async(&mut conn)
                    .await
                    .map_err(unavailable)?;
                Ok(stock.map(|stock| Item {
                    sku: sku.to_owned(),
                    stock,
                    sold: sold.unwrap_or(0),
                }))
            }
            Store::Memory(items) => Ok(items.lock().await.get(sku).map(|item| Item {
                sku: sku.to_owned(),
                stock: item.stock,
                sold: item.sold,
            })),
        }
    }

    pub async fn commit(&self, sale: &Sale<'_>) -> Result<(), StoreError> {
        let remaining = sale.stock - sale.qty;
        match self {
            Store::Redis(pool) => {
                let mut conn = pool.get().await.map_err(unavailable)?;
                let outcome: i64 = redis::Script::new(COMMIT)
                    .key(item_key(sale.sku))
                    .key(orders_key(sale.sku))
                    .arg(sale.fencing_token)
                    .arg(remaining)
                    .arg(sale.qty)
                    .arg(&sale.order_id)
                    .arg(&sale.order)
                    .invoke_async(&mut conn)
                    .await
                    .map_err(unavailable)?;
                if outcome < 0 {
                    Err(StoreError::Fenced)
                } else {
                    Ok(())
                }
            }
            Store::Memory(items) => {
                let mut items = items.lock().await;
                let item = items.entry(sale.sku.to_owned()).or_default();
                if sale.fencing_token < item.fence {
                    return Err(StoreError::Fenced);
                }
                item.fence = sale.fencing_token;
                item.stock = remaining;
                item.sold += sale.qty;
                item.orders
                    .insert(sale.order_id.clone(), sale.order.clone());
                Ok(())
            }
        }
    }
}

#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub metrics: Option<PrometheusHandle>,
}

/// A problem+json answer, like the lock layer's.
fn problem(status: StatusCode, detail: &str) -> Response {
    let body = serde_json::json!({
        "type": "about:blank",
        "title": status.canonical_reason().unwrap_or("Error"),
        "status": status.as_u16(),
        "detail": detail,
    });
    let mut response = (status, body.to_string()).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    response
}

fn store_failed(err: StoreError) -> Response {
    match err {
        StoreError::Fenced => {
            metrics::counter!("flash_sale_fenced_writes_total").increment(1);
            problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "the item's lock was lost before the sale was written",
            )
        }
        StoreError::Unavailable(err) => {
            tracing::warn!(%err, "store unavailable");
            let mut response = problem(StatusCode::SERVICE_UNAVAILABLE, "the store is unavailable");
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            response
        }
    }
}

/// Every write to an item is fenced; a backend without tokens is a wiring mistake.
fn no_fencing_tokens() -> Response {
    let detail = "the lock backend hands out no fencing tokens";
    problem(StatusCode::INTERNAL_SERVER_ERROR, detail)
}

#[derive(Deserialize)]
struct StockBody {
    stock: u64,
}

async fn put_item(
    State(state): State<AppState>,
    Path(sku): Path<String>,
    lock: Held,
    body: Bytes,
) -> Response {
    let Ok(StockBody { stock }) = serde_json::from_slice(&body) else {
        return problem(
            StatusCode::BAD_REQUEST,
            r#"expected {"stock": N} with N >= 0"#,
        );
    };
    let Some(fencing_token) = lock.fencing_token() else {
        return no_fencing_tokens();
    };
    match state.store.put(&sku, stock, fencing_token).await {
        Ok(true) => (
            StatusCode::CREATED,
            Json(Item {
                sku,
                stock,
                sold: 0,
            }),
        )
            .into_response(),
        Ok(false) => (
            StatusCode::OK,
            Json(Item {
                sku,
                stock,
                sold: 0,
            }),
        )
            .into_response(),
        Err(err) => store_failed(err),
    }
}

async fn get_item(State(state): State<AppState>, Path(sku): Path<String>) -> Response {
    match state.store.get(&sku).await {
        Ok(Some(item)) => Json(item).into_response(),
        Ok(None) => problem(StatusCode::NOT_FOUND, "no such item"),
        Err(err) => store_failed(err),
    }
}

#[derive(Deserialize)]
struct BuyBody {
    user: String,
    qty: u64,
}

/// Runs under the item's lock: read the stock, check it, write the sale with the lock's
/// fencing token.
async fn buy(
    State(state): State<AppState>,
    Path(sku): Path<String>,
    lock: Held,
    body: Bytes,
) -> Response {
    let Ok(BuyBody { user, qty }) = serde_json::from_slice::<BuyBody>(&body) else {
        return problem(
            StatusCode::BAD_REQUEST,
            r#"expected {"user": "...", "qty": q} with q >= 1"#,
        );
    };
    if qty == 0 || user.is_empty() {
        return problem(
            StatusCode::BAD_REQUEST,
            r#"expected {"user": "...", "qty": q} with q >= 1"#,
        );
    }
    let Some(fencing_token) = lock.fencing_token() else {
        return no_fencing_tokens();
    };
    let item = match state.store.read_for_sale(&sku, fencing_token).await {
        Ok(Some(item)) => item,
        Ok(None) => return problem(StatusCode::NOT_FOUND, "no such item"),
        Err(err) => return store_failed(err),
    };
    if item.stock < qty {
        metrics::counter!("flash_sale_sold_out_total").increment(1);
        return problem(StatusCode::GONE, "not enough stock left");
    }
    let order_id = Uuid::new_v4().to_string();
    let order = serde_json::json!({ "order_id": order_id, "user": user, "qty": qty }).to_string();
    let sale = Sale {
        sku: &sku,
        fencing_token,
        stock: item.stock,
        qty,
        order_id,
        order,
    };
    if let Err(err) = state.store.commit(&sale).await {
        return store_failed(err);
    }
    metrics::counter!("flash_sale_orders_total").increment(1);
    metrics::counter!("flash_sale_units_sold_total").increment(qty);
    let remaining = item.stock - qty;
    Json(serde_json::json!({ "order_id": sale.order_id, "sku": sku, "qty": qty, "remaining": remaining }))
        .into_response()
}

async fn metrics_text(State(state): State<AppState>) -> Response {
    match &state.metrics {
        Some(handle) => {
            let mut response = handle.render().into_response();
            let content_type = HeaderValue::from_static("text/plain; version=0.0.4");
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, content_type);
            response
        }
        None => problem(StatusCode::NOT_FOUND, "metrics are off"),
    }
}

/// Load shedding answers 429: the client may come back, and nothing failed.
async fn overloaded(err: BoxError) -> Response {
    metrics::counter!("flash_sale_shed_total").increment(1);
    let detail = format!("too many buyers at once ({err}); retry shortly");
    let mut response = problem(StatusCode::TOO_MANY_REQUESTS, &detail);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

/// Counts answers by route and status, for `/metrics`.
async fn count_answers(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or("unmatched", |path| path.as_str())
        .to_owned();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("http_responses_total", "route" => route, "status" => status).increment(1);
    response
}

/// The service. `locks` must hand out fencing tokens (`.fencing(true)`); `idempotency`
/// should not (each idempotency key would leave a fencing counter behind).
pub fn router<B>(locks: B, idempotency: B, state: AppState) -> Router
where
    B: LockBackend + ResponseStore,
{
    // One layer, so that a restock and the buys of one SKU share a line.
    let item_lock = LockLayer::new(locks, PathParam::new("sku"))
        .key_prefix("sku:")
        .max_wait(Duration::from_millis(500))
        .ttl(Duration::from_secs(5));
    let buy_route = post(buy).layer(
        ServiceBuilder::new()
            .layer(HandleErrorLayer::new(overloaded))
            .load_shed()
            .concurrency_limit(MAX_CONCURRENT_BUYS)
            .layer(IdempotencyLayer::shared_by_all_callers(idempotency))
            .layer(item_lock.clone()),
    );
    Router::new()
        .route(
            "/items/{sku}",
            get(get_item).put(put_item).route_layer(item_lock),
        )
        .route("/items/{sku}/buy", buy_route)
        .route("/metrics", get(metrics_text))
        .layer(axum::middleware::from_fn(count_answers))
        .with_state(state)
}
