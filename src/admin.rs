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
use http::{HeaderMap, Method, Response, StatusCode};
use serde::Serialize;
use tracing::info;

use crate::body::{self, ResponseBody};
use crate::bundle::BundleId;
use crate::cache::{Cache, CacheItem};
use crate::server::{ApiError, AppState};

/// One bundle in `GET /v1/admin/cache`.
#[derive(Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct CacheEntry {
    pub id: String,
    pub size: u64,
    /// RFC 3339, UTC.
    pub last_access: String,
    pub pinned: bool,
    /// Part of the current manifest (pre-staging is not built yet: always false).
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

/// Answers an admin request (`path` is what follows `/v1/admin/`).
pub async fn route(
    state: &AppState,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
) -> Result<Response<ResponseBody>, ApiError> {
    authorize(state, headers)?;
    let cache = state.cache.clone();
    let (resource, id) = match path.split_once('/') {
        Some((resource, id)) => (resource, Some(id.parse::<BundleId>()?)),
        None => (path, None),
    };

    match (method, resource, id) {
        (&Method::GET, "cache", None) => {
            let max = cache.max_bytes();
            let (items, used) = blocking(move || Ok((cache.list(), cache.used_bytes()))).await?;
            let bundles = items.into_iter().map(CacheEntry::from).collect();
            json(&CacheListing {
                bundles,
                used_bytes: used,
                cache_max: max,
            })
        }
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
    let Some(token) = &state.admin_token else {
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
    let bundles = cache.list().into_iter().map(CacheEntry::from).collect();
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

fn json<T: Serialize>(value: &T) -> Result<Response<ResponseBody>, ApiError> {
    let bytes = serde_json::to_vec(value).map_err(|e| ApiError::Internal(e.to_string()))?;
    Response::builder()
        .status(StatusCode::OK)
        .header(CONTENT_TYPE, "application/json")
        .header(CONTENT_LENGTH, bytes.len())
        .body(body::full(Bytes::from(bytes)))
        .map_err(|e| ApiError::Internal(e.to_string()))
}
