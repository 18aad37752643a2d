//! Helpers for the end-to-end tests: relays on ephemeral loopback ports, a scriptable mock
//! upstream, and a small HTTP client that reports a cut body as an error.

#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use patchrelay::bundle::BundleId;
use patchrelay::config::Config;
use patchrelay::relay::Relay;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Deterministic pseudo-random content of `len` bytes, different for each `seed`.
pub fn content(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as u8
        })
        .collect()
}

/// How a mock upstream misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behavior {
    /// Serves bundles correctly, whole or from a Range start.
    Normal,
    /// Announces the full length, sends this many bytes of a whole-body answer, then cuts
    /// the connection. Range requests are served correctly.
    DieAfter(usize),
    /// Sends this many bytes of a whole-body answer, then goes silent while keeping the
    /// connection open.
    StallAfter(usize),
    /// Flips one byte in the middle of every body.
    Corrupt,
    /// Answers Range requests with the whole body and 200.
    IgnoreRange,
    /// Refuses everything with 503.
    Unavailable,
}

/// A loopback HTTP server that serves bundles at `/v1/bundles/{id}` and `/b/{id}`, counts
/// requests, and misbehaves on demand.
pub struct MockUpstream {
    pub addr: SocketAddr,
    state: Arc<MockState>,
    task: JoinHandle<()>,
}

struct MockState {
    bundles: Mutex<HashMap<String, Bytes>>,
    behavior: Behavior,
    /// Pause between chunks, to keep a transfer running while clients join it.
    chunk_delay: Duration,
    chunk_size: usize,
    requests: AtomicUsize,
    ranges: Mutex<Vec<Option<String>>>,
}

impl MockUpstream {
    pub async fn start(behavior: Behavior) -> Self {
        Self::start_paced(behavior, 64 * 1024, Duration::ZERO).await
    }

    /// A mock that sends `chunk_size` bytes every `chunk_delay`.
    pub async fn start_paced(behavior: Behavior, chunk_size: usize, chunk_delay: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind mock upstream");
        let addr = listener.local_addr().expect("mock address");
        let state = Arc::new(MockState {
            bundles: Mutex::default(),
            behavior,
            chunk_delay,
            chunk_size,
            requests: AtomicUsize::new(0),
            ranges: Mutex::default(),
        });
        let task = tokio::spawn(accept_loop(listener, state.clone()));
        Self { addr, state, task }
    }

    /// Adds a bundle and returns its id.
    pub fn add(&self, content: &[u8]) -> BundleId {
        let id = BundleId::of(content);
        self.state
            .bundles
            .lock()
            .unwrap()
            .insert(id.to_string(), Bytes::copy_from_slice(content));
        id
    }

    /// Base URL, for `parents`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Origin template URL, for `origin`.
    pub fn origin_template(&self) -> String {
        format!("http://{}/b/{{id}}", self.addr)
    }

    /// Bundle requests received so far (health probes and manifest polls are not counted).
    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// The Range header of each request received, in order.
    pub fn ranges(&self) -> Vec<Option<String>> {
        self.state.ranges.lock().unwrap().clone()
    }

    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<MockState>) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        let service = hyper::service::service_fn(move |req| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(mock_response(&state, req)) }
        });
        connections.spawn(async move {
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

type MockBody = BoxBody<Bytes, std::io::Error>;

fn mock_response(state: &MockState, req: Request<Incoming>) -> Response<MockBody> {
    // Relays probe their parents' /healthz and poll their manifest; a mock is live and has
    // no manifest. Only bundle requests are counted.
    match req.uri().path() {
        "/healthz" => {
            let body = Full::new(Bytes::from_static(b"{}")).map_err(|never| match never {});
            return Response::new(body.boxed());
        }
        "/v1/manifest" => return status_only(StatusCode::NOT_FOUND),
        _ => {}
    }
    state.requests.fetch_add(1, Ordering::SeqCst);
    let range = req
        .headers()
        .get("range")
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    state.ranges.lock().unwrap().push(range.clone());

    let path = req.uri().path();
    let id = path.rsplit('/').next().unwrap_or_default();
    let found = state.bundles.lock().unwrap().get(id).cloned();
    let Some(mut data) = found else {
        return status_only(StatusCode::NOT_FOUND);
    };
    if state.behavior == Behavior::Unavailable {
        return status_only(StatusCode::SERVICE_UNAVAILABLE);
    }
    if state.behavior == Behavior::Corrupt {
        let mut corrupt = data.to_vec();
        let middle = corrupt.len() / 2;
        corrupt[middle] ^= 0xff;
        data = Bytes::from(corrupt);
    }

    let start = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|r| r.parse::<usize>().ok());
    let total = data.len();
    match start {
        Some(start) if state.behavior != Behavior::IgnoreRange => Response::builder()
            .status(StatusCode::PARTIAL_CONTENT)
            .header("content-length", total - start)
            .header(
                "content-range",
                format!("bytes {start}-{}/{total}", total - 1),
            )
            .body(paced_body(state, data.slice(start..), None))
            .unwrap(),
        _ => {
            let cut = match state.behavior {
                Behavior::DieAfter(n) => Some((n, false)),
                Behavior::StallAfter(n) => Some((n, true)),
                _ => None,
            };
            Response::builder()
                .header("content-length", total)
                .body(paced_body(state, data, cut))
                .unwrap()
        }
    }
}

fn status_only(status: StatusCode) -> Response<MockBody> {
    Response::builder()
        .status(status)
        .body(Empty::new().map_err(|never| match never {}).boxed())
        .unwrap()
}

/// A body of `data` in chunks; with `cut`, only the first n bytes, then an error (die) or
/// silence (stall).
fn paced_body(state: &MockState, data: Bytes, cut: Option<(usize, bool)>) -> MockBody {
    let (limit, stall) = match cut {
        Some((n, stall)) => (n.min(data.len()), Some(stall)),
        None => (data.len(), None),
    };
    let (chunk, delay) = (state.chunk_size, state.chunk_delay);
    let chunks = stream::unfold(0usize, move |pos| {
        let data = data.clone();
        async move {
            if pos >= limit {
                return match stall {
                    None => None,
                    Some(true) => {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                        None
                    }
                    Some(false) => {
                        // Let the server flush what was sent, as a process that dies
                        // mid-transfer has put its last bytes on the wire.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Some((
                            Err(std::io::Error::other("killed mid-transfer")),
                            usize::MAX,
                        ))
                    }
                };
            }
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let end = (pos + chunk).min(limit);
            Some((Ok(Frame::data(data.slice(pos..end))), end))
        }
    });
    StreamBody::new(chunks).boxed()
}

/// Builds a relay config for tests: ephemeral port, cache under `dir`, short timeouts.
pub fn relay_config(id: &str, dir: &Path, parents: &[String], origin: Option<&str>) -> Config {
    relay_config_with(id, dir, parents, origin, "")
}

/// [`relay_config`] with more TOML appended (a `[limits]` section, say).
pub fn relay_config_with(
    id: &str,
    dir: &Path,
    parents: &[String],
    origin: Option<&str>,
    extra: &str,
) -> Config {
    let parents: Vec<String> = parents.iter().map(|p| format!("{p:?}")).collect();
    let text = format!(
        r#"
[relay]
id = "{id}"
site = "test"
listen = "127.0.0.1:0"
cache_dir = "{id}-cache"
shutdown_grace = "5s"

[upstream]
parents = [{parents}]
origin = "{origin}"
connect_timeout = "1s"
stall_timeout = "1s"
{extra}
"#,
        parents = parents.join(", "),
        origin = origin.unwrap_or_default(),
    );
    Config::parse(&text, "test.toml", dir).expect("test config is valid")
}

/// Starts a relay from [`relay_config`].
pub async fn start_relay(id: &str, dir: &Path, parents: &[String], origin: Option<&str>) -> Relay {
    let config = relay_config(id, dir, parents, origin);
    Relay::start(&config).await.expect("relay starts")
}

/// A relay `leaf` whose parents are mock upstreams, one per behavior in that order, each
/// holding `data`.
pub async fn leaf_with_parents(
    dir: &Path,
    data: &[u8],
    behaviors: &[Behavior],
) -> (Relay, Vec<MockUpstream>, BundleId) {
    let mut parents = Vec::new();
    for behavior in behaviors {
        parents.push(MockUpstream::start(*behavior).await);
    }
    let id = BundleId::of(data);
    for parent in &parents {
        parent.add(data);
    }
    let urls: Vec<String> = parents.iter().map(MockUpstream::base_url).collect();
    let leaf = start_relay("leaf", dir, &urls, None).await;
    (leaf, parents, id)
}

/// Base URL of a running relay.
pub fn url_of(relay: &Relay) -> String {
    format!("http://{}", relay.local_addr())
}

/// What a test client got.
#[derive(Debug)]
pub struct Fetched {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// The body, or the error that cut it short.
    pub body: Result<Vec<u8>, String>,
}

impl Fetched {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn bytes(&self) -> &[u8] {
        self.body
            .as_deref()
            .unwrap_or_else(|e| panic!("body was cut: {e}"))
    }

    /// The body parsed as a JSON error document.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(self.bytes()).expect("body is JSON")
    }
}

/// A small HTTP client for tests.
#[derive(Clone)]
pub struct TestClient {
    client: Client<HttpConnector, Empty<Bytes>>,
}

impl Default for TestClient {
    fn default() -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }
}

impl TestClient {
    /// A client whose connections come from `ip` (any 127.x.y.z address works on Linux),
    /// to act as a different agent.
    pub fn from_ip(ip: [u8; 4]) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_local_address(Some(std::net::IpAddr::from(ip)));
        Self {
            client: Client::builder(TokioExecutor::new()).build(connector),
        }
    }

    /// Sends a GET and returns the response with its body unread.
    pub async fn start_get(&self, url: &str) -> Response<Incoming> {
        let request = Request::get(url)
            .body(Empty::new())
            .expect("valid test request");
        self.client.request(request).await.expect("relay answers")
    }
}

impl TestClient {
    pub async fn get(&self, url: &str) -> Fetched {
        self.send("GET", url, &[]).await
    }

    pub async fn send(&self, method: &str, url: &str, headers: &[(&str, &str)]) -> Fetched {
        self.try_send(method, url, headers)
            .await
            .expect("relay answers")
    }

    /// Like [`TestClient::send`], but a connection cut before the response head is an
    /// `Err` rather than a panic (a relay aborts a body that fails before its first byte).
    pub async fn try_send(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
    ) -> Result<Fetched, String> {
        let mut request = Request::builder().method(method).uri(url);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Empty::new()).expect("valid test request");
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| format!("{e:?}"))?;
        let (parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .map(|collected| collected.to_bytes().to_vec())
            .map_err(|e| format!("{e:?}"));
        Ok(Fetched {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }
}

/// Puts `content` into the cache of relay `id` under `dir` (as `publish` does) and returns
/// its id.
pub fn publish(dir: &Path, id: &str, content: &[u8]) -> BundleId {
    let cache = patchrelay::cache::Cache::open(&dir.join(format!("{id}-cache"))).expect("cache");
    let file = dir.join(format!("{id}-upload.bin"));
    std::fs::write(&file, content).expect("write upload");
    let published =
        patchrelay::publish::publish_file(&cache, &file, &mut |_| {}).expect("publish works");
    published.id
}

/// A URL for bundle `id` at `base`.
pub fn bundle_url(base: &str, id: &BundleId) -> String {
    format!("{base}/v1/bundles/{id}")
}

/// Runs `f` with a timeout so a hung relay fails the test instead of hanging CI.
pub async fn within<F: std::future::Future>(seconds: u64, f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(seconds), f)
        .await
        .expect("test step timed out")
}

/// Files left in a relay's temporary directory.
pub fn temp_files(dir: &Path, id: &str) -> usize {
    std::fs::read_dir(dir.join(format!("{id}-cache/tmp")))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Whether a relay has bundle `bundle` in its cache.
pub fn cached(dir: &Path, id: &str, bundle: &BundleId) -> bool {
    let hex = bundle.to_string();
    dir.join(format!("{id}-cache/objects/{}/{hex}", &hex[..2]))
        .is_file()
}

/// A server that accepts connections and never answers.
pub struct SilentUpstream {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl SilentUpstream {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind silent upstream");
        let addr = listener.local_addr().expect("silent address");
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        Self { addr, task }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for SilentUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A loopback URL where nothing listens.
pub async fn closed_port_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    drop(listener);
    format!("http://{addr}")
}

/// Waits (up to 10 s) until `condition` holds; fills commit to the cache just after their
/// clients are released, so cache checks wait for it.
pub async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Serves `handler` on `listener` (one task per connection) until the returned task is
/// aborted: for small stand-in receivers.
pub fn spawn_server<F, Fut>(listener: TcpListener, handler: F) -> JoinHandle<()>
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<http_body_util::Full<Bytes>>> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let handler = handler.clone();
            let service = hyper::service::service_fn(move |req| {
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(handler(req).await) }
            });
            tokio::spawn(async move {
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

/// Writes a secret (token or key file) readable by its owner only, as relays require.
pub fn write_secret(path: &Path, contents: impl AsRef<[u8]>) {
    use std::os::unix::fs::PermissionsExt;

    std::fs::write(path, contents).expect("write secret");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}
