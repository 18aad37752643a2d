//! Relay configuration: the TOML file, its validation and the typed [`Config`] it yields.
//!
//! Every error names the file, the line and the key, because the person reading it is an
//! operator at a branch site with a text editor, not a developer with a debugger. Unknown
//! keys are errors too: a misspelt limit that silently does nothing is worse than a refusal
//! to start.

use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Uri;
use serde::Deserialize;
use toml::Spanned;

use crate::bundle::BundleId;

mod check;
mod limits;
pub use check::preflight;
pub use limits::{Caps, LimitsConfig, TimeZone, Window};

/// A validated relay configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this was read from (for messages); `None` when built from a string.
    pub source: Option<PathBuf>,
    pub relay: RelayConfig,
    pub upstream: UpstreamConfig,
    /// `[limits]`: bandwidth and request caps. Absent = unlimited.
    pub limits: LimitsConfig,
    /// `[admin]`: the admin API.
    pub admin: AdminConfig,
    /// `[prestage]`: following the parent's manifest.
    pub prestage: PrestageConfig,
    /// `[health] interval`: how often parents are probed; readiness wants an answer from a
    /// parent or the origin within two intervals. Default 30 s.
    pub health_interval: Duration,
    /// `[monitor]`: where agent reports go.
    pub monitor: MonitorConfig,
    /// `[beacon]`: signed health beacons.
    pub beacon: BeaconConfig,
    /// `[server]`: connection and resource limits of the listener.
    pub server: ServerConfig,
}

/// `[server]`: limits that keep hostile or broken clients from exhausting the relay. Over
/// a limit the relay answers 503 with `Retry-After` instead of falling over.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    /// Open client connections in all. Default 4096.
    pub max_connections: usize,
    /// Open connections from one client address. Default 512: above a child relay's
    /// `max_fills` (each fill is one connection to its parent) plus its probes.
    pub max_connections_per_client: usize,
    /// Time a client has to send a whole request head, counted from the connection's start
    /// or from the first byte after an idle spell (slowloris). Default 20 s.
    pub header_timeout: Duration,
    /// Time a keep-alive connection may sit idle after its last response before it is
    /// closed. Default 30 s: above the 20 s a child relay keeps idle connections to its
    /// parent, so the child closes first and never reuses a connection being closed.
    pub idle_timeout: Duration,
    /// Time a connection may have bytes to send that the client does not take (it stopped
    /// reading) before it is closed. Default 60 s.
    pub send_timeout: Duration,
    /// Time a request body (reports, beacons, deployments, the admin manifest) may stall
    /// between two reads, and beyond it 1 s per kB declared for the whole body, before the
    /// request gets 408 and the connection is closed. Default 20 s.
    pub body_timeout: Duration,
    /// Largest request head (request line and headers); larger gets 431. Default 16 KiB.
    pub max_header_size: usize,
    /// Fills running at once; a request that would start one more gets 503. Default 256.
    pub max_fills: usize,
    /// Largest `POST /v1/reports` body; larger gets 413. Default 4 MiB.
    pub max_report_body: usize,
    /// Most reports in one `POST /v1/reports` batch; more gets 413. Default 10,000.
    pub max_report_batch: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            max_connections_per_client: 512,
            header_timeout: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(30),
            send_timeout: Duration::from_secs(60),
            body_timeout: Duration::from_secs(20),
            max_header_size: 16 * 1024,
            max_fills: 256,
            max_report_body: crate::reports::MAX_BODY,
            max_report_batch: crate::reports::MAX_BATCH,
        }
    }
}

/// `[beacon]`: signed health beacons, sent up the same way as reports.
#[derive(Debug, Clone, PartialEq)]
pub struct BeaconConfig {
    /// How often a beacon is sent. Default 30 s.
    pub interval: Duration,
    /// File holding the 32-byte key (64 hex characters) shared by the tree and the
    /// monitor. `None` = beacons off, and `/v1/beacons` refuses everything.
    pub key_file: Option<PathBuf>,
    /// A received beacon whose timestamp is further than this ahead of now is refused
    /// (older ones are taken where sequences are kept on disk). Default 5 minutes.
    pub max_skew: Duration,
}

impl BeaconConfig {
    /// Reads the key; `Ok(None)` when beacons are off.
    pub fn read_key(&self) -> Result<Option<[u8; 32]>, ConfigError> {
        let Some(path) = &self.key_file else {
            return Ok(None);
        };
        let text = read_secret(path, "beacon.key_file")?;
        let invalid = || ConfigError::Invalid {
            path: path.display().to_string(),
            line: 1,
            key: "beacon.key_file".into(),
            message: "the key must be 64 hex characters (32 bytes)".into(),
        };
        let hash = blake3::Hash::from_hex(text.trim()).map_err(|_| invalid())?;
        Ok(Some(*hash.as_bytes()))
    }
}

/// Reads a secret (a token or key file), refusing one that every user of the machine may
/// read or write: a secret anyone can read authenticates nobody.
pub fn read_secret(path: &Path, key: &str) -> Result<String, ConfigError> {
    use std::os::unix::fs::PermissionsExt;

    let read_error = |source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    };
    let mode = std::fs::metadata(path)
        .map_err(read_error)?
        .permissions()
        .mode();
    if mode & 0o006 != 0 {
        return Err(ConfigError::Invalid {
            path: path.display().to_string(),
            line: 1,
            key: key.to_string(),
            message: format!(
                "this secret is readable or writable by every user (mode {:o}); run \
                 `chmod 600 {}` (or 640 with a group the service runs as)",
                mode & 0o7777,
                path.display()
            ),
        });
    }
    std::fs::read_to_string(path).map_err(read_error)
}

/// `[monitor]`: the upward channel for agent reports.
#[derive(Debug, Clone, PartialEq)]
pub struct MonitorConfig {
    /// Base URL of the central monitor; `None` = send to the parents, which forward.
    pub url: Option<BaseUrl>,
    /// Most bytes of reports kept waiting on disk; beyond it new batches get 503.
    /// Default 256 MiB.
    pub spool_max: u64,
}

const DEFAULT_SPOOL_MAX: u64 = 256 << 20;
const DEFAULT_BEACON_INTERVAL: Duration = Duration::from_secs(30);
const DEFAULT_MAX_SKEW: Duration = Duration::from_secs(300);

/// `[prestage]`: how a relay with parents follows their manifest.
#[derive(Debug, Clone, PartialEq)]
pub struct PrestageConfig {
    /// How often the parent's manifest is polled. Default 10 minutes.
    pub interval: Duration,
    /// When background fills may run (in `limits.timezone`); `None` = any time. A bundle
    /// whose deadline cannot wait for the window starts anyway.
    pub window: Option<Window>,
}

const DEFAULT_PRESTAGE_INTERVAL: Duration = Duration::from_secs(600);
const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(30);

/// `[admin]`: the admin API under `/v1/admin/`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AdminConfig {
    /// File holding the bearer token every admin call must present. `None` = admin API
    /// off.
    pub token_file: Option<PathBuf>,
}

impl AdminConfig {
    /// Reads the token; `Ok(None)` when the admin API is off.
    pub fn read_token(&self) -> Result<Option<String>, ConfigError> {
        let Some(path) = &self.token_file else {
            return Ok(None);
        };
        let text = read_secret(path, "admin.token_file")?;
        let token = text.trim();
        if token.len() < 16 {
            return Err(ConfigError::Invalid {
                path: path.display().to_string(),
                line: 1,
                key: "admin.token_file".into(),
                message: "the token must be at least 16 characters".into(),
            });
        }
        Ok(Some(token.to_string()))
    }
}

/// `[relay]`: who this relay is and where it keeps its cache.
#[derive(Debug, Clone, PartialEq)]
pub struct RelayConfig {
    /// Unique name of this relay; appears in logs, response headers and error bodies.
    pub id: String,
    /// The site (branch office) this relay serves.
    pub site: String,
    /// Address the HTTP listener binds.
    pub listen: SocketAddr,
    /// Cache directory; a relative path in the file is taken relative to the file's folder.
    pub cache_dir: PathBuf,
    /// How long running downloads may continue after SIGTERM before the relay exits.
    /// Default 30 s.
    pub shutdown_grace: Duration,
    /// Most bytes of complete bundles the cache keeps; `None` (the default) = no bound.
    pub cache_max: Option<u64>,
    /// Bundles never evicted, besides published ones and those pinned by the admin API.
    pub pins: Vec<BundleId>,
    /// Bytes per second the background scrub re-hashes; `None` = scrub off. Default
    /// 20 MB/s.
    pub scrub_rate: Option<u64>,
    /// Pause between two scrub passes over the cache. Default 6 h.
    pub scrub_interval: Duration,
    /// The URL others reach this relay at, sent in beacons (the monitor health-checks
    /// it). Default `http://<listen>`.
    pub advertise_url: Option<BaseUrl>,
    /// `tls_cert` + `tls_key` (and `client_ca`): serve HTTPS, and with `client_ca`
    /// require client certificates signed by it (mutual TLS). `None` = plain HTTP.
    pub tls: Option<crate::tls::ServerFiles>,
}

/// `[upstream]`: where this relay fetches what it lacks.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    /// Base URLs of parent relays, in order of preference. Empty for a root.
    pub parents: Vec<BaseUrl>,
    /// URL template with `{id}`, tried after every parent.
    pub origin: Option<OriginTemplate>,
    /// Time allowed to open a TCP connection to a parent. Default 5 s.
    pub connect_timeout: Duration,
    /// A parent that sends no byte (nor response headers) for this long has failed.
    /// Default 15 s.
    pub stall_timeout: Duration,
    /// `ca_file` (and `client_cert` + `client_key`): how `https://` upstreams are verified
    /// and what this relay presents to parents that require client certificates.
    pub tls: Option<crate::tls::ClientFiles>,
}

/// A parent relay's base URL, such as `http://10.1.0.5:7420`, without a trailing slash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl(String);

impl BaseUrl {
    /// The URL of bundle `id` on this parent.
    pub fn bundle_url(&self, id: &BundleId) -> String {
        format!("{}/v1/bundles/{id}", self.0)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An origin URL template containing `{id}`, such as `http://mirror/b/{id}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginTemplate(String);

impl OriginTemplate {
    /// The template with `{id}` replaced by the bundle id.
    pub fn url_for(&self, id: &BundleId) -> String {
        self.0.replace("{id}", &id.to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A configuration that cannot be used, with where and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read config: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Syntax {
        path: String,
        line: usize,
        message: String,
    },
    #[error("{path}:{line}: {key}: {message}")]
    Invalid {
        path: String,
        line: usize,
        key: String,
        message: String,
    },
}

const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(15);
const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
const DEFAULT_SCRUB_RATE: u64 = 20_000_000;
const DEFAULT_SCRUB_INTERVAL: Duration = Duration::from_secs(6 * 3600);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    relay: RawRelay,
    upstream: Option<RawUpstream>,
    limits: Option<limits::RawLimits>,
    admin: Option<RawAdmin>,
    prestage: Option<RawPrestage>,
    health: Option<RawHealth>,
    monitor: Option<RawMonitor>,
    beacon: Option<RawBeacon>,
    server: Option<RawServer>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBeacon {
    interval: Option<Spanned<String>>,
    key_file: Option<Spanned<String>>,
    max_skew: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMonitor {
    url: Option<Spanned<String>>,
    spool_max: Option<Spanned<String>>,
}

/// `[server]` as written; shared by the relay's and the monitor's configs.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawServer {
    max_connections: Option<Spanned<usize>>,
    max_connections_per_client: Option<Spanned<usize>>,
    header_timeout: Option<Spanned<String>>,
    idle_timeout: Option<Spanned<String>>,
    send_timeout: Option<Spanned<String>>,
    body_timeout: Option<Spanned<String>>,
    max_header_size: Option<Spanned<String>>,
    max_fills: Option<Spanned<usize>>,
    max_report_body: Option<Spanned<String>>,
    max_report_batch: Option<Spanned<usize>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    interval: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrestage {
    interval: Option<Spanned<String>>,
    days: Option<Spanned<Vec<String>>>,
    from: Option<Spanned<String>>,
    to: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    token_file: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRelay {
    id: Spanned<String>,
    site: Spanned<String>,
    listen: Spanned<String>,
    cache_dir: Spanned<String>,
    cache_max: Option<Spanned<String>>,
    advertise_url: Option<Spanned<String>>,
    scrub_rate: Option<Spanned<String>>,
    scrub_interval: Option<Spanned<String>>,
    #[serde(default)]
    pins: Vec<Spanned<String>>,
    shutdown_grace: Option<Spanned<String>>,
    tls_cert: Option<Spanned<String>>,
    tls_key: Option<Spanned<String>>,
    client_ca: Option<Spanned<String>>,
    require_client_cert: Option<Spanned<bool>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    #[serde(default)]
    parents: Vec<Spanned<String>>,
    origin: Option<Spanned<String>>,
    connect_timeout: Option<Spanned<String>>,
    stall_timeout: Option<Spanned<String>>,
    ca_file: Option<Spanned<String>>,
    client_cert: Option<Spanned<String>>,
    client_key: Option<Spanned<String>>,
}

impl Config {
    /// Reads and validates the config file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut config = Self::parse(&text, &path.display().to_string(), base)?;
        config.source = Some(path.to_path_buf());
        Ok(config)
    }

    /// Parses config text. `name` is used in messages; relative paths resolve against
    /// `base_dir`.
    pub fn parse(text: &str, name: &str, base_dir: &Path) -> Result<Self, ConfigError> {
        let ctx = Ctx { text, name };
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: name.to_string(),
            line: e.span().map_or(1, |span| ctx.line_of(&span)),
            message: e.message().trim().to_string(),
        })?;

        let relay = ctx.relay(raw.relay, base_dir)?;
        let upstream = match raw.upstream {
            Some(up) => ctx.upstream(up, &relay, base_dir)?,
            None => UpstreamConfig {
                parents: Vec::new(),
                origin: None,
                connect_timeout: DEFAULT_CONNECT_TIMEOUT,
                stall_timeout: DEFAULT_STALL_TIMEOUT,
                tls: None,
            },
        };
        let limits = match raw.limits {
            Some(raw) => ctx.limits(raw)?,
            None => LimitsConfig::default(),
        };
        let prestage = match raw.prestage {
            None => PrestageConfig {
                interval: DEFAULT_PRESTAGE_INTERVAL,
                window: None,
            },
            Some(raw) => ctx.prestage(raw)?,
        };
        let health_interval = ctx.duration(
            "health.interval",
            raw.health.and_then(|h| h.interval),
            DEFAULT_HEALTH_INTERVAL,
        )?;
        let monitor = match raw.monitor {
            None => MonitorConfig {
                url: None,
                spool_max: DEFAULT_SPOOL_MAX,
            },
            Some(raw) => ctx.monitor(raw)?,
        };
        let beacon = match raw.beacon {
            None => BeaconConfig {
                interval: DEFAULT_BEACON_INTERVAL,
                key_file: None,
                max_skew: DEFAULT_MAX_SKEW,
            },
            Some(raw) => BeaconConfig {
                interval: ctx.duration("beacon.interval", raw.interval, DEFAULT_BEACON_INTERVAL)?,
                key_file: raw.key_file.and_then(|f| {
                    let f = f.into_inner();
                    (!f.trim().is_empty()).then(|| base_dir.join(f.trim()))
                }),
                max_skew: ctx.duration("beacon.max_skew", raw.max_skew, DEFAULT_MAX_SKEW)?,
            },
        };
        let server = match raw.server {
            None => ServerConfig::default(),
            Some(raw) => ctx.server(raw)?,
        };
        let admin = AdminConfig {
            token_file: raw.admin.and_then(|a| a.token_file).and_then(|file| {
                let file = file.into_inner();
                (!file.trim().is_empty()).then(|| base_dir.join(file.trim()))
            }),
        };
        Ok(Self {
            source: None,
            relay,
            upstream,
            limits,
            admin,
            prestage,
            health_interval,
            monitor,
            beacon,
            server,
        })
    }

    /// Whether this relay has no parents (it is the top of its tree).
    pub fn is_root(&self) -> bool {
        self.upstream.parents.is_empty()
    }
}

/// The text being parsed, to turn spans into line numbers. Shared with the monitor's
/// config loader.
pub(crate) struct Ctx<'a> {
    pub(crate) text: &'a str,
    pub(crate) name: &'a str,
}

impl Ctx<'_> {
    pub(crate) fn line_of(&self, span: &Range<usize>) -> usize {
        let end = span.start.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    pub(crate) fn invalid<T>(&self, key: &str, value: &Spanned<T>, message: String) -> ConfigError {
        ConfigError::Invalid {
            path: self.name.to_string(),
            line: self.line_of(&value.span()),
            key: key.to_string(),
            message,
        }
    }

    fn relay(&self, raw: RawRelay, base_dir: &Path) -> Result<RelayConfig, ConfigError> {
        let id = self.name_value("relay.id", &raw.id)?;
        let site = self.name_value("relay.site", &raw.site)?;

        let listen = raw.listen.get_ref().parse::<SocketAddr>().map_err(|_| {
            let msg = format!(
                "{:?} is not an address like \"127.0.0.1:7420\"",
                raw.listen.get_ref()
            );
            self.invalid("relay.listen", &raw.listen, msg)
        })?;

        if raw.cache_dir.get_ref().trim().is_empty() {
            let msg = "must name a directory".to_string();
            return Err(self.invalid("relay.cache_dir", &raw.cache_dir, msg));
        }
        let cache_dir = base_dir.join(raw.cache_dir.get_ref());

        let shutdown_grace = self.duration(
            "relay.shutdown_grace",
            raw.shutdown_grace,
            DEFAULT_SHUTDOWN_GRACE,
        )?;
        let cache_max = match &raw.cache_max {
            None => None,
            Some(v) => match crate::units::parse_size(v.get_ref()) {
                Ok(bytes) if bytes > 0 => Some(bytes),
                Ok(_) => return Err(self.invalid("relay.cache_max", v, "must be above 0".into())),
                Err(msg) => return Err(self.invalid("relay.cache_max", v, msg)),
            },
        };
        let mut pins = Vec::with_capacity(raw.pins.len());
        for pin in &raw.pins {
            let id = pin.get_ref().trim().parse::<BundleId>().map_err(|e| {
                self.invalid("relay.pins", pin, format!("{:?}: {e}", pin.get_ref()))
            })?;
            pins.push(id);
        }
        let scrub_rate = match &raw.scrub_rate {
            None => Some(DEFAULT_SCRUB_RATE),
            Some(v) if v.get_ref().trim().eq_ignore_ascii_case("off") => None,
            Some(v) => match crate::units::parse_rate(v.get_ref()) {
                Ok(Some(rate)) => Some(rate),
                Ok(None) => {
                    let msg = "must be a rate like \"50 MB/s\", or \"off\"".to_string();
                    return Err(self.invalid("relay.scrub_rate", v, msg));
                }
                Err(msg) => return Err(self.invalid("relay.scrub_rate", v, msg)),
            },
        };
        let scrub_interval = self.duration(
            "relay.scrub_interval",
            raw.scrub_interval.clone(),
            DEFAULT_SCRUB_INTERVAL,
        )?;
        let advertise_url = match &raw.advertise_url {
            Some(url) if !url.get_ref().trim().is_empty() => {
                Some(self.base_url("relay.advertise_url", url)?)
            }
            _ => None,
        };
        let tls = self.server_tls(
            "relay",
            [&raw.tls_cert, &raw.tls_key, &raw.client_ca],
            raw.require_client_cert.as_ref(),
            base_dir,
        )?;
        Ok(RelayConfig {
            id,
            site,
            listen,
            cache_dir,
            shutdown_grace,
            cache_max,
            pins,
            scrub_rate,
            scrub_interval,
            advertise_url,
            tls,
        })
    }

    /// `tls_cert`, `tls_key` and `client_ca` of section `section`: a listener's TLS, and
    /// `require_client_cert` (default true) where the section has that key.
    pub(crate) fn server_tls(
        &self,
        section: &str,
        [cert, key, client_ca]: [&Option<Spanned<String>>; 3],
        require_client_cert: Option<&Spanned<bool>>,
        base_dir: &Path,
    ) -> Result<Option<crate::tls::ServerFiles>, ConfigError> {
        let file = |value| file_value(value, base_dir);
        if let Some(require) = require_client_cert {
            if file(client_ca).is_none() {
                let msg = "needs client_ca (the CA client certificates are checked against)";
                return Err(self.invalid(
                    &format!("{section}.require_client_cert"),
                    require,
                    msg.into(),
                ));
            }
        }
        let require_client_cert = require_client_cert.is_none_or(|r| *r.get_ref());
        match (file(cert), file(key), file(client_ca)) {
            (None, None, None) => Ok(None),
            (Some((_, cert)), Some((_, key)), client_ca) => Ok(Some(crate::tls::ServerFiles {
                cert,
                key,
                client_ca: client_ca.map(|(_, ca)| ca),
                require_client_cert,
            })),
            (Some((v, _)), None, _) | (None, Some((v, _)), _) | (None, None, Some((v, _))) => {
                let msg = "tls_cert and tls_key go together (client_ca needs both)".to_string();
                Err(self.invalid(&format!("{section}.tls_cert"), v, msg))
            }
        }
    }

    /// `ca_file`, `client_cert` and `client_key` of section `section`: how a client
    /// verifies `https://` servers and what it presents to those requiring certificates.
    pub(crate) fn client_tls(
        &self,
        section: &str,
        [ca, cert, key]: [&Option<Spanned<String>>; 3],
        base_dir: &Path,
    ) -> Result<Option<crate::tls::ClientFiles>, ConfigError> {
        let file = |value| file_value(value, base_dir);
        match (file(ca), file(cert), file(key)) {
            (None, None, None) => Ok(None),
            (None, Some((v, _)), _) | (None, _, Some((v, _))) => {
                let msg = "client certificates need ca_file (the CA servers are verified by)";
                Err(self.invalid(&format!("{section}.ca_file"), v, msg.into()))
            }
            (Some(_), Some((v, _)), None) | (Some(_), None, Some((v, _))) => {
                let msg = "client_cert and client_key go together".to_string();
                Err(self.invalid(&format!("{section}.client_cert"), v, msg))
            }
            (Some((_, ca)), cert, key) => Ok(Some(crate::tls::ClientFiles {
                ca,
                cert_and_key: cert.zip(key).map(|((_, c), (_, k))| (c, k)),
            })),
        }
    }

    /// `[server]` of a monitor: the same keys but `max_fills` (a monitor fetches nothing).
    pub(crate) fn monitor_server(&self, raw: RawServer) -> Result<ServerConfig, ConfigError> {
        if let Some(v) = &raw.max_fills {
            let msg = "a monitor fetches no bundles; remove this key".to_string();
            return Err(self.invalid("server.max_fills", v, msg));
        }
        self.server(raw)
    }

    pub(crate) fn server(&self, raw: RawServer) -> Result<ServerConfig, ConfigError> {
        let mut server = ServerConfig::default();
        for (key, value, slot) in [
            (
                "server.max_connections",
                raw.max_connections,
                &mut server.max_connections,
            ),
            (
                "server.max_connections_per_client",
                raw.max_connections_per_client,
                &mut server.max_connections_per_client,
            ),
            ("server.max_fills", raw.max_fills, &mut server.max_fills),
            (
                "server.max_report_batch",
                raw.max_report_batch,
                &mut server.max_report_batch,
            ),
        ] {
            if let Some(value) = value {
                if *value.get_ref() == 0 {
                    return Err(self.invalid(key, &value, "must be at least 1".into()));
                }
                *slot = value.into_inner();
            }
        }
        server.header_timeout = self.duration(
            "server.header_timeout",
            raw.header_timeout,
            server.header_timeout,
        )?;
        server.idle_timeout =
            self.duration("server.idle_timeout", raw.idle_timeout, server.idle_timeout)?;
        server.send_timeout =
            self.duration("server.send_timeout", raw.send_timeout, server.send_timeout)?;
        server.body_timeout =
            self.duration("server.body_timeout", raw.body_timeout, server.body_timeout)?;
        if let Some(size) = &raw.max_header_size {
            let bytes = crate::units::parse_size(size.get_ref())
                .map_err(|m| self.invalid("server.max_header_size", size, m))?;
            if !(1024..=1024 * 1024).contains(&bytes) {
                let msg = "must be between 1 KiB and 1 MiB".to_string();
                return Err(self.invalid("server.max_header_size", size, msg));
            }
            server.max_header_size = bytes as usize;
        }
        if let Some(size) = &raw.max_report_body {
            let bytes = crate::units::parse_size(size.get_ref())
                .map_err(|m| self.invalid("server.max_report_body", size, m))?;
            if !(64 * 1024..=256 * 1024 * 1024).contains(&bytes) {
                let msg = "must be between 64 KiB and 256 MiB".to_string();
                return Err(self.invalid("server.max_report_body", size, msg));
            }
            server.max_report_body = bytes as usize;
        }
        Ok(server)
    }

    fn monitor(&self, raw: RawMonitor) -> Result<MonitorConfig, ConfigError> {
        let url = match &raw.url {
            Some(url) if !url.get_ref().trim().is_empty() => {
                Some(self.base_url("monitor.url", url)?)
            }
            _ => None,
        };
        let spool_max = match &raw.spool_max {
            None => DEFAULT_SPOOL_MAX,
            Some(v) => crate::units::parse_size(v.get_ref())
                .map_err(|m| self.invalid("monitor.spool_max", v, m))?,
        };
        Ok(MonitorConfig { url, spool_max })
    }

    fn prestage(&self, raw: RawPrestage) -> Result<PrestageConfig, ConfigError> {
        let interval =
            self.duration("prestage.interval", raw.interval, DEFAULT_PRESTAGE_INTERVAL)?;
        let window = match (&raw.days, &raw.from, &raw.to) {
            (None, None, None) => None,
            (Some(days), Some(from), Some(to)) => {
                Some(self.window_times("prestage", (days, from, to))?)
            }
            _ => {
                return Err(ConfigError::Invalid {
                    path: self.name.to_string(),
                    line: 1,
                    key: "prestage".into(),
                    message: "a window needs all of days, from and to".into(),
                })
            }
        };
        Ok(PrestageConfig { interval, window })
    }

    fn upstream(
        &self,
        raw: RawUpstream,
        relay: &RelayConfig,
        base_dir: &Path,
    ) -> Result<UpstreamConfig, ConfigError> {
        let mut parents = Vec::with_capacity(raw.parents.len());
        for parent in &raw.parents {
            let url = self.base_url("upstream.parents", parent)?;
            if url.0.contains(&format!("//{}", relay.listen)) {
                let msg = format!("{} is this relay's own listen address", url.0);
                return Err(self.invalid("upstream.parents", parent, msg));
            }
            if parents.contains(&url) {
                let msg = format!("{} is listed twice", url.0);
                return Err(self.invalid("upstream.parents", parent, msg));
            }
            parents.push(url);
        }

        let origin = match &raw.origin {
            Some(origin) if !origin.get_ref().trim().is_empty() => {
                Some(self.origin_template(origin)?)
            }
            _ => None,
        };

        let connect_timeout = self.duration(
            "upstream.connect_timeout",
            raw.connect_timeout,
            DEFAULT_CONNECT_TIMEOUT,
        )?;
        let stall_timeout = self.duration(
            "upstream.stall_timeout",
            raw.stall_timeout,
            DEFAULT_STALL_TIMEOUT,
        )?;
        let tls = self.client_tls(
            "upstream",
            [&raw.ca_file, &raw.client_cert, &raw.client_key],
            base_dir,
        )?;
        let https = parents
            .iter()
            .map(BaseUrl::as_str)
            .chain(origin.as_ref().map(OriginTemplate::as_str))
            .find(|url| url.starts_with("https://"));
        if let (Some(url), None) = (https, &tls) {
            let msg = format!("{url} is https: set upstream.ca_file to the CA to verify it by");
            let at = raw.parents.first().or(raw.origin.as_ref());
            if let Some(at) = at {
                return Err(self.invalid("upstream.parents", at, msg));
            }
        }
        Ok(UpstreamConfig {
            parents,
            origin,
            connect_timeout,
            stall_timeout,
            tls,
        })
    }

    /// Ids and sites go into headers and file names: keep them to a safe alphabet.
    pub(crate) fn name_value(
        &self,
        key: &str,
        value: &Spanned<String>,
    ) -> Result<String, ConfigError> {
        let s = value.get_ref();
        let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
        if s.is_empty() || s.len() > 64 || !s.chars().all(ok_char) {
            let msg = format!("{s:?} must be 1 to 64 characters of letters, digits, '-', '_', '.'");
            return Err(self.invalid(key, value, msg));
        }
        Ok(s.clone())
    }

    pub(crate) fn duration(
        &self,
        key: &str,
        value: Option<Spanned<String>>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        let Some(value) = value else {
            return Ok(default);
        };
        match humantime::parse_duration(value.get_ref().trim()) {
            Ok(d) if !d.is_zero() => Ok(d),
            Ok(_) => Err(self.invalid(key, &value, "must be longer than zero".to_string())),
            Err(e) => {
                let msg = format!("{:?} is not a duration like \"15s\" ({e})", value.get_ref());
                Err(self.invalid(key, &value, msg))
            }
        }
    }

    pub(crate) fn base_url(
        &self,
        key: &str,
        value: &Spanned<String>,
    ) -> Result<BaseUrl, ConfigError> {
        let text = value.get_ref().trim().trim_end_matches('/');
        check_http_url(text).map_err(|msg| self.invalid(key, value, msg))?;
        if text.contains(['?', '#']) {
            let msg = format!("{text:?} must be a base URL without query or fragment");
            return Err(self.invalid(key, value, msg));
        }
        Ok(BaseUrl(text.to_string()))
    }

    fn origin_template(&self, value: &Spanned<String>) -> Result<OriginTemplate, ConfigError> {
        let text = value.get_ref().trim();
        if !text.contains("{id}") {
            let msg = format!("{text:?} must contain {{id}} where the bundle id goes");
            return Err(self.invalid("upstream.origin", value, msg));
        }
        let sample = text.replace("{id}", &"0".repeat(64));
        check_http_url(&sample).map_err(|msg| self.invalid("upstream.origin", value, msg))?;
        Ok(OriginTemplate(text.to_string()))
    }
}

/// A path key's value (when not empty) and the path it names, relative to `base_dir`.
fn file_value<'a>(
    value: &'a Option<Spanned<String>>,
    base_dir: &Path,
) -> Option<(&'a Spanned<String>, PathBuf)> {
    value
        .as_ref()
        .filter(|v| !v.get_ref().trim().is_empty())
        .map(|v| (v, base_dir.join(v.get_ref().trim())))
}

/// Checks that `text` is an absolute `http://` or `https://` URL with a host.
fn check_http_url(text: &str) -> Result<(), String> {
    let uri: Uri = text
        .parse()
        .map_err(|e| format!("{text:?} is not a URL ({e})"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err(format!("{text:?} must start with http:// or https://")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("{text:?} has no host"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[relay]
id = "branch-7"
site = "lyon"
listen = "127.0.0.1:7421"
cache_dir = "cache"
shutdown_grace = "10s"

[upstream]
parents = ["http://10.0.0.1:7420/", "http://10.0.0.2:7420"]
origin = "http://mirror.example/b/{id}"
connect_timeout = "2s"
stall_timeout = "1m"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, "relay.toml", Path::new("/etc/patchrelay"))
    }

    fn error_text(text: &str) -> String {
        match parse(text) {
            Ok(_) => panic!("config should have been rejected:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn parses_every_key() {
        let config = parse(GOOD).expect("valid config");
        assert_eq!(config.relay.id, "branch-7");
        assert_eq!(config.relay.site, "lyon");
        assert_eq!(config.relay.listen, "127.0.0.1:7421".parse().unwrap());
        assert_eq!(
            config.relay.cache_dir,
            PathBuf::from("/etc/patchrelay/cache")
        );
        assert_eq!(config.relay.shutdown_grace, Duration::from_secs(10));
        assert_eq!(config.relay.cache_max, None);
        assert!(config.relay.pins.is_empty());
        let parents: Vec<_> = config
            .upstream
            .parents
            .iter()
            .map(BaseUrl::as_str)
            .collect();
        assert_eq!(parents, ["http://10.0.0.1:7420", "http://10.0.0.2:7420"]);
        let id = BundleId::of(b"x");
        assert_eq!(
            config.upstream.origin.as_ref().map(|o| o.url_for(&id)),
            Some(format!("http://mirror.example/b/{id}"))
        );
        assert_eq!(config.upstream.connect_timeout, Duration::from_secs(2));
        assert_eq!(config.upstream.stall_timeout, Duration::from_secs(60));
        assert!(!config.is_root());
    }

    #[test]
    fn upstream_section_is_optional_for_a_root() {
        let text =
            "[relay]\nid = \"r\"\nsite = \"s\"\nlisten = \"127.0.0.1:1\"\ncache_dir = \"c\"\n";
        let config = parse(text).expect("valid root config");
        assert!(config.is_root());
        assert_eq!(config.upstream.stall_timeout, DEFAULT_STALL_TIMEOUT);
    }

    #[test]
    fn bad_duration_names_key_and_line() {
        let text = GOOD.replace("stall_timeout = \"1m\"", "stall_timeout = \"soon\"");
        let err = error_text(&text);
        assert!(
            err.starts_with("relay.toml:13: upstream.stall_timeout:"),
            "{err}"
        );
        assert!(err.contains("soon"), "{err}");
    }

    #[test]
    fn unknown_key_is_rejected_with_its_line() {
        let text = GOOD.replace("site = \"lyon\"", "site = \"lyon\"\nsiet = \"typo\"");
        let err = error_text(&text);
        assert!(err.starts_with("relay.toml:5:"), "{err}");
        assert!(err.contains("siet"), "{err}");
    }

    #[test]
    fn missing_key_is_named() {
        let text = GOOD.replace("site = \"lyon\"\n", "");
        let err = error_text(&text);
        assert!(err.contains("missing field `site`"), "{err}");
    }

    #[test]
    fn syntax_error_has_a_line() {
        let err = error_text("[relay]\nid = \"a\"\nsite = \n");
        assert!(err.starts_with("relay.toml:3:"), "{err}");
    }

    #[test]
    fn bad_listen_address() {
        let err = error_text(&GOOD.replace("127.0.0.1:7421", "localhost"));
        assert!(err.starts_with("relay.toml:5: relay.listen:"), "{err}");
    }

    #[test]
    fn parent_must_be_http_url() {
        let err = error_text(&GOOD.replace("http://10.0.0.2:7420", "ftp://10.0.0.2"));
        assert!(err.starts_with("relay.toml:10: upstream.parents:"), "{err}");
        assert!(err.contains("http://"), "{err}");
    }

    #[test]
    fn relay_cannot_be_its_own_parent() {
        let err = error_text(&GOOD.replace("http://10.0.0.2:7420", "http://127.0.0.1:7421"));
        assert!(err.contains("own listen address"), "{err}");
    }

    #[test]
    fn origin_needs_id_placeholder() {
        let err = error_text(&GOOD.replace("/b/{id}", "/b/"));
        assert!(err.starts_with("relay.toml:11: upstream.origin:"), "{err}");
        assert!(err.contains("{id}"), "{err}");
    }

    #[test]
    fn empty_origin_means_none() {
        let config = parse(&GOOD.replace("http://mirror.example/b/{id}", "")).expect("valid");
        assert!(config.upstream.origin.is_none());
    }

    #[test]
    fn relay_id_alphabet_is_enforced() {
        let err = error_text(&GOOD.replace("branch-7", r"branch 7\r\nX: y"));
        assert!(err.contains("relay.id"), "{err}");
    }

    #[test]
    fn cache_max_and_pins() {
        let id = BundleId::of(b"kb1");
        let text = GOOD.replace(
            "shutdown_grace = \"10s\"",
            &format!("cache_max = \"200 GiB\"\npins = [\"{id}\"]"),
        );
        let config = parse(&text).expect("valid");
        assert_eq!(config.relay.cache_max, Some(200 << 30));
        assert_eq!(config.relay.pins, [id]);

        let err = error_text(&GOOD.replace("shutdown_grace = \"10s\"", "pins = [\"KB1\"]"));
        assert!(err.starts_with("relay.toml:7: relay.pins:"), "{err}");
        let err = error_text(&GOOD.replace("shutdown_grace = \"10s\"", "cache_max = \"big\""));
        assert!(err.starts_with("relay.toml:7: relay.cache_max:"), "{err}");
    }

    #[test]
    fn advertise_url() {
        assert_eq!(parse(GOOD).expect("valid").relay.advertise_url, None);
        let text = GOOD.replace(
            "shutdown_grace = \"10s\"",
            "advertise_url = \"http://relay-7.lyon.example:7420/\"",
        );
        let config = parse(&text).expect("valid");
        let url = config.relay.advertise_url.expect("set");
        assert_eq!(url.as_str(), "http://relay-7.lyon.example:7420");
        let err = error_text(&GOOD.replace("shutdown_grace = \"10s\"", "advertise_url = \"x\""));
        assert!(
            err.starts_with("relay.toml:7: relay.advertise_url:"),
            "{err}"
        );
    }

    #[test]
    fn scrub_keys() {
        let config = parse(GOOD).expect("valid");
        assert_eq!(config.relay.scrub_rate, Some(DEFAULT_SCRUB_RATE));
        assert_eq!(config.relay.scrub_interval, DEFAULT_SCRUB_INTERVAL);
        let with = |keys: &str| GOOD.replace("shutdown_grace = \"10s\"", keys);
        let config = parse(&with("scrub_rate = \"off\"")).expect("valid");
        assert_eq!(config.relay.scrub_rate, None);
        let config = parse(&with("scrub_rate = \"50 MB/s\"\nscrub_interval = \"1h\""));
        let config = config.expect("valid");
        assert_eq!(config.relay.scrub_rate, Some(50_000_000));
        assert_eq!(config.relay.scrub_interval, Duration::from_secs(3600));
        let err = error_text(&with("scrub_rate = \"unlimited\""));
        assert!(err.starts_with("relay.toml:7: relay.scrub_rate:"), "{err}");
    }

    #[test]
    fn zero_timeout_is_rejected() {
        let err = error_text(&GOOD.replace("connect_timeout = \"2s\"", "connect_timeout = \"0s\""));
        assert!(
            err.contains("upstream.connect_timeout: must be longer than zero"),
            "{err}"
        );
    }

    #[test]
    fn secrets_every_user_can_read_are_refused() {
        use std::os::unix::fs::PermissionsExt;

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.token");
        std::fs::write(&path, "a-token-of-more-than-16-chars\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let admin = AdminConfig {
            token_file: Some(path.clone()),
        };
        let err = admin.read_token().unwrap_err().to_string();
        assert!(err.contains("admin.token_file"), "{err}");
        assert!(err.contains("mode 644"), "{err}");
        assert!(err.contains("chmod 600"), "{err}");

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(
            admin.read_token().unwrap().as_deref(),
            Some("a-token-of-more-than-16-chars")
        );

        let key = dir.path().join("beacon.key");
        std::fs::write(&key, "ab".repeat(32)).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o666)).unwrap();
        let beacon = BeaconConfig {
            interval: Duration::from_secs(30),
            key_file: Some(key),
            max_skew: Duration::from_secs(300),
        };
        assert!(beacon
            .read_key()
            .unwrap_err()
            .to_string()
            .contains("beacon.key_file"));
    }

    #[test]
    fn server_limits_parse_and_bad_ones_name_their_line() {
        let config = parse(&format!(
            "{GOOD}\n[server]\nmax_connections = 100\nmax_connections_per_client = 10\n\
             header_timeout = \"5s\"\nidle_timeout = \"2m\"\nbody_timeout = \"9s\"\n\
             send_timeout = \"3m\"\nmax_header_size = \"8 KiB\"\nmax_fills = 3\n\
             max_report_body = \"1 MiB\"\nmax_report_batch = 100\n"
        ))
        .unwrap();
        assert_eq!(
            config.server,
            ServerConfig {
                max_connections: 100,
                max_connections_per_client: 10,
                header_timeout: Duration::from_secs(5),
                idle_timeout: Duration::from_secs(120),
                body_timeout: Duration::from_secs(9),
                send_timeout: Duration::from_secs(180),
                max_header_size: 8192,
                max_fills: 3,
                max_report_body: 1024 * 1024,
                max_report_batch: 100,
            }
        );
        assert_eq!(parse(GOOD).unwrap().server, ServerConfig::default());
        let err = error_text(&format!("{GOOD}\n[server]\nmax_fills = 0\n"));
        assert!(
            err.contains("server.max_fills: must be at least 1"),
            "{err}"
        );
        let err = error_text(&format!("{GOOD}\n[server]\nmax_header_size = \"10 MiB\"\n"));
        assert!(err.contains("server.max_header_size"), "{err}");
        let err = error_text(&format!("{GOOD}\n[server]\nmax_report_body = \"1 KiB\"\n"));
        assert!(
            err.contains("server.max_report_body: must be between 64 KiB and 256 MiB"),
            "{err}"
        );
    }
}
