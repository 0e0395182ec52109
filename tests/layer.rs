//! The layer's wiring, key extraction and answers, on the in-process backend: every
//! router position, every key extractor, missing and bad keys, prefixes, the `Held`
//! extractor without the layer, and the inner service's errors.

use std::{convert::Infallible, time::Duration};

use axum::{
    Router,
    body::Body,
    routing::{get, post},
};
use http::{HeaderName, Request, Response, StatusCode, request::Parts};
use tower::{ServiceBuilder, ServiceExt, service_fn};
use tower_redis_lock::{
    BackendErrorPolicy, HeaderKey, Held, InMemoryBackend, LockBackend, LockKey, LockLayer,
    MissingKeyPolicy, PathKey, QueryKey, backend::Acquire,
};
use uuid::Uuid;

const TTL: Duration = Duration::from_secs(30);

/// Answers with the key of the lock the request holds, or "unlocked".
async fn whoami(lock: Option<Held>) -> String {
    lock.map_or_else(|| "unlocked".to_owned(), |held| held.key().to_string())
}

async fn call(router: &Router, method: &str, uri: &str) -> (StatusCode, String) {
    call_with(
        router,
        Request::builder()
            .method(method)
            .uri(uri)
            .body(Body::empty())
            .unwrap(),
    )
    .await
}

async fn call_with(router: &Router, request: Request<Body>) -> (StatusCode, String) {
    let response = router.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let body = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

/// Holds `key` in `backend` for another owner, as a request elsewhere would.
async fn hold(backend: &InMemoryBackend, key: &str) -> Uuid {
    let token = Uuid::new_v4();
    let acquired = backend
        .try_acquire(&LockKey::from(key), token, TTL)
        .await
        .unwrap();
    assert_eq!(
        acquired,
        Acquire::Acquired {
            fencing_token: None
        }
    );
    token
}

#[tokio::test]
async fn path_param_works_with_every_way_of_adding_the_layer() {
    let backend = InMemoryBackend::new();
    let layer = LockLayer::new(backend.clone(), PathKey::new("id")).max_wait(Duration::ZERO);
    let router = Router::new()
        .route("/route-layer/{id}", post(whoami))
        .route_layer(layer.clone().key_prefix("a:"));
    let router = router.merge(
        Router::new()
            .route("/layer/{id}", post(whoami))
            .layer(layer.clone().key_prefix("b:")),
    );
    let router = router.route("/method/{id}", post(whoami).layer(layer.key_prefix("c:")));

    assert_eq!(
        call(&router, "POST", "/route-layer/7").await,
        (StatusCode::OK, "a:7".into())
    );
    assert_eq!(
        call(&router, "POST", "/layer/7").await,
        (StatusCode::OK, "b:7".into())
    );
    assert_eq!(
        call(&router, "POST", "/method/7").await,
        (StatusCode::OK, "c:7".into())
    );
    assert_eq!(
        backend.held_count(),
        0,
        "each lock is released with its response"
    );

    hold(&backend, "b:7").await;
    assert_eq!(
        call(&router, "POST", "/layer/7").await.0,
        StatusCode::CONFLICT
    );
    assert_eq!(
        call(&router, "POST", "/route-layer/7").await.0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn path_param_is_percent_decoded() {
    let router = Router::new()
        .route("/items/{sku}", post(whoami))
        .route_layer(LockLayer::new(InMemoryBackend::new(), PathKey::new("sku")));
    assert_eq!(
        call(&router, "POST", "/items/a%20b").await,
        (StatusCode::OK, "a b".into())
    );
}

#[tokio::test]
async fn header_query_and_closure_keys() {
    let backend = InMemoryBackend::new();
    let tenant = |parts: &Parts| {
        parts
            .uri
            .path()
            .strip_prefix("/closure/")
            .map(str::to_owned)
    };
    let router = Router::new()
        .route("/header", post(whoami))
        .route_layer(LockLayer::new(
            backend.clone(),
            HeaderKey::new(HeaderName::from_static("x-order")),
        ))
        .merge(
            Router::new()
                .route("/query", post(whoami))
                .route_layer(LockLayer::new(backend.clone(), QueryKey::new("order"))),
        )
        .merge(
            Router::new()
                .route("/closure/{tenant}", post(whoami))
                .route_layer(LockLayer::new(backend.clone(), tenant)),
        );

    let request = Request::post("/header")
        .header("x-order", "h-1")
        .body(Body::empty())
        .unwrap();
    assert_eq!(
        call_with(&router, request).await,
        (StatusCode::OK, "h-1".into())
    );
    assert_eq!(
        call(&router, "POST", "/query?order=q-1").await,
        (StatusCode::OK, "q-1".into())
    );
    assert_eq!(
        call(&router, "POST", "/closure/acme").await,
        (StatusCode::OK, "acme".into())
    );
}

#[tokio::test]
async fn a_missing_key_answers_400_unless_passed_through() {
    let backend = InMemoryBackend::new();
    let strict = Router::new()
        .route("/strict", post(whoami))
        .route_layer(LockLayer::new(backend.clone(), QueryKey::new("order")));
    let lenient = Router::new().route("/lenient", post(whoami)).route_layer(
        LockLayer::new(backend.clone(), QueryKey::new("order"))
            .on_missing_key(MissingKeyPolicy::PassThrough),
    );

    let (status, body) = call(&strict, "POST", "/strict").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let problem: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(problem["status"], 400);
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("does not name")
    );
    assert_eq!(
        call(&strict, "POST", "/strict?order=").await.0,
        StatusCode::BAD_REQUEST
    );

    assert_eq!(
        call(&lenient, "POST", "/lenient").await,
        (StatusCode::OK, "unlocked".into())
    );
    assert_eq!(
        call(&lenient, "POST", "/lenient?order=1").await,
        (StatusCode::OK, "1".into())
    );
}

#[tokio::test]
async fn empty_and_oversized_keys_answer_400() {
    let router = Router::new().route("/raw", post(whoami)).route_layer(
        LockLayer::new(InMemoryBackend::new(), |parts: &Parts| {
            parts
                .uri
                .query()
                .map(|q| q.trim_start_matches("k=").to_owned())
        })
        .max_key_len(16),
    );
    let (status, body) = call(&router, "POST", "/raw?k=").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("empty"), "{body}");
    let (status, body) = call(&router, "POST", &format!("/raw?k={}", "x".repeat(17))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("longer than 16 bytes"), "{body}");
    assert_eq!(
        call(&router, "POST", &format!("/raw?k={}", "x".repeat(16)))
            .await
            .0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn prefixes_keep_two_routes_apart() {
    let backend = InMemoryBackend::new();
    let layer = LockLayer::new(backend.clone(), PathKey::new("id")).max_wait(Duration::ZERO);
    let router = Router::new()
        .route("/pay/{id}", post(whoami))
        .route_layer(layer.clone().key_prefix("pay:"))
        .merge(
            Router::new()
                .route("/refund/{id}", post(whoami))
                .route_layer(layer.key_prefix("refund:")),
        );
    hold(&backend, "pay:5").await;
    assert_eq!(
        call(&router, "POST", "/pay/5").await.0,
        StatusCode::CONFLICT
    );
    assert_eq!(
        call(&router, "POST", "/refund/5").await,
        (StatusCode::OK, "refund:5".into())
    );
}

#[tokio::test]
async fn held_without_the_layer_answers_500_naming_it() {
    async fn needs_lock(_lock: Held) -> &'static str {
        "unreachable"
    }
    let router = Router::new()
        .route("/", get(needs_lock))
        .route("/optional", get(whoami));
    let (status, body) = call(&router, "GET", "/").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(body.contains("LockLayer"), "{body}");
    assert_eq!(
        call(&router, "GET", "/optional").await,
        (StatusCode::OK, "unlocked".into())
    );
}

#[tokio::test]
async fn custom_rejection_response_replaces_the_default() {
    let backend = InMemoryBackend::new();
    hold(&backend, "busy").await;
    let router = Router::new().route("/{id}", post(whoami)).route_layer(
        LockLayer::new(backend, PathKey::new("id"))
            .max_wait(Duration::ZERO)
            .rejection_response(|rejection| {
                let mut response =
                    Response::new(format!("custom {}", rejection.status().as_u16()).into());
                *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
                response
            }),
    );
    assert_eq!(
        call(&router, "POST", "/busy").await,
        (StatusCode::TOO_MANY_REQUESTS, "custom 409".into())
    );
}

/// A plain tower stack: the inner service's errors pass through unchanged (the layer
/// keeps `S::Error`), and the lock is released on that path too.
#[tokio::test]
async fn inner_errors_pass_through_and_release() {
    let backend = InMemoryBackend::new();
    let service = ServiceBuilder::new()
        .layer(LockLayer::new(backend.clone(), QueryKey::new("id")))
        .service(service_fn(|request: Request<Body>| async move {
            assert!(request.extensions().get::<Held>().is_some());
            if request.uri().query() == Some("id=fail") {
                return Err("inner failure");
            }
            Ok::<_, &str>(Response::new(Body::empty()))
        }));
    let failed = service
        .clone()
        .oneshot(Request::get("/?id=fail").body(Body::empty()).unwrap())
        .await;
    assert_eq!(failed.unwrap_err(), "inner failure");
    let ok = service
        .oneshot(Request::get("/?id=ok").body(Body::empty()).unwrap())
        .await;
    assert_eq!(ok.unwrap().status(), StatusCode::OK);
    assert_eq!(backend.held_count(), 0);
}

/// A backend that is down: 503 with `Retry-After` by default; the handler runs unlocked
/// only with `BackendErrorPolicy::Open`.
#[tokio::test]
async fn backend_failure_answers_503_or_fails_open() {
    #[derive(Clone, Debug)]
    struct Down;
    impl LockBackend for Down {
        async fn try_acquire(
            &self,
            _: &LockKey,
            _: Uuid,
            _: Duration,
        ) -> Result<Acquire, tower_redis_lock::BackendError> {
            Err(tower_redis_lock::BackendError::Timeout(
                Duration::from_millis(1),
            ))
        }
        async fn release(
            &self,
            _: &LockKey,
            _: Uuid,
        ) -> Result<tower_redis_lock::backend::Released, tower_redis_lock::BackendError> {
            Ok(Default::default())
        }
        async fn extend(
            &self,
            _: &LockKey,
            _: Uuid,
            _: Duration,
        ) -> Result<bool, tower_redis_lock::BackendError> {
            Ok(false)
        }
    }
    let closed = Router::new()
        .route("/{id}", post(whoami))
        .route_layer(LockLayer::new(Down, PathKey::new("id")).max_wait(Duration::from_millis(50)));
    let response = closed
        .oneshot(Request::post("/1").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()["retry-after"], "1");
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );

    let open = Router::new().route("/{id}", post(whoami)).route_layer(
        LockLayer::new(Down, PathKey::new("id")).on_backend_error(BackendErrorPolicy::Open),
    );
    assert_eq!(
        call(&open, "POST", "/1").await,
        (StatusCode::OK, "unlocked".into())
    );
}

#[test]
fn response_future_is_send() {
    fn assert_send<T: Send>(_: &T) {}
    let mut service = ServiceBuilder::new()
        .layer(LockLayer::new(InMemoryBackend::new(), QueryKey::new("id")))
        .service(service_fn(|_: Request<Body>| async {
            Ok::<_, Infallible>(Response::new(Body::empty()))
        }));
    let future = tower::Service::call(&mut service, Request::new(Body::empty()));
    assert_send(&future);
}

/// `Drop` must neither panic nor block when the runtime is gone: the lock is then left
/// to its lease.
#[test]
fn dropping_a_locked_request_after_its_runtime_does_not_panic() {
    let backend = InMemoryBackend::new();
    let mut service = ServiceBuilder::new()
        .layer(LockLayer::new(backend.clone(), QueryKey::new("id")))
        .service(service_fn(|_: Request<Body>| {
            std::future::pending::<Result<Response<Body>, Infallible>>()
        }));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let request = Request::get("/?id=1").body(Body::empty()).unwrap();
    let mut future = Box::pin(tower::Service::call(&mut service, request));
    runtime.block_on(async {
        let still_running = tokio::time::timeout(Duration::from_millis(50), &mut future).await;
        assert!(still_running.is_err(), "the handler never answers");
    });
    assert_eq!(backend.held_count(), 1);
    drop(runtime);
    drop(future);
    assert_eq!(
        backend.held_count(),
        1,
        "without a runtime the lease is the last resort"
    );
}
