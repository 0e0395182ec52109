//! The kinds of lock beyond the exclusive one (issue 15): permits and read/write, through
//! two app instances on every backend that takes them, with real spawned Redis servers.

mod support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    extract::{Path, State},
    routing::{get, post},
};
use http::StatusCode;
use support::{Harness, eventually, serve};
use tower_redis_lock::{
    Held, KeySet, KindBackend, LockBackend, LockKey, LockKind, LockLayer, PathKey, backend::Acquire,
};
use uuid::Uuid;

/// Short leases, so that the waiter marks (which live a lease and a second) are gone soon
/// after each test; the watchdog renews them while handlers run.
const TTL: Duration = Duration::from_secs(2);

/// How many requests are inside now, and the most there ever were.
#[derive(Clone, Default)]
struct Inside {
    now: Arc<AtomicUsize>,
    max: Arc<AtomicUsize>,
}

impl Inside {
    fn enter(&self) -> usize {
        let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.max.fetch_max(now, Ordering::SeqCst);
        now
    }

    fn leave(&self) {
        self.now.fetch_sub(1, Ordering::SeqCst);
    }
}

/// `POST /exports/{tenant}`: 20 ms of work, at most `permits` at once per tenant.
fn exports_app<B: LockBackend>(backend: B, permits: u32, inside: Inside) -> Router {
    async fn export(State(inside): State<Inside>, _lock: Held) -> &'static str {
        inside.enter();
        tokio::time::sleep(Duration::from_millis(20)).await;
        inside.leave();
        "exported"
    }
    Router::new()
        .route("/exports/{tenant}", post(export))
        .route_layer(
            LockLayer::new(backend, PathKey::new("tenant"))
                .key_prefix("export:")
                .ttl(TTL)
                .max_wait(Duration::from_millis(500))
                .permits(permits),
        )
        .with_state(inside)
}

/// Sends `requests` (method, url) at once, each `rounds` times in a row, each time retried
/// on 409 up to 200 times; panics on any other answer than 200 and 409. Returns how many
/// requests got 200 in every round.
async fn send_all(requests: Vec<(http::Method, String)>, rounds: usize) -> usize {
    let client = reqwest::Client::new();
    let ok = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = requests
        .into_iter()
        .map(|(method, url)| {
            let (client, ok) = (client.clone(), ok.clone());
            tokio::spawn(async move {
                let mut served = 0;
                'rounds: for _ in 0..rounds {
                    // A pause between rounds leaves gaps in which others get in.
                    tokio::time::sleep(Duration::from_millis(fastrand::u64(0..30))).await;
                    for _ in 0..200 {
                        let response = client
                            .request(method.clone(), &url)
                            .send()
                            .await
                            .expect("request");
                        match response.status() {
                            StatusCode::OK => {
                                served += 1;
                                continue 'rounds;
                            }
                            StatusCode::CONFLICT => {
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                            other => panic!("{method} {url}: {other}"),
                        }
                    }
                }
                if served == rounds {
                    ok.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("client task");
    }
    ok.load(Ordering::SeqCst)
}

/// 64 clients export for one tenant through two instances with 3 permits: never more
/// than 3 inside at once, more than one at a time (permits, not a lock), all served, and
/// nothing left in the backend.
async fn permits_never_exceed_n(harness: &impl Harness) {
    let inside = Inside::default();
    let mut urls = Vec::new();
    for _ in 0..2 {
        urls.push(serve(exports_app(harness.instance(), 3, inside.clone())).await);
    }
    let requests = (0..64)
        .map(|i| (http::Method::POST, format!("{}/exports/acme", urls[i % 2])))
        .collect();
    assert_eq!(send_all(requests, 1).await, 64, "every export is served");
    let max = inside.max.load(Ordering::SeqCst);
    assert!(max <= 3, "{max} exports inside at once with 3 permits");
    assert!(
        max >= 2,
        "exports never overlapped: permits behave as a lock"
    );
    assert!(
        eventually(Duration::from_secs(8), || harness.held_locks() == 0).await,
        "keys left in the backend: {}",
        harness.held_locks()
    );
}

/// A holder that never releases (crashed) gives its permit back when its lease ends,
/// while another holder's longer lease goes on; until then the permits are all out.
async fn a_lost_holder_gives_its_permit_back(harness: &impl Harness) {
    let permits = KindBackend::new(harness.instance(), LockKind::Permits(2.try_into().unwrap()));
    let key = LockKey::from("export:lost");
    let (alive, crashed) = (Uuid::new_v4(), Uuid::new_v4());
    let short = Duration::from_millis(400);
    for (token, lease) in [(alive, TTL), (crashed, short)] {
        let taken = permits.try_acquire(&key, token, lease).await;
        assert!(matches!(taken, Ok(Acquire::Acquired { .. })), "{taken:?}");
    }
    let third = Uuid::new_v4();
    let refused = permits.try_acquire(&key, third, TTL).await.unwrap();
    let Acquire::Held {
        remaining: Some(remaining),
    } = refused
    else {
        panic!("a third permit out of two: {refused:?}");
    };
    assert!(
        remaining <= short,
        "{remaining:?}: not the first lease to end"
    );
    tokio::time::sleep(short + Duration::from_millis(100)).await;
    // The crashed holder's lease ended: its renewal fails, and its permit is free again.
    assert!(!permits.extend(&key, crashed, TTL).await.unwrap());
    assert!(matches!(
        permits.try_acquire(&key, third, TTL).await,
        Ok(Acquire::Acquired { .. })
    ));
    assert!(matches!(
        permits.try_acquire(&key, Uuid::new_v4(), TTL).await,
        Ok(Acquire::Held { .. })
    ));
    assert!(permits.extend(&key, third, TTL).await.unwrap());
    for token in [alive, third] {
        assert!(permits.release(&key, token).await.unwrap().was_held);
    }
    assert!(!permits.release(&key, third).await.unwrap().was_held);
    assert!(eventually(Duration::from_secs(8), || harness.held_locks() == 0).await);
}

/// Who is inside a document, checked by every handler as it enters.
#[derive(Clone, Default)]
struct Doc {
    readers: Inside,
    writers: Inside,
    /// A reader saw a writer inside, or a writer saw anyone else.
    overlap: Arc<AtomicBool>,
}

/// `GET /docs/{id}` reads (10 ms), `PUT /docs/{id}` writes (15 ms), behind one
/// read/write layer (the mode from the method).
fn docs_app<B: LockBackend>(backend: B, doc: Doc) -> Router {
    async fn read(State(doc): State<Doc>, Path(_id): Path<String>) -> &'static str {
        doc.readers.enter();
        if doc.writers.now.load(Ordering::SeqCst) > 0 {
            doc.overlap.store(true, Ordering::SeqCst);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        if doc.writers.now.load(Ordering::SeqCst) > 0 {
            doc.overlap.store(true, Ordering::SeqCst);
        }
        doc.readers.leave();
        "read"
    }
    async fn write(State(doc): State<Doc>, Path(_id): Path<String>) -> &'static str {
        if doc.writers.enter() > 1 || doc.readers.now.load(Ordering::SeqCst) > 0 {
            doc.overlap.store(true, Ordering::SeqCst);
        }
        tokio::time::sleep(Duration::from_millis(15)).await;
        if doc.readers.now.load(Ordering::SeqCst) > 0 {
            doc.overlap.store(true, Ordering::SeqCst);
        }
        doc.writers.leave();
        "written"
    }
    Router::new()
        .route("/docs/{id}", get(read).put(write))
        .route_layer(
            LockLayer::new(backend, PathKey::new("id"))
                .key_prefix("doc:")
                .ttl(TTL)
                .max_wait(Duration::from_millis(500))
                .read_write(),
        )
        .with_state(doc)
}

/// 48 readers and 16 writers of one document through two instances, four requests each
/// in a row (so that readers keep coming while writers wait): readers overlap,
/// nobody is ever inside with a writer, everyone is served, nothing is left behind.
async fn readers_share_writers_exclude(harness: &impl Harness) {
    let doc = Doc::default();
    let mut urls = Vec::new();
    for _ in 0..2 {
        urls.push(serve(docs_app(harness.instance(), doc.clone())).await);
    }
    let requests = (0..64)
        .map(|i| {
            let method = if i % 4 == 3 {
                http::Method::PUT
            } else {
                http::Method::GET
            };
            (method, format!("{}/docs/7", urls[i % 2]))
        })
        .collect();
    assert_eq!(send_all(requests, 4).await, 64, "every request is served");
    assert!(
        !doc.overlap.load(Ordering::SeqCst),
        "someone was inside with a writer"
    );
    assert!(
        doc.readers.max.load(Ordering::SeqCst) >= 2,
        "readers never overlapped"
    );
    assert_eq!(doc.writers.max.load(Ordering::SeqCst), 1);
    assert!(
        eventually(Duration::from_secs(8), || harness.held_locks() == 0).await,
        "keys left in the backend: {}",
        harness.held_locks()
    );
}

/// Who entered a document, in order.
type Log = Arc<std::sync::Mutex<Vec<&'static str>>>;

/// `GET /docs/{id}?ms=N` reads for N ms, `PUT /docs/{id}` writes for 10 ms, logging
/// their entry; one read/write layer.
fn ordered_docs_app<B: LockBackend>(backend: B, log: Log) -> Router {
    #[derive(serde::Deserialize)]
    struct Work {
        ms: u64,
    }
    async fn read(State(log): State<Log>, axum::extract::Query(work): axum::extract::Query<Work>) {
        log.lock().unwrap().push("read");
        tokio::time::sleep(Duration::from_millis(work.ms)).await;
    }
    async fn write(State(log): State<Log>) {
        log.lock().unwrap().push("write");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Router::new()
        .route("/docs/{id}", get(read).put(write))
        .route_layer(
            LockLayer::new(backend, PathKey::new("id"))
                .key_prefix("doc:")
                .ttl(TTL)
                .max_wait(Duration::from_secs(3))
                .read_write(),
        )
        .with_state(log)
}

/// Through two instances: a reader reads for 800 ms; a writer comes and waits; readers
/// that come after it (on both instances) enter only after the writer.
async fn a_waiting_writer_goes_first_over_http(harness: &impl Harness) {
    let log = Log::default();
    let a = serve(ordered_docs_app(harness.instance(), log.clone())).await;
    let b = serve(ordered_docs_app(harness.instance(), log.clone())).await;
    let client = reqwest::Client::new();
    let send = |method: http::Method, url: String| {
        let client = client.clone();
        tokio::spawn(async move {
            let response = client.request(method, &url).send().await.expect("request");
            assert_eq!(response.status(), StatusCode::OK, "{url}");
        })
    };
    let first = send(http::Method::GET, format!("{a}/docs/1?ms=800"));
    tokio::time::sleep(Duration::from_millis(150)).await;
    let writer = send(http::Method::PUT, format!("{b}/docs/1"));
    tokio::time::sleep(Duration::from_millis(150)).await;
    let later: Vec<_> = [&a, &b, &a, &b]
        .into_iter()
        .map(|url| send(http::Method::GET, format!("{url}/docs/1?ms=10")))
        .collect();
    for task in [first, writer].into_iter().chain(later) {
        task.await.expect("client");
    }
    assert_eq!(
        *log.lock().unwrap(),
        ["read", "write", "read", "read", "read", "read"],
        "readers that came after the waiting writer went before it"
    );
    assert!(eventually(Duration::from_secs(8), || harness.held_locks() == 0).await);
}

/// A writer that waits for the readers inside is served before a reader that came after
/// it (from another process, or from the same one once its read hold is past its joining
/// window); that reader gets in once the writer is done.
async fn a_waiting_writer_goes_before_later_readers(harness: &impl Harness) {
    let first_process = KindBackend::new(harness.instance(), LockKind::Read);
    let readers = KindBackend::new(harness.instance(), LockKind::Read);
    let writers = KindBackend::new(harness.instance(), LockKind::Write);
    let key = LockKey::from("doc:queue");
    let (early, writer, late) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let granted = |answer: &Acquire| matches!(answer, Acquire::Acquired { .. });
    let taken = first_process.try_acquire(&key, early, TTL).await.unwrap();
    assert!(granted(&taken));
    let taken = writers.try_acquire(&key, writer, TTL).await.unwrap();
    assert!(!granted(&taken));
    let taken = readers.try_acquire(&key, late, TTL).await.unwrap();
    assert!(!granted(&taken), "a reader overtook the waiting writer");
    // In the first reader's process, past the joining window (ttl/200 + 1 ms = 11 ms).
    tokio::time::sleep(Duration::from_millis(50)).await;
    let taken = first_process
        .try_acquire(&key, Uuid::new_v4(), TTL)
        .await
        .unwrap();
    assert!(
        !granted(&taken),
        "a reader of the same process overtook the waiting writer past the window"
    );
    assert!(first_process.release(&key, early).await.unwrap().was_held);
    assert!(granted(
        &writers.try_acquire(&key, writer, TTL).await.unwrap()
    ));
    assert!(
        !granted(&readers.try_acquire(&key, late, TTL).await.unwrap()),
        "a reader inside with a writer"
    );
    assert!(writers.extend(&key, writer, TTL).await.unwrap());
    assert!(writers.release(&key, writer).await.unwrap().was_held);
    assert!(granted(
        &readers.try_acquire(&key, late, TTL).await.unwrap()
    ));
    // A second writer waits for that reader, which renews its share in the meantime.
    let second = Uuid::new_v4();
    assert!(!granted(
        &writers.try_acquire(&key, second, TTL).await.unwrap()
    ));
    assert!(readers.extend(&key, late, TTL).await.unwrap());
    assert!(readers.release(&key, late).await.unwrap().was_held);
    assert!(granted(
        &writers.try_acquire(&key, second, TTL).await.unwrap()
    ));
    assert!(writers.release(&key, second).await.unwrap().was_held);
    assert!(eventually(Duration::from_secs(8), || harness.held_locks() == 0).await);
}

/// Readers of one process that come together share one hold: the hold stays while any
/// of them reads (a writer elsewhere is refused until the last leaves), and renewing
/// through any member renews it.
async fn readers_of_one_process_share_a_hold(harness: &impl Harness) {
    let readers = KindBackend::new(harness.instance(), LockKind::Read);
    let writers = KindBackend::new(harness.instance(), LockKind::Write);
    let key = LockKey::from("doc:group");
    let (first, second, writer) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let granted = |answer: &Acquire| matches!(answer, Acquire::Acquired { .. });
    assert!(granted(
        &readers.try_acquire(&key, first, TTL).await.unwrap()
    ));
    assert!(granted(
        &readers.try_acquire(&key, second, TTL).await.unwrap()
    ));
    assert!(readers.release(&key, first).await.unwrap().was_held);
    assert!(readers.extend(&key, second, TTL).await.unwrap());
    let taken = writers.try_acquire(&key, writer, TTL).await.unwrap();
    assert!(
        !granted(&taken),
        "a writer in while a reader of the shared hold reads"
    );
    assert!(readers.release(&key, second).await.unwrap().was_held);
    assert!(granted(
        &writers.try_acquire(&key, writer, TTL).await.unwrap()
    ));
    assert!(writers.release(&key, writer).await.unwrap().was_held);
    assert!(eventually(Duration::from_secs(8), || harness.held_locks() == 0).await);
}

/// A writer's lease ends like a lock's: a crashed writer lets readers in after it.
async fn a_crashed_writer_lets_readers_in(harness: &impl Harness) {
    let readers = KindBackend::new(harness.instance(), LockKind::Read);
    let writers = KindBackend::new(harness.instance(), LockKind::Write);
    let key = LockKey::from("doc:crash");
    let lease = Duration::from_millis(300);
    let writer = Uuid::new_v4();
    assert!(matches!(
        writers.try_acquire(&key, writer, lease).await,
        Ok(Acquire::Acquired { .. })
    ));
    let reader = Uuid::new_v4();
    assert!(matches!(
        readers.try_acquire(&key, reader, TTL).await,
        Ok(Acquire::Held { .. })
    ));
    tokio::time::sleep(lease + Duration::from_millis(100)).await;
    assert!(!writers.extend(&key, writer, lease).await.unwrap());
    assert!(matches!(
        readers.try_acquire(&key, reader, TTL).await,
        Ok(Acquire::Acquired { .. })
    ));
    assert!(readers.release(&key, reader).await.unwrap().was_held);
    assert!(eventually(Duration::from_secs(8), || harness.held_locks() == 0).await);
}

/// Writers with fencing on get growing tokens, from the exclusive lock's counter.
async fn writers_get_fencing_tokens(harness: &impl Harness) {
    let writers = KindBackend::new(harness.fenced_instance(), LockKind::Write);
    let key = LockKey::from("doc:fenced");
    let mut last = 0;
    for _ in 0..3 {
        let token = Uuid::new_v4();
        let Ok(Acquire::Acquired {
            fencing_token: Some(fence),
        }) = writers.try_acquire(&key, token, TTL).await
        else {
            panic!("a fenced writer without a token");
        };
        assert!(fence > last, "{fence} after {last}");
        last = fence;
        writers.release(&key, token).await.unwrap();
    }
}

/// The accounts of the transfer tests: balances read and written in two steps, and who
/// is inside each account now.
#[derive(Clone, Default)]
struct Bank {
    balances: Arc<std::sync::Mutex<std::collections::HashMap<u32, i64>>>,
    inside: Arc<std::sync::Mutex<std::collections::HashSet<u32>>>,
    overlap: Arc<AtomicBool>,
}

impl Bank {
    fn balance(&self, account: u32) -> i64 {
        self.balances
            .lock()
            .unwrap()
            .get(&account)
            .copied()
            .unwrap_or(100)
    }

    fn set(&self, account: u32, balance: i64) {
        self.balances.lock().unwrap().insert(account, balance);
    }
}

/// `POST /transfers/{from}/{to}`: moves 1 from one account to the other, reading both
/// balances, working 5 ms, then writing both, under one lock on both accounts.
fn bank_app<B: LockBackend>(backend: B, bank: Bank) -> Router {
    async fn transfer(
        State(bank): State<Bank>,
        Path((from, to)): Path<(u32, u32)>,
        lock: Held,
    ) -> String {
        for account in [from, to] {
            if !bank.inside.lock().unwrap().insert(account) {
                bank.overlap.store(true, Ordering::SeqCst);
            }
        }
        let (a, b) = (bank.balance(from), bank.balance(to));
        tokio::time::sleep(Duration::from_millis(5)).await;
        bank.set(from, a - 1);
        bank.set(to, b + 1);
        for account in [from, to] {
            bank.inside.lock().unwrap().remove(&account);
        }
        format!("{:?}", lock.keys())
    }
    Router::new()
        .route("/transfers/{from}/{to}", post(transfer))
        .route_layer(
            LockLayer::from_fn(backend, |parts| {
                let mut segments = parts.uri.path().split('/').skip(2);
                let (from, to) = (segments.next()?, segments.next()?);
                Some(KeySet::new([from.to_owned(), to.to_owned()]))
            })
            .key_prefix("acct:")
            .ttl(TTL)
            .max_wait(Duration::from_secs(20))
            .backoff(Duration::from_millis(5), Duration::from_millis(50))
            .several_keys(),
        )
        .with_state(bank)
}

/// 64 concurrent transfers among 8 accounts through two instances, each locking both of
/// its accounts (pairs overlap in every order): all finish within the wait (no 409, no
/// deadlock), money is conserved, and no account ever has two transfers inside.
async fn transfers_lock_both_accounts(harness: &impl Harness) {
    let bank = Bank::default();
    let mut urls = Vec::new();
    for _ in 0..2 {
        urls.push(serve(bank_app(harness.instance(), bank.clone())).await);
    }
    let client = reqwest::Client::new();
    let tasks: Vec<_> = (0..64u32)
        .map(|i| {
            let from = fastrand::u32(0..8);
            let to = (from + 1 + fastrand::u32(0..7)) % 8;
            let url = format!("{}/transfers/{from}/{to}", urls[i as usize % 2]);
            let client = client.clone();
            tokio::spawn(async move {
                let response = client.post(&url).send().await.expect("request");
                assert_eq!(response.status(), StatusCode::OK, "{url}");
                let keys = response.text().await.expect("body");
                assert!(
                    keys.contains(&format!("acct:{from}")) && keys.contains(&format!("acct:{to}")),
                    "{keys}"
                );
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("transfer");
    }
    assert!(
        !bank.overlap.load(Ordering::SeqCst),
        "two transfers inside one account"
    );
    let total: i64 = (0..8).map(|account| bank.balance(account)).sum();
    assert_eq!(total, 800, "money was created or lost");
    assert!(
        eventually(Duration::from_secs(8), || harness.held_locks() == 0).await,
        "keys left in the backend: {}",
        harness.held_locks()
    );
}

/// A set is taken all or none: with one of its keys held (by an exclusive lock of the
/// same name), it is refused and holds none of the others; once free, it is taken whole,
/// renewed and released whole.
async fn several_keys_are_all_or_none(harness: &impl Harness) {
    let plain = harness.instance();
    let sets = KindBackend::new(harness.instance(), LockKind::Several);
    let set = LockKey::from(KeySet::new(["1", "2", "3"])).to_string();
    let set = LockKey::from(format!("acct:{set}"));
    let (holder, token) = (Uuid::new_v4(), Uuid::new_v4());
    let two = LockKey::from("acct:2");
    assert!(matches!(
        plain.try_acquire(&two, holder, TTL).await,
        Ok(Acquire::Acquired { .. })
    ));
    let refused = sets.try_acquire(&set, token, TTL).await;
    assert!(matches!(refused, Ok(Acquire::Held { .. })), "{refused:?}");
    let one = LockKey::from("acct:1");
    let probe = Uuid::new_v4();
    assert!(
        matches!(
            plain.try_acquire(&one, probe, TTL).await,
            Ok(Acquire::Acquired { .. })
        ),
        "a refused set kept one of its keys"
    );
    plain.release(&one, probe).await.unwrap();
    plain.release(&two, holder).await.unwrap();
    assert!(matches!(
        sets.try_acquire(&set, token, TTL).await,
        Ok(Acquire::Acquired { .. })
    ));
    for key in ["acct:1", "acct:2", "acct:3"] {
        let taken = plain
            .try_acquire(&LockKey::from(key), Uuid::new_v4(), TTL)
            .await;
        assert!(
            matches!(taken, Ok(Acquire::Held { .. })),
            "{key} is not held: {taken:?}"
        );
    }
    assert!(sets.extend(&set, token, TTL).await.unwrap());
    assert!(sets.release(&set, token).await.unwrap().was_held);
    assert!(!sets.release(&set, token).await.unwrap().was_held);
    assert!(eventually(Duration::from_secs(8), || harness.held_locks() == 0).await);
}

macro_rules! kind_tests {
    ($backend:ident, $harness:expr) => {
        mod $backend {
            use super::support;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn permits_never_exceed_n() {
                super::permits_never_exceed_n(&$harness).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_lost_holder_gives_its_permit_back() {
                super::a_lost_holder_gives_its_permit_back(&$harness).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn readers_share_writers_exclude() {
                super::readers_share_writers_exclude(&$harness).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_waiting_writer_goes_before_later_readers() {
                super::a_waiting_writer_goes_before_later_readers(&$harness).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn readers_of_one_process_share_a_hold() {
                super::readers_of_one_process_share_a_hold(&$harness).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn transfers_lock_both_accounts() {
                super::transfers_lock_both_accounts(&$harness).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn several_keys_are_all_or_none() {
                super::several_keys_are_all_or_none(&$harness).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_waiting_writer_goes_first_over_http() {
                super::a_waiting_writer_goes_first_over_http(&$harness).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_crashed_writer_lets_readers_in() {
                super::a_crashed_writer_lets_readers_in(&$harness).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn writers_get_fencing_tokens() {
                super::writers_get_fencing_tokens(&$harness).await;
            }
        }
    };
}

kind_tests!(memory, support::Memory::new());
kind_tests!(redis, support::Redis::spawn());
#[cfg(feature = "cluster")]
kind_tests!(cluster, support::Cluster::spawn());
// As the README's ACL user: every command of the kinds' scripts is in its rule.
kind_tests!(redis_acl, support::Redis::acl());

/// Redlock takes several keys too (one at a time, each by majority).
mod redlock {
    use super::support;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn transfers_lock_both_accounts() {
        super::transfers_lock_both_accounts(&support::Redlock::spawn(3)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn several_keys_are_all_or_none() {
        super::several_keys_are_all_or_none(&support::Redlock::spawn(3)).await;
    }
}

/// Redlock takes exclusive locks only: a permit quorum could hand out up to 2n − 1
/// permits, so asking for one is refused when the layer is built.
#[test]
#[should_panic(expected = "does not take permits(3) locks")]
fn redlock_refuses_permits() {
    let redlock = support::Redlock::spawn(3);
    let backend = redlock.instance();
    let _ = LockLayer::new(backend, PathKey::new("id")).permits(3);
}
