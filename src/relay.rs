//! A running relay: the cache, the fills, the upstream client and the listener, started
//! together and shut down together.
//!
//! The binary uses [`serve`]; tests and embedders use [`Relay::start`], which returns once
//! the listener is bound, with the address it got.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::beacon::BeaconSender;
use crate::cache::{Cache, CacheBounds, CacheError};
use crate::config::{Config, ConfigError};
use crate::fill::Fills;
use crate::limits::{Limits, SystemClock, WallClock};
use crate::prestage::{Prestage, PrestageStatus};
use crate::reports::{self, Spool, Target};
use crate::scrub::Scrub;
use crate::server::{self, AppState};
use crate::stats::{Stats, StatsSnapshot};
use crate::units::format_rate;
use crate::upstream::Upstream;

/// Why a relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot wait for signals: {0}")]
    Signals(#[source] std::io::Error),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

/// A relay that is accepting connections.
#[derive(Debug)]
pub struct Relay {
    addr: SocketAddr,
    state: Arc<AppState>,
    /// The listener's TLS config (its certificate is read again on reload).
    tls: Option<Arc<crate::tls::Listener>>,
    /// The config in force, to tell on reload what changed.
    config: Mutex<Config>,
    stop: watch::Sender<bool>,
    server: JoinHandle<()>,
    schedule: JoinHandle<()>,
    /// Following the parent's manifest (relays with parents only).
    prestage: Option<JoinHandle<()>>,
    prestage_status: Arc<Mutex<PrestageStatus>>,
    /// Re-hashing the cache (unless `scrub_rate = "off"`).
    scrub: Option<JoinHandle<()>>,
    /// Probing the parents for readiness (relays with parents only).
    probe: Option<JoinHandle<()>>,
    /// Forwarding spooled agent reports up (when there is a monitor or a parent).
    reporter: Option<JoinHandle<()>>,
    /// Writing this relay's beacons and forwarding the beacon outbox (with a key).
    beacons: Vec<JoinHandle<()>>,
}

impl Relay {
    /// Opens the cache (sweeping leftovers of interrupted fills), binds the listener and
    /// starts serving.
    pub async fn start(config: &Config) -> Result<Self, StartError> {
        Self::start_with_clock(config, Arc::new(SystemClock)).await
    }

    /// [`Relay::start`], with schedule windows read from `clock` (tests use a
    /// [`crate::limits::ManualClock`]).
    pub async fn start_with_clock(
        config: &Config,
        clock: Arc<dyn WallClock>,
    ) -> Result<Self, StartError> {
        let admin_token = config.admin.read_token()?;
        let beacon_key = config.beacon.read_key()?;
        let cache_dir = config.relay.cache_dir.clone();
        let bounds = CacheBounds {
            max: config.relay.cache_max,
            pins: config.relay.pins.clone(),
        };
        let (cache, summary) =
            tokio::task::spawn_blocking(move || Cache::open_for_serving(&cache_dir, bounds))
                .await
                .expect("cache open does not panic")?;
        if summary.swept_temp_files > 0 {
            warn!(
                files = summary.swept_temp_files,
                "removed temporary files of interrupted fills"
            );
        }

        let tls = match &config.relay.tls {
            Some(files) => Some(Arc::new(crate::tls::Listener::new(files.clone())?)),
            None => None,
        };
        let listen = config.relay.listen;
        if tls.is_none() && !listen.ip().is_loopback() {
            warn!(listen = %listen, "serving plain HTTP on a non-loopback address: set \
                [relay] tls_cert and tls_key outside a lab");
        }
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| StartError::Bind {
                addr: listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: listen,
            source,
        })?;

        let manifest = crate::manifest::load(&config.relay.cache_dir).unwrap_or_else(|e| {
            warn!(error = %e, "cannot read the saved manifest; starting without one");
            crate::manifest::Manifest::default()
        });
        cache.pin_manifest(&manifest);
        let cache = Arc::new(cache);
        let stats = Arc::new(Stats::default());
        let upstream = Arc::new(Upstream::new(&config.upstream, &config.relay.id)?);
        let limits = Limits::new(config.limits.clone(), clock.clone(), stats.clone());
        let fills = Fills::new(
            cache.clone(),
            upstream.clone(),
            limits.clone(),
            stats.clone(),
        );
        fills.set_max_fills(config.server.max_fills);
        let prestage_status = Arc::new(Mutex::new(PrestageStatus {
            manifest_version: manifest.version,
            ..PrestageStatus::default()
        }));
        let prestage = (!config.is_root()).then(|| Prestage {
            config: config.prestage.clone(),
            timezone: config.limits.timezone,
            cache: cache.clone(),
            fills: fills.clone(),
            upstream: upstream.clone(),
            limits: limits.clone(),
            clock,
            status: prestage_status.clone(),
            no_room: Mutex::default(),
        });
        let mut state = AppState::new(
            &config.relay.id,
            cache,
            fills,
            limits.clone(),
            stats,
            admin_token,
            upstream.clone(),
        );
        state.is_root = config.is_root();
        state.relay_site = config.relay.site.clone();
        state.health_interval = config.health_interval;
        state.beacon_key = beacon_key;
        state.beacon_max_skew = config.beacon.max_skew;
        state.report_limits = server::ReportLimits::from(&config.server);
        if beacon_key.is_some() {
            let outbox = config.relay.cache_dir.join("spool").join("beacons");
            std::fs::create_dir_all(&outbox).map_err(|source| {
                StartError::Cache(CacheError {
                    path: outbox.clone(),
                    source,
                })
            })?;
            state.beacon_outbox = Some(outbox);
            let seqs = config.relay.cache_dir.join("spool").join("beacon-seqs");
            let store = crate::beacon::SeqStore::open(&seqs).map_err(|source| {
                StartError::Cache(CacheError {
                    path: seqs.clone(),
                    source,
                })
            })?;
            state.beacon_seqs = Arc::new(store);
        }
        let spool_dir = config.relay.cache_dir.join("spool").join("reports");
        let spool = Spool::open(&spool_dir, config.monitor.spool_max).map_err(|source| {
            StartError::Cache(CacheError {
                path: spool_dir.clone(),
                source,
            })
        })?;
        let spool = Arc::new(spool);
        state.reports = Some(spool.clone());
        let state = Arc::new(state);

        let caps = limits.caps();
        let parents: Vec<&str> = config.upstream.parents.iter().map(|p| p.as_str()).collect();
        info!(relay.id = %config.relay.id, relay.site = %config.relay.site, listen = %addr,
            parents = ?parents, origin = config.upstream.origin.as_ref().map(|o| o.as_str()),
            cache.dir = %config.relay.cache_dir.display(), cache.bundles = summary.bundles,
            cache.bytes = summary.bytes, limits.downstream = %format_rate(caps.downstream),
            limits.per_client = %format_rate(caps.per_client),
            limits.upstream = %format_rate(caps.upstream), version = env!("CARGO_PKG_VERSION"),
            "relay started");

        let (stop, stopped) = watch::channel(false);
        let grace = config.relay.shutdown_grace;
        let connection_limits = server::ConnectionLimits {
            id: config.relay.id.clone(),
            ..server::ConnectionLimits::from(&config.server)
        };
        let server = tokio::spawn(server::run(
            listener,
            state.clone(),
            connection_limits,
            tls.clone(),
            stopped.clone(),
            grace,
        ));
        let schedule = tokio::spawn(limits.run_schedule(async move {
            let mut stopped = stopped;
            let _ = stopped.wait_for(|stop| *stop).await;
        }));
        let prestage = prestage.map(|task| tokio::spawn(task.run()));
        let probe = (!config.is_root()).then(|| {
            let (upstream, every) = (state.upstream.clone(), config.health_interval);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    upstream.probe_parents().await;
                }
            })
        });
        let receivers: Vec<String> = match &config.monitor.url {
            Some(monitor) => vec![format!("{}/v1/reports", monitor.as_str())],
            None => config
                .upstream
                .parents
                .iter()
                .map(|p| format!("{}/v1/reports", p.as_str()))
                .collect(),
        };
        let beacon_urls: Vec<String> = receivers
            .iter()
            .map(|u| u.replace("/v1/reports", "/v1/beacons"))
            .collect();
        if receivers.is_empty() {
            warn!("no [monitor] url and no parents: agent reports and beacons stay spooled here");
        }
        let reporter = (!receivers.is_empty()).then(|| {
            let target = Target {
                urls: receivers,
                relay_id: config.relay.id.clone(),
                key: beacon_key,
                what: "reports",
                connector: upstream.connector(),
            };
            tokio::spawn(reports::forward(spool.dir().to_path_buf(), target))
        });
        let beacons = match beacon_key {
            Some(key) => {
                let outbox = config.relay.cache_dir.join("spool").join("beacons");
                let sender =
                    BeaconSender::new(config, addr, &state, key, &outbox).map_err(|source| {
                        StartError::Cache(CacheError {
                            path: outbox,
                            source,
                        })
                    })?;
                let mut tasks = vec![tokio::spawn(sender.run())];
                if !beacon_urls.is_empty() {
                    let target = Target {
                        urls: beacon_urls,
                        relay_id: config.relay.id.clone(),
                        key: Some(key),
                        what: "beacons",
                        connector: upstream.connector(),
                    };
                    let dir = config.relay.cache_dir.join("spool").join("beacons");
                    tasks.push(tokio::spawn(reports::forward(dir, target)));
                }
                tasks
            }
            None => Vec::new(),
        };
        let scrub = config.relay.scrub_rate.map(|rate| {
            let task = Scrub {
                cache: state.cache.clone(),
                fills: state.fills.clone(),
                stats: state.stats.clone(),
                rate,
                interval: config.relay.scrub_interval,
            };
            tokio::spawn(task.run())
        });
        Ok(Self {
            addr,
            state,
            tls,
            config: Mutex::new(config.clone()),
            stop,
            server,
            schedule,
            prestage,
            prestage_status,
            scrub,
            probe,
            reporter,
            beacons,
        })
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The relay's counters now.
    pub fn stats(&self) -> StatsSnapshot {
        self.state.stats.snapshot()
    }

    /// Number of fills running now.
    pub fn running_fills(&self) -> usize {
        self.state.fills.running()
    }

    /// Whether the relay is serving pass-through because its cache dir is not writable
    /// (health reports read this).
    pub fn degraded(&self) -> bool {
        self.state.cache.is_degraded()
    }

    /// What pre-staging has done: the manifest followed, fills started, bundles at risk.
    pub fn prestage_status(&self) -> PrestageStatus {
        self.prestage_status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The relay's limits (caps in force, schedule refresh).
    pub fn limits(&self) -> &Arc<Limits> {
        &self.state.limits
    }

    /// Applies a re-read config. Limits take effect at once, for running downloads too;
    /// other changes are logged as needing a restart.
    pub fn reload(&self, new: &Config) {
        let mut config = self.config.lock().unwrap_or_else(|e| e.into_inner());
        self.state.limits.reconfigure(new.limits.clone());
        if new.relay != config.relay {
            warn!("changes to [relay] take effect after a restart");
        }
        if new.upstream != config.upstream {
            warn!("changes to [upstream] take effect after a restart");
        }
        *config = Config {
            relay: config.relay.clone(),
            upstream: config.upstream.clone(),
            ..new.clone()
        };
        info!("config reloaded");
    }

    /// Re-reads the config file this relay was started from; a config with errors is
    /// rejected and the running one stays.
    pub fn reload_from_file(&self) {
        let source = self
            .config
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .source
            .clone();
        let Some(path) = source else {
            warn!("reload requested, but this relay was not started from a file");
            return;
        };
        match Config::load(&path) {
            Ok(new) => self.reload(&new),
            Err(e) => error!(error = %e, "config reload rejected; keeping the running config"),
        }
        if let Some(tls) = &self.tls {
            match tls.reload() {
                Ok(()) => info!("TLS certificate and key reloaded"),
                Err(e) => {
                    error!(error = %e, "TLS reload rejected; keeping the running certificate")
                }
            }
        }
    }

    /// Stops accepting, waits for running responses (up to the grace period), then stops
    /// the fills that are still running.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        self.schedule.abort();
        let tasks = [&self.prestage, &self.scrub, &self.probe, &self.reporter];
        for task in tasks.into_iter().flatten().chain(&self.beacons) {
            task.abort();
        }
        if let Err(e) = self.server.await {
            if e.is_panic() {
                std::panic::resume_unwind(e.into_panic());
            }
        }
        self.state.fills.abort_all();
        info!(relay.id = %self.state.relay_id, "relay stopped");
    }
}

impl Relay {
    /// Stops at once, as if the process were killed: connections are cut mid-response and
    /// running fills are abandoned (their temporary files are removed). For failure drills
    /// and tests; [`Relay::shutdown`] is the orderly way.
    pub fn abort(self) {
        self.server.abort();
        self.schedule.abort();
        let tasks = [&self.prestage, &self.scrub, &self.probe, &self.reporter];
        for task in tasks.into_iter().flatten().chain(&self.beacons) {
            task.abort();
        }
        self.state.fills.abort_all();
    }
}

/// Runs a relay until SIGTERM or Ctrl-C, then shuts it down gracefully. SIGHUP re-reads
/// the config file.
pub async fn serve(config: &Config) -> Result<(), StartError> {
    // Handlers first: a signal that arrives once the start line is out must not find
    // the default action (which would kill the process).
    let mut term = signal(SignalKind::terminate()).map_err(StartError::Signals)?;
    let mut hangup = signal(SignalKind::hangup()).map_err(StartError::Signals)?;
    let relay = Relay::start(config).await?;
    crate::notify::notify("READY=1\nSTATUS=serving");
    loop {
        tokio::select! {
            _ = term.recv() => break,
            result = tokio::signal::ctrl_c() => {
                result.map_err(StartError::Signals)?;
                break;
            }
            _ = hangup.recv() => {
                info!("reload requested");
                relay.reload_from_file();
            }
        }
    }
    info!("shutdown requested");
    crate::notify::notify("STOPPING=1");
    relay.shutdown().await;
    Ok(())
}
