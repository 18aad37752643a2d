//! The bundle API as an agent sees it: ranges, conditional requests, HEAD and errors.

mod support;

use patchrelay::bundle::BundleId;
use support::*;

/// A root relay with one bundle cached (fetched once from a mock origin).
async fn relay_with_bundle(
    dir: &std::path::Path,
) -> (patchrelay::relay::Relay, MockUpstream, Vec<u8>, BundleId) {
    let origin = MockUpstream::start(Behavior::Normal).await;
    let data = content(100_000, 7);
    let id = origin.add(&data);
    let relay = start_relay("api", dir, &[], Some(&origin.origin_template())).await;
    let warm = within(
        20,
        TestClient::default().get(&bundle_url(&url_of(&relay), &id)),
    )
    .await;
    assert_eq!(warm.bytes(), &data[..]);
    eventually("the fill has committed", || relay.running_fills() == 0).await;
    (relay, origin, data, id)
}

#[tokio::test]
async fn byte_ranges_at_every_position() {
    let dir = tempfile::tempdir().unwrap();
    let (relay, _origin, data, id) = relay_with_bundle(dir.path()).await;
    let url = bundle_url(&url_of(&relay), &id);
    let client = TestClient::default();

    let cases: [(&str, usize, usize); 7] = [
        ("bytes=0-0", 0, 1),
        ("bytes=0-99", 0, 100),
        ("bytes=50000-50999", 50_000, 51_000),
        ("bytes=99999-99999", 99_999, 100_000),
        ("bytes=99000-", 99_000, 100_000),
        ("bytes=-10", 99_990, 100_000),
        ("bytes=90000-5000000", 90_000, 100_000),
    ];
    for (range, start, end) in cases {
        let got = client.send("GET", &url, &[("range", range)]).await;
        assert_eq!(got.status, 206, "{range}");
        assert_eq!(
            got.header("content-range"),
            Some(format!("bytes {start}-{}/100000", end - 1).as_str()),
            "{range}"
        );
        assert_eq!(
            got.header("content-length"),
            Some((end - start).to_string().as_str()),
            "{range}"
        );
        assert_eq!(got.bytes(), &data[start..end], "{range}");
    }

    let whole_suffix = client
        .send("GET", &url, &[("range", "bytes=-200000")])
        .await;
    assert_eq!(whole_suffix.status, 206);
    assert_eq!(whole_suffix.bytes(), &data[..]);
    relay.shutdown().await;
}

#[tokio::test]
async fn unsatisfiable_range_is_416_with_the_length() {
    let dir = tempfile::tempdir().unwrap();
    let (relay, _origin, _data, id) = relay_with_bundle(dir.path()).await;
    let url = bundle_url(&url_of(&relay), &id);
    let client = TestClient::default();

    for range in ["bytes=100000-", "bytes=200000-300000", "bytes=-0"] {
        let got = client.send("GET", &url, &[("range", range)]).await;
        assert_eq!(got.status, 416, "{range}");
        assert_eq!(
            got.header("content-range"),
            Some("bytes */100000"),
            "{range}"
        );
        assert_eq!(got.json()["relay"], "api");
    }
    relay.shutdown().await;
}

#[tokio::test]
async fn malformed_and_multiple_ranges_are_400_other_units_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let (relay, _origin, data, id) = relay_with_bundle(dir.path()).await;
    let url = bundle_url(&url_of(&relay), &id);
    let client = TestClient::default();

    for range in ["bytes=5-1", "bytes=abc", "bytes=0-1,5-6"] {
        let got = client.send("GET", &url, &[("range", range)]).await;
        assert_eq!(got.status, 400, "{range}");
        let error = got.json()["error"].as_str().unwrap().to_lowercase();
        assert!(error.contains("range"), "{range}: {error}");
    }
    let other_unit = client.send("GET", &url, &[("range", "pages=1-2")]).await;
    assert_eq!(other_unit.status, 200);
    assert_eq!(other_unit.bytes(), &data[..]);
    relay.shutdown().await;
}

#[tokio::test]
async fn if_none_match_gives_304_and_if_range_guards_the_range() {
    let dir = tempfile::tempdir().unwrap();
    let (relay, _origin, data, id) = relay_with_bundle(dir.path()).await;
    let url = bundle_url(&url_of(&relay), &id);
    let client = TestClient::default();
    let etag = format!("\"{id}\"");

    let not_modified = client.send("GET", &url, &[("if-none-match", &etag)]).await;
    assert_eq!(not_modified.status, 304);
    assert_eq!(not_modified.header("etag"), Some(etag.as_str()));
    assert!(not_modified.bytes().is_empty());

    let other = client
        .send("GET", &url, &[("if-none-match", "\"something-else\"")])
        .await;
    assert_eq!(other.status, 200);

    let guarded = client
        .send("GET", &url, &[("range", "bytes=0-9"), ("if-range", &etag)])
        .await;
    assert_eq!(guarded.status, 206);
    let stale = client
        .send(
            "GET",
            &url,
            &[("range", "bytes=0-9"), ("if-range", "\"old\"")],
        )
        .await;
    assert_eq!(stale.status, 200);
    assert_eq!(stale.bytes(), &data[..]);
    relay.shutdown().await;
}

#[tokio::test]
async fn head_has_the_headers_and_no_body() {
    let dir = tempfile::tempdir().unwrap();
    let (relay, _origin, _data, id) = relay_with_bundle(dir.path()).await;
    let got = TestClient::default()
        .send("HEAD", &bundle_url(&url_of(&relay), &id), &[])
        .await;
    assert_eq!(got.status, 200);
    assert_eq!(got.header("content-length"), Some("100000"));
    assert_eq!(got.header("accept-ranges"), Some("bytes"));
    assert_eq!(got.header("content-type"), Some("application/octet-stream"));
    assert_eq!(got.header("x-patchrelay-cache"), Some("hit"));
    assert!(got.bytes().is_empty());
    relay.shutdown().await;
}

#[tokio::test]
async fn head_of_a_cold_bundle_starts_the_fill() {
    let dir = tempfile::tempdir().unwrap();
    let origin = MockUpstream::start(Behavior::Normal).await;
    let data = content(10_000, 8);
    let id = origin.add(&data);
    let relay = start_relay("api", dir.path(), &[], Some(&origin.origin_template())).await;
    let url = bundle_url(&url_of(&relay), &id);
    let client = TestClient::default();

    let head = within(20, client.send("HEAD", &url, &[])).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), Some("10000"));
    assert_eq!(head.header("x-patchrelay-cache"), Some("miss"));
    let get = within(20, client.get(&url)).await;
    assert_eq!(get.bytes(), &data[..]);
    assert_eq!(origin.requests(), 1);
    relay.shutdown().await;
}

#[tokio::test]
async fn bad_ids_are_400_with_a_json_error() {
    let dir = tempfile::tempdir().unwrap();
    let relay = start_relay("api", dir.path(), &[], None).await;
    let base = url_of(&relay);
    let client = TestClient::default();
    let upper = BundleId::of(b"x").to_string().to_uppercase();

    for bad in [
        "abc",
        upper.as_str(),
        "..%2F..%2Fetc%2Fpasswd",
        &"g".repeat(64),
    ] {
        let got = client.get(&format!("{base}/v1/bundles/{bad}")).await;
        assert_eq!(got.status, 400, "{bad}");
        assert_eq!(got.header("content-type"), Some("application/json"));
        let json = got.json();
        assert_eq!(json["relay"], "api");
        assert!(
            json["error"].as_str().unwrap().contains("bundle id"),
            "{bad}"
        );
    }
    relay.shutdown().await;
}

#[tokio::test]
async fn unknown_bundle_is_404_whether_or_not_there_is_an_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let origin = MockUpstream::start(Behavior::Normal).await;
    let with_origin = start_relay(
        "with-origin",
        dir.path(),
        &[],
        Some(&origin.origin_template()),
    )
    .await;
    let without = start_relay("alone", dir.path(), &[], None).await;
    let id = BundleId::of(b"never published");
    let client = TestClient::default();

    for relay in [&with_origin, &without] {
        let got = within(20, client.get(&bundle_url(&url_of(relay), &id))).await;
        assert_eq!(got.status, 404);
        assert!(got.json()["error"].as_str().unwrap().contains("not found"));
    }
    assert_eq!(origin.requests(), 1);
    assert_eq!(temp_files(dir.path(), "with-origin"), 0);
    with_origin.shutdown().await;
    without.shutdown().await;
}

#[tokio::test]
async fn other_methods_and_paths_get_json_errors() {
    let dir = tempfile::tempdir().unwrap();
    let relay = start_relay("api", dir.path(), &[], None).await;
    let base = url_of(&relay);
    let client = TestClient::default();
    let id = BundleId::of(b"x");

    let post = client.send("POST", &bundle_url(&base, &id), &[]).await;
    assert_eq!(post.status, 405);
    assert_eq!(post.header("allow"), Some("GET, HEAD"));
    assert_eq!(post.json()["relay"], "api");

    let nowhere = client.get(&format!("{base}/v2/things")).await;
    assert_eq!(nowhere.status, 404);
    assert_eq!(nowhere.json()["relay"], "api");
    relay.shutdown().await;
}

#[tokio::test]
async fn head_ignores_range_and_if_none_match_star_needs_an_existing_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let (relay, _origin, _data, id) = relay_with_bundle(dir.path()).await;
    let url = bundle_url(&url_of(&relay), &id);
    let client = TestClient::default();

    let head = client.send("HEAD", &url, &[("range", "bytes=0-9")]).await;
    assert_eq!(head.status, 200, "Range applies to GET only");
    assert_eq!(head.header("content-length"), Some("100000"));

    let star = client.send("GET", &url, &[("if-none-match", "*")]).await;
    assert_eq!(star.status, 304);
    assert_eq!(
        star.header("cache-control"),
        Some("public, max-age=31536000, immutable")
    );

    let unknown = bundle_url(&url_of(&relay), &BundleId::of(b"not anywhere"));
    let star_unknown = within(20, client.send("GET", &unknown, &[("if-none-match", "*")])).await;
    assert_eq!(star_unknown.status, 404);

    // Preconditions are evaluated before Range: a matching tag wins over a bad range.
    let etag = format!("\"{id}\"");
    let both = client
        .send(
            "GET",
            &url,
            &[("if-none-match", &etag), ("range", "bytes=x")],
        )
        .await;
    assert_eq!(both.status, 304);
    relay.shutdown().await;
}
