//! Failover and resume: a parent that dies, stalls or answers wrongly is left for the next
//! one, which is asked only for the bytes still missing.

mod support;

use std::time::Duration;

use support::*;

fn resumed_offset(range: &Option<String>) -> u64 {
    let range = range
        .as_deref()
        .expect("the next parent was asked for a range");
    let offset = range
        .strip_prefix("bytes=")
        .and_then(|r| r.strip_suffix('-'));
    offset
        .and_then(|o| o.parse().ok())
        .unwrap_or_else(|| panic!("unexpected range {range}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parent_dying_mid_transfer_is_resumed_from_the_next_parent() {
    let dir = tempfile::tempdir().unwrap();
    let data = content(1_000_000, 11);
    let behaviors = [Behavior::DieAfter(300_000), Behavior::Normal];
    let (leaf, parents, id) = leaf_with_parents(dir.path(), &data, &behaviors).await;
    let healthy = &parents[1];
    let got = within(
        20,
        TestClient::default().get(&bundle_url(&url_of(&leaf), &id)),
    )
    .await;
    assert_eq!(got.status, 200);
    assert!(got.bytes() == &data[..], "client got different bytes");

    let ranges = healthy.ranges();
    assert_eq!(ranges.len(), 1);
    let offset = resumed_offset(&ranges[0]);
    assert!(offset > 0 && offset <= 300_000, "resumed at {offset}");
    let stats = leaf.stats();
    assert_eq!((stats.failovers, stats.fills_completed), (1, 1));
    eventually("the bundle is cached", || cached(dir.path(), "leaf", &id)).await;
    leaf.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_relay_killed_mid_transfer_is_replaced_by_the_other_parent() {
    let dir = tempfile::tempdir().unwrap();
    // About 1.5 s for the whole bundle, so the kill lands mid-transfer.
    let origin =
        MockUpstream::start_paced(Behavior::Normal, 32 * 1024, Duration::from_millis(12)).await;
    let data = content(4 * 1024 * 1024, 12);
    let id = origin.add(&data);

    let parent_a = start_relay("parent-a", dir.path(), &[], Some(&origin.origin_template())).await;
    let parent_b = start_relay("parent-b", dir.path(), &[], Some(&origin.origin_template())).await;
    let leaf = start_relay(
        "leaf",
        dir.path(),
        &[url_of(&parent_a), url_of(&parent_b)],
        None,
    )
    .await;
    let url = bundle_url(&url_of(&leaf), &id);

    let download = tokio::spawn(async move { TestClient::default().get(&url).await });
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        parent_a.running_fills(),
        1,
        "parent A should be mid-transfer"
    );
    parent_a.abort();

    let got = within(30, download).await.unwrap();
    assert_eq!(got.status, 200);
    assert!(got.bytes() == &data[..], "client got different bytes");
    assert_eq!(leaf.stats().failovers, 1);
    assert_eq!(parent_b.stats().fills_completed, 1);
    eventually("the bundle is cached", || cached(dir.path(), "leaf", &id)).await;
    leaf.shutdown().await;
    parent_b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_parent_is_left_after_the_stall_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let data = content(600_000, 13);
    let behaviors = [Behavior::StallAfter(200_000), Behavior::Normal];
    let (leaf, parents, id) = leaf_with_parents(dir.path(), &data, &behaviors).await;
    let healthy = &parents[1];
    let got = within(
        20,
        TestClient::default().get(&bundle_url(&url_of(&leaf), &id)),
    )
    .await;
    assert!(got.bytes() == &data[..], "client got different bytes");
    let ranges = healthy.ranges();
    assert_eq!(ranges.len(), 1);
    assert!(resumed_offset(&ranges[0]) > 0);
    leaf.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parent_answering_a_range_with_the_whole_body_is_a_failed_parent() {
    let dir = tempfile::tempdir().unwrap();
    let data = content(400_000, 14);
    let behaviors = [
        Behavior::DieAfter(100_000),
        Behavior::IgnoreRange,
        Behavior::Normal,
    ];
    let (leaf, parents, id) = leaf_with_parents(dir.path(), &data, &behaviors).await;
    let (ignores_range, healthy) = (&parents[1], &parents[2]);
    let got = within(
        20,
        TestClient::default().get(&bundle_url(&url_of(&leaf), &id)),
    )
    .await;
    assert!(
        got.bytes() == &data[..],
        "a whole body was spliced in at an offset"
    );
    assert_eq!(ignores_range.requests(), 1);
    assert_eq!(healthy.ranges().len(), 1);
    assert_eq!(leaf.stats().failovers, 2);
    leaf.shutdown().await;
}

#[tokio::test]
async fn unreachable_or_failing_parents_give_502() {
    let dir = tempfile::tempdir().unwrap();
    let refusing = MockUpstream::start(Behavior::Unavailable).await;
    let id = refusing.add(b"some bundle");
    let parents = [closed_port_url().await, refusing.base_url()];
    let leaf = start_relay("leaf", dir.path(), &parents, None).await;

    let got = within(
        20,
        TestClient::default().get(&bundle_url(&url_of(&leaf), &id)),
    )
    .await;
    assert_eq!(got.status, 502);
    let json = got.json();
    assert_eq!(json["relay"], "leaf");
    assert!(json["error"].as_str().unwrap().contains("upstream failed"));
    assert_eq!(temp_files(dir.path(), "leaf"), 0);
    leaf.shutdown().await;
}

#[tokio::test]
async fn parents_that_never_answer_give_504() {
    let dir = tempfile::tempdir().unwrap();
    let silent = SilentUpstream::start().await;
    let id = patchrelay::bundle::BundleId::of(b"anything");
    let leaf = start_relay("leaf", dir.path(), &[silent.base_url()], None).await;

    let got = within(
        20,
        TestClient::default().get(&bundle_url(&url_of(&leaf), &id)),
    )
    .await;
    assert_eq!(got.status, 504);
    assert!(got.json()["error"].as_str().unwrap().contains("timed out"));
    leaf.shutdown().await;
}

#[tokio::test]
async fn a_bundle_no_parent_has_is_404_and_the_origin_is_tried_last() {
    let dir = tempfile::tempdir().unwrap();
    let parent = MockUpstream::start(Behavior::Normal).await;
    let origin = MockUpstream::start(Behavior::Normal).await;
    let data = content(5000, 15);
    let id = origin.add(&data);
    let leaf = start_relay(
        "leaf",
        dir.path(),
        &[parent.base_url()],
        Some(&origin.origin_template()),
    )
    .await;
    let client = TestClient::default();

    let got = within(20, client.get(&bundle_url(&url_of(&leaf), &id))).await;
    assert_eq!(got.bytes(), &data[..]);
    assert_eq!((parent.requests(), origin.requests()), (1, 1));

    let missing = patchrelay::bundle::BundleId::of(b"nobody has this");
    let got = within(20, client.get(&bundle_url(&url_of(&leaf), &missing))).await;
    assert_eq!(got.status, 404);
    leaf.shutdown().await;
}
