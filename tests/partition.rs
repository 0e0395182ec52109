//! Redlock on five Redis hosts of the test's own, each in a network namespace, while some
//! of them are cut off from the app and joined again (`tests/support/netns.rs`): the
//! lock goes on with a majority, fails cleanly without one, and a holder that loses its
//! majority mid-hold learns it before anyone else can get in.
//!
//! These tests need root (network namespaces); without it they fail and say so.

mod support;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use http::StatusCode;
use support::{
    Counter, app, eventually, http_client, netns::NetHost, post_until_ok, redis_node_at, serve,
};
use tokio::time::Instant;
use tower_redis_lock::{Locker, RedlockBackend};

/// Short, so that what a partition leaves behind expires within the test.
const TTL: Duration = Duration::from_secs(2);

fn hosts(n: usize) -> Vec<NetHost> {
    (0..n).map(|_| NetHost::spawn()).collect()
}

/// One app instance's Redlock over `hosts`: its own pools and subscribers.
fn instance(hosts: &[NetHost]) -> RedlockBackend {
    let nodes = hosts
        .iter()
        .map(|host| redis_node_at(&host.url()))
        .collect();
    // Generous for a loaded 2-core machine; production would use tens of ms.
    RedlockBackend::new(nodes).node_timeout(Duration::from_millis(300))
}

/// The lock keys on every host, as `<host>:<key>`.
fn lock_keys_left(hosts: &[NetHost]) -> Vec<String> {
    hosts
        .iter()
        .enumerate()
        .flat_map(|(n, host)| {
            host.lock_keys()
                .into_iter()
                .map(move |k| format!("{n}:{k}"))
        })
        .collect()
}

/// Waits (generously: orphans of late commands expire with their lease) until no host
/// keeps a lock key.
async fn assert_nothing_left(hosts: &[NetHost], within: Duration) {
    assert!(
        eventually(within, || lock_keys_left(hosts).is_empty()).await,
        "lock keys left: {:?}",
        lock_keys_left(hosts)
    );
}

/// Two app instances and twelve clients on three orders; two hosts of five are cut off
/// mid-traffic for longer than the lease, then joined again. A majority is left, so
/// requests go on being served, one at a time per order (every 200 is one increment of
/// a counter read and written in two steps), and once the lease has run out after the
/// heal no host keeps a lock, not even from commands the network delivered late.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hosts_of_five_cut_off_mid_traffic_the_lock_goes_on() {
    let hosts = hosts(5);
    let counter = Counter::Local(Arc::default());
    let mut urls = Vec::new();
    for _ in 0..2 {
        let router = app(instance(&hosts), counter.clone(), |layer| {
            layer.ttl(TTL).max_wait(Duration::from_secs(3))
        });
        urls.push(serve(router).await);
    }

    let stop = Arc::new(AtomicBool::new(false));
    let cut_off = Arc::new(AtomicBool::new(false));
    // Per order: 200s in all, and 200s while the two hosts were cut off; other statuses.
    let served: Arc<Mutex<HashMap<String, (u64, u64)>>> = Arc::default();
    let others: Arc<Mutex<Vec<StatusCode>>> = Arc::default();
    let http = http_client();
    let mut clients = Vec::new();
    for client in 0..12 {
        let (stop, cut_off, served, others, http) = (
            stop.clone(),
            cut_off.clone(),
            served.clone(),
            others.clone(),
            http.clone(),
        );
        let url = urls[client % 2].clone();
        clients.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let order = format!("{}", (client + n) % 3);
                n += 1;
                let during = cut_off.load(Ordering::Relaxed);
                let response = http
                    .post(format!("{url}/orders/{order}/pay?work_ms=5"))
                    .send()
                    .await
                    .expect("the app answers");
                if response.status() == StatusCode::OK {
                    let mut served = served.lock().unwrap();
                    let entry = served.entry(order).or_default();
                    entry.0 += 1;
                    entry.1 += u64::from(during && cut_off.load(Ordering::Relaxed));
                } else {
                    others.lock().unwrap().push(response.status());
                }
            }
        }));
    }

    tokio::time::sleep(Duration::from_millis(700)).await;
    hosts[1].partition();
    hosts[3].partition();
    cut_off.store(true, Ordering::Relaxed);
    assert!(
        !hosts[1].reachable() && hosts[0].reachable(),
        "the partition did not cut host 1 off (or cut off host 0 too)"
    );
    tokio::time::sleep(TTL + Duration::from_millis(1500)).await;
    cut_off.store(false, Ordering::Relaxed);
    hosts[1].heal();
    hosts[3].heal();
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.expect("client task");
    }

    let served = served.lock().unwrap().clone();
    let others = others.lock().unwrap().clone();
    eprintln!("served per order (all, while cut off): {served:?}; other answers: {others:?}");
    for (order, (all, _)) in &served {
        assert_eq!(
            counter.get(order).await,
            *all,
            "order {order}: increments lost, two handlers overlapped"
        );
    }
    let during: u64 = served.values().map(|(_, during)| during).sum();
    assert!(
        during >= 3,
        "only {during} requests were served while two hosts of five were cut off"
    );
    assert!(
        others.iter().all(|status| *status == StatusCode::CONFLICT),
        "with a majority reachable, requests get 200 or, contended past max_wait, 409: {others:?}"
    );
    assert_nothing_left(&hosts, TTL + Duration::from_secs(5)).await;
}

/// Three hosts of five cut off: no majority, so the layer answers 503 with a problem
/// body, in bounded time; the two reachable hosts keep nothing, and once the network
/// heals the lock works again and no host keeps a lock a lease later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hosts_of_five_cut_off_give_a_clean_503() {
    let hosts = hosts(5);
    for host in [0, 2, 4] {
        hosts[host].partition();
    }
    let counter = Counter::Local(Arc::default());
    let url = serve(app(instance(&hosts), counter.clone(), |layer| {
        layer.ttl(TTL).max_wait(Duration::from_secs(1))
    }))
    .await;
    let http = http_client();

    let started = Instant::now();
    let answers = futures_util::future::join_all((0..3).map(|order| {
        let http = http.clone();
        let url = url.clone();
        async move {
            http.post(format!("{url}/orders/{order}/pay"))
                .send()
                .await
                .expect("the app answers")
        }
    }))
    .await;
    let took = started.elapsed();
    for response in answers {
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            response.headers()[http::header::CONTENT_TYPE],
            "application/problem+json"
        );
    }
    // max_wait is 1 s; the bound leaves room for node timeouts and a loaded machine.
    assert!(took < Duration::from_secs(10), "the 503s took {took:?}");
    for host in [1, 3] {
        assert!(
            hosts[host].lock_keys().is_empty(),
            "reachable host {host} kept a partial lock"
        );
    }

    for host in [0, 2, 4] {
        hosts[host].heal();
    }
    post_until_ok(
        &http,
        &format!("{url}/orders/9/pay"),
        Duration::from_secs(15),
    )
    .await;
    assert_eq!(counter.get("9").await, 1);
    assert_nothing_left(&hosts, TTL + Duration::from_secs(5)).await;
}

/// A holder whose renewals keep a majority through a split of two hosts keeps its lock;
/// when three hosts are then cut off for longer than the lease, its renewals fail, it
/// learns the lock is lost, and a second process that kept asking all along gets in
/// only after the holder's own lease deadline (with the drift margin) has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_cut_off_from_its_majority_learns_it_before_anyone_gets_in() {
    let hosts = hosts(5);
    let holder = Locker::new(instance(&hosts)).ttl(TTL);
    let contender = Locker::new(instance(&hosts))
        .ttl(TTL)
        .max_wait(Duration::from_millis(300));

    let lock = holder.lock("order:7").await.expect("the first lock");
    let held = lock.held().clone();
    let lost_at = tokio::spawn({
        let held = held.clone();
        async move {
            held.lost().await;
            Instant::now()
        }
    });
    // The second process asks all the time, until its first grant.
    let stop = Arc::new(AtomicBool::new(false));
    let asking = tokio::spawn({
        let stop = stop.clone();
        async move {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(lock) = contender.lock("order:7").await {
                    let granted = lock.acquired_at();
                    lock.release().await;
                    return Some(granted);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            None
        }
    });

    // Two hosts cut off for longer than the lease: three renew, which is a majority.
    hosts[1].partition();
    hosts[4].partition();
    tokio::time::sleep(TTL + Duration::from_secs(1)).await;
    hosts[1].heal();
    hosts[4].heal();
    assert!(
        !held.is_lost(),
        "renewals on three hosts of five must keep the lock"
    );

    // Three hosts cut off: the renewals reach two, which still hold the lock (hosts 1 and
    // 4 lost it while cut off), and two of five is no majority: the lease runs out.
    let split = Instant::now();
    for host in [0, 1, 4] {
        hosts[host].partition();
    }
    let lost_at = tokio::time::timeout(TTL + Duration::from_secs(5), lost_at)
        .await
        .expect("the holder never learnt it had lost its majority")
        .expect("lost watcher");
    assert!(
        lost_at >= split,
        "the lock was reported lost before the split"
    );
    let believed_until = held.lease_deadline();
    tokio::time::sleep(TTL + Duration::from_secs(1)).await;
    for host in [0, 1, 4] {
        hosts[host].heal();
    }
    // Once the old lease has expired on the hosts, the second process gets in.
    let granted = tokio::time::timeout(Duration::from_secs(15), asking).await;
    stop.store(true, Ordering::Relaxed);
    lock.release().await;
    let granted = granted
        .expect("the second process never got the lock after the heal")
        .expect("asking task")
        .expect("asking stopped");
    assert!(
        granted >= believed_until,
        "the second process got in {:?} before the holder's lease deadline",
        believed_until - granted
    );
    assert_nothing_left(&hosts, TTL + Duration::from_secs(5)).await;
}
