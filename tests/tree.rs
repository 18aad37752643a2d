//! A tree of relays: cold fetches travel leaf -> mid -> root -> origin once, and every
//! client gets the exact bytes.

mod support;

use std::time::Duration;

use futures_util::future::join_all;
use patchrelay::bundle::BundleId;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_fetch_through_three_tiers_returns_verified_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let origin = MockUpstream::start(Behavior::Normal).await;
    let data = content(1_500_000, 1);
    let id = origin.add(&data);

    let root = start_relay("root", dir.path(), &[], Some(&origin.origin_template())).await;
    let mid = start_relay("mid", dir.path(), &[url_of(&root)], None).await;
    let leaf = start_relay("leaf", dir.path(), &[url_of(&mid)], None).await;
    let client = TestClient::default();

    let first = within(20, client.get(&bundle_url(&url_of(&leaf), &id))).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.header("x-patchrelay-cache"), Some("miss"));
    assert_eq!(first.header("x-patchrelay-relay"), Some("leaf"));
    assert_eq!(first.header("etag"), Some(format!("\"{id}\"").as_str()));
    assert_eq!(first.header("content-length"), Some("1500000"));
    assert_eq!(BundleId::of(first.bytes()), id);
    assert_eq!(first.bytes(), &data[..]);

    // Each tier now holds the verified bundle, and a second request is a hit.
    for tier in ["root", "mid", "leaf"] {
        eventually("each tier has cached the bundle", || {
            cached(dir.path(), tier, &id)
        })
        .await;
        assert_eq!(
            temp_files(dir.path(), tier),
            0,
            "{tier} left temporary files"
        );
    }
    let second = within(20, client.get(&bundle_url(&url_of(&leaf), &id))).await;
    assert_eq!(second.header("x-patchrelay-cache"), Some("hit"));
    assert_eq!(second.bytes(), &data[..]);
    assert_eq!(origin.requests(), 1);

    for relay in [leaf, mid, root] {
        relay.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_clients_cause_one_transfer_per_tier() {
    let dir = tempfile::tempdir().unwrap();
    // Slow enough (about 0.5 s) that the clients arrive while the fill is running.
    let origin =
        MockUpstream::start_paced(Behavior::Normal, 64 * 1024, Duration::from_millis(8)).await;
    let data = content(4 * 1024 * 1024, 2);
    let id = origin.add(&data);

    let root = start_relay("root", dir.path(), &[], Some(&origin.origin_template())).await;
    let mid = start_relay("mid", dir.path(), &[url_of(&root)], None).await;
    let leaf = start_relay("leaf", dir.path(), &[url_of(&mid)], None).await;
    let url = bundle_url(&url_of(&leaf), &id);

    let client = TestClient::default();
    let fetches = (0..100).map(|_| {
        let (client, url) = (client.clone(), url.clone());
        async move { client.get(&url).await }
    });
    let results = within(60, join_all(fetches)).await;

    let mut joined = 0;
    for fetched in &results {
        assert_eq!(fetched.status, 200);
        assert_eq!(fetched.bytes().len(), data.len());
        assert!(fetched.bytes() == &data[..], "a client got different bytes");
        if fetched.header("x-patchrelay-cache") == Some("joined") {
            joined += 1;
        }
    }
    assert!(joined > 0, "no client joined the running fill");

    assert_eq!(
        origin.requests(),
        1,
        "origin should serve the bundle exactly once"
    );
    for (name, relay) in [("leaf", &leaf), ("mid", &mid), ("root", &root)] {
        let stats = relay.stats();
        assert_eq!(stats.fills_started, 1, "{name} started more than one fill");
        assert_eq!(
            stats.upstream_requests, 1,
            "{name} asked upstream more than once"
        );
        assert_eq!(stats.fills_completed, 1, "{name} did not complete its fill");
    }
    // The mid and root tiers were asked exactly once each, by the tier below.
    assert_eq!(
        mid.stats().misses + mid.stats().joined + mid.stats().hits,
        1
    );
    assert_eq!(
        root.stats().misses + root.stats().joined + root.stats().hits,
        1
    );

    for relay in [leaf, mid, root] {
        relay.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joined_client_gets_what_is_on_disk_at_once_and_ranges_are_served_mid_fill() {
    let dir = tempfile::tempdir().unwrap();
    // About 2 s for the whole bundle.
    let origin =
        MockUpstream::start_paced(Behavior::Normal, 32 * 1024, Duration::from_millis(16)).await;
    let data = content(4 * 1024 * 1024, 3);
    let id = origin.add(&data);
    let relay = start_relay("edge", dir.path(), &[], Some(&origin.origin_template())).await;
    let url = bundle_url(&url_of(&relay), &id);
    let client = TestClient::default();

    let first = tokio::spawn({
        let (client, url) = (client.clone(), url.clone());
        async move { client.get(&url).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A range inside what has already arrived completes while the fill is still running.
    let early = within(
        20,
        client.send("GET", &url, &[("range", "bytes=1000-1999")]),
    )
    .await;
    assert_eq!(early.status, 206);
    assert_eq!(early.header("x-patchrelay-cache"), Some("joined"));
    assert_eq!(
        early.header("content-range"),
        Some("bytes 1000-1999/4194304")
    );
    assert_eq!(early.bytes(), &data[1000..2000]);
    assert_eq!(
        relay.running_fills(),
        1,
        "the range should be served before the fill ends"
    );

    let first = within(30, first).await.unwrap();
    assert_eq!(first.bytes(), &data[..]);
    assert_eq!(origin.requests(), 1);
    relay.shutdown().await;
}
