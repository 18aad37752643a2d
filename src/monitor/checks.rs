//! The monitor's own view of relay health: it polls `/readyz` of every relay it knows,
//! derives each relay's state from those checks and from its beacons, and keeps the
//! history of state changes. It also asks the root relays whether each deployment's
//! bundle exists.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tracing::{info, warn};

use super::config::MonitorConfig;
use super::store::{CheckResult, RelayRow, RelayState, Store};

/// The HTTP client of the checks.
pub type HttpClient = Client<HttpConnector, Empty<Bytes>>;

pub fn client(timeout: Duration) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(timeout));
    Client::builder(TokioExecutor::new()).build(connector)
}

/// A relay's state at `now` from what the monitor last heard, why, and since when (the
/// time the cause began, as well as the monitor can tell). `None` before anything was
/// heard from it. Beacons are counted missing only from `started` (when this monitor
/// process began listening): a monitor that was down itself must not call every relay
/// down for the beacons it could not receive.
pub fn derive_state(
    relay: &RelayRow,
    now: i64,
    started: i64,
    config: &MonitorConfig,
) -> Option<(RelayState, String, i64)> {
    let interval = config.beacon.interval.as_millis() as i64;
    if let Some(last) = relay.last_beacon_at {
        let allowed = interval * i64::from(config.checks.missed_beacons);
        if now - last.max(started) > allowed {
            let reason = format!(
                "no beacon for {}s (last at {}; {} missed)",
                (now - last) / 1000,
                super::attribution::format_time(last),
                (now - last) / interval.max(1)
            );
            return Some((RelayState::Down, reason, last + interval));
        }
    }
    if relay.check_failures >= config.checks.failed_checks {
        let reason = format!(
            "{} health checks in a row got no answer: {}",
            relay.check_failures,
            relay.check_error.as_deref().unwrap_or("no answer")
        );
        // Down since the first unanswered check, or since the first missed beacon if that
        // came earlier.
        let mut since = relay.check_failing_since.unwrap_or(now);
        if let Some(last) = relay.last_beacon_at {
            since = since.min(last.max(started) + interval);
        }
        return Some((RelayState::Down, reason, since));
    }

    // The newer of the last beacon and the last answered check says how it is.
    let from_check = relay.check_answered
        && relay.check_at.unwrap_or(i64::MIN) >= relay.last_beacon_at.unwrap_or(i64::MIN);
    let (ready, failed, degraded) = if from_check {
        (
            relay.check_ready,
            &relay.check_failed,
            &relay.check_degraded,
        )
    } else if relay.last_beacon_at.is_some() {
        (
            relay.beacon_ready,
            &relay.beacon_failed,
            &relay.beacon_degraded,
        )
    } else {
        return None;
    };
    let source = if from_check { "check" } else { "beacon" };
    if !ready {
        let reason = format!("not ready ({source}): {}", failed.join("; "));
        return Some((RelayState::Unready, reason, now));
    }
    if !degraded.is_empty() {
        let reason = format!("degraded ({source}): {}", degraded.join("; "));
        return Some((RelayState::Degraded, reason, now));
    }
    Some((RelayState::Up, format!("ready ({source})"), now))
}

/// Re-evaluates every relay's state and records the changes.
pub fn evaluate_all(store: &Store, config: &MonitorConfig, now: i64, started: i64) {
    let relays = match store.relays() {
        Ok(relays) => relays,
        Err(e) => {
            warn!(error = %e, "cannot read relays to evaluate their state");
            return;
        }
    };
    for relay in &relays {
        evaluate_one(store, config, relay, now, started);
    }
}

/// Re-evaluates one relay's state and records a change.
pub fn evaluate_one(
    store: &Store,
    config: &MonitorConfig,
    relay: &RelayRow,
    now: i64,
    started: i64,
) {
    let Some((state, reason, since)) = derive_state(relay, now, started, config) else {
        return;
    };
    // The change is dated when its cause began, but never before the previous change.
    let at = since.max(relay.state_since.unwrap_or(i64::MIN)).min(now);
    match store.set_state(&relay.id, state, &reason, at) {
        Ok(true) if state.is_failure() => {
            warn!(relay.id = %relay.id, relay.site = %relay.site, state = state.as_str(),
                reason = %reason, "relay state changed")
        }
        Ok(true) => info!(relay.id = %relay.id, relay.site = %relay.site,
            state = state.as_str(), reason = %reason, "relay state changed"),
        Ok(false) => {}
        Err(e) => warn!(relay.id = %relay.id, error = %e, "cannot record a relay's state"),
    }
}

/// Checks `/readyz` at `url`.
pub async fn check(client: &HttpClient, url: &str, timeout: Duration) -> CheckResult {
    let request = match Request::get(format!("{url}/readyz")).body(Empty::new()) {
        Ok(request) => request,
        Err(e) => return CheckResult::Failed(e.to_string()),
    };
    let answer = tokio::time::timeout(timeout, async {
        let response = client.request(request).await.map_err(|e| chain(&e))?;
        let status = response.status();
        let body = http_body_util::Limited::new(response.into_body(), 256 * 1024)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok::<_, String>((status, body))
    })
    .await;
    let (status, body) = match answer {
        Ok(Ok(answer)) => answer,
        Ok(Err(e)) => return CheckResult::Failed(e),
        Err(_) => return CheckResult::Failed(format!("no answer within {timeout:?}")),
    };
    if status != StatusCode::OK && status != StatusCode::SERVICE_UNAVAILABLE {
        return CheckResult::Failed(format!("/readyz answered {status}"));
    }
    #[derive(serde::Deserialize)]
    struct Readiness {
        ready: bool,
        relay: String,
        #[serde(default)]
        failed: Vec<String>,
        #[serde(default)]
        degraded: Vec<String>,
    }
    match serde_json::from_slice::<Readiness>(&body) {
        Ok(r) => CheckResult::Answered {
            relay: r.relay,
            ready: r.ready,
            failed: r.failed,
            degraded: r.degraded,
        },
        Err(e) => CheckResult::Failed(format!("/readyz body is not a relay's: {e}")),
    }
}

/// Asks a root relay whether `bundle` exists: `Some(true)` for 2xx, `Some(false)` for
/// 404, `None` when it cannot tell.
pub async fn bundle_exists(
    client: &HttpClient,
    root: &str,
    bundle: &str,
    timeout: Duration,
) -> Result<bool, String> {
    let request = Request::builder()
        .method(Method::HEAD)
        .uri(format!("{root}/v1/bundles/{bundle}"))
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    match tokio::time::timeout(timeout, client.request(request)).await {
        Ok(Ok(response)) if response.status().is_success() => Ok(true),
        Ok(Ok(response)) if response.status() == StatusCode::NOT_FOUND => Ok(false),
        Ok(Ok(response)) => Err(format!("answered {}", response.status())),
        Ok(Err(e)) => Err(chain(&e)),
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

/// An error with its causes ("client error (Connect): tcp connect error: Connection
/// refused"), since the outermost alone rarely says what happened.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text = format!("{text}: {cause_text}");
        }
        source = cause.source();
    }
    text
}

/// One round: check every relay, re-evaluate states, check bundles not known present.
/// `started` is when this monitor process started (see [`derive_state`]).
pub async fn round(store: &Arc<Store>, config: &MonitorConfig, client: &HttpClient, started: i64) {
    let relays = {
        let store = store.clone();
        match tokio::task::spawn_blocking(move || store.relays()).await {
            Ok(Ok(relays)) => relays,
            Ok(Err(e)) => {
                warn!(error = %e, "cannot read relays to check");
                return;
            }
            Err(_) => return,
        }
    };
    let mut urls: Vec<String> = config
        .checks
        .relays
        .iter()
        .map(|u| u.as_str().to_string())
        .chain(relays.iter().map(|r| r.url.clone()))
        .filter(|u| !u.is_empty())
        .collect();
    urls.sort();
    urls.dedup();

    let timeout = config.checks.timeout;
    let checks = urls.iter().map(|url| async move {
        let result = check(client, url, timeout).await;
        (url.clone(), result)
    });
    let results = futures_util::future::join_all(checks).await;

    let roots: Vec<String> = relays
        .iter()
        .filter(|r| r.parents.is_empty() && !r.site.is_empty())
        .map(|r| r.url.clone())
        .collect();
    let unsure = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || store.deployments())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default()
            .into_iter()
            .filter(|d| d.bundle_state != "present")
            .collect::<Vec<_>>()
    };
    let mut bundle_states = Vec::new();
    for deployment in unsure {
        let mut answers = Vec::new();
        for root in &roots {
            let answer = bundle_exists(client, root, &deployment.bundle, timeout).await;
            answers.push((root.clone(), answer));
        }
        let (state, evidence) = bundle_verdict(&answers);
        bundle_states.push((deployment.id, state, evidence));
    }

    let store = store.clone();
    let config = config.clone();
    let now = super::now_ms();
    let _ = tokio::task::spawn_blocking(move || {
        for (url, result) in &results {
            if let Err(e) = store.record_check(url, result, now) {
                warn!(url = %url, error = %e, "cannot record a health check");
            }
        }
        for (id, state, evidence) in &bundle_states {
            if let Err(e) = store.set_bundle_state(id, state, evidence) {
                warn!(deployment = %id, error = %e, "cannot record a bundle check");
            }
        }
        evaluate_all(&store, &config, now, started);
    })
    .await;
}

/// "present" if a root has the bundle, "missing" if every root answered 404, else
/// "unknown"; with what each root said.
pub fn bundle_verdict(answers: &[(String, Result<bool, String>)]) -> (&'static str, String) {
    let evidence = answers
        .iter()
        .map(|(root, answer)| match answer {
            Ok(true) => format!("HEAD {root} answered 2xx"),
            Ok(false) => format!("HEAD {root} answered 404"),
            Err(e) => format!("HEAD {root}: {e}"),
        })
        .collect::<Vec<_>>()
        .join("; ");
    let evidence = format!(
        "{evidence} (checked {})",
        super::attribution::format_time(super::now_ms())
    );
    if answers.iter().any(|(_, a)| matches!(a, Ok(true))) {
        ("present", evidence)
    } else if !answers.is_empty() && answers.iter().all(|(_, a)| matches!(a, Ok(false))) {
        ("missing", evidence)
    } else if answers.is_empty() {
        ("unknown", "no root relay known yet".to_string())
    } else {
        ("unknown", evidence)
    }
}

/// Runs [`round`] every `[checks] interval` until the task is dropped.
pub async fn run(store: Arc<Store>, config: MonitorConfig, started: i64) {
    let client = client(config.checks.timeout);
    let mut tick = tokio::time::interval(config.checks.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        round(&store, &config, &client, started).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> MonitorConfig {
        MonitorConfig::parse(
            "[monitor]\nlisten = \"127.0.0.1:0\"\ndatabase = \"m.db\"\n\
             [beacon]\ninterval = \"10s\"\n[checks]\nmissed_beacons = 3\nfailed_checks = 2\n",
            "monitor.toml",
            std::path::Path::new("/tmp"),
        )
        .unwrap()
    }

    #[test]
    fn state_follows_beacons_and_checks() {
        let config = config();
        let now = 1_000_000_000;
        let mut relay = RelayRow {
            id: "r".into(),
            last_beacon_at: Some(now - 5_000),
            beacon_ready: true,
            ..RelayRow::default()
        };
        assert_eq!(
            derive_state(&relay, now, 0, &config).unwrap().0,
            RelayState::Up
        );

        relay.beacon_degraded = vec!["upstream failing over".into()];
        assert_eq!(
            derive_state(&relay, now, 0, &config).unwrap().0,
            RelayState::Degraded
        );

        // A newer check saying "not ready" wins over the older beacon.
        relay.check_at = Some(now - 1_000);
        relay.check_answered = true;
        relay.check_failed = vec!["upstream: no parent answered".into()];
        let (state, reason, _) = derive_state(&relay, now, 0, &config).unwrap();
        assert_eq!(state, RelayState::Unready);
        assert!(reason.contains("upstream: no parent answered"), "{reason}");

        // Two checks without an answer: down.
        relay.check_answered = false;
        relay.check_failures = 2;
        relay.check_error = Some("connection refused".into());
        relay.check_failing_since = Some(now - 2_000);
        let (state, reason, since) = derive_state(&relay, now, 0, &config).unwrap();
        assert_eq!(state, RelayState::Down);
        assert!(reason.contains("connection refused"), "{reason}");
        assert_eq!(since, now - 2_000, "dated from the first unanswered check");
        relay.last_beacon_at = Some(now - 15_000);
        let (_, _, since) = derive_state(&relay, now, 0, &config).unwrap();
        assert_eq!(
            since,
            now - 5_000,
            "or the first missed beacon, when earlier"
        );
        relay.last_beacon_at = Some(now - 5_000);

        // Three beacon intervals without a beacon: down, dated from the first missed one.
        relay.check_failures = 0;
        relay.last_beacon_at = Some(now - 31_000);
        let (state, _, since) = derive_state(&relay, now, 0, &config).unwrap();
        assert_eq!(state, RelayState::Down);
        assert_eq!(since, now - 21_000);

        // Unless the monitor itself only just started: it could not hear them.
        assert_eq!(
            derive_state(&relay, now, now - 1_000, &config).unwrap().0,
            RelayState::Degraded,
            "as its last beacon said"
        );

        // Nothing heard yet: no state.
        assert_eq!(derive_state(&RelayRow::default(), now, 0, &config), None);
    }

    #[test]
    fn a_bundle_is_missing_only_when_every_root_says_404() {
        let a = |r: Result<bool, String>| vec![("http://root".to_string(), r)];
        assert_eq!(bundle_verdict(&a(Ok(false))).0, "missing");
        assert_eq!(bundle_verdict(&a(Ok(true))).0, "present");
        assert_eq!(bundle_verdict(&a(Err("refused".into()))).0, "unknown");
        assert_eq!(bundle_verdict(&[]).0, "unknown");
        let two = vec![
            ("http://r1".to_string(), Ok(false)),
            ("http://r2".to_string(), Err("timeout".to_string())),
        ];
        assert_eq!(bundle_verdict(&two).0, "unknown");
    }
}
