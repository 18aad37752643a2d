//! Bandwidth and request limits, on real relays over loopback.
//!
//! Rates are checked over a few seconds of transfer with wide bounds (the machine is
//! shared); the precise figures come from `cargo bench --bench limits`.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use futures_util::future::join_all;
use http_body_util::BodyExt;
use patchrelay::limits::ManualClock;
use patchrelay::relay::Relay;
use support::*;

async fn limited_relay(dir: &std::path::Path, limits: &str) -> Relay {
    let config = relay_config_with("edge", dir, &[], None, limits);
    Relay::start(&config).await.expect("relay starts")
}

/// Downloads `url` with `client`; returns the bytes and the seconds it took.
async fn timed_get(client: &TestClient, url: &str) -> (Vec<u8>, f64) {
    let started = Instant::now();
    let got = within(60, client.get(url)).await;
    assert_eq!(got.status, 200);
    (got.bytes().to_vec(), started.elapsed().as_secs_f64())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downstream_cap_holds_within_ten_percent() {
    let dir = tempfile::tempdir().unwrap();
    let data = content(4_000_000, 51);
    let id = publish(dir.path(), "edge", &data);
    // 4 MB/s for everyone together; the default burst is 200 kB, far below the 8 MB sent.
    let relay = limited_relay(dir.path(), "[limits]\ndownstream = \"4 MB/s\"\n").await;
    let url = bundle_url(&url_of(&relay), &id);

    let started = Instant::now();
    let clients = (0..2).map(|_| {
        let url = url.clone();
        async move { timed_get(&TestClient::default(), &url).await }
    });
    let results = join_all(clients).await;
    let elapsed = started.elapsed().as_secs_f64();

    for (bytes, _) in &results {
        assert!(bytes == &data, "a throttled download must still be intact");
    }
    let rate = 8_000_000.0 / elapsed;
    assert!(
        (3_600_000.0..=4_400_000.0).contains(&rate),
        "achieved {rate:.0} B/s for a 4 MB/s cap"
    );
    // Sharing: neither client finished long before the other.
    let (a, b) = (results[0].1, results[1].1);
    assert!(
        a.min(b) / a.max(b) > 0.8,
        "unfair split: {a:.2}s vs {b:.2}s"
    );
    assert!(relay.stats().throttled_nanos > 0);
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_client_cap_holds_while_another_client_is_unaffected() {
    let dir = tempfile::tempdir().unwrap();
    let data = content(2_000_000, 52);
    let id = publish(dir.path(), "edge", &data);
    let relay = limited_relay(dir.path(), "[limits]\nper_client = \"1 MB/s\"\n").await;
    let url = bundle_url(&url_of(&relay), &id);

    let (client_a, client_b) = (
        TestClient::from_ip([127, 0, 0, 1]),
        TestClient::from_ip([127, 0, 0, 2]),
    );
    let a = timed_get(&client_a, &url);
    let b = timed_get(&client_b, &url);
    let ((bytes_a, secs_a), (bytes_b, secs_b)) = tokio::join!(a, b);

    assert!(bytes_a == data && bytes_b == data);
    // Each address gets its own 1 MB/s: about 2 s each, not 4 s as a shared cap would give.
    for (who, secs) in [("127.0.0.1", secs_a), ("127.0.0.2", secs_b)] {
        let rate = 2_000_000.0 / secs;
        assert!(
            (900_000.0..=1_100_000.0).contains(&rate),
            "{who}: {rate:.0} B/s for 1 MB/s"
        );
    }
    relay.shutdown().await;
}

#[tokio::test]
async fn request_rate_limit_answers_429_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let id = publish(dir.path(), "edge", b"small bundle");
    let relay = limited_relay(dir.path(), "[limits]\nrequests_per_client = \"3/min\"\n").await;
    let url = bundle_url(&url_of(&relay), &id);
    let client = TestClient::default();

    for _ in 0..3 {
        assert_eq!(client.get(&url).await.status, 200);
    }
    let refused = client.get(&url).await;
    assert_eq!(refused.status, 429);
    let retry_after: u64 = refused
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry_after), "Retry-After {retry_after}");
    assert_eq!(refused.json()["relay"], "edge");
    assert!(refused.json()["error"]
        .as_str()
        .unwrap()
        .contains("too many requests"));

    // Another agent has its own allowance.
    assert_eq!(
        TestClient::from_ip([127, 0, 0, 3]).get(&url).await.status,
        200
    );
    assert_eq!(relay.stats().refused_rate, 1);
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_caps_answer_503_and_free_the_slot_when_a_download_ends() {
    let dir = tempfile::tempdir().unwrap();
    let data = content(1_000_000, 53);
    let id = publish(dir.path(), "edge", &data);
    let limits = "[limits]\nmax_downloads = 2\nmax_downloads_per_client = 1\n\
                  per_client = \"200 kB/s\"\n";
    let relay = limited_relay(dir.path(), limits).await;
    let url = bundle_url(&url_of(&relay), &id);
    let (a, b, c) = (
        TestClient::from_ip([127, 0, 0, 1]),
        TestClient::from_ip([127, 0, 0, 2]),
        TestClient::from_ip([127, 0, 0, 3]),
    );

    // A's download runs for about 5 s at 200 kB/s.
    let running = a.start_get(&url).await;
    assert_eq!(running.status(), 200);

    let second_from_a = a.get(&url).await;
    assert_eq!(second_from_a.status, 503, "one download per client");
    assert!(second_from_a.header("retry-after").is_some());
    assert_eq!(second_from_a.json()["relay"], "edge");

    let from_b = b.start_get(&url).await;
    assert_eq!(from_b.status(), 200, "another client still gets a slot");
    let from_c = c.get(&url).await;
    assert_eq!(from_c.status, 503, "two downloads in all");
    assert!(from_c.json()["error"]
        .as_str()
        .unwrap()
        .contains("too many downloads"));

    // HEAD and a conditional GET answered 304 are not downloads.
    assert_eq!(c.send("HEAD", &url, &[]).await.status, 200);
    let etag = format!("\"{id}\"");
    assert_eq!(
        c.send("GET", &url, &[("if-none-match", &etag)])
            .await
            .status,
        304
    );

    // When A's download ends (here: A hangs up), its slot is free again.
    drop(running);
    let mut status = 503;
    for _ in 0..100 {
        let response = c.start_get(&url).await;
        status = response.status().as_u16();
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status, 200, "a finished download must release its slot");
    assert!(relay.stats().refused_busy >= 2);
    drop(from_b);
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_window_edge_changes_the_cap_without_dropping_the_download() {
    let dir = tempfile::tempdir().unwrap();
    let data = content(1_500_000, 54);
    let id = publish(dir.path(), "edge", &data);
    let limits =
        "[limits]\ndownstream = \"unlimited\"\n[[limits.schedule]]\ndays = [\"weekdays\"]\n\
                  from = \"08:00\"\nto = \"18:00\"\ndownstream = \"500 kB/s\"\n";
    let config = relay_config_with("edge", dir.path(), &[], None, limits);
    // Monday 2026-12-07, 17:59:59 UTC: business hours, 500 kB/s.
    let clock = Arc::new(ManualClock::new(
        Utc.with_ymd_and_hms(2026, 12, 7, 17, 59, 59).unwrap(),
    ));
    let relay = Relay::start_with_clock(&config, clock.clone())
        .await
        .unwrap();
    assert_eq!(relay.limits().caps().downstream, Some(500_000));
    let url = bundle_url(&url_of(&relay), &id);

    let started = Instant::now();
    let download = tokio::spawn(async move { TestClient::default().get(&url).await });
    tokio::time::sleep(Duration::from_millis(500)).await;

    // 18:00: the window ends and the cap lifts (the relay checks every second; a test
    // need not wait for that tick).
    clock.set(Utc.with_ymd_and_hms(2026, 12, 7, 18, 0, 0).unwrap());
    relay.limits().refresh();
    assert_eq!(relay.limits().caps().downstream, None);

    let got = within(30, download).await.unwrap();
    assert!(
        got.bytes() == &data[..],
        "the download must continue intact across the switch"
    );
    let secs = started.elapsed().as_secs_f64();
    assert!(
        secs < 2.0,
        "took {secs:.2}s: at 500 kB/s throughout it would take 3 s"
    );
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_new_limits_to_a_running_download() {
    let dir = tempfile::tempdir().unwrap();
    let data = content(1_500_000, 55);
    let id = publish(dir.path(), "edge", &data);
    let relay = limited_relay(dir.path(), "[limits]\ndownstream = \"500 kB/s\"\n").await;
    let url = bundle_url(&url_of(&relay), &id);

    let started = Instant::now();
    let download = tokio::spawn(async move { TestClient::default().get(&url).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let lifted = relay_config_with(
        "edge",
        dir.path(),
        &[],
        None,
        "[limits]\ndownstream = \"100 MB/s\"\n",
    );
    relay.reload(&lifted);

    let got = within(30, download).await.unwrap();
    assert!(got.bytes() == &data[..]);
    let secs = started.elapsed().as_secs_f64();
    assert!(
        secs < 2.0,
        "took {secs:.2}s: the reloaded cap did not reach the running download"
    );
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalesced_clients_spend_the_upstream_budget_once() {
    let dir = tempfile::tempdir().unwrap();
    let origin = MockUpstream::start(Behavior::Normal).await;
    let data = content(2_000_000, 56);
    let id = origin.add(&data);
    let config = relay_config_with(
        "edge",
        dir.path(),
        &[],
        Some(&origin.origin_template()),
        "[limits]\nupstream = \"2 MB/s\"\n",
    );
    let relay = Relay::start(&config).await.unwrap();
    let url = bundle_url(&url_of(&relay), &id);

    let started = Instant::now();
    let clients = (0..10).map(|_| {
        let url = url.clone();
        async move { TestClient::default().get(&url).await }
    });
    for got in within(60, join_all(clients)).await {
        assert!(got.bytes() == &data[..]);
    }
    let secs = started.elapsed().as_secs_f64();
    // One 2 MB transfer under a 2 MB/s WAN cap: about 1 s. Ten would take 10 s.
    assert!(secs >= 0.8, "the upstream cap was not applied ({secs:.2}s)");
    assert!(
        secs < 4.0,
        "clients spent the upstream budget more than once ({secs:.2}s)"
    );
    assert_eq!(origin.requests(), 1);
    assert_eq!(relay.stats().upstream_bytes, 2_000_000);
    relay.shutdown().await;
}

#[tokio::test]
async fn a_throttled_body_is_streamed_not_buffered() {
    let dir = tempfile::tempdir().unwrap();
    let data = content(3_000_000, 57);
    let id = publish(dir.path(), "edge", &data);
    let relay = limited_relay(dir.path(), "[limits]\ndownstream = \"1 MB/s\"\n").await;

    // The first bytes arrive long before the 3 s the whole bundle takes.
    let started = Instant::now();
    let response = TestClient::default()
        .start_get(&bundle_url(&url_of(&relay), &id))
        .await;
    let mut body = response.into_body();
    let first = within(10, body.frame())
        .await
        .expect("a frame")
        .expect("data");
    assert!(!first.into_data().unwrap().is_empty());
    assert!(started.elapsed() < Duration::from_secs(2));
    relay.shutdown().await;
}
