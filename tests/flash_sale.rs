//! The flash-sale example's handlers through HTTP, two instances on one spawned Redis:
//! no overselling, replays, bad requests, and a Redis outage.

#[path = "../examples/flash_sale/app.rs"]
#[allow(dead_code)]
mod app;
mod support;

use std::{collections::HashSet, time::Duration};

use reqwest::{Client, StatusCode};
use support::{RedisServer, pool, proxy::Proxy, serve};
use tower_redis_lock::{RedisBackend, deadpool_redis::redis};

/// Two instances of the service on `server`, each with its own pools and subscriber.
async fn two_instances(server: &RedisServer) -> Vec<String> {
    two_instances_with(server, None).await
}

/// The same, the first instance reaching its store through `store_url` (a proxy).
async fn two_instances_with(server: &RedisServer, store_url: Option<&str>) -> Vec<String> {
    let mut urls = Vec::new();
    for i in 0..2 {
        let store_url = store_url
            .filter(|_| i == 0)
            .map_or_else(|| server.url(), str::to_owned);
        let backend = RedisBackend::new(pool(&server.url()))
            .command_timeout(Duration::from_millis(500))
            .notify_with(redis::Client::open(server.url()).unwrap())
            .fencing(true);
        let state = app::AppState {
            store: app::Store::Redis(pool(&store_url)),
            metrics: None,
        };
        let idempotency = backend.clone().fencing(false);
        urls.push(serve(app::router(backend, idempotency, state)).await);
    }
    urls
}

async fn put_stock(client: &Client, url: &str, sku: &str, stock: u64) -> StatusCode {
    let response = client
        .put(format!("{url}/items/{sku}"))
        .json(&serde_json::json!({ "stock": stock }))
        .send()
        .await
        .unwrap();
    response.status()
}

async fn buy(
    client: &Client,
    url: &str,
    sku: &str,
    key: Option<&str>,
    body: &str,
) -> reqwest::Response {
    let mut request = client
        .post(format!("{url}/items/{sku}/buy"))
        .header("x-user", "tester")
        .body(body.to_owned());
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    request.send().await.unwrap()
}

async fn item(client: &Client, url: &str, sku: &str) -> serde_json::Value {
    client
        .get(format!("{url}/items/{sku}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// 200 buyers for 25 units through two instances, retrying 409/423/429/503 with their
/// key: exactly 25 sales, stock 0, and every order distinct.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_the_stock_is_sold() {
    let server = RedisServer::spawn();
    let urls = two_instances(&server).await;
    let client = Client::new();
    assert_eq!(
        put_stock(&client, &urls[0], "tee", 25).await,
        StatusCode::CREATED
    );

    let buyers: Vec<_> = (0..200)
        .map(|i| {
            let (client, url) = (client.clone(), urls[i % 2].clone());
            tokio::spawn(async move {
                let key = format!("buyer-{i}");
                let body = r#"{"qty": 1}"#;
                for _ in 0..200 {
                    let response = buy(&client, &url, "tee", Some(&key), body).await;
                    match response.status() {
                        StatusCode::OK => {
                            let order: serde_json::Value = response.json().await.unwrap();
                            return Some(order["order_id"].as_str().unwrap().to_owned());
                        }
                        StatusCode::GONE => return None,
                        status if [409, 423, 429, 503].contains(&status.as_u16()) => {
                            tokio::time::sleep(Duration::from_millis(10 + fastrand::u64(0..40)))
                                .await;
                        }
                        status => panic!("unexpected {status}"),
                    }
                }
                panic!("buyer {i} never got an answer");
            })
        })
        .collect();
    let mut orders = HashSet::new();
    for buyer in buyers {
        if let Some(order) = buyer.await.unwrap() {
            assert!(orders.insert(order), "one order id for two buyers");
        }
    }
    assert_eq!(orders.len(), 25, "sales do not match the stock");
    let item = item(&client, &urls[1], "tee").await;
    assert_eq!(item["stock"], 0);
    assert_eq!(item["sold"], 25);
    // 200 buyers on one SKU: the operator sees it as the hot key.
    let debug: serde_json::Value = client
        .get(format!("{}/debug/locks", urls[0]))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(debug["hot_keys"][0]["key"], "sku:tee", "{debug}");
    assert!(
        debug["hot_keys"][0]["contended"].as_u64() > Some(0),
        "{debug}"
    );
}

/// A retry with the same key replays the first answer, from either instance; the same
/// key with another body is 422; no key or a malformed body is 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_and_bad_requests() {
    let server = RedisServer::spawn();
    let urls = two_instances(&server).await;
    let client = Client::new();
    put_stock(&client, &urls[0], "cap", 5).await;
    let body = r#"{"qty": 2}"#;

    let first = buy(&client, &urls[0], "cap", Some("k-1"), body).await;
    assert_eq!(first.status(), StatusCode::OK);
    let first: serde_json::Value = first.json().await.unwrap();
    assert_eq!(first["remaining"], 3);
    for url in &urls {
        let again = buy(&client, url, "cap", Some("k-1"), body).await;
        assert_eq!(again.status(), StatusCode::OK);
        assert_eq!(again.headers()["idempotent-replayed"], "true");
        let again: serde_json::Value = again.json().await.unwrap();
        assert_eq!(again, first, "the replay differs from the first answer");
    }
    assert_eq!(
        item(&client, &urls[1], "cap").await["sold"],
        2,
        "a replay charged again"
    );

    let other_body = buy(&client, &urls[1], "cap", Some("k-1"), r#"{"qty": 3}"#).await;
    assert_eq!(other_body.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let anonymous = client
        .post(format!("{}/items/cap/buy", urls[0]))
        .header("idempotency-key", "k-anon")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(
        anonymous.status(),
        StatusCode::BAD_REQUEST,
        "a buy without a buyer"
    );
    let no_key = buy(&client, &urls[0], "cap", None, body).await;
    assert_eq!(no_key.status(), StatusCode::BAD_REQUEST);
    assert_eq!(no_key.headers()["content-type"], "application/problem+json");
    let malformed = buy(&client, &urls[0], "cap", Some("k-2"), r#"{"qty": "#).await;
    assert_eq!(malformed.status(), StatusCode::BAD_REQUEST);
    let zero = buy(&client, &urls[0], "cap", Some("k-3"), r#"{"qty": 0}"#).await;
    assert_eq!(zero.status(), StatusCode::BAD_REQUEST);
    let too_many = buy(&client, &urls[0], "cap", Some("k-4"), r#"{"qty": 4}"#).await;
    assert_eq!(too_many.status(), StatusCode::GONE);
    assert_eq!(item(&client, &urls[1], "cap").await["sold"], 2);
    assert_eq!(
        client
            .get(format!("{}/items/nope", urls[0]))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
}

/// Redis down: buys answer 503 (never a 200 that was not a sale); back up, sales resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_answers_503_and_recovers() {
    let mut server = RedisServer::spawn();
    let urls = two_instances(&server).await;
    let client = Client::new();
    put_stock(&client, &urls[0], "mug", 10).await;
    let body = r#"{"qty": 1}"#;
    assert_eq!(
        buy(&client, &urls[0], "mug", Some("a"), body)
            .await
            .status(),
        StatusCode::OK
    );

    server.kill();
    for (i, url) in urls.iter().enumerate() {
        let response = buy(&client, url, "mug", Some(&format!("down-{i}")), body).await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(response.headers().contains_key("retry-after"));
    }

    server.restart(); // empty: the sale starts over
    let mut status = StatusCode::SERVICE_UNAVAILABLE;
    for _ in 0..100 {
        let put = put_stock(&client, &urls[0], "mug", 10).await;
        if put.is_success() || put == StatusCode::CONFLICT {
            status = buy(&client, &urls[1], "mug", Some("after"), body)
                .await
                .status();
            if status == StatusCode::OK {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, StatusCode::OK, "no recovery after Redis came back");
    assert_eq!(item(&client, &urls[0], "mug").await["sold"], 1);
}

/// A holder whose lease ran out while its write was on the way: the newer holder's read
/// already raised the item's fence, so the late write is refused and nothing is oversold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_write_from_a_stale_holder_is_refused() {
    let server = RedisServer::spawn();
    let store = app::Store::Redis(pool(&server.url()));
    assert!(store.create("last", 1, 1).await.unwrap());
    let sale = |fencing_token, order_id: &str| app::Sale {
        sku: "last",
        fencing_token,
        qty: 1,
        order_id: order_id.to_owned(),
        order: "{}".to_owned(),
    };
    let stock = |read: Option<app::ForSale>| match read {
        Some(app::ForSale::Item(item)) => item.stock,
        other => panic!("expected the item, got {other:?}"),
    };
    // Holder 7 reads stock 1, stalls; holder 8 gets the lock and reads stock 1 too.
    assert_eq!(
        stock(store.read_for_sale("last", 7, "late").await.unwrap()),
        1
    );
    assert_eq!(
        stock(store.read_for_sale("last", 8, "fresh").await.unwrap()),
        1
    );
    // 7's write arrives late: refused. 8's goes through. One unit sold, not two.
    assert!(matches!(
        store.commit(&sale(7, "late")).await,
        Err(app::StoreError::Fenced)
    ));
    store.commit(&sale(8, "fresh")).await.unwrap();
    let item = store.get("last").await.unwrap().unwrap();
    assert_eq!((item.stock, item.sold), (0, 1));
    assert!(matches!(
        store.read_for_sale("last", 7, "late").await,
        Err(app::StoreError::Fenced)
    ));
    // A repeated commit of one order is a no-op, whatever its token.
    assert_eq!(
        store.commit(&sale(9, "fresh")).await.unwrap(),
        app::Committed::Order("{}".to_owned())
    );
    assert_eq!(store.get("last").await.unwrap().unwrap().sold, 1);
}

fn dbsize(server: &RedisServer) -> u64 {
    server.query(&mut redis::cmd("DBSIZE"))
}

/// Buys `qty` of `sku` as `user` with idempotency key `key`.
async fn buy_as(
    client: &Client,
    url: &str,
    sku: &str,
    key: &str,
    user: &str,
    qty: u64,
) -> reqwest::Response {
    client
        .post(format!("{url}/items/{sku}/buy"))
        .header("idempotency-key", key)
        .header("x-user", user)
        .json(&serde_json::json!({ "qty": qty }))
        .send()
        .await
        .unwrap()
}

/// The store's reply to the commit comes after its 500 ms response timeout: the buyer
/// gets 503 and retries with its key; the retry must find the order, not make another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_commit_reply_never_charges_twice() {
    let server = RedisServer::spawn();
    let proxy = Proxy::start(server.port()).await;
    let urls = two_instances_with(&server, Some(&proxy.url())).await;
    let client = Client::new();
    assert_eq!(
        put_stock(&client, &urls[0], "tee", 10).await,
        StatusCode::CREATED
    );
    // Loads the scripts on the proxied connection, so the commit below is one EVALSHA.
    let warm = buy_as(&client, &urls[0], "tee", "warm-up", "ann", 1).await;
    assert_eq!(warm.status(), StatusCode::OK);

    let commit = redis::Script::new(app::COMMIT).get_hash().to_owned();
    proxy.delay_reply_to(commit.as_bytes(), Duration::from_millis(600));
    let first = buy_as(&client, &urls[0], "tee", "k-slow", "bob", 1).await;
    assert_eq!(
        first.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "the reply came in time"
    );
    tokio::time::sleep(Duration::from_millis(300)).await; // the late reply is gone
    let mut order = None;
    for _ in 0..50 {
        let retry = buy_as(&client, &urls[0], "tee", "k-slow", "bob", 1).await;
        if retry.status() == StatusCode::OK {
            order = Some(retry.json::<serde_json::Value>().await.unwrap());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let order = order.expect("the retry never got its order");
    let item = item(&client, &urls[1], "tee").await;
    assert_eq!(item["sold"], 2, "the retry charged again");
    assert_eq!(item["stock"], 8);
    let orders: u64 = server.query(redis::cmd("HLEN").arg("sale:{tee}:orders"));
    assert_eq!(orders, 2);
    let again = buy_as(&client, &urls[1], "tee", "k-slow", "bob", 1).await;
    assert_eq!(
        again.json::<serde_json::Value>().await.unwrap()["order_id"],
        order["order_id"]
    );
}

/// Reads of any SKU and buys of unknown ones leave nothing behind in Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_skus_and_reads_leave_no_keys() {
    let server = RedisServer::spawn();
    let urls = two_instances(&server).await;
    let client = Client::new();
    put_stock(&client, &urls[0], "tee", 5).await;
    let before = dbsize(&server);
    for i in 0..200 {
        let url = &urls[i % 2];
        let read = client
            .get(format!("{url}/items/junk-{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(read.status(), StatusCode::NOT_FOUND);
        let read = client.get(format!("{url}/items/tee")).send().await.unwrap();
        assert_eq!(read.status(), StatusCode::OK);
        let bought = buy_as(
            &client,
            url,
            &format!("junk-{i}"),
            &format!("j{i}"),
            "ann",
            1,
        )
        .await;
        assert_eq!(bought.status(), StatusCode::NOT_FOUND);
    }
    assert_eq!(
        dbsize(&server),
        before,
        "requests for unknown items created keys"
    );
}

/// A read answers while a buyer holds the item's lock: reads do not lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_do_not_take_the_lock() {
    let server = RedisServer::spawn();
    let urls = two_instances(&server).await;
    let client = Client::new();
    put_stock(&client, &urls[0], "tee", 5).await;
    let () = server.query(
        redis::cmd("SET")
            .arg("lock:{sku:tee}")
            .arg("someone-else")
            .arg("PX")
            .arg(10_000),
    );
    let read = client
        .get(format!("{}/items/tee", urls[1]))
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), StatusCode::OK, "a read waited for the lock");
    assert_eq!(read.json::<serde_json::Value>().await.unwrap()["stock"], 5);
}

/// A restock adds to what is left and keeps the orders; PUT never wipes a sale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restock_adds_and_keeps_the_orders() {
    let server = RedisServer::spawn();
    let urls = two_instances(&server).await;
    let client = Client::new();
    assert_eq!(
        put_stock(&client, &urls[0], "tee", 10).await,
        StatusCode::CREATED
    );
    for i in 0..3 {
        let bought = buy_as(&client, &urls[i % 2], "tee", &format!("r{i}"), "ann", 1).await;
        assert_eq!(bought.status(), StatusCode::OK);
    }
    let restocked = client
        .post(format!("{}/items/tee/restock", urls[1]))
        .json(&serde_json::json!({ "add": 10 }))
        .send()
        .await
        .unwrap();
    assert_eq!(restocked.status(), StatusCode::OK);
    let again = put_stock(&client, &urls[0], "tee", 10).await;
    assert_eq!(again, StatusCode::CONFLICT, "PUT on a live item");
    let item = item(&client, &urls[0], "tee").await;
    assert_eq!(
        (item["stock"].as_i64(), item["sold"].as_i64()),
        (Some(17), Some(3))
    );
    let orders: u64 = server.query(redis::cmd("HLEN").arg("sale:{tee}:orders"));
    assert_eq!(orders, 3, "orders were lost");
}

/// An instance started while its Redis is down answers 503 (it does not sell from memory
/// on its own) and sells from Redis once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_started_during_an_outage_waits_for_redis() {
    let mut server = RedisServer::spawn();
    server.kill();
    let url = serve(app::service(Some(&server.url()), None).unwrap()).await;
    let client = Client::new();
    assert_eq!(
        put_stock(&client, &url, "cap", 3).await,
        StatusCode::SERVICE_UNAVAILABLE,
        "an instance without its Redis took an order"
    );
    server.restart();
    let mut status = StatusCode::SERVICE_UNAVAILABLE;
    for _ in 0..50 {
        status = put_stock(&client, &url, "cap", 3).await;
        if status != StatusCode::SERVICE_UNAVAILABLE {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, StatusCode::CREATED);
    let exists: bool = server.query(redis::cmd("EXISTS").arg("sale:{cap}"));
    assert!(exists, "the item is not in Redis");
}

/// Without a Redis URL the shop runs in memory, with the same rules: one order per key,
/// restocks add, PUT never resets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_shop_keeps_the_same_rules() {
    let url = serve(app::service(None, None).unwrap()).await;
    let client = Client::new();
    assert_eq!(
        put_stock(&client, &url, "mug", 2).await,
        StatusCode::CREATED
    );
    assert_eq!(
        put_stock(&client, &url, "mug", 9).await,
        StatusCode::CONFLICT
    );
    let first = buy_as(&client, &url, "mug", "m-1", "ann", 1).await;
    assert_eq!(first.status(), StatusCode::OK);
    let first: serde_json::Value = first.json().await.unwrap();
    let again = buy_as(&client, &url, "mug", "m-1", "ann", 1).await;
    assert_eq!(again.json::<serde_json::Value>().await.unwrap(), first);
    let restocked = client
        .post(format!("{url}/items/mug/restock"))
        .json(&serde_json::json!({ "add": 5 }))
        .send()
        .await
        .unwrap();
    assert_eq!(restocked.status(), StatusCode::OK);
    let item = item(&client, &url, "mug").await;
    assert_eq!(
        (
            item["stock"].as_i64(),
            item["sold"].as_i64(),
            item["orders"].as_i64()
        ),
        (Some(6), Some(1), Some(1))
    );
}
