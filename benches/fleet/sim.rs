//! A fleet on one machine: an origin, a tree of real relays (root, regional, branch) in
//! this process on loopback, the monitor, and thousands of simulated agents (async tasks)
//! that download bundles through their branch relay and report the outcome. Faults with a
//! known ground truth are injected, and the monitor's attribution is scored against it.
//!
//! Shared by `cargo bench --bench fleet` (the full run) and `tests/fleet.rs` (a small run
//! with assertions).

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::Utc;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use patchrelay::bundle::BundleId;
use patchrelay::config::Config;
use patchrelay::monitor::{Monitor, MonitorConfig};
use patchrelay::relay::Relay;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

/// The shape of a run.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    pub regions: usize,
    pub branches: usize,
    pub agents: usize,
    /// Good bundles (one deployment each); one more deployment names a bundle that does
    /// not exist.
    pub bundles: usize,
    pub bundle_size: usize,
    /// From the deployments' creation to their deadline; agents start within the first
    /// 60% of it.
    pub window: Duration,
    /// Share of (agent, deployment) pairs whose install fails on the device.
    pub agent_failure_share: f64,
    /// Inject relay faults: a stopped branch, a regional cut off from the root, a branch
    /// whose parent link corrupts bytes.
    pub relay_faults: bool,
    pub seed: u64,
}

impl FleetConfig {
    /// 1 root, 10 regional and 100 branch relays, 10,000 agents.
    pub fn full() -> Self {
        Self {
            regions: 10,
            branches: 100,
            agents: 10_000,
            bundles: 3,
            bundle_size: 256 * 1024,
            window: Duration::from_secs(40),
            agent_failure_share: 0.02,
            relay_faults: true,
            seed: 7,
        }
    }

    /// 1 root, 3 regional and 9 branch relays, 500 agents: the test suite's run.
    pub fn small() -> Self {
        Self {
            regions: 3,
            branches: 9,
            agents: 500,
            bundles: 2,
            bundle_size: 64 * 1024,
            window: Duration::from_secs(10),
            agent_failure_share: 0.03,
            relay_faults: true,
            seed: 11,
        }
    }
}

/// A small deterministic random source (splitmix64): runs repeat for a seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// What the origin holds and how many body bytes it sent.
struct Origin {
    bundles: HashMap<String, Bytes>,
    sent: AtomicU64,
}

/// Serves `handler` on a loopback port until the returned task is aborted, which also
/// drops every connection (a cut link).
async fn serve<F, Fut>(handler: F) -> (SocketAddr, tokio::task::JoinHandle<()>)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let task = tokio::spawn(async move {
        // Dropped with the task when it is aborted: every connection ends at once.
        let mut connections = JoinSet::new();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let handler = handler.clone();
            let service = hyper::service::service_fn(move |req| {
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(handler(req).await) }
            });
            connections.spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
            while connections.try_join_next().is_some() {}
        }
    });
    (addr, task)
}

fn respond(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response
}

async fn start_origin(origin: Arc<Origin>) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let (addr, task) = serve(move |req: Request<Incoming>| {
        let origin = origin.clone();
        async move {
            let id = req.uri().path().trim_start_matches("/bundles/").to_string();
            let Some(body) = origin.bundles.get(&id) else {
                return respond(StatusCode::NOT_FOUND, Bytes::new());
            };
            let start = req
                .headers()
                .get("range")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("bytes="))
                .and_then(|v| v.strip_suffix('-'))
                .and_then(|v| v.parse::<usize>().ok());
            let (status, part) = match start {
                Some(start) if start < body.len() => {
                    (StatusCode::PARTIAL_CONTENT, body.slice(start..))
                }
                _ => (StatusCode::OK, body.clone()),
            };
            origin.sent.fetch_add(part.len() as u64, Ordering::Relaxed);
            let mut response = respond(status, part.clone());
            if status == StatusCode::PARTIAL_CONTENT {
                let range = format!(
                    "bytes {}-{}/{}",
                    body.len() - part.len(),
                    body.len() - 1,
                    body.len()
                );
                response
                    .headers_mut()
                    .insert("content-range", range.parse().expect("valid header"));
            }
            response
        }
    })
    .await;
    (addr, task)
}

/// An HTTP proxy in front of a relay: passes requests on, or flips a byte of every body
/// (`corrupt`); aborting its task cuts the link (every connection drops, new ones are
/// refused), as a dead WAN link would.
struct Proxy {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

async fn start_proxy(target: SocketAddr, corrupt: bool) -> Proxy {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let (addr, task) = serve(move |req: Request<Incoming>| {
        let client = client.clone();
        async move {
            let mut forward = Request::builder()
                .method(req.method())
                .uri(format!("http://{target}{}", req.uri()));
            for (name, value) in req.headers() {
                if name != "host" {
                    forward = forward.header(name, value);
                }
            }
            let Ok(request) = forward.body(Empty::new()) else {
                return respond(StatusCode::BAD_GATEWAY, Bytes::new());
            };
            let Ok(response) = client.request(request).await else {
                return respond(StatusCode::BAD_GATEWAY, Bytes::new());
            };
            let (parts, body) = response.into_parts();
            let Ok(body) = body.collect().await else {
                return respond(StatusCode::BAD_GATEWAY, Bytes::new());
            };
            let mut body = body.to_bytes().to_vec();
            if corrupt && req_is_bundle(&parts) && !body.is_empty() {
                body[0] ^= 0xff;
            }
            let mut response = Response::from_parts(parts, Full::new(Bytes::from(body)));
            response.headers_mut().remove("transfer-encoding");
            response
        }
    })
    .await;
    Proxy { addr, task }
}

fn req_is_bundle(parts: &http::response::Parts) -> bool {
    parts
        .headers
        .get("content-type")
        .is_some_and(|v| v == "application/octet-stream")
}

/// When the monitor's installed curve (points `[seconds, share of all targets]`) first
/// reached `share` of `installable` targets.
fn time_to_share(curve: &Value, targets: u64, installable: u64, share: f64) -> Option<f64> {
    if installable == 0 {
        return None;
    }
    let needed = (share * installable as f64).ceil();
    curve.as_array()?.iter().find_map(|point| {
        let (at, installed_share) = (point[0].as_f64()?, point[1].as_f64()?);
        (installed_share * targets as f64 + 0.5 >= needed).then_some(at)
    })
}

/// Ground truth and the monitor's verdict use these names.
pub const CLASSES: [&str; 4] = ["relay", "agent", "policy", "unknown"];

/// One deployment as the monitor reported it.
#[derive(Debug, Default)]
pub struct DeploymentLine {
    pub id: String,
    pub targets: u64,
    pub installed: u64,
    pub failed: u64,
    pub missing: u64,
    pub t75: Option<f64>,
    pub t90: Option<f64>,
    pub t100: Option<f64>,
    /// Targets that could install: no injected fault on their path, no agent failure.
    pub installable: u64,
    /// Time to 75%, 90% and 100% of `installable`, from the monitor's installed curve:
    /// how fast the fleet patches where nothing was broken on purpose.
    pub of_installable: [Option<f64>; 3],
}

/// What a run measured.
#[derive(Debug, Default)]
pub struct FleetResult {
    pub config_line: String,
    pub bundle_size: u64,
    pub good_bundles: usize,
    pub origin_bytes: u64,
    /// Per tier: (name, relays, healthy relays serving agents, bytes those pulled, ideal
    /// bytes for them, bytes the faulty relays pulled).
    pub tiers: Vec<(String, usize, usize, u64, u64, u64)>,
    /// Healthy relays that pulled more or less than one copy of each bundle they served.
    pub copy_violations: Vec<String>,
    /// Per deployment, as the monitor reported it.
    pub deployments: Vec<DeploymentLine>,
    /// (truth, monitor's class or "installed"/"pending") -> targets.
    pub confusion: BTreeMap<(String, String), usize>,
    pub truly_failed: usize,
    pub correct: usize,
    pub relay_called_agent: usize,
    pub peak_rss_kib: u64,
    pub cpu_seconds: f64,
    pub elapsed: Duration,
    pub reports_posted: usize,
}

impl FleetResult {
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.truly_failed.max(1) as f64
    }

    /// The run as text tables.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        let _ = writeln!(out, "{}", self.config_line);
        let _ = writeln!(
            out,
            "\nbytes pulled from upstream, by tier (ideal: one copy of each bundle per relay \
             that serves it)"
        );
        let _ = writeln!(
            out,
            "{:<10} {:>7} {:>8} {:>11} {:>10} {:>7} {:>12}",
            "tier", "relays", "healthy", "pulled MiB", "ideal MiB", "ratio", "faulty MiB"
        );
        let _ = writeln!(
            out,
            "{:<10} {:>7} {:>8} {:>11.2} {:>10.2} {:>7.3} {:>12}",
            "origin",
            1,
            1,
            mib(self.origin_bytes),
            mib(self.bundle_size * self.good_bundles as u64),
            self.origin_bytes as f64 / (self.bundle_size * self.good_bundles as u64).max(1) as f64,
            "-"
        );
        for (tier, relays, serving, pulled, ideal, faulty) in &self.tiers {
            let _ = writeln!(
                out,
                "{:<10} {:>7} {:>8} {:>11.2} {:>10.2} {:>7.3} {:>12.2}",
                tier,
                relays,
                serving,
                mib(*pulled),
                mib(*ideal),
                *pulled as f64 / (*ideal).max(1) as f64,
                mib(*faulty)
            );
        }
        let _ = writeln!(
            out,
            "healthy relays off one copy per bundle: {}",
            self.copy_violations.len()
        );

        let secs = |s: &Option<f64>| s.map_or("-".to_string(), |s| format!("{s:.1}s"));
        let _ = writeln!(
            out,
            "\ndeployments (time from creation; \"of installable\": of the targets outside \
             the injected faults)"
        );
        let _ = writeln!(
            out,
            "{:<14} {:>7} {:>9} {:>6} {:>7} {:>8} {:>8} {:>8} {:>11} {:>8} {:>8} {:>8}",
            "deployment",
            "targets",
            "installed",
            "failed",
            "missing",
            "75%",
            "90%",
            "100%",
            "installable",
            "75%",
            "90%",
            "100%"
        );
        for d in &self.deployments {
            let _ = writeln!(
                out,
                "{:<14} {:>7} {:>9} {:>6} {:>7} {:>8} {:>8} {:>8} {:>11} {:>8} {:>8} {:>8}",
                d.id,
                d.targets,
                d.installed,
                d.failed,
                d.missing,
                secs(&d.t75),
                secs(&d.t90),
                secs(&d.t100),
                d.installable,
                secs(&d.of_installable[0]),
                secs(&d.of_installable[1]),
                secs(&d.of_installable[2])
            );
        }

        let _ = writeln!(
            out,
            "\nattribution: ground truth (rows) vs the monitor (columns)"
        );
        let columns = [
            "relay",
            "agent",
            "policy",
            "unknown",
            "installed",
            "pending",
        ];
        let _ = write!(out, "{:<10}", "truth");
        for c in columns {
            let _ = write!(out, " {c:>9}");
        }
        let _ = writeln!(out);
        for truth in ["relay", "agent", "policy", "installed"] {
            let _ = write!(out, "{truth:<10}");
            for c in columns {
                let n = self
                    .confusion
                    .get(&(truth.to_string(), c.to_string()))
                    .copied()
                    .unwrap_or(0);
                let _ = write!(out, " {n:>9}");
            }
            let _ = writeln!(out);
        }
        let _ = writeln!(
            out,
            "accuracy on failed targets: {}/{} = {:.2}%; relay outages called agent fail: {}",
            self.correct,
            self.truly_failed,
            self.accuracy() * 100.0,
            self.relay_called_agent
        );
        let _ = writeln!(
            out,
            "\nprocess: peak RSS {:.0} MiB, CPU {:.1}s, wall {:.1}s, {} report batches posted",
            self.peak_rss_kib as f64 / 1024.0,
            self.cpu_seconds,
            self.elapsed.as_secs_f64(),
            self.reports_posted
        );
        out
    }
}

/// Peak resident memory of this process, KiB.
pub fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// CPU time (user + system) of this process, seconds.
pub fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the command name.
    (ticks(11) + ticks(12)) / 100.0
}

const KEY: [u8; 32] = [0x5a; 32];
const TOKEN: &str = "fleet-simulation-admin-token";

/// Writes a secret readable by its owner only, as relays require.
fn write_secret(path: &Path, contents: &str) {
    use std::os::unix::fs::PermissionsExt;

    std::fs::write(path, contents).expect("write secret");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

/// A relay's config text.
fn relay_toml(
    id: &str,
    site: &str,
    parent: Option<String>,
    origin: Option<String>,
    monitor: SocketAddr,
) -> String {
    format!(
        r#"
[relay]
id = "{id}"
site = "{site}"
listen = "127.0.0.1:0"
cache_dir = "{id}-cache"
shutdown_grace = "1s"
scrub_rate = "off"
[upstream]
parents = [{parents}]
origin = "{origin}"
connect_timeout = "1s"
stall_timeout = "3s"
[prestage]
interval = "1h"
[health]
interval = "1s"
[monitor]
url = "http://{monitor}"
[beacon]
interval = "2s"
key_file = "beacon.key"
# Every simulated agent comes from 127.0.0.1.
[server]
max_connections = 100000
max_connections_per_client = 100000
"#,
        parents = parent.map(|p| format!("\"{p}\"")).unwrap_or_default(),
        origin = origin.unwrap_or_default(),
    )
}

async fn start_relay(dir: &Path, text: &str) -> Relay {
    let config = Config::parse(text, "fleet.toml", dir).expect("fleet relay config");
    Relay::start(&config).await.expect("fleet relay starts")
}

async fn http_json(
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut request = Request::builder().method(method).uri(url);
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let body = body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
    let Ok(request) = request.body(Full::new(body)) else {
        return (0, Value::Null);
    };
    match client.request(request).await {
        Ok(response) => {
            let status = response.status().as_u16();
            let bytes = response
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            (
                status,
                serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            )
        }
        Err(_) => (0, Value::Null),
    }
}

/// Which relay fault (if any) an agent's branch suffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BranchFault {
    None,
    Stopped,
    UnderCutRegional,
    CorruptParent,
}

/// Runs the fleet; `dir` holds caches, keys and the monitor's database.
pub async fn run(config: &FleetConfig, dir: &Path) -> FleetResult {
    let started = Instant::now();
    let cpu_before = cpu_seconds();
    let mut rng = Rng::new(config.seed);
    write_secret(
        &dir.join("beacon.key"),
        blake3::Hash::from(KEY).to_hex().as_str(),
    );
    write_secret(&dir.join("admin.token"), TOKEN);

    // The monitor.
    let monitor_toml = "[monitor]\nid = \"fleet-monitor\"\nlisten = \"127.0.0.1:0\"\n\
        database = \"monitor.db\"\n[beacon]\nkey_file = \"beacon.key\"\ninterval = \"2s\"\n\
        [checks]\ninterval = \"1s\"\ntimeout = \"1s\"\nmissed_beacons = 3\nfailed_checks = 3\n\
        [admin]\ntoken_file = \"admin.token\"\n";
    let monitor_config =
        MonitorConfig::parse(monitor_toml, "monitor.toml", dir).expect("monitor config");
    let monitor = Monitor::start(monitor_config)
        .await
        .expect("monitor starts");
    let monitor_addr = monitor.addr();
    let monitor_url = format!("http://{monitor_addr}");

    // The origin and its bundles.
    let mut bundles = HashMap::new();
    let mut ids = Vec::new();
    for b in 0..config.bundles {
        let mut data = vec![0u8; config.bundle_size];
        let mut xof = blake3::Hasher::new()
            .update(format!("fleet bundle {b} {}", config.seed).as_bytes())
            .finalize_xof();
        xof.fill(&mut data);
        let id = BundleId::of(&data);
        ids.push(id);
        bundles.insert(id.to_string(), Bytes::from(data));
    }
    let absent = BundleId::of(b"a bundle nobody published");
    let origin = Arc::new(Origin {
        bundles,
        sent: AtomicU64::new(0),
    });
    let (origin_addr, _origin_task) = start_origin(origin.clone()).await;

    // The tree.
    let root = start_relay(
        dir,
        &relay_toml(
            "root",
            "hq",
            None,
            Some(format!("http://{origin_addr}/bundles/{{id}}")),
            monitor_addr,
        ),
    )
    .await;
    let root_url = format!("http://{}", root.local_addr());
    let cut_region = config.relay_faults.then_some(config.regions - 1);
    let mut cut_proxy = None;
    let mut regions = Vec::new();
    for r in 0..config.regions {
        let parent = if Some(r) == cut_region {
            let proxy = start_proxy(root.local_addr(), false).await;
            let url = format!("http://{}", proxy.addr);
            cut_proxy = Some(proxy);
            url
        } else {
            root_url.clone()
        };
        let id = format!("region-{r:02}");
        let text = relay_toml(&id, &id, Some(parent), None, monitor_addr);
        regions.push(start_relay(dir, &text).await);
    }
    // Faulty branches: the first is stopped, the second's link corrupts bytes (both under
    // healthy regions); the cut region's branches all fail.
    let stopped_branch = config.relay_faults.then_some(0);
    let corrupt_branch = config.relay_faults.then_some(1);
    let mut corrupt_proxy = None;
    let mut branches = Vec::new();
    let mut faults = Vec::new();
    for b in 0..config.branches {
        let region = b % config.regions;
        let region_addr = regions[region].local_addr();
        let parent = if Some(b) == corrupt_branch {
            let proxy = start_proxy(region_addr, true).await;
            let url = format!("http://{}", proxy.addr);
            corrupt_proxy = Some(proxy);
            url
        } else {
            format!("http://{region_addr}")
        };
        let id = format!("branch-{b:03}");
        let text = relay_toml(&id, &id, Some(parent), None, monitor_addr);
        branches.push(Some(start_relay(dir, &text).await));
        faults.push(if Some(b) == stopped_branch {
            BranchFault::Stopped
        } else if Some(region) == cut_region {
            BranchFault::UnderCutRegional
        } else if Some(b) == corrupt_branch {
            BranchFault::CorruptParent
        } else {
            BranchFault::None
        });
    }
    let branch_urls: Vec<String> = branches
        .iter()
        .map(|b| {
            format!(
                "http://{}",
                b.as_ref().map(|b| b.local_addr()).expect("running")
            )
        })
        .collect();

    // Wait until the monitor knows every relay, then break what is to be broken.
    let relay_count = 1 + config.regions + config.branches;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, relays) = http_json("GET", &format!("{monitor_url}/v1/relays"), None, None).await;
        let up = relays
            .as_array()
            .map_or(0, |r| r.iter().filter(|r| r["state"] == "up").count());
        if up >= relay_count || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    if let Some(b) = stopped_branch {
        if let Some(relay) = branches[b].take() {
            relay.shutdown().await;
        }
    }
    if let Some(proxy) = &cut_proxy {
        proxy.task.abort();
    }

    // Deployments: every agent gets every bundle, plus one bundle that does not exist.
    let created = Utc::now();
    let deadline_at = created + chrono::Duration::from_std(config.window).expect("window");
    let mut deployments: Vec<(String, BundleId)> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (format!("kb-{i}"), *id))
        .collect();
    deployments.push(("kb-absent".to_string(), absent));
    let agent_name = |i: usize| format!("agent-{i:05}");
    let branch_of = |i: usize| i % config.branches;
    let targets: Vec<Value> = (0..config.agents)
        .map(|i| json!({"agent": agent_name(i), "site": format!("branch-{:03}", branch_of(i))}))
        .collect();
    for (id, bundle) in &deployments {
        let body = json!({"id": id, "bundle": bundle.to_string(), "deadline": deadline_at,
            "targets": targets});
        let (status, answer) = http_json(
            "POST",
            &format!("{monitor_url}/v1/deployments"),
            Some(TOKEN),
            Some(body),
        )
        .await;
        assert_eq!(status, 201, "deployment {id}: {answer}");
    }

    // Agents, with the ground truth of each (deployment, agent).
    let mut truth: HashMap<(String, String), &'static str> = HashMap::new();
    let posted = Arc::new(AtomicUsize::new(0));
    let client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(64)
        .build_http::<Empty<Bytes>>();
    let post_client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut agents = JoinSet::new();
    let spread = config.window.mul_f64(0.6);
    for i in 0..config.agents {
        let branch = branch_of(i);
        let fault = faults[branch];
        let delay = spread.mul_f64(rng.unit());
        let fails: Vec<bool> = deployments
            .iter()
            .map(|_| rng.unit() < config.agent_failure_share)
            .collect();
        for (d, (id, _)) in deployments.iter().enumerate() {
            let class = if id == "kb-absent" {
                "policy"
            } else if fault != BranchFault::None {
                "relay"
            } else if fails[d] {
                "agent"
            } else {
                "installed"
            };
            truth.insert((id.clone(), agent_name(i)), class);
        }
        let (client, post_client, posted) = (client.clone(), post_client.clone(), posted.clone());
        let url = branch_urls[branch].clone();
        let deployments = deployments.clone();
        let name = agent_name(i);
        agents.spawn(async move {
            tokio::time::sleep(delay).await;
            let mut reports = Vec::new();
            for (d, (deployment, bundle)) in deployments.iter().enumerate() {
                let outcome =
                    download(&client, &format!("{url}/v1/bundles/{bundle}"), bundle).await;
                let (outcome, detail) = match outcome {
                    Err(Unreachable) => return,
                    Ok(None) if fails[d] => ("failed", "installer exit code 1603".to_string()),
                    Ok(None) => ("installed", String::new()),
                    Ok(Some(why)) => ("failed", why),
                };
                reports.push(json!({
                    "report_id": format!("{deployment}/{name}"),
                    "agent": name, "deployment": deployment, "bundle": bundle.to_string(),
                    "outcome": outcome, "detail": detail, "at": Utc::now(),
                }));
            }
            let body = Bytes::from(Value::Array(reports).to_string());
            let request = Request::post(format!("{url}/v1/reports"))
                .header("content-type", "application/json")
                .body(Full::new(body));
            if let Ok(request) = request {
                if let Ok(response) = post_client.request(request).await {
                    if response.status() == StatusCode::ACCEPTED {
                        posted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
    }
    while agents.join_next().await.is_some() {}
    let reports_posted = posted.load(Ordering::Relaxed);

    // Past the deadline, and once every posted report reached the monitor (or a minute
    // more), read the verdicts.
    let until_deadline = (deadline_at - Utc::now()).to_std().unwrap_or_default();
    tokio::time::sleep(until_deadline + Duration::from_secs(1)).await;
    let expected = reports_posted * deployments.len();
    let wait_until = Instant::now() + Duration::from_secs(60);
    let mut reports = Vec::new();
    loop {
        reports.clear();
        let mut received = 0;
        for (id, _) in &deployments {
            let (_, report) = http_json(
                "GET",
                &format!("{monitor_url}/v1/deployments/{id}"),
                None,
                None,
            )
            .await;
            received += (report["installed"].as_u64().unwrap_or(0)
                + report["failed"].as_u64().unwrap_or(0)) as usize;
            reports.push(report);
        }
        if received >= expected || Instant::now() > wait_until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Outages are judged from what the monitor detected: give the last detection (three
    // missed beacons) time to land, then read once more.
    tokio::time::sleep(Duration::from_secs(2)).await;
    reports.clear();
    for (id, _) in &deployments {
        let (_, report) = http_json(
            "GET",
            &format!("{monitor_url}/v1/deployments/{id}"),
            None,
            None,
        )
        .await;
        reports.push(report);
    }

    // Score.
    let mut result = FleetResult {
        config_line: format!(
            "fleet: 1 root, {} regional, {} branch relays; {} agents; {} bundles of {} KiB + 1 \
             absent; window {}s; agent failure share {:.1}%; relay faults: {}",
            config.regions,
            config.branches,
            config.agents,
            config.bundles,
            config.bundle_size / 1024,
            config.window.as_secs(),
            config.agent_failure_share * 100.0,
            if config.relay_faults {
                "1 branch stopped, 1 regional cut off, 1 branch behind a corrupting link"
            } else {
                "none"
            }
        ),
        bundle_size: config.bundle_size as u64,
        good_bundles: config.bundles,
        origin_bytes: origin.sent.load(Ordering::Relaxed),
        reports_posted,
        ..FleetResult::default()
    };
    let verdicts: HashMap<(String, String), String> = reports
        .iter()
        .flat_map(|r| {
            let id = r["id"].as_str().unwrap_or("").to_string();
            r["verdicts"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(move |v| {
                    (
                        (id.clone(), v["agent"].as_str().unwrap_or("").to_string()),
                        v["class"].as_str().unwrap_or("").to_string(),
                    )
                })
        })
        .collect();
    for ((deployment, agent), truth_class) in &truth {
        let key = (deployment.clone(), agent.clone());
        let predicted = verdicts.get(&key).cloned().unwrap_or_else(|| {
            if *truth_class == "installed" {
                "installed".to_string()
            } else {
                "pending".to_string()
            }
        });
        *result
            .confusion
            .entry((truth_class.to_string(), predicted.clone()))
            .or_insert(0) += 1;
        if *truth_class != "installed" {
            result.truly_failed += 1;
            if predicted == *truth_class {
                result.correct += 1;
            }
            if *truth_class == "relay" && predicted == "agent" {
                result.relay_called_agent += 1;
            }
        }
    }
    for report in &reports {
        let secs = |k: &str| report["time_to"][k].as_f64();
        let id = report["id"].as_str().unwrap_or("").to_string();
        let targets = report["targets"].as_u64().unwrap_or(0);
        let installable = truth
            .iter()
            .filter(|((d, _), class)| *d == id && **class == "installed")
            .count() as u64;
        result.deployments.push(DeploymentLine {
            installable,
            of_installable: [0.75, 0.90, 1.0]
                .map(|share| time_to_share(&report["curve"], targets, installable, share)),
            id,
            targets,
            installed: report["installed"].as_u64().unwrap_or(0),
            failed: report["failed"].as_u64().unwrap_or(0),
            missing: report["missing"].as_u64().unwrap_or(0),
            t75: secs("p75_seconds"),
            t90: secs("p90_seconds"),
            t100: secs("p100_seconds"),
        });
    }

    // One copy per relay: every healthy relay that serves agents pulled each good bundle
    // exactly once.
    let copy = config.bundle_size as u64 * config.bundles as u64;
    let root_pulled = root.stats().upstream_bytes;
    result
        .tiers
        .push(("root".into(), 1, 1, root_pulled, copy, 0));
    if root_pulled != copy {
        result
            .copy_violations
            .push(format!("root pulled {root_pulled}"));
    }
    let mut regional = (0u64, 0usize, 0u64);
    for (r, relay) in regions.iter().enumerate() {
        let pulled = relay.stats().upstream_bytes;
        if Some(r) == cut_region {
            regional.2 += pulled;
        } else {
            regional.0 += pulled;
            regional.1 += 1;
            if pulled != copy {
                result
                    .copy_violations
                    .push(format!("region-{r:02} pulled {pulled}"));
            }
        }
    }
    result.tiers.push((
        "regional".into(),
        config.regions,
        regional.1,
        regional.0,
        copy * regional.1 as u64,
        regional.2,
    ));
    let mut branch = (0u64, 0usize, 0u64);
    for (b, relay) in branches.iter().enumerate() {
        let Some(relay) = relay else { continue };
        let pulled = relay.stats().upstream_bytes;
        if faults[b] != BranchFault::None {
            branch.2 += pulled;
        } else {
            branch.0 += pulled;
            branch.1 += 1;
            if pulled != copy {
                result
                    .copy_violations
                    .push(format!("branch-{b:03} pulled {pulled}"));
            }
        }
    }
    result.tiers.push((
        "branch".into(),
        config.branches,
        branch.1,
        branch.0,
        copy * branch.1 as u64,
        branch.2,
    ));

    result.peak_rss_kib = peak_rss_kib();
    result.cpu_seconds = cpu_seconds() - cpu_before;
    result.elapsed = started.elapsed();

    monitor.shutdown().await;
    for relay in branches.into_iter().flatten() {
        relay.abort();
    }
    for relay in regions {
        relay.abort();
    }
    root.abort();
    if let Some(proxy) = corrupt_proxy {
        proxy.task.abort();
    }
    if let Some(proxy) = cut_proxy {
        proxy.task.abort();
    }
    result
}

/// The branch relay could not be reached at all.
struct Unreachable;

/// Downloads a bundle and checks it: `Ok(None)` when it arrived whole and verified,
/// `Ok(Some(why))` when the relay answered but the agent did not get the bundle.
async fn download(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
    url: &str,
    bundle: &BundleId,
) -> Result<Option<String>, Unreachable> {
    let Ok(request) = Request::get(url).body(Empty::new()) else {
        return Ok(Some("bad request".into()));
    };
    let response =
        match tokio::time::timeout(Duration::from_secs(20), client.request(request)).await {
            Ok(Ok(response)) => response,
            Ok(Err(e)) if e.is_connect() => return Err(Unreachable),
            Ok(Err(e)) => return Ok(Some(format!("download failed: {e}"))),
            Err(_) => return Ok(Some("download timed out".into())),
        };
    let status = response.status();
    if status != StatusCode::OK {
        return Ok(Some(format!("download answered {}", status.as_u16())));
    }
    let mut hasher = blake3::Hasher::new();
    let mut body = response.into_body();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    hasher.update(data);
                }
            }
            Err(e) => return Ok(Some(format!("download cut: {e}"))),
        }
    }
    if bundle.matches(&hasher.finalize()) {
        Ok(None)
    } else {
        Ok(Some("downloaded bundle did not verify".into()))
    }
}
