//! Behaviour every backend must show, run against the in-process backend and against a
//! real Redis spawned by the test: one generic body per behaviour, one instance each.

mod support;

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    extract::{FromRef, State},
    routing::post,
};
use http::StatusCode;
use support::{APP_TIMEOUT, Counter, Harness, app, eventually, serve};
use tower_redis_lock::{
    Held, LockBackend, LockKey, LockLayer, LockRejection, Locker, PathKey, backend::Acquire,
};
use uuid::Uuid;

const TTL: Duration = Duration::from_secs(30);

/// 64 clients pay the same order at once, retrying 409 a bounded number of times: every
/// 200 must be one increment of the non-atomic counter, and nothing may fail with 5xx.
async fn mutual_exclusion(harness: &impl Harness, instances: usize) {
    let mut urls = Vec::new();
    for _ in 0..instances {
        let router = app(harness.instance(), harness.counter(), |layer| {
            layer.max_wait(Duration::from_millis(500)).ttl(TTL)
        });
        urls.push(serve(router).await);
    }
    let client = reqwest::Client::new();
    let ok = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..64 {
        let url = format!("{}/orders/42/pay?work_ms=5", urls[i % urls.len()]);
        let (client, ok) = (client.clone(), ok.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..40 {
                let response = client.post(&url).send().await.expect("request");
                let status = response.status();
                assert!(!status.is_server_error(), "got {status}");
                if status == StatusCode::OK {
                    ok.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                assert_eq!(status, StatusCode::CONFLICT);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    for task in tasks {
        task.await.expect("client task");
    }
    let ok = ok.load(Ordering::Relaxed);
    assert!(
        ok >= 32,
        "too few requests got through ({ok} of 64): the test proves nothing"
    );
    assert_eq!(
        harness.counter().get("42").await,
        ok as u64,
        "lost updates: the lock leaked"
    );
    assert!(eventually(Duration::from_secs(5), || harness.held_locks() == 0).await);
}

/// A lock held elsewhere gives the configured status after about `max_wait`, with
/// `Retry-After` no larger than the holder's lease or the hint, and a problem body.
async fn contended(harness: &impl Harness, status: StatusCode) {
    let holder = harness.instance();
    let token = Uuid::new_v4();
    let lease = Duration::from_secs(5);
    let key = LockKey::from("order:7");
    assert_eq!(
        holder.try_acquire(&key, token, lease).await.unwrap(),
        Acquire::Acquired {
            fencing_token: None
        }
    );

    let router = app(harness.instance(), harness.counter(), |layer| {
        layer
            .max_wait(Duration::from_millis(100))
            .retry_after_cap(Duration::from_secs(60))
            .contended_status(status)
    });
    let url = serve(router).await;
    let started = Instant::now();
    let response = reqwest::Client::new()
        .post(format!("{url}/orders/7/pay"))
        .send()
        .await
        .unwrap();
    let elapsed = started.elapsed();
    assert_eq!(response.status(), status);
    assert!(
        elapsed >= Duration::from_millis(100),
        "answered before max_wait: {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(3),
        "answered long after max_wait: {elapsed:?}"
    );
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (1..=5).contains(&retry_after),
        "Retry-After {retry_after} exceeds the 5 s lease"
    );
    assert!(
        retry_after >= 4,
        "Retry-After {retry_after} should be the lease left, ~5 s"
    );
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["status"], status.as_u16());
    assert_eq!(
        harness.counter().get("7").await,
        0,
        "the handler ran without the lock"
    );

    // With the default hint (1 s), the hint wins over the 5 s lease.
    let router = app(harness.instance(), harness.counter(), |layer| {
        layer.max_wait(Duration::ZERO)
    });
    let url = serve(router).await;
    let response = reqwest::Client::new()
        .post(format!("{url}/orders/7/pay"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["retry-after"], "1");
    assert!(holder.release(&key, token).await.unwrap().was_held);
}

/// A request dropped mid-handler, by the app's own timeout or by the client hanging up,
/// frees its lock at once: the next request gets it long before the 30 s lease ends.
async fn release_on_drop(harness: &impl Harness) {
    let router = app(harness.instance(), harness.counter(), |layer| {
        layer.max_wait(Duration::from_secs(3)).ttl(TTL)
    });
    let url = serve(router).await;
    let client = reqwest::Client::new();
    let slow = format!("{url}/orders/9/pay?work_ms=10000");
    let quick = format!("{url}/orders/9/pay");

    let response = client.post(&slow).send().await.unwrap();
    assert_eq!(
        response.status(),
        StatusCode::REQUEST_TIMEOUT,
        "outer timeout after {APP_TIMEOUT:?}"
    );
    let response = client.post(&quick).send().await.unwrap();
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "lock left behind by a timed-out request"
    );

    let hung_up = client
        .post(&slow)
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(hung_up.is_err(), "the client should have given up");
    let response = client.post(&quick).send().await.unwrap();
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "lock left behind by a disconnected client"
    );
    assert!(eventually(Duration::from_secs(5), || harness.held_locks() == 0).await);
}

/// Successes, handler errors, panics, timeouts and disconnects, all at once: afterwards
/// no lock is left.
async fn no_lock_outlives_its_request(harness: &impl Harness) {
    let router = app(harness.instance(), harness.counter(), |layer| {
        layer.max_wait(Duration::from_millis(200)).ttl(TTL)
    });
    let url = serve(router).await;
    let client = reqwest::Client::new();
    let mut tasks = Vec::new();
    for i in 0..60 {
        let query = match i % 5 {
            0 => "work_ms=5",
            1 => "work_ms=5&outcome=error",
            2 => "work_ms=5&outcome=panic",
            3 => "work_ms=8000", // the app's timeout cancels it
            _ => "work_ms=1500", // the client hangs up first
        };
        let request = client.post(format!("{url}/orders/{}/pay?{query}", i % 12));
        let request = if i % 5 == 4 {
            request.timeout(Duration::from_millis(100))
        } else {
            request
        };
        tasks.push(tokio::spawn(async move {
            request.send().await.map(|r| r.status()).ok()
        }));
    }
    let mut seen = std::collections::HashSet::new();
    for task in tasks {
        if let Some(status) = task.await.unwrap() {
            seen.insert(status);
        }
    }
    for expected in [
        StatusCode::OK,
        StatusCode::INTERNAL_SERVER_ERROR,
        StatusCode::REQUEST_TIMEOUT,
    ] {
        assert!(
            seen.contains(&expected),
            "no {expected} among {seen:?}: the burst was not mixed"
        );
    }
    assert!(
        eventually(Duration::from_secs(5), || harness.held_locks() == 0).await,
        "{} locks outlived their requests",
        harness.held_locks()
    );
}

/// Only the token that holds a lock can release or extend it.
async fn only_the_owner_releases(harness: &impl Harness) {
    let backend = harness.instance();
    let key = LockKey::from("owner");
    let (owner, stranger) = (Uuid::new_v4(), Uuid::new_v4());
    assert_eq!(
        backend.try_acquire(&key, owner, TTL).await.unwrap(),
        Acquire::Acquired {
            fencing_token: None
        }
    );
    assert!(!backend.release(&key, stranger).await.unwrap().was_held);
    assert!(!backend.extend(&key, stranger, TTL).await.unwrap());
    assert!(matches!(
        backend.try_acquire(&key, stranger, TTL).await.unwrap(),
        Acquire::Held { remaining: Some(_) }
    ));
    assert!(backend.extend(&key, owner, TTL).await.unwrap());
    assert!(backend.release(&key, owner).await.unwrap().was_held);
    assert!(
        !backend.release(&key, owner).await.unwrap().was_held,
        "a second release frees nothing"
    );
    assert_eq!(
        backend.try_acquire(&key, stranger, TTL).await.unwrap(),
        Acquire::Acquired {
            fencing_token: None
        }
    );
    assert!(backend.release(&key, stranger).await.unwrap().was_held);
}

/// An acquire retried after a lost reply finds its own token and succeeds; anyone else
/// is told how long the lease has left.
async fn retried_acquire_recognises_its_token(harness: &impl Harness) {
    let backend = harness.instance();
    let key = LockKey::from("retry");
    let (token, other) = (Uuid::new_v4(), Uuid::new_v4());
    assert_eq!(
        backend.try_acquire(&key, token, TTL).await.unwrap(),
        Acquire::Acquired {
            fencing_token: None
        }
    );
    assert_eq!(
        backend.try_acquire(&key, token, TTL).await.unwrap(),
        Acquire::Acquired {
            fencing_token: None
        }
    );
    match backend.try_acquire(&key, other, TTL).await.unwrap() {
        Acquire::Held {
            remaining: Some(remaining),
        } => assert!(remaining <= TTL),
        held => panic!("expected the lease left, got {held:?}"),
    }
    assert!(backend.release(&key, token).await.unwrap().was_held);
}

/// A lease that is not released ends by itself.
async fn leases_expire(harness: &impl Harness) {
    let backend = harness.instance();
    let key = LockKey::from("expiry");
    let lease = Duration::from_millis(200);
    assert_eq!(
        backend
            .try_acquire(&key, Uuid::new_v4(), lease)
            .await
            .unwrap(),
        Acquire::Acquired {
            fencing_token: None
        }
    );
    assert!(!backend.extend(&key, Uuid::new_v4(), lease).await.unwrap());
    tokio::time::sleep(lease * 2).await;
    let next = Uuid::new_v4();
    assert_eq!(
        backend.try_acquire(&key, next, TTL).await.unwrap(),
        Acquire::Acquired {
            fencing_token: None
        }
    );
    assert!(backend.release(&key, next).await.unwrap().was_held);
}

/// A handler that runs three leases long keeps its lock throughout (the watchdog renews
/// it): another instance is refused all along, and gets the lock right after.
async fn renewal_keeps_a_long_handler_locked(harness: &impl Harness) {
    // Long enough that a renewal delayed by a loaded machine still lands in time.
    let ttl = Duration::from_millis(1500);
    let first = serve(app(harness.instance(), harness.counter(), |layer| {
        layer.ttl(ttl)
    }))
    .await;
    let second = serve(app(harness.instance(), harness.counter(), |layer| {
        layer.ttl(ttl).max_wait(Duration::ZERO)
    }))
    .await;
    let client = reqwest::Client::new();
    let long = tokio::spawn({
        let request = client.post(format!(
            "{first}/orders/3/pay?work_ms={}",
            3 * ttl.as_millis()
        ));
        async move { request.send().await.unwrap().status() }
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let mut refused = 0;
    while !long.is_finished() {
        let status = client
            .post(format!("{second}/orders/3/pay"))
            .send()
            .await
            .unwrap()
            .status();
        if long.is_finished() {
            break; // the lock may be free by now
        }
        assert_eq!(
            status,
            StatusCode::CONFLICT,
            "lock lost after {refused} refusals"
        );
        refused += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(long.await.unwrap(), StatusCode::OK);
    assert!(
        refused >= 10,
        "only {refused} attempts during the long handler"
    );
    let status = client
        .post(format!("{second}/orders/3/pay"))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, StatusCode::OK, "the lock outlived its request");
}

/// Fencing tokens grow strictly in acquisition order: 1,000 critical sections through two
/// app instances each record theirs, and the record is strictly increasing.
async fn fencing_tokens_increase_in_acquisition_order(harness: &impl Harness) {
    async fn record(State(seen): State<Arc<Mutex<Vec<u64>>>>, lock: Held) -> StatusCode {
        seen.lock()
            .unwrap()
            .push(lock.fencing_token().expect("fencing is on"));
        tokio::task::yield_now().await;
        StatusCode::OK
    }
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut urls = Vec::new();
    for _ in 0..2 {
        let layer = LockLayer::new(harness.fenced_instance(), PathKey::new("id"))
            .max_wait(Duration::from_secs(2));
        let router = Router::new()
            .route("/fenced/{id}", post(record))
            .route_layer(layer)
            .with_state(seen.clone());
        urls.push(serve(router).await);
    }
    let client = reqwest::Client::new();
    let tasks: Vec<_> = (0..16)
        .map(|worker| {
            let (client, url) = (client.clone(), urls[worker % 2].clone());
            tokio::spawn(async move {
                let mut done = 0;
                while done < 1000 / 16 + usize::from(worker < 1000 % 16) {
                    let response = client
                        .post(format!("{url}/fenced/hot"))
                        .send()
                        .await
                        .unwrap();
                    match response.status() {
                        StatusCode::OK => done += 1,
                        StatusCode::CONFLICT => {}
                        other => panic!("unexpected {other}"),
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1000);
    assert!(
        seen.windows(2).all(|pair| pair[0] < pair[1]),
        "fencing tokens out of order"
    );
}

/// A holder stalled past its lease presents a smaller token than the holder after it, so
/// a storage that refuses old tokens refuses its late write.
async fn a_stale_holder_has_the_smaller_token(harness: &impl Harness) {
    let backend = harness.fenced_instance();
    let key = LockKey::from("stale");
    let lease = Duration::from_millis(200);
    let Acquire::Acquired {
        fencing_token: Some(stale),
    } = backend
        .try_acquire(&key, Uuid::new_v4(), lease)
        .await
        .unwrap()
    else {
        panic!("no fencing token");
    };
    tokio::time::sleep(lease * 2).await; // the holder "pauses" past its lease
    let fresh_owner = Uuid::new_v4();
    let Acquire::Acquired {
        fencing_token: Some(fresh),
    } = backend.try_acquire(&key, fresh_owner, TTL).await.unwrap()
    else {
        panic!("the expired lock was not free");
    };
    assert!(fresh > stale, "fresh {fresh} <= stale {stale}");
    // The current holder acquiring again (a retry, or a hand-off) is recognised, and
    // moves the token on: every holder's is larger than the one before.
    let Acquire::Acquired {
        fencing_token: Some(again),
    } = backend.try_acquire(&key, fresh_owner, TTL).await.unwrap()
    else {
        panic!("the holder was not recognised");
    };
    assert!(again > fresh, "again {again} <= fresh {fresh}");
    let fresh = again;

    let mut store = FencedStore::default();
    assert!(store.write(fresh, "new"));
    assert!(
        !store.write(stale, "late"),
        "the stale holder's write was accepted"
    );
    assert_eq!(store.value, "new");
}

/// The storage side of fencing: refuses writes with a token older than the newest seen.
#[derive(Default)]
struct FencedStore {
    newest: u64,
    value: &'static str,
}

impl FencedStore {
    fn write(&mut self, token: u64, value: &'static str) -> bool {
        if token < self.newest {
            return false;
        }
        self.newest = token;
        self.value = value;
        true
    }
}

/// The in-handler form: a key from the body, locked with `Locker`; the same exclusion,
/// answers and release-on-drop as the layer, and no waiting for a lock the request holds.
#[derive(Clone)]
struct TransferState<B: LockBackend> {
    locker: Locker<B>,
    counter: Counter,
}

impl<B: LockBackend> FromRef<TransferState<B>> for Locker<B> {
    fn from_ref(state: &TransferState<B>) -> Self {
        state.locker.clone()
    }
}

async fn locker_in_a_handler<H: Harness>(harness: &H) {
    #[derive(serde::Deserialize)]
    struct Body {
        account: String,
        #[serde(default)]
        work_ms: u64,
    }
    async fn transfer<B: LockBackend>(
        State(TransferState { locker, counter }): State<TransferState<B>>,
        Json(body): Json<Body>,
    ) -> Result<String, LockRejection> {
        let lock = locker.lock(body.account.clone()).await?;
        let balance = counter.get(&body.account).await;
        tokio::time::sleep(Duration::from_millis(body.work_ms)).await;
        counter.set(&body.account, balance + 1).await;
        Ok(lock.key().to_string())
    }
    async fn twice<B: LockBackend>(locker: Locker<B>) -> Result<&'static str, LockRejection> {
        let first = locker.lock("twice").await?;
        let again = locker.lock("twice").await.err();
        assert!(matches!(again, Some(LockRejection::AlreadyHeld)));
        first.release().await;
        let _second = locker.lock("twice").await?;
        Ok("ok")
    }
    async fn under_layer<B: LockBackend>(locker: Locker<B>) -> Result<&'static str, LockRejection> {
        // The layer holds `acct:7` for this request already.
        let _lock = locker.lock("7").await?;
        Ok("unreachable")
    }

    let locker = Locker::new(harness.instance())
        .key_prefix("acct:")
        .max_wait(Duration::from_millis(300))
        .retry_after_cap(Duration::from_secs(30));
    let counter = harness.counter();
    let router = Router::new()
        .route("/transfer", post(transfer::<H::Backend>))
        .route("/twice", post(twice::<H::Backend>))
        .route(
            "/under-layer/{id}",
            post(under_layer::<H::Backend>)
                .layer(LockLayer::new(harness.instance(), PathKey::new("id")).key_prefix("acct:")),
        )
        .with_state(TransferState {
            locker,
            counter: counter.clone(),
        });
    let url = serve(router).await;
    let client = reqwest::Client::new();

    // Mutual exclusion.
    let ok = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let (client, url, ok) = (client.clone(), url.clone(), ok.clone());
            tokio::spawn(async move {
                for _ in 0..40 {
                    let response = client
                        .post(format!("{url}/transfer"))
                        .json(&serde_json::json!({ "account": "a", "work_ms": 2 }))
                        .send()
                        .await
                        .unwrap();
                    match response.status() {
                        StatusCode::OK => {
                            ok.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                        StatusCode::CONFLICT => {}
                        other => panic!("unexpected {other}"),
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let ok = ok.load(Ordering::Relaxed);
    assert!(ok >= 16, "only {ok} of 32 got through");
    assert_eq!(
        counter.get("a").await,
        ok as u64,
        "lost updates: the lock leaked"
    );

    // Contention answers like the layer; a dropped request releases at once.
    let slow = client
        .post(format!("{url}/transfer"))
        .json(&serde_json::json!({ "account": "b", "work_ms": 20_000 }))
        .timeout(Duration::from_millis(1500))
        .send();
    let contended = async {
        tokio::time::sleep(Duration::from_millis(150)).await;
        client
            .post(format!("{url}/transfer"))
            .json(&serde_json::json!({ "account": "b" }))
            .send()
            .await
            .unwrap()
    };
    let (slow, contended) = tokio::join!(slow, contended);
    assert!(slow.is_err(), "the slow request should have been cut off");
    assert_eq!(contended.status(), StatusCode::CONFLICT);
    let retry_after: u64 = contended.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=30).contains(&retry_after));
    let after_drop = client
        .post(format!("{url}/transfer"))
        .json(&serde_json::json!({ "account": "b" }))
        .send()
        .await
        .unwrap();
    assert_eq!(
        after_drop.status(),
        StatusCode::OK,
        "the dropped request kept its lock"
    );

    // Not reentrant, and says so at once: waiting for itself would end in 409 after
    // max_wait, not in this 500.
    let response = client.post(format!("{url}/twice")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let response = client
        .post(format!("{url}/under-layer/7"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert!(response.text().await.unwrap().contains("not reentrant"));
    assert!(eventually(Duration::from_secs(5), || harness.held_locks() == 0).await);
}

/// `behaviour_tests!(name, harness)`, or `behaviour_tests!(name, if available harness)`
/// for a harness of type `Option<_>` that is `None` (and says why) where the server
/// cannot provide it: those tests then pass without running.
macro_rules! behaviour_tests {
    ($backend:ident, if available $harness:expr) => {
        behaviour_tests!(@tests $backend, $harness);
    };
    ($backend:ident, $harness:expr) => {
        behaviour_tests!(@tests $backend, Some($harness));
    };
    (@tests $backend:ident, $harness:expr) => {
        mod $backend {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn mutual_exclusion_one_instance() {
                let Some(harness) = $harness else { return };
                mutual_exclusion(&harness, 1).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn mutual_exclusion_two_instances() {
                let Some(harness) = $harness else { return };
                mutual_exclusion(&harness, 2).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn contended_answers_409() {
                let Some(harness) = $harness else { return };
                contended(&harness, StatusCode::CONFLICT).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn contended_answers_423_when_configured() {
                let Some(harness) = $harness else { return };
                contended(&harness, StatusCode::LOCKED).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn dropped_requests_release_at_once() {
                let Some(harness) = $harness else { return };
                release_on_drop(&harness).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn no_lock_outlives_its_request() {
                let Some(harness) = $harness else { return };
                super::no_lock_outlives_its_request(&harness).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn only_the_owner_releases() {
                let Some(harness) = $harness else { return };
                super::only_the_owner_releases(&harness).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn retried_acquire_recognises_its_token() {
                let Some(harness) = $harness else { return };
                super::retried_acquire_recognises_its_token(&harness).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn leases_expire() {
                let Some(harness) = $harness else { return };
                super::leases_expire(&harness).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn renewal_keeps_a_long_handler_locked() {
                let Some(harness) = $harness else { return };
                super::renewal_keeps_a_long_handler_locked(&harness).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn locker_in_a_handler() {
                let Some(harness) = $harness else { return };
                super::locker_in_a_handler(&harness).await;
            }
        }
    };
}

/// Fencing, for the backends that hand out tokens (not Redlock: see its docs).
macro_rules! fencing_tests {
    ($backend:ident, $harness:expr) => {
        mod $backend {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn fencing_tokens_increase_in_acquisition_order() {
                super::super::fencing_tokens_increase_in_acquisition_order(&$harness).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_stale_holder_has_the_smaller_token() {
                super::super::a_stale_holder_has_the_smaller_token(&$harness).await;
            }
        }
    };
}

behaviour_tests!(memory, support::Memory::new());
behaviour_tests!(redis, support::Redis::spawn());
behaviour_tests!(redlock, support::Redlock::spawn(5));
#[cfg(feature = "cluster")]
behaviour_tests!(cluster, support::Cluster::spawn());
// As an ACL user with exactly README's rule, with a password, over TLS.
behaviour_tests!(redis_acl, support::Redis::acl());
behaviour_tests!(redis_password, support::Redis::password());
#[cfg(feature = "tls")]
behaviour_tests!(redis_tls, if available support::Redis::tls());
// Fair mode: waiters queue in the backend and take the lock by grant.
behaviour_tests!(memory_fair, support::Fair(support::Memory::new()));
behaviour_tests!(redis_fair, support::Fair(support::Redis::notifying()));
#[cfg(feature = "cluster")]
behaviour_tests!(cluster_fair, support::Fair(support::Cluster::spawn()));

mod fencing {
    use super::*;

    fencing_tests!(memory, support::Memory::new());
    fencing_tests!(redis, support::Redis::spawn());
    #[cfg(feature = "cluster")]
    fencing_tests!(cluster, support::Cluster::spawn());
    fencing_tests!(redis_acl, support::Redis::acl());
    fencing_tests!(memory_fair, support::Fair(support::Memory::new()));
    fencing_tests!(redis_fair, support::Fair(support::Redis::notifying()));
}
