//! The HTTP side: the accept loop, routing, the bundle handler, and the one place where
//! errors become responses.
//!
//! Requests go through a tower service (so limits and metrics can be layered on) adapted
//! to hyper with `hyper_util::service::TowerToHyperService`. Each connection runs in its
//! own task; shutdown stops accepting, lets running responses finish within the grace
//! period, then cuts what is left.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http::header::{
    ACCEPT_RANGES, ALLOW, CACHE_CONTROL, CONNECTION, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE,
    ETAG, IF_NONE_MATCH, IF_RANGE, RANGE, RETRY_AFTER, WWW_AUTHENTICATE,
};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn, Instrument};

use crate::admin;
use crate::body::{self, Progress, ResponseBody};
use crate::bundle::{BundleId, BundleIdError};
use crate::cache::{Cache, Lookup};
use crate::conn_clock::{ConnClock, Expired, Metered, Timeouts, Tracked};
use crate::fill::{FillError, Fills, HoldReason, Joined};
use crate::health;
use crate::limits::{Limits, Refusal};
use crate::metrics;
use crate::range::{self, ByteRange, RangeError};
use crate::reports::{self, ReportError, Spool};
use crate::stats::Stats;
use crate::upstream::Upstream;
use futures_util::future::BoxFuture;
use http_body_util::BodyExt;

/// Response header naming the relay that answered.
pub const RELAY_HEADER: &str = "x-patchrelay-relay";
/// Response header saying how a bundle was served: `hit`, `miss` or `joined`.
pub const CACHE_HEADER: &str = "x-patchrelay-cache";

/// Most bytes hyper may hold queued for one connection (and the most a request head may
/// take). Hyper's default (~400 KiB) made 100 downloads cost 60 MiB of queued body. Two
/// read chunks, not one: hyper asks the body for the next chunk while the previous one is
/// still being written, so reading and sending overlap (with one, each connection
/// alternated between them: hot hits went from 2.0 to 3.0 GiB/s with two).
const CONNECTION_BUFFER: usize = 2 * body::READ_CHUNK;

/// What every request handler can reach.
#[derive(Debug)]
pub struct AppState {
    pub relay_id: String,
    /// `[relay] site`, shown in `/readyz`.
    pub relay_site: String,
    relay_id_header: HeaderValue,
    pub cache: Arc<Cache>,
    pub fills: Arc<Fills>,
    pub limits: Arc<Limits>,
    pub stats: Arc<Stats>,
    /// The admin API's bearer token; `None` = admin API off.
    pub admin_token: Option<String>,
    /// Whether this relay has no parents (it owns the manifest).
    pub is_root: bool,
    /// Parents and origin, for readiness.
    pub upstream: Arc<Upstream>,
    /// How often parents are probed (`[health] interval`).
    pub health_interval: Duration,
    /// Agent reports waiting to go up; `None` until the relay sets it.
    pub reports: Option<Arc<Spool>>,
    /// The beacon key; `None` = beacons off.
    pub beacon_key: Option<[u8; 32]>,
    /// Largest accepted difference between a beacon's timestamp and now.
    pub beacon_max_skew: Duration,
    /// Where received beacons wait for the next hop up.
    pub beacon_outbox: Option<std::path::PathBuf>,
    /// Highest beacon sequence seen per relay, to refuse replays.
    pub beacon_seqs: Arc<crate::beacon::SeqStore>,
    /// Largest report body and batch accepted (`[server] max_report_body`, `_batch`).
    pub report_limits: ReportLimits,
}

/// How large a `POST /v1/reports` may be, in bytes and in reports.
#[derive(Debug, Clone, Copy)]
pub struct ReportLimits {
    pub max_body: usize,
    pub max_batch: usize,
}

impl From<&crate::config::ServerConfig> for ReportLimits {
    fn from(server: &crate::config::ServerConfig) -> Self {
        Self {
            max_body: server.max_report_body,
            max_batch: server.max_report_batch,
        }
    }
}

impl AppState {
    pub fn new(
        relay_id: &str,
        cache: Arc<Cache>,
        fills: Arc<Fills>,
        limits: Arc<Limits>,
        stats: Arc<Stats>,
        admin_token: Option<String>,
        upstream: Arc<Upstream>,
    ) -> Self {
        let relay_id_header =
            HeaderValue::from_str(relay_id).expect("config validation keeps relay ids header-safe");
        Self {
            relay_id: relay_id.to_string(),
            relay_site: String::new(),
            relay_id_header,
            cache,
            fills,
            limits,
            stats,
            admin_token,
            is_root: false,
            upstream,
            health_interval: Duration::from_secs(30),
            reports: None,
            beacon_key: None,
            beacon_outbox: None,
            beacon_max_skew: Duration::from_secs(300),
            beacon_seqs: Arc::new(crate::beacon::SeqStore::memory()),
            report_limits: ReportLimits::from(&crate::config::ServerConfig::default()),
        }
    }
}

/// Why a request could not be answered as asked.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("invalid bundle id: {0}")]
    BadId(#[from] BundleIdError),
    #[error(transparent)]
    BadRange(#[from] RangeError),
    #[error("range not satisfiable: the bundle has {len} bytes")]
    Unsatisfiable { len: u64 },
    #[error("no such path: {path}")]
    NoRoute { path: String },
    #[error("method {method} is not allowed here; use {allowed}")]
    Method {
        method: Method,
        allowed: &'static str,
    },
    #[error("{0}")]
    NotFound(String),
    #[error("{max} bundles are being fetched already ([server] max_fills); retry shortly")]
    FillsBusy { max: usize },
    #[error("bundle {id} {reason}; not fetched again for {retry_after_secs}s")]
    HeldOff {
        id: BundleId,
        retry_after_secs: u64,
        reason: HoldReason,
    },
    #[error(transparent)]
    Fill(#[from] FillError),
    #[error(transparent)]
    Limited(#[from] Refusal),
    #[error("the admin API is off: no [admin] token_file is configured")]
    AdminOff,
    #[error("admin calls need an Authorization: Bearer token")]
    Unauthorized,
    #[error("wrong admin token")]
    Forbidden,
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{what} exceeds the limit of {limit}")]
    TooLarge { what: &'static str, limit: String },
    #[error(
        "{what} stalled: nothing more within {}s ([server] body_timeout, and at least 1 kB/s \
         in all)",
        after.as_secs_f64()
    )]
    BodyTimeout { what: &'static str, after: Duration },
    #[error("the report spool is full; retry later")]
    SpoolFull,
    #[error("this must carry an X-Patchrelay-Signature")]
    Unsigned,
    #[error("bad signature")]
    BadSignature,
    #[error("bundle {id} is not cached here")]
    NotCached { id: BundleId },
    #[error("internal error: {0}")]
    Internal(String),
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    relay: &'a str,
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            Self::BadId(_) | Self::BadRange(_) | Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unsatisfiable { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
            Self::NoRoute { .. } => StatusCode::NOT_FOUND,
            Self::Method { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::Fill(FillError::NotFound { .. } | FillError::NoUpstream { .. }) => {
                StatusCode::NOT_FOUND
            }
            Self::Fill(FillError::Upstream { timeout: true, .. }) => StatusCode::GATEWAY_TIMEOUT,
            Self::Fill(FillError::Upstream { .. } | FillError::Integrity { .. }) => {
                StatusCode::BAD_GATEWAY
            }
            Self::Fill(FillError::Local { .. }) | Self::Internal(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            Self::AdminOff | Self::NotCached { .. } | Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Unauthorized | Self::Unsigned => StatusCode::UNAUTHORIZED,
            Self::Forbidden | Self::BadSignature => StatusCode::FORBIDDEN,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            Self::Limited(Refusal::RequestRate { .. }) => StatusCode::TOO_MANY_REQUESTS,
            Self::Limited(_)
            | Self::SpoolFull
            | Self::FillsBusy { .. }
            | Self::HeldOff { .. }
            | Self::Fill(FillError::Busy { .. }) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The short, stable message a client sees. Upstream and local details stay in the log.
    fn public_message(&self) -> String {
        match self {
            Self::Fill(FillError::NotFound { id } | FillError::NoUpstream { id }) => {
                format!("bundle {id} not found")
            }
            Self::Fill(FillError::Upstream {
                id, timeout: true, ..
            }) => {
                format!("upstream timed out fetching bundle {id}")
            }
            Self::Fill(FillError::Upstream { id, .. }) => {
                format!("upstream failed for bundle {id}")
            }
            Self::Fill(FillError::Integrity { id, .. }) => {
                format!("bundle {id} failed verification; retry shortly")
            }
            Self::Fill(FillError::Busy { id, retry_after }) => format!(
                "bundle {id} was refused by every upstream for now; retry in {}s",
                retry_after.as_secs()
            ),
            Self::Fill(FillError::Local { .. }) | Self::Internal(_) => "internal error".into(),
            other => other.to_string(),
        }
    }

    /// The error response: status, JSON body, and the headers the status calls for.
    pub(crate) fn into_response(self, relay_id: &str) -> Response<ResponseBody> {
        let status = self.status();
        if status.is_server_error() {
            warn!(error = %self, http.status = status.as_u16(), "request failed");
        } else {
            debug!(error = %self, http.status = status.as_u16(), "request refused");
        }

        let message = self.public_message();
        let json = serde_json::to_vec(&ErrorBody {
            error: &message,
            relay: relay_id,
        })
        .expect("a struct of two strings always serializes");
        let mut builder = Response::builder()
            .status(status)
            .header(CONTENT_TYPE, "application/json")
            .header(CONTENT_LENGTH, json.len());
        match &self {
            Self::Unsatisfiable { len } => {
                builder = builder.header(CONTENT_RANGE, format!("bytes */{len}"))
            }
            Self::Method { allowed, .. } => {
                builder = builder.header(ALLOW, allowed.replace(" or ", ", "))
            }
            Self::Unauthorized => builder = builder.header(WWW_AUTHENTICATE, "Bearer"),
            Self::SpoolFull => builder = builder.header(RETRY_AFTER, 30),
            // The rest of the body is not read, so the connection cannot carry on.
            Self::BodyTimeout { .. } => builder = builder.header(CONNECTION, "close"),
            Self::FillsBusy { .. } => builder = builder.header(RETRY_AFTER, 5),
            Self::HeldOff {
                retry_after_secs, ..
            } => builder = builder.header(RETRY_AFTER, *retry_after_secs),
            Self::Fill(FillError::Busy { retry_after, .. }) => {
                builder = builder.header(RETRY_AFTER, retry_after.as_secs().max(1))
            }
            Self::Limited(refusal) => {
                builder = builder.header(RETRY_AFTER, refusal.retry_after_secs())
            }
            _ => {}
        }
        builder
            .body(body::full(json))
            .expect("error responses use valid headers")
    }
}

impl ApiError {
    /// A batch refused for its content (400) or its size (413).
    pub(crate) fn from_report(e: ReportError) -> Self {
        match e {
            ReportError::TooMany { max, .. } => Self::TooLarge {
                what: "the reports batch",
                limit: format!("{max} reports"),
            },
            other => Self::BadRequest(other.to_string()),
        }
    }
}

/// Reads a request body of at most `max` bytes: a larger `Content-Length` is refused
/// before any byte is read, a body that grows past `max` as soon as it does (413).
pub(crate) async fn read_body(
    request: Request<Incoming>,
    what: &'static str,
    max: usize,
) -> Result<bytes::Bytes, ApiError> {
    let too_large = || ApiError::TooLarge {
        what,
        limit: crate::units::format_size(max as u64),
    };
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > max as u64) {
        return Err(too_large());
    }
    let stall = request.extensions().get::<BodyTimeout>().map_or_else(
        || crate::config::ServerConfig::default().body_timeout,
        |t| t.0,
    );

    // Frame by frame, so a client that stops is cut after `stall` without a byte; and
    // the whole body must come at 1 kB/s on average after the first `stall`, so one that
    // trickles a byte now and then is cut too.
    let whole = stall + Duration::from_millis(declared.unwrap_or(max as u64));
    let deadline = tokio::time::Instant::now() + whole;
    let mut body = http_body_util::Limited::new(request.into_body(), max);
    let mut bytes = bytes::BytesMut::new();
    loop {
        let wait = deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .min(stall);
        let frame = match tokio::time::timeout(wait, body.frame()).await {
            Err(_) => return Err(ApiError::BodyTimeout { what, after: wait }),
            Ok(None) => return Ok(bytes.freeze()),
            Ok(Some(frame)) => frame,
        };
        match frame {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    bytes.extend_from_slice(&data);
                }
            }
            Err(e) if e.is::<http_body_util::LengthLimitError>() => return Err(too_large()),
            Err(e) => return Err(ApiError::BadRequest(format!("{what}: {e}"))),
        }
    }
}

/// How long a request body may stall between two reads (`[server] body_timeout`), put in
/// each request's extensions by the accept loop (without one, the default applies).
#[derive(Debug, Clone, Copy)]
pub struct BodyTimeout(pub Duration);

/// Refuses any method but `allowed` with 405.
pub fn require_method(method: &Method, allowed: Method) -> Result<(), ApiError> {
    if *method == allowed {
        Ok(())
    } else {
        Err(ApiError::Method {
            method: method.clone(),
            allowed: if allowed == Method::POST {
                "POST"
            } else if allowed == Method::PUT {
                "PUT"
            } else if allowed == Method::DELETE {
                "DELETE"
            } else {
                "GET"
            },
        })
    }
}

/// Handles one request from `client`; never fails, since errors become responses here.
pub async fn handle(
    state: Arc<AppState>,
    client: Peer,
    request: Request<Incoming>,
) -> Response<ResponseBody> {
    let (method, path) = (request.method().clone(), request.uri().path().to_string());
    let mut response = match route(&state, client, request).await {
        Ok(response) => response,
        Err(e) => e.into_response(&state.relay_id),
    };
    response
        .headers_mut()
        .insert(RELAY_HEADER, state.relay_id_header.clone());
    state.stats.response(response.status().as_u16());
    debug!(client.addr = %client.addr, client.certified = client.certified,
        http.method = %method, http.path = %path, http.status = response.status().as_u16(),
        "request");
    response
}

async fn route(
    state: &AppState,
    client: Peer,
    request: Request<Incoming>,
) -> Result<Response<ResponseBody>, ApiError> {
    if !client.certified {
        state.limits.check_request(client.addr)?;
    }

    let path = request.uri().path();
    if path.starts_with("/v1/admin/") {
        return admin::route(state, request).await;
    }
    if path == "/v1/manifest" {
        return manifest_response(state, request.method()).await;
    }
    if path == "/v1/beacons" {
        return crate::beacon::receive(state, request).await;
    }
    if path == "/v1/reports" {
        return accept_reports(state, request).await;
    }
    if path == "/metrics" {
        require_method(request.method(), Method::GET)?;
        return metrics::response(state);
    }
    if path == "/healthz" || path == "/readyz" {
        require_method(request.method(), Method::GET)?;
        return match path {
            "/healthz" => health::live(state),
            _ => health::ready(state).await,
        };
    }
    let Some(id) = path.strip_prefix("/v1/bundles/") else {
        return Err(ApiError::NoRoute {
            path: path.to_string(),
        });
    };
    let head = match *request.method() {
        Method::GET => false,
        Method::HEAD => true,
        ref method => {
            return Err(ApiError::Method {
                method: method.clone(),
                allowed: "GET or HEAD",
            })
        }
    };
    let id: BundleId = id.parse()?;
    // HEAD and a 304 send no body: they are not downloads and take no slot.
    if head || if_none_match(request.headers(), &id) == IfNoneMatch::Id {
        return serve_bundle(state, request.headers(), id, head).await;
    }

    // A download holds its slot until its body ends; its bytes go out under the caps.
    let capped = (!client.certified).then_some(client.addr);
    let permit = state.limits.start_download(capped)?;
    let response = serve_bundle(state, request.headers(), id, head).await?;
    let length = response
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .unwrap_or(0);
    let bundle = Some((id, length));
    let limits = &state.limits;
    Ok(response.map(|body| limits.throttle(body, client.addr, Some(permit), bundle)))
}

/// `POST /v1/reports`: validates the whole batch, spools it durably, then answers 202.
async fn accept_reports(
    state: &AppState,
    request: Request<Incoming>,
) -> Result<Response<ResponseBody>, ApiError> {
    require_method(request.method(), Method::POST)?;
    let Some(spool) = state.reports.clone() else {
        return Err(ApiError::Internal("no report spool".into()));
    };
    // Agents post unsigned. A relay forwarding its children's reports signs them with the
    // tree's key; with a key here, such a batch must carry a valid signature.
    let signature = request
        .headers()
        .get(reports::SIGNATURE_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let from_relay = request.headers().contains_key(RELAY_HEADER);
    let limits = state.report_limits;
    let body = read_body(request, "the reports body", limits.max_body).await?;
    if let Some(key) = &state.beacon_key {
        match &signature {
            Some(sig) if !reports::verify(key, &body, sig) => return Err(ApiError::BadSignature),
            None if from_relay => return Err(ApiError::Unsigned),
            _ => {}
        }
    }
    let mut batch = reports::parse_batch(&body, limits.max_batch).map_err(ApiError::from_report)?;
    if !from_relay {
        for report in &mut batch {
            report.relay = Some(state.relay_id.clone());
        }
    }
    let received = batch.len();
    let accepted = tokio::task::spawn_blocking(move || spool.append(batch))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| match e {
            ReportError::SpoolFull => ApiError::SpoolFull,
            other => ApiError::Internal(other.to_string()),
        })?;
    let mut response = admin::json(&serde_json::json!({
        "received": received,
        "accepted": accepted,
        "relay": state.relay_id,
    }))?;
    *response.status_mut() = StatusCode::ACCEPTED;
    Ok(response)
}

/// `GET /v1/manifest`: the manifest this relay holds (its own at a root, its parent's
/// elsewhere).
async fn manifest_response(
    state: &AppState,
    method: &Method,
) -> Result<Response<ResponseBody>, ApiError> {
    require_method(method, Method::GET)?;
    let root = state.cache.root().to_path_buf();
    let manifest = tokio::task::spawn_blocking(move || crate::manifest::load(&root))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::Internal(format!("manifest: {e}")))?;
    admin::json(&manifest)
}

/// What a GET or HEAD asks of one bundle, after its headers are read.
struct BundleRequest {
    id: BundleId,
    head: bool,
    range: Option<ByteRange>,
    /// `If-None-Match: *`: answer 304 once the bundle is known to exist.
    not_modified_if_exists: bool,
}

/// GET or HEAD of one bundle: from the cache, or by starting or joining a fill.
async fn serve_bundle(
    state: &AppState,
    headers: &HeaderMap,
    id: BundleId,
    head: bool,
) -> Result<Response<ResponseBody>, ApiError> {
    // Preconditions come before Range (RFC 9110 §13.2.2). The ETag is the content hash, so
    // a client holding this tag holds these exact bytes, whether or not this relay has them.
    let not_modified_if_exists = match if_none_match(headers, &id) {
        IfNoneMatch::Id => return Ok(not_modified(&id)),
        IfNoneMatch::Any => true,
        IfNoneMatch::Other => false,
    };
    // Range applies to GET only (RFC 9110 §14.2).
    let range = match headers.get(RANGE) {
        Some(value) if !head && if_range_matches(headers, &id) => range::parse(value.as_bytes())?,
        _ => None,
    };
    let request = BundleRequest {
        id,
        head,
        range,
        not_modified_if_exists,
    };

    if let Some(response) = serve_cached(state, &request).await? {
        return Ok(response);
    }

    if !state.fills.has_upstream() {
        return Err(FillError::NoUpstream { id }.into());
    }
    let joined = state.fills.join(id).map_err(|e| {
        error!(bundle.id = %id, error = %e, "cannot create a temporary file for a fill");
        ApiError::Internal(e.to_string())
    })?;
    let (fill, started) = match joined {
        Joined::Fill { fill, started } => (fill, started),
        Joined::Busy { max } => return Err(ApiError::FillsBusy { max }),
        Joined::HeldOff {
            retry_after,
            reason,
        } => {
            return Err(ApiError::HeldOff {
                id,
                retry_after_secs: retry_after.as_secs().max(1),
                reason,
            })
        }
        Joined::Cached => {
            return serve_cached(state, &request)
                .await?
                .ok_or_else(|| ApiError::Internal("committed bundle vanished".into()));
        }
    };

    Stats::bump(if started {
        &state.stats.misses
    } else {
        &state.stats.joined
    });
    let total = fill.total().await?;
    if total == 0 {
        // An empty body has no final byte to hold back: wait for the verdict first.
        fill.verified().await?;
    }
    let status = if started { "miss" } else { "joined" };
    let progress = Progress::Live(fill.subscribe());
    let file = fill.file.clone();
    bundle_response(state, &request, file, total, progress, status)
}

async fn serve_cached(
    state: &AppState,
    request: &BundleRequest,
) -> Result<Option<Response<ResponseBody>>, ApiError> {
    let (cache, id) = (state.cache.clone(), request.id);
    let cannot_open = |e: std::io::Error| {
        error!(bundle.id = %id, error = %e, "cannot open cached bundle");
        ApiError::Internal(e.to_string())
    };
    // A hot bundle opens on this thread; only a lookup that needs the disk goes through
    // the blocking pool.
    let opened = match cache.open_bundle_nowait(&id).map_err(cannot_open)? {
        Lookup::Opened(file, len) => Some((file, len)),
        Lookup::NotCached => None,
        Lookup::WouldBlock => tokio::task::spawn_blocking(move || cache.open_bundle(&id))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .map_err(cannot_open)?,
    };
    let Some((file, len)) = opened else {
        return Ok(None);
    };

    Stats::bump(&state.stats.hits);
    let file = Arc::new(file);
    let response = bundle_response(state, request, file, len, Progress::Complete, "hit")?;
    Ok(Some(response))
}

fn bundle_response(
    state: &AppState,
    request: &BundleRequest,
    file: Arc<std::fs::File>,
    len: u64,
    progress: Progress,
    cache_status: &'static str,
) -> Result<Response<ResponseBody>, ApiError> {
    let id = &request.id;
    if request.not_modified_if_exists {
        return Ok(not_modified(id));
    }
    let (status, start, end) = match request.range {
        None => (StatusCode::OK, 0, len),
        Some(range) => {
            let (start, end) = range
                .resolve(len)
                .map_err(|_| ApiError::Unsatisfiable { len })?;
            (StatusCode::PARTIAL_CONTENT, start, end)
        }
    };

    let mut builder = Response::builder()
        .status(status)
        .header(CONTENT_LENGTH, end - start)
        .header(CONTENT_TYPE, "application/octet-stream")
        .header(ETAG, format!("\"{id}\""))
        .header(ACCEPT_RANGES, "bytes")
        .header(CACHE_CONTROL, IMMUTABLE)
        .header(CACHE_HEADER, cache_status);
    if status == StatusCode::PARTIAL_CONTENT {
        builder = builder.header(CONTENT_RANGE, format!("bytes {start}-{}/{len}", end - 1));
    }
    let body = if request.head {
        body::empty()
    } else {
        let lease = state.cache.lease(*id);
        body::file_range(file, start, end, progress, lease)
    };
    builder
        .body(body)
        .map_err(|e| ApiError::Internal(e.to_string()))
}

/// Bundles never change: an id names one content forever.
const IMMUTABLE: &str = "public, max-age=31536000, immutable";

fn not_modified(id: &BundleId) -> Response<ResponseBody> {
    Response::builder()
        .status(StatusCode::NOT_MODIFIED)
        .header(ETAG, format!("\"{id}\""))
        .header(CACHE_CONTROL, IMMUTABLE)
        .body(body::empty())
        .expect("a 304 uses valid headers")
}

/// What `If-None-Match` (RFC 9110 §13.1.2) says about a bundle.
#[derive(Debug, PartialEq, Eq)]
enum IfNoneMatch {
    /// Absent, or lists only other tags.
    Other,
    /// Lists this bundle's tag (compared weakly).
    Id,
    /// `*`: matches if the bundle exists.
    Any,
}

fn if_none_match(headers: &HeaderMap, id: &BundleId) -> IfNoneMatch {
    let expected = id.to_string();
    let tags = headers
        .get_all(IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|value| value.split(',').map(str::trim));
    let mut any = false;
    for tag in tags {
        if tag.trim_start_matches("W/").trim_matches('"') == expected {
            return IfNoneMatch::Id;
        }
        any |= tag == "*";
    }
    if any {
        IfNoneMatch::Any
    } else {
        IfNoneMatch::Other
    }
}

/// `If-Range` (RFC 9110 §13.1.5): the Range applies only when the tag is ours. Absent, it
/// imposes nothing.
fn if_range_matches(headers: &HeaderMap, id: &BundleId) -> bool {
    match headers.get(IF_RANGE).and_then(|v| v.to_str().ok()) {
        None => true,
        Some(value) => value.trim() == format!("\"{id}\""),
    }
}

/// A request handler for [`accept_loop`]: the client and the request in, the response out
/// (errors already turned into responses).
pub type Handler = Arc<
    dyn Fn(Peer, Request<Incoming>) -> BoxFuture<'static, Response<ResponseBody>> + Send + Sync,
>;

/// The client of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub addr: IpAddr,
    /// It showed a client certificate that the listener's `client_ca` verified: a child
    /// relay (or the monitor), which speaks for a whole site, so the per-client caps meant
    /// for single agents do not apply to it.
    pub certified: bool,
}

/// Serves the relay's routes on `listener` until `shutdown` turns true.
pub async fn run(
    listener: TcpListener,
    state: Arc<AppState>,
    limits: ConnectionLimits,
    tls: Option<Arc<crate::tls::Listener>>,
    shutdown: watch::Receiver<bool>,
    grace: Duration,
) {
    let handler: Handler = Arc::new(move |client, request| {
        Box::pin(handle(state.clone(), client, request)) as BoxFuture<'static, _>
    });
    accept_loop(listener, handler, limits, tls, shutdown, grace).await;
}

/// What the accept loop enforces per connection (from `[server]`).
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// Relay (or monitor) id for the bodies of refusals.
    pub id: String,
    pub max_total: usize,
    pub max_per_client: usize,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub send_timeout: Duration,
    pub body_timeout: Duration,
    pub max_header_size: usize,
}

impl ConnectionLimits {
    fn timeouts(&self) -> Timeouts {
        Timeouts {
            header: self.header_timeout,
            idle: self.idle_timeout,
            send: self.send_timeout,
        }
    }
}

impl From<&crate::config::ServerConfig> for ConnectionLimits {
    fn from(server: &crate::config::ServerConfig) -> Self {
        Self {
            id: String::new(),
            max_total: server.max_connections,
            max_per_client: server.max_connections_per_client,
            header_timeout: server.header_timeout,
            idle_timeout: server.idle_timeout,
            send_timeout: server.send_timeout,
            body_timeout: server.body_timeout,
            max_header_size: server.max_header_size,
        }
    }
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self::from(&crate::config::ServerConfig::default())
    }
}

/// Open connections, in all and per client address.
#[derive(Debug)]
struct Tracker {
    open: std::sync::Mutex<(usize, std::collections::HashMap<IpAddr, usize>)>,
    max_total: usize,
    max_per_client: usize,
}

/// One admitted connection; gives its place back when dropped.
struct Admitted {
    tracker: Arc<Tracker>,
    client: IpAddr,
}

impl Tracker {
    /// Admits a connection from `client`, or says which limit it hit.
    fn admit(self: &Arc<Self>, client: IpAddr) -> Result<Admitted, &'static str> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.0 >= self.max_total {
            return Err("too many connections to this relay");
        }
        let from_client = open.1.entry(client).or_insert(0);
        if *from_client >= self.max_per_client {
            return Err("too many connections from this address");
        }
        *from_client += 1;
        open.0 += 1;
        Ok(Admitted {
            tracker: self.clone(),
            client,
        })
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut open = self.tracker.open.lock().unwrap_or_else(|e| e.into_inner());
        open.0 = open.0.saturating_sub(1);
        if let Some(n) = open.1.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                open.1.remove(&self.client);
            }
        }
    }
}

/// Answers a connection over a limit with 503 and `Retry-After`, without hyper: a
/// minimal response, then the connection is closed gracefully (FIN, then whatever the
/// client sent is read and dropped, so the close is not a reset that eats the answer).
async fn refuse(mut stream: tokio::net::TcpStream, why: &'static str, relay: String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let body = serde_json::json!({ "error": why, "relay": relay }).to_string();
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nretry-after: 5\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
}

/// Warns about refused connections at most every 10 s.
fn warn_refused(why: &'static str, client: IpAddr) {
    static LAST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let last = LAST.load(std::sync::atomic::Ordering::Relaxed);
    if now >= last + 10
        && LAST
            .compare_exchange(
                last,
                now,
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
            )
            .is_ok()
    {
        warn!(client.addr = %client, reason = why, "refusing connections (503); see [server]");
    }
}

/// Accepts connections until `shutdown` turns true, then drains them for up to `grace`.
/// Connections over `limits` get a 503 at once.
pub async fn accept_loop(
    listener: TcpListener,
    handler: Handler,
    limits: ConnectionLimits,
    tls: Option<Arc<crate::tls::Listener>>,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
) {
    let tracker = Arc::new(Tracker {
        open: std::sync::Mutex::default(),
        max_total: limits.max_total,
        max_per_client: limits.max_per_client,
    });
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    let stop = async move {
        let _ = shutdown.wait_for(|stop| *stop).await;
    };
    tokio::pin!(stop);

    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Usually out of file descriptors: back off rather than spin.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let admitted = match tracker.admit(peer.ip()) {
                    Ok(admitted) => admitted,
                    Err(why) => {
                        warn_refused(why, peer.ip());
                        connections.spawn(refuse(stream, why, limits.id.clone()));
                        continue;
                    }
                };
                let mut builder = http1::Builder::new();
                // The connection's own clock keeps the header and idle deadlines: hyper's
                // header timer would also run between requests.
                builder
                    .timer(TokioTimer::new())
                    .header_read_timeout(None)
                    .max_header_size(limits.max_header_size)
                    .max_buf_size(CONNECTION_BUFFER);
                let Some(tls) = &tls else {
                    let client = Peer {
                        addr: peer.ip(),
                        certified: false,
                    };
                    let clock = ConnClock::new(limits.timeouts());
                    let body_timeout = BodyTimeout(limits.body_timeout);
                    let service =
                        connection_service(handler.clone(), client, clock.clone(), body_timeout);
                    let stream = Metered::new(stream, clock.clone());
                    let connection = builder.serve_connection(TokioIo::new(stream), service);
                    let connection = graceful.watch(connection);
                    connections.spawn(async move {
                        serve_connection(connection, peer, &clock).await;
                        drop(admitted);
                    });
                    continue;
                };
                // The handshake runs in the connection's task, bounded like a request head.
                let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
                let watcher = graceful.watcher();
                let (header_timeout, timeouts) = (limits.header_timeout, limits.timeouts());
                let body_timeout = BodyTimeout(limits.body_timeout);
                let handler = handler.clone();
                connections.spawn(async move {
                    // Metered beneath TLS: the socket's own bytes, so the tail of a response
                    // leaving the TLS buffer counts as progress.
                    let clock = ConnClock::new(timeouts);
                    let stream = Metered::new(stream, clock.clone());
                    match tokio::time::timeout(header_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            // Any certificate here passed the `client_ca` verifier.
                            let client = Peer {
                                addr: peer.ip(),
                                certified: stream
                                    .get_ref()
                                    .1
                                    .peer_certificates()
                                    .is_some_and(|certs| !certs.is_empty()),
                            };
                            let service =
                                connection_service(handler, client, clock.clone(), body_timeout);
                            let connection =
                                builder.serve_connection(TokioIo::new(stream), service);
                            serve_connection(watcher.watch(connection), peer, &clock).await;
                        }
                        Ok(Err(e)) => {
                            debug!(client.addr = %peer, error = %e, "TLS handshake failed");
                        }
                        Err(_) => debug!(client.addr = %peer, "TLS handshake timed out"),
                    }
                    drop(admitted);
                });
                while connections.try_join_next().is_some() {}
            }
        }
    }

    drop(listener);
    while connections.try_join_next().is_some() {}
    info!(
        connections = connections.len(),
        grace_seconds = grace.as_secs(),
        "draining"
    );
    tokio::select! {
        _ = graceful.shutdown() => info!("all connections finished"),
        _ = tokio::time::sleep(grace) => {
            warn!(connections = connections.len(), "grace period over; closing the rest");
            connections.abort_all();
        }
    }
}

/// What a connection's service answers: a response whose body holds its request in flight.
type ConnResponse = Response<Tracked<ResponseBody>>;

/// The service for one connection: the handler, told which client it serves. Each
/// request counts as in flight on the connection's clock until its response body is done.
fn connection_service(
    handler: Handler,
    client: Peer,
    clock: Arc<ConnClock>,
    body_timeout: BodyTimeout,
) -> TowerToHyperService<
    impl tower::Service<
            Request<Incoming>,
            Response = ConnResponse,
            Error = Infallible,
            Future = impl std::future::Future<Output = Result<ConnResponse, Infallible>> + Send,
        > + Clone,
> {
    TowerToHyperService::new(tower::service_fn(move |mut request: Request<Incoming>| {
        let in_flight = clock.request_started();
        request.extensions_mut().insert(body_timeout);
        let response = handler(client, request);
        async move {
            let response = response.await;
            Ok::<_, Infallible>(response.map(|body| Tracked::new(body, in_flight)))
        }
    }))
}

async fn serve_connection<C>(connection: C, peer: SocketAddr, clock: &ConnClock)
where
    C: std::future::Future<Output = Result<(), hyper::Error>>,
{
    let span = tracing::debug_span!("conn", client.addr = %peer);
    match crate::conn_clock::watch(connection.instrument(span), clock).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => debug!(client.addr = %peer, error = %e, "connection ended with an error"),
        Err(Expired::Head) => {
            debug!(client.addr = %peer, "no whole request head within header_timeout: closed")
        }
        Err(Expired::Idle) => debug!(client.addr = %peer, "idle past idle_timeout: closed"),
        Err(Expired::Send) => {
            debug!(client.addr = %peer, "the client took no byte within send_timeout: closed")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn if_none_match_accepts_lists_weak_tags_and_star() {
        let id = BundleId::of(b"b");
        let tag = format!("\"{id}\"");
        let check = |value: &str| if_none_match(&headers(&[("if-none-match", value)]), &id);
        assert_eq!(check(&tag), IfNoneMatch::Id);
        assert_eq!(check(&format!("\"x\", W/{tag}")), IfNoneMatch::Id);
        assert_eq!(check("*"), IfNoneMatch::Any);
        assert_eq!(check("\"other\""), IfNoneMatch::Other);
        assert_eq!(if_none_match(&headers(&[]), &id), IfNoneMatch::Other);
    }

    #[test]
    fn if_range_with_another_tag_disables_the_range() {
        let id = BundleId::of(b"b");
        assert!(if_range_matches(&headers(&[]), &id));
        assert!(if_range_matches(
            &headers(&[("if-range", &format!("\"{id}\""))]),
            &id
        ));
        assert!(!if_range_matches(
            &headers(&[("if-range", "\"stale\"")]),
            &id
        ));
    }
}
