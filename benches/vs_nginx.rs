//! patchrelay against nginx as a caching reverse proxy, side by side in one run.
//!
//! An nginx origin serves bundle files. The same chains are built twice: patchrelay relays
//! (leaf -> mid -> root -> origin) and nginx caching proxies with production settings
//! (proxy_cache with proxy_cache_lock on, sendfile, keepalive to the upstream). All on
//! loopback, ephemeral ports, every process stopped at the end. Each scenario starts
//! fresh processes, so the peak RSS printed is that scenario's.
//!
//! Scenarios: hot hits (64 clients re-fetching a cached 64 MiB bundle), cold fan-out (200
//! clients asking a 3-tier chain's leaf for one cold 512 MiB bundle at once, against one
//! client alone), one cold client through 1, 2 and 3 tiers, many small (1 MiB bundles at
//! 64 connections), resume (clients that drop at random offsets and resume with Range,
//! through a cold 3-tier chain).
//!
//! Run: `cargo bench --bench vs_nginx` (installs Debian's nginx when missing; needs root
//! for that). Knobs: PATCHRELAY_VS_SECONDS (length of the timed scenarios, default 10),
//! PATCHRELAY_VS_FANOUT_MIB (default 512), PATCHRELAY_VS_FANOUT_CLIENTS (default 200),
//! PATCHRELAY_VS_DIR (scratch directory; every chain's caches stay until the end, so a
//! full run needs about 30 times the fan-out size),
//! PATCHRELAY_VS_ONLY (run the scenarios whose name contains this: hot, small, fan, tiers,
//! resume; for profiling one).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

mod common;

use common::{cores, cpu_model, RelayProcess};

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

fn knob(name: &str, default: u64) -> u64 {
    std::env::var(format!("PATCHRELAY_VS_{name}"))
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Makes sure nginx is there, installing Debian's package if not.
fn nginx_binary() -> PathBuf {
    for path in ["/usr/sbin/nginx", "/usr/bin/nginx"] {
        if Path::new(path).exists() {
            return path.into();
        }
    }
    eprintln!("nginx not found: installing Debian's nginx-light");
    // A fresh machine has no package lists yet; a failed update may still leave usable ones.
    let _ = Command::new("apt-get")
        .args(["update", "-q"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status();
    let status = Command::new("apt-get")
        .args(["install", "-y", "-q", "nginx-light"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .expect("run apt-get");
    assert!(status.success(), "could not install nginx");
    "/usr/sbin/nginx".into()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// An nginx instance under its own prefix directory, stopped when dropped.
struct Nginx {
    child: Child,
    port: u16,
    prefix: PathBuf,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its workers, then exits. Workers still there after
        // that (orphaned, say) are killed outright.
        let workers = self.workers();
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        for pid in workers {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
        }
    }
}

impl Nginx {
    /// Starts nginx with `server` (the body of its server block) under `dir/name`.
    fn start(binary: &Path, dir: &Path, name: &str, http: &str, server: &str) -> Self {
        let prefix = dir.join(name);
        std::fs::create_dir_all(prefix.join("logs")).expect("nginx prefix");
        let port = free_port();
        let conf = format!(
            "user root;\nworker_processes auto;\npid {p}/nginx.pid;\n\
             error_log {p}/error.log warn;\n\
             events {{ worker_connections 8192; }}\n\
             http {{\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n  tcp_nodelay on;\n\
             keepalive_timeout 65;\n  keepalive_requests 1000000;\n  {http}\n\
             server {{\n    listen 127.0.0.1:{port} backlog=4096;\n    {server}\n  }}\n}}\n",
            p = prefix.display()
        );
        let conf_path = prefix.join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("write nginx.conf");
        let child = Command::new(binary)
            .arg("-p")
            .arg(&prefix)
            .arg("-c")
            .arg(&conf_path)
            .args(["-g", "daemon off;"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nginx");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "nginx {name} did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child,
            port,
            prefix,
        }
    }

    /// A static origin serving `root/bundles/<id>`, logging body bytes sent.
    fn origin(binary: &Path, dir: &Path, root: &Path) -> Self {
        let http = "log_format sent '$body_bytes_sent';";
        let server = format!(
            "access_log {}/sent.log sent;\n    location /bundles/ {{ root {}; }}",
            dir.join("origin").display(),
            root.display()
        );
        Self::start(binary, dir, "origin", http, &server)
    }

    /// A caching proxy in front of `upstream_port`; `path` is the upstream's bundle path.
    fn cache(binary: &Path, dir: &Path, name: &str, upstream_port: u16, path: &str) -> Self {
        let cache = dir.join(name).join("cache");
        let http = format!(
            "proxy_cache_path {} levels=1:2 keys_zone={name}:64m max_size=50g inactive=7d \
             use_temp_path=off;\n  upstream parent {{ server 127.0.0.1:{upstream_port}; \
             keepalive 64; }}",
            cache.display()
        );
        let server = format!(
            "location /v1/bundles/ {{\n      proxy_pass http://parent{path};\n      \
             proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      \
             proxy_cache {name};\n      proxy_cache_key $uri;\n      \
             proxy_cache_valid 200 7d;\n      proxy_cache_lock on;\n      \
             proxy_cache_lock_timeout 1h;\n      proxy_cache_lock_age 1h;\n      \
             proxy_read_timeout 1h;\n      proxy_buffering on;\n      \
             add_header X-Cache $upstream_cache_status;\n    }}"
        );
        Self::start(binary, dir, name, &http, &server)
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// PIDs of this master's worker processes.
    fn workers(&self) -> Vec<u32> {
        let master = self.child.id();
        let mut workers = Vec::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if ppid == Some(master) {
                workers.push(pid);
            }
        }
        workers
    }

    /// Peak RSS of master and workers together, KiB.
    fn peak_kib(&self) -> u64 {
        std::iter::once(self.child.id())
            .chain(self.workers())
            .map(vm_hwm)
            .sum()
    }

    /// Body bytes the origin's log says it sent.
    fn origin_sent(&self) -> u64 {
        std::fs::read_to_string(self.prefix.join("sent.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse::<u64>().ok())
            .sum()
    }
}

fn vm_hwm(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Writes a bundle of `mib` MiB of pseudo-random bytes under `root/bundles/`; returns
/// its id.
fn write_bundle(root: &Path, seed: &str, bytes: u64) -> String {
    let mut xof = blake3::Hasher::new().update(seed.as_bytes()).finalize_xof();
    let mut data = vec![0u8; bytes as usize];
    xof.fill(&mut data);
    let id = blake3::hash(&data).to_hex().to_string();
    std::fs::create_dir_all(root.join("bundles")).expect("bundles dir");
    std::fs::write(root.join("bundles").join(&id), &data).expect("write bundle");
    id
}

/// A chain of one system: the URL clients use, and how to read its memory.
trait Chain {
    fn leaf_url(&self) -> String;
    /// Peak RSS of each tier, leaf first, KiB.
    fn peaks(&self) -> Vec<u64>;
}

struct RelayChain(Vec<RelayProcess>);

impl Chain for RelayChain {
    fn leaf_url(&self) -> String {
        format!("http://{}", self.0.last().expect("a relay").addr)
    }

    fn peaks(&self) -> Vec<u64> {
        self.0
            .iter()
            .rev()
            .map(|r| r.memory_kib("VmHWM:"))
            .collect()
    }
}

struct NginxChain(Vec<Nginx>);

impl Chain for NginxChain {
    fn leaf_url(&self) -> String {
        self.0.last().expect("an nginx").url()
    }

    fn peaks(&self) -> Vec<u64> {
        self.0.iter().rev().map(Nginx::peak_kib).collect()
    }
}

/// Names each scenario's chain directory uniquely.
static CHAIN_SEQ: AtomicU64 = AtomicU64::new(0);

fn relay_chain(dir: &Path, tiers: usize, origin: &Nginx) -> RelayChain {
    let names: [&'static str; 3] = ["root", "mid", "leaf"];
    let sub = dir.join(format!(
        "relays-{}",
        CHAIN_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&sub).expect("chain dir");
    let mut relays: Vec<RelayProcess> = Vec::new();
    for name in names.iter().take(tiers) {
        let relay = match relays.last() {
            None => {
                let extra = format!("origin = \"{}/bundles/{{id}}\"\n", origin.url());
                RelayProcess::start(name, &sub, None, &extra)
            }
            Some(parent) => RelayProcess::start(name, &sub, Some(&parent.addr), ""),
        };
        relays.push(relay);
    }
    RelayChain(relays)
}

fn nginx_chain(binary: &Path, dir: &Path, tiers: usize, origin: &Nginx) -> NginxChain {
    let sub = dir.join(format!(
        "nginx-{}",
        CHAIN_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&sub).expect("chain dir");
    let mut proxies: Vec<Nginx> = Vec::new();
    for name in ["root", "mid", "leaf"].iter().take(tiers) {
        let proxy = match proxies.last() {
            None => Nginx::cache(binary, &sub, name, origin.port, "/bundles/"),
            Some(parent) => Nginx::cache(binary, &sub, name, parent.port, ""),
        };
        proxies.push(proxy);
    }
    NginxChain(proxies)
}

/// Downloads `url` whole (from `from` on, with a Range); returns the bytes read and,
/// with `hash`, the hasher fed with them.
async fn fetch(
    client: &HttpClient,
    url: &str,
    from: u64,
    stop_after: Option<u64>,
    mut hasher: Option<&mut blake3::Hasher>,
) -> Result<u64, String> {
    let mut request = http::Request::get(url);
    if from > 0 {
        request = request.header("range", format!("bytes={from}-"));
    }
    let request = request.body(Empty::new()).map_err(|e| e.to_string())?;
    let response = client.request(request).await.map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    if status != 200 && status != 206 {
        return Err(format!("{url}: {status}"));
    }
    let mut body = response.into_body();
    let mut read = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        if let Ok(mut data) = frame.into_data() {
            if let Some(limit) = stop_after {
                if read + data.len() as u64 >= limit {
                    data.truncate((limit - read) as usize);
                    if let Some(h) = hasher.as_mut() {
                        h.update(&data);
                    }
                    // Dropping the body mid-stream closes the connection.
                    return Ok(limit);
                }
            }
            read += data.len() as u64;
            if let Some(h) = hasher.as_mut() {
                h.update(&data);
            }
        }
    }
    Ok(read)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// `connections` loops fetching `urls` round robin for `seconds`: (bytes, latencies).
async fn hammer(urls: &[String], connections: usize, seconds: u64) -> (u64, Vec<Duration>) {
    let client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(connections)
        .build_http::<Empty<Bytes>>();
    let end = Instant::now() + Duration::from_secs(seconds);
    let bytes = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..connections {
        let (client, bytes, urls) = (client.clone(), bytes.clone(), urls.to_vec());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut i = c;
            while Instant::now() < end {
                let url = &urls[i % urls.len()];
                i += 1;
                let started = Instant::now();
                match fetch(&client, url, 0, None, None).await {
                    Ok(n) => {
                        bytes.fetch_add(n, Ordering::Relaxed);
                        latencies.push(started.elapsed());
                    }
                    Err(e) => panic!("fetch failed: {e}"),
                }
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.expect("client task"));
    }
    latencies.sort();
    (bytes.load(Ordering::Relaxed), latencies)
}

/// One system's figures in one scenario.
struct Figures {
    main: f64,
    p50: Duration,
    p99: Duration,
    origin_bytes: u64,
    peaks: Vec<u64>,
    note: String,
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn row(
    notes: &mut Vec<String>,
    scenario: &str,
    unit: &str,
    higher_is_better: bool,
    relay: &Figures,
    nginx: &Figures,
) {
    let ratio = relay.main / nginx.main.max(f64::MIN_POSITIVE);
    let peaks = |f: &Figures| {
        f.peaks
            .iter()
            .map(|k| format!("{:.0}", mib(*k)))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    println!(
        "| {scenario} | {unit} | {:.1} | {:.1} | {ratio:.2}{} | {:.1} / {:.1} | {:.1} / {:.1} \
         | {:.1} / {:.1} | {} | {} |",
        relay.main,
        nginx.main,
        if higher_is_better {
            ""
        } else {
            " (lower is better)"
        },
        relay.p50.as_secs_f64() * 1000.0,
        nginx.p50.as_secs_f64() * 1000.0,
        relay.p99.as_secs_f64() * 1000.0,
        nginx.p99.as_secs_f64() * 1000.0,
        relay.origin_bytes as f64 / (1 << 20) as f64,
        nginx.origin_bytes as f64 / (1 << 20) as f64,
        peaks(relay),
        peaks(nginx),
    );
    for (system, figures) in [("patchrelay", relay), ("nginx", nginx)] {
        if !figures.note.is_empty() {
            notes.push(format!("- {scenario}, {system}: {}", figures.note));
        }
    }
}

async fn hot_hits(chain: &dyn Chain, id: &str, seconds: u64) -> Figures {
    let url = format!("{}/v1/bundles/{id}", chain.leaf_url());
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    fetch(&client, &url, 0, None, None).await.expect("warm-up");
    let started = Instant::now();
    let (bytes, latencies) = hammer(std::slice::from_ref(&url), 64, seconds).await;
    Figures {
        main: bytes as f64 / (1 << 20) as f64 / started.elapsed().as_secs_f64(),
        p50: percentile(&latencies, 0.5),
        p99: percentile(&latencies, 0.99),
        origin_bytes: 0,
        peaks: chain.peaks(),
        note: format!("{} downloads", latencies.len()),
    }
}

async fn many_small(chain: &dyn Chain, ids: &[String], seconds: u64) -> Figures {
    let urls: Vec<String> = ids
        .iter()
        .map(|id| format!("{}/v1/bundles/{id}", chain.leaf_url()))
        .collect();
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    for url in &urls {
        fetch(&client, url, 0, None, None).await.expect("warm-up");
    }
    let started = Instant::now();
    let (_, latencies) = hammer(&urls, 64, seconds).await;
    Figures {
        main: latencies.len() as f64 / started.elapsed().as_secs_f64(),
        p50: percentile(&latencies, 0.5),
        p99: percentile(&latencies, 0.99),
        origin_bytes: 0,
        peaks: chain.peaks(),
        note: String::new(),
    }
}

/// Bounds a scenario's time: a hung system fails the run instead of stalling it.
async fn bounded<F: std::future::Future>(scenario: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(900), scenario)
        .await
        .expect("a scenario took more than 15 minutes")
}

/// `clients` at once for one cold bundle; the seconds until the last has every byte.
async fn cold_fan_out(chain: &dyn Chain, id: &str, clients: usize) -> (Duration, Vec<Duration>) {
    let url = format!("{}/v1/bundles/{id}", chain.leaf_url());
    let client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(clients)
        .build_http::<Empty<Bytes>>();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (client, url) = (client.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            fetch(&client, &url, 0, None, None)
                .await
                .expect("cold fetch completes");
            started.elapsed()
        }));
    }
    let mut times = Vec::new();
    for task in tasks {
        times.push(task.await.expect("client task"));
    }
    times.sort();
    (started.elapsed(), times)
}

/// Clients that each drop at a random offset and resume with a Range; checks that every
/// client's bytes hash to the id. Returns the time until all are complete.
async fn resume(chain: &dyn Chain, id: &str, size: u64, clients: u64) -> (Duration, bool) {
    let url = format!("{}/v1/bundles/{id}", chain.leaf_url());
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (client, url, id) = (client.clone(), url.clone(), id.to_string());
        // Offsets spread over the bundle, deterministic per client.
        let cut = (size / (clients + 1)) * (c + 1) + (c * 7919) % 4096;
        tasks.push(tokio::spawn(async move {
            let mut hasher = blake3::Hasher::new();
            let first = fetch(&client, &url, 0, Some(cut), Some(&mut hasher))
                .await
                .expect("first part");
            let rest = fetch(&client, &url, first, None, Some(&mut hasher))
                .await
                .expect("resumed part");
            first + rest == size && hasher.finalize().to_hex().as_str() == id
        }));
    }
    let mut all_ok = true;
    for task in tasks {
        all_ok &= task.await.expect("client task");
    }
    (started.elapsed(), all_ok)
}

fn main() {
    let seconds = knob("SECONDS", 10);
    let fanout_mib = knob("FANOUT_MIB", 512);
    let fanout_clients = knob("FANOUT_CLIENTS", 200) as usize;
    let scratch = std::env::var_os("PATCHRELAY_VS_DIR").map_or_else(std::env::temp_dir, Into::into);
    let dir = tempfile::tempdir_in(scratch).expect("scratch directory");
    let binary = nginx_binary();
    let version = Command::new(&binary)
        .arg("-v")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string())
        .unwrap_or_default();

    let files = dir.path().join("origin-files");
    let hot = write_bundle(&files, "hot", 64 << 20);
    let small: Vec<String> = (0..64)
        .map(|i| write_bundle(&files, &format!("small {i}"), 1 << 20))
        .collect();
    let fan_relay = write_bundle(&files, "fan relay", fanout_mib << 20);
    let fan_nginx = write_bundle(&files, "fan nginx", fanout_mib << 20);
    let single_relay = write_bundle(&files, "single relay", fanout_mib << 20);
    let single_nginx = write_bundle(&files, "single nginx", fanout_mib << 20);
    let resume_relay = write_bundle(&files, "resume relay", 64 << 20);
    let resume_nginx = write_bundle(&files, "resume nginx", 64 << 20);
    let origin = Nginx::origin(&binary, dir.path(), &files);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");

    println!(
        "patchrelay vs nginx ({version}), {}",
        chrono::Utc::now().format("%Y-%m-%d")
    );
    println!(
        "machine: {} cores, {}; clients in the benchmark process",
        cores(),
        cpu_model()
    );
    println!();
    println!(
        "| scenario | unit | patchrelay | nginx | ratio | p50 ms (pr / nginx) | p99 ms \
         (pr / nginx) | origin MiB (pr / nginx) | peak RSS MiB patchrelay, leaf first | \
         peak RSS MiB nginx (master+workers), leaf first |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut notes = Vec::new();

    let only = std::env::var("PATCHRELAY_VS_ONLY").unwrap_or_default();
    let run = |name: &str| only.is_empty() || name.contains(only.as_str());

    // 1. Hot hits on one relay.
    if run("hot") {
        let relay = relay_chain(dir.path(), 1, &origin);
        let r = runtime.block_on(bounded(hot_hits(&relay, &hot, seconds)));
        drop(relay);
        let proxy = nginx_chain(&binary, dir.path(), 1, &origin);
        let n = runtime.block_on(bounded(hot_hits(&proxy, &hot, seconds)));
        drop(proxy);
        row(
            &mut notes,
            "hot hits, 64 clients, 64 MiB",
            "MiB/s",
            true,
            &r,
            &n,
        );
    }

    // 2. Many small bundles.
    if run("small") {
        let relay = relay_chain(dir.path(), 1, &origin);
        let r = runtime.block_on(bounded(many_small(&relay, &small, seconds)));
        drop(relay);
        let proxy = nginx_chain(&binary, dir.path(), 1, &origin);
        let n = runtime.block_on(bounded(many_small(&proxy, &small, seconds)));
        drop(proxy);
        row(
            &mut notes,
            "many small, 64 conns, 1 MiB",
            "req/s",
            true,
            &r,
            &n,
        );
    }

    // 3. Cold fan-out through three tiers, and one client alone for comparison.
    let mut fan = Vec::new();
    if run("fan") {
        for (system, fan_id, single_id) in [
            ("patchrelay", &fan_relay, &single_relay),
            ("nginx", &fan_nginx, &single_nginx),
        ] {
            let before = origin.origin_sent();
            let chain: Box<dyn Chain> = if system == "patchrelay" {
                Box::new(relay_chain(dir.path(), 3, &origin))
            } else {
                Box::new(nginx_chain(&binary, dir.path(), 3, &origin))
            };
            let (last, times) = runtime.block_on(bounded(cold_fan_out(
                chain.as_ref(),
                fan_id,
                fanout_clients,
            )));
            let origin_bytes = origin.origin_sent() - before;
            let peaks = chain.peaks();
            // The same clients again, now that the leaf has the bundle: what serving 200
            // copies costs by itself, so cold / warm is what the cold path adds.
            let (warm, _) = runtime.block_on(bounded(cold_fan_out(
                chain.as_ref(),
                fan_id,
                fanout_clients,
            )));
            drop(chain);
            let chain: Box<dyn Chain> = if system == "patchrelay" {
                Box::new(relay_chain(dir.path(), 3, &origin))
            } else {
                Box::new(nginx_chain(&binary, dir.path(), 3, &origin))
            };
            let (alone, _) = runtime.block_on(bounded(cold_fan_out(chain.as_ref(), single_id, 1)));
            drop(chain);
            fan.push(Figures {
                main: last.as_secs_f64(),
                p50: percentile(&times, 0.5),
                p99: percentile(&times, 0.99),
                origin_bytes,
                peaks,
                note: format!(
                    "one client alone {:.2}s; last of {fanout_clients} / alone = {:.2}; \
                     the same {fanout_clients} clients warm (cached at the leaf) {:.2}s; \
                     cold / warm = {:.2}",
                    alone.as_secs_f64(),
                    last.as_secs_f64() / alone.as_secs_f64(),
                    warm.as_secs_f64(),
                    last.as_secs_f64() / warm.as_secs_f64()
                ),
            });
        }
        let scenario = format!("cold fan-out, {fanout_clients} clients, {fanout_mib} MiB, 3 tiers");
        row(&mut notes, &scenario, "s to last", false, &fan[0], &fan[1]);
    }

    // 3b. One client, one cold bundle, through 1, 2 and 3 tiers: what each hop costs.
    if run("tiers") {
        for tiers in 1..=3 {
            let mut tier_figures = Vec::new();
            for system in ["patchrelay", "nginx"] {
                let id = write_bundle(&files, &format!("tiers {tiers} {system}"), fanout_mib << 20);
                let before = origin.origin_sent();
                let chain: Box<dyn Chain> = if system == "patchrelay" {
                    Box::new(relay_chain(dir.path(), tiers, &origin))
                } else {
                    Box::new(nginx_chain(&binary, dir.path(), tiers, &origin))
                };
                let (took, _) = runtime.block_on(bounded(cold_fan_out(chain.as_ref(), &id, 1)));
                tier_figures.push(Figures {
                    main: took.as_secs_f64(),
                    p50: Duration::ZERO,
                    p99: Duration::ZERO,
                    origin_bytes: origin.origin_sent() - before,
                    peaks: chain.peaks(),
                    note: String::new(),
                });
            }
            let scenario = format!("cold, 1 client, {fanout_mib} MiB, {tiers} tier(s)");
            row(
                &mut notes,
                &scenario,
                "s",
                false,
                &tier_figures[0],
                &tier_figures[1],
            );
        }
    }

    // 4. Resume with Range through a cold three-tier chain.
    let mut resumed = Vec::new();
    if run("resume") {
        for (system, id) in [("patchrelay", &resume_relay), ("nginx", &resume_nginx)] {
            let before = origin.origin_sent();
            let chain: Box<dyn Chain> = if system == "patchrelay" {
                Box::new(relay_chain(dir.path(), 3, &origin))
            } else {
                Box::new(nginx_chain(&binary, dir.path(), 3, &origin))
            };
            let (took, ok) = runtime.block_on(bounded(resume(chain.as_ref(), id, 64 << 20, 32)));
            resumed.push(Figures {
                main: took.as_secs_f64(),
                p50: Duration::ZERO,
                p99: Duration::ZERO,
                origin_bytes: origin.origin_sent() - before,
                peaks: chain.peaks(),
                note: format!("every client's bytes verified: {ok}"),
            });
        }
        row(
            &mut notes,
            "resume, 32 clients, cold 64 MiB, 3 tiers",
            "s to all",
            false,
            &resumed[0],
            &resumed[1],
        );
    }
    drop(origin);
    println!();
    for note in notes {
        println!("{note}");
    }
}
