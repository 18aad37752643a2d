//! Upstream: the parents and origin a relay fetches from, and the HTTP client that asks.
//!
//! A fill asks [`Upstream::sources`] for the order to try, and [`Upstream::open`] for a
//! response positioned at a byte offset. `open` checks everything about the answer that
//! can be checked before the body (status, length, Content-Range), so a parent that
//! answers a Range request with a whole body, or with a different length than before, is
//! a failed parent rather than bytes to splice into a bundle.

use std::collections::HashMap;
use std::error::Error as _;
use std::io;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_RANGE, RANGE, RETRY_AFTER, USER_AGENT};
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::bundle::BundleId;
use crate::config::{BaseUrl, OriginTemplate, UpstreamConfig};
use crate::manifest::Manifest;
use crate::server::RELAY_HEADER;

/// How long an idle connection to a parent is kept for reuse: below the parent's default
/// `[server] idle_timeout` (30 s), so this side closes first and never sends a request on a
/// connection the parent is closing.
const POOL_IDLE: Duration = Duration::from_secs(20);

/// Largest JSON document (a manifest) accepted from a parent.
const MAX_JSON_BODY: usize = 4 * 1024 * 1024;

/// How long a source that delivered corrupt bytes for a bundle goes to the back of the
/// line for that bundle.
const INTEGRITY_PENALTY: Duration = Duration::from_secs(600);

/// One place a bundle can be fetched from.
#[derive(Debug, Clone)]
pub struct Source {
    /// Position in the configured order (parents first, then the origin).
    pub index: usize,
    kind: SourceKind,
}

#[derive(Debug, Clone)]
enum SourceKind {
    Parent(BaseUrl),
    Origin(OriginTemplate),
}

impl Source {
    /// The URL of bundle `id` at this source.
    pub fn url_for(&self, id: &BundleId) -> String {
        match &self.kind {
            SourceKind::Parent(base) => base.bundle_url(id),
            SourceKind::Origin(template) => template.url_for(id),
        }
    }

    /// A short name for logs: the parent's base URL or the origin template.
    pub fn label(&self) -> &str {
        match &self.kind {
            SourceKind::Parent(base) => base.as_str(),
            SourceKind::Origin(template) => template.as_str(),
        }
    }
}

/// Why a source could not deliver (part of) a bundle.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    #[error("{url}: not found")]
    NotFound { url: String },
    #[error("{url}: answered {status}")]
    Status { url: String, status: u16 },
    /// The source answered but asked to be asked again later (`503` or `429`, with its
    /// `Retry-After`): overloaded, or holding the bundle off after it failed verification.
    /// `from_relay` when a patchrelay parent said so (it says so per bundle or per load;
    /// an origin that answers 503 is failing).
    #[error("{url}: answered {status}, retry after {}s", retry_after.as_secs())]
    Busy {
        url: String,
        status: u16,
        retry_after: Duration,
        from_relay: bool,
    },
    #[error("{url}: {message}")]
    Protocol { url: String, message: String },
    #[error("{url}: no answer within {after:?}")]
    Timeout { url: String, after: Duration },
    #[error("{url}: {message}")]
    Transport { url: String, message: String },
    #[error("{url}: no byte for {after:?} at offset {offset}")]
    Stalled {
        url: String,
        after: Duration,
        offset: u64,
    },
}

impl FetchError {
    /// Whether the source failed by taking too long (504) rather than by erroring (502).
    pub fn is_timeout(&self) -> bool {
        matches!(self, Self::Timeout { .. } | Self::Stalled { .. })
    }
}

/// An upstream answer, checked, with its body positioned at the requested offset.
#[derive(Debug)]
pub struct Opened {
    /// Total length of the bundle.
    pub total: u64,
    pub body: Incoming,
    pub url: String,
}

/// The configured sources and the client that fetches from them.
#[derive(Debug)]
pub struct Upstream {
    client: Client<crate::tls::Connector, Empty<Bytes>>,
    /// The connector (plain and `https://`), for the relay's other outgoing clients.
    connector: crate::tls::Connector,
    sources: Vec<Source>,
    stall_timeout: Duration,
    relay_id: String,
    /// (source index, bundle) pairs that recently failed verification, and since when.
    penalties: Mutex<HashMap<(usize, BundleId), Instant>>,
    /// How each source answered lately, by source index.
    health: Mutex<HashMap<usize, SourceHealth>>,
}

/// How a source answered lately: what readiness checks and health reports show.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceHealth {
    /// When it last answered (any HTTP answer, a 404 included).
    pub last_success: Option<Instant>,
    /// Failures (no answer, an error status, a broken transfer) since then.
    pub consecutive_failures: u32,
    /// When it last failed.
    pub last_failure: Option<Instant>,
    pub last_error: Option<String>,
    /// Failures in all.
    pub errors_total: u64,
    /// Times a fill left this source for the next one.
    pub failovers_total: u64,
}

impl Upstream {
    pub fn new(config: &UpstreamConfig, relay_id: &str) -> Result<Self, crate::tls::TlsError> {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(config.connect_timeout));
        http.set_nodelay(true);
        http.enforce_http(false);
        let connector = crate::tls::connector(http, config.tls.as_ref())?;
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE)
            .build(connector.clone());

        let parents = config.parents.iter().cloned().map(SourceKind::Parent);
        let origin = config.origin.iter().cloned().map(SourceKind::Origin);
        let sources = parents
            .chain(origin)
            .enumerate()
            .map(|(index, kind)| Source { index, kind })
            .collect();
        Ok(Self {
            client,
            connector,
            sources,
            stall_timeout: config.stall_timeout,
            relay_id: relay_id.to_string(),
            penalties: Mutex::default(),
            health: Mutex::default(),
        })
    }

    /// The connector every outgoing client of this relay uses.
    pub fn connector(&self) -> crate::tls::Connector {
        self.connector.clone()
    }

    /// Whether any parent or origin is configured.
    pub fn has_sources(&self) -> bool {
        !self.sources.is_empty()
    }

    /// The time without a byte after which a source has failed.
    pub fn stall_timeout(&self) -> Duration {
        self.stall_timeout
    }

    /// The sources to try for `id`, in order: configured order, except that sources which
    /// recently served corrupt bytes for `id` go last.
    pub fn sources(&self, id: &BundleId) -> Vec<Source> {
        let penalized = self.penalized(id);
        let (mut good, bad): (Vec<_>, Vec<_>) = self
            .sources
            .iter()
            .cloned()
            .partition(|s| !penalized.contains(&s.index));
        good.extend(bad);
        good
    }

    /// The sources not recently caught serving corrupt bytes for `id`, in configured order.
    pub fn unpenalized_sources(&self, id: &BundleId) -> Vec<Source> {
        let penalized = self.penalized(id);
        self.sources
            .iter()
            .filter(|s| !penalized.contains(&s.index))
            .cloned()
            .collect()
    }

    /// Whether some source not recently caught serving corrupt bytes for `id` remains.
    pub fn has_unpenalized_source(&self, id: &BundleId) -> bool {
        let penalized = self.penalized(id);
        self.sources.iter().any(|s| !penalized.contains(&s.index))
    }

    /// Records that `source` delivered bytes that failed verification for `id`.
    pub fn penalize(&self, source: usize, id: &BundleId) {
        let mut penalties = self
            .penalties
            .lock()
            .expect("penalty lock is never poisoned");
        penalties.insert((source, *id), Instant::now());
    }

    fn penalized(&self, id: &BundleId) -> Vec<usize> {
        let mut penalties = self
            .penalties
            .lock()
            .expect("penalty lock is never poisoned");
        penalties.retain(|_, since| since.elapsed() < INTEGRITY_PENALTY);
        penalties
            .keys()
            .filter(|(_, pid)| pid == id)
            .map(|(index, _)| *index)
            .collect()
    }

    /// Records that `source` answered.
    pub fn record_success(&self, source: usize) {
        let mut health = self.health.lock().unwrap_or_else(|e| e.into_inner());
        let entry = health.entry(source).or_default();
        entry.last_success = Some(Instant::now());
        entry.consecutive_failures = 0;
    }

    /// Records that `source` failed with `error`.
    pub fn record_failure(&self, source: usize, error: &FetchError) {
        let mut health = self.health.lock().unwrap_or_else(|e| e.into_inner());
        let entry = health.entry(source).or_default();
        entry.consecutive_failures += 1;
        entry.last_failure = Some(Instant::now());
        entry.errors_total += 1;
        entry.last_error = Some(error.to_string());
    }

    /// Records that a fill left `source` for the next one.
    pub fn record_failover(&self, source: usize) {
        let mut health = self.health.lock().unwrap_or_else(|e| e.into_inner());
        health.entry(source).or_default().failovers_total += 1;
    }

    /// Each source's label and health, in configured order.
    pub fn health(&self) -> Vec<(String, SourceHealth)> {
        let health = self.health.lock().unwrap_or_else(|e| e.into_inner());
        self.sources
            .iter()
            .map(|s| {
                (
                    s.label().to_string(),
                    health.get(&s.index).cloned().unwrap_or_default(),
                )
            })
            .collect()
    }

    /// Whether some parent or the origin answered within `within`.
    pub fn answered_within(&self, within: Duration) -> bool {
        let health = self.health.lock().unwrap_or_else(|e| e.into_inner());
        health
            .values()
            .any(|h| h.last_success.is_some_and(|t| t.elapsed() <= within))
    }

    /// Asks every parent's `/healthz`, recording who answers: keeps readiness current
    /// when no bundle is being fetched.
    pub async fn probe_parents(&self) {
        for source in &self.sources {
            let SourceKind::Parent(base) = &source.kind else {
                continue;
            };
            let url = format!("{}/healthz", base.as_str());
            match self.get_json::<serde_json::Value>(&url).await {
                Ok(_) => self.record_success(source.index),
                Err(e) => self.record_failure(source.index, &e),
            }
        }
    }

    /// The manifest of the first parent that answers with one.
    pub async fn fetch_manifest(&self) -> Result<Manifest, FetchError> {
        let mut last = None;
        for source in &self.sources {
            let SourceKind::Parent(base) = &source.kind else {
                continue;
            };
            let url = format!("{}/v1/manifest", base.as_str());
            match self.get_json(&url).await {
                Ok(manifest) => {
                    self.record_success(source.index);
                    return Ok(manifest);
                }
                Err(e) => {
                    self.record_failure(source.index, &e);
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or(FetchError::NotFound {
            url: "(no parents)".into(),
        }))
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T, FetchError> {
        let request = self
            .get(url)
            .body(Empty::new())
            .map_err(|e| FetchError::Protocol {
                url: url.into(),
                message: e.to_string(),
            })?;
        let url = url.to_string();
        let response = tokio::time::timeout(self.stall_timeout, self.client.request(request))
            .await
            .map_err(|_| FetchError::Timeout {
                url: url.clone(),
                after: self.stall_timeout,
            })?
            .map_err(|e| transport_error(url.clone(), &e))?;
        if !response.status().is_success() {
            return Err(classify_status(&url, &response, String::new()));
        }
        let body = Limited::new(response.into_body(), MAX_JSON_BODY);
        let bytes = tokio::time::timeout(self.stall_timeout, body.collect())
            .await
            .map_err(|_| FetchError::Timeout {
                url: url.clone(),
                after: self.stall_timeout,
            })?
            .map_err(|e| FetchError::Transport {
                url: url.clone(),
                message: e.to_string(),
            })?
            .to_bytes();
        serde_json::from_slice(&bytes).map_err(|e| FetchError::Protocol {
            url,
            message: format!("bad JSON: {e}"),
        })
    }

    /// A GET to `url` that says who is asking.
    fn get(&self, url: &str) -> http::request::Builder {
        Request::get(url)
            .header(
                USER_AGENT,
                concat!("patchrelay/", env!("CARGO_PKG_VERSION")),
            )
            .header(RELAY_HEADER, &self.relay_id)
    }

    /// Asks `source` for bundle `id` from byte `offset` on. `known_total` is the length an
    /// earlier source announced; a source that disagrees has failed.
    pub async fn open(
        &self,
        source: &Source,
        id: &BundleId,
        offset: u64,
        known_total: Option<u64>,
    ) -> Result<Opened, FetchError> {
        let url = source.url_for(id);
        let mut request = self.get(&url);
        if offset > 0 {
            request = request.header(RANGE, format!("bytes={offset}-"));
        }
        let request = request
            .body(Empty::new())
            .map_err(|e| FetchError::Protocol {
                url: url.clone(),
                message: format!("cannot build request: {e}"),
            })?;

        let response =
            match tokio::time::timeout(self.stall_timeout, self.client.request(request)).await {
                Err(_) => {
                    let error = FetchError::Timeout {
                        url,
                        after: self.stall_timeout,
                    };
                    self.record_failure(source.index, &error);
                    return Err(error);
                }
                Ok(Err(e)) => {
                    let error = transport_error(url, &e);
                    self.record_failure(source.index, &error);
                    return Err(error);
                }
                Ok(Ok(response)) => response,
            };

        self.record_success(source.index);
        let total = check_response(&response, offset, known_total)
            .map_err(|message| classify_status(&url, &response, message))?;
        Ok(Opened {
            total,
            body: response.into_body(),
            url,
        })
    }
}

/// Turns a client error into a [`FetchError`], telling connect timeouts apart.
fn transport_error(url: String, error: &hyper_util::client::legacy::Error) -> FetchError {
    let mut source = error.source();
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            if io.kind() == io::ErrorKind::TimedOut {
                return FetchError::Timeout {
                    url,
                    after: Duration::ZERO,
                };
            }
        }
        source = err.source();
    }
    let message = match error.source() {
        Some(inner) => format!("{error}: {inner}"),
        None => error.to_string(),
    };
    FetchError::Transport { url, message }
}

/// The `Retry-After` a source without one (or with an HTTP date) is given.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(10);
/// The longest `Retry-After` honoured: a parent cannot shut a bundle out for hours.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// A source's `Retry-After` in seconds, within 1 s and [`MAX_RETRY_AFTER`].
fn retry_after(headers: &HeaderMap) -> Duration {
    headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(DEFAULT_RETRY_AFTER, Duration::from_secs)
        .clamp(Duration::from_secs(1), MAX_RETRY_AFTER)
}

fn classify_status<B>(url: &str, response: &http::Response<B>, message: String) -> FetchError {
    let (status, headers) = (response.status(), response.headers());
    let url = url.to_string();
    match status {
        StatusCode::NOT_FOUND | StatusCode::GONE => FetchError::NotFound { url },
        StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS => FetchError::Busy {
            url,
            status: status.as_u16(),
            retry_after: retry_after(headers),
            from_relay: headers.contains_key(RELAY_HEADER),
        },
        s if s.is_success() => FetchError::Protocol { url, message },
        s => FetchError::Status {
            url,
            status: s.as_u16(),
        },
    }
}

/// Checks an answer to a request for the bundle from `offset`; returns the bundle's total
/// length, or why the answer cannot be used.
fn check_response<B>(
    response: &http::Response<B>,
    offset: u64,
    known_total: Option<u64>,
) -> Result<u64, String> {
    let headers = response.headers();
    let content_length = match headers.get(CONTENT_LENGTH) {
        None => None,
        Some(v) => Some(parse_u64(v.to_str().ok()).ok_or("unreadable Content-Length")?),
    };

    let total = match (response.status(), offset) {
        (StatusCode::OK, 0) => content_length.ok_or("no Content-Length on a bundle")?,
        (StatusCode::OK, _) => return Err("answered 200 to a Range request".into()),
        (StatusCode::PARTIAL_CONTENT, _) => {
            let value = headers.get(CONTENT_RANGE).and_then(|v| v.to_str().ok());
            let (start, end, total) =
                parse_content_range(value).ok_or("206 without a valid Content-Range")?;
            if start != offset || end + 1 != total {
                return Err(format!(
                    "Content-Range {start}-{end}/{total} for a request at {offset}-"
                ));
            }
            if content_length.is_some_and(|len| len != total - offset) {
                return Err("Content-Length disagrees with Content-Range".into());
            }
            total
        }
        (status, _) => return Err(format!("answered {status}")),
    };

    if let Some(known) = known_total.filter(|&known| known != total) {
        return Err(format!("bundle length changed from {known} to {total}"));
    }
    Ok(total)
}

fn parse_u64(s: Option<&str>) -> Option<u64> {
    let s = s?.trim();
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Parses `bytes a-b/total` (RFC 9110 §14.4).
fn parse_content_range(value: Option<&str>) -> Option<(u64, u64, u64)> {
    let rest = value?.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, end) = range.split_once('-')?;
    let (start, end, total) = (
        parse_u64(Some(start))?,
        parse_u64(Some(end))?,
        parse_u64(Some(total))?,
    );
    (start <= end && end < total).then_some((start, end, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(status: u16, headers: &[(&str, &str)]) -> http::Response<()> {
        let mut builder = http::Response::builder().status(status);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn a_503_or_429_is_a_busy_source_with_its_retry_after_bounded() {
        let busy = |status, headers: &[(&str, &str)]| {
            let r = response(status, headers);
            match classify_status("p", &r, String::new()) {
                FetchError::Busy { retry_after, .. } => Some(retry_after.as_secs()),
                _ => None,
            }
        };
        assert_eq!(busy(503, &[("retry-after", "40")]), Some(40));
        assert_eq!(busy(429, &[("retry-after", " 3 ")]), Some(3));
        // None, an HTTP date, zero or hours: the default, or the bounds.
        assert_eq!(busy(503, &[]), Some(10));
        assert_eq!(
            busy(503, &[("retry-after", "Fri, 04 Dec 2026 10:00:00 GMT")]),
            Some(10)
        );
        assert_eq!(busy(503, &[("retry-after", "0")]), Some(1));
        assert_eq!(busy(503, &[("retry-after", "86400")]), Some(300));
        assert_eq!(busy(502, &[("retry-after", "5")]), None);
    }

    #[test]
    fn whole_answer_needs_a_length() {
        assert_eq!(
            check_response(&response(200, &[("content-length", "10")]), 0, None),
            Ok(10)
        );
        assert!(check_response(&response(200, &[]), 0, None).is_err());
        assert!(check_response(&response(200, &[("content-length", "-1")]), 0, None).is_err());
    }

    #[test]
    fn resumed_answer_must_be_a_matching_partial() {
        let ok = response(
            206,
            &[("content-range", "bytes 4-9/10"), ("content-length", "6")],
        );
        assert_eq!(check_response(&ok, 4, Some(10)), Ok(10));

        let whole = response(200, &[("content-length", "10")]);
        assert!(check_response(&whole, 4, Some(10))
            .unwrap_err()
            .contains("200 to a Range"));

        let shifted = response(206, &[("content-range", "bytes 3-9/10")]);
        assert!(check_response(&shifted, 4, Some(10)).is_err());

        let short = response(206, &[("content-range", "bytes 4-8/10")]);
        assert!(check_response(&short, 4, Some(10)).is_err());

        let other_length = response(206, &[("content-range", "bytes 4-10/11")]);
        assert!(check_response(&other_length, 4, Some(10))
            .unwrap_err()
            .contains("changed"));

        let lying_length = response(
            206,
            &[("content-range", "bytes 4-9/10"), ("content-length", "9")],
        );
        assert!(check_response(&lying_length, 4, Some(10)).is_err());
    }

    #[test]
    fn content_range_parser_rejects_nonsense() {
        assert_eq!(parse_content_range(Some("bytes 0-0/1")), Some((0, 0, 1)));
        for bad in [
            "bytes 5-4/10",
            "bytes 0-10/10",
            "bytes */10",
            "items 0-1/2",
            "bytes +1-2/3",
        ] {
            assert_eq!(parse_content_range(Some(bad)), None, "{bad}");
        }
    }

    #[test]
    fn sources_put_penalized_ones_last() {
        let text = r#"
            [relay]
            id = "r"
            site = "s"
            listen = "127.0.0.1:0"
            cache_dir = "c"
            [upstream]
            parents = ["http://p0", "http://p1"]
            origin = "http://o/{id}"
        "#;
        let config = crate::config::Config::parse(text, "t.toml", std::path::Path::new("."))
            .expect("valid config");
        let upstream = Upstream::new(&config.upstream, "r").unwrap();
        let id = BundleId::of(b"x");
        upstream.penalize(0, &id);
        let order: Vec<_> = upstream.sources(&id).iter().map(|s| s.index).collect();
        assert_eq!(order, [1, 2, 0]);
        let other = BundleId::of(b"y");
        let order: Vec<_> = upstream.sources(&other).iter().map(|s| s.index).collect();
        assert_eq!(order, [0, 1, 2]);
        assert!(upstream.has_unpenalized_source(&id));
        let order: Vec<_> = upstream
            .unpenalized_sources(&id)
            .iter()
            .map(|s| s.index)
            .collect();
        assert_eq!(order, [1, 2]);
    }
}
