//! The monitor with real relays on loopback and simulated agents: beacons, reports,
//! health checks, deployments, failure attribution, restarts and the CLI.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use patchrelay::bundle::BundleId;
use patchrelay::config::Config;
use patchrelay::monitor::{Monitor, MonitorConfig};
use patchrelay::relay::Relay;
use serde_json::{json, Value};
use support::*;

const KEY: [u8; 32] = [9u8; 32];
const TOKEN: &str = "monitor-admin-token-0123456789";

/// Writes the beacon key and admin token into `dir`.
fn write_secrets(dir: &Path) {
    let key = blake3::Hash::from(KEY).to_hex();
    write_secret(&dir.join("beacon.key"), key.as_str());
    write_secret(&dir.join("admin.token"), TOKEN);
}

/// Writes `monitor.toml` into `dir` (listening on `port`, 0 = any) and loads it.
fn monitor_config(dir: &Path, port: u16) -> (PathBuf, MonitorConfig) {
    let text = format!(
        r#"
[monitor]
id = "central"
listen = "127.0.0.1:{port}"
database = "monitor.db"
[beacon]
key_file = "beacon.key"
interval = "200ms"
[checks]
interval = "200ms"
timeout = "1s"
missed_beacons = 4
failed_checks = 3
[admin]
token_file = "admin.token"
"#
    );
    let path = dir.join("monitor.toml");
    std::fs::write(&path, text).unwrap();
    let config = MonitorConfig::load(&path).expect("monitor config is valid");
    (path, config)
}

/// A relay of `site` that sends beacons and reports straight to the monitor.
async fn site_relay(
    dir: &Path,
    id: &str,
    site: &str,
    parents: &[String],
    origin: &str,
    monitor: &str,
) -> Relay {
    let parents: Vec<String> = parents.iter().map(|p| format!("{p:?}")).collect();
    let text = format!(
        r#"
[relay]
id = "{id}"
site = "{site}"
listen = "127.0.0.1:0"
cache_dir = "{id}-cache"
shutdown_grace = "1s"
[upstream]
parents = [{parents}]
origin = "{origin}"
connect_timeout = "1s"
stall_timeout = "1s"
[health]
interval = "300ms"
[monitor]
url = "{monitor}"
[beacon]
interval = "200ms"
key_file = "beacon.key"
"#,
        parents = parents.join(", ")
    );
    let config = Config::parse(&text, "test.toml", dir).expect("relay config is valid");
    Relay::start(&config).await.expect("relay starts")
}

async fn http(method: &str, url: &str, token: Option<&str>, body: Value) -> (u16, Value) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut request = Request::builder().method(method).uri(url);
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let body = if body.is_null() {
        Bytes::new()
    } else {
        Bytes::from(body.to_string())
    };
    let response = client
        .request(request.body(Full::new(body)).unwrap())
        .await
        .expect("server answers");
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

async fn get(url: &str) -> Value {
    let (status, body) = http("GET", url, None, Value::Null).await;
    assert_eq!(status, 200, "GET {url}: {body}");
    body
}

/// One simulated agent: fetch `bundle` through its site relay, check it, report.
async fn agent(relay: &str, agent: &str, deployment: &str, bundle: &BundleId, fail: Option<&str>) {
    let got = TestClient::default().get(&bundle_url(relay, bundle)).await;
    let (outcome, detail) = match (got.status.as_u16(), fail) {
        (200, None) if BundleId::of(got.bytes()) == *bundle => ("installed", String::new()),
        (200, Some(why)) => ("failed", why.to_string()),
        (status, _) => ("failed", format!("download answered {status}")),
    };
    let report = json!([{
        "report_id": format!("{deployment}/{agent}/1"),
        "agent": agent,
        "deployment": deployment,
        "bundle": bundle.to_string(),
        "outcome": outcome,
        "detail": detail,
        "at": Utc::now(),
    }]);
    let (status, body) = http("POST", &format!("{relay}/v1/reports"), None, report).await;
    assert_eq!(status, 202, "{body}");
}

/// Waits up to 20 s until `check` holds for a fresh GET of `url`.
async fn wait_for(url: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let value = get(url).await;
        if check(&value) {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}: {value:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn state_of<'a>(relays: &'a Value, id: &str) -> &'a str {
    relays
        .as_array()
        .and_then(|list| list.iter().find(|r| r["id"] == id))
        .and_then(|r| r["state"].as_str())
        .unwrap_or("")
}

fn verdict<'a>(report: &'a Value, agent: &str) -> &'a Value {
    report["verdicts"]
        .as_array()
        .and_then(|list| list.iter().find(|v| v["agent"] == agent))
        .unwrap_or_else(|| panic!("no verdict for {agent}: {report:#}"))
}

fn run_cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_patchrelay"))
        .args(args)
        .output()
        .expect("the binary runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn monitor_attributes_relay_agent_and_policy_failures_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    write_secrets(dir.path());
    let (config_path, config) = monitor_config(dir.path(), 0);
    let monitor = Monitor::start(config).await.unwrap();
    let port = monitor.addr().port();
    let base = format!("http://{}", monitor.addr());

    let origin = MockUpstream::start(Behavior::Normal).await;
    let data = content(50_000, 61);
    let bundle = origin.add(&data);
    let absent = BundleId::of(b"a bundle nobody published");

    let root = site_relay(
        dir.path(),
        "root",
        "hq",
        &[],
        &origin.origin_template(),
        &base,
    )
    .await;
    let root_url = url_of(&root);
    let parents = [root_url];
    let ra = site_relay(dir.path(), "ra", "a", &parents, "", &base).await;
    let rb = site_relay(dir.path(), "rb", "b", &parents, "", &base).await;
    let ra_url = url_of(&ra);

    // The monitor learns the tree from the beacons and sees every relay up.
    let relays = wait_for(&format!("{base}/v1/relays"), "three relays are up", |r| {
        ["root", "ra", "rb"]
            .iter()
            .all(|id| state_of(r, id) == "up")
    })
    .await;
    let parent_of = |id: &str| {
        relays
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == id)
            .map(|r| r["parent"].clone())
            .unwrap()
    };
    assert_eq!(parent_of("ra"), "root");
    assert_eq!(parent_of("root"), Value::Null);

    // Deployments: one through the CLI, one through the API (a bundle that does not exist).
    let targets_file = dir.path().join("targets.txt");
    let mut targets = String::from("# agent site\n");
    for site in ["a", "b"] {
        for i in 0..5 {
            targets.push_str(&format!("{site}{i} {site}\n"));
        }
    }
    std::fs::write(&targets_file, &targets).unwrap();
    let config_arg = config_path.to_str().unwrap().to_string();
    let bundle_arg = bundle.to_string();
    let targets_arg = targets_file.to_str().unwrap().to_string();
    let url_arg = base.clone();
    let deploy = tokio::task::spawn_blocking(move || {
        run_cli(&[
            "monitor",
            "-c",
            &config_arg,
            "deploy",
            "--url",
            &url_arg,
            "--id",
            "kb-good",
            "--bundle",
            &bundle_arg,
            "--deadline",
            "4s",
            "--targets",
            &targets_arg,
        ])
    })
    .await
    .unwrap();
    assert!(
        deploy.status.success(),
        "{}",
        String::from_utf8_lossy(&deploy.stderr)
    );
    assert!(String::from_utf8_lossy(&deploy.stdout).contains("10 targets"));

    let deadline = Utc::now() + chrono::Duration::seconds(4);
    let list: Vec<Value> = (0..5)
        .flat_map(|i| ["a", "b"].map(|s| json!({"agent": format!("{s}{i}"), "site": s})))
        .collect();
    let new = json!({"id": "kb-absent", "bundle": absent.to_string(), "deadline": deadline,
        "targets": list});
    let url = format!("{base}/v1/deployments");
    let (status, body) = http("POST", &url, None, new.clone()).await;
    assert_eq!(status, 401, "no token: {body}");
    let (status, _) = http("POST", &url, Some("wrong-token-wrong-token"), new.clone()).await;
    assert_eq!(status, 403);
    let (status, body) = http("POST", &url, Some(TOKEN), new.clone()).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = http("POST", &url, Some(TOKEN), new).await;
    assert_eq!(status, 409, "the id is taken: {body}");
    let bad = json!({"id": "x", "bundle": "kb1", "deadline": deadline, "targets": []});
    let (status, body) = http("POST", &url, Some(TOKEN), bad).await;
    assert_eq!(status, 400);
    assert!(
        body["error"].as_str().unwrap().contains("`bundle`"),
        "{body}"
    );

    // Site b's relay dies; site a's agents patch, one of them fails on its own.
    rb.shutdown().await;
    for i in 0..4 {
        agent(&ra_url, &format!("a{i}"), "kb-good", &bundle, None).await;
    }
    agent(
        &ra_url,
        "a4",
        "kb-good",
        &bundle,
        Some("installer exit code 1603"),
    )
    .await;

    wait_for(
        &format!("{base}/v1/deployments/kb-good"),
        "site a's reports arrived",
        |r| r["installed"] == 4 && r["failed"] == 1,
    )
    .await;

    // The monitor restarts mid-run; what agents report meanwhile waits in the relays'
    // spools and arrives after.
    monitor.shutdown().await;
    for i in 0..5 {
        agent(&ra_url, &format!("a{i}"), "kb-absent", &absent, None).await;
    }
    let (_, config) = monitor_config(dir.path(), port);
    let monitor = Monitor::start(config).await.unwrap();

    let good = wait_for(
        &format!("{base}/v1/deployments/kb-good"),
        "the deadline passed and site b's relay is known down",
        |r| r["past_deadline"] == true && r["by_class"]["relay"] == 5,
    )
    .await;
    assert_eq!(
        good["installed"], 4,
        "nothing lost in the restart: {good:#}"
    );
    for i in 0..5 {
        let v = verdict(&good, &format!("b{i}"));
        assert_eq!(v["class"], "relay", "{v:#}");
        assert_eq!(v["rule"], "relay-unhealthy");
        assert_eq!(v["status"], "missing");
        assert_eq!(v["relays"], json!(["rb"]));
    }
    let a4 = verdict(&good, "a4");
    assert_eq!(a4["class"], "agent", "{a4:#}");
    assert!(a4["evidence"].as_str().unwrap().contains("1603"));
    assert_eq!(good["implicated_relays"][0]["relay"], "rb");
    assert!(
        good["time_to"]["p75_seconds"].is_null(),
        "4 of 10 installed"
    );

    let absent_report = wait_for(
        &format!("{base}/v1/deployments/kb-absent"),
        "every target of the absent bundle is judged",
        |r| r["past_deadline"] == true && r["by_class"]["policy"] == 10,
    )
    .await;
    assert_eq!(absent_report["bundle_state"], "missing");
    assert_eq!(
        absent_report["failed"], 5,
        "site a's reports arrived after the restart"
    );
    for v in absent_report["verdicts"].as_array().unwrap() {
        assert_eq!(v["rule"], "bundle-missing", "{v:#}");
    }

    // The state history says when rb went down, and survives the restart.
    let rb_view = get(&format!("{base}/v1/relays/rb")).await;
    let history = rb_view["history"].as_array().unwrap();
    // (A relay starting may be unready until its first parent probe; then up.)
    assert!(history.iter().any(|c| c["state"] == "up"), "{rb_view:#}");
    assert_eq!(history.last().unwrap()["state"], "down", "{rb_view:#}");
    let (status, body) = http("GET", &format!("{base}/v1/relays/nope"), None, Value::Null).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (404, Some("no relay \"nope\""))
    );

    // The CLI's table says the same.
    let config_arg = config_path.to_str().unwrap().to_string();
    let url_arg = base.clone();
    let report = tokio::task::spawn_blocking(move || {
        run_cli(&[
            "monitor",
            "-c",
            &config_arg,
            "report",
            "kb-good",
            "--url",
            &url_arg,
        ])
    })
    .await
    .unwrap();
    let table = String::from_utf8_lossy(&report.stdout);
    assert!(
        report.status.success(),
        "{}",
        String::from_utf8_lossy(&report.stderr)
    );
    assert!(table.contains("installed 4/10 (40.0%)"), "{table}");
    let site_b = table
        .lines()
        .find(|l| l.starts_with("b "))
        .expect("a row for site b");
    let cells: Vec<&str> = site_b.split_whitespace().collect();
    assert_eq!(&cells[..7], ["b", "5", "0", "0", "5", "0", "5"], "{table}");
    assert!(table.contains("relay-unhealthy"), "{table}");
    assert!(table.contains("agent-only"), "{table}");

    // And the page shows the tree and both deployments.
    let client = TestClient::default();
    let page = client.get(&format!("{base}/")).await;
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    let html = String::from_utf8_lossy(page.bytes()).to_string();
    assert!(
        html.contains("data-relay=\"rb\" data-state=\"down\""),
        "{html}"
    );
    assert!(html.contains("data-deployment=\"kb-good\""));
    assert!(html.contains("4 of 10 installed"));
    assert!(html.contains("<svg class=\"curve\""));

    monitor.shutdown().await;
    ra.shutdown().await;
    root.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beacons_and_reports_are_checked_like_a_relay_parent_does() {
    let dir = tempfile::tempdir().unwrap();
    write_secrets(dir.path());
    let (_, config) = monitor_config(dir.path(), 0);
    let monitor = Monitor::start(config).await.unwrap();
    let base = format!("http://{}", monitor.addr());

    let beacon = |seq: u64, sent_at: chrono::DateTime<Utc>| {
        json!({
            "relay": "edge-1", "site": "paris", "url": "http://127.0.0.1:9", "version": "0.1.0",
            "seq": seq, "sent_at": sent_at, "uptime_seconds": 5, "parents": [],
            "parent_in_use": null, "cache_bytes": 0, "cache_bundles": 0, "upstream": [],
            "ready": true, "failed": [], "degraded": [],
            "since_last": {"requests": {}, "bytes_out": 0, "agents": 0, "downloads": {},
                "integrity_failures": 0}
        })
        .to_string()
    };
    let post = |body: String, signature: Option<String>, relay: bool| {
        let base = base.clone();
        async move {
            let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
            let mut request = Request::post(format!("{base}/v1/beacons"));
            if let Some(sig) = signature {
                request = request.header("x-patchrelay-signature", sig);
            }
            if relay {
                request = request.header("x-patchrelay-relay", "edge-1");
            }
            let response = client
                .request(request.body(Full::new(Bytes::from(body))).unwrap())
                .await
                .unwrap();
            response.status().as_u16()
        }
    };
    let sign = |body: &str| Some(patchrelay::reports::sign(&KEY, body.as_bytes()));

    let first = beacon(5, Utc::now());
    assert_eq!(post(first.clone(), None, true).await, 401);
    assert_eq!(post(first.clone(), Some("00".repeat(32)), true).await, 403);
    assert_eq!(post(first.clone(), sign(&first), true).await, 202);
    assert_eq!(
        post(first.clone(), sign(&first), true).await,
        409,
        "replayed"
    );
    let ahead = beacon(6, Utc::now() + chrono::Duration::hours(1));
    assert_eq!(
        post(ahead.clone(), sign(&ahead), true).await,
        400,
        "clock skew"
    );
    // An hour late but newer than the last sequence: it waited in the tree while the
    // monitor was away, and is taken (the monitor's sequences are durable, so it is not a
    // replay).
    let late = beacon(6, Utc::now() - chrono::Duration::hours(1));
    assert_eq!(post(late.clone(), sign(&late), true).await, 202, "late");

    // The last sequence survives a restart: a replay is still refused.
    let port = monitor.addr().port();
    monitor.shutdown().await;
    let (_, config) = monitor_config(dir.path(), port);
    let monitor = Monitor::start(config).await.unwrap();
    assert_eq!(post(first.clone(), sign(&first), true).await, 409);
    let next = beacon(7, Utc::now());
    assert_eq!(post(next.clone(), sign(&next), true).await, 202);

    // Reports: with a key, the monitor takes only signed batches (agents report to their
    // relay); ids dedupe.
    let report = json!([{
        "report_id": "r-1", "agent": "pc-1", "deployment": "d", "bundle":
        BundleId::of(b"x").to_string(), "outcome": "installed", "at": Utc::now()
    }]);
    let url = format!("{base}/v1/reports");
    let (status, body) = http("POST", &url, None, report.clone()).await;
    assert_eq!(status, 401, "unsigned: {body}");
    let signed = |body: &Value| {
        let body = body.to_string();
        let url = url.clone();
        async move {
            let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
            let request = Request::post(url)
                .header("x-patchrelay-relay", "edge-1")
                .header(
                    "x-patchrelay-signature",
                    patchrelay::reports::sign(&KEY, body.as_bytes()),
                )
                .body(Full::new(Bytes::from(body)))
                .unwrap();
            let response = client.request(request).await.unwrap();
            let status = response.status().as_u16();
            let bytes = response.into_body().collect().await.unwrap().to_bytes();
            (
                status,
                serde_json::from_slice::<Value>(&bytes).unwrap_or(Value::Null),
            )
        }
    };
    let (status, body) = signed(&report).await;
    assert_eq!(
        (status, body["accepted"].as_u64()),
        (202, Some(1)),
        "{body}"
    );
    let (status, body) = signed(&report).await;
    assert_eq!(
        (status, body["accepted"].as_u64()),
        (202, Some(0)),
        "seen before"
    );
    let (status, body) = signed(&json!([{"report_id": "r-2"}])).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("missing field"),
        "{body}"
    );
    let (status, _) = http("GET", &url, None, Value::Null).await;
    assert_eq!(status, 405);

    // A relay on a newer version makes the older one stand out: it must be updated.
    let mut newer: Value = serde_json::from_str(&beacon(1, Utc::now())).unwrap();
    newer["relay"] = "edge-2".into();
    newer["version"] = "0.10.0".into();
    let newer = newer.to_string();
    assert_eq!(post(newer.clone(), sign(&newer), true).await, 202);
    let relays = get(&format!("{base}/v1/relays")).await;
    assert_eq!(relays[0]["id"], "edge-1");
    assert_eq!(relays[0]["site"], "paris");
    assert_eq!(relays[0]["outdated"], true, "0.1.0 < 0.10.0");
    assert_eq!(relays[1]["outdated"], false);
    let page = TestClient::default().get(&format!("{base}/")).await;
    let html = String::from_utf8_lossy(page.bytes()).to_string();
    assert!(
        html.contains("v0.1.0 <span class=\"badge b-old\">outdated</span>"),
        "{html}"
    );
    monitor.shutdown().await;
}

/// Where Debian's chromium is (`CHROMIUM` overrides).
fn chromium() -> PathBuf {
    let path =
        std::env::var_os("CHROMIUM").map_or_else(|| "/usr/bin/chromium".into(), PathBuf::from);
    assert!(
        path.exists(),
        "{} not found: install Debian's chromium (.ci/run does) or set CHROMIUM",
        path.display()
    );
    path
}

/// Runs headless chromium on `url` with `args`; returns its stdout.
fn headless(url: &str, profile: &Path, args: &[String]) -> String {
    let output = std::process::Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1280,1400",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .output()
        .expect("chromium runs");
    assert!(
        output.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Needs Debian's chromium, which `.ci/run` installs; run with `--ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs chromium (installed by .ci/run)"]
async fn dashboard_renders_the_tree_and_progress_in_headless_chromium() {
    let dir = tempfile::tempdir().unwrap();
    write_secrets(dir.path());
    let (_, config) = monitor_config(dir.path(), 0);
    let monitor = Monitor::start(config).await.unwrap();
    let base = format!("http://{}", monitor.addr());
    let origin = MockUpstream::start(Behavior::Normal).await;
    let bundle = origin.add(&content(30_000, 62));
    let root = site_relay(
        dir.path(),
        "root",
        "hq",
        &[],
        &origin.origin_template(),
        &base,
    )
    .await;
    let branch = site_relay(dir.path(), "branch-7", "lyon", &[url_of(&root)], "", &base).await;

    let targets: Vec<Value> = (0..4)
        .map(|i| json!({"agent": format!("pc-{i}"), "site": "lyon"}))
        .collect();
    let deadline = Utc::now() + chrono::Duration::hours(2);
    let new = json!({"id": "kb-dash", "bundle": bundle.to_string(), "deadline": deadline,
        "targets": targets});
    let (status, body) = http("POST", &format!("{base}/v1/deployments"), Some(TOKEN), new).await;
    assert_eq!(status, 201, "{body}");
    for i in 0..2 {
        agent(
            &url_of(&branch),
            &format!("pc-{i}"),
            "kb-dash",
            &bundle,
            None,
        )
        .await;
    }
    wait_for(&format!("{base}/v1/relays"), "both relays are up", |r| {
        state_of(r, "root") == "up" && state_of(r, "branch-7") == "up"
    })
    .await;
    wait_for(
        &format!("{base}/v1/deployments/kb-dash"),
        "two installed",
        |r| r["installed"] == 2,
    )
    .await;

    let profile = dir.path().join("chromium-profile");
    let shot = dir.path().join("dashboard.png");
    let (url, profile2, shot2) = (format!("{base}/"), profile.clone(), shot.clone());
    let dom = tokio::task::spawn_blocking(move || {
        let dom = headless(&url, &profile2, &["--dump-dom".to_string()]);
        headless(
            &url,
            &profile2,
            &[format!("--screenshot={}", shot2.display())],
        );
        dom
    })
    .await
    .unwrap();

    // The tree: branch-7 nested under root, both green.
    let root_at = dom.find("data-relay=\"root\" data-state=\"up\"");
    let branch_at = dom.find("data-relay=\"branch-7\" data-state=\"up\"");
    assert!(root_at.is_some() && branch_at > root_at, "{dom}");
    assert!(dom.contains("site lyon"), "{dom}");
    // The deployment's progress bar, counts and curve.
    assert!(dom.contains("data-deployment=\"kb-dash\""), "{dom}");
    assert!(dom.contains("2 of 4 installed (50.0%)"), "{dom}");
    assert!(dom.contains("<polyline"), "{dom}");
    let png = std::fs::read(&shot).expect("chromium wrote a screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "a real page was drawn"
    );
    if let Some(keep) = std::env::var_os("KEEP_SCREENSHOT") {
        std::fs::copy(&shot, keep).unwrap();
    }

    monitor.shutdown().await;
    branch.shutdown().await;
    root.shutdown().await;
}
