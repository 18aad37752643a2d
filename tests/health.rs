//! /healthz and /readyz.

mod support;

use std::time::Duration;

use patchrelay::relay::Relay;
use support::*;

async fn get_json(relay: &Relay, path: &str) -> (u16, serde_json::Value) {
    let got = TestClient::default()
        .get(&format!("{}{path}", url_of(relay)))
        .await;
    (got.status.as_u16(), got.json())
}

/// Polls /readyz until it answers `status` (up to 10 s).
async fn readyz_becomes(relay: &Relay, status: u16) -> serde_json::Value {
    within(10, async {
        loop {
            let (got, json) = get_json(relay, "/readyz").await;
            if got == status {
                return json;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

#[tokio::test]
async fn healthz_says_live_with_the_relay_id() {
    let dir = tempfile::tempdir().unwrap();
    let relay = start_relay("edge", dir.path(), &[], None).await;
    let (status, json) = get_json(&relay, "/healthz").await;
    assert_eq!(status, 200);
    assert_eq!(json["live"], true);
    assert_eq!(json["relay"], "edge");
    assert_eq!(json["version"], env!("CARGO_PKG_VERSION"));
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_the_parent_going_away_and_coming_back() {
    let dir = tempfile::tempdir().unwrap();
    let parent = start_relay("parent", dir.path(), &[], None).await;
    let parent_addr = parent.local_addr();
    let config = relay_config_with(
        "leaf",
        dir.path(),
        &[url_of(&parent)],
        None,
        "[health]\ninterval = \"100ms\"\n",
    );
    let leaf = Relay::start(&config).await.unwrap();

    let ready = readyz_becomes(&leaf, 200).await;
    assert_eq!(ready["ready"], true);
    assert_eq!(ready["failed"], serde_json::json!([]));
    assert_eq!(ready["upstream"][0]["consecutive_failures"], 0);

    parent.shutdown().await;
    let unready = readyz_becomes(&leaf, 503).await;
    assert_eq!(unready["ready"], false);
    let failed = unready["failed"][0].as_str().unwrap();
    assert!(
        failed.starts_with("upstream: no parent or origin answered"),
        "{failed}"
    );
    assert!(
        unready["upstream"][0]["consecutive_failures"]
            .as_u64()
            .unwrap()
            > 0
    );

    // The parent comes back on the same address.
    let mut again = relay_config("parent", dir.path(), &[], None);
    again.relay.listen = parent_addr;
    let parent = Relay::start(&again).await.unwrap();
    readyz_becomes(&leaf, 200).await;
    leaf.shutdown().await;
    parent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_whose_origin_fails_stays_ready_but_says_its_upstream_is_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let origin = MockUpstream::start(Behavior::Unavailable).await;
    let config = relay_config_with(
        "root",
        dir.path(),
        &[],
        Some(&origin.origin_template()),
        "[health]\ninterval = \"10s\"\n",
    );
    let root = Relay::start(&config).await.unwrap();
    let (status, json) = get_json(&root, "/readyz").await;
    assert_eq!((status, json["site"].as_str()), (200, Some("test")));
    assert_eq!(json["degraded"], serde_json::json!([]));

    // A fetch the origin refuses (503): the root passes the refusal on with a Retry-After and
    // still serves its cache, so it stays ready, but it says that nothing new can come down
    // the tree.
    let missing = origin.add(&content(1000, 5));
    let got = TestClient::default()
        .get(&bundle_url(&url_of(&root), &missing))
        .await;
    assert_eq!(got.status, 503);
    assert_eq!(got.header("retry-after"), Some("10"));
    let (status, json) = get_json(&root, "/readyz").await;
    assert_eq!(status, 200);
    let degraded = json["degraded"][0].as_str().unwrap_or_default();
    assert!(
        degraded.starts_with(patchrelay::health::UPSTREAM_UNREACHABLE),
        "{json}"
    );
    root.shutdown().await;
}

#[tokio::test]
async fn readyz_fails_when_the_cache_dir_takes_no_writes() {
    let dir = tempfile::tempdir().unwrap();
    let relay = start_relay("edge", dir.path(), &[], None).await;
    assert_eq!(
        get_json(&relay, "/readyz").await.0,
        200,
        "a root needs no upstream"
    );

    let tmp = dir.path().join("edge-cache/tmp");
    std::fs::remove_dir(&tmp).unwrap();
    std::fs::write(&tmp, b"not a directory").unwrap();
    let (status, json) = get_json(&relay, "/readyz").await;
    assert_eq!(status, 503);
    assert_eq!(json["failed"][0], "cache_dir: not writable");
    assert!(json["degraded"][0]
        .as_str()
        .unwrap()
        .contains("pass-through"));
    assert!(relay.degraded());
    relay.shutdown().await;
}

/// The samples of an OpenMetrics text page, checking its shape: `# HELP`/`# TYPE` lines,
/// `name{labels} value` samples with numeric values, and `# EOF` last.
fn parse_metrics(text: &str) -> Vec<(String, f64)> {
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "the page must end with # EOF");
    let mut samples = Vec::new();
    for line in &lines[..lines.len() - 1] {
        if line.starts_with("# HELP ") || line.starts_with("# TYPE ") {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(name.starts_with("patchrelay_"), "{line:?}");
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "{line:?}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "{line:?}");
        }
        samples.push((series.to_string(), value));
    }
    samples
}

fn sample(samples: &[(String, f64)], series: &str) -> f64 {
    samples
        .iter()
        .find(|(s, _)| s == series)
        .unwrap_or_else(|| panic!("no sample {series}"))
        .1
}

#[tokio::test]
async fn metrics_parse_and_count_what_happens() {
    let dir = tempfile::tempdir().unwrap();
    let origin = MockUpstream::start(Behavior::Normal).await;
    let data = content(10_000, 100);
    let id = origin.add(&data);
    let relay = start_relay("edge", dir.path(), &[], Some(&origin.origin_template())).await;
    let client = TestClient::default();
    let metrics = || async {
        let got = TestClient::default()
            .get(&format!("{}/metrics", url_of(&relay)))
            .await;
        assert_eq!(got.status, 200);
        assert!(got
            .header("content-type")
            .unwrap()
            .starts_with("application/openmetrics-text"));
        parse_metrics(std::str::from_utf8(got.bytes()).unwrap())
    };

    let before = metrics().await;
    assert_eq!(
        sample(&before, r#"patchrelay_cache_requests_total{result="hit"}"#),
        0.0
    );
    let build = format!(
        r#"patchrelay_build_info{{version="{}",relay="edge"}}"#,
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(sample(&before, &build), 1.0);

    client.get(&bundle_url(&url_of(&relay), &id)).await;
    eventually("the fill has ended", || relay.running_fills() == 0).await;
    client.get(&bundle_url(&url_of(&relay), &id)).await;
    client
        .get(&format!("{}/v1/bundles/nope", url_of(&relay)))
        .await;

    let after = metrics().await;
    assert_eq!(
        sample(&after, r#"patchrelay_cache_requests_total{result="miss"}"#),
        1.0
    );
    assert_eq!(
        sample(&after, r#"patchrelay_cache_requests_total{result="hit"}"#),
        1.0
    );
    assert_eq!(sample(&after, "patchrelay_fills_completed_total"), 1.0);
    assert_eq!(
        sample(&after, r#"patchrelay_bytes_total{direction="received"}"#),
        10_000.0
    );
    assert_eq!(
        sample(&after, r#"patchrelay_bytes_total{direction="sent"}"#),
        20_000.0
    );
    assert_eq!(
        sample(&after, r#"patchrelay_requests_total{status="400"}"#),
        1.0
    );
    assert!(sample(&after, r#"patchrelay_requests_total{status="200"}"#) >= 3.0);
    assert_eq!(sample(&after, "patchrelay_cache_bytes"), 10_000.0);
    assert_eq!(sample(&after, "patchrelay_cache_bundles"), 1.0);
    assert_eq!(sample(&after, "patchrelay_reports_refused_total"), 0.0);
    relay.shutdown().await;
}
