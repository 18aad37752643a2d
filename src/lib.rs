//! patchrelay: a relay that caches and serves content-addressed software patch bundles.
//!
//! Relays form a tree: each fetches what it lacks from its parents (or, at the root, an
//! origin), verifies every byte against the bundle's BLAKE3 id, and serves its site's
//! agents from its cache. Map of the modules, following one request:
//!
//! - [`server`]: the listener, routing and the bundle handler; errors become responses
//!   there and nowhere else.
//! - [`bundle`]: the bundle id type.  [`range`]: the `Range` header.
//! - [`cache`]: the on-disk layout of complete bundles and in-progress fills.
//! - [`fill`]: one upstream transfer per missing bundle, followed by every request for it.
//! - [`body`]: response bodies streaming from a cached or still-filling file.
//! - [`upstream`]: parents, origin, failover order and the HTTP client.
//! - [`config`]: the TOML config and its validation.  [`stats`]: counters.
//! - [`scrub`]: re-hashing the cache in the background.  [`health`]: /healthz, /readyz.
//! - [`metrics`]: /metrics for Prometheus.  [`beacon`]: signed health beacons.
//! - [`reports`]: agent reports, spooled and forwarded.
//! - [`publish`]: adding local files as bundles.  [`relay`]: start and shutdown.
//! - [`limits`]: bandwidth, request and download caps.  [`units`]: human units.
//! - [`manifest`] and [`prestage`]: the patch cycle and following it down the tree.
//! - [`admin`]: the admin API.  [`cli`]: the command line.  [`notify`]: systemd readiness.
//! - [`tls`]: rustls for the listener and for `https://` upstreams.
//! - [`conn_clock`]: a connection's header and idle keep-alive deadlines.
//! - [`monitor`]: the central monitor: beacons, reports, health checks, deployments,
//!   failure attribution and the dashboard.

#![forbid(unsafe_code)]

pub mod admin;
pub mod beacon;
pub mod body;
pub mod bundle;
pub mod cache;
pub mod cli;
pub mod config;
pub mod conn_clock;
pub mod fill;
pub mod health;
pub mod limits;
pub mod manifest;
pub mod metrics;
pub mod monitor;
pub mod notify;
pub mod prestage;
pub mod publish;
pub mod range;
pub mod relay;
pub mod reports;
pub mod scrub;
pub mod server;
pub mod stats;
pub mod tls;
pub mod units;
pub mod upstream;
