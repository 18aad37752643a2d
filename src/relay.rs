//! A running relay: the cache, the fills, the upstream client and the listener, started
//! together and shut down together.
//!
//! The binary uses [`serve`]; tests and embedders use [`Relay::start`], which returns once
//! the listener is bound, with the address it got.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::cache::{Cache, CacheError};
use crate::config::Config;
use crate::fill::Fills;
use crate::server::{self, AppState};
use crate::stats::{Stats, StatsSnapshot};
use crate::upstream::Upstream;

/// Why a relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
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
}

/// A relay that is accepting connections.
#[derive(Debug)]
pub struct Relay {
    addr: SocketAddr,
    state: Arc<AppState>,
    stop: watch::Sender<bool>,
    server: JoinHandle<()>,
}

impl Relay {
    /// Opens the cache (sweeping leftovers of interrupted fills), binds the listener and
    /// starts serving.
    pub async fn start(config: &Config) -> Result<Self, StartError> {
        let cache_dir = config.relay.cache_dir.clone();
        let (cache, summary) =
            tokio::task::spawn_blocking(move || Cache::open_for_serving(&cache_dir))
                .await
                .expect("cache open does not panic")?;
        if summary.swept_temp_files > 0 {
            warn!(
                files = summary.swept_temp_files,
                "removed temporary files of interrupted fills"
            );
        }

        let listen = config.relay.listen;
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

        let cache = Arc::new(cache);
        let stats = Arc::new(Stats::default());
        let upstream = Arc::new(Upstream::new(&config.upstream, &config.relay.id));
        let fills = Fills::new(cache.clone(), upstream, stats.clone());
        let state = Arc::new(AppState::new(&config.relay.id, cache, fills, stats));

        let parents: Vec<&str> = config.upstream.parents.iter().map(|p| p.as_str()).collect();
        info!(relay.id = %config.relay.id, relay.site = %config.relay.site, listen = %addr,
            parents = ?parents, origin = config.upstream.origin.as_ref().map(|o| o.as_str()),
            cache.dir = %config.relay.cache_dir.display(), cache.bundles = summary.bundles,
            cache.bytes = summary.bytes, version = env!("CARGO_PKG_VERSION"), "relay started");

        let (stop, stopped) = watch::channel(false);
        let server = tokio::spawn(server::run(
            listener,
            state.clone(),
            stopped,
            config.relay.shutdown_grace,
        ));
        Ok(Self {
            addr,
            state,
            stop,
            server,
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

    /// Stops accepting, waits for running responses (up to the grace period), then stops
    /// the fills that are still running.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
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
        self.state.fills.abort_all();
    }
}

/// Runs a relay until SIGTERM or Ctrl-C, then shuts it down gracefully.
pub async fn serve(config: &Config) -> Result<(), StartError> {
    let relay = Relay::start(config).await?;
    wait_for_signal().await.map_err(StartError::Signals)?;
    info!("shutdown requested");
    relay.shutdown().await;
    Ok(())
}

async fn wait_for_signal() -> std::io::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        result = tokio::signal::ctrl_c() => result?,
    }
    Ok(())
}
