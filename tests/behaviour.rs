//! Behaviour every backend must show, run against the in-process backend and against a
//! real Redis spawned by the test: one generic body per behaviour, one instance each.

mod support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use http::StatusCode;
use support::{APP_TIMEOUT, Harness, app, eventually, serve};
use tower_redis_lock::{Acquire, LockBackend, LockKey};
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
            .retry_after(Duration::from_secs(60))
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
    assert!(holder.release(&key, token).await.unwrap());
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
            3 => "work_ms=5000", // the app's timeout cancels it
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
    assert!(!backend.release(&key, stranger).await.unwrap());
    assert!(!backend.extend(&key, stranger, TTL).await.unwrap());
    assert!(matches!(
        backend.try_acquire(&key, stranger, TTL).await.unwrap(),
        Acquire::Held { remaining: Some(_) }
    ));
    assert!(backend.extend(&key, owner, TTL).await.unwrap());
    assert!(backend.release(&key, owner).await.unwrap());
    assert!(
        !backend.release(&key, owner).await.unwrap(),
        "a second release frees nothing"
    );
    assert_eq!(
        backend.try_acquire(&key, stranger, TTL).await.unwrap(),
        Acquire::Acquired {
            fencing_token: None
        }
    );
    assert!(backend.release(&key, stranger).await.unwrap());
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
    assert!(backend.release(&key, token).await.unwrap());
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
    assert!(backend.release(&key, next).await.unwrap());
}

macro_rules! behaviour_tests {
    ($backend:ident, $harness:expr) => {
        mod $backend {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn mutual_exclusion_one_instance() {
                mutual_exclusion(&$harness, 1).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn mutual_exclusion_two_instances() {
                mutual_exclusion(&$harness, 2).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn contended_answers_409() {
                contended(&$harness, StatusCode::CONFLICT).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn contended_answers_423_when_configured() {
                contended(&$harness, StatusCode::LOCKED).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn dropped_requests_release_at_once() {
                release_on_drop(&$harness).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn no_lock_outlives_its_request() {
                super::no_lock_outlives_its_request(&$harness).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn only_the_owner_releases() {
                super::only_the_owner_releases(&$harness).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn retried_acquire_recognises_its_token() {
                super::retried_acquire_recognises_its_token(&$harness).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn leases_expire() {
                super::leases_expire(&$harness).await;
            }
        }
    };
}

behaviour_tests!(memory, support::Memory::new());
behaviour_tests!(redis, support::Redis::spawn());
