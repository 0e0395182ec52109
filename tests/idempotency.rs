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

use axum::{Router, extract::State, http::StatusCode, routing::post};
use reqwest::Client;
use support::{Harness, serve};
use tower_redis_lock::idempotency::{IdempotencyLayer, ResponseStore};

/// Counts its runs; `fail=N` answers 500 while it has run fewer than N times; `slow`
/// takes 600 ms.
async fn charge(
    State(runs): State<Arc<AtomicUsize>>,
    axum::extract::Query(params): axum::extract::Query<std::collections::HashMap<String, String>>,
    body: String,
) -> (StatusCode, String) {
    let run = runs.fetch_add(1, Ordering::SeqCst) + 1;
    if params.contains_key("slow") {
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    let fail_until: usize = params.get("fail").and_then(|n| n.parse().ok()).unwrap_or(0);
    if run <= fail_until {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            "payment provider down".into(),
        );
    }
    (StatusCode::CREATED, format!("charged run {run} for {body}"))
}

async fn instances<H: Harness>(harness: &H, runs: &Arc<AtomicUsize>) -> Vec<String>
where
    H::Backend: ResponseStore,
{
    let mut urls = Vec::new();
    for _ in 0..2 {
        let layer = IdempotencyLayer::new(harness.instance())
            .principal(|parts| Some(parts.headers.get("x-user")?.to_str().ok()?.to_owned()));
        let router = Router::new()
            .route("/charge", post(charge))
            .route_layer(layer)
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
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let later = send(&client, &urls[1], "slow", Some("k2"), "ann", "5 EUR").await;
    assert_eq!(later.headers()["idempotent-replayed"], "true");
}

async fn server_errors_are_not_kept<H: Harness>(harness: &H)
where
    H::Backend: ResponseStore,
{
    let runs = Arc::new(AtomicUsize::new(0));
    let urls = instances(harness, &runs).await;
    let client = Client::new();
    let failed = send(&client, &urls[0], "fail=1", Some("k3"), "ann", "7 EUR").await;
    assert_eq!(failed.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let retried = send(&client, &urls[1], "fail=1", Some("k3"), "ann", "7 EUR").await;
    assert_eq!(
        retried.status(),
        StatusCode::CREATED,
        "the 500 was replayed"
    );
    assert!(retried.headers().get("idempotent-replayed").is_none());
    let replayed = send(&client, &urls[0], "fail=1", Some("k3"), "ann", "7 EUR").await;
    assert_eq!(replayed.headers()["idempotent-replayed"], "true");
    assert_eq!(runs.load(Ordering::SeqCst), 2);
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
    let second = send(&client, &urls[0], "", Some("b c"), "a", "1 EUR").await;
    assert_eq!(first.status(), StatusCode::CREATED);
    assert_eq!(second.status(), StatusCode::CREATED);
    assert!(
        second.headers().get("idempotent-replayed").is_none(),
        "one client replayed another's answer"
    );
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
            async fn server_errors_are_not_kept() {
                super::server_errors_are_not_kept(&$harness).await;
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
