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
use tokio::sync::Notify;
use tracing::{info, warn};

use super::config::MonitorConfig;
use super::store::{CheckResult, RelayRow, RelayState, Store, StoreError};

/// The HTTP client of the checks: plain, and `https://` verified by `[checks] ca_file`.
pub type HttpClient = Client<crate::tls::Connector, Empty<Bytes>>;

pub fn client(
    timeout: Duration,
    tls: Option<&crate::tls::ClientFiles>,
) -> Result<HttpClient, crate::tls::TlsError> {
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(timeout));
    http.enforce_http(false);
    let connector = crate::tls::connector(http, tls)?;
    Ok(Client::builder(TokioExecutor::new()).build(connector))
}

/// A relay's state at `now` from what the monitor last heard, why, and since when (the
/// time the cause began, as well as the monitor can tell). `None` before anything was
/// heard from it.
///
/// A relay is `down` only when both channels are silent: no beacon for `missed_beacons`
/// intervals (or none ever) and no answer to its health checks (`failed_checks` in a row,
/// or never checked). A relay whose beacons arrive but that the monitor cannot reach (a
/// NAT, a firewall) is `degraded`, and one that answers checks but whose beacons stopped
/// (a key mismatch, a dead parent on the forwarding path) keeps the state its checks say,
/// with the missing beacons among the reasons. Beacons count as missed only from `started`
/// (when this monitor process began listening): a monitor that was down itself must not
/// call every relay down for the beacons it could not receive.
pub fn derive_state(
    relay: &RelayRow,
    now: i64,
    started: i64,
    config: &MonitorConfig,
) -> Option<(RelayState, String, i64)> {
    let interval = (config.beacon.interval.as_millis() as i64).max(1);
    let missed = relay.last_beacon_at.map(|last| {
        let silent = now - last.max(started);
        (silent > interval * i64::from(config.checks.missed_beacons)).then(|| {
            let why = format!(
                "no beacon for {}s (last at {})",
                (now - last) / 1000,
                super::attribution::format_time(last)
            );
            (why, last.max(started) + interval)
        })
    });
    let checks_failing = relay.check_failures >= config.checks.failed_checks;
    let check_error = || {
        format!(
            "{} health check(s) in a row got no answer: {}",
            relay.check_failures,
            relay.check_error.as_deref().unwrap_or("no answer")
        )
    };
    // The newest word from the relay itself: an answered check, or its last beacon.
    let answered_check = relay.check_answered
        && relay.check_at.unwrap_or(i64::MIN) >= relay.last_beacon_at.unwrap_or(i64::MIN);
    let fresh_beacon = matches!(missed, Some(None));

    let silent = match &missed {
        Some(Some(_)) | None => !relay.check_answered,
        Some(None) => false,
    };
    if silent && (checks_failing || relay.check_at.is_none()) {
        let mut reasons = Vec::new();
        let mut since = now;
        if let Some(Some((why, first_missed))) = &missed {
            reasons.push(why.clone());
            since = since.min(*first_missed);
        }
        if relay.check_failures > 0 {
            reasons.push(check_error());
            since = since.min(relay.check_failing_since.unwrap_or(now));
        }
        if reasons.is_empty() {
            return None;
        }
        return Some((RelayState::Down, reasons.join("; "), since));
    }

    let (ready, failed, degraded, source) = if answered_check || !fresh_beacon {
        if !relay.check_answered {
            return None;
        }
        (
            relay.check_ready,
            &relay.check_failed,
            &relay.check_degraded,
            "check",
        )
    } else {
        (
            relay.beacon_ready,
            &relay.beacon_failed,
            &relay.beacon_degraded,
            "beacon",
        )
    };
    let mut degraded = degraded.clone();
    if let Some(Some((why, _))) = &missed {
        degraded.push(why.clone());
    }
    if fresh_beacon && relay.check_failures > 0 {
        degraded.push(format!("not reachable from the monitor: {}", check_error()));
    }
    if !ready {
        let reason = format!("not ready ({source}): {}", failed.join("; "));
        return Some((RelayState::Unready, reason, now));
    }
    // A root whose origin fails still serves its cache (so it calls itself ready), but no
    // bundle it lacks can reach the tree: for distribution, that is not ready.
    let unreachable = crate::health::UPSTREAM_UNREACHABLE;
    if let Some(why) = degraded.iter().find(|d| d.starts_with(unreachable)) {
        let reason = format!("not ready for new bundles ({source}): {why}");
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
        evaluate_one(store, config, &relay.id, now, started);
    }
}

/// Re-evaluates one relay's state and records a change.
pub fn evaluate_one(store: &Store, config: &MonitorConfig, relay: &str, now: i64, started: i64) {
    let updated = store.update_state(relay, |row| derive_state(row, now, started, config));
    match updated {
        Ok(Some((state, reason, true))) if state.is_failure() => {
            warn!(relay.id = %relay, state = state.as_str(), reason = %reason,
                "relay state changed")
        }
        Ok(Some((state, reason, true))) => {
            info!(relay.id = %relay, state = state.as_str(), reason = %reason,
                "relay state changed")
        }
        Ok(_) => {}
        Err(e) => warn!(relay.id = %relay, error = %e, "cannot record a relay's state"),
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
        site: String,
        #[serde(default)]
        failed: Vec<String>,
        #[serde(default)]
        degraded: Vec<String>,
    }
    match serde_json::from_slice::<Readiness>(&body) {
        Ok(r) => CheckResult::Answered {
            relay: r.relay,
            site: r.site,
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

/// Whether a relay's URL names a host the monitor can reach: a relay listening on
/// 0.0.0.0 without `advertise_url` sends an unspecified address (beacons alone then tell
/// its health).
fn checkable(url: &str) -> bool {
    !url.is_empty() && !url.contains("://0.0.0.0") && !url.contains("://[::]")
}

/// One round of health checks: every known relay's `/readyz` at once, then every
/// relay's state re-evaluated. `started` is when this monitor process started (see
/// [`derive_state`]).
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
        .filter(|u| checkable(u))
        .collect();
    urls.sort();
    urls.dedup();

    let timeout = config.checks.timeout;
    let checks = urls.iter().map(|url| async move {
        let result = check(client, url, timeout).await;
        (url.clone(), result, super::now_ms())
    });
    let results = futures_util::future::join_all(checks).await;

    let store = store.clone();
    let config = config.clone();
    let _ = tokio::task::spawn_blocking(move || {
        for (url, result, at) in &results {
            if let Err(e) = store.record_check(url, result, *at) {
                warn!(url = %url, error = %e, "cannot record a health check");
            }
        }
        evaluate_all(&store, &config, super::now_ms(), started);
    })
    .await;
}

/// How long after its deadline a deployment's bundle is still looked for.
const BUNDLE_CHECK_GRACE: i64 = 3_600_000;

/// Asks the root relays, all at once, whether the bundles of recent deployments not yet
/// known present exist; records the answers.
pub async fn bundle_round(store: &Arc<Store>, config: &MonitorConfig, client: &HttpClient) {
    let listed = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || {
            Ok::<_, StoreError>((store.relays()?, store.unsure_bundles()?))
        })
        .await
    };
    let (relays, unsure) = match listed {
        Ok(Ok(listed)) => listed,
        Ok(Err(e)) => {
            warn!(error = %e, "cannot read deployments to check their bundles");
            return;
        }
        Err(_) => return,
    };
    let now = super::now_ms();
    let mut bundles: Vec<String> = unsure
        .iter()
        .filter(|(_, _, deadline)| now <= deadline.saturating_add(BUNDLE_CHECK_GRACE))
        .map(|(_, bundle, _)| bundle.clone())
        .collect();
    bundles.sort();
    bundles.dedup();
    if bundles.is_empty() {
        return;
    }
    let roots: Vec<&str> = relays
        .iter()
        .filter(|r| r.parents.is_empty() && !r.site.is_empty() && checkable(&r.url))
        .map(|r| r.url.as_str())
        .collect();
    let timeout = config.checks.timeout;
    let asks = bundles.iter().map(|bundle| {
        let roots = &roots;
        async move {
            let answers = futures_util::future::join_all(roots.iter().map(|root| async move {
                (
                    root.to_string(),
                    bundle_exists(client, root, bundle, timeout).await,
                )
            }))
            .await;
            (bundle.clone(), bundle_verdict(&answers))
        }
    });
    let verdicts: std::collections::HashMap<String, (&'static str, String)> =
        futures_util::future::join_all(asks)
            .await
            .into_iter()
            .collect();

    let store = store.clone();
    let _ = tokio::task::spawn_blocking(move || {
        for (id, bundle, _) in unsure {
            let Some((state, evidence)) = verdicts.get(&bundle) else {
                continue;
            };
            if let Err(e) = store.set_bundle_state(&id, state, evidence) {
                warn!(deployment = %id, error = %e, "cannot record a bundle check");
            }
        }
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

/// Runs [`round`] and [`bundle_round`] every `[checks] interval`, or at once when
/// `wake` is notified (a new deployment), and prunes history older than
/// `[monitor] retention` once an hour, until the task is dropped. Rounds never overlap.
pub async fn run(
    store: Arc<Store>,
    config: MonitorConfig,
    client: HttpClient,
    started: i64,
    wake: Arc<Notify>,
) {
    let mut tick = tokio::time::interval(config.checks.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pruned = std::time::Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = wake.notified() => {}
        }
        round(&store, &config, &client, started).await;
        bundle_round(&store, &config, &client).await;
        if pruned.elapsed() >= Duration::from_secs(3600) {
            pruned = std::time::Instant::now();
            let retention = config.retention.as_millis() as i64;
            let store = store.clone();
            let before = super::now_ms().saturating_sub(retention);
            match tokio::task::spawn_blocking(move || store.prune(before)).await {
                Ok(Ok(rows)) if rows > 0 => info!(rows, "pruned monitor history"),
                Ok(Err(e)) => warn!(error = %e, "cannot prune monitor history"),
                _ => {}
            }
        }
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

        // A ready root that can reach none of its sources cannot distribute anything new.
        relay.beacon_degraded = vec![format!(
            "{}: every source failed its last fetch",
            crate::health::UPSTREAM_UNREACHABLE
        )];
        let (state, reason, _) = derive_state(&relay, now, 0, &config).unwrap();
        assert_eq!(state, RelayState::Unready);
        assert!(reason.contains("not ready for new bundles"), "{reason}");
        relay.beacon_degraded = vec!["upstream failing over".into()];

        // A newer check saying "not ready" wins over the older beacon.
        relay.check_at = Some(now - 1_000);
        relay.check_answered = true;
        relay.check_failed = vec!["upstream: no parent answered".into()];
        let (state, reason, _) = derive_state(&relay, now, 0, &config).unwrap();
        assert_eq!(state, RelayState::Unready);
        assert!(reason.contains("upstream: no parent answered"), "{reason}");

        // Checks fail but beacons still arrive: reachable by the tree, not by the monitor.
        relay.check_answered = false;
        relay.check_failures = 2;
        relay.check_error = Some("connection refused".into());
        relay.check_failing_since = Some(now - 2_000);
        relay.check_failed.clear();
        relay.beacon_degraded.clear();
        let (state, reason, _) = derive_state(&relay, now, 0, &config).unwrap();
        assert_eq!(state, RelayState::Degraded);
        assert!(
            reason.contains("not reachable from the monitor"),
            "{reason}"
        );

        // Both silent (no beacon for three intervals, checks unanswered): down, dated from
        // the first missed beacon or the first unanswered check, whichever came first.
        relay.last_beacon_at = Some(now - 31_000);
        let (state, reason, since) = derive_state(&relay, now, 0, &config).unwrap();
        assert_eq!(state, RelayState::Down);
        assert!(reason.contains("no beacon for 31s"), "{reason}");
        assert!(reason.contains("connection refused"), "{reason}");
        assert_eq!(since, now - 21_000);
        relay.check_failing_since = Some(now - 40_000);
        assert_eq!(
            derive_state(&relay, now, 0, &config).unwrap().2,
            now - 40_000
        );

        // Beacons stopped but checks answer: its checks tell its state, beacons a reason.
        relay.check_answered = true;
        relay.check_ready = true;
        relay.check_failures = 0;
        relay.check_at = Some(now - 100);
        let (state, reason, _) = derive_state(&relay, now, 0, &config).unwrap();
        assert_eq!(state, RelayState::Degraded);
        assert!(reason.contains("no beacon for 31s"), "{reason}");

        // A monitor that only just started could not hear the beacons it missed.
        relay.check_answered = false;
        relay.check_failures = 2;
        assert_eq!(
            derive_state(&relay, now, now - 1_000, &config).unwrap().0,
            RelayState::Degraded,
            "beacons are not yet missed, so the failing checks only degrade it"
        );

        // A relay known only from the config: checks alone decide.
        let configured = RelayRow {
            id: "http://10.0.0.9:7420".into(),
            check_at: Some(now),
            check_failures: 2,
            check_error: Some("timeout".into()),
            ..RelayRow::default()
        };
        assert_eq!(
            derive_state(&configured, now, 0, &config).unwrap().0,
            RelayState::Down
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
