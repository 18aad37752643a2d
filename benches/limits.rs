//! Bandwidth caps: how close a relay holds a downstream cap, and how evenly it shares it.
//!
//! For caps of 1 Mbit/s, 100 Mbit/s and 1 Gbit/s and 1, 8 and 64 concurrent clients, a
//! relay process with `[limits] downstream = <cap>` serves a cached bundle to clients that
//! download it over and over. After a warm-up second (which also spends the burst), each
//! client's bytes are counted over a window. Prints achieved rate / cap, Jain's fairness
//! index across the clients ((sum x)^2 / (n * sum x^2); 1.0 = perfectly even) and the
//! relay's peak resident memory.
//!
//! Run: `cargo bench --bench limits`
//! Knobs: PATCHRELAY_BENCH_SECONDS (measured window per case, default 5).

mod common;

use std::io::Write;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use common::{cores, cpu_model, RelayProcess, BIN};

const CAPS: [(&str, f64); 3] = [
    ("1 Mbit/s", 125_000.0),
    ("100 Mbit/s", 12_500_000.0),
    ("1 Gbit/s", 125_000_000.0),
];
const CLIENTS: [usize; 3] = [1, 8, 64];
const WARMUP: Duration = Duration::from_secs(1);
const BUNDLE_MIB: usize = 32;

fn main() {
    let seconds: u64 = std::env::var("PATCHRELAY_BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let window = Duration::from_secs(seconds);
    let dir = tempfile::tempdir().expect("scratch directory");
    let bundle = dir.path().join("bundle.bin");
    let id = write_bundle(&bundle);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");

    println!("patchrelay downstream cap benchmark");
    println!("machine: {} cores, {}", cores(), cpu_model());
    println!("bundle: {BUNDLE_MIB} MiB, cached; window {seconds} s after 1 s of warm-up");
    println!();
    println!("| cap | clients | achieved | achieved / cap | Jain's index | relay peak RSS |");
    println!("|---|---|---|---|---|---|");
    let mut published = false;
    for (cap_text, cap) in CAPS {
        for clients in CLIENTS {
            let limits = format!("[limits]\ndownstream = \"{cap_text}\"\n");
            let relay = RelayProcess::start("edge", dir.path(), None, &limits);
            if !published {
                publish(dir.path(), &bundle);
                published = true;
            }
            let url = format!("http://{}/v1/bundles/{id}", relay.addr);
            let rates = runtime.block_on(measure(&url, clients, window));
            let total: f64 = rates.iter().sum();
            println!(
                "| {cap_text} | {clients} | {:.2} Mbit/s | {:.3} | {:.3} | {:.1} MiB |",
                total * 8.0 / 1e6,
                total / cap,
                jain(&rates),
                relay.memory_kib("VmHWM:") as f64 / 1024.0
            );
            let _ = std::io::stdout().flush();
        }
    }
}

/// Runs `clients` downloaders against `url`; returns each one's bytes/s over the window.
async fn measure(url: &str, clients: usize, window: Duration) -> Vec<f64> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let stop = Arc::new(AtomicBool::new(false));
    let counters: Vec<Arc<AtomicU64>> = (0..clients).map(|_| Arc::default()).collect();

    let mut tasks = Vec::new();
    for counter in &counters {
        let (client, url, stop, counter) = (
            client.clone(),
            url.to_string(),
            stop.clone(),
            counter.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let uri = url.parse().expect("valid url");
                let response = client.get(uri).await.expect("relay answers");
                assert_eq!(response.status(), 200);
                let mut body = response.into_body();
                while let Some(frame) = body.frame().await {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    if let Ok(data) = frame.expect("body completes").into_data() {
                        counter.fetch_add(data.len() as u64, Ordering::Relaxed);
                    }
                }
            }
        }));
    }

    tokio::time::sleep(WARMUP).await;
    let before: Vec<u64> = counters.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    tokio::time::sleep(window).await;
    let after: Vec<u64> = counters.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.abort();
    }
    before
        .iter()
        .zip(after)
        .map(|(b, a)| (a - b) as f64 / window.as_secs_f64())
        .collect()
}

/// Jain's fairness index: 1.0 when every client got the same.
fn jain(rates: &[f64]) -> f64 {
    let sum: f64 = rates.iter().sum();
    let squares: f64 = rates.iter().map(|r| r * r).sum();
    if squares == 0.0 {
        return 0.0;
    }
    sum * sum / (rates.len() as f64 * squares)
}

fn write_bundle(path: &std::path::Path) -> String {
    let mut xof = blake3::Hasher::new()
        .update(b"patchrelay limits bench")
        .finalize_xof();
    let mut data = vec![0u8; BUNDLE_MIB << 20];
    xof.fill(&mut data);
    std::fs::write(path, &data).expect("write bundle");
    blake3::hash(&data).to_hex().to_string()
}

fn publish(dir: &std::path::Path, bundle: &std::path::Path) {
    let published = Command::new(BIN)
        .args(["publish", "-c"])
        .arg(dir.join("edge.toml"))
        .arg(bundle)
        .output()
        .expect("publish");
    assert!(published.status.success(), "publish failed");
}
