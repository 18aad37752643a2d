//! Pre-staging: manifests travel down the tree and relays fill what they lack before any
//! agent asks, earliest deadline first.

mod support;

use std::sync::Arc;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use patchrelay::bundle::BundleId;
use patchrelay::cache::Cache;
use patchrelay::limits::ManualClock;
use patchrelay::relay::Relay;
use support::*;

/// Publishes bundles at relay `root` under `dir` and makes them its manifest, each with
/// its deadline.
fn root_manifest(dir: &std::path::Path, bundles: &[(&[u8], Option<chrono::DateTime<Utc>>)]) {
    let mut entries = Vec::new();
    for (data, ready_by) in bundles {
        entries.push((publish(dir, "root", data), *ready_by));
    }
    let cache = Cache::open(&dir.join("root-cache")).unwrap();
    patchrelay::admin::replace_manifest(&cache, &entries).unwrap();
}

async fn relay_below(dir: &std::path::Path, id: &str, parent: &Relay, extra: &str) -> Relay {
    let extra = format!("[prestage]\ninterval = \"100ms\"\n{extra}");
    let config = relay_config_with(id, dir, &[url_of(parent)], None, &extra);
    Relay::start(&config).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_tier_tree_prestages_the_manifest_with_no_agent_request() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (content(300_000, 90), content(200_000, 91));
    root_manifest(dir.path(), &[(&a, None), (&b, None)]);
    let root = start_relay("root", dir.path(), &[], None).await;
    let mid = relay_below(dir.path(), "mid", &root, "").await;
    let leaf = relay_below(dir.path(), "leaf", &mid, "").await;
    let (id_a, id_b) = (BundleId::of(&a), BundleId::of(&b));

    eventually("the leaf has pre-staged both bundles", || {
        cached(dir.path(), "leaf", &id_a) && cached(dir.path(), "leaf", &id_b)
    })
    .await;
    assert!(cached(dir.path(), "mid", &id_a) && cached(dir.path(), "mid", &id_b));

    let got = TestClient::default()
        .get(&bundle_url(&url_of(&leaf), &id_a))
        .await;
    assert_eq!(got.header("x-patchrelay-cache"), Some("hit"));
    assert!(got.bytes() == &a[..]);
    assert_eq!(
        leaf.stats().misses + leaf.stats().joined,
        0,
        "no agent request needed"
    );

    let manifest = TestClient::default()
        .get(&format!("{}/v1/manifest", url_of(&leaf)))
        .await;
    let json = manifest.json();
    assert_eq!(json["version"], 1);
    assert_eq!(json["bundles"][0]["id"], id_a.to_string());
    assert_eq!(json["bundles"][0]["size"], 300_000);
    assert_eq!(leaf.prestage_status().manifest_version, 1);

    for relay in [leaf, mid, root] {
        relay.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_order_the_fills_and_an_impossible_one_is_at_risk() {
    let dir = tempfile::tempdir().unwrap();
    let now = Utc::now();
    let (x, y, z) = (
        content(1_000_000, 92),
        content(500_000, 93),
        content(2_000_000, 94),
    );
    let at = |ms: i64| Some(now + chrono::Duration::milliseconds(ms));
    // Manifest order X, Y, Z; deadlines Z first (too soon for 2 MB at 2 MB/s), then Y.
    root_manifest(
        dir.path(),
        &[(&x, at(3_600_000)), (&y, at(30_000)), (&z, at(500))],
    );
    let root = start_relay("root", dir.path(), &[], None).await;
    let leaf = relay_below(
        dir.path(),
        "leaf",
        &root,
        "[limits]\nupstream = \"2 MB/s\"\n",
    )
    .await;
    let ids = [BundleId::of(&x), BundleId::of(&y), BundleId::of(&z)];

    within(30, async {
        while !ids.iter().all(|id| cached(dir.path(), "leaf", id)) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let status = leaf.prestage_status();
    assert_eq!(
        status.started,
        [ids[2], ids[1], ids[0]],
        "earliest deadline first"
    );
    assert_eq!(status.at_risk, [ids[2]], "only Z cannot make its deadline");
    leaf.shutdown().await;
    root.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outside_its_window_prestaging_waits_unless_a_deadline_cannot() {
    let dir = tempfile::tempdir().unwrap();
    // Monday 2026-12-07 12:00 UTC; the pre-staging window is nights, 01:00-05:00.
    let noon = Utc.with_ymd_and_hms(2026, 12, 7, 12, 0, 0).unwrap();
    let (relaxed, urgent) = (content(100_000, 95), content(100_000, 96));
    // 100 kB at 1 MB/s takes 0.1 s: with a deadline 0.15 s away it cannot wait.
    let soon = Some(noon + chrono::Duration::milliseconds(150));
    root_manifest(dir.path(), &[(&relaxed, None), (&urgent, soon)]);
    let root = start_relay("root", dir.path(), &[], None).await;

    let extra = "[prestage]\ninterval = \"100ms\"\ndays = [\"daily\"]\nfrom = \"01:00\"\n\
                 to = \"05:00\"\n[limits]\nupstream = \"1 MB/s\"\n";
    let config = relay_config_with("leaf", dir.path(), &[url_of(&root)], None, extra);
    let clock = Arc::new(ManualClock::new(noon));
    let leaf = Relay::start_with_clock(&config, clock.clone())
        .await
        .unwrap();
    let (relaxed_id, urgent_id) = (BundleId::of(&relaxed), BundleId::of(&urgent));

    eventually("the urgent bundle is pre-staged", || {
        cached(dir.path(), "leaf", &urgent_id)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !cached(dir.path(), "leaf", &relaxed_id),
        "no deadline: waits for the window"
    );

    // 01:00: the window opens and the rest follows.
    clock.set(Utc.with_ymd_and_hms(2026, 12, 8, 1, 0, 0).unwrap());
    eventually("the window opened", || {
        cached(dir.path(), "leaf", &relaxed_id)
    })
    .await;
    assert_eq!(leaf.prestage_status().started, [urgent_id, relaxed_id]);
    leaf.shutdown().await;
    root.shutdown().await;
}
