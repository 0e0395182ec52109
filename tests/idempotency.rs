//! `IdempotencyLayer` on both backends (the Redis one spawned by the test), through HTTP
//! and two app instances: runs once, replays, refuses reuse, lets failures be retried.

mod support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    body::Body,
    extract::State,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::post,
};
use reqwest::Client;
use support::{Harness, serve};
use tower_http::catch_panic::CatchPanicLayer;
use tower_redis_lock::{
    HeaderKey, LockLayer,
    idempotency::{IdempotencyLayer, ResponseStore},
};

/// Counts its runs; `fail=N` answers 500 while it has run fewer than N times; `slow`
/// takes 600 ms, `ms=N` takes N ms, `first_ms=N` too but only on the first run; `big` answers a body over 64 KiB, `stream` an unsized
/// one, `panic` panics, `headers` sets a handful of response headers.
async fn charge(
    State(runs): State<Arc<AtomicUsize>>,
    axum::extract::Query(params): axum::extract::Query<std::collections::HashMap<String, String>>,
    body: String,
) -> Response {
    let run = runs.fetch_add(1, Ordering::SeqCst) + 1;
    if params.contains_key("slow") {
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    if let Some(ms) = params.get("ms").and_then(|ms| ms.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if let Some(ms) = params.get("first_ms").and_then(|ms| ms.parse().ok())
        && run == 1
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let fail_until: usize = params.get("fail").and_then(|n| n.parse().ok()).unwrap_or(0);
    if run <= fail_until {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            "payment provider down".to_owned(),
        )
            .into_response();
    }
    if params.contains_key("panic") {
        panic!("the handler fell over");
    }
    if params.contains_key("big") {
        return (StatusCode::CREATED, "x".repeat(70 * 1024)).into_response();
    }
    if params.contains_key("stream") {
        let chunks =
            futures_util::stream::iter(["charged ", "in ", "chunks"].map(Ok::<_, std::io::Error>));
        return (StatusCode::CREATED, Body::from_stream(chunks)).into_response();
    }
    let mut response =
        (StatusCode::CREATED, format!("charged run {run} for {body}")).into_response();
    if params.contains_key("headers") {
        let headers = response.headers_mut();
        headers.insert(header::ETAG, HeaderValue::from_static("\"v1\""));
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        headers.append(header::LINK, HeaderValue::from_static("</a>; rel=next"));
        headers.append(header::LINK, HeaderValue::from_static("</b>; rel=prev"));
        headers.insert("x-charge-id", HeaderValue::from(run));
        headers.insert("x-name", HeaderValue::from_bytes(b"caf\xe9").unwrap());
        headers.insert(header::SET_COOKIE, HeaderValue::from_static("session=1"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("x-hop"));
        headers.insert("x-hop", HeaderValue::from_static("one hop only"));
    }
    response
}

async fn instances<H: Harness>(harness: &H, runs: &Arc<AtomicUsize>) -> Vec<String>
where
    H::Backend: ResponseStore,
{
    instances_with(harness, runs, |layer| layer).await
}

/// The caller's identity, as a test stands it in: the `x-user` header.
fn user(parts: &axum::http::request::Parts) -> Option<String> {
    Some(parts.headers.get("x-user")?.to_str().ok()?.to_owned())
}

/// Two app instances on `harness`, their layer set up by `configure`.
async fn instances_with<H: Harness>(
    harness: &H,
    runs: &Arc<AtomicUsize>,
    configure: impl Fn(IdempotencyLayer<H::Backend>) -> IdempotencyLayer<H::Backend>,
) -> Vec<String>
where
    H::Backend: ResponseStore,
{
    let mut urls = Vec::new();
    for _ in 0..2 {
        let layer = configure(IdempotencyLayer::new(harness.instance(), user));
        let router = Router::new()
            .route("/charge", post(charge))
            .route_layer(layer)
            .layer(CatchPanicLayer::new())
            .with_state(runs.clone());
        urls.push(serve(router).await);
    }
    urls
}

async fn send(
    client: &Client,
    url: &str,
    query: &str,
    key: Option<&str>,
    user: &str,
    body: &str,
) -> reqwest::Response {
    let mut request = client
        .post(format!("{url}/charge?{query}"))
        .header("x-user", user)
        .body(body.to_owned());
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    request.send().await.unwrap()
}

async fn runs_once_and_replays<H: Harness>(harness: &H)
where
    H::Backend: ResponseStore,
{
    let runs = Arc::new(AtomicUsize::new(0));
    let urls = instances(harness, &runs).await;
    let client = Client::new();

    let first = send(&client, &urls[0], "", Some("k1"), "ann", "10 EUR").await;
    assert_eq!(first.status(), StatusCode::CREATED);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first_body = first.text().await.unwrap();
    for url in &urls {
        let again = send(&client, url, "", Some("k1"), "ann", "10 EUR").await;
        assert_eq!(again.status(), StatusCode::CREATED);
        assert_eq!(again.headers()["idempotent-replayed"], "true");
        assert_eq!(again.text().await.unwrap(), first_body);
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "a retry ran the handler again"
    );

    let reused = send(&client, &urls[1], "", Some("k1"), "ann", "99 EUR").await;
    assert_eq!(reused.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(reused.headers()["content-type"], "application/problem+json");
    let missing = send(&client, &urls[0], "", None, "ann", "10 EUR").await;
    assert_eq!(missing.status(), StatusCode::BAD_REQUEST);
    // Another principal's key is another key.
    let other_user = send(&client, &urls[0], "", Some("k1"), "bob", "10 EUR").await;
    assert_eq!(other_user.status(), StatusCode::CREATED);
    assert!(other_user.headers().get("idempotent-replayed").is_none());
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

async fn a_concurrent_duplicate_gets_409<H: Harness>(harness: &H)
where
    H::Backend: ResponseStore,
{
    let runs = Arc::new(AtomicUsize::new(0));
    let urls = instances(harness, &runs).await;
    let client = Client::new();
    let slow = send(&client, &urls[0], "slow", Some("k2"), "ann", "5 EUR");
    let duplicate = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        send(&client, &urls[1], "slow", Some("k2"), "ann", "5 EUR").await
    };
    let (slow, duplicate) = tokio::join!(slow, duplicate);
    assert_eq!(slow.status(), StatusCode::CREATED);
    assert_eq!(duplicate.status(), StatusCode::CONFLICT);
    assert!(duplicate.headers().contains_key("retry-after"));
    let problem: serde_json::Value = duplicate.json().await.unwrap();
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("still being processed"),
        "{problem}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let later = send(&client, &urls[1], "slow", Some("k2"), "ann", "5 EUR").await;
    assert_eq!(later.headers()["idempotent-replayed"], "true");
}

/// A 5xx is the handler's answer like any other: replayed, not run again (Stripe does the
/// same); only answers given before the handler ran leave the key free.
async fn server_errors_are_replayed<H: Harness>(harness: &H)
where
    H::Backend: ResponseStore,
{
    let runs = Arc::new(AtomicUsize::new(0));
    let urls = instances(harness, &runs).await;
    let client = Client::new();
    let failed = send(&client, &urls[0], "fail=1", Some("k3"), "ann", "7 EUR").await;
    assert_eq!(failed.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let first_body = failed.text().await.unwrap();
    let retried = send(&client, &urls[1], "fail=1", Some("k3"), "ann", "7 EUR").await;
    assert_eq!(
        retried.status(),
        StatusCode::INTERNAL_SERVER_ERROR,
        "the retry ran the work again"
    );
    assert_eq!(retried.headers()["idempotent-replayed"], "true");
    assert_eq!(retried.text().await.unwrap(), first_body);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// Answers that cannot be replayed (too large, streamed, a panic) leave a tombstone: the
/// retry is told the first result cannot be replayed, and nothing runs twice.
async fn unkeepable_answers_leave_a_tombstone<H: Harness>(harness: &H)
where
    H::Backend: ResponseStore,
{
    let runs = Arc::new(AtomicUsize::new(0));
    let urls = instances(harness, &runs).await;
    let client = Client::new();
    for (i, query) in ["big", "stream", "panic"].into_iter().enumerate() {
        let key = format!("tomb-{query}");
        let first = send(&client, &urls[0], query, Some(&key), "ann", "1 EUR").await;
        if query == "panic" {
            assert_eq!(first.status(), StatusCode::INTERNAL_SERVER_ERROR);
        } else {
            assert_eq!(first.status(), StatusCode::CREATED, "{query}");
            let body = first.text().await.unwrap();
            assert!(body.len() > 10, "{query}: the first answer came out whole");
        }
        for url in &urls {
            let retry = send(&client, url, query, Some(&key), "ann", "1 EUR").await;
            assert_eq!(retry.status(), StatusCode::CONFLICT, "{query}: retry");
            assert!(retry.headers().get("retry-after").is_none(), "{query}");
            assert_eq!(retry.headers()["content-type"], "application/problem+json");
            let problem: serde_json::Value = retry.json().await.unwrap();
            assert!(
                problem["detail"]
                    .as_str()
                    .unwrap()
                    .contains("cannot be replayed"),
                "{problem}"
            );
        }
        assert_eq!(runs.load(Ordering::SeqCst), i + 1, "{query} ran twice");
    }
}

/// The client hangs up while the first request runs: the work still finishes and its
/// answer is kept, so the retry gets it instead of running the work again.
async fn a_client_that_hangs_up_still_gets_its_answer_kept<H: Harness>(harness: &H)
where
    H::Backend: ResponseStore,
{
    let runs = Arc::new(AtomicUsize::new(0));
    let urls = instances(harness, &runs).await;
    let client = Client::new();
    let hung_up = client
        .post(format!("{}/charge?slow", urls[0]))
        .header("x-user", "ann")
        .header("idempotency-key", "k4")
        .body("3 EUR")
        .timeout(Duration::from_millis(150))
        .send()
        .await;
    assert!(hung_up.is_err(), "the client should have given up");
    tokio::time::sleep(Duration::from_millis(900)).await; // the work finishes meanwhile
    let retry = send(&client, &urls[1], "slow", Some("k4"), "ann", "3 EUR").await;
    assert_eq!(retry.status(), StatusCode::CREATED);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the retry ran the work again"
    );
}

/// Principal and key are kept apart: ("a b", "c") and ("a", "b c") are two keys.
async fn principal_and_key_cannot_spell_each_other<H: Harness>(harness: &H)
where
    H::Backend: ResponseStore,
{
    let runs = Arc::new(AtomicUsize::new(0));
    let urls = instances(harness, &runs).await;
    let client = Client::new();
    let first = send(&client, &urls[0], "", Some("c"), "a b", "1 EUR").await;
    let second = send(&client, &urls[0], "", Some(r#""b c""#), "a", "1 EUR").await;
    assert_eq!(first.status(), StatusCode::CREATED);
    assert_eq!(second.status(), StatusCode::CREATED);
    assert!(
        second.headers().get("idempotent-replayed").is_none(),
        "one client replayed another's answer"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// Without a principal set, two callers with the same key must not share an answer.
async fn keys_are_scoped_per_caller_by_default<H: Harness>(harness: &H)
where
    H::Backend: ResponseStore,
{
    let runs = Arc::new(AtomicUsize::new(0));
    let router = Router::new()
        .route("/charge", post(charge))
        .route_layer(IdempotencyLayer::new(harness.instance(), user))
        .with_state(runs.clone());
    let url = serve(router).await;
    let client = Client::new();
    let ann = send(&client, &url, "", Some("1"), "ann", "5 EUR").await;
    assert_eq!(ann.status(), StatusCode::CREATED);
    let bob = send(&client, &url, "", Some("1"), "bob", "5 EUR").await;
    assert!(
        bob.headers().get("idempotent-replayed").is_none(),
        "bob got ann's answer"
    );
    assert_eq!(bob.status(), StatusCode::CREATED);
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "bob's payment never happened"
    );
}

/// A replay carries the first answer's headers, byte for byte, but not hop-by-hop ones
/// nor `Set-Cookie` (unless asked for).
async fn replays_keep_the_response_headers<H: Harness>(harness: &H)
where
    H::Backend: ResponseStore,
{
    let runs = Arc::new(AtomicUsize::new(0));
    let urls = instances(harness, &runs).await;
    let client = Client::new();
    let first = send(&client, &urls[0], "headers", Some("h1"), "ann", "2 EUR").await;
    assert_eq!(first.status(), StatusCode::CREATED);
    let replay = send(&client, &urls[1], "headers", Some("h1"), "ann", "2 EUR").await;
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    let headers = replay.headers();
    assert_eq!(headers["etag"], "\"v1\"");
    assert_eq!(headers["cache-control"], "no-store");
    let links: Vec<_> = headers.get_all("link").iter().collect();
    assert_eq!(links, ["</a>; rel=next", "</b>; rel=prev"]);
    assert_eq!(headers["x-charge-id"], "1");
    assert_eq!(headers["x-name"].as_bytes(), b"caf\xe9");
    assert!(headers.get("set-cookie").is_none(), "a cookie was replayed");
    assert!(
        headers.get("x-hop").is_none(),
        "a hop-by-hop header was replayed"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// Several keys are 400; quoted keys are decoded; another body under a key still running
/// is 422, as it is after.
async fn protocol_details<H: Harness>(harness: &H)
where
    H::Backend: ResponseStore,
{
    let runs = Arc::new(AtomicUsize::new(0));
    let urls = instances(harness, &runs).await;
    let client = Client::new();
    let twice = client
        .post(format!("{}/charge", urls[0]))
        .header("x-user", "ann")
        .header("idempotency-key", "p1")
        .header("idempotency-key", "p2")
        .body("1 EUR")
        .send()
        .await
        .unwrap();
    assert_eq!(twice.status(), StatusCode::BAD_REQUEST, "two keys accepted");
    assert_eq!(runs.load(Ordering::SeqCst), 0);

    // `"a\\b"` is the structured-field string a\b: the same key as the token a\b.
    let quoted = send(&client, &urls[0], "", Some(r#""a\\b""#), "ann", "1 EUR").await;
    assert_eq!(quoted.status(), StatusCode::CREATED);
    let bare = send(&client, &urls[1], "", Some(r"a\b"), "ann", "1 EUR").await;
    assert_eq!(
        bare.headers()
            .get("idempotent-replayed")
            .map(|v| v.as_bytes()),
        Some(&b"true"[..])
    );
    for bad in [r#""a\b""#, r#""a"b""#, r#""open"#] {
        let refused = send(&client, &urls[0], "", Some(bad), "ann", "1 EUR").await;
        assert_eq!(refused.status(), StatusCode::BAD_REQUEST, "key {bad}");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    let slow = send(&client, &urls[0], "ms=1500", Some("p3"), "ann", "5 EUR");
    let other_body = async {
        tokio::time::sleep(Duration::from_millis(400)).await;
        send(&client, &urls[1], "ms=1500", Some("p3"), "ann", "6 EUR").await
    };
    let (slow, other_body) = tokio::join!(slow, other_body);
    assert_eq!(slow.status(), StatusCode::CREATED);
    assert_eq!(
        other_body.status(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "another body under a running key"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// The lock layer's 409 is given before the handler ran: it is not kept, and the retry
/// with the same key runs.
async fn answers_given_before_the_handler_ran_are_not_kept<H: Harness>(harness: &H)
where
    H::Backend: ResponseStore,
{
    let runs = Arc::new(AtomicUsize::new(0));
    let item_lock = LockLayer::new(
        harness.instance(),
        HeaderKey::new(axum::http::HeaderName::from_static("x-item")),
    )
    .key_prefix("item:")
    .max_wait(Duration::ZERO);
    let router = Router::new()
        .route(
            "/charge",
            post(charge).layer(
                tower::ServiceBuilder::new()
                    .layer(IdempotencyLayer::new(harness.instance(), user))
                    .layer(item_lock),
            ),
        )
        .with_state(runs.clone());
    let url = serve(router).await;
    let client = Client::new();
    let charge = |key: &'static str, query: &'static str| {
        client
            .post(format!("{url}/charge?{query}"))
            .header("x-user", "ann")
            .header("x-item", "tee")
            .header("idempotency-key", key)
            .body("1 EUR")
            .send()
    };
    let (holder, contended) = tokio::join!(charge("r1", "ms=1000"), async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        charge("r2", "").await
    });
    assert_eq!(holder.unwrap().status(), StatusCode::CREATED);
    assert_eq!(contended.unwrap().status(), StatusCode::CONFLICT);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let retry = charge("r2", "").await.unwrap();
    assert_eq!(
        retry.status(),
        StatusCode::CREATED,
        "the lock's 409 was kept"
    );
    assert!(retry.headers().get("idempotent-replayed").is_none());
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// A concurrency limit inside the layer counts work that runs on after its client hung
/// up: the next request is shed while it runs, and gets through after.
async fn detached_work_counts_against_limits_inside<H: Harness>(harness: &H)
where
    H::Backend: ResponseStore,
{
    async fn shed(_: tower::BoxError) -> Response {
        let mut response = (StatusCode::TOO_MANY_REQUESTS, "busy").into_response();
        response
            .extensions_mut()
            .insert(tower_redis_lock::idempotency::Retryable);
        response
    }
    let runs = Arc::new(AtomicUsize::new(0));
    let stack = tower::ServiceBuilder::new()
        .layer(IdempotencyLayer::new(harness.instance(), user))
        .layer(axum::error_handling::HandleErrorLayer::new(shed))
        .load_shed()
        .concurrency_limit(1);
    let router = Router::new()
        .route("/charge", post(charge).layer(stack))
        .with_state(runs.clone());
    let url = serve(router).await;
    let client = Client::new();
    let hung_up = client
        .post(format!("{url}/charge?ms=1500"))
        .header("x-user", "ann")
        .header("idempotency-key", "c1")
        .body("1 EUR")
        .timeout(Duration::from_millis(200))
        .send()
        .await;
    assert!(hung_up.is_err(), "the client should have given up");
    let meanwhile = send(&client, &url, "", Some("c2"), "ann", "2 EUR").await;
    assert_eq!(
        meanwhile.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "the detached work did not count"
    );
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let after = send(&client, &url, "", Some("c2"), "ann", "2 EUR").await;
    assert_eq!(after.status(), StatusCode::CREATED, "the 429 was kept");
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

macro_rules! idempotency_tests {
    ($backend:ident, $harness:expr) => {
        mod $backend {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn runs_once_and_replays() {
                super::runs_once_and_replays(&$harness).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_concurrent_duplicate_gets_409() {
                super::a_concurrent_duplicate_gets_409(&$harness).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn server_errors_are_replayed() {
                super::server_errors_are_replayed(&$harness).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn unkeepable_answers_leave_a_tombstone() {
                super::unkeepable_answers_leave_a_tombstone(&$harness).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn answers_given_before_the_handler_ran_are_not_kept() {
                super::answers_given_before_the_handler_ran_are_not_kept(&$harness).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn detached_work_counts_against_limits_inside() {
                super::detached_work_counts_against_limits_inside(&$harness).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn keys_are_scoped_per_caller_by_default() {
                super::keys_are_scoped_per_caller_by_default(&$harness).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn replays_keep_the_response_headers() {
                super::replays_keep_the_response_headers(&$harness).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn protocol_details() {
                super::protocol_details(&$harness).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_client_that_hangs_up_still_gets_its_answer_kept() {
                super::a_client_that_hangs_up_still_gets_its_answer_kept(&$harness).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn principal_and_key_cannot_spell_each_other() {
                super::principal_and_key_cannot_spell_each_other(&$harness).await;
            }
        }
    };
}

idempotency_tests!(memory, support::Memory::new());
idempotency_tests!(redis, support::Redis::spawn());

/// Redis frozen past the key's lease while the first request runs: the retry that comes
/// after finds the key's record, not a free key, and the work never runs twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_lease_never_runs_the_work_twice() {
    let harness = support::Redis::spawn();
    let runs = Arc::new(AtomicUsize::new(0));
    let urls = instances_with(&harness, &runs, |layer| layer.lease(Duration::from_secs(1))).await;
    let client = Client::new();
    let first = {
        let (client, url) = (client.clone(), urls[0].clone());
        tokio::spawn(
            async move { send(&client, &url, "ms=3000", Some("l1"), "ann", "9 EUR").await },
        )
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    harness.server.pause();
    tokio::time::sleep(Duration::from_millis(2000)).await; // past the 1 s lease
    harness.server.resume();
    let retry = send(&client, &urls[1], "ms=3000", Some("l1"), "ann", "9 EUR").await;
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the retry ran the work again"
    );
    assert_eq!(retry.status(), StatusCode::CONFLICT);
    assert!(retry.headers().contains_key("retry-after"));
    let first = first.await.unwrap();
    assert!(
        !first.status().is_success(),
        "the first went on without its lock"
    );
    let later = send(&client, &urls[0], "ms=3000", Some("l1"), "ann", "9 EUR").await;
    assert_eq!(later.status(), StatusCode::CONFLICT);
    let problem: serde_json::Value = later.json().await.unwrap();
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("outcome is unknown"),
        "{problem}"
    );
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "a later retry ran the work again"
    );
}

/// The store fails at the moment the answer is written (Redis out of memory): the key's
/// record says "started", and retries after the lease get 409, not a second run; once
/// memory is back, the answer (retried in the background) is replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_store_never_runs_the_work_twice() {
    let harness = support::Redis::spawn();
    let runs = Arc::new(AtomicUsize::new(0));
    let url = harness.server.url();
    let handler = {
        let runs = runs.clone();
        move || {
            let (runs, url) = (runs.clone(), url.clone());
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                let client = deadpool_redis::redis::Client::open(url).unwrap();
                let mut conn = client.get_multiplexed_async_connection().await.unwrap();
                let () = deadpool_redis::redis::cmd("CONFIG")
                    .arg("SET")
                    .arg("maxmemory")
                    .arg("1")
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                (StatusCode::CREATED, "charged")
            }
        }
    };
    let layer = IdempotencyLayer::new(harness.instance(), user).lease(Duration::from_secs(1));
    let app = serve(
        Router::new()
            .route("/charge", post(handler))
            .route_layer(layer),
    )
    .await;
    let client = Client::new();
    let first = send(&client, &app, "", Some("m1"), "ann", "4 EUR").await;
    assert_eq!(
        first.status(),
        StatusCode::CREATED,
        "the client still gets its answer"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await; // past the lease, still OOM
    let retry = send(&client, &app, "", Some("m1"), "ann", "4 EUR").await;
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the retry ran the work again"
    );
    assert_eq!(retry.status(), StatusCode::CONFLICT);
    assert!(retry.headers().contains_key("retry-after"));
    // Memory is back: the answer, retried in the background, is written and replayed.
    harness.server.query::<()>(
        deadpool_redis::redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxmemory")
            .arg("0"),
    );
    let mut replayed = None;
    for _ in 0..50 {
        let retry = send(&client, &app, "", Some("m1"), "ann", "4 EUR").await;
        if retry.status() != StatusCode::CONFLICT {
            replayed = Some(retry);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let replayed = replayed.expect("the answer was never written");
    assert_eq!(replayed.status(), StatusCode::CREATED);
    assert_eq!(replayed.headers()["idempotent-replayed"], "true");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// Redis restarted empty while the first request runs (its record lost): a retry runs
/// the work again (nothing can know the first ran), but the first, finishing later, can
/// no longer write over the retry's record: replays say what the last owner answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_record_is_never_overwritten_by_its_first_owner() {
    let mut harness = support::Redis::spawn();
    let runs = Arc::new(AtomicUsize::new(0));
    let urls = instances_with(&harness, &runs, |layer| {
        layer
            .lease(Duration::from_secs(1))
            .on_lock_lost(tower_redis_lock::LossPolicy::Signal)
    })
    .await;
    let client = Client::new();
    let first = {
        let (client, url) = (client.clone(), urls[0].clone());
        tokio::spawn(async move {
            send(&client, &url, "first_ms=2500", Some("w1"), "ann", "9 EUR").await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    harness.server.restart(); // empty: no persistence
    let mut retry = None;
    for _ in 0..50 {
        let answer = send(
            &client,
            &urls[1],
            "first_ms=2500",
            Some("w1"),
            "ann",
            "9 EUR",
        )
        .await;
        if answer.status() != StatusCode::SERVICE_UNAVAILABLE {
            retry = Some(answer);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let retry = retry.expect("no answer after the restart");
    assert_eq!(retry.status(), StatusCode::CREATED);
    let retry_body = retry.text().await.unwrap();
    assert!(retry_body.starts_with("charged run 2"), "{retry_body}");
    let first = first.await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    assert!(first.text().await.unwrap().starts_with("charged run 1"));
    for url in &urls {
        let replay = send(&client, url, "first_ms=2500", Some("w1"), "ann", "9 EUR").await;
        assert_eq!(replay.headers()["idempotent-replayed"], "true");
        assert_eq!(
            replay.text().await.unwrap(),
            retry_body,
            "the first owner wrote last"
        );
    }
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// The reply to the script that begins the record is lost (it came after the command
/// timeout): the request answers 503, and takes its record back, so the retry runs
/// instead of meeting "outcome unknown" for a run that never happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_reply_to_the_begin_does_not_take_the_key() {
    let harness = support::Redis::spawn();
    let proxy = support::proxy::Proxy::start(harness.server.port()).await;
    let backend = tower_redis_lock::RedisBackend::new(support::pool(&proxy.url()))
        .command_timeout(Duration::from_millis(500));
    let runs = Arc::new(AtomicUsize::new(0));
    // An unusual ttl, to spot the begin script on the wire (its last argument).
    let layer = IdempotencyLayer::new(backend, user).retention(Duration::from_millis(86_400_123));
    let router = Router::new()
        .route("/charge", post(charge))
        .route_layer(layer)
        .with_state(runs.clone());
    let url = serve(router).await;
    let client = Client::new();
    let warm = send(&client, &url, "", Some("warm"), "ann", "1 EUR").await;
    assert_eq!(warm.status(), StatusCode::CREATED); // the scripts are loaded now
    proxy.delay_reply_to(b"86400123", Duration::from_millis(800));
    let first = send(&client, &url, "", Some("b1"), "ann", "2 EUR").await;
    assert_eq!(first.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the handler ran without a record"
    );
    tokio::time::sleep(Duration::from_millis(500)).await; // the late reply is gone
    let mut retry = None;
    for _ in 0..30 {
        let answer = send(&client, &url, "", Some("b1"), "ann", "2 EUR").await;
        if answer.status() != StatusCode::SERVICE_UNAVAILABLE {
            retry = Some(answer);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let retry = retry.expect("no answer");
    assert_eq!(retry.status(), StatusCode::CREATED, "the key stayed taken");
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// Redis down before the handler runs: 503 + `Retry-After`, the handler not called; back
/// up, the same key runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_answers_503_without_running() {
    let mut harness = support::Redis::spawn();
    let runs = Arc::new(AtomicUsize::new(0));
    let urls = instances(&harness, &runs).await;
    let client = Client::new();
    harness.server.kill();
    let down = send(&client, &urls[0], "", Some("d1"), "ann", "3 EUR").await;
    assert_eq!(down.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(down.headers().contains_key("retry-after"));
    assert_eq!(
        runs.load(Ordering::SeqCst),
        0,
        "the handler ran without a record"
    );
    harness.server.restart();
    let mut status = StatusCode::SERVICE_UNAVAILABLE;
    for _ in 0..50 {
        status = send(&client, &urls[0], "", Some("d1"), "ann", "3 EUR")
            .await
            .status();
        if status != StatusCode::SERVICE_UNAVAILABLE {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}
