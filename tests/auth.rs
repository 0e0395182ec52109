//! Redis as users run it: behind a password, as an ACL user of least privilege, over TLS.
//! The behaviour suite's core cases run on each too (`tests/behaviour.rs`: `redis_acl`,
//! `redis_password`, `redis_tls`); here, what they do not show: the user's limits,
//! notifications over each kind of connection, and what a wrong password or an untrusted
//! certificate looks like (503 at once, and a log line that says why).

mod support;

use std::{
    io::Write,
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use axum::{Router, body::Body, routing::post};
use deadpool_redis::redis::{self, Client, cmd};
use http::{Request, StatusCode};
use support::{ACL_USER, RedisServer, backend_on, create_acl_user, eventually};
use tower::ServiceExt;
use tower_redis_lock::{LockBackend, LockKey, LockLayer, Locker, PathKey, backend::Acquire};
use uuid::Uuid;

/// Log lines written by the test subscriber (one for this binary).
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

fn logs() -> &'static Captured {
    static LOGS: OnceLock<Captured> = OnceLock::new();
    LOGS.get_or_init(|| {
        let captured = Captured::default();
        let writer = captured.clone();
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .init();
        captured
    })
}

/// One request through a `LockLayer` on `backend`; its status and how long it took.
async fn locked_request<B: LockBackend>(backend: B) -> (StatusCode, Duration) {
    let router = Router::new()
        .route("/orders/{id}/pay", post(|| async { "paid" }))
        .route_layer(
            LockLayer::new(backend, PathKey::new("id"))
                .key_prefix("order:")
                .max_wait(Duration::from_millis(200)),
        );
    let started = Instant::now();
    let request = Request::post("/orders/1/pay").body(Body::empty()).unwrap();
    let status = router.oneshot(request).await.unwrap().status();
    (status, started.elapsed())
}

fn subscribers(server: &RedisServer, channel: &str) -> i64 {
    let reply: (String, i64) = server.query(cmd("PUBSUB").arg("NUMSUB").arg(channel));
    reply.1
}

/// A waiter on `client`'s connections (with a backoff of 10 s, so only a notification can
/// wake it sooner) subscribes to the lock's channel and takes the lock within a few
/// seconds of its release.
async fn notifications_reach_a_waiter(server: &RedisServer, client: &Client) {
    let backend = backend_on(client);
    let key = LockKey::from("order:notified");
    let token = Uuid::new_v4();
    let held = backend
        .try_acquire(&key, token, Duration::from_secs(30))
        .await;
    assert!(matches!(held, Ok(Acquire::Acquired { .. })), "{held:?}");
    let waiter = tokio::spawn({
        let locker = Locker::new(backend_on(client))
            .without_local_queue()
            .max_wait(Duration::from_secs(30))
            .backoff(Duration::from_secs(10), Duration::from_secs(10));
        async move {
            let lock = locker
                .lock("order:notified")
                .await
                .map_err(|e| e.to_string())?;
            let acquired = Instant::now();
            lock.release().await;
            Ok::<_, String>(acquired)
        }
    });
    assert!(
        eventually(Duration::from_secs(5), || {
            subscribers(server, "lock:{order:notified}:released") >= 1
        })
        .await,
        "the waiter never subscribed to the release channel"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let released = Instant::now();
    assert!(backend.release(&key, token).await.unwrap().was_held);
    let acquired = waiter.await.unwrap().expect("the waiter got the lock");
    let waited = acquired.saturating_duration_since(released);
    assert!(
        waited < Duration::from_secs(5),
        "the waiter took {waited:?}: it slept through its backoff, no notification reached it"
    );
}

/// The ACL user of README's rule may use keys and channels under `lock:` only, and none
/// of the commands it was not given.
#[tokio::test]
async fn the_acl_user_cannot_touch_anything_outside_its_prefix() {
    let server = RedisServer::spawn();
    create_acl_user(&server);
    let (user, password) = ACL_USER;
    let client = Client::open(server.url_as(user, password)).unwrap();
    let mut conn = client
        .get_connection_with_timeout(Duration::from_secs(5))
        .expect("the ACL user logs in");
    // NOPERM; from inside a script each server words it its own way.
    let refused = |result: redis::RedisResult<redis::Value>, what: &str| match result {
        Err(err)
            if err.code() == Some("NOPERM")
                || ["ACL failure", "can't access", "No permissions"]
                    .iter()
                    .any(|words| err.to_string().contains(words)) => {}
        other => panic!("{what}: expected an ACL refusal, got {other:?}"),
    };

    // Inside the prefix: allowed (so the refusals below are the prefix's doing).
    let () = cmd("SET")
        .arg("lock:{inside}")
        .arg("1")
        .query(&mut conn)
        .expect("SET inside the prefix");
    let value: String = cmd("GET").arg("lock:{inside}").query(&mut conn).unwrap();
    assert_eq!(value, "1");

    let () = server.query(cmd("SET").arg("orders:1").arg("paid"));
    refused(cmd("GET").arg("orders:1").query(&mut conn), "GET outside");
    refused(
        cmd("SET").arg("orders:1").arg("x").query(&mut conn),
        "SET outside",
    );
    refused(cmd("DEL").arg("orders:1").query(&mut conn), "DEL outside");
    refused(
        cmd("EVAL")
            .arg("return redis.call('GET', KEYS[1])")
            .arg(1)
            .arg("orders:1")
            .query(&mut conn),
        "a script reading outside",
    );
    refused(
        cmd("EVAL")
            .arg("return redis.call('SET', 'orders:1', 'x')")
            .arg(0)
            .query(&mut conn),
        "a script writing outside, undeclared",
    );
    refused(
        cmd("PUBLISH").arg("orders:1").arg("x").query(&mut conn),
        "PUBLISH outside",
    );
    refused(cmd("KEYS").arg("*").query(&mut conn), "KEYS");
    refused(cmd("FLUSHALL").query(&mut conn), "FLUSHALL");
    refused(
        cmd("CONFIG").arg("GET").arg("maxmemory").query(&mut conn),
        "CONFIG",
    );
    let value: String = server.query(cmd("GET").arg("orders:1"));
    assert_eq!(value, "paid", "the key outside the prefix was changed");

    // SUBSCRIBE outside the prefix (refused before the connection turns subscriber), and
    // inside it, on connections of their own.
    let fresh = || {
        client
            .get_connection_with_timeout(Duration::from_secs(5))
            .unwrap()
    };
    refused(
        cmd("SUBSCRIBE").arg("orders:1").query(&mut fresh()),
        "SUBSCRIBE outside",
    );
    let reply: redis::RedisResult<redis::Value> = cmd("SUBSCRIBE")
        .arg("lock:{inside}:released")
        .query(&mut fresh());
    assert!(
        !matches!(&reply, Err(err) if err.code() == Some("NOPERM")),
        "SUBSCRIBE inside the prefix: {reply:?}"
    );
}

/// Release notifications reach a waiter that logs in as the ACL user: `&lock:*` covers
/// the channels, `+subscribe` and `+publish` the commands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_reach_the_acl_user() {
    let server = RedisServer::spawn();
    create_acl_user(&server);
    let (user, password) = ACL_USER;
    let client = Client::open(server.url_as(user, password)).unwrap();
    notifications_reach_a_waiter(&server, &client).await;
    let refusals = support::acl_refusals(&server);
    assert!(refusals.is_empty(), "{refusals:#?}");
}

/// deadpool-redis checks a connection it hands out again with `UNWATCH` and `PING`: the
/// ACL user may send both, so the pool keeps its connections instead of replacing each.
#[tokio::test]
async fn the_pool_reuses_the_acl_users_connections() {
    let server = RedisServer::spawn();
    create_acl_user(&server);
    let (user, password) = ACL_USER;
    let pool = support::pool(&server.url_as(user, password));
    for _ in 0..3 {
        let mut conn = pool.get().await.expect("a connection for the ACL user");
        let () = cmd("SET")
            .arg("lock:{recycled}")
            .arg("1")
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let refusals = support::acl_refusals(&server);
    assert!(refusals.is_empty(), "{refusals:#?}");
    assert_eq!(pool.status().size, 1, "the pool replaced its connection");
}

/// With `requirepass`, the password in the URL logs in the lock and notification
/// connections alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_reach_a_waiter_behind_a_password() {
    let server = RedisServer::spawn_with_password("s3cret");
    let client = Client::open(server.url()).unwrap();
    notifications_reach_a_waiter(&server, &client).await;
}

/// A wrong password, for the default user (`requirepass`) or an ACL user: 503 at once,
/// never a hang, and a WARN line naming the credentials.
#[tokio::test]
async fn a_wrong_password_answers_503_and_says_why() {
    let logs = logs();
    let server = RedisServer::spawn_with_password("s3cret");
    create_acl_user(&server);
    let port = server.port();
    for url in [
        format!("redis://:wrong@127.0.0.1:{port}"),
        format!("redis://{}:wrong@127.0.0.1:{port}", ACL_USER.0),
        format!("redis://nobody:{}@127.0.0.1:{port}", ACL_USER.1),
    ] {
        let backend = backend_on(&Client::open(url.as_str()).unwrap());
        let (status, took) = locked_request(backend).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{url}");
        assert!(took < Duration::from_secs(3), "{url}: took {took:?}");
    }
    // Each backend's lock connection logs its own failure (three), with what it means
    // (the notifier logs its own, which does not count here).
    let text = logs.text();
    let lines = text
        .lines()
        .filter(|line| {
            line.contains("cannot connect to Redis")
                && line.contains("refused the user name or password")
        })
        .count();
    assert!(lines >= 3, "expected a clear log line per backend:\n{text}");
    assert!(
        text.contains("WARN"),
        "the failure is logged at WARN:\n{text}"
    );
}

#[cfg(feature = "tls")]
mod tls {
    use super::*;
    use support::tls::{Certificates, client_trusting};
    use tower_redis_lock::RedisBackend;

    fn tls_server(certificates: &Certificates) -> Option<RedisServer> {
        match RedisServer::spawn_tls(&certificates.files) {
            Ok(server) => Some(server),
            Err(err) => {
                eprintln!("skipped: this redis-server cannot serve TLS ({err})");
                None
            }
        }
    }

    /// Over TLS, trusting the server's CA: locks and notifications work.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn notifications_reach_a_waiter_over_tls() {
        let certificates = Certificates::new();
        let Some(server) = tls_server(&certificates) else {
            return;
        };
        let client = certificates.client(&server.tls_url());
        notifications_reach_a_waiter(&server, &client).await;
        let (status, _) = locked_request(backend_on(&client)).await;
        assert_eq!(status, StatusCode::OK);
    }

    /// A certificate the client does not trust (another CA; or the platform's roots, as
    /// `from_url` uses): 503 at once, and a WARN line naming the certificate.
    #[tokio::test]
    async fn an_untrusted_certificate_answers_503_and_says_why() {
        let logs = logs();
        let certificates = Certificates::new();
        let Some(server) = tls_server(&certificates) else {
            return;
        };
        let other_ca = Certificates::new();
        let backends = [
            backend_on(&client_trusting(&server.tls_url(), &other_ca.ca_pem)),
            RedisBackend::from_url(&server.tls_url()).expect("a rediss:// URL"),
        ];
        for backend in backends {
            let (status, took) = locked_request(backend).await;
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
            assert!(took < Duration::from_secs(3), "took {took:?}");
        }
        let text = logs.text();
        let lines = text
            .lines()
            .filter(|line| {
                line.contains("cannot connect to Redis")
                    && line.contains("certificate is not trusted")
            })
            .count();
        assert!(lines >= 2, "expected a clear log line per backend:\n{text}");
    }

    /// The same certificate, trusted, with `from_client`: the crate's way to a CA of
    /// one's own.
    #[tokio::test]
    async fn from_client_takes_a_ca_of_ones_own() {
        let certificates = Certificates::new();
        let Some(server) = tls_server(&certificates) else {
            return;
        };
        let backend =
            RedisBackend::from_client(certificates.client(&server.tls_url())).expect("backend");
        let (status, _) = locked_request(backend).await;
        assert_eq!(status, StatusCode::OK);
    }
}
