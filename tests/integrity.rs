//! Integrity: bytes that do not hash to the id are never cached, and no client can take
//! them as a complete bundle.

mod support;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_parent_aborts_the_client_and_the_next_request_succeeds_from_a_good_one() {
    let dir = tempfile::tempdir().unwrap();
    let corrupt = MockUpstream::start(Behavior::Corrupt).await;
    let good = MockUpstream::start(Behavior::Normal).await;
    let data = content(700_000, 21);
    let id = corrupt.add(&data);
    good.add(&data);

    let leaf = start_relay(
        "leaf",
        dir.path(),
        &[corrupt.base_url(), good.base_url()],
        None,
    )
    .await;
    let url = bundle_url(&url_of(&leaf), &id);
    let client = TestClient::default();

    let first = within(20, client.get(&url)).await;
    assert_eq!(
        first.status, 200,
        "headers go out before the body is verified"
    );
    assert!(
        first.body.is_err(),
        "the corrupt transfer must be cut, not completed"
    );
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
async fn corrupt_only_source_caches_nothing_and_leaves_no_temp_file() {
    let dir = tempfile::tempdir().unwrap();
    let corrupt = MockUpstream::start(Behavior::Corrupt).await;
    let data = content(300_000, 22);
    let id = corrupt.add(&data);
    let leaf = start_relay("leaf", dir.path(), &[], Some(&corrupt.origin_template())).await;
    let url = bundle_url(&url_of(&leaf), &id);
    let client = TestClient::default();

    for attempt in 0..2 {
        let got = within(20, client.get(&url)).await;
        assert!(
            got.body.is_err(),
            "attempt {attempt}: corrupt bytes were delivered as complete"
        );
        assert!(!cached(dir.path(), "leaf", &id));
    }
    // The failed fill's file is removed once its task has finished.
    within(5, async {
        while temp_files(dir.path(), "leaf") > 0 || leaf.running_fills() > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(leaf.stats().integrity_failures, 2);

    // A range that ends before the bundle's last byte cannot be verified on its own, but one
    // that includes the last byte is cut like a whole body.
    let tail = within(20, client.send("GET", &url, &[("range", "bytes=-100")])).await;
    assert!(tail.body.is_err());
    leaf.shutdown().await;
}
