//! Parents that lie: a wrong Content-Length (short or long), a wrong Content-Range on a
//! resume, a redirect loop, an endless chunked body. The relay never caches or serves
//! bytes that do not hash to the id, and a good parent behind the hostile one delivers.

mod support;

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use patchrelay::bundle::BundleId;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A parent whose every answer is `answer(request, bundle bytes)`.
async fn lying_parent<F>(data: Vec<u8>, answer: F) -> String
where
    F: Fn(&Request<Incoming>, &Bytes) -> Response<Full<Bytes>> + Send + Sync + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (data, answer) = (Bytes::from(data), Arc::new(answer));
    spawn_server(listener, move |request: Request<Incoming>| {
        let (data, answer) = (data.clone(), answer.clone());
        async move { answer(&request, &data) }
    });
    url
}

fn response(
    status: StatusCode,
    headers: &[(&'static str, String)],
    body: Bytes,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    for (name, value) in headers {
        response
            .headers_mut()
            .insert(*name, value.parse().expect("valid header"));
    }
    response
}

/// Fetches `id` from a relay whose parents are `parents` (in order); returns what the
/// client got and whether the relay cached the bundle.
async fn fetch_through(parents: &[String], id: &BundleId) -> (Result<Fetched, String>, bool) {
    let dir = tempfile::tempdir().unwrap();
    let leaf = start_relay("leaf", dir.path(), parents, None).await;
    let got = within(
        30,
        TestClient::default().try_send("GET", &bundle_url(&url_of(&leaf), id), &[]),
    )
    .await;
    // Let a commit that follows the release of the client land.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let cached = cached(dir.path(), "leaf", id);
    assert_eq!(
        temp_files(dir.path(), "leaf"),
        0,
        "no partial file is left behind"
    );
    leaf.shutdown().await;
    (got, cached)
}

fn assert_whole(got: &Result<Fetched, String>, data: &[u8]) {
    let got = got.as_ref().expect("an answer");
    assert_eq!(got.status, 200);
    assert_eq!(got.bytes(), data, "the client got exactly the bundle");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_content_length_longer_than_the_body_is_a_failed_parent() {
    let data = content(300_000, 91);
    let id = BundleId::of(&data);
    let liar = lying_parent(data.clone(), |_, data| {
        // Announces 1000 bytes more than it sends, then hangs up.
        response(
            StatusCode::OK,
            &[("content-length", (data.len() + 1000).to_string())],
            data.clone(),
        )
    })
    .await;
    let good = MockUpstream::start(Behavior::Normal).await;
    good.add(&data);

    let (got, cached) = fetch_through(&[liar, good.base_url()], &id).await;
    assert_whole(&got, &data);
    assert!(cached);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_content_length_shorter_than_the_bundle_never_reaches_a_client_or_the_cache() {
    let data = content(300_000, 92);
    let id = BundleId::of(&data);
    let liar = lying_parent(data.clone(), |_, data| {
        let short = data.slice(..data.len() - 1000);
        response(StatusCode::OK, &[], short)
    })
    .await;

    let (got, cached) = fetch_through(std::slice::from_ref(&liar), &id).await;
    assert!(!cached);
    // Its last byte is held until verification, which fails: the client never has a
    // complete response.
    if let Ok(fetched) = &got {
        assert!(
            fetched.status != StatusCode::OK || fetched.body.is_err(),
            "a short bundle was delivered as complete"
        );
    }

    let good = MockUpstream::start(Behavior::Normal).await;
    good.add(&data);
    let (_, cached) = fetch_through(&[liar, good.base_url()], &id).await;
    assert!(
        cached,
        "after the liar's copy failed verification, the good parent's is cached"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_answered_with_the_wrong_content_range_is_refused() {
    let data = content(400_000, 93);
    let id = BundleId::of(&data);
    let dying = MockUpstream::start(Behavior::DieAfter(100_000)).await;
    dying.add(&data);
    // Answers any Range with bytes from offset 0 but claims the asked offset... wrongly.
    let liar = lying_parent(data.clone(), |request, data| {
        if request.headers().contains_key("range") {
            response(
                StatusCode::PARTIAL_CONTENT,
                &[(
                    "content-range",
                    format!("bytes 0-{}/{}", data.len() - 1, data.len()),
                )],
                data.clone(),
            )
        } else {
            response(StatusCode::OK, &[], data.clone())
        }
    })
    .await;
    let good = MockUpstream::start(Behavior::Normal).await;
    good.add(&data);

    let (got, cached) = fetch_through(&[dying.base_url(), liar, good.base_url()], &id).await;
    assert_whole(&got, &data);
    assert!(cached);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_loop_is_not_followed() {
    let data = content(50_000, 94);
    let id = BundleId::of(&data);
    let looping = lying_parent(data.clone(), |request, _| {
        response(
            StatusCode::FOUND,
            &[(
                "location",
                format!("http://127.0.0.1:9{}", request.uri().path()),
            )],
            Bytes::new(),
        )
    })
    .await;
    let (got, cached) = fetch_through(std::slice::from_ref(&looping), &id).await;
    let got = got.expect("an answer");
    assert_eq!(got.status, 502, "a redirect is a failed parent");
    assert!(!cached);

    let good = MockUpstream::start(Behavior::Normal).await;
    good.add(&data);
    let (got, cached) = fetch_through(&[looping, good.base_url()], &id).await;
    assert_whole(&got, &data);
    assert!(cached);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_chunked_body_is_a_failed_parent() {
    let data = content(50_000, 95);
    let id = BundleId::of(&data);
    // A raw server: chunked, no length, never ends.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endless = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = [0u8; 4096];
                let _ = stream.read(&mut head).await;
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                    .await;
                let chunk = format!("{:x}\r\n{}\r\n", 4096, "x".repeat(4096));
                while stream.write_all(chunk.as_bytes()).await.is_ok() {}
            });
        }
    });
    let good = MockUpstream::start(Behavior::Normal).await;
    good.add(&data);

    let (got, cached) = fetch_through(&[endless, good.base_url()], &id).await;
    assert_whole(&got, &data);
    assert!(cached);
}
