//! Restarts and shutdown: leftovers of interrupted fills never surface, and a stopping
//! relay lets running downloads finish.

mod support;

use std::time::Duration;

use patchrelay::relay::Relay;
use support::*;

#[tokio::test]
async fn leftover_temporary_files_are_removed_and_never_served() {
    let dir = tempfile::tempdir().unwrap();
    let origin = MockUpstream::start(Behavior::Normal).await;
    let data = content(50_000, 31);
    let id = origin.add(&data);

    // A crash mid-fill leaves a partial file in tmp/, named as fills name theirs (with the
    // pid of a process that no longer exists).
    let tmp = dir.path().join("edge-cache/tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::write(tmp.join(format!("{id}.4194305.0.part")), &data[..20_000]).unwrap();
    std::fs::write(tmp.join("stray.part"), b"junk").unwrap();

    let relay = start_relay("edge", dir.path(), &[], Some(&origin.origin_template())).await;
    assert_eq!(temp_files(dir.path(), "edge"), 0);
    let got = within(
        20,
        TestClient::default().get(&bundle_url(&url_of(&relay), &id)),
    )
    .await;
    assert_eq!(got.header("x-patchrelay-cache"), Some("miss"));
    assert!(
        got.bytes() == &data[..],
        "the partial file must not be served or resumed"
    );
    assert_eq!(origin.ranges(), [None], "the fetch must start from byte 0");
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_mid_fill_refetches_the_whole_bundle_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let origin =
        MockUpstream::start_paced(Behavior::Normal, 32 * 1024, Duration::from_millis(10)).await;
    let data = content(2 * 1024 * 1024, 32);
    let id = origin.add(&data);
    let config = relay_config("edge", dir.path(), &[], Some(&origin.origin_template()));

    let relay = Relay::start(&config).await.unwrap();
    let url = bundle_url(&url_of(&relay), &id);
    let download = tokio::spawn(async move { TestClient::default().get(&url).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    relay.abort();
    let cut = within(20, download).await.unwrap();
    assert!(
        cut.body.is_err(),
        "the killed relay's client must see a cut body"
    );
    assert!(!cached(dir.path(), "edge", &id));

    let relay = Relay::start(&config).await.unwrap();
    let got = within(
        20,
        TestClient::default().get(&bundle_url(&url_of(&relay), &id)),
    )
    .await;
    assert_eq!(got.header("x-patchrelay-cache"), Some("miss"));
    assert!(got.bytes() == &data[..]);
    assert_eq!(origin.requests(), 2);
    assert_eq!(
        origin.ranges()[1],
        None,
        "the refetch must be whole, not resumed"
    );
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_a_running_download_finish_and_refuses_new_connections() {
    let dir = tempfile::tempdir().unwrap();
    let origin =
        MockUpstream::start_paced(Behavior::Normal, 32 * 1024, Duration::from_millis(10)).await;
    let data = content(2 * 1024 * 1024, 33);
    let id = origin.add(&data);
    let relay = start_relay("edge", dir.path(), &[], Some(&origin.origin_template())).await;
    let base = url_of(&relay);
    let url = bundle_url(&base, &id);

    let download = tokio::spawn(async move { TestClient::default().get(&url).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stopping = tokio::spawn(relay.shutdown());
    tokio::time::sleep(Duration::from_millis(100)).await;

    let refused = tokio::net::TcpStream::connect(base.trim_start_matches("http://")).await;
    assert!(
        refused.is_err(),
        "a stopping relay must not accept new connections"
    );

    let got = within(20, download).await.unwrap();
    assert!(
        got.bytes() == &data[..],
        "the running download must complete intact"
    );
    within(20, stopping).await.unwrap();
    eventually("the bundle is cached", || cached(dir.path(), "edge", &id)).await;
}
