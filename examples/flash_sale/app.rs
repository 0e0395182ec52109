//! The flash-sale service: its routes, its storage, and the locks that keep it honest.
//!
//! Shared by `main.rs` and the tests (`tests/flash_sale.rs` includes this file).

use std::{collections::HashMap, sync::Arc, time::Duration};

use axum::{
    Json, Router,
    body::Bytes,
    error_handling::HandleErrorLayer,
    extract::{Path, Request, State},
    http::{HeaderValue, StatusCode, header, request::Parts},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post, put},
};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;
use tower::{BoxError, ServiceBuilder};
use tower_redis_lock::{
    Held, LockBackend, LockLayer, LockRejection, LossPolicy, PathKey,
    deadpool_redis::{Pool, redis},
    idempotency::{IdempotencyKey, IdempotencyLayer, ResponseStore, Retryable},
};

/// At most this many buy requests are in flight at once per instance, and at most this
/// many buys run (those whose client left included); more are shed with 429.
pub const MAX_CONCURRENT_BUYS: usize = 256;

/// The header that names the buyer (a stand-in for authentication): idempotency keys are
/// scoped to it, and orders are made out to it.
pub const USER_HEADER: &str = "x-user";

/// An item on sale. `stock` is signed so that a broken invariant shows instead of
/// wrapping.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    pub sku: String,
    pub stock: i64,
    pub sold: i64,
}

/// A sale the handler wants to write: the stock it read, minus what was bought.
pub struct Sale<'a> {
    pub sku: &'a str,
    pub fencing_token: u64,
    pub qty: i64,
    /// Derived from the buyer and the idempotency key: one order per key, however often
    /// it is committed.
    pub order_id: String,
    /// The order as JSON: also the buyer's answer.
    pub order: String,
}

/// What a read for a sale found.
#[derive(Debug, PartialEq, Eq)]
pub enum ForSale {
    /// The item, with its stock.
    Item(Item),
    /// This order was committed already (a retry): its JSON.
    Ordered(String),
}

/// What a commit did.
#[derive(Debug, PartialEq, Eq)]
pub enum Committed {
    /// The order, new or already there (its JSON): either way, the buyer's answer.
    Order(String),
    /// Not enough stock left (the read said otherwise: only a bug would get here).
    SoldOut,
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
    stock: i64,
    sold: i64,
    fence: u64,
    orders: HashMap<String, String>,
}

/// Reads an item for a sale under fencing token `ARGV[1]`, and records the token as the
/// newest seen: from then on, writes by older holders are refused, even ones already on
/// their way. `{"1", order}` if order `ARGV[2]` exists, else `{"0", stock, sold}`;
/// `{"-1"}` for a stale token, `{"-2"}` for an unknown item.
pub const READ: &str = r#"
local fence = tonumber(redis.call('HGET', KEYS[1], 'fence') or '0')
if tonumber(ARGV[1]) < fence then return {'-1'} end
if redis.call('EXISTS', KEYS[1]) == 0 then return {'-2'} end
redis.call('HSET', KEYS[1], 'fence', ARGV[1])
local order = redis.call('HGET', KEYS[2], ARGV[2])
if order then return {'1', order} end
local item = redis.call('HMGET', KEYS[1], 'stock', 'sold')
return {'0', item[1], item[2]}
"#;

/// Creates an item with stock `ARGV[2]` under fencing token `ARGV[1]`: 1 if created, 0 if
/// it exists (untouched), -1 for a stale token.
pub const CREATE: &str = r#"
local fence = tonumber(redis.call('HGET', KEYS[1], 'fence') or '0')
if tonumber(ARGV[1]) < fence then return -1 end
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'stock', ARGV[2], 'sold', 0, 'fence', ARGV[1])
return 1
"#;

/// Adds `ARGV[2]` to an item's stock under fencing token `ARGV[1]`: `{0, stock, sold}`,
/// `{-1}` for a stale token, `{-2}` for an unknown item.
pub const RESTOCK: &str = r#"
local fence = tonumber(redis.call('HGET', KEYS[1], 'fence') or '0')
if tonumber(ARGV[1]) < fence then return {-1} end
if redis.call('EXISTS', KEYS[1]) == 0 then return {-2} end
redis.call('HSET', KEYS[1], 'fence', ARGV[1])
local stock = redis.call('HINCRBY', KEYS[1], 'stock', ARGV[2])
return {0, stock, tonumber(redis.call('HGET', KEYS[1], 'sold'))}
"#;

/// Writes a sale only if its fencing token is not older than the newest seen for the item
/// (a holder that stalled past its lease cannot write over a newer holder's read) and its
/// order `ARGV[3]` is not there yet (a repeated commit is a no-op): `{"0", order}` when
/// written, `{"1", order}` when it was there, `{"-1"}` stale, `{"-3"}` not enough stock.
///
/// An *equal* token is accepted: one holder reads, then commits, under the same token.
/// That stays safe even where tokens could repeat (a counter lost with an `everysec` AOF,
/// see the README): this script re-checks the stock and the order's absence itself, in
/// one atomic step, so two holders that shared a token could only interleave two valid
/// sales, never oversell or record one order twice. A store whose writes are not
/// self-checking should accept an equal token only from the owner that first presented
/// it (the README's fencing example).
pub const COMMIT: &str = r#"
local fence = tonumber(redis.call('HGET', KEYS[1], 'fence') or '0')
if tonumber(ARGV[1]) < fence then return {'-1'} end
local existing = redis.call('HGET', KEYS[2], ARGV[3])
if existing then return {'1', existing} end
local stock = tonumber(redis.call('HGET', KEYS[1], 'stock') or '0')
if stock < tonumber(ARGV[2]) then return {'-3'} end
redis.call('HSET', KEYS[1], 'fence', ARGV[1])
redis.call('HINCRBY', KEYS[1], 'stock', -tonumber(ARGV[2]))
redis.call('HINCRBY', KEYS[1], 'sold', ARGV[2])
redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
return {'0', ARGV[4]}
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

fn number(text: &str) -> Result<i64, StoreError> {
    text.parse()
        .map_err(|_| unavailable(format!("the store holds a malformed number {text:?}")))
}

fn malformed(reply: &[impl std::fmt::Debug]) -> StoreError {
    unavailable(format!("unexpected store reply {reply:?}"))
}

impl Store {
    /// Whether the item exists: one read, no lock, nothing written.
    pub async fn exists(&self, sku: &str) -> Result<bool, StoreError> {
        match self {
            Store::Redis(pool) => {
                let mut conn = pool.get().await.map_err(unavailable)?;
                redis::cmd("EXISTS")
                    .arg(item_key(sku))
                    .query_async(&mut conn)
                    .await
                    .map_err(unavailable)
            }
            Store::Memory(items) => Ok(items.lock().await.contains_key(sku)),
        }
    }

    /// Creates the item with `stock` under its lock; `false` (and nothing changed) when it
    /// exists already.
    pub async fn create(
        &self,
        sku: &str,
        stock: i64,
        fencing_token: u64,
    ) -> Result<bool, StoreError> {
        match self {
            Store::Redis(pool) => {
                let mut conn = pool.get().await.map_err(unavailable)?;
                let outcome: i64 = redis::Script::new(CREATE)
                    .key(item_key(sku))
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
                if items.contains_key(sku) {
                    return Ok(false);
                }
                let item = MemoryItem {
                    stock,
                    fence: fencing_token,
                    ..MemoryItem::default()
                };
                items.insert(sku.to_owned(), item);
                Ok(true)
            }
        }
    }

    /// Adds `add` units to the item's stock under its lock; `None` if unknown.
    pub async fn restock(
        &self,
        sku: &str,
        add: i64,
        fencing_token: u64,
    ) -> Result<Option<Item>, StoreError> {
        match self {
            Store::Redis(pool) => {
                let mut conn = pool.get().await.map_err(unavailable)?;
                let reply: Vec<i64> = redis::Script::new(RESTOCK)
                    .key(item_key(sku))
                    .arg(fencing_token)
                    .arg(add)
                    .invoke_async(&mut conn)
                    .await
                    .map_err(unavailable)?;
                match reply.as_slice() {
                    [0, stock, sold] => Ok(Some(Item {
                        sku: sku.to_owned(),
                        stock: *stock,
                        sold: *sold,
                    })),
                    [-1] => Err(StoreError::Fenced),
                    [-2] => Ok(None),
                    other => Err(malformed(other)),
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
                item.stock += add;
                Ok(Some(Item {
                    sku: sku.to_owned(),
                    stock: item.stock,
                    sold: item.sold,
                }))
            }
        }
    }

    /// The item, read for a sale (or the order `order_id` if it exists): records
    /// `fencing_token` as the newest seen.
    pub async fn read_for_sale(
        &self,
        sku: &str,
        fencing_token: u64,
        order_id: &str,
    ) -> Result<Option<ForSale>, StoreError> {
        match self {
            Store::Redis(pool) => {
                let mut conn = pool.get().await.map_err(unavailable)?;
                let reply: Vec<String> = redis::Script::new(READ)
                    .key(item_key(sku))
                    .key(orders_key(sku))
                    .arg(fencing_token)
                    .arg(order_id)
                    .invoke_async(&mut conn)
                    .await
                    .map_err(unavailable)?;
                match reply.as_slice() {
                    [code, stock, sold] if code == "0" => Ok(Some(ForSale::Item(Item {
                        sku: sku.to_owned(),
                        stock: number(stock)?,
                        sold: number(sold)?,
                    }))),
                    [code, order] if code == "1" => Ok(Some(ForSale::Ordered(order.clone()))),
                    [code] if code == "-1" => Err(StoreError::Fenced),
                    [code] if code == "-2" => Ok(None),
                    other => Err(malformed(other)),
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
                if let Some(order) = item.orders.get(order_id) {
                    return Ok(Some(ForSale::Ordered(order.clone())));
                }
                Ok(Some(ForSale::Item(Item {
                    sku: sku.to_owned(),
                    stock: item.stock,
                    sold: item.sold,
                })))
            }
        }
    }

    pub async fn get(&self, sku: &str) -> Result<Option<Item>, StoreError> {
        match self {
            Store::Redis(pool) => {
                let mut conn = pool.get().await.map_err(unavailable)?;
                let (stock, sold): (Option<i64>, Option<i64>) = redis::cmd("HMGET")
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

    /// The number of orders kept for the item.
    pub async fn order_count(&self, sku: &str) -> Result<u64, StoreError> {
        match self {
            Store::Redis(pool) => {
                let mut conn = pool.get().await.map_err(unavailable)?;
                redis::cmd("HLEN")
                    .arg(orders_key(sku))
                    .query_async(&mut conn)
                    .await
                    .map_err(unavailable)
            }
            Store::Memory(items) => Ok(items
                .lock()
                .await
                .get(sku)
                .map_or(0, |item| item.orders.len() as u64)),
        }
    }

    pub async fn commit(&self, sale: &Sale<'_>) -> Result<Committed, StoreError> {
        match self {
            Store::Redis(pool) => {
                let mut conn = pool.get().await.map_err(unavailable)?;
                let reply: Vec<String> = redis::Script::new(COMMIT)
                    .key(item_key(sale.sku))
                    .key(orders_key(sale.sku))
                    .arg(sale.fencing_token)
                    .arg(sale.qty)
                    .arg(&sale.order_id)
                    .arg(&sale.order)
                    .invoke_async(&mut conn)
                    .await
                    .map_err(unavailable)?;
                match reply.as_slice() {
                    [code, order] if code == "0" || code == "1" => {
                        Ok(Committed::Order(order.clone()))
                    }
                    [code] if code == "-1" => Err(StoreError::Fenced),
                    [code] if code == "-3" => Ok(Committed::SoldOut),
                    other => Err(malformed(other)),
                }
            }
            Store::Memory(items) => {
                let mut items = items.lock().await;
                let item = items.entry(sale.sku.to_owned()).or_default();
                if sale.fencing_token < item.fence {
                    return Err(StoreError::Fenced);
                }
                if let Some(order) = item.orders.get(&sale.order_id) {
                    return Ok(Committed::Order(order.clone()));
                }
                if item.stock < sale.qty {
                    return Ok(Committed::SoldOut);
                }
                item.fence = sale.fencing_token;
                item.stock -= sale.qty;
                item.sold += sale.qty;
                item.orders
                    .insert(sale.order_id.clone(), sale.order.clone());
                Ok(Committed::Order(sale.order.clone()))
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

/// 503 + `Retry-After`, marked [`Retryable`]: nothing was written (or the write is a
/// no-op when repeated: orders are keyed by buyer and idempotency key), so a retry with
/// the same key may run the buy again.
fn store_failed(err: StoreError) -> Response {
    let mut response = match err {
        StoreError::Fenced => {
            metrics::counter!("flash_sale_fenced_writes_total").increment(1);
            problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "the item's lock was lost before the sale was written",
            )
        }
        StoreError::Unavailable(err) => {
            tracing::warn!(%err, "store unavailable");
            problem(StatusCode::SERVICE_UNAVAILABLE, "the store is unavailable")
        }
    };
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response.extensions_mut().insert(Retryable);
    response
}

/// Every write to an item is fenced; a backend without tokens is a wiring mistake.
fn no_fencing_tokens() -> Response {
    let detail = "the lock backend hands out no fencing tokens";
    problem(StatusCode::INTERNAL_SERVER_ERROR, detail)
}

/// An order answer: the stored JSON as it is, so a retry gets the same bytes.
fn order_response(order: String) -> Response {
    let mut response = order.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

#[derive(Deserialize)]
struct StockBody {
    stock: i64,
}

/// Creates an item. An existing one is left alone (409): a sale is never reset.
async fn put_item(
    State(state): State<AppState>,
    Path(sku): Path<String>,
    lock: Held,
    body: Bytes,
) -> Response {
    let stock = match serde_json::from_slice(&body) {
        Ok(StockBody { stock }) if stock >= 0 => stock,
        _ => {
            return problem(
                StatusCode::BAD_REQUEST,
                r#"expected {"stock": N} with N >= 0"#,
            );
        }
    };
    let Some(fencing_token) = lock.fencing_token() else {
        return no_fencing_tokens();
    };
    match state.store.create(&sku, stock, fencing_token).await {
        Ok(true) => {
            let item = Item {
                sku,
                stock,
                sold: 0,
            };
            (StatusCode::CREATED, Json(item)).into_response()
        }
        Ok(false) => problem(
            StatusCode::CONFLICT,
            "the item exists; add stock with POST /items/{sku}/restock {\"add\": N}",
        ),
        Err(err) => store_failed(err),
    }
}

#[derive(Deserialize)]
struct RestockBody {
    add: i64,
}

/// Adds stock to an item under its lock; orders and the sold count stay.
async fn restock(
    State(state): State<AppState>,
    Path(sku): Path<String>,
    lock: Held,
    body: Bytes,
) -> Response {
    let add = match serde_json::from_slice(&body) {
        Ok(RestockBody { add }) if add >= 1 => add,
        _ => {
            return problem(
                StatusCode::BAD_REQUEST,
                r#"expected {"add": N} with N >= 1"#,
            );
        }
    };
    let Some(fencing_token) = lock.fencing_token() else {
        return no_fencing_tokens();
    };
    match state.store.restock(&sku, add, fencing_token).await {
        Ok(Some(item)) => Json(item).into_response(),
        Ok(None) => problem(StatusCode::NOT_FOUND, "no such item"),
        Err(err) => store_failed(err),
    }
}

/// Reads take no lock: they see the last committed state, and the number of orders.
async fn get_item(State(state): State<AppState>, Path(sku): Path<String>) -> Response {
    let item = match state.store.get(&sku).await {
        Ok(Some(item)) => item,
        Ok(None) => return problem(StatusCode::NOT_FOUND, "no such item"),
        Err(err) => return store_failed(err),
    };
    match state.store.order_count(&sku).await {
        Ok(orders) => Json(serde_json::json!({
            "sku": item.sku,
            "stock": item.stock,
            "sold": item.sold,
            "orders": orders,
        }))
        .into_response(),
        Err(err) => store_failed(err),
    }
}

/// Answers 404 for unknown items before any lock or idempotency record is taken, so that
/// requests for made-up SKUs leave nothing behind in Redis.
async fn require_item(
    State(state): State<AppState>,
    Path(sku): Path<String>,
    request: Request,
    next: Next,
) -> Response {
    match state.store.exists(&sku).await {
        Ok(true) => next.run(request).await,
        Ok(false) => problem(StatusCode::NOT_FOUND, "no such item"),
        Err(err) => store_failed(err),
    }
}

#[derive(Deserialize)]
struct BuyBody {
    qty: i64,
}

/// The buyer named by the `X-User` header (1 to 64 visible characters).
pub fn buyer(parts: &Parts) -> Option<String> {
    let user = parts.headers.get(USER_HEADER)?.to_str().ok()?;
    let valid = (1..=64).contains(&user.len()) && user.bytes().all(|b| b.is_ascii_graphic());
    valid.then(|| user.to_owned())
}

/// The order id of a buyer's idempotency key: the same for every run under that key.
pub fn order_id(key: &IdempotencyKey) -> String {
    let mut hash = Sha256::new();
    for part in [key.principal(), key.key()] {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part);
    }
    hash.finalize()[..16]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// Runs under the item's lock: read the stock (or find this key's order), check it,
/// write the sale with the lock's fencing token.
async fn buy(
    State(state): State<AppState>,
    Path(sku): Path<String>,
    lock: Held,
    key: Option<IdempotencyKey>,
    body: Bytes,
) -> Response {
    let qty = match serde_json::from_slice::<BuyBody>(&body) {
        Ok(BuyBody { qty }) if qty >= 1 => qty,
        _ => {
            return problem(
                StatusCode::BAD_REQUEST,
                r#"expected {"qty": q} with q >= 1"#,
            );
        }
    };
    let Some(key) = key else {
        let detail = "the buy route has no IdempotencyLayer";
        return problem(StatusCode::INTERNAL_SERVER_ERROR, detail);
    };
    let Some(fencing_token) = lock.fencing_token() else {
        return no_fencing_tokens();
    };
    let order_id = order_id(&key);
    let item = match state
        .store
        .read_for_sale(&sku, fencing_token, &order_id)
        .await
    {
        Ok(Some(ForSale::Item(item))) => item,
        Ok(Some(ForSale::Ordered(order))) => return order_response(order),
        Ok(None) => return problem(StatusCode::NOT_FOUND, "no such item"),
        Err(err) => return store_failed(err),
    };
    if item.stock < qty {
        metrics::counter!("flash_sale_sold_out_total").increment(1);
        return problem(StatusCode::GONE, "not enough stock left");
    }
    let order = serde_json::json!({
        "order_id": order_id,
        "sku": sku,
        "user": key.principal(),
        "qty": qty,
        "remaining": item.stock - qty,
    })
    .to_string();
    let sale = Sale {
        sku: &sku,
        fencing_token,
        qty,
        order_id,
        order,
    };
    match state.store.commit(&sale).await {
        Ok(Committed::Order(order)) => {
            metrics::counter!("flash_sale_orders_total").increment(1);
            metrics::counter!("flash_sale_units_sold_total").increment(qty.unsigned_abs());
            order_response(order)
        }
        Ok(Committed::SoldOut) => problem(StatusCode::GONE, "not enough stock left"),
        Err(err) => store_failed(err),
    }
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

/// Load shedding answers 429, marked [`Retryable`]: the buy did not run, and the client
/// may come back with the same key.
async fn overloaded(err: BoxError) -> Response {
    metrics::counter!("flash_sale_shed_total").increment(1);
    let detail = format!("too many buyers at once ({err}); retry shortly");
    let mut response = problem(StatusCode::TOO_MANY_REQUESTS, &detail);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response.extensions_mut().insert(Retryable);
    response
}

/// Counts answers by route and status, for `/metrics`.
async fn count_answers(request: Request, next: Next) -> Response {
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
    // One layer, so that creation, restocks and the buys of one SKU share a line. A buy is
    // idempotent by itself (one order per key), so every answer of this lock, "lock lost"
    // included, lets the same key be retried.
    let item_lock = LockLayer::new(locks, PathKey::new("sku"))
        .key_prefix("sku:")
        .max_wait(Duration::from_millis(500))
        .ttl(Duration::from_secs(5))
        .rejection_response(|rejection: &LockRejection| {
            let mut response = rejection.to_response();
            response.extensions_mut().insert(Retryable);
            response
        });
    let known_item = || middleware::from_fn_with_state(state.clone(), require_item);
    // The operator's first question: which SKUs are hot (contended buys, restocks).
    let item_locker = item_lock.locker().clone();
    let hot_keys = get(move || async move {
        let keys: Vec<_> = item_locker
            .hot_keys()
            .into_iter()
            .map(|hot| {
                serde_json::json!({
                    "key": hot.key.as_str(),
                    "contended": hot.count,
                    "overcount": hot.overcount,
                })
            })
            .collect();
        axum::Json(serde_json::json!({ "hot_keys": keys }))
    });
    // Outermost first. Admission: past MAX_CONCURRENT_BUYS requests in flight, 429 before
    // any Redis work. Unknown items are 404 before anything is written. The key's record
    // is looked up next. The second limit sits inside the idempotency layer: a buy that
    // runs on after its client left still holds its permit there, so detached work counts.
    let buy_route = post(buy).layer(
        ServiceBuilder::new()
            .layer(HandleErrorLayer::new(overloaded))
            .load_shed()
            .concurrency_limit(MAX_CONCURRENT_BUYS)
            .layer(known_item())
            // A lost key lock need not stop a buy: it cannot charge twice.
            .layer(IdempotencyLayer::new(idempotency, buyer).on_lock_lost(LossPolicy::Signal))
            .layer(HandleErrorLayer::new(overloaded))
            .load_shed()
            .concurrency_limit(MAX_CONCURRENT_BUYS)
            .layer(item_lock.clone()),
    );
    let restock_route = post(restock).layer(
        ServiceBuilder::new()
            .layer(known_item())
            .layer(item_lock.clone()),
    );
    Router::new()
        .route(
            "/items/{sku}",
            get(get_item).merge(put(put_item).route_layer(item_lock)),
        )
        .route("/items/{sku}/buy", buy_route)
        .route("/items/{sku}/restock", restock_route)
        .route("/metrics", get(metrics_text))
        .route("/debug/locks", hot_keys)
        .layer(middleware::from_fn(count_answers))
        .with_state(state)
}

/// A pool on `url` whose every wait is bounded: a request never hangs on the store.
fn bounded_pool(url: &str) -> Result<Pool, BoxError> {
    let mut config = tower_redis_lock::deadpool_redis::Config::from_url(url);
    let mut pool_config = tower_redis_lock::deadpool_redis::PoolConfig::new(64);
    pool_config.timeouts = tower_redis_lock::deadpool_redis::Timeouts {
        wait: Some(Duration::from_secs(1)),
        create: Some(Duration::from_secs(1)),
        recycle: Some(Duration::from_secs(1)),
    };
    config.pool = Some(pool_config);
    Ok(config.create_pool(Some(tower_redis_lock::deadpool_redis::Runtime::Tokio1))?)
}

/// The service as `main` runs it. With a Redis URL it sells from that Redis and never
/// falls back: nothing is probed at start-up, pools connect on demand, and while Redis
/// is unreachable requests get 503 (an instance that fell back to memory would sell on
/// its own for the rest of its life). Without one, it sells from memory, locks
/// in-process: one instance only.
pub fn service(
    redis_url: Option<&str>,
    metrics: Option<PrometheusHandle>,
) -> Result<Router, BoxError> {
    Ok(match redis_url {
        Some(url) => {
            let backend = tower_redis_lock::RedisBackend::from_url(url)?
                .command_timeout(Duration::from_millis(500))
                .fencing(true);
            let idempotency = backend.clone().fencing(false);
            let state = AppState {
                store: Store::Redis(bounded_pool(url)?),
                metrics,
            };
            router(backend, idempotency, state)
        }
        None => {
            let backend = tower_redis_lock::InMemoryBackend::new();
            let state = AppState {
                store: Store::Memory(Default::default()),
                metrics,
            };
            router(backend.clone().fencing(true), backend, state)
        }
    })
}
