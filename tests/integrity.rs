//! Integrity: bytes that do not hash to the id are never cached, and no client can take
//! them as a complete bundle.

mod support;

use support::*;

/// The client did not get a complete success: either the body was cut mid-way (the usual
/// case: headers leave before verification), or, when the fill failed before this request
/// was answered, a 502 with the JSON error.
fn assert_not_delivered(fetched: &Result<Fetched, String>) {
    // A body that fails before its first byte makes the relay cut the connection before
    // the response head is even flushed.
    let Ok(fetched) = fetched else { return };
    match fetched.status.as_u16() {
        200 | 206 => assert!(
            fetched.body.is_err(),
            "corrupt bytes were delivered as complete"
        ),
        502 => assert_eq!(fetched.json()["relay"], "leaf"),
        // Held off after every source failed verification.
        503 => assert!(fetched.header("retry-after").is_some()),
        other => panic!("unexpected status {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_parent_aborts_the_client_and_the_next_request_succeeds_from_a_good_one() {
    let dir = tempfile::tempdir().unwrap();
    let data = content(700_000, 21);
    let behaviors = [Behavior::Corrupt, Behavior::Normal];
    let (leaf, parents, id) = leaf_with_parents(dir.path(), &data, &behaviors).await;
    let (corrupt, good) = (&parents[0], &parents[1]);
    let url = bundle_url(&url_of(&leaf), &id);
    let client = TestClient::default();

    let first = within(20, client.try_send("GET", &url, &[])).await;
    assert_not_delivered(&first);
    assert_eq!(leaf.stats().integrity_failures, 1);

    let second = within(20, client.get(&url)).await;
    assert_eq!(second.status, 200);
    assert!(
        second.bytes() == &data[..],
        "second client got different bytes"
    );
    assert_eq!(
        corrupt.requests(),
        1,
        "the corrupt parent should go to the back of the line"
    );
    assert_eq!(good.requests(), 1);

    eventually("the good copy is cached", || {
        cached(dir.path(), "leaf", &id)
    })
    .await;
    let cached_copy = std::fs::read(
        dir.path()
            .join(format!("leaf-cache/objects/{}/{id}", &id.to_string()[..2])),
    )
    .unwrap();
    assert!(
        cached_copy == data,
        "the cache must hold only the verified bytes"
    );
    leaf.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_only_source_caches_nothing_leaves_no_temp_file_and_is_held_off() {
    let dir = tempfile::tempdir().unwrap();
    let corrupt = MockUpstream::start(Behavior::Corrupt).await;
    let data = content(300_000, 22);
    let id = corrupt.add(&data);
    let leaf = start_relay("leaf", dir.path(), &[], Some(&corrupt.origin_template())).await;
    let url = bundle_url(&url_of(&leaf), &id);
    let client = TestClient::default();

    let got = within(20, client.try_send("GET", &url, &[])).await;
    assert_not_delivered(&got);
    assert!(!cached(dir.path(), "leaf", &id));
    // The failed fill's file is removed once its task has finished.
    eventually("the failed fill is gone", || {
        temp_files(dir.path(), "leaf") == 0 && leaf.running_fills() == 0
    })
    .await;
    assert_eq!(leaf.stats().integrity_failures, 1);

    // Every source failed verification, so the next requests do not pull the bundle over
    // the WAN again: 503 with Retry-After until the hold-off ends.
    for _ in 0..3 {
        let again = within(20, client.try_send("GET", &url, &[])).await.unwrap();
        assert_eq!(again.status, 503);
        let wait: u64 = again.header("retry-after").unwrap().parse().unwrap();
        assert!((1..=10).contains(&wait), "Retry-After: {wait}");
        assert!(!cached(dir.path(), "leaf", &id));
    }
    assert_eq!(corrupt.requests(), 1, "the corrupt source was asked once");

    // A range that ends before the bundle's last byte cannot be verified on its own, but one
    // that includes the last byte is cut like a whole body.
    let tail = within(20, client.try_send("GET", &url, &[("range", "bytes=-100")])).await;
    assert_not_delivered(&tail);
    leaf.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refetch_after_corruption_stops_when_the_other_sources_lack_the_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let corrupt = MockUpstream::start(Behavior::Corrupt).await;
    let lacking = MockUpstream::start(Behavior::Normal).await;
    let data = content(200_000, 23);
    let id = corrupt.add(&data);

    let leaf = start_relay(
        "leaf",
        dir.path(),
        &[corrupt.base_url(), lacking.base_url()],
        None,
    )
    .await;
    let url = bundle_url(&url_of(&leaf), &id);
    let got = within(20, TestClient::default().try_send("GET", &url, &[])).await;
    assert_not_delivered(&got);

    // The refetch asks only the source not caught corrupting this bundle; it answers 404
    // and the fill ends there instead of fetching the corrupt copy again and again.
    eventually("the refetch has ended", || {
        lacking.requests() >= 1 && leaf.running_fills() == 0
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(corrupt.requests(), 1);
    assert_eq!(leaf.stats().integrity_failures, 1);
    assert_eq!(leaf.running_fills(), 0);
    leaf.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_honours_its_parents_hold_off_instead_of_asking_per_agent() {
    let dir = tempfile::tempdir().unwrap();
    let corrupt = MockUpstream::start(Behavior::Corrupt).await;
    let data = content(300_000, 24);
    let id = corrupt.add(&data);
    let root = start_relay("root", dir.path(), &[], Some(&corrupt.origin_template())).await;
    let leaf = start_relay("leaf", dir.path(), &[url_of(&root)], None).await;
    let url = bundle_url(&url_of(&leaf), &id);
    let client = TestClient::default();

    // The first agent's fill fails at the root, which then holds the bundle off.
    let first = within(20, client.try_send("GET", &url, &[])).await;
    assert_not_delivered(&first);
    eventually("the root holds the bundle off", || {
        root.stats().integrity_failures == 1 && leaf.running_fills() == 0
    })
    .await;

    // The next agent gets the root's 503 passed on with its Retry-After ...
    let upstream_before = leaf.stats().upstream_requests;
    let second = within(20, client.try_send("GET", &url, &[])).await.unwrap();
    assert_eq!(second.status, 503);
    let wait: u64 = second.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=10).contains(&wait), "Retry-After: {wait}");
    assert_eq!(second.json()["relay"], "leaf");
    assert_eq!(leaf.stats().upstream_requests, upstream_before + 1);

    // ... and the agents after it get the same from the leaf, which does not ask again.
    for _ in 0..5 {
        let again = within(20, client.try_send("GET", &url, &[])).await.unwrap();
        assert_eq!(again.status, 503);
        assert!(again.header("retry-after").is_some());
        let error = again.json()["error"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(error.contains("refused by every upstream"), "{error}");
    }
    assert_eq!(leaf.stats().upstream_requests, upstream_before + 1);
    assert_eq!(corrupt.requests(), 1, "the origin was asked once");

    // A parent relay's "later" is about this bundle, not its health: the leaf does not
    // count it as a failing parent.
    let ready = client.get(&format!("{}/readyz", url_of(&leaf))).await;
    assert_eq!(ready.status, 200);
    let upstream = &ready.json()["upstream"][0];
    assert_eq!(upstream["consecutive_failures"], 0, "{upstream}");
    assert!(!cached(dir.path(), "leaf", &id) && !cached(dir.path(), "root", &id));
    leaf.shutdown().await;
    root.shutdown().await;
}
