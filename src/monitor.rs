//! The central monitor (`patchrelay monitor`): receives beacons and reports from the relay
//! tree, health-checks every relay it knows, keeps deployments, attributes each failed or
//! missing target to a relay, agent or policy failure, and shows it all on a dashboard.
//!
//! It speaks the relay's upward protocol: a relay points `[monitor] url` at it and sends
//! signed beacons and report batches exactly as it would to a parent. State lives in an
//! SQLite database ([`store`]); rules live in [`attribution`]; its own health checks in
//! [`checks`]; the page in [`dashboard`].

pub mod attribution;
pub mod checks;
pub mod config;
pub mod dashboard;
pub mod store;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use http::header::CONTENT_TYPE;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info};

use crate::admin;
use crate::beacon;
use crate::body::{self, ResponseBody};
use crate::bundle::BundleId;
use crate::config::ConfigError;
use crate::reports::{self, SIGNATURE_HEADER};
use crate::server::{self, require_method, ApiError, Handler};
use attribution::{DeploymentReport, Snapshot};
pub use config::MonitorConfig;
use store::{Deployment, RelayRow, StateChange, Store, StoreError, Target};

/// Largest `POST /v1/deployments` body (a million targets of short names fit).
const MAX_DEPLOYMENT_BODY: usize = 64 * 1024 * 1024;

/// Unix time in milliseconds.
pub fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

/// Why the monitor could not start.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("cannot wait for signals: {0}")]
    Signals(#[source] std::io::Error),
}

/// What every monitor request handler can reach.
#[derive(Debug)]
pub struct MonitorState {
    pub config: MonitorConfig,
    pub store: Arc<Store>,
    beacon_key: Option<[u8; 32]>,
    admin_token: Option<String>,
    /// When this process started (Unix ms): beacons missed before it do not count.
    started: i64,
    /// Wakes the check loop for an early round (a new deployment's bundle check).
    wake: Arc<tokio::sync::Notify>,
}

/// A running monitor.
#[derive(Debug)]
pub struct Monitor {
    addr: SocketAddr,
    state: Arc<MonitorState>,
    stop: watch::Sender<bool>,
    server: JoinHandle<()>,
    checks: JoinHandle<()>,
    /// The listener's TLS config, read again on reload.
    tls: Option<Arc<crate::tls::Listener>>,
}

impl Monitor {
    /// Opens the database, binds the listener and starts the health checks.
    pub async fn start(config: MonitorConfig) -> Result<Self, MonitorError> {
        let beacon_key = config.beacon.read_key()?;
        let admin_token = config.admin.read_token()?;
        let store = {
            let path = config.database.clone();
            tokio::task::spawn_blocking(move || Store::open(&path))
                .await
                .map_err(|e| StoreError::Sql(rusqlite::Error::ToSqlConversionFailure(e.into())))??
        };
        let store = Arc::new(store);
        let urls: Vec<String> = config
            .checks
            .relays
            .iter()
            .map(|u| u.as_str().to_string())
            .collect();
        let configured = store.clone();
        tokio::task::spawn_blocking(move || {
            urls.iter()
                .try_for_each(|url| configured.ensure_configured(url))
        })
        .await
        .map_err(|e| StoreError::Sql(rusqlite::Error::ToSqlConversionFailure(e.into())))??;
        let tls = match &config.tls {
            Some(files) => Some(Arc::new(crate::tls::Listener::new(files.clone())?)),
            None => None,
        };
        let check_client = checks::client(config.checks.timeout, config.checks.tls.as_ref())?;
        if tls.is_none() && !config.listen.ip().is_loopback() {
            tracing::warn!(listen = %config.listen, "the monitor serves plain HTTP on a \
                non-loopback address: set [monitor] tls_cert and tls_key outside a lab");
        }
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| MonitorError::Listen {
                    addr: config.listen,
                    source,
                })?;
        let addr = listener
            .local_addr()
            .map_err(|source| MonitorError::Listen {
                addr: config.listen,
                source,
            })?;
        if beacon_key.is_none() {
            tracing::warn!(
                "no [beacon] key_file: beacons are refused, relay health comes \
                from the monitor's own checks only"
            );
        }
        info!(listen = %addr, database = %config.database.display(), monitor.id = %config.id,
            "monitor started");

        let state = Arc::new(MonitorState {
            config: config.clone(),
            store: store.clone(),
            beacon_key,
            admin_token,
            started: now_ms(),
            wake: Arc::default(),
        });
        let (stop, stopped) = watch::channel(false);
        let handler_state = state.clone();
        let handler: Handler = Arc::new(move |client, request| {
            Box::pin(handle(handler_state.clone(), client.addr, request))
        });
        let limits = server::ConnectionLimits {
            id: config.id.clone(),
            ..server::ConnectionLimits::from(&config.server)
        };
        let server = tokio::spawn(server::accept_loop(
            listener,
            handler,
            limits,
            tls.clone(),
            stopped,
            Duration::from_secs(5),
        ));
        let checks = tokio::spawn(checks::run(
            store,
            config,
            check_client,
            state.started,
            state.wake.clone(),
        ));
        Ok(Self {
            addr,
            state,
            stop,
            server,
            checks,
            tls,
        })
    }

    /// Reads the listener's certificate and key again (SIGHUP); on error the running
    /// ones stay and an error line says why.
    pub fn reload_tls(&self) {
        let Some(tls) = &self.tls else { return };
        match tls.reload() {
            Ok(()) => info!("TLS certificate and key reloaded"),
            Err(e) => tracing::error!(error = %e, "TLS reload rejected; keeping the running \
                certificate"),
        }
    }

    /// The address the monitor listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The monitor's state (store and config), for tests and tools.
    pub fn state(&self) -> &Arc<MonitorState> {
        &self.state
    }

    /// Stops accepting, lets running requests finish, stops the checks.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        self.checks.abort();
        let _ = self.checks.await;
        let _ = self.server.await;
    }
}

/// Runs a monitor until SIGTERM or Ctrl-C; SIGHUP reloads its TLS certificate.
pub async fn serve(config: MonitorConfig) -> Result<(), MonitorError> {
    use tokio::signal::unix::{signal, SignalKind};

    let monitor = Monitor::start(config).await?;
    let mut term = signal(SignalKind::terminate()).map_err(MonitorError::Signals)?;
    let mut hup = signal(SignalKind::hangup()).map_err(MonitorError::Signals)?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = hup.recv() => monitor.reload_tls(),
        }
    }
    info!("monitor stopping");
    monitor.shutdown().await;
    Ok(())
}

async fn handle(
    state: Arc<MonitorState>,
    client: IpAddr,
    request: Request<Incoming>,
) -> Response<ResponseBody> {
    let (method, path) = (request.method().clone(), request.uri().path().to_string());
    let response = match route(&state, request).await {
        Ok(response) => response,
        Err(e) => e.into_response(&state.config.id),
    };
    debug!(client.addr = %client, http.method = %method, http.path = %path,
        http.status = response.status().as_u16(), "request");
    response
}

async fn route(
    state: &Arc<MonitorState>,
    request: Request<Incoming>,
) -> Result<Response<ResponseBody>, ApiError> {
    let path = request.uri().path().to_string();
    match path.as_str() {
        "/" => {
            require_method(request.method(), Method::GET)?;
            let page = blocking(state, dashboard_page).await?;
            html(page)
        }
        "/healthz" => {
            require_method(request.method(), Method::GET)?;
            admin::json(&serde_json::json!({
                "live": true,
                "monitor": state.config.id,
                "version": env!("CARGO_PKG_VERSION"),
            }))
        }
        "/v1/beacons" => receive_beacon(state, request).await,
        "/v1/reports" => receive_reports(state, request).await,
        "/v1/deployments" if request.method() == Method::POST => {
            create_deployment(state, request).await
        }
        "/v1/deployments" => {
            if request.method() != Method::GET {
                return Err(ApiError::Method {
                    method: request.method().clone(),
                    allowed: "GET or POST",
                });
            }
            let list = blocking(state, |s| {
                let now = now_ms();
                let shared = Shared::load(&s.store)?;
                let mut list = Vec::new();
                for deployment in s.store.deployments(MAX_LISTED)? {
                    let report = report_for(s, &shared, &deployment, now)?;
                    list.push(DeploymentSummary::from(report));
                }
                Ok(list)
            })
            .await?;
            admin::json(&list)
        }
        "/v1/relays" => {
            require_method(request.method(), Method::GET)?;
            admin::json(&blocking(state, |s| relay_views(&s.store)).await?)
        }
        _ => {
            if let Some(id) = path.strip_prefix("/v1/deployments/") {
                require_method(request.method(), Method::GET)?;
                let id = id.to_string();
                let report = blocking(state, move |s| match s.store.deployment(&id)? {
                    Some(deployment) => {
                        let shared = Shared::load(&s.store)?;
                        Ok(Some(report_for(s, &shared, &deployment, now_ms())?))
                    }
                    None => Ok(None),
                })
                .await?;
                return match report {
                    Some(report) => admin::json(&report),
                    None => Err(ApiError::NotFound(format!(
                        "no deployment {:?}",
                        path.trim_start_matches("/v1/deployments/")
                    ))),
                };
            }
            if let Some(id) = path.strip_prefix("/v1/relays/") {
                require_method(request.method(), Method::GET)?;
                let id = id.to_string();
                let found = blocking(state, move |s| {
                    let relay = relay_views(&s.store)?
                        .into_iter()
                        .find(|r| r.relay.id == id);
                    Ok(match relay {
                        Some(relay) => Some((relay, s.store.history(Some(&id))?)),
                        None => None,
                    })
                })
                .await?;
                return match found {
                    Some((relay, history)) => admin::json(&serde_json::json!({
                        "relay": relay,
                        "history": history,
                    })),
                    None => Err(ApiError::NotFound(format!(
                        "no relay {:?}",
                        path.trim_start_matches("/v1/relays/")
                    ))),
                };
            }
            Err(ApiError::NoRoute { path })
        }
    }
}

/// Runs store work off the async threads.
async fn blocking<T, F>(state: &Arc<MonitorState>, work: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce(&MonitorState) -> Result<T, StoreError> + Send + 'static,
{
    let state = state.clone();
    tokio::task::spawn_blocking(move || work(&state))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| match e {
            StoreError::DeploymentExists(_) => ApiError::Conflict(e.to_string()),
            StoreError::OldBeacon { .. } => ApiError::Conflict(e.to_string()),
            other => ApiError::Internal(other.to_string()),
        })
}

fn html(page: String) -> Result<Response<ResponseBody>, ApiError> {
    Response::builder()
        .header(CONTENT_TYPE, "text/html; charset=utf-8")
        .header(http::header::CACHE_CONTROL, "no-store")
        .body(body::full(page.into_bytes()))
        .map_err(|e| ApiError::Internal(e.to_string()))
}

/// `POST /v1/beacons`: as a relay parent checks it, then stored; the last sequence per
/// relay is kept in the database, so a replay is refused across restarts too.
async fn receive_beacon(
    state: &Arc<MonitorState>,
    request: Request<Incoming>,
) -> Result<Response<ResponseBody>, ApiError> {
    require_method(request.method(), Method::POST)?;
    let Some(key) = state.beacon_key else {
        return Err(ApiError::NoRoute {
            path: "/v1/beacons (beacons are off: no [beacon] key_file)".into(),
        });
    };
    let signature = header(&request, SIGNATURE_HEADER);
    let body = server::read_body(request, "the beacon body", beacon::MAX_BEACON_BODY).await?;
    // The monitor keeps every relay's last sequence in its database, so it can take the
    // beacons that queued up in the tree while it was away.
    let beacon = beacon::decode(
        &key,
        signature.as_deref(),
        &body,
        state.config.beacon.max_skew,
        true,
    )?;
    let seq = beacon.seq;
    blocking(state, move |s| {
        let now = now_ms();
        let max_skew = s.config.beacon.max_skew.as_millis() as i64;
        s.store.record_beacon(&beacon, now, max_skew)?;
        // A late beacon tells the past: the next check round judges the relay's state now.
        if now - beacon.sent_at.timestamp_millis() <= max_skew {
            checks::evaluate_one(&s.store, &s.config, &beacon.relay, now, s.started);
        }
        Ok(())
    })
    .await?;
    accepted(&serde_json::json!({ "accepted": seq }))
}

fn header(request: &Request<Incoming>, name: &str) -> Option<String> {
    request
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

fn accepted(value: &serde_json::Value) -> Result<Response<ResponseBody>, ApiError> {
    let mut response = admin::json(value)?;
    *response.status_mut() = StatusCode::ACCEPTED;
    Ok(response)
}

/// `POST /v1/reports`: the same checks as a relay (the whole batch validated, signature
/// checked), then stored; duplicates (by `report_id`) are dropped. Unlike a relay, a
/// monitor with a key takes only signed batches: agents report to their site relay, and
/// anything unsigned reaching the monitor is not from the tree.
async fn receive_reports(
    state: &Arc<MonitorState>,
    request: Request<Incoming>,
) -> Result<Response<ResponseBody>, ApiError> {
    require_method(request.method(), Method::POST)?;
    let signature = header(&request, SIGNATURE_HEADER);
    let max_body = state.config.server.max_report_body;
    let body = server::read_body(request, "the reports body", max_body).await?;
    if let Some(key) = &state.beacon_key {
        match &signature {
            Some(sig) if !reports::verify(key, &body, sig) => return Err(ApiError::BadSignature),
            Some(_) => {}
            None => return Err(ApiError::Unsigned),
        }
    }
    let batch = reports::parse_batch(&body, state.config.server.max_report_batch)
        .map_err(ApiError::from_report)?;
    let received = batch.len();
    let added = blocking(state, move |s| s.store.insert_reports(&batch, now_ms())).await?;
    accepted(&serde_json::json!({
        "received": received,
        "accepted": added,
        "relay": state.config.id,
    }))
}

/// The body of `POST /v1/deployments`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewDeployment {
    pub id: String,
    pub bundle: String,
    pub deadline: DateTime<Utc>,
    pub targets: Vec<Target>,
}

impl NewDeployment {
    /// Checks every field against `now`; the message names the first bad one.
    pub fn validate(&self, now: DateTime<Utc>) -> Result<(), String> {
        if self.deadline <= now {
            return Err(format!(
                "`deadline` {} is not in the future",
                self.deadline.to_rfc3339()
            ));
        }
        let name_ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
        if self.id.is_empty() || self.id.len() > 128 || !self.id.chars().all(name_ok) {
            return Err("`id` must be 1 to 128 letters, digits, '-', '_' or '.'".into());
        }
        if self.bundle.parse::<BundleId>().is_err() {
            return Err("`bundle` must be a bundle id (64 lowercase hex characters)".into());
        }
        if self.targets.is_empty() {
            return Err("`targets` is empty".into());
        }
        let mut seen = std::collections::HashSet::new();
        for (i, target) in self.targets.iter().enumerate() {
            if target.agent.trim().is_empty() || target.agent.len() > 256 {
                return Err(format!("target {i}: `agent` must be 1 to 256 characters"));
            }
            let site_ok = !target.site.is_empty()
                && target.site.len() <= 64
                && target.site.chars().all(name_ok);
            if !site_ok {
                return Err(format!(
                    "target {i}: `site` must be a site name (1 to 64 letters, digits, '-', \
                     '_' or '.')"
                ));
            }
            if !seen.insert(target.agent.as_str()) {
                return Err(format!(
                    "target {i}: agent {:?} is listed twice",
                    target.agent
                ));
            }
        }
        Ok(())
    }
}

/// `POST /v1/deployments` (admin token): adds a deployment, then asks the roots at once
/// whether its bundle exists.
async fn create_deployment(
    state: &Arc<MonitorState>,
    request: Request<Incoming>,
) -> Result<Response<ResponseBody>, ApiError> {
    admin::check_bearer(state.admin_token.as_deref(), request.headers())?;
    let body = server::read_body(request, "the deployment", MAX_DEPLOYMENT_BODY).await?;
    let new: NewDeployment = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("deployment: {e}")))?;
    new.validate(Utc::now())
        .map_err(|e| ApiError::BadRequest(format!("deployment: {e}")))?;
    let deployment = Deployment {
        id: new.id.clone(),
        bundle: new.bundle.clone(),
        deadline: new.deadline.timestamp_millis(),
        created_at: now_ms(),
        targets: new.targets,
        bundle_state: "unknown".into(),
        bundle_evidence: String::new(),
    };
    let targets = deployment.targets.len();
    blocking(state, move |s| s.store.create_deployment(&deployment)).await?;
    info!(deployment = %new.id, bundle.id = %new.bundle, targets, "deployment created");

    state.wake.notify_one();

    let mut response = admin::json(&serde_json::json!({
        "id": new.id,
        "bundle": new.bundle,
        "deadline": new.deadline,
        "targets": targets,
    }))?;
    *response.status_mut() = StatusCode::CREATED;
    Ok(response)
}

/// What every deployment's report reads alike: loaded once per request.
pub struct Shared {
    relays: Vec<RelayRow>,
    history: Vec<StateChange>,
}

impl Shared {
    pub fn load(store: &Store) -> Result<Self, StoreError> {
        Ok(Self {
            relays: store.relays()?,
            history: store.history(None)?,
        })
    }
}

/// Deployments `GET /v1/deployments` lists (newest first).
const MAX_LISTED: usize = 100;

/// One deployment's report from the store.
pub fn report_for(
    state: &MonitorState,
    shared: &Shared,
    deployment: &Deployment,
    now: i64,
) -> Result<DeploymentReport, StoreError> {
    let reports = state.store.reports(&deployment.id, &deployment.bundle)?;
    let served = state
        .store
        .served(&deployment.bundle, deployment.created_at - 60_000)?;
    Ok(attribution::evaluate(&Snapshot {
        deployment,
        reports: &reports,
        relays: &shared.relays,
        history: &shared.history,
        served: &served,
        served_slack: state.config.beacon.interval.as_millis() as i64,
        now,
        config: state.config.attribution,
    }))
}

/// The short form in `GET /v1/deployments`.
#[derive(Debug, Serialize)]
pub struct DeploymentSummary {
    pub id: String,
    pub bundle: String,
    pub created_at: String,
    pub deadline: String,
    pub targets: usize,
    pub installed: usize,
    pub failed: usize,
    pub pending: usize,
    pub missing: usize,
    pub time_to: attribution::Milestones,
    pub by_class: std::collections::BTreeMap<String, usize>,
}

impl From<DeploymentReport> for DeploymentSummary {
    fn from(r: DeploymentReport) -> Self {
        Self {
            id: r.id,
            bundle: r.bundle,
            created_at: r.created_at,
            deadline: r.deadline,
            targets: r.targets,
            installed: r.installed,
            failed: r.failed,
            pending: r.pending,
            missing: r.missing,
            time_to: r.time_to,
            by_class: r.by_class,
        }
    }
}

/// A relay as `GET /v1/relays` and the dashboard show it.
#[derive(Debug, Clone, Serialize)]
pub struct RelayView {
    #[serde(flatten)]
    pub relay: RelayRow,
    /// The relay it fetches from (by id), from the parent in use or else its first parent.
    pub parent: Option<String>,
    /// Runs an older version than the newest one seen in the tree.
    pub outdated: bool,
    pub last_beacon_age_seconds: Option<u64>,
}

/// Dotted version numbers, for ordering ("0.10.0" > "0.9.1").
fn version_key(version: &str) -> Vec<u64> {
    version
        .split(['.', '-', '+'])
        .map_while(|part| part.parse().ok())
        .collect()
}

/// Every relay with its place in the tree and whether it is behind on versions.
pub fn relay_views(store: &Store) -> Result<Vec<RelayView>, StoreError> {
    let relays = store.relays()?;
    let now = now_ms();
    let newest = relays
        .iter()
        .filter(|r| !r.version.is_empty())
        .map(|r| version_key(&r.version))
        .max();
    let by_url: HashMap<&str, &str> = relays
        .iter()
        .filter(|r| !r.url.is_empty())
        .map(|r| (r.url.trim_end_matches('/'), r.id.as_str()))
        .collect();
    Ok(relays
        .iter()
        .map(|r| {
            let parent_url = r.parent_in_use.as_ref().or(r.parents.first());
            RelayView {
                parent: parent_url
                    .and_then(|u| by_url.get(u.trim_end_matches('/')))
                    .map(|id| id.to_string()),
                outdated: !r.version.is_empty()
                    && newest
                        .as_ref()
                        .is_some_and(|n| version_key(&r.version) < *n),
                last_beacon_age_seconds: r
                    .last_beacon_at
                    .map(|at| u64::try_from((now - at).max(0) / 1000).unwrap_or(0)),
                relay: r.clone(),
            }
        })
        .collect())
}

fn dashboard_page(state: &MonitorState) -> Result<String, StoreError> {
    let relays = relay_views(&state.store)?;
    let now = now_ms();
    let shared = Shared::load(&state.store)?;
    let mut reports = Vec::new();
    for deployment in state.store.deployments(dashboard::MAX_DEPLOYMENTS)? {
        reports.push(report_for(state, &shared, &deployment, now)?);
    }
    let recent = state.store.recent_changes(dashboard::RECENT_CHANGES)?;
    Ok(dashboard::render(
        &state.config.id,
        &relays,
        &reports,
        &recent,
        now,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_order_numerically() {
        assert!(version_key("0.10.0") > version_key("0.9.7"));
        assert!(version_key("1.0.0") > version_key("0.99"));
        assert_eq!(version_key("0.1.0-beta"), vec![0, 1, 0]);
    }

    #[test]
    fn a_deployment_is_checked_field_by_field() {
        let good = NewDeployment {
            id: "2026-12-kb1".into(),
            bundle: BundleId::of(b"kb1").to_string(),
            deadline: Utc::now(),
            targets: vec![Target {
                agent: "pc-1".into(),
                site: "berlin".into(),
            }],
        };
        let now = Utc::now() - chrono::Duration::seconds(1);
        assert_eq!(good.validate(now), Ok(()));
        assert!(good
            .validate(Utc::now() + chrono::Duration::seconds(1))
            .unwrap_err()
            .contains("not in the future"));
        let mut bad = good.clone();
        bad.bundle = "kb1".into();
        assert!(bad.validate(now).unwrap_err().contains("`bundle`"));
        let mut bad = good.clone();
        bad.targets.push(bad.targets[0].clone());
        assert!(bad.validate(now).unwrap_err().contains("listed twice"));
        let mut bad = good.clone();
        bad.targets[0].site = "no site".into();
        assert!(bad.validate(now).unwrap_err().contains("target 0: `site`"));
        let mut bad = good;
        bad.targets.clear();
        assert!(bad.validate(now).unwrap_err().contains("empty"));
    }
}
