//! The monitor's configuration: `monitor.toml`, validated with the same `file:line: key:`
//! messages as a relay's config.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::config::{
    AdminConfig, BaseUrl, BeaconConfig, ConfigError, Ctx, RawServer, ServerConfig,
};

/// A validated monitor configuration.
#[derive(Debug, Clone)]
pub struct MonitorConfig {
    /// Name in error bodies and logs.
    pub id: String,
    pub listen: SocketAddr,
    /// The SQLite database holding everything the monitor knows.
    pub database: PathBuf,
    /// Relay state history and served counts older than this are pruned (each relay's
    /// latest state is kept). Default 90 days.
    pub retention: Duration,
    /// `[beacon]`: the key shared with the relays, the accepted clock skew, and the
    /// interval the relays send beacons at (to count missed ones).
    pub beacon: BeaconConfig,
    pub checks: ChecksConfig,
    pub attribution: AttributionConfig,
    /// `[admin] token_file`: protects `POST /v1/deployments`.
    pub admin: AdminConfig,
    /// `tls_cert` + `tls_key` (and `client_ca`) of `[monitor]`: serve HTTPS, and with
    /// `client_ca` require client certificates (relays, and the CLI). `None` = plain HTTP.
    pub tls: Option<crate::tls::ServerFiles>,
    /// `[server]`: connection limits and report sizes, as on a relay (no `max_fills`).
    pub server: ServerConfig,
}

/// `[checks]`: the monitor's own health checks of the relays.
#[derive(Debug, Clone, PartialEq)]
pub struct ChecksConfig {
    /// How often every known relay's `/readyz` is polled. Default 30 s.
    pub interval: Duration,
    /// How long one check may take. Default 5 s.
    pub timeout: Duration,
    /// A relay that sent beacons is `down` after this many beacon intervals without one.
    /// Default 3.
    pub missed_beacons: u32,
    /// A relay is `down` after this many checks in a row without an answer. Default 3.
    pub failed_checks: u32,
    /// Relays checked even before (or without) a beacon from them.
    pub relays: Vec<BaseUrl>,
    /// `ca_file` (and `client_cert` + `client_key`): how `https://` relays are verified,
    /// and the certificate shown to relays that require one. Also what `monitor deploy`
    /// and `monitor report` use to reach an HTTPS monitor.
    pub tls: Option<crate::tls::ClientFiles>,
}

/// `[attribution]`: the thresholds of the failure attribution rules.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttributionConfig {
    /// A failure is site-wide when at least this share of a site's targets failed or
    /// were missing at the deadline. Default 0.5.
    pub site_threshold: f64,
    /// "Same failure everywhere" (policy fail) needs failures at this many sites or more.
    /// Default 2.
    pub policy_min_sites: usize,
}

impl Default for AttributionConfig {
    fn default() -> Self {
        Self {
            site_threshold: 0.5,
            policy_min_sites: 2,
        }
    }
}

impl Default for ChecksConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(30),
            timeout: Duration::from_secs(5),
            missed_beacons: 3,
            failed_checks: 3,
            relays: Vec::new(),
            tls: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    monitor: RawMonitor,
    beacon: Option<RawBeacon>,
    checks: Option<RawChecks>,
    attribution: Option<RawAttribution>,
    admin: Option<RawAdmin>,
    server: Option<RawServer>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMonitor {
    id: Option<Spanned<String>>,
    listen: Spanned<String>,
    database: Spanned<String>,
    retention: Option<Spanned<String>>,
    tls_cert: Option<Spanned<String>>,
    tls_key: Option<Spanned<String>>,
    client_ca: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBeacon {
    key_file: Option<Spanned<String>>,
    max_skew: Option<Spanned<String>>,
    interval: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawChecks {
    interval: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    missed_beacons: Option<Spanned<u32>>,
    failed_checks: Option<Spanned<u32>>,
    #[serde(default)]
    relays: Vec<Spanned<String>>,
    ca_file: Option<Spanned<String>>,
    client_cert: Option<Spanned<String>>,
    client_key: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAttribution {
    site_threshold: Option<Spanned<f64>>,
    policy_min_sites: Option<Spanned<usize>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    token_file: Option<String>,
}

impl MonitorConfig {
    /// Reads and validates the monitor config at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, &path.display().to_string(), base)
    }

    /// Parses config text; `name` is used in messages, relative paths resolve against
    /// `base_dir`.
    pub fn parse(text: &str, name: &str, base_dir: &Path) -> Result<Self, ConfigError> {
        let ctx = Ctx { text, name };
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: name.to_string(),
            line: e.span().map_or(1, |span| ctx.line_of(&span)),
            message: e.message().trim().to_string(),
        })?;

        let id = match &raw.monitor.id {
            Some(id) => ctx.name_value("monitor.id", id)?,
            None => "monitor".to_string(),
        };
        let listen = raw
            .monitor
            .listen
            .get_ref()
            .parse::<SocketAddr>()
            .map_err(|_| {
                let msg = format!(
                    "{:?} is not an address like \"127.0.0.1:7500\"",
                    raw.monitor.listen.get_ref()
                );
                ctx.invalid("monitor.listen", &raw.monitor.listen, msg)
            })?;
        let database = raw.monitor.database.get_ref().trim();
        if database.is_empty() {
            let msg = "must name a file".to_string();
            return Err(ctx.invalid("monitor.database", &raw.monitor.database, msg));
        }
        let database = base_dir.join(database);
        let retention = ctx.duration(
            "monitor.retention",
            raw.monitor.retention.clone(),
            Duration::from_secs(90 * 86_400),
        )?;

        let file = |f: Option<String>| {
            f.and_then(|f| (!f.trim().is_empty()).then(|| base_dir.join(f.trim())))
        };
        let beacon = match raw.beacon {
            None => BeaconConfig {
                interval: Duration::from_secs(30),
                key_file: None,
                max_skew: Duration::from_secs(300),
            },
            Some(raw) => BeaconConfig {
                interval: ctx.duration("beacon.interval", raw.interval, Duration::from_secs(30))?,
                key_file: file(raw.key_file.map(Spanned::into_inner)),
                max_skew: ctx.duration(
                    "beacon.max_skew",
                    raw.max_skew,
                    Duration::from_secs(300),
                )?,
            },
        };

        let mut checks = ChecksConfig::default();
        if let Some(raw) = raw.checks {
            checks.interval = ctx.duration("checks.interval", raw.interval, checks.interval)?;
            checks.timeout = ctx.duration("checks.timeout", raw.timeout, checks.timeout)?;
            for (key, value, slot) in [
                (
                    "checks.missed_beacons",
                    raw.missed_beacons,
                    &mut checks.missed_beacons,
                ),
                (
                    "checks.failed_checks",
                    raw.failed_checks,
                    &mut checks.failed_checks,
                ),
            ] {
                if let Some(value) = value {
                    if *value.get_ref() == 0 {
                        return Err(ctx.invalid(key, &value, "must be at least 1".into()));
                    }
                    *slot = value.into_inner();
                }
            }
            for url in &raw.relays {
                checks.relays.push(ctx.base_url("checks.relays", url)?);
            }
            checks.tls = ctx.client_tls(
                "checks",
                [&raw.ca_file, &raw.client_cert, &raw.client_key],
                base_dir,
            )?;
        }

        let mut attribution = AttributionConfig::default();
        if let Some(raw) = raw.attribution {
            if let Some(share) = raw.site_threshold {
                let value = *share.get_ref();
                if !(value > 0.0 && value <= 1.0) {
                    let msg = "must be a share above 0 and at most 1, like 0.5".into();
                    return Err(ctx.invalid("attribution.site_threshold", &share, msg));
                }
                attribution.site_threshold = value;
            }
            if let Some(sites) = raw.policy_min_sites {
                if *sites.get_ref() < 2 {
                    let msg =
                        "must be at least 2: one site cannot tell a policy from a site".to_string();
                    return Err(ctx.invalid("attribution.policy_min_sites", &sites, msg));
                }
                attribution.policy_min_sites = sites.into_inner();
            }
        }

        let admin = AdminConfig {
            token_file: file(raw.admin.and_then(|a| a.token_file)),
        };
        let tls = ctx.server_tls(
            "monitor",
            [
                &raw.monitor.tls_cert,
                &raw.monitor.tls_key,
                &raw.monitor.client_ca,
            ],
            None,
            base_dir,
        )?;
        let server = match raw.server {
            Some(raw) => ctx.monitor_server(raw)?,
            None => ServerConfig::default(),
        };
        Ok(Self {
            id,
            listen,
            database,
            retention,
            beacon,
            checks,
            attribution,
            admin,
            tls,
            server,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<MonitorConfig, ConfigError> {
        MonitorConfig::parse(text, "monitor.toml", Path::new("/etc/patchrelay"))
    }

    const MINIMAL: &str = "[monitor]\nlisten = \"127.0.0.1:7500\"\ndatabase = \"m.db\"\n";

    #[test]
    fn minimal_config_takes_defaults() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.id, "monitor");
        assert_eq!(config.database, Path::new("/etc/patchrelay/m.db"));
        assert_eq!(config.checks, ChecksConfig::default());
        assert_eq!(config.attribution, AttributionConfig::default());
        assert_eq!(config.beacon.key_file, None);
    }

    #[test]
    fn every_key_parses() {
        let text = format!(
            "{MINIMAL}[beacon]\nkey_file = \"b.key\"\nmax_skew = \"1m\"\ninterval = \"10s\"\n\
             [checks]\ninterval = \"5s\"\ntimeout = \"1s\"\nmissed_beacons = 2\n\
             failed_checks = 4\nrelays = [\"http://10.0.0.1:7420\"]\n\
             ca_file = \"ca.pem\"\nclient_cert = \"c.pem\"\nclient_key = \"c.key\"\n\
             [attribution]\nsite_threshold = 0.8\npolicy_min_sites = 3\n\
             [admin]\ntoken_file = \"admin.token\"\n\
             [server]\nmax_connections = 50\nmax_report_body = \"8 MiB\"\n"
        );
        let config = parse(&text).unwrap();
        let tls = config.checks.tls.clone().unwrap();
        assert_eq!(tls.ca, Path::new("/etc/patchrelay/ca.pem"));
        assert!(tls.cert_and_key.is_some());
        assert_eq!(config.server.max_connections, 50);
        assert_eq!(config.server.max_report_body, 8 << 20);
        assert_eq!(
            config.beacon.key_file.as_deref(),
            Some(Path::new("/etc/patchrelay/b.key"))
        );
        assert_eq!(config.beacon.interval, Duration::from_secs(10));
        assert_eq!(config.checks.missed_beacons, 2);
        assert_eq!(config.checks.failed_checks, 4);
        assert_eq!(config.checks.relays[0].as_str(), "http://10.0.0.1:7420");
        assert_eq!(config.attribution.site_threshold, 0.8);
        assert_eq!(config.attribution.policy_min_sites, 3);
        assert!(config.admin.token_file.is_some());
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let err = parse(&format!("{MINIMAL}[attribution]\nsite_threshold = 1.5\n")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "monitor.toml:5: attribution.site_threshold: must be a share above 0 and at most \
             1, like 0.5"
        );
        let err = parse(&format!("{MINIMAL}[checks]\nrelays = [\"ftp://x\"]\n")).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("monitor.toml:5: checks.relays:"),
            "{err}"
        );
        let err = parse(&format!("{MINIMAL}[checks]\nfailed_checks = 0\n")).unwrap_err();
        assert!(err
            .to_string()
            .contains("checks.failed_checks: must be at least 1"));
        let err = parse(&format!("{MINIMAL}colour = \"blue\"\n")).unwrap_err();
        assert!(err.to_string().contains("monitor.toml:4"), "{err}");
        assert!(err.to_string().contains("unknown field `colour`"), "{err}");
        let err = parse(&format!("{MINIMAL}[server]\nmax_fills = 3\n")).unwrap_err();
        assert!(
            err.to_string()
                .contains("monitor.toml:5: server.max_fills: a monitor fetches no bundles"),
            "{err}"
        );
        let err = parse(&format!("{MINIMAL}tls_key = \"k.pem\"\n")).unwrap_err();
        assert!(
            err.to_string()
                .contains("monitor.tls_cert: tls_cert and tls_key go together"),
            "{err}"
        );
        let err = parse("[monitor]\nlisten = \"here\"\ndatabase = \"m.db\"\n").unwrap_err();
        assert!(err
            .to_string()
            .starts_with("monitor.toml:2: monitor.listen:"));
    }
}
