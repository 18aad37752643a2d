//! The admin API under `/v1/admin/`: list the cache, pin, unpin, purge, verify.
//!
//! Every call needs `Authorization: Bearer <token>`, the token read from
//! `[admin] token_file` at start. Without the header the answer is 401, with a wrong token
//! 403; the comparison is of BLAKE3 hashes, which compare in constant time. Without a token
//! file the admin API is off (404). Request headers are never logged, so neither is the
//! token.

use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use http::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::Serialize;
use tracing::info;

use crate::body::{self, ResponseBody};
use crate::bundle::BundleId;
use crate::cache::{Cache, CacheItem};
use crate::manifest::{self, Manifest, ManifestEntry};
use crate::server::{ApiError, AppState};

/// One bundle in `GET /v1/admin/cache`.
#[derive(Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct CacheEntry {
    pub id: String,
    pub size: u64,
    /// RFC 3339, UTC.
    pub last_access: String,
    pub pinned: bool,
    /// Part of the current manifest.
    pub in_manifest: bool,
}

/// `GET /v1/admin/cache`.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct CacheListing {
    pub bundles: Vec<CacheEntry>,
    pub used_bytes: u64,
    pub cache_max: Option<u64>,
}

/// One result of `POST /v1/admin/verify`.
#[derive(Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Verified {
    pub id: String,
    pub ok: bool,
}

impl From<CacheItem> for CacheEntry {
    fn from(item: CacheItem) -> Self {
        let last_access =
            DateTime::<Utc>::from(item.last_access).to_rfc3339_opts(SecondsFormat::Secs, true);
        Self {
            id: item.id.to_string(),
            size: item.size,
            last_access,
            pinned: item.pinned,
            in_manifest: false,
        }
    }
}

/// Answers a request under `/v1/admin/`.
pub async fn route(
    state: &AppState,
    request: Request<Incoming>,
) -> Result<Response<ResponseBody>, ApiError> {
    authorize(state, request.headers())?;
    let method = request.method().clone();
    let path = request
        .uri()
        .path()
        .trim_start_matches("/v1/admin/")
        .to_string();
    if (&method, path.as_str()) == (&Method::PUT, "manifest") {
        return set_manifest(state, request).await;
    }
    let path = path.as_str();
    let cache = state.cache.clone();
    let (resource, id) = match path.split_once('/') {
        Some((resource, id)) => (resource, Some(id.parse::<BundleId>()?)),
        None => (path, None),
    };

    match (&method, resource, id) {
        (&Method::GET, "cache", None) => json(&blocking(move || Ok(listing(&cache))).await?),
        (&Method::PUT, "pins", Some(id)) => {
            blocking(move || cache.pin(&id)).await?;
            info!(bundle.id = %id, "pinned by the admin API");
            json(&serde_json::json!({ "id": id.to_string(), "pinned": true }))
        }
        (&Method::DELETE, "pins", Some(id)) => {
            blocking(move || Ok(unpin(&cache, &id))).await??;
            json(&serde_json::json!({ "id": id.to_string(), "pinned": false }))
        }
        (&Method::DELETE, "cache", Some(id)) => {
            blocking(move || Ok(purge(&cache, &id))).await??;
            json(&serde_json::json!({ "id": id.to_string(), "purged": true }))
        }
        (&Method::POST, "verify", None) => {
            let results = blocking(move || verify_all(&cache)).await?;
            json(&results)
        }
        _ => Err(ApiError::NoRoute {
            path: format!("/v1/admin/{path}"),
        }),
    }
}

fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    check_bearer(state.admin_token.as_deref(), headers)
}

/// Checks `Authorization: Bearer` against `token` (`None` = the admin API is off); the
/// comparison takes the same time wherever the tokens differ.
pub fn check_bearer(token: Option<&str>, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(token) = token else {
        return Err(ApiError::AdminOff);
    };
    let presented = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or(ApiError::Unauthorized)?;
    if blake3::hash(presented.trim().as_bytes()) != blake3::hash(token.as_bytes()) {
        return Err(ApiError::Forbidden);
    }
    Ok(())
}

/// Why an admin operation on the cache was not done.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{0}")]
    Conflict(String),
    #[error("bundle {0} is not cached here")]
    NotCached(BundleId),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl From<AdminError> for ApiError {
    fn from(e: AdminError) -> Self {
        match e {
            AdminError::Conflict(why) => ApiError::Conflict(why),
            AdminError::NotCached(id) => ApiError::NotCached { id },
            AdminError::Io(e) => ApiError::Internal(e.to_string()),
        }
    }
}

/// The cache listing, as `GET /v1/admin/cache` and `patchrelay cache ls` show it.
pub fn listing(cache: &Cache) -> CacheListing {
    let manifest = manifest::load(cache.root()).unwrap_or_default();
    let bundles = cache
        .list()
        .into_iter()
        .map(|item| {
            let in_manifest = manifest.contains(&item.id);
            CacheEntry {
                in_manifest,
                ..CacheEntry::from(item)
            }
        })
        .collect();
    CacheListing {
        bundles,
        used_bytes: cache.used_bytes(),
        cache_max: cache.max_bytes(),
    }
}

/// Removes an admin pin. A pin from the config cannot be removed this way.
pub fn unpin(cache: &Cache, id: &BundleId) -> Result<(), AdminError> {
    if cache.is_config_pinned(id) {
        let why = format!("bundle {id} is pinned in the config; remove it from relay.pins");
        return Err(AdminError::Conflict(why));
    }
    if manifest::load(cache.root())?.contains(id) {
        let why = format!("bundle {id} is in the manifest; it stays pinned until it leaves it");
        return Err(AdminError::Conflict(why));
    }
    if cache.unpin(id)? {
        info!(bundle.id = %id, "unpinned");
    }
    Ok(())
}

/// Removes a bundle from the cache; a pinned one must be unpinned first.
pub fn purge(cache: &Cache, id: &BundleId) -> Result<(), AdminError> {
    if cache.is_pinned(id) {
        return Err(AdminError::Conflict(format!(
            "bundle {id} is pinned; unpin it first"
        )));
    }
    if !cache.purge(id)? {
        return Err(AdminError::NotCached(*id));
    }
    info!(bundle.id = %id, "purged");
    Ok(())
}

/// Re-hashes every cached bundle.
pub fn verify_all(cache: &Cache) -> std::io::Result<Vec<Verified>> {
    let mut results = Vec::new();
    for item in cache.list() {
        if let Some(ok) = cache.verify(&item.id)? {
            results.push(Verified {
                id: item.id.to_string(),
                ok,
            });
        }
    }
    Ok(results)
}

async fn blocking<T, F>(f: F) -> Result<T, ApiError>
where
    F: FnOnce() -> std::io::Result<T> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::Internal(e.to_string()))
}

/// `PUT /v1/admin/manifest` body: the bundles of the new cycle.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestRequest {
    pub bundles: Vec<ManifestRequestEntry>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestRequestEntry {
    pub id: String,
    #[serde(default)]
    pub ready_by: Option<DateTime<Utc>>,
}

/// Largest manifest body accepted.
const MAX_MANIFEST_BODY: usize = 1024 * 1024;

async fn set_manifest(
    state: &AppState,
    request: Request<Incoming>,
) -> Result<Response<ResponseBody>, ApiError> {
    if !state.is_root {
        let why = "this relay takes its manifest from its parent; set it at the root";
        return Err(ApiError::Conflict(why.into()));
    }
    let body = crate::server::read_body(request, "the manifest body", MAX_MANIFEST_BODY).await?;
    let wanted: ManifestRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("manifest body: {e}")))?;
    let mut entries = Vec::with_capacity(wanted.bundles.len());
    for entry in wanted.bundles {
        let id: BundleId = entry.id.parse()?;
        entries.push((id, entry.ready_by));
    }
    let cache = state.cache.clone();
    let manifest = blocking(move || Ok(replace_manifest(&cache, &entries))).await??;
    json(&manifest)
}

/// Makes `entries` the root's manifest, with sizes from the cache and the next version.
/// Every bundle must be in the cache: a manifest names only what the tree can fetch.
pub fn replace_manifest(
    cache: &Cache,
    entries: &[(BundleId, Option<DateTime<Utc>>)],
) -> Result<Manifest, AdminError> {
    // One update at a time in this process, so versions never repeat.
    static UPDATE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = UPDATE.lock().unwrap_or_else(|e| e.into_inner());
    let mut bundles = Vec::with_capacity(entries.len());
    for (id, ready_by) in entries {
        let size = std::fs::metadata(cache.object_path(id)).map_err(|_| {
            AdminError::Conflict(format!("bundle {id} is not cached here; publish it first"))
        })?;
        bundles.push(ManifestEntry {
            id: *id,
            size: size.len(),
            ready_by: *ready_by,
        });
    }
    let version = manifest::load(cache.root())?.version + 1;
    let manifest = Manifest { version, bundles };
    manifest::save(cache.root(), &manifest)?;
    cache.pin_manifest(&manifest);
    info!(
        manifest.version = version,
        bundles = manifest.bundles.len(),
        "manifest set"
    );
    Ok(manifest)
}

/// A JSON response.
pub fn json<T: Serialize>(value: &T) -> Result<Response<ResponseBody>, ApiError> {
    let bytes = serde_json::to_vec(value).map_err(|e| ApiError::Internal(e.to_string()))?;
    Response::builder()
        .status(StatusCode::OK)
        .header(CONTENT_TYPE, "application/json")
        .header(CONTENT_LENGTH, bytes.len())
        .body(body::full(Bytes::from(bytes)))
        .map_err(|e| ApiError::Internal(e.to_string()))
}
