//! A crowd of buyers against the flash-sale service (`examples/flash_sale`).
//!
//! ```text
//! cargo run --release --example flash_sale_load -- --url http://127.0.0.1:3000 \
//!     --buyers 2000 --stock 100 [--instances http://127.0.0.1:3001,...] [--sku flash] \
//!     [--faults [--redis-pid PID] [--proxy LISTEN=TARGET]]
//! ```
//!
//! Creates a fresh item with `--stock` units (default SKU `flash-<random>`), then fires
//! every buyer at once, spread over the instances. Each buys one unit as its own user
//! (`X-User`) with its own `Idempotency-Key` and, like an impatient but well-behaved
//! client, retries 409, 423, 429, 503 and transport errors with the same key after a
//! short jittered pause, for up to 60 s. Afterwards every buyer that got an order asks
//! again with its key on *every* instance (the same order must come back) and once with
//! another body (it must be refused with 422). Then it checks what must hold and exits
//! non-zero if anything does not:
//!
//! - stock never below zero, and `sold + stock` equal to the stock put up;
//! - one order per unit sold (`orders == sold`);
//! - every 200 a distinct order, and every replay the same order;
//! - no more units sold than buyers told "200" plus buyers left without an answer.
//!
//! `--faults` disturbs Redis while the buyers run: with `--redis-pid` it freezes the
//! server (SIGSTOP, 800 ms) and resumes it (SIGCONT) every 2 s; with `--proxy
//! 127.0.0.1:6390=127.0.0.1:6379` it runs a TCP proxy to Redis (start the services
//! with `REDIS_URL=redis://127.0.0.1:6390`) and holds its replies back 600 ms during one
//! second in every two.

use std::{
    collections::{BTreeMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use indicatif::{ProgressBar, ProgressStyle};
use reqwest::StatusCode;
use serde::Deserialize;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

struct Args {
    urls: Vec<String>,
    buyers: usize,
    stock: i64,
    sku: String,
    faults: bool,
    redis_pid: Option<u32>,
    proxy: Option<(String, String)>,
}

const USAGE: &str = "usage: flash_sale_load --url URL --buyers N --stock S [--instances URL2,...] \
                     [--sku SKU] [--faults [--redis-pid PID] [--proxy LISTEN=TARGET]]";

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        urls: Vec::new(),
        buyers: 2000,
        stock: 100,
        sku: format!("flash-{:08x}", fastrand::u32(..)),
        faults: false,
        redis_pid: None,
        proxy: None,
    };
    let mut argv = std::env::args().skip(1);
    while let Some(flag) = argv.next() {
        if flag == "--faults" {
            args.faults = true;
            continue;
        }
        let value = argv.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--url" => args.urls.insert(0, value.trim_end_matches('/').to_owned()),
            "--instances" => args.urls.extend(
                value
                    .split(',')
                    .map(|url| url.trim_end_matches('/').to_owned()),
            ),
            "--buyers" => args.buyers = value.parse().map_err(|_| "--buyers takes a number")?,
            "--stock" => args.stock = value.parse().map_err(|_| "--stock takes a number")?,
            "--sku" => args.sku = value,
            "--redis-pid" => {
                args.redis_pid = Some(value.parse().map_err(|_| "--redis-pid takes a pid")?)
            }
            "--proxy" => {
                let (listen, target) = value
                    .split_once('=')
                    .ok_or("--proxy takes LISTEN=TARGET, e.g. 127.0.0.1:6390=127.0.0.1:6379")?;
                args.proxy = Some((listen.to_owned(), target.to_owned()));
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if args.urls.is_empty() {
        args.urls.push("http://127.0.0.1:3000".to_owned());
    }
    if args.stock < 0 {
        return Err("--stock must be at least 0".to_owned());
    }
    Ok(args)
}

/// What happened to one buyer.
struct Outcome {
    key: String,
    user: String,
    status: Option<StatusCode>,
    order_id: Option<String>,
}

#[derive(Deserialize)]
struct Order {
    order_id: String,
}

#[derive(Deserialize)]
struct Item {
    stock: i64,
    sold: i64,
    orders: i64,
}

/// Answers that mean "not now": retry with the same key.
fn retryable(status: Option<StatusCode>) -> bool {
    status.is_none_or(|status| matches!(status.as_u16(), 409 | 423 | 429 | 503))
}

async fn buy(
    client: &reqwest::Client,
    url: &str,
    sku: &str,
    key: &str,
    user: &str,
    qty: u64,
) -> (Option<StatusCode>, Option<String>) {
    let response = client
        .post(format!("{url}/items/{sku}/buy"))
        .header("idempotency-key", key)
        .header("x-user", user)
        .json(&serde_json::json!({ "qty": qty }))
        .send()
        .await;
    match response {
        Ok(response) => {
            let status = response.status();
            let order = if status == StatusCode::OK {
                response
                    .json::<Order>()
                    .await
                    .ok()
                    .map(|order| order.order_id)
            } else {
                None
            };
            (Some(status), order)
        }
        Err(_) => (None, None),
    }
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    sorted
        .get(((sorted.len().max(1) - 1) as f64 * q) as usize)
        .copied()
        .unwrap_or_default()
}

/// A TCP proxy to Redis whose replies can be held back.
async fn proxy(listen: &str, target: String, delay_ms: Arc<AtomicU64>) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let (target, delay_ms) = (target.clone(), delay_ms.clone());
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(&target).await else {
                    return;
                };
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                let upstream = tokio::io::copy(&mut client_read, &mut server_write);
                // Each reply is held back from the moment it arrives: latency added, not
                // a cap on throughput (replies behind it are not delayed twice).
                let (replies, mut delayed) = tokio::sync::mpsc::unbounded_channel();
                let read = async move {
                    let mut buffer = vec![0u8; 64 * 1024];
                    loop {
                        let n = server_read.read(&mut buffer).await?;
                        if n == 0 {
                            return Ok::<_, std::io::Error>(());
                        }
                        let delay = Duration::from_millis(delay_ms.load(Ordering::Relaxed));
                        let due = tokio::time::Instant::now() + delay;
                        if replies.send((due, buffer[..n].to_vec())).is_err() {
                            return Ok(());
                        }
                    }
                };
                let write = async move {
                    while let Some((due, bytes)) = delayed.recv().await {
                        tokio::time::sleep_until(due).await;
                        client_write.write_all(&bytes).await?;
                    }
                    Ok::<_, std::io::Error>(())
                };
                let downstream = async { tokio::join!(read, write) };
                tokio::select! {
                    _ = upstream => {}
                    _ = downstream => {}
                }
            });
        }
    });
    Ok(())
}

fn signal(pid: u32, name: &str) {
    let sent = std::process::Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status();
    if !sent.is_ok_and(|status| status.success()) {
        eprintln!("could not send SIG{name} to {pid}");
    }
}

/// Until `done`: freeze Redis 800 ms every 2 s (with a pid) and hold replies back 600 ms
/// during one second in every two (with a proxy). Returns how many of each it did.
async fn disturb(
    pid: Option<u32>,
    delay_ms: Option<Arc<AtomicU64>>,
    done: Arc<AtomicBool>,
) -> (u32, u32) {
    let (mut pauses, mut delays) = (0, 0);
    while !done.load(Ordering::Relaxed) {
        if let Some(pid) = pid {
            signal(pid, "STOP");
            tokio::time::sleep(Duration::from_millis(800)).await;
            signal(pid, "CONT");
            pauses += 1;
        }
        if let Some(delay) = &delay_ms {
            delay.store(600, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_secs(1)).await;
            delay.store(0, Ordering::Relaxed);
            delays += 1;
        }
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }
    (pauses, delays)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args().map_err(|err| format!("{err}\n{USAGE}"))?;
    if args.faults && args.redis_pid.is_none() && args.proxy.is_none() {
        return Err(format!("--faults needs --redis-pid or --proxy\n{USAGE}").into());
    }
    let delay_ms = match &args.proxy {
        Some((listen, target)) => {
            let delay = Arc::new(AtomicU64::new(0));
            proxy(listen, target.clone(), delay.clone()).await?;
            println!("proxying {listen} -> {target}");
            Some(delay)
        }
        None => None,
    };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let created = client
        .put(format!("{}/items/{}", args.urls[0], args.sku))
        .json(&serde_json::json!({ "stock": args.stock }))
        .send()
        .await?;
    if created.status() != StatusCode::CREATED {
        return Err(format!(
            "could not create item {}: {} (pick a new --sku)",
            args.sku,
            created.status()
        )
        .into());
    }

    let progress = ProgressBar::new(args.buyers as u64).with_style(ProgressStyle::with_template(
        "{spinner} buyers done {pos}/{len} [{bar:40}] {elapsed_precise}",
    )?);
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let attempts = Arc::new(Mutex::new(BTreeMap::<String, usize>::new()));
    let done = Arc::new(AtomicBool::new(false));
    let faults = args
        .faults
        .then(|| tokio::spawn(disturb(args.redis_pid, delay_ms.clone(), done.clone())));
    let started = Instant::now();
    let buyers: Vec<_> = (0..args.buyers)
        .map(|i| {
            let url = args.urls[i % args.urls.len()].clone();
            let (client, sku, progress) = (client.clone(), args.sku.clone(), progress.clone());
            let (latencies, attempts) = (latencies.clone(), attempts.clone());
            tokio::spawn(async move {
                let key = uuid::Uuid::new_v4().to_string();
                let user = format!("buyer-{i}");
                let give_up = Instant::now() + Duration::from_secs(60);
                let (status, order_id) = loop {
                    let sent = Instant::now();
                    let (status, order_id) = buy(&client, &url, &sku, &key, &user, 1).await;
                    latencies.lock().unwrap().push(sent.elapsed());
                    let label = status.map_or("transport error".to_owned(), |s| s.to_string());
                    *attempts.lock().unwrap().entry(label).or_default() += 1;
                    if !retryable(status) || Instant::now() > give_up {
                        break (status, order_id);
                    }
                    tokio::time::sleep(Duration::from_millis(20 + fastrand::u64(0..80))).await;
                };
                progress.inc(1);
                Outcome {
                    key,
                    user,
                    status,
                    order_id,
                }
            })
        })
        .collect();
    let mut outcomes = Vec::with_capacity(args.buyers);
    for buyer in buyers {
        outcomes.push(buyer.await?);
    }
    let elapsed = started.elapsed();
    done.store(true, Ordering::Relaxed);
    let (pauses, delays) = match faults {
        Some(faults) => faults.await?,
        None => (0, 0),
    };
    progress.finish();

    // Every buyer with an order asks again on every instance (the same order must come
    // back) and once with another body (it must be refused).
    let paid: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| o.status == Some(StatusCode::OK))
        .collect();
    let (mut replays_differing, mut reuses_not_refused) = (0, 0);
    for outcome in &paid {
        for url in &args.urls {
            let (status, order_id) =
                buy(&client, url, &args.sku, &outcome.key, &outcome.user, 1).await;
            if status != Some(StatusCode::OK) || order_id != outcome.order_id {
                replays_differing += 1;
            }
        }
        let (status, _) = buy(
            &client,
            &args.urls[0],
            &args.sku,
            &outcome.key,
            &outcome.user,
            2,
        )
        .await;
        if status != Some(StatusCode::UNPROCESSABLE_ENTITY) {
            reuses_not_refused += 1;
        }
    }
    let distinct_orders: HashSet<&String> =
        paid.iter().filter_map(|o| o.order_id.as_ref()).collect();

    let item: Item = client
        .get(format!("{}/items/{}", args.urls[0], args.sku))
        .send()
        .await?
        .json()
        .await?;
    let successes = paid.len() as i64;
    let unanswered = outcomes.iter().filter(|o| retryable(o.status)).count() as i64;
    let mut finals = BTreeMap::<String, usize>::new();
    for outcome in &outcomes {
        let label = outcome
            .status
            .map_or("transport error".to_owned(), |s| s.to_string());
        *finals.entry(label).or_default() += 1;
    }
    let mut latencies = std::mem::take(&mut *latencies.lock().unwrap());
    latencies.sort_unstable();

    let mut broken = Vec::new();
    if item.stock < 0 {
        broken.push(format!("stock is {} (below zero)", item.stock));
    }
    if item.sold + item.stock != args.stock {
        broken.push(format!(
            "sold {} + stock {} != {} put up",
            item.sold, item.stock, args.stock
        ));
    }
    if item.orders != item.sold {
        broken.push(format!(
            "{} orders for {} units sold",
            item.orders, item.sold
        ));
    }
    if distinct_orders.len() as i64 != successes {
        broken.push(format!(
            "{} distinct orders for {successes} buyers told 200",
            distinct_orders.len()
        ));
    }
    if item.sold > successes + unanswered {
        broken.push(format!(
            "{} units sold, but only {successes} buyers told 200 and {unanswered} without an answer",
            item.sold
        ));
    }
    if replays_differing > 0 {
        broken.push(format!("{replays_differing} replays differ from the order"));
    }
    if reuses_not_refused > 0 {
        broken.push(format!(
            "{reuses_not_refused} keys reused with another body were not refused"
        ));
    }

    println!();
    println!("{:<34} {}", "instances", args.urls.join(", "));
    println!("{:<34} {}", "item", args.sku);
    println!("{:<34} {} in {:.2?}", "buyers", args.buyers, elapsed);
    if args.faults {
        println!("{:<34} {pauses}", "Redis frozen 800 ms (times)");
        println!("{:<34} {delays}", "replies 600 ms late for 1 s (times)");
    }
    println!("{:<34} {}", "sold (server)", item.sold);
    println!("{:<34} {}", "stock left (server)", item.stock);
    println!("{:<34} {}", "orders (server)", item.orders);
    println!("{:<34} {}", "buyers answered 200", successes);
    println!("{:<34} {}", "buyers left without an answer", unanswered);
    for (status, count) in &finals {
        println!("{:<34} {count}", format!("final answer {status}"));
    }
    for (status, count) in attempts.lock().unwrap().iter() {
        println!("{:<34} {count}", format!("attempts answered {status}"));
    }
    println!(
        "{:<34} {:.1?}",
        "latency per attempt p50",
        percentile(&latencies, 0.50)
    );
    println!(
        "{:<34} {:.1?}",
        "latency per attempt p99",
        percentile(&latencies, 0.99)
    );
    println!(
        "{:<34} {}",
        "replays checked (all instances)",
        paid.len() * args.urls.len()
    );
    if broken.is_empty() {
        println!("{:<34} all hold", "invariants");
        Ok(())
    } else {
        for what in &broken {
            println!("BROKEN: {what}");
        }
        Err("the sale was not honest".into())
    }
}
