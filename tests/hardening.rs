//! Hostile and greedy clients: connection limits, slow headers, huge headers, and more
//! cold bundles at once than the relay will fetch. Each gets a clear answer (or is cut
//! off) while other clients keep being served.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use patchrelay::relay::Relay;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// A connection to `addr` from the local address `ip` (any 127.x.y.z works on Linux).
async fn connect_from(ip: [u8; 4], addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind((std::net::Ipv4Addr::from(ip), 0).into())
        .unwrap();
    socket.connect(addr).await.unwrap()
}

/// Sends `request` and reads what the server sends until it closes (at most 5 s).
async fn exchange(stream: &mut TcpStream, request: &[u8]) -> String {
    stream.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

async fn relay_with(dir: &std::path::Path, origin: &MockUpstream, server: &str) -> Relay {
    let config = relay_config_with(
        "edge",
        dir,
        &[],
        Some(&origin.origin_template()),
        &format!("[server]\n{server}"),
    );
    Relay::start(&config).await.expect("relay starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limits_get_503_and_other_addresses_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let origin = MockUpstream::start(Behavior::Normal).await;
    let id = origin.add(&content(10_000, 81));
    let limits = "max_connections = 4\nmax_connections_per_client = 2\n";
    let relay = relay_with(dir.path(), &origin, limits).await;
    let addr = relay.local_addr();

    // Two idle connections from 127.0.0.1 are allowed; a third is refused at once.
    let _idle = [
        connect_from([127, 0, 0, 1], addr).await,
        connect_from([127, 0, 0, 1], addr).await,
    ];
    let mut third = connect_from([127, 0, 0, 1], addr).await;
    let answer = exchange(&mut third, b"GET /healthz HTTP/1.1\r\nhost: relay\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("retry-after: 5"), "{answer}");
    assert!(
        answer.contains("too many connections from this address"),
        "{answer}"
    );
    assert!(answer.contains("\"relay\":\"edge\""), "{answer}");

    // Another address is still served, whole bundles included.
    let mut other = connect_from([127, 0, 0, 2], addr).await;
    let request =
        format!("GET /v1/bundles/{id} HTTP/1.1\r\nhost: relay\r\nconnection: close\r\n\r\n");
    let answer = exchange(&mut other, request.as_bytes()).await;
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "{}",
        &answer[..answer.len().min(200)]
    );

    // Once the relay's total is reached, every address is refused. The connections that
    // fill it stay open (the one above may still be counted for a moment after closing).
    let mut kept = connect_from([127, 0, 0, 2], addr).await;
    kept.write_all(b"GET /healthz HTTP/1.1\r\nhost: relay\r\n\r\n")
        .await
        .unwrap();
    assert!(read_response(&mut kept).await.starts_with("HTTP/1.1 200"));
    let mut admitted = None;
    for _ in 0..100 {
        let mut more = connect_from([127, 0, 0, 3], addr).await;
        more.write_all(b"GET /healthz HTTP/1.1\r\nhost: relay\r\n\r\n")
            .await
            .unwrap();
        if read_response(&mut more).await.starts_with("HTTP/1.1 200") {
            admitted = Some(more);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _more = admitted.expect("the fourth connection is admitted once the closed one is gone");
    let mut late = connect_from([127, 0, 0, 4], addr).await;
    let answer = exchange(&mut late, b"GET /healthz HTTP/1.1\r\nhost: relay\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(
        answer.contains("too many connections to this relay"),
        "{answer}"
    );
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_client_is_cut_off_while_downloads_continue() {
    let dir = tempfile::tempdir().unwrap();
    let origin = MockUpstream::start(Behavior::Normal).await;
    let data = content(2_000_000, 82);
    let id = origin.add(&data);
    let relay = relay_with(dir.path(), &origin, "header_timeout = \"500ms\"\n").await;
    let addr = relay.local_addr();

    // Half a request head, then silence.
    let started = Instant::now();
    let mut slow = connect_from([127, 0, 0, 5], addr).await;
    let cut = tokio::spawn(async move {
        exchange(&mut slow, b"GET /v1/bundles/").await;
        started.elapsed()
    });

    // A real client meanwhile gets its bundle, whole.
    let got = TestClient::default()
        .get(&bundle_url(&url_of(&relay), &id))
        .await;
    assert_eq!(got.status, 200);
    assert_eq!(got.bytes(), &data[..]);

    let after = within(10, cut).await.unwrap();
    assert!(
        after >= Duration::from_millis(400) && after < Duration::from_secs(4),
        "the slow client was cut after {after:?}"
    );
    relay.shutdown().await;
}

/// Reads one response with an empty body (`/healthz` sends a small JSON one: read up to
/// its end) without waiting for the connection to close.
async fn read_response(stream: &mut TcpStream) -> String {
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&answer).contains('}') {
        let n = within(5, stream.read(&mut buf)).await.unwrap();
        assert!(
            n > 0,
            "closed mid-response: {}",
            String::from_utf8_lossy(&answer)
        );
        answer.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let origin = MockUpstream::start(Behavior::Normal).await;
    let server = "header_timeout = \"30s\"\nidle_timeout = \"500ms\"\n";
    let relay = relay_with(dir.path(), &origin, server).await;

    // One answered request on a keep-alive connection, then nothing more from the client.
    let mut idle = connect_from([127, 0, 0, 6], relay.local_addr()).await;
    idle.write_all(b"GET /healthz HTTP/1.1\r\nhost: relay\r\n\r\n")
        .await
        .unwrap();
    let answer = read_response(&mut idle).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let answered = Instant::now();

    // The idle timeout closes it, long before the header timeout would.
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), idle.read_to_end(&mut rest)).await;
    let closed_after = answered.elapsed();
    assert!(
        read.is_ok(),
        "the relay kept an idle connection open for 20 s"
    );
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    assert!(
        closed_after >= Duration::from_millis(400),
        "closed after {closed_after:?}, before the idle timeout"
    );
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_outlives_the_header_timeout_and_the_next_request_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let origin = MockUpstream::start(Behavior::Normal).await;
    let server = "header_timeout = \"300ms\"\nidle_timeout = \"30s\"\n";
    let relay = relay_with(dir.path(), &origin, server).await;

    let mut conn = connect_from([127, 0, 0, 7], relay.local_addr()).await;
    let request = b"GET /healthz HTTP/1.1\r\nhost: relay\r\n\r\n";
    conn.write_all(request).await.unwrap();
    assert!(read_response(&mut conn).await.starts_with("HTTP/1.1 200"));

    // Idle for several header timeouts: a keep-alive client between requests is not slow.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    conn.write_all(request).await.unwrap();
    let again = read_response(&mut conn).await;
    assert!(again.starts_with("HTTP/1.1 200"), "{again}");

    // But the next request head, once begun, must still arrive within the header timeout.
    let started = Instant::now();
    conn.write_all(b"GET /heal").await.unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), conn.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "a half-sent head was kept for 20 s");
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "cut after {:?}",
        started.elapsed()
    );
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enormous_header_gets_431() {
    let dir = tempfile::tempdir().unwrap();
    let origin = MockUpstream::start(Behavior::Normal).await;
    let relay = relay_with(dir.path(), &origin, "max_header_size = \"4 KiB\"\n").await;
    let mut stream = connect_from([127, 0, 0, 6], relay.local_addr()).await;
    let request = format!(
        "GET /healthz HTTP/1.1\r\nhost: relay\r\nx-junk: {}\r\n\r\n",
        "a".repeat(8 * 1024)
    );
    let answer = exchange(&mut stream, request.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");

    // A normal request still works.
    let got = TestClient::default()
        .get(&format!("{}/healthz", url_of(&relay)))
        .await;
    assert_eq!(got.status, 200);
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_cold_bundles_than_max_fills_get_503_while_the_running_fill_completes() {
    let dir = tempfile::tempdir().unwrap();
    let origin = MockUpstream::start_paced(Behavior::Normal, 4096, Duration::from_millis(10)).await;
    let first = content(200_000, 83);
    let first_id = origin.add(&first);
    let second_id = origin.add(&content(1000, 84));
    let relay = relay_with(dir.path(), &origin, "max_fills = 1\n").await;
    let base = url_of(&relay);

    let url = bundle_url(&base, &first_id);
    let slow = tokio::spawn(async move { TestClient::default().get(&url).await });
    eventually("the first fill runs", || relay.running_fills() == 1).await;

    let refused = TestClient::default()
        .get(&bundle_url(&base, &second_id))
        .await;
    assert_eq!(refused.status, 503);
    assert_eq!(refused.header("retry-after"), Some("5"));
    let error = refused.json()["error"].as_str().unwrap().to_string();
    assert!(error.contains("max_fills"), "{error}");

    let got = within(20, slow).await.unwrap();
    assert_eq!(got.status, 200);
    assert_eq!(got.bytes(), &first[..]);
    // With the slot free again, the second bundle is fetched.
    eventually("the first fill ends", || relay.running_fills() == 0).await;
    let second = TestClient::default()
        .get(&bundle_url(&base, &second_id))
        .await;
    assert_eq!(second.status, 200);
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_report_batches_are_400_oversized_ones_413_and_nothing_is_spooled() {
    let dir = tempfile::tempdir().unwrap();
    let origin = MockUpstream::start(Behavior::Normal).await;
    let limits = "max_report_body = \"1 MiB\"\nmax_report_batch = 2\n";
    let relay = relay_with(dir.path(), &origin, limits).await;
    let addr = relay.local_addr();
    let post = |body: Vec<u8>| async move {
        let mut stream = connect_from([127, 0, 0, 7], addr).await;
        let head = format!(
            "POST /v1/reports HTTP/1.1\r\nhost: relay\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        );
        let mut request = head.into_bytes();
        request.extend_from_slice(&body);
        exchange(&mut stream, &request).await
    };

    let answer = post(b"[{\"report_id\": ".to_vec()).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("\"error\""), "{answer}");

    // A body declared larger than the limit is refused before a byte of it is read (only
    // the head is sent, so the refusal cannot race the client's writes).
    let mut stream = connect_from([127, 0, 0, 7], addr).await;
    let head = "POST /v1/reports HTTP/1.1\r\nhost: relay\r\ncontent-type: application/json\r\n\
                content-length: 2097152\r\n\r\n";
    let answer = exchange(&mut stream, head.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        answer.contains("the reports body exceeds the limit of 1 MiB"),
        "{answer}"
    );

    let report = |id: &str| {
        serde_json::json!({
            "report_id": id, "agent": "pc-1", "deployment": "d",
            "bundle": patchrelay::bundle::BundleId::of(b"kb").to_string(),
            "outcome": "installed", "detail": "", "at": "2026-12-08T07:00:00Z"
        })
    };
    let three = serde_json::to_vec(&vec![report("a"), report("b"), report("c")]).unwrap();
    let answer = post(three).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        answer.contains("the reports batch exceeds the limit of 2 reports"),
        "{answer}"
    );

    // Nothing was spooled (the spool exists, and is empty).
    let spool = dir.path().join("edge-cache").join("spool").join("reports");
    assert!(spool.is_dir(), "{}", spool.display());
    assert_eq!(std::fs::read_dir(&spool).unwrap().count(), 0);
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_body_that_stalls_gets_408_while_other_clients_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let origin = MockUpstream::start(Behavior::Normal).await;
    let data = content(100_000, 83);
    let id = origin.add(&data);
    let relay = relay_with(dir.path(), &origin, "body_timeout = \"500ms\"\n").await;
    let addr = relay.local_addr();

    // A whole head, then a few bytes of a 4,000-byte body, then silence.
    let started = Instant::now();
    let mut slow = connect_from([127, 0, 0, 8], addr).await;
    let cut = tokio::spawn(async move {
        let request = "POST /v1/reports HTTP/1.1\r\nhost: relay\r\n\
                       content-type: application/json\r\ncontent-length: 4000\r\n\r\n[{\"rep";
        let answer = exchange(&mut slow, request.as_bytes()).await;
        (answer, started.elapsed())
    });

    let got = TestClient::default()
        .get(&bundle_url(&url_of(&relay), &id))
        .await;
    assert_eq!(got.status, 200);
    assert_eq!(got.bytes(), &data[..]);

    let (answer, after) = within(10, cut).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("the reports body stalled"), "{answer}");
    assert!(answer.contains("connection: close"), "{answer}");
    assert!(
        after >= Duration::from_millis(400) && after < Duration::from_secs(4),
        "cut after {after:?}"
    );
    let spool = dir.path().join("edge-cache").join("spool").join("reports");
    assert_eq!(std::fs::read_dir(&spool).unwrap().count(), 0);
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_after_the_send_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let origin = MockUpstream::start(Behavior::Normal).await;
    // Far more than the loopback socket buffers hold.
    let id = origin.add(&content(48 << 20, 84));
    let server = "send_timeout = \"1s\"\nmax_connections = 1\n";
    let relay = relay_with(dir.path(), &origin, server).await;
    let addr = relay.local_addr();

    // Asks for the bundle, then never reads: the relay's writes stop being taken.
    let mut stuck = connect_from([127, 0, 0, 9], addr).await;
    let request = format!("GET /v1/bundles/{id} HTTP/1.1\r\nhost: relay\r\n\r\n");
    stuck.write_all(request.as_bytes()).await.unwrap();
    let started = Instant::now();

    // It holds the relay's one connection, until the send timeout frees it.
    let healthz = b"GET /healthz HTTP/1.1\r\nhost: relay\r\nconnection: close\r\n\r\n";
    let mut first = connect_from([127, 0, 0, 10], addr).await;
    let refused = exchange(&mut first, healthz).await;
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    let mut served_after = None;
    while started.elapsed() < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut next = connect_from([127, 0, 0, 10], addr).await;
        if exchange(&mut next, healthz)
            .await
            .starts_with("HTTP/1.1 200")
        {
            served_after = Some(started.elapsed());
            break;
        }
    }
    let after = served_after.expect("the stuck client was never cut");
    assert!(after >= Duration::from_millis(900), "cut after {after:?}");
    drop(stuck);
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_body_trickled_a_byte_at_a_time_gets_408_at_the_minimum_rate() {
    let dir = tempfile::tempdir().unwrap();
    let origin = MockUpstream::start(Behavior::Normal).await;
    let relay = relay_with(dir.path(), &origin, "body_timeout = \"500ms\"\n").await;

    // 1,000 bytes declared: allowed 0.5 s plus 1 s at 1 kB/s, but one byte comes every
    // 0.3 s, inside the stall timeout each time.
    let stream = connect_from([127, 0, 0, 11], relay.local_addr()).await;
    let (mut read, mut write) = stream.into_split();
    let head = "POST /v1/reports HTTP/1.1\r\nhost: relay\r\ncontent-type: application/json\r\n\
                content-length: 1000\r\n\r\n";
    write.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let trickle = tokio::spawn(async move {
        for _ in 0..100 {
            if write.write_all(b" ").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    let mut answer = Vec::new();
    let _ = within(10, read.read_to_end(&mut answer)).await;
    let after = started.elapsed();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        after >= Duration::from_millis(1200) && after < Duration::from_secs(5),
        "cut after {after:?}"
    );
    trickle.abort();
    relay.shutdown().await;
}
