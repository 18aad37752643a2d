//! Agent reports travel up the tree to the monitor without loss, across relay restarts.

mod support;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use patchrelay::bundle::BundleId;
use patchrelay::relay::Relay;
use support::*;
use tokio::net::TcpListener;

/// A stand-in for the monitor: takes report batches and counts each report_id.
struct Receiver {
    addr: SocketAddr,
    seen: Arc<Mutex<HashMap<String, usize>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let counts = seen.clone();
        let task = spawn_server(listener, move |req: Request<Incoming>| {
            let counts = counts.clone();
            async move {
                let body = req.into_body().collect().await.map(|b| b.to_bytes());
                let reports: Vec<serde_json::Value> =
                    serde_json::from_slice(&body.unwrap_or_default()).unwrap_or_default();
                let mut counts = counts.lock().unwrap();
                for r in reports {
                    let id = r["report_id"].as_str().unwrap_or_default().to_string();
                    *counts.entry(id).or_insert(0) += 1;
                }
                Response::builder()
                    .status(StatusCode::ACCEPTED)
                    .body(Full::new(Bytes::from_static(b"{}")))
                    .unwrap()
            }
        });
        Self { addr, seen, task }
    }

    fn distinct(&self) -> HashSet<String> {
        self.seen.lock().unwrap().keys().cloned().collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn report(id: &str) -> serde_json::Value {
    serde_json::json!({
        "report_id": id, "agent": format!("pc-{id}"), "deployment": "2026-12",
        "bundle": BundleId::of(b"kb5031356").to_string(), "outcome": "installed",
        "detail": "", "at": "2026-12-08T07:00:00Z"
    })
}

async fn post(relay_addr: SocketAddr, batch: &[serde_json::Value]) -> (u16, serde_json::Value) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let request = Request::post(format!("http://{relay_addr}/v1/reports"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(batch).unwrap())))
        .unwrap();
    let response = client.request(request).await.unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_reports_reach_the_monitor_across_relay_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    // The tree shares a key, so reports are signed and checked on every relay-to-relay hop.
    write_secret(&dir.path().join("tree.key"), "ab".repeat(32));
    let key = "[beacon]\nkey_file = \"tree.key\"\ninterval = \"1h\"\n";
    let monitor = format!("{key}[monitor]\nurl = \"http://{}\"\n", receiver.addr);
    let root_config = relay_config_with("root", dir.path(), &[], None, &monitor);
    let root = Relay::start(&root_config).await.unwrap();
    let mid_config = relay_config_with("mid", dir.path(), &[url_of(&root)], None, key);
    let mut mid = Some(Relay::start(&mid_config).await.unwrap());
    let mid_addr = mid.as_ref().unwrap().local_addr();
    let leaf_config = relay_config_with(
        "leaf",
        dir.path(),
        &[format!("http://{mid_addr}")],
        None,
        key,
    );
    let mut leaf = Relay::start(&leaf_config).await.unwrap();

    let ids: Vec<String> = (0..1000).map(|i| format!("r{i:04}")).collect();
    for (n, chunk) in ids.chunks(50).enumerate() {
        let batch: Vec<_> = chunk.iter().map(|id| report(id)).collect();
        let (status, json) = post(leaf.local_addr(), &batch).await;
        assert_eq!(status, 202);
        assert_eq!(json["accepted"], 50);
        match n {
            // The mid relay goes away: the leaf keeps its reports spooled.
            5 => mid.take().unwrap().shutdown().await,
            // The leaf restarts with reports still waiting in its spool.
            9 => {
                leaf.shutdown().await;
                leaf = Relay::start(&leaf_config).await.unwrap();
            }
            // The mid relay comes back on the same address.
            12 => {
                let mut again = mid_config.clone();
                again.relay.listen = mid_addr;
                mid = Some(Relay::start(&again).await.unwrap());
            }
            _ => {}
        }
    }

    within(60, async {
        while receiver.distinct().len() < ids.len() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let expected: HashSet<String> = ids.iter().cloned().collect();
    assert_eq!(
        receiver.distinct(),
        expected,
        "every report arrives, nothing else"
    );
    leaf.shutdown().await;
    if let Some(mid) = mid {
        mid.shutdown().await;
    }
    root.shutdown().await;
}

#[tokio::test]
async fn a_batch_with_one_bad_report_is_refused_whole() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let monitor = format!("[monitor]\nurl = \"http://{}\"\n", receiver.addr);
    let relay = Relay::start(&relay_config_with("edge", dir.path(), &[], None, &monitor))
        .await
        .unwrap();

    let mut bad = report("b2");
    bad["outcome"] = "maybe".into();
    let (status, json) = post(relay.local_addr(), &[report("b1"), bad]).await;
    assert_eq!(status, 400);
    assert!(
        json["error"]
            .as_str()
            .unwrap()
            .contains("unknown variant `maybe`"),
        "{json}"
    );

    let (status, _) = post(relay.local_addr(), &[report("good")]).await;
    assert_eq!(status, 202);
    within(20, async {
        while !receiver.distinct().contains("good") {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        !receiver.distinct().contains("b1"),
        "nothing of a refused batch is kept"
    );
    relay.shutdown().await;
}

#[tokio::test]
async fn a_batch_the_receiver_refuses_is_set_aside_not_dropped() {
    let dir = tempfile::tempdir().unwrap();
    // A receiver that refuses every batch's content with 400.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let refusing = listener.local_addr().unwrap();
    let _server = spawn_server(listener, |_req: Request<Incoming>| async {
        Response::builder()
            .status(StatusCode::BAD_REQUEST)
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap()
    });
    let monitor = format!("[monitor]\nurl = \"http://{refusing}\"\n");
    let relay = Relay::start(&relay_config_with("edge", dir.path(), &[], None, &monitor))
        .await
        .unwrap();

    for id in ["x1", "x2"] {
        assert_eq!(post(relay.local_addr(), &[report(id)]).await.0, 202);
    }
    let rejected = dir.path().join("edge-cache/spool/reports/rejected");
    eventually("both batches are set aside", || {
        std::fs::read_dir(&rejected).map(|d| d.count()).unwrap_or(0) == 2
    })
    .await;
    let spool = dir.path().join("edge-cache/spool/reports");
    let waiting = std::fs::read_dir(&spool)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "json")
        })
        .count();
    assert_eq!(waiting, 0);
    relay.shutdown().await;
}
