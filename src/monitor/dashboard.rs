//! The monitor's page at `/`: server-rendered HTML and CSS, no script and no build step.
//! It refreshes itself every [`REFRESH_SECONDS`] with a meta refresh.
//!
//! Top: the relay tree, each relay colored by state with its version, last beacon age and
//! cache use. Below: each deployment with a stacked progress bar, its time to 75/90/100%
//! installed, an inline SVG curve of the installed share over time, failures by class per
//! site, the relays implicated, and the verdicts with their evidence.

use std::collections::BTreeMap;
use std::fmt::Write;

use super::attribution::{format_time, DeploymentReport, FailureClass};
use super::store::StateChange;
use super::RelayView;

/// Seconds between automatic reloads of the page.
pub const REFRESH_SECONDS: u32 = 10;
/// Deployments shown (newest first).
pub const MAX_DEPLOYMENTS: usize = 20;
/// State changes listed under the tree (newest first).
pub const RECENT_CHANGES: usize = 10;
/// Verdicts listed per deployment; the rest are in the JSON report.
const MAX_VERDICTS: usize = 50;

/// Escapes text for HTML content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f5f6f8;color:#1d2330}
header{background:#1d2330;color:#fff;padding:12px 24px}
header h1{font-size:18px;margin:0}
header p{margin:2px 0 0;color:#b8c0cc;font-size:12px}
main{padding:16px 24px;max-width:1200px}
section{background:#fff;border:1px solid #dde1e7;border-radius:6px;padding:12px 16px;
margin-bottom:16px}
h2{font-size:16px;margin:0 0 8px}
h3{font-size:15px;margin:8px 0}
ul.tree,ul.tree ul{list-style:none;margin:0;padding-left:20px}
ul.tree{padding-left:0}
ul.tree li{margin:4px 0}
.relay{display:inline-block;border-left:6px solid #999;padding:2px 8px;background:#fafbfc}
.state-up{border-color:#2e9d4f}.state-degraded{border-color:#e0a100}
.state-unready{border-color:#e06c00}.state-down{border-color:#d0312d}
.state-unknown{border-color:#999}
.badge{display:inline-block;font-size:11px;padding:0 6px;border-radius:8px;color:#fff}
.b-up{background:#2e9d4f}.b-degraded{background:#e0a100}.b-unready{background:#e06c00}
.b-down{background:#d0312d}.b-unknown{background:#999}.b-old{background:#7b3fb5}
.muted{color:#67707d;font-size:12px}
.bar{display:flex;height:18px;border-radius:4px;overflow:hidden;background:#e4e7ec;
margin:6px 0;max-width:720px}
.bar span{display:block;height:100%}
.installed{background:#2e9d4f}.failed{background:#d0312d}.missing{background:#e06c00}
.pending{background:#b9c0ca}
table{border-collapse:collapse;margin:6px 0}
th,td{border-bottom:1px solid #e4e7ec;padding:3px 10px 3px 0;text-align:left;
vertical-align:top}
td.num,th.num{text-align:right}
.cls-relay{color:#d0312d;font-weight:600}.cls-agent{color:#1f5fbf;font-weight:600}
.cls-policy{color:#7b3fb5;font-weight:600}.cls-unknown{color:#67707d;font-weight:600}
.milestones span{margin-right:16px}
svg{background:#fafbfc;border:1px solid #e4e7ec}
";

/// Renders the whole page.
pub fn render(
    monitor_id: &str,
    relays: &[RelayView],
    deployments: &[DeploymentReport],
    recent_changes: &[StateChange],
    now: i64,
) -> String {
    let mut page = String::with_capacity(64 * 1024);
    let _ = write!(
        page,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_SECONDS}\">\
         <meta name=\"viewport\" content=\"width=device-width\">\
         <title>patchrelay monitor: {id}</title><style>{STYLE}</style></head><body>\
         <header><h1>patchrelay monitor: {id}</h1><p>{time} &middot; refreshes every \
         {REFRESH_SECONDS}s &middot; JSON: <a style=\"color:#b8c0cc\" href=\"/v1/relays\">\
         /v1/relays</a>, <a style=\"color:#b8c0cc\" href=\"/v1/deployments\">\
         /v1/deployments</a></p></header><main>",
        id = escape(monitor_id),
        time = format_time(now),
    );
    relay_section(&mut page, relays, recent_changes);
    if deployments.is_empty() {
        page.push_str(
            "<section><h2>Deployments</h2><p class=\"muted\">No deployments yet: \
             <code>patchrelay monitor deploy</code> or <code>POST /v1/deployments</code>.\
             </p></section>",
        );
    }
    for deployment in deployments {
        deployment_section(&mut page, deployment);
    }
    page.push_str("</main></body></html>\n");
    page
}

fn state_name(relay: &RelayView) -> &'static str {
    relay.relay.state.map_or("unknown", |s| s.as_str())
}

fn relay_section(page: &mut String, relays: &[RelayView], history: &[StateChange]) {
    let counts = relays.iter().fold(BTreeMap::new(), |mut counts, r| {
        *counts.entry(state_name(r)).or_insert(0) += 1;
        counts
    });
    let summary = counts
        .iter()
        .map(|(state, n)| format!("{n} {state}"))
        .collect::<Vec<_>>()
        .join(", ");
    let _ = write!(
        page,
        "<section id=\"relays\"><h2>Relays ({} &middot; {})</h2>",
        relays.len(),
        escape(&summary)
    );
    if relays.is_empty() {
        page.push_str("<p class=\"muted\">No relay has sent a beacon or answered a check yet.</p>");
    }

    let mut children: BTreeMap<&str, Vec<&RelayView>> = BTreeMap::new();
    let mut roots = Vec::new();
    for relay in relays {
        match relay.parent.as_deref() {
            Some(parent) if parent != relay.relay.id => {
                children.entry(parent).or_default().push(relay)
            }
            _ => roots.push(relay),
        }
    }
    page.push_str("<ul class=\"tree\">");
    let mut seen = std::collections::HashSet::new();
    for root in roots {
        tree_node(page, root, &children, &mut seen);
    }
    // Relays in a parent loop have no root; show them anyway.
    for relay in relays {
        if !seen.contains(relay.relay.id.as_str()) {
            tree_node(page, relay, &children, &mut seen);
        }
    }
    page.push_str("</ul>");

    let recent: Vec<&StateChange> = history.iter().take(RECENT_CHANGES).collect();
    if !recent.is_empty() {
        page.push_str(
            "<h3>Recent state changes</h3><table><tr><th>time</th><th>relay</th>\
             <th>state</th><th>reason</th></tr>",
        );
        for change in recent {
            let _ = write!(
                page,
                "<tr><td>{}</td><td>{}</td><td><span class=\"badge b-{s}\">{s}</span></td>\
                 <td>{}</td></tr>",
                format_time(change.at),
                escape(&change.relay),
                escape(&change.reason),
                s = change.state.as_str(),
            );
        }
        page.push_str("</table>");
    }
    page.push_str("</section>");
}

fn tree_node<'a>(
    page: &mut String,
    relay: &'a RelayView,
    children: &BTreeMap<&str, Vec<&'a RelayView>>,
    seen: &mut std::collections::HashSet<&'a str>,
) {
    if !seen.insert(relay.relay.id.as_str()) {
        return;
    }
    let state = state_name(relay);
    let row = &relay.relay;
    let beacon = relay
        .last_beacon_age_seconds
        .map_or("no beacon yet".to_string(), |age| {
            format!("beacon {age}s ago")
        });
    let version = if row.version.is_empty() {
        String::new()
    } else if relay.outdated {
        format!(
            " &middot; v{} <span class=\"badge b-old\">outdated</span>",
            escape(&row.version)
        )
    } else {
        format!(" &middot; v{}", escape(&row.version))
    };
    let _ = write!(
        page,
        "<li><div class=\"relay state-{state}\" data-relay=\"{id}\" data-state=\"{state}\" \
         title=\"{reason}\"><strong>{id}</strong> <span class=\"badge b-{state}\">{state}\
         </span> <span class=\"muted\">site {site}{version} &middot; {beacon} &middot; \
         cache {cache} in {bundles} bundles</span><br><span class=\"muted\">{reason}</span>\
         </div>",
        id = escape(&row.id),
        site = escape(if row.site.is_empty() { "?" } else { &row.site }),
        reason = escape(&row.state_reason),
        cache = human_bytes(row.cache_bytes),
        bundles = row.cache_bundles,
    );
    if let Some(kids) = children.get(row.id.as_str()) {
        page.push_str("<ul>");
        for child in kids {
            tree_node(page, child, children, seen);
        }
        page.push_str("</ul>");
    }
    page.push_str("</li>");
}

fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn seconds(value: Option<f64>) -> String {
    match value {
        None => "not yet".into(),
        Some(s) if s < 120.0 => format!("{s:.1}s"),
        Some(s) if s < 7200.0 => format!("{:.1} min", s / 60.0),
        Some(s) => format!("{:.1} h", s / 3600.0),
    }
}

fn deployment_section(page: &mut String, d: &DeploymentReport) {
    let total = d.targets.max(1) as f64;
    let pct = |n: usize| n as f64 * 100.0 / total;
    let _ = write!(
        page,
        "<section class=\"deployment\" data-deployment=\"{id}\"><h2>Deployment {id}</h2>\
         <p class=\"muted\">bundle {bundle} &middot; created {created} &middot; deadline \
         {deadline}{past} &middot; bundle at root: {state}</p>\
         <div class=\"bar\" role=\"img\" aria-label=\"{installed} of {targets} installed\">\
         <span class=\"installed\" style=\"width:{pi:.2}%\"></span>\
         <span class=\"failed\" style=\"width:{pf:.2}%\"></span>\
         <span class=\"missing\" style=\"width:{pm:.2}%\"></span>\
         <span class=\"pending\" style=\"width:{pp:.2}%\"></span></div>\
         <p class=\"progress\"><strong>{installed} of {targets} installed ({pi:.1}%)</strong>\
         &nbsp;&middot; {failed} failed &middot; {missing} missing &middot; {pending} pending</p>\
         <p class=\"milestones\"><span>75%: {t75}</span><span>90%: {t90}</span>\
         <span>100%: {t100}</span></p>",
        id = escape(&d.id),
        bundle = escape(&d.bundle),
        created = escape(&d.created_at),
        deadline = escape(&d.deadline),
        past = if d.past_deadline { " (passed)" } else { "" },
        state = escape(&d.bundle_state),
        installed = d.installed,
        targets = d.targets,
        failed = d.failed,
        missing = d.missing,
        pending = d.pending,
        pi = pct(d.installed),
        pf = pct(d.failed),
        pm = pct(d.missing),
        pp = pct(d.pending),
        t75 = seconds(d.time_to.p75_seconds),
        t90 = seconds(d.time_to.p90_seconds),
        t100 = seconds(d.time_to.p100_seconds),
    );
    curve(page, d);

    page.push_str(
        "<h3>By site</h3><table><tr><th>site</th><th class=\"num\">targets</th>\
         <th class=\"num\">installed</th><th class=\"num\">failed</th>\
         <th class=\"num\">missing</th><th class=\"num\">pending</th>\
         <th class=\"num\">relay fail</th><th class=\"num\">agent fail</th>\
         <th class=\"num\">policy fail</th><th class=\"num\">unknown</th><th>relays</th></tr>",
    );
    for site in &d.sites {
        let class = |c: FailureClass| site.by_class.get(c.as_str()).copied().unwrap_or(0);
        let _ = write!(
            page,
            "<tr data-site=\"{s}\"><td>{s}</td><td class=\"num\">{}</td><td class=\"num\">{}\
             </td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
             <td class=\"num cls-relay\">{}</td><td class=\"num cls-agent\">{}</td>\
             <td class=\"num cls-policy\">{}</td><td class=\"num cls-unknown\">{}</td>\
             <td>{}</td></tr>",
            site.targets,
            site.installed,
            site.failed,
            site.missing,
            site.pending,
            class(FailureClass::Relay),
            class(FailureClass::Agent),
            class(FailureClass::Policy),
            class(FailureClass::Unknown),
            escape(&site.relays.join(", ")),
            s = escape(&site.site),
        );
    }
    page.push_str("</table>");

    if !d.implicated_relays.is_empty() {
        page.push_str("<h3>Relays implicated</h3><ul>");
        for relay in &d.implicated_relays {
            let _ = write!(
                page,
                "<li><strong>{}</strong> (site {}): {}</li>",
                escape(&relay.relay),
                escape(&relay.site),
                escape(&relay.what.join("; "))
            );
        }
        page.push_str("</ul>");
    }

    if !d.verdicts.is_empty() {
        let _ = write!(
            page,
            "<h3>Failures ({})</h3><table><tr><th>agent</th><th>site</th><th>status</th>\
             <th>class</th><th>rule</th><th>evidence</th></tr>",
            d.verdicts.len()
        );
        for v in d.verdicts.iter().take(MAX_VERDICTS) {
            let status = match v.status {
                super::attribution::Status::Failed => "failed",
                _ => "missing",
            };
            let _ = write!(
                page,
                "<tr><td>{}</td><td>{}</td><td>{status}</td><td class=\"cls-{c}\">{c} fail\
                 </td><td>{}</td><td>{}</td></tr>",
                escape(&v.agent),
                escape(&v.site),
                escape(&v.rule),
                escape(&v.evidence),
                c = v.class.as_str(),
            );
        }
        page.push_str("</table>");
        if d.verdicts.len() > MAX_VERDICTS {
            let _ = write!(
                page,
                "<p class=\"muted\">&hellip; and {} more in <a href=\"/v1/deployments/{id}\">\
                 /v1/deployments/{id}</a></p>",
                d.verdicts.len() - MAX_VERDICTS,
                id = escape(&d.id)
            );
        }
    }
    page.push_str("</section>");
}

/// The installed share over time as an inline SVG step curve, with 75% and 90% lines.
fn curve(page: &mut String, d: &DeploymentReport) {
    const W: f64 = 600.0;
    const H: f64 = 160.0;
    const PAD: f64 = 30.0;
    let span = d
        .curve
        .last()
        .map_or(0.0, |(t, _)| *t)
        .max(d.elapsed_seconds)
        .max(1.0);
    let x = |t: f64| PAD + t / span * (W - 2.0 * PAD);
    let y = |share: f64| H - PAD + -share * (H - 2.0 * PAD);
    let mut points = String::new();
    let mut last_share = 0.0;
    for (t, share) in &d.curve {
        let _ = write!(points, "{:.1},{:.1} ", x(*t), y(last_share));
        let _ = write!(points, "{:.1},{:.1} ", x(*t), y(*share));
        last_share = *share;
    }
    let _ = write!(points, "{:.1},{:.1}", x(span), y(last_share));
    let _ = write!(
        page,
        "<svg class=\"curve\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" \
         role=\"img\" aria-label=\"installed share over time\">\
         <line x1=\"{PAD}\" y1=\"{y0:.1}\" x2=\"{xe:.1}\" y2=\"{y0:.1}\" stroke=\"#99a\"/>\
         <line x1=\"{PAD}\" y1=\"{y1:.1}\" x2=\"{PAD}\" y2=\"{y0:.1}\" stroke=\"#99a\"/>\
         <line x1=\"{PAD}\" y1=\"{y75:.1}\" x2=\"{xe:.1}\" y2=\"{y75:.1}\" stroke=\"#ccd\" \
         stroke-dasharray=\"4\"/><line x1=\"{PAD}\" y1=\"{y90:.1}\" x2=\"{xe:.1}\" \
         y2=\"{y90:.1}\" stroke=\"#ccd\" stroke-dasharray=\"4\"/>\
         <text x=\"2\" y=\"{y75:.1}\" font-size=\"10\">75%</text>\
         <text x=\"2\" y=\"{y90:.1}\" font-size=\"10\">90%</text>\
         <text x=\"2\" y=\"{y1:.1}\" font-size=\"10\">100%</text>\
         <text x=\"{xe:.1}\" y=\"{yl:.1}\" font-size=\"10\" text-anchor=\"end\">{span}</text>\
         <polyline fill=\"none\" stroke=\"#2e9d4f\" stroke-width=\"2\" points=\"{points}\"/>\
         </svg>",
        y0 = y(0.0),
        y1 = y(1.0),
        y75 = y(0.75),
        y90 = y(0.9),
        xe = x(span),
        yl = H - 8.0,
        span = seconds(Some(span)),
        points = points.trim_end(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped() {
        assert_eq!(
            escape("<a href=\"x\">O'Neil & co</a>"),
            "&lt;a href=&quot;x&quot;&gt;O&#39;Neil &amp; co&lt;/a&gt;"
        );
    }

    #[test]
    fn bytes_read_like_an_operator_expects() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 * 1024 * 1024 / 2), "1.5 MiB");
    }
}
