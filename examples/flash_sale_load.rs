//! A crowd of buyers against the flash-sale service (`examples/flash_sale`).
//!
//! ```text
//! cargo run --release --example flash_sale_load -- --url http://127.0.0.1:3000 \
//!     --buyers 2000 --stock 100 [--instances http://127.0.0.1:3001,...] [--sku flash]
//! ```
//!
//! Resets the item to `--stock`, then fires every buyer at once, spread over the
//! instances. Each buys one unit with its own `Idempotency-Key` and, like an impatient but
//! well-behaved client, retries 409, 423, 429 and 503 with the same key after a short
//! jittered pause. Afterwards it asks each buyer's key once more (a replay must return the
//! same order) and prints what was sold, the answers, the latency, and the two numbers that
//! must be zero: units oversold and duplicate charges.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use indicatif::{ProgressBar, ProgressStyle};
use reqwest::StatusCode;
use serde::Deserialize;

struct Args {
    urls: Vec<String>,
    buyers: usize,
    stock: u64,
    sku: String,
}

const USAGE: &str =
    "usage: flash_sale_load --url URL --buyers N --stock S [--instances URL2,...] [--sku SKU]";

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        urls: Vec::new(),
        buyers: 2000,
        stock: 100,
        sku: "flash".to_owned(),
    };
    let mut argv = std::env::args().skip(1);
    while let Some(flag) = argv.next() {
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
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if args.urls.is_empty() {
        args.urls.push("http://127.0.0.1:3000".to_owned());
    }
    Ok(args)
}

/// What happened to one buyer.
struct Outcome {
    key: String,
    url: String,
    status: StatusCode,
    order_id: Option<String>,
}

#[derive(Deserialize)]
struct Order {
    order_id: String,
}

#[derive(Deserialize)]
struct Item {
    stock: i64,
    sold: u64,
}

/// Answers that mean "not now": retry with the same key.
fn retryable(status: StatusCode) -> bool {
    matches!(status.as_u16(), 409 | 423 | 429 | 503)
}

async fn buy(
    client: &reqwest::Client,
    url: &str,
    sku: &str,
    key: &str,
    user: &str,
) -> (StatusCode, Option<String>) {
    let response = client
        .post(format!("{url}/items/{sku}/buy"))
        .header("idempotency-key", key)
        .json(&serde_json::json!({ "user": user, "qty": 1 }))
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
            (status, order)
        }
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, None),
    }
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    sorted
        .get(((sorted.len().max(1) - 1) as f64 * q) as usize)
        .copied()
        .unwrap_or_default()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args().map_err(|err| format!("{err}\n{USAGE}"))?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let reset = client
        .put(format!("{}/items/{}", args.urls[0], args.sku))
        .json(&serde_json::json!({ "stock": args.stock }))
        .send()
        .await?;
    if !reset.status().is_success() {
        return Err(format!("could not reset the item: {}", reset.status()).into());
    }

    let progress = ProgressBar::new(args.buyers as u64).with_style(ProgressStyle::with_template(
        "{spinner} buyers done {pos}/{len} [{bar:40}] {elapsed_precise}",
    )?);
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let attempts = Arc::new(Mutex::new(BTreeMap::<u16, usize>::new()));
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
                    let (status, order_id) = buy(&client, &url, &sku, &key, &user).await;
                    latencies.lock().unwrap().push(sent.elapsed());
                    *attempts.lock().unwrap().entry(status.as_u16()).or_default() += 1;
                    if !retryable(status) || Instant::now() > give_up {
                        break (status, order_id);
                    }
                    tokio::time::sleep(Duration::from_millis(20 + fastrand::u64(0..80))).await;
                };
                progress.inc(1);
                Outcome {
                    key,
                    url,
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
    progress.finish();

    // Every successful buyer asks again with its key: the same order must come back.
    let mut duplicate_charges = 0;
    for outcome in outcomes.iter().filter(|o| o.status == StatusCode::OK) {
        let user = "replay-check";
        let response = client
            .post(format!("{}/items/{}/buy", outcome.url, args.sku))
            .header("idempotency-key", &outcome.key)
            .json(&serde_json::json!({ "user": user, "qty": 1 }))
            .send()
            .await?;
        // A different body under the same key must be refused, never charged again.
        if response.status() != StatusCode::UNPROCESSABLE_ENTITY {
            duplicate_charges += 1;
        }
    }
    let mut replays_differing = 0;
    for (i, outcome) in outcomes
        .iter()
        .enumerate()
        .filter(|(_, o)| o.status == StatusCode::OK)
    {
        let user = format!("buyer-{i}");
        let (status, order_id) = buy(&client, &outcome.url, &args.sku, &outcome.key, &user).await;
        if status != StatusCode::OK || order_id != outcome.order_id {
            replays_differing += 1;
        }
    }

    let item: Item = client
        .get(format!("{}/items/{}", args.urls[0], args.sku))
        .send()
        .await?
        .json()
        .await?;
    let successes = outcomes
        .iter()
        .filter(|o| o.status == StatusCode::OK)
        .count() as u64;
    let mut finals = BTreeMap::<u16, usize>::new();
    for outcome in &outcomes {
        *finals.entry(outcome.status.as_u16()).or_default() += 1;
    }
    let mut latencies = std::mem::take(&mut *latencies.lock().unwrap());
    latencies.sort_unstable();
    let oversold = item.sold.saturating_sub(args.stock) + u64::from(item.stock < 0);
    let duplicates =
        duplicate_charges + replays_differing + item.sold.saturating_sub(successes) as usize;

    println!();
    println!("{:<34} {}", "instances", args.urls.join(", "));
    println!("{:<34} {} in {:.2?}", "buyers", args.buyers, elapsed);
    println!("{:<34} {}", "sold (server)", item.sold);
    println!("{:<34} {}", "stock left (server)", item.stock);
    println!("{:<34} {}", "buyers answered 200", successes);
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
    println!("{:<34} {}", "oversold (must be 0)", oversold);
    println!("{:<34} {}", "duplicate charges (must be 0)", duplicates);
    if oversold > 0 || duplicates > 0 {
        return Err("the sale was not honest".into());
    }
    Ok(())
}
