//! Cache bounds: LRU eviction under cache_max, pins, in-use bundles, oversized bundles.

mod support;

use patchrelay::bundle::BundleId;
use patchrelay::relay::Relay;
use support::*;

/// A relay `edge` whose origin holds four 100 kB bundles; `relay_extra` goes into [relay].
async fn bounded_relay(
    dir: &std::path::Path,
    origin: &MockUpstream,
    relay_extra: &str,
) -> (Relay, patchrelay::config::Config) {
    let base = relay_config("edge", dir, &[], Some(&origin.origin_template()));
    let text = format!(
        "[relay]\nid = \"edge\"\nsite = \"test\"\nlisten = \"127.0.0.1:0\"\n\
         cache_dir = \"edge-cache\"\n{relay_extra}\n[upstream]\norigin = \"{}\"\n",
        base.upstream
            .origin
            .as_ref()
            .map(|o| o.as_str())
            .unwrap_or_default()
    );
    let config = patchrelay::config::Config::parse(&text, "test.toml", dir).expect("valid");
    (Relay::start(&config).await.expect("relay starts"), config)
}

fn four_bundles(origin: &MockUpstream, size: usize) -> Vec<(BundleId, Vec<u8>)> {
    (0..4u64)
        .map(|seed| {
            let data = content(size, 60 + seed);
            (origin.add(&data), data)
        })
        .collect()
}

async fn fetch(relay: &Relay, id: &BundleId) -> Fetched {
    let got = within(
        20,
        TestClient::default().get(&bundle_url(&url_of(relay), id)),
    )
    .await;
    assert_eq!(got.status, 200);
    eventually("the fill has ended", || relay.running_fills() == 0).await;
    got
}

#[tokio::test]
async fn least_recently_used_bundles_are_evicted_first_even_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let origin = MockUpstream::start(Behavior::Normal).await;
    let bundles = four_bundles(&origin, 100_000);
    let (a, b, c) = (bundles[0].0, bundles[1].0, bundles[2].0);
    let (relay, config) = bounded_relay(dir.path(), &origin, "cache_max = \"250 kB\"").await;

    fetch(&relay, &a).await;
    fetch(&relay, &b).await;
    let again = fetch(&relay, &a).await;
    assert_eq!(again.header("x-patchrelay-cache"), Some("hit"));
    relay.shutdown().await;

    // After a restart A is still more recent than B, so C's fill evicts B.
    let relay = Relay::start(&config).await.unwrap();
    let got = fetch(&relay, &c).await;
    assert!(got.bytes() == &bundles[2].1[..]);
    assert!(
        cached(dir.path(), "edge", &a),
        "A was used more recently than B"
    );
    assert!(
        !cached(dir.path(), "edge", &b),
        "B was the least recently used"
    );
    assert!(cached(dir.path(), "edge", &c));
    assert_eq!(
        fetch(&relay, &a).await.header("x-patchrelay-cache"),
        Some("hit")
    );
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_and_in_use_bundles_are_never_evicted() {
    let dir = tempfile::tempdir().unwrap();
    let origin = MockUpstream::start(Behavior::Normal).await;
    // Bundles of 24 MB: an agent that stops reading leaves its download running (loopback
    // socket buffers can grow to a few MB, far less than this), so the relay is still
    // serving it.
    let bundles = four_bundles(&origin, 24_000_000);
    let (a, b, c) = (bundles[0].0, bundles[1].0, bundles[2].0);
    let extra = format!("cache_max = \"60 MB\"\npins = [\"{a}\"]");
    let (relay, _) = bounded_relay(dir.path(), &origin, &extra).await;

    fetch(&relay, &a).await;
    fetch(&relay, &b).await;
    // B is being read (a download whose body is not consumed yet).
    let reading_b = TestClient::default()
        .start_get(&bundle_url(&url_of(&relay), &b))
        .await;

    // C needs room, but A is pinned and B in use: C is served and not kept.
    let got = fetch(&relay, &c).await;
    assert!(got.bytes() == &bundles[2].1[..]);
    assert!(cached(dir.path(), "edge", &a) && cached(dir.path(), "edge", &b));
    assert!(!cached(dir.path(), "edge", &c));
    assert_eq!(temp_files(dir.path(), "edge"), 0);

    // Once B's download is over, B can go to make room for C.
    let body = http_body_util::BodyExt::collect(reading_b.into_body())
        .await
        .unwrap();
    assert_eq!(body.to_bytes().len(), 24_000_000);
    fetch(&relay, &c).await;
    assert!(cached(dir.path(), "edge", &a), "pinned bundles stay");
    assert!(!cached(dir.path(), "edge", &b));
    assert!(cached(dir.path(), "edge", &c));
    relay.shutdown().await;
}

#[tokio::test]
async fn a_bundle_larger_than_the_cache_is_served_but_not_cached() {
    let dir = tempfile::tempdir().unwrap();
    let origin = MockUpstream::start(Behavior::Normal).await;
    let data = content(300_000, 70);
    let id = origin.add(&data);
    let (relay, _) = bounded_relay(dir.path(), &origin, "cache_max = \"100 kB\"").await;

    for round in 0..2 {
        let got = fetch(&relay, &id).await;
        assert!(got.bytes() == &data[..], "round {round}");
        assert_eq!(
            got.header("x-patchrelay-cache"),
            Some("miss"),
            "round {round}"
        );
        assert!(!cached(dir.path(), "edge", &id));
        assert_eq!(temp_files(dir.path(), "edge"), 0);
    }
    assert_eq!(origin.requests(), 2);
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrub_finds_a_flipped_bit_quarantines_it_and_refetches() {
    let dir = tempfile::tempdir().unwrap();
    let origin = MockUpstream::start(Behavior::Normal).await;
    let data = content(300_000, 75);
    let id = origin.add(&data);
    let extra = "scrub_rate = \"50 MB/s\"\nscrub_interval = \"100ms\"";
    let (relay, _) = bounded_relay(dir.path(), &origin, extra).await;
    fetch(&relay, &id).await;

    let hex = id.to_string();
    let object = dir
        .path()
        .join(format!("edge-cache/objects/{}/{hex}", &hex[..2]));
    let mut rotten = data.clone();
    rotten[150_000] ^= 0x10;
    std::fs::write(&object, &rotten).unwrap();

    eventually("the bundle is refetched", || origin.requests() == 2).await;
    eventually("the good copy is back", || {
        std::fs::read(&object).is_ok_and(|b| b == data)
    })
    .await;
    let quarantine = dir.path().join("edge-cache/quarantine");
    let kept: Vec<_> = std::fs::read_dir(&quarantine)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(kept.len(), 1);
    assert!(
        std::fs::read(&kept[0]).unwrap() == rotten,
        "the corrupt copy is kept aside"
    );
    assert!(relay.stats().integrity_failures >= 1);
    let got = fetch(&relay, &id).await;
    assert!(got.bytes() == &data[..]);
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_cache_dir_still_serves_through_coalesced_and_verified() {
    let dir = tempfile::tempdir().unwrap();
    let origin = MockUpstream::start_paced(
        Behavior::Normal,
        32 * 1024,
        std::time::Duration::from_millis(5),
    )
    .await;
    let data = content(1_000_000, 76);
    let id = origin.add(&data);
    let (relay, _) = bounded_relay(dir.path(), &origin, "").await;

    // The tests run as root, for whom permissions do not stop writes: make tmp/ a plain
    // file so that nothing can be created in it.
    let tmp = dir.path().join("edge-cache/tmp");
    std::fs::remove_dir(&tmp).unwrap();
    std::fs::write(&tmp, b"not a directory").unwrap();

    let url = bundle_url(&url_of(&relay), &id);
    let clients = (0..5).map(|_| {
        let url = url.clone();
        async move { TestClient::default().get(&url).await }
    });
    for got in within(30, futures_util::future::join_all(clients)).await {
        assert_eq!(got.status, 200);
        assert!(got.bytes() == &data[..]);
    }
    assert_eq!(origin.requests(), 1, "pass-through still coalesces");
    assert!(relay.degraded());
    eventually("the fill has ended", || relay.running_fills() == 0).await;
    assert!(!cached(dir.path(), "edge", &id));

    // Once the directory is back, fills are cached again and the relay is no longer degraded.
    std::fs::remove_file(&tmp).unwrap();
    std::fs::create_dir(&tmp).unwrap();
    let got = fetch(&relay, &id).await;
    assert!(got.bytes() == &data[..]);
    assert!(cached(dir.path(), "edge", &id));
    assert!(!relay.degraded());
    relay.shutdown().await;
}
