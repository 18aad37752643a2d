//! Signed health beacons: sent up, checked by the receiving relay.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use patchrelay::relay::Relay;
use patchrelay::reports::sign;
use support::*;
use tokio::net::TcpListener;

const KEY: [u8; 32] = [7u8; 32];

fn write_key(dir: &std::path::Path) {
    write_secret(
        &dir.join("beacon.key"),
        blake3::Hash::from(KEY).to_hex().as_str(),
    );
}

/// Every (signature, body) POSTed to a capture server.
type Captured = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// Captures every (signature, body) POSTed to it.
async fn capture() -> (SocketAddr, Captured) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Captured = Arc::default();
    let store = seen.clone();
    spawn_server(listener, move |req: Request<Incoming>| {
        let store = store.clone();
        async move {
            let signature = req
                .headers()
                .get("x-patchrelay-signature")
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default();
            let body = req.into_body().collect().await.unwrap().to_bytes().to_vec();
            store.lock().unwrap().push((signature, body));
            Response::new(Full::new(Bytes::from_static(b"{}")))
        }
    });
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beacons_arrive_signed_with_growing_sequence_and_activity() {
    let dir = tempfile::tempdir().unwrap();
    write_key(dir.path());
    let (monitor, seen) = capture().await;
    let origin = MockUpstream::start(Behavior::Normal).await;
    let data = content(20_000, 110);
    let id = origin.add(&data);
    let extra = format!(
        "[beacon]\ninterval = \"200ms\"\nkey_file = \"beacon.key\"\n\
         [monitor]\nurl = \"http://{monitor}\"\n"
    );
    let config = relay_config_with(
        "edge",
        dir.path(),
        &[],
        Some(&origin.origin_template()),
        &extra,
    );
    let relay = Relay::start(&config).await.unwrap();
    let got = TestClient::default()
        .get(&bundle_url(&url_of(&relay), &id))
        .await;
    assert_eq!(got.bytes(), &data[..]);

    let find = || {
        let seen = seen.lock().unwrap();
        seen.iter().find_map(|(sig, body)| {
            let beacon: serde_json::Value = serde_json::from_slice(body).ok()?;
            let downloads = &beacon["since_last"]["downloads"][id.to_string()];
            (downloads["completed"] == 1).then(|| (sig.clone(), body.clone(), beacon))
        })
    };
    within(20, async {
        while find().is_none() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let (signature, body, beacon) = find().unwrap();
    assert_eq!(signature, sign(&KEY, &body), "signed with the shared key");
    assert_eq!(beacon["relay"], "edge");
    assert_eq!(
        beacon["url"],
        url_of(&relay),
        "advertised URL defaults to the listen address"
    );
    assert_eq!(beacon["site"], "test");
    assert_eq!(beacon["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(beacon["since_last"]["agents"], 1);
    // The response was counted when its head went out, maybe in an earlier beacon.
    let ok_responses: u64 = seen
        .lock()
        .unwrap()
        .iter()
        .map(|(_, b)| serde_json::from_slice::<serde_json::Value>(b).unwrap())
        .map(|b| b["since_last"]["requests"]["2xx"].as_u64().unwrap_or(0))
        .sum();
    assert!(ok_responses >= 1);
    assert_eq!(beacon["ready"], true);

    let seqs: Vec<u64> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|(_, b)| {
            serde_json::from_slice::<serde_json::Value>(b).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "sequence grows: {seqs:?}"
    );
    relay.shutdown().await;
}

async fn post_beacon(relay: &Relay, body: &[u8], signature: Option<&str>) -> u16 {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let mut request = Request::post(format!("{}/v1/beacons", url_of(relay)));
    if let Some(signature) = signature {
        request = request.header("x-patchrelay-signature", signature);
    }
    let request = request.body(Full::new(Bytes::from(body.to_vec()))).unwrap();
    client.request(request).await.unwrap().status().as_u16()
}

fn beacon(seq: u64, sent_at: chrono::DateTime<Utc>) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "relay": "child", "site": "lyon", "url": "http://127.0.0.1:1", "version": "0.1.0",
        "seq": seq, "sent_at": sent_at, "uptime_seconds": 5, "parents": [],
        "parent_in_use": null, "cache_bytes": 0, "cache_bundles": 0, "upstream": [],
        "ready": true, "failed": [], "degraded": [],
        "since_last": {"requests": {}, "bytes_out": 0, "agents": 0, "downloads": {},
                       "integrity_failures": 0}
    }))
    .unwrap()
}

#[tokio::test]
async fn a_relay_refuses_unsigned_tampered_replayed_and_skewed_beacons_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    write_key(dir.path());
    let extra = "[beacon]\nkey_file = \"beacon.key\"\nmax_skew = \"1m\"\n";
    // This relay has been receiving beacons for half an hour (its sequence log says since
    // when it remembers them).
    let spool = dir.path().join("parent-cache").join("spool");
    std::fs::create_dir_all(&spool).unwrap();
    let since = Utc::now() - chrono::Duration::minutes(30);
    let log = format!("#since {}\n", since.timestamp_millis());
    std::fs::write(spool.join("beacon-seqs"), log).unwrap();
    let relay = Relay::start(&relay_config_with("parent", dir.path(), &[], None, extra))
        .await
        .unwrap();

    let good = beacon(5, Utc::now());
    assert_eq!(post_beacon(&relay, &good, None).await, 401, "unsigned");
    let mut tampered = good.clone();
    let at = tampered.len() / 2;
    tampered[at] ^= 1;
    assert_eq!(
        post_beacon(&relay, &tampered, Some(&sign(&KEY, &good))).await,
        403,
        "tampered"
    );
    assert_eq!(
        post_beacon(&relay, &good, Some(&sign(&[1u8; 32], &good))).await,
        403,
        "wrong key"
    );

    assert_eq!(
        post_beacon(&relay, &good, Some(&sign(&KEY, &good))).await,
        202
    );
    assert_eq!(
        post_beacon(&relay, &good, Some(&sign(&KEY, &good))).await,
        409,
        "replayed"
    );
    let older = beacon(4, Utc::now());
    assert_eq!(
        post_beacon(&relay, &older, Some(&sign(&KEY, &older))).await,
        409,
        "old sequence"
    );
    let ahead = beacon(6, Utc::now() + chrono::Duration::minutes(10));
    assert_eq!(
        post_beacon(&relay, &ahead, Some(&sign(&KEY, &ahead))).await,
        400,
        "clock skew"
    );
    // Ten minutes late, but with a new sequence: it waited in a queue below while this
    // relay (or the path to it) was away, so it is taken and passed on.
    let late = beacon(6, Utc::now() - chrono::Duration::minutes(10));
    assert_eq!(
        post_beacon(&relay, &late, Some(&sign(&KEY, &late))).await,
        202,
        "late"
    );
    // One sent before the relay's memory of sequences began could be a replay.
    let ancient = beacon(100, Utc::now() - chrono::Duration::hours(2));
    assert_eq!(
        post_beacon(&relay, &ancient, Some(&sign(&KEY, &ancient))).await,
        409,
        "older than the sequence memory"
    );
    let next = beacon(7, Utc::now());
    assert_eq!(
        post_beacon(&relay, &next, Some(&sign(&KEY, &next))).await,
        202
    );
    relay.shutdown().await;

    // Restarted, the relay still knows the last sequence: a replay is refused.
    let relay = Relay::start(&relay_config_with("parent", dir.path(), &[], None, extra))
        .await
        .unwrap();
    assert_eq!(
        post_beacon(&relay, &next, Some(&sign(&KEY, &next))).await,
        409,
        "replayed after a restart"
    );
    let after = beacon(8, Utc::now());
    assert_eq!(
        post_beacon(&relay, &after, Some(&sign(&KEY, &after))).await,
        202
    );
    relay.shutdown().await;
}

#[tokio::test]
async fn reports_from_a_relay_must_be_signed_when_the_tree_has_a_key() {
    let dir = tempfile::tempdir().unwrap();
    write_key(dir.path());
    let extra = "[beacon]\nkey_file = \"beacon.key\"\n";
    let relay = Relay::start(&relay_config_with("parent", dir.path(), &[], None, extra))
        .await
        .unwrap();
    let batch = serde_json::to_vec(&serde_json::json!([{
        "report_id": "r1", "agent": "pc-1", "deployment": "d",
        "bundle": patchrelay::bundle::BundleId::of(b"kb").to_string(),
        "outcome": "failed", "detail": "disk full", "at": "2026-12-08T07:00:00Z"
    }]))
    .unwrap();
    let send = |headers: Vec<(&'static str, String)>| {
        let (url, batch) = (format!("{}/v1/reports", url_of(&relay)), batch.clone());
        async move {
            let client =
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .build_http::<Full<Bytes>>();
            let mut request = Request::post(url);
            for (name, value) in headers {
                request = request.header(name, value);
            }
            let request = request.body(Full::new(Bytes::from(batch))).unwrap();
            client.request(request).await.unwrap().status().as_u16()
        }
    };

    assert_eq!(send(vec![]).await, 202, "agents post unsigned");
    let relay_header = ("x-patchrelay-relay", "child".to_string());
    assert_eq!(
        send(vec![relay_header.clone()]).await,
        401,
        "a relay must sign"
    );
    let forged = ("x-patchrelay-signature", sign(&[2u8; 32], &batch));
    assert_eq!(send(vec![relay_header.clone(), forged]).await, 403);
    let signed = ("x-patchrelay-signature", sign(&KEY, &batch));
    assert_eq!(send(vec![relay_header, signed]).await, 202);
    relay.shutdown().await;
}
