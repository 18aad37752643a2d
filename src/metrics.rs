//! `GET /metrics`: the relay's counters in the OpenMetrics text format Prometheus scrapes,
//! encoded by `prometheus-client` from a snapshot taken at each scrape.
//!
//! Every metric is named `patchrelay_*`; counters end in `_total`. See the README for the
//! full list.

use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::Response;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::body::{self, ResponseBody};
use crate::server::{ApiError, AppState};

/// The content type of the OpenMetrics text format.
const CONTENT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Label pairs of one sample.
type Labels = Vec<(&'static str, String)>;

/// A metric family: name, help, and its samples.
type Family = (&'static str, &'static str, Vec<(Labels, f64)>);

/// Counter and gauge values at one scrape.
#[derive(Debug, Default)]
struct Snapshot {
    counters: Vec<Family>,
    gauges: Vec<Family>,
}

impl Snapshot {
    fn counter(&mut self, name: &'static str, help: &'static str, value: f64) {
        self.counters.push((name, help, vec![(Vec::new(), value)]));
    }

    fn counters(&mut self, name: &'static str, help: &'static str, values: Vec<(Labels, f64)>) {
        self.counters.push((name, help, values));
    }

    fn gauge(&mut self, name: &'static str, help: &'static str, labels: Labels, value: f64) {
        self.gauges.push((name, help, vec![(labels, value)]));
    }
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for (kind, families) in [
            (MetricType::Counter, &self.counters),
            (MetricType::Gauge, &self.gauges),
        ] {
            for (name, help, values) in families {
                let mut family = encoder.encode_descriptor(name, help, None, kind)?;
                for (labels, value) in values {
                    let labels: Vec<(&str, &str)> =
                        labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
                    let metric = family.encode_family(&labels)?;
                    match kind {
                        MetricType::Counter => ConstCounter::new(*value).encode(metric)?,
                        _ => ConstGauge::new(*value).encode(metric)?,
                    }
                }
            }
        }
        Ok(())
    }
}

fn snapshot(state: &AppState) -> Snapshot {
    let stats = &state.stats;
    let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed) as f64;
    let mut s = Snapshot::default();

    let statuses = stats
        .statuses
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    s.counters(
        "patchrelay_requests",
        "HTTP responses sent, by status code.",
        statuses
            .into_iter()
            .map(|(code, n)| (vec![("status", code.to_string())], n as f64))
            .collect(),
    );
    s.counters(
        "patchrelay_bytes",
        "Body bytes, by direction.",
        vec![
            (vec![("direction", "sent".into())], get(&stats.bytes_out)),
            (
                vec![("direction", "received".into())],
                get(&stats.upstream_bytes),
            ),
        ],
    );
    s.counters(
        "patchrelay_cache_requests",
        "Bundle requests, by how they were served.",
        vec![
            (vec![("result", "hit".into())], get(&stats.hits)),
            (vec![("result", "miss".into())], get(&stats.misses)),
            (vec![("result", "joined".into())], get(&stats.joined)),
        ],
    );
    let plain = [
        (
            "patchrelay_fills_started",
            "Upstream transfers started.",
            &stats.fills_started,
        ),
        (
            "patchrelay_fills_completed",
            "Fills verified.",
            &stats.fills_completed,
        ),
        (
            "patchrelay_fills_failed",
            "Fills that ended without the bundle.",
            &stats.fills_failed,
        ),
        (
            "patchrelay_upstream_requests",
            "Requests sent to parents and the origin.",
            &stats.upstream_requests,
        ),
    ];
    for (name, help, counter) in plain {
        s.counter(name, help, get(counter));
    }

    let sources = state.upstream.health();
    s.counters(
        "patchrelay_upstream_errors",
        "Failures of a parent or the origin, by source.",
        sources
            .iter()
            .map(|(url, h)| (vec![("source", url.clone())], h.errors_total as f64))
            .collect(),
    );
    s.counters(
        "patchrelay_upstream_failovers",
        "Times a fill left a source for the next one, by the source left.",
        sources
            .iter()
            .map(|(url, h)| (vec![("source", url.clone())], h.failovers_total as f64))
            .collect(),
    );
    s.counter(
        "patchrelay_integrity_failures",
        "Content that did not hash to its id (fills and scrub).",
        get(&stats.integrity_failures),
    );
    s.counter(
        "patchrelay_evictions",
        "Bundles evicted to make room.",
        state.cache.evictions.load(Ordering::Relaxed) as f64,
    );
    s.counter(
        "patchrelay_throttled_seconds",
        "Time downloads and fills waited for a byte cap.",
        get(&stats.throttled_nanos) / 1e9,
    );
    s.counters(
        "patchrelay_refused",
        "Requests refused by the limits: 429 (rate) and 503 (busy).",
        vec![
            (vec![("reason", "rate".into())], get(&stats.refused_rate)),
            (vec![("reason", "busy".into())], get(&stats.refused_busy)),
        ],
    );

    if let Some(spool) = &state.reports {
        s.counter(
            "patchrelay_reports_refused",
            "Report batches refused with 503 because the spool was full.",
            spool.refused_full.load(Ordering::Relaxed) as f64,
        );
    }
    s.gauge(
        "patchrelay_fills_running",
        "Fills running now.",
        Vec::new(),
        state.fills.running() as f64,
    );
    s.gauge(
        "patchrelay_cache_bytes",
        "Bytes of complete bundles in the cache.",
        Vec::new(),
        state.cache.used_bytes() as f64,
    );
    s.gauge(
        "patchrelay_cache_bundles",
        "Complete bundles in the cache.",
        Vec::new(),
        state.cache.bundle_count() as f64,
    );
    s.gauge(
        "patchrelay_degraded",
        "1 while the cache dir takes no writes (pass-through).",
        Vec::new(),
        f64::from(u8::from(state.cache.is_degraded())),
    );
    let build = vec![
        ("version", env!("CARGO_PKG_VERSION").to_string()),
        ("relay", state.relay_id.clone()),
    ];
    s.gauge(
        "patchrelay_build_info",
        "Always 1; labels say the version and relay id.",
        build,
        1.0,
    );
    s
}

/// `GET /metrics`.
pub fn response(state: &AppState) -> Result<Response<ResponseBody>, ApiError> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(snapshot(state)));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)
        .map_err(|e| ApiError::Internal(format!("metrics encoding: {e}")))?;
    Response::builder()
        .header(CONTENT_TYPE, CONTENT)
        .header(CONTENT_LENGTH, text.len())
        .body(body::full(Bytes::from(text)))
        .map_err(|e| ApiError::Internal(e.to_string()))
}
