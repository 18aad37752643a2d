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
