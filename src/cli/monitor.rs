//! `patchrelay monitor [serve] | deploy | report`: run the central monitor, or talk to a
//! running one.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use chrono::{DateTime, Utc};
use clap::Subcommand;
use http::Method;

use crate::monitor::attribution::DeploymentReport;
use crate::monitor::store::Target;
use crate::monitor::{MonitorConfig, NewDeployment};

#[derive(Debug, Clone, Subcommand)]
pub enum MonitorCommand {
    /// Run the monitor until SIGTERM or Ctrl-C (the default).
    Serve,
    /// Create a deployment: a bundle, its targets and a deadline.
    Deploy {
        /// Deployment id (letters, digits, '-', '_', '.').
        #[arg(long)]
        id: String,
        /// The bundle id (BLAKE3, 64 hex characters).
        #[arg(long)]
        bundle: String,
        /// When every target should have it: RFC 3339 (2026-12-08T06:00:00Z) or a
        /// duration from now ("2h", "3days").
        #[arg(long)]
        deadline: String,
        /// File of targets: one `agent site` pair per line (space or comma separated,
        /// `#` comments), or a JSON array of {"agent", "site"} when it ends in .json.
        #[arg(long)]
        targets: PathBuf,
        /// Monitor base URL; default: the listen address of the config.
        #[arg(long)]
        url: Option<String>,
    },
    /// Show a deployment's progress and failure attribution.
    Report {
        /// The deployment id.
        deployment: String,
        /// Print the JSON report instead of tables.
        #[arg(long)]
        json: bool,
        /// Monitor base URL; default: the listen address of the config.
        #[arg(long)]
        url: Option<String>,
    },
}

/// Runs a monitor command with the config at `path`.
pub fn run(path: &Path, command: Option<MonitorCommand>) -> ExitCode {
    let config = match MonitorConfig::load(path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("patchrelay: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match command.unwrap_or(MonitorCommand::Serve) {
        MonitorCommand::Serve => return serve(config),
        MonitorCommand::Deploy {
            id,
            bundle,
            deadline,
            targets,
            url,
        } => deploy(&config, id, bundle, &deadline, &targets, url),
        MonitorCommand::Report {
            deployment,
            json,
            url,
        } => report(&config, &deployment, json, url),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("patchrelay: {message}");
            ExitCode::FAILURE
        }
    }
}

fn serve(config: MonitorConfig) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("patchrelay: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(crate::monitor::serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "monitor failed to start");
            eprintln!("patchrelay: {e}");
            ExitCode::FAILURE
        }
    }
}

fn base_url(config: &MonitorConfig, url: Option<String>) -> String {
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    url.map(|u| u.trim_end_matches('/').to_string())
        .unwrap_or_else(|| format!("{scheme}://{}", super::cache::reachable(config.listen)))
}

/// One call to the monitor, with the TLS settings of its own checks.
fn call(
    config: &MonitorConfig,
    method: Method,
    url: &str,
    token: Option<&str>,
    body: Vec<u8>,
) -> Result<Vec<u8>, String> {
    super::http::Call {
        method,
        url,
        token,
        body,
        tls: config.checks.tls.as_ref(),
        what: "monitor",
    }
    .send()
}

/// Parses `--deadline`: RFC 3339, or a duration from `now`.
pub fn parse_deadline(text: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    if let Ok(at) = DateTime::parse_from_rfc3339(text.trim()) {
        return Ok(at.with_timezone(&Utc));
    }
    let after = humantime::parse_duration(text.trim()).map_err(|_| {
        format!("--deadline {text:?}: not RFC 3339 (2026-12-08T06:00:00Z) nor a duration (2h)")
    })?;
    chrono::Duration::from_std(after)
        .ok()
        .and_then(|after| now.checked_add_signed(after))
        .ok_or_else(|| format!("--deadline {text:?}: too far away"))
}

/// Reads a targets file; errors name the file and line.
pub fn read_targets(path: &Path) -> Result<Vec<Target>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read targets: {e}", path.display()))?;
    if path.extension().is_some_and(|e| e == "json") {
        return serde_json::from_str(&text).map_err(|e| {
            format!(
                "{}:{}: targets must be a JSON array of {{\"agent\", \"site\"}}: {e}",
                path.display(),
                e.line()
            )
        });
    }
    let mut targets = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line
            .split([',', ' ', '\t'])
            .filter(|f| !f.is_empty())
            .collect();
        match fields.as_slice() {
            [agent, site] => targets.push(Target {
                agent: agent.to_string(),
                site: site.to_string(),
            }),
            _ => {
                return Err(format!(
                    "{}:{}: expected `agent site`, found {line:?}",
                    path.display(),
                    number + 1
                ))
            }
        }
    }
    Ok(targets)
}

fn deploy(
    config: &MonitorConfig,
    id: String,
    bundle: String,
    deadline: &str,
    targets: &Path,
    url: Option<String>,
) -> Result<(), String> {
    let deployment = NewDeployment {
        id,
        bundle,
        deadline: parse_deadline(deadline, Utc::now())?,
        targets: read_targets(targets)?,
    };
    deployment.validate(Utc::now())?;
    let token = config
        .admin
        .read_token()
        .map_err(|e| e.to_string())?
        .ok_or("the monitor's config has no [admin] token_file; deployments need it")?;
    let body = serde_json::to_vec(&deployment).map_err(|e| e.to_string())?;
    let url = format!("{}/v1/deployments", base_url(config, url));
    call(config, Method::POST, &url, Some(&token), body)?;
    println!(
        "deployment {} created: {} targets, deadline {}",
        deployment.id,
        deployment.targets.len(),
        deployment.deadline.to_rfc3339()
    );
    Ok(())
}

fn report(
    config: &MonitorConfig,
    deployment: &str,
    json: bool,
    url: Option<String>,
) -> Result<(), String> {
    let url = format!("{}/v1/deployments/{deployment}", base_url(config, url));
    let body = call(config, Method::GET, &url, None, Vec::new())?;
    if json {
        println!("{}", String::from_utf8_lossy(&body));
        return Ok(());
    }
    let report: DeploymentReport =
        serde_json::from_slice(&body).map_err(|e| format!("{url}: unexpected answer: {e}"))?;
    print!("{}", render_report(&report));
    Ok(())
}

fn seconds(value: Option<f64>) -> String {
    value.map_or("not yet".into(), |s| format!("{s:.1}s"))
}

/// The report as plain-text tables.
pub fn render_report(r: &DeploymentReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let share = r.installed as f64 * 100.0 / r.targets.max(1) as f64;
    let _ = writeln!(
        out,
        "deployment {}  bundle {}\ncreated {}  deadline {}{}  bundle at root: {}",
        r.id,
        r.bundle,
        r.created_at,
        r.deadline,
        if r.past_deadline { " (passed)" } else { "" },
        r.bundle_state
    );
    let _ = writeln!(
        out,
        "installed {}/{} ({share:.1}%)  failed {}  missing {}  pending {}",
        r.installed, r.targets, r.failed, r.missing, r.pending
    );
    let _ = writeln!(
        out,
        "time to 75%: {}  90%: {}  100%: {}\n",
        seconds(r.time_to.p75_seconds),
        seconds(r.time_to.p90_seconds),
        seconds(r.time_to.p100_seconds)
    );
    let _ = writeln!(
        out,
        "{:<16} {:>7} {:>9} {:>6} {:>7} {:>7} {:>5} {:>5} {:>6} {:>7}  RELAYS",
        "SITE",
        "TARGETS",
        "INSTALLED",
        "FAILED",
        "MISSING",
        "PENDING",
        "RELAY",
        "AGENT",
        "POLICY",
        "UNKNOWN"
    );
    for site in &r.sites {
        let class = |c: &str| site.by_class.get(c).copied().unwrap_or(0);
        let _ = writeln!(
            out,
            "{:<16} {:>7} {:>9} {:>6} {:>7} {:>7} {:>5} {:>5} {:>6} {:>7}  {}",
            site.site,
            site.targets,
            site.installed,
            site.failed,
            site.missing,
            site.pending,
            class("relay"),
            class("agent"),
            class("policy"),
            class("unknown"),
            site.relays.join(",")
        );
    }
    if !r.implicated_relays.is_empty() {
        let _ = writeln!(out, "\nrelays implicated:");
        for relay in &r.implicated_relays {
            let _ = writeln!(
                out,
                "  {} (site {}): {}",
                relay.relay,
                relay.site,
                relay.what.join("; ")
            );
        }
    }
    if !r.verdicts.is_empty() {
        let _ = writeln!(
            out,
            "\n{:<20} {:<16} {:<8} {:<8} {:<24} EVIDENCE",
            "AGENT", "SITE", "STATUS", "CLASS", "RULE"
        );
        for v in &r.verdicts {
            let status = match v.status {
                crate::monitor::attribution::Status::Failed => "failed",
                _ => "missing",
            };
            let _ = writeln!(
                out,
                "{:<20} {:<16} {:<8} {:<8} {:<24} {}",
                v.agent,
                v.site,
                status,
                v.class.as_str(),
                v.rule,
                v.evidence
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_take_rfc3339_or_a_duration() {
        let now = DateTime::parse_from_rfc3339("2026-12-03T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            parse_deadline("2026-12-08T06:00:00Z", now)
                .unwrap()
                .to_rfc3339(),
            "2026-12-08T06:00:00+00:00"
        );
        assert_eq!(
            parse_deadline("2h", now).unwrap().to_rfc3339(),
            "2026-12-03T12:00:00+00:00"
        );
        assert!(parse_deadline("friday", now)
            .unwrap_err()
            .contains("--deadline"));
    }

    #[test]
    fn targets_file_errors_name_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("targets.txt");
        std::fs::write(&path, "# agent site\npc-1 berlin\npc-2,paris\n\npc-3\n").unwrap();
        let err = read_targets(&path).unwrap_err();
        assert!(
            err.ends_with("targets.txt:5: expected `agent site`, found \"pc-3\""),
            "{err}"
        );

        std::fs::write(&path, "pc-1 berlin  # the office\npc-2,paris\n").unwrap();
        let targets = read_targets(&path).unwrap();
        assert_eq!(targets.len(), 2);
        assert_eq!(targets[1].site, "paris");
    }
}
