//! Memory through a three-tier tree of real relay processes.
//!
//! One cold bundle (1 GiB by default) is published at a root; 100 clients (by default) ask
//! a leaf for it at once, so it travels root -> mid -> leaf while every client follows the
//! leaf's fill. Prints each relay's peak resident memory (VmHWM) and the timings.
//!
//! Run: `cargo bench --bench tree_memory`
//! Knobs: PATCHRELAY_BENCH_MIB (bundle size, default 1024), PATCHRELAY_BENCH_CLIENTS
//! (default 100), PATCHRELAY_BENCH_DIR (scratch directory, default the system temp dir;
//! needs about four times the bundle size).

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

mod common;

use common::{cores, cpu_model, RelayProcess, BIN};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn write_bundle(path: &Path, mib: u64) -> String {
    let mut xof = blake3::Hasher::new()
        .update(b"patchrelay bench")
        .finalize_xof();
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).expect("create bundle"));
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..mib {
        xof.fill(&mut buf);
        hasher.update(&buf);
        file.write_all(&buf).expect("write bundle");
    }
    file.flush().expect("flush bundle");
    hasher.finalize().to_hex().to_string()
}

fn main() {
    let mib = env_or("PATCHRELAY_BENCH_MIB", 1024);
    let clients = env_or("PATCHRELAY_BENCH_CLIENTS", 100);
    let scratch =
        std::env::var_os("PATCHRELAY_BENCH_DIR").map_or_else(std::env::temp_dir, Into::into);
    let dir = tempfile::tempdir_in(scratch).expect("scratch directory");

    let bundle = dir.path().join("bundle.bin");
    let id = write_bundle(&bundle, mib);
    let root = RelayProcess::start("root", dir.path(), None, "");
    let published = Command::new(BIN)
        .args(["publish", "-c"])
        .arg(dir.path().join("root.toml"))
        .arg(&bundle)
        .output()
        .expect("publish");
    assert!(published.status.success(), "publish failed");
    std::fs::remove_file(&bundle).expect("remove source copy");
    let mid = RelayProcess::start("mid", dir.path(), Some(&root.addr), "");
    let leaf = RelayProcess::start("leaf", dir.path(), Some(&mid.addr), "");
    let relays = [root, mid, leaf];

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let url = format!("http://{}/v1/bundles/{id}", relays[2].addr);
    let (elapsed, delivered, verified, peaks) =
        runtime.block_on(fetch_all(&url, &id, clients, &relays));

    println!("patchrelay tree memory benchmark");
    println!("bundle: {mib} MiB, cold at mid and leaf; {clients} concurrent clients at the leaf");
    println!("tree: clients -> leaf -> mid -> root (bundle published at the root)");
    println!("machine: {} cores, {}", cores(), cpu_model());
    println!();
    println!("| relay | peak RSS (VmHWM) | highest RSS sampled |");
    println!("|---|---|---|");
    for (relay, sampled) in relays.iter().zip(peaks) {
        let hwm = relay.memory_kib("VmHWM:");
        println!(
            "| {} | {:.1} MiB | {:.1} MiB |",
            relay.name,
            hwm as f64 / 1024.0,
            sampled as f64 / 1024.0
        );
    }
    println!();
    let gib = delivered as f64 / (1u64 << 30) as f64;
    println!(
        "last client complete after {:.1} s; {gib:.1} GiB delivered in all ({:.0} MiB/s)",
        elapsed.as_secs_f64(),
        delivered as f64 / (1 << 20) as f64 / elapsed.as_secs_f64()
    );
    println!("first client's bytes hash to the id: {verified}");
}

async fn fetch_all(
    url: &str,
    id: &str,
    clients: u64,
    relays: &[RelayProcess],
) -> (Duration, u64, bool, Vec<u64>) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let delivered = Arc::new(AtomicU64::new(0));
    let started = Instant::now();

    let mut tasks = Vec::new();
    for n in 0..clients {
        let (client, url, delivered) = (client.clone(), url.to_string(), delivered.clone());
        tasks.push(tokio::spawn(async move {
            let uri = url.parse().expect("valid url");
            let response = client.get(uri).await.expect("leaf answers");
            assert_eq!(response.status(), 200);
            let mut body = response.into_body();
            let mut hasher = (n == 0).then(blake3::Hasher::new);
            while let Some(frame) = body.frame().await {
                let frame = frame.expect("body completes");
                if let Ok(data) = frame.into_data() {
                    delivered.fetch_add(data.len() as u64, Ordering::Relaxed);
                    if let Some(h) = hasher.as_mut() {
                        h.update(&data);
                    }
                }
            }
            hasher.map(|h| h.finalize().to_hex().to_string())
        }));
    }

    let mut peaks = vec![0u64; relays.len()];
    let mut verified = false;
    let all = futures_util::future::join_all(tasks);
    tokio::pin!(all);
    loop {
        tokio::select! {
            results = &mut all => {
                for hash in results.into_iter().flat_map(|r| r.expect("client task")) {
                    verified = hash == id;
                }
                break;
            }
            _ = tokio::time::sleep(Duration::from_millis(50)) => {
                for (peak, relay) in peaks.iter_mut().zip(relays) {
                    *peak = (*peak).max(relay.memory_kib("VmRSS:"));
                }
            }
        }
    }
    (
        started.elapsed(),
        delivered.load(Ordering::Relaxed),
        verified,
        peaks,
    )
}
