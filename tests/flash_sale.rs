//! The flash-sale example's handlers through HTTP, two instances on one spawned Redis:
//! no overselling, replays, bad requests, and a Redis outage.

#[path = "../examples/flash_sale/app.rs"]
#[allow(dead_code)]
mod app;
mod support;

use std::{collections::HashSet, time::Duration};

use reqwest::{Client, StatusCode};
use support::{RedisServer, pool, serve};
use tower_redis_lock::{RedisBackend, deadpool_redis::redis};

/// Two instances of the service on `server`, each with its own pools and subscriber.
async fn two_instances(server: &RedisServer) -> Vec<String> {
    let mut urls = Vec::new();
    for _ in 0..2 {
        let backend = RedisBackend::new(pool(&server.url()))
            .command_timeout(Duration::from_millis(500))
            .notify_with(redis::Client::open(server.url()).unwrap())
            .fencing(true);
        let state = app::AppState {
            store: app::Store::Redis(pool(&server.url())),
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
                let body = format!(r#"{{"user": "u{i}", "qty": 1}}"#);
                for _ in 0..200 {
                    let response = buy(&client, &url, "tee", Some(&key), &body).await;
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
}

/// A retry with the same key replays the first answer, from either instance; the same
/// key with another body is 422; no key or a malformed body is 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_and_bad_requests() {
    let server = RedisServer::spawn();
    let urls = two_instances(&server).await;
    let client = Client::new();
    put_stock(&client, &urls[0], "cap", 5).await;
    let body = r#"{"user": "ann", "qty": 2}"#;

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

    let other_body = buy(
        &client,
        &urls[1],
        "cap",
        Some("k-1"),
        r#"{"user": "ann", "qty": 3}"#,
    )
    .await;
    assert_eq!(other_body.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let no_key = buy(&client, &urls[0], "cap", None, body).await;
    assert_eq!(no_key.status(), StatusCode::BAD_REQUEST);
    assert_eq!(no_key.headers()["content-type"], "application/problem+json");
    let malformed = buy(&client, &urls[0], "cap", Some("k-2"), r#"{"user": "#).await;
    assert_eq!(malformed.status(), StatusCode::BAD_REQUEST);
    let zero = buy(
        &client,
        &urls[0],
        "cap",
        Some("k-3"),
        r#"{"user": "ann", "qty": 0}"#,
    )
    .await;
    assert_eq!(zero.status(), StatusCode::BAD_REQUEST);
    let too_many = buy(
        &client,
        &urls[0],
        "cap",
        Some("k-4"),
        r#"{"user": "bob", "qty": 4}"#,
    )
    .await;
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
    let body = r#"{"user": "ann", "qty": 1}"#;
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
        if put_stock(&client, &urls[0], "mug", 10).await.is_success() {
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
    assert!(store.put("last", 1, 1).await.unwrap());
    let sale = |fencing_token, order_id: &str| app::Sale {
        sku: "last",
        fencing_token,
        stock: 1,
        qty: 1,
        order_id: order_id.to_owned(),
        order: "{}".to_owned(),
    };
    // Holder 7 reads stock 1, stalls; holder 8 gets the lock and reads stock 1 too.
    assert_eq!(
        store.read_for_sale("last", 7).await.unwrap().unwrap().stock,
        1
    );
    assert_eq!(
        store.read_for_sale("last", 8).await.unwrap().unwrap().stock,
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
        store.read_for_sale("last", 7).await,
        Err(app::StoreError::Fenced)
    ));
}
