//! Health: `GET /healthz` (live: the process serves) and `GET /readyz` (ready: the cache dir
//! takes writes and, for a relay with parents, a parent or the origin answered lately).
//!
//! `/readyz` answers 200 or 503 with a JSON body naming each failed check, plus the
//! degraded states a relay can serve through: cache dir unwritable (pass-through),
//! integrity failures lately, an upstream source failing while another works.

use std::time::Duration;

use http::{Response, StatusCode};
use serde::Serialize;

use crate::admin;
use crate::body::ResponseBody;
use crate::server::{ApiError, AppState};

/// How a degraded state says that a relay can reach none of its upstream sources; the
/// monitor counts a relay in this state as failing for the bundles it lacked.
pub const UPSTREAM_UNREACHABLE: &str = "upstream unreachable";

/// `GET /readyz`.
#[derive(Debug, Serialize)]
pub struct Readiness {
    pub ready: bool,
    pub relay: String,
    /// The relay's site (`[relay] site`), so a monitor that has only checked it knows it.
    pub site: String,
    pub version: &'static str,
    /// Checks that failed; empty when ready.
    pub failed: Vec<String>,
    /// Conditions the relay serves through, but an operator should know about.
    pub degraded: Vec<String>,
    pub upstream: Vec<UpstreamState>,
}

/// One parent or the origin, as `/readyz` and beacons show it.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct UpstreamState {
    pub url: String,
    /// Seconds since it last answered; `null` if never.
    pub last_success_seconds_ago: Option<u64>,
    pub consecutive_failures: u32,
    pub last_error: Option<String>,
}

/// `GET /healthz`: live.
pub fn live(state: &AppState) -> Result<Response<ResponseBody>, ApiError> {
    admin::json(&serde_json::json!({
        "live": true,
        "relay": state.relay_id,
        "version": env!("CARGO_PKG_VERSION"),
    }))
}

/// `GET /readyz`: ready or not, and why.
pub async fn ready(state: &AppState) -> Result<Response<ResponseBody>, ApiError> {
    let readiness = readiness(state).await;
    let mut response = admin::json(&readiness)?;
    if !readiness.ready {
        *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    }
    Ok(response)
}

/// Evaluates every check.
pub async fn readiness(state: &AppState) -> Readiness {
    let (mut failed, mut degraded) = (Vec::new(), Vec::new());
    let window = state.health_interval * 2;

    let cache = state.cache.clone();
    let writable = tokio::task::spawn_blocking(move || cache.probe_writable())
        .await
        .unwrap_or(false);
    if !writable {
        failed.push("cache_dir: not writable".to_string());
        degraded.push("cache dir not writable: serving pass-through, not caching".into());
    }

    let sources = state.upstream.health();
    if !state.is_root && !state.upstream.answered_within(window) {
        failed.push(format!(
            "upstream: no parent or origin answered in the last {}s",
            secs(window)
        ));
    }
    let answering = sources
        .iter()
        .filter(|(_, h)| h.consecutive_failures == 0)
        .count();
    // A root still serves its cache when its origin fails, so it stays ready; but it
    // cannot fetch anything new, which the monitor must be able to tell from a policy
    // problem (every site failing the same way).
    let failed_lately = |h: &crate::upstream::SourceHealth| {
        h.consecutive_failures > 0 && h.last_failure.is_some_and(|t| t.elapsed() <= window)
    };
    if state.is_root && !sources.is_empty() && sources.iter().all(|(_, h)| failed_lately(h)) {
        let (url, health) = &sources[0];
        let why = health.last_error.as_deref().unwrap_or("failing");
        degraded.push(format!(
            "{UPSTREAM_UNREACHABLE}: every source failed its last fetch ({url}: {why})"
        ));
    }
    for (url, health) in &sources {
        if health.consecutive_failures > 0 && answering > 0 {
            let why = health.last_error.as_deref().unwrap_or("failing");
            degraded.push(format!("upstream failing over: {url}: {why}"));
        }
    }
    if let Some(ago) = state.stats.since_integrity_failure() {
        if ago <= secs(window) {
            degraded.push(format!("integrity failure {ago}s ago"));
        }
    }

    let upstream = sources
        .into_iter()
        .map(|(url, h)| UpstreamState {
            url,
            last_success_seconds_ago: h.last_success.map(|t| t.elapsed().as_secs()),
            consecutive_failures: h.consecutive_failures,
            last_error: h.last_error,
        })
        .collect();
    Readiness {
        ready: failed.is_empty(),
        relay: state.relay_id.clone(),
        site: state.relay_site.clone(),
        version: env!("CARGO_PKG_VERSION"),
        failed,
        degraded,
        upstream,
    }
}

fn secs(d: Duration) -> u64 {
    d.as_secs().max(1)
}
