//! Failure attribution and deployment progress: from what the monitor stored (targets,
//! reports, relay state history, what relays served), the answer to "how far is this
//! deployment, and why did these devices not patch?".
//!
//! Pure functions over a snapshot, so every rule is unit-tested without a network. The
//! rules, in the order they are tried for each failed or missing target:
//!
//! 1. policy `bundle-missing`: the root relays answered 404 for the bundle;
//! 2. policy `unknown-site`: no relay known to the monitor serves the target's site (and
//!    every relay it knows has told its site; else `unknown`);
//! 3. policy `same-failure-everywhere`: at least `policy_min_sites` sites, every site of
//!    the deployment has failures, every failure report carries the same detail, no
//!    target installed, and no relay any site depends on had a problem during the window
//!    (a root that cannot reach its origin fails every site the same way, too);
//! 4. relay `relay-unhealthy`: a relay of the target's site, or one above it, was down or
//!    unready, or failed integrity for this bundle, during the window, and the failure is
//!    site-wide (at least `site_threshold` of the site's targets failed or are missing);
//! 5. agent `agent-only`: the site's relays and those above were healthy during the
//!    window, and the bundle reached other agents of the site (a relay of the site served
//!    it, or another target there installed it);
//! 6. `unknown`, with what the evidence lacked.
//!
//! The window of a site runs from the deployment's creation to its deadline (or now, if
//! earlier), extended to the latest failure report of the site.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use super::config::AttributionConfig;
#[cfg(test)]
use super::store::RelayState;
use super::store::{Deployment, RelayRow, ReportRow, ServedRow, StateChange};

/// The class of a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureClass {
    Relay,
    Agent,
    Policy,
    Unknown,
}

impl FailureClass {
    pub const ALL: [FailureClass; 4] = [Self::Relay, Self::Agent, Self::Policy, Self::Unknown];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Relay => "relay",
            Self::Agent => "agent",
            Self::Policy => "policy",
            Self::Unknown => "unknown",
        }
    }
}

/// Where one target stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Installed,
    Failed,
    /// No installed report yet, deadline not passed.
    Pending,
    /// No installed report, deadline passed.
    Missing,
}

/// The verdict on one failed or missing target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub agent: String,
    pub site: String,
    pub status: Status,
    /// The agent's last failure detail, if it reported one.
    pub detail: String,
    pub class: FailureClass,
    /// The rule that fired (see the module docs).
    pub rule: String,
    /// What the rule saw, in words.
    pub evidence: String,
    /// Relays the rule blames (relay fail only).
    pub relays: Vec<String>,
}

/// One site's progress.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SiteProgress {
    pub site: String,
    pub targets: usize,
    pub installed: usize,
    pub failed: usize,
    pub pending: usize,
    pub missing: usize,
    /// Failures and missing targets by class name.
    pub by_class: BTreeMap<String, usize>,
    /// Relays serving the site.
    pub relays: Vec<String>,
}

/// Time from a deployment's creation until a share of its targets had installed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Milestones {
    pub p75_seconds: Option<f64>,
    pub p90_seconds: Option<f64>,
    pub p100_seconds: Option<f64>,
}

/// Everything the monitor says about one deployment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeploymentReport {
    pub id: String,
    pub bundle: String,
    pub created_at: String,
    pub deadline: String,
    pub past_deadline: bool,
    pub bundle_state: String,
    pub targets: usize,
    pub installed: usize,
    pub failed: usize,
    pub pending: usize,
    pub missing: usize,
    pub time_to: Milestones,
    /// (seconds since creation, installed share) at each install, for the curve.
    pub curve: Vec<(f64, f64)>,
    /// Seconds from creation to now, or to the deadline once it passed: the curve's span.
    pub elapsed_seconds: f64,
    pub sites: Vec<SiteProgress>,
    /// Failed and missing targets by class name.
    pub by_class: BTreeMap<String, usize>,
    pub verdicts: Vec<Verdict>,
    /// Relays blamed by relay-fail verdicts, with what they did in the window.
    pub implicated_relays: Vec<Implicated>,
}

/// A relay that relay-fail verdicts point at.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Implicated {
    pub relay: String,
    pub site: String,
    pub what: Vec<String>,
}

/// What attribution reads.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot<'a> {
    pub deployment: &'a Deployment,
    /// The deployment's reports (of its bundle).
    pub reports: &'a [ReportRow],
    pub relays: &'a [RelayRow],
    /// Every relay's state changes, oldest first.
    pub history: &'a [StateChange],
    /// What relays served of the deployment's bundle, by minute, since its creation.
    pub served: &'a [ServedRow],
    /// A beacon counts what happened since the previous one: served rows this long after
    /// a window's end still belong to it (one beacon interval).
    pub served_slack: i64,
    pub now: i64,
    pub config: AttributionConfig,
}

/// One target's outcome from its reports.
struct Outcome {
    status: Status,
    detail: String,
    installed_at: Option<i64>,
    failed_at: Option<i64>,
    /// The relay the agent's latest report came through, if one recorded itself.
    relay: Option<String>,
}

fn outcomes(snapshot: &Snapshot<'_>) -> HashMap<String, Outcome> {
    let deployment = snapshot.deployment;
    let past_deadline = snapshot.now > deployment.deadline;
    let mut by_agent: HashMap<&str, Vec<&ReportRow>> = HashMap::new();
    for report in snapshot.reports {
        by_agent.entry(&report.agent).or_default().push(report);
    }
    deployment
        .targets
        .iter()
        .map(|target| {
            let reports = by_agent.get(target.agent.as_str());
            let installed_at =
                reports.and_then(|r| r.iter().filter(|r| r.installed).map(|r| r.at).min());
            let last_failure = reports.and_then(|r| {
                r.iter()
                    .filter(|r| !r.installed)
                    .max_by_key(|r| r.at)
                    .map(|r| (r.at, r.detail.clone()))
            });
            let relay = reports.and_then(|r| r.iter().rev().find_map(|r| r.relay.clone()));
            let status = match (installed_at, &last_failure) {
                (Some(_), _) => Status::Installed,
                (None, Some(_)) => Status::Failed,
                (None, None) if past_deadline => Status::Missing,
                (None, None) => Status::Pending,
            };
            let outcome = Outcome {
                status,
                detail: last_failure
                    .as_ref()
                    .map(|f| f.1.clone())
                    .unwrap_or_default(),
                installed_at,
                // An agent's clock ahead of ours must not stretch a window into the future.
                failed_at: last_failure.map(|f| f.0.min(snapshot.now)),
                relay,
            };
            (target.agent.clone(), outcome)
        })
        .collect()
}

/// The tree as the beacons describe it, worked out once per evaluation.
struct Topology<'a> {
    /// Every relay above each relay, by the parent URLs its beacons list.
    above: HashMap<&'a str, BTreeSet<&'a str>>,
    /// Parent URLs in each relay's chain that are no known relay's URL.
    unmatched: HashMap<&'a str, BTreeSet<&'a str>>,
    by_site: HashMap<&'a str, Vec<&'a str>>,
    history: HashMap<&'a str, Vec<&'a StateChange>>,
}

fn topology<'a>(relays: &'a [RelayRow], history: &'a [StateChange]) -> Topology<'a> {
    let by_url: HashMap<&str, &RelayRow> = relays
        .iter()
        .filter(|r| !r.url.is_empty())
        .map(|r| (r.url.trim_end_matches('/'), r))
        .collect();
    let mut topology = Topology {
        above: HashMap::new(),
        unmatched: HashMap::new(),
        by_site: HashMap::new(),
        history: HashMap::new(),
    };
    for relay in relays {
        topology
            .by_site
            .entry(relay.site.as_str())
            .or_default()
            .push(&relay.id);
        let (mut above, mut unmatched) = (BTreeSet::new(), BTreeSet::new());
        let mut queue = vec![relay];
        while let Some(current) = queue.pop() {
            // The parent the relay last said it uses; all of them when it named none (none
            // answered), since it would take whichever came back.
            let parents = match &current.parent_in_use {
                Some(used) => std::slice::from_ref(used),
                None => current.parents.as_slice(),
            };
            for parent in parents {
                match by_url.get(parent.trim_end_matches('/')) {
                    Some(up) if up.id != relay.id => {
                        if above.insert(up.id.as_str()) {
                            queue.push(up);
                        }
                    }
                    Some(_) => {}
                    None => {
                        unmatched.insert(parent.as_str());
                    }
                }
            }
        }
        topology.above.insert(&relay.id, above);
        topology.unmatched.insert(&relay.id, unmatched);
    }
    for change in history {
        topology
            .history
            .entry(change.relay.as_str())
            .or_default()
            .push(change);
    }
    topology
}

/// The failure states `changes` (one relay's, oldest first) show during `[from, to]`.
fn failures_in(changes: &[&StateChange], from: i64, to: i64) -> Vec<String> {
    let mut found = Vec::new();
    for (i, change) in changes.iter().enumerate() {
        let end = changes.get(i + 1).map_or(i64::MAX, |next| next.at);
        if change.state.is_failure() && change.at <= to && end > from {
            let until = if end == i64::MAX {
                "still".to_string()
            } else {
                format!("until {}", format_time(end))
            };
            found.push(format!(
                "{} from {} ({until}): {}",
                change.state.as_str(),
                format_time(change.at),
                change.reason
            ));
        }
    }
    found
}

/// Formats Unix milliseconds as RFC 3339 UTC to the second.
pub fn format_time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|| ms.to_string())
}

/// What one site's verdicts share, worked out once per site.
struct SiteContext<'a> {
    own: Vec<&'a str>,
    /// Relays of the site and every relay above them.
    chain: BTreeSet<&'a str>,
    site_wide: bool,
    share_text: String,
    /// Failures of each relay of `chain` during the window, in words.
    problems: HashMap<&'a str, Vec<String>>,
    /// Relays of `chain` the monitor had no state for by the window's end.
    unknown: BTreeSet<&'a str>,
    /// Downloads of the bundle the site's own relays completed during the window.
    served: u64,
}

fn site_context<'a>(
    snapshot: &Snapshot<'_>,
    topology: &Topology<'a>,
    site: &SiteProgress,
    outcomes: &HashMap<String, Outcome>,
) -> SiteContext<'a> {
    let deployment = snapshot.deployment;
    let own: Vec<&'a str> = topology
        .by_site
        .get(site.site.as_str())
        .cloned()
        .unwrap_or_default();
    let mut chain: BTreeSet<&'a str> = own.iter().copied().collect();
    for relay in &own {
        chain.extend(topology.above.get(relay).into_iter().flatten().copied());
    }

    // The window: creation to the deadline (or now), and to the site's latest failure.
    let latest_failure = deployment
        .targets
        .iter()
        .filter(|t| t.site == site.site)
        .filter_map(|t| outcomes.get(&t.agent).and_then(|o| o.failed_at))
        .max();
    let from = deployment.created_at;
    let to = snapshot
        .now
        .min(deployment.deadline)
        .max(latest_failure.unwrap_or(i64::MIN));
    // Served rows are minute buckets of beacons that count the interval before them.
    let in_window = |at: i64| at >= from - 60_000 && at <= to + snapshot.served_slack;

    let mut problems = HashMap::new();
    let mut unknown = BTreeSet::new();
    for &relay in &chain {
        let changes = topology.history.get(relay).map_or(&[][..], Vec::as_slice);
        let mut found = failures_in(changes, from, to);
        let integrity: u64 = snapshot
            .served
            .iter()
            .filter(|s| s.relay == relay && in_window(s.at))
            .map(|s| s.integrity)
            .sum();
        if integrity > 0 {
            found.push(format!(
                "{integrity} integrity failure(s) of bundle {}",
                deployment.bundle
            ));
        }
        if !found.is_empty() {
            problems.insert(relay, found);
        }
        if !changes.iter().any(|c| c.at <= to) {
            unknown.insert(relay);
        }
    }
    let served = snapshot
        .served
        .iter()
        .filter(|s| own.contains(&s.relay.as_str()) && in_window(s.at))
        .map(|s| s.completed)
        .sum();

    let failing = site.failed + site.missing;
    let share = failing as f64 / site.targets.max(1) as f64;
    let share_text = format!(
        "{failing} of {} targets at site {} failed or are missing ({:.0}%, threshold {:.0}%)",
        site.targets,
        site.site,
        share * 100.0,
        snapshot.config.site_threshold * 100.0
    );
    SiteContext {
        own,
        chain,
        site_wide: share >= snapshot.config.site_threshold,
        share_text,
        problems,
        unknown,
        served,
    }
}

/// Progress, milestones and a verdict for every failed or missing target.
pub fn evaluate(snapshot: &Snapshot<'_>) -> DeploymentReport {
    let deployment = snapshot.deployment;
    let outcomes = outcomes(snapshot);
    let topology = topology(snapshot.relays, snapshot.history);

    let mut sites: BTreeMap<&str, SiteProgress> = BTreeMap::new();
    for target in &deployment.targets {
        let site = sites.entry(&target.site).or_insert_with(|| SiteProgress {
            site: target.site.clone(),
            ..SiteProgress::default()
        });
        site.targets += 1;
        match outcomes.get(&target.agent).map(|o| &o.status) {
            Some(Status::Installed) => site.installed += 1,
            Some(Status::Failed) => site.failed += 1,
            Some(Status::Missing) => site.missing += 1,
            Some(Status::Pending) | None => site.pending += 1,
        }
    }
    for site in sites.values_mut() {
        site.relays = topology
            .by_site
            .get(site.site.as_str())
            .map(|ids| ids.iter().map(|id| id.to_string()).collect())
            .unwrap_or_default();
    }
    let contexts: HashMap<&str, SiteContext<'_>> = sites
        .iter()
        .map(|(name, site)| (*name, site_context(snapshot, &topology, site, &outcomes)))
        .collect();

    let relay_trouble = contexts.values().any(|c| !c.problems.is_empty());
    let policy = if relay_trouble {
        None
    } else {
        same_failure_everywhere(snapshot, &outcomes, &sites)
    };
    let mut verdicts = Vec::new();
    let mut blamed: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for target in &deployment.targets {
        let Some(outcome) = outcomes.get(&target.agent) else {
            continue;
        };
        if !matches!(outcome.status, Status::Failed | Status::Missing) {
            continue;
        }
        let site = &sites[target.site.as_str()];
        let context = &contexts[target.site.as_str()];
        let (class, rule, evidence, relays) =
            judge(snapshot, &topology, site, context, outcome, policy.as_ref());
        for relay in &relays {
            let what = context.problems.get(relay.as_str()).into_iter().flatten();
            blamed
                .entry(relay.clone())
                .or_default()
                .extend(what.cloned());
        }
        verdicts.push(Verdict {
            agent: target.agent.clone(),
            site: target.site.clone(),
            status: outcome.status.clone(),
            detail: outcome.detail.clone(),
            class,
            rule: rule.to_string(),
            evidence,
            relays,
        });
    }

    let mut by_class = BTreeMap::new();
    for verdict in &verdicts {
        *by_class
            .entry(verdict.class.as_str().to_string())
            .or_insert(0) += 1;
        if let Some(site) = sites.get_mut(verdict.site.as_str()) {
            *site
                .by_class
                .entry(verdict.class.as_str().to_string())
                .or_insert(0) += 1;
        }
    }
    let implicated = blamed
        .into_iter()
        .map(|(relay, what)| Implicated {
            site: snapshot
                .relays
                .iter()
                .find(|r| r.id == relay)
                .map(|r| r.site.clone())
                .unwrap_or_default(),
            relay,
            what: what.into_iter().collect(),
        })
        .collect();

    let (time_to, curve) = milestones(deployment, &outcomes);
    let count = |status: Status| outcomes.values().filter(|o| o.status == status).count();
    DeploymentReport {
        id: deployment.id.clone(),
        bundle: deployment.bundle.clone(),
        created_at: format_time(deployment.created_at),
        deadline: format_time(deployment.deadline),
        past_deadline: snapshot.now > deployment.deadline,
        bundle_state: deployment.bundle_state.clone(),
        targets: deployment.targets.len(),
        installed: count(Status::Installed),
        failed: count(Status::Failed),
        pending: count(Status::Pending),
        missing: count(Status::Missing),
        time_to,
        curve,
        elapsed_seconds: (snapshot.now.min(deployment.deadline) - deployment.created_at).max(0)
            as f64
            / 1000.0,
        sites: sites.into_values().collect(),
        by_class,
        verdicts,
        implicated_relays: implicated,
    }
}

/// The detail every failure shares, when rule 3 holds for the deployment: each failed
/// target's latest failure detail is compared.
fn same_failure_everywhere(
    snapshot: &Snapshot<'_>,
    outcomes: &HashMap<String, Outcome>,
    sites: &BTreeMap<&str, SiteProgress>,
) -> Option<(String, usize)> {
    if sites.len() < snapshot.config.policy_min_sites
        || sites.values().any(|s| s.failed == 0 || s.installed > 0)
    {
        return None;
    }
    let details: BTreeSet<&str> = outcomes
        .values()
        .filter(|o| o.status == Status::Failed)
        .map(|o| o.detail.trim())
        .collect();
    match details.into_iter().collect::<Vec<_>>().as_slice() {
        [detail] if !detail.is_empty() => Some((detail.to_string(), sites.len())),
        _ => None,
    }
}

type Judgement = (FailureClass, &'static str, String, Vec<String>);

fn judge(
    snapshot: &Snapshot<'_>,
    topology: &Topology<'_>,
    site: &SiteProgress,
    context: &SiteContext<'_>,
    outcome: &Outcome,
    policy: Option<&(String, usize)>,
) -> Judgement {
    let deployment = snapshot.deployment;
    let unknown = |evidence: String| (FailureClass::Unknown, "unknown", evidence, Vec::new());

    if deployment.bundle_state == "missing" {
        return (
            FailureClass::Policy,
            "bundle-missing",
            format!(
                "bundle {} does not exist at the root: {}",
                deployment.bundle, deployment.bundle_evidence
            ),
            Vec::new(),
        );
    }
    if context.own.is_empty() {
        let unplaced: Vec<&str> = snapshot
            .relays
            .iter()
            .filter(|r| r.site.is_empty())
            .map(|r| r.id.as_str())
            .collect();
        if !unplaced.is_empty() {
            return unknown(format!(
                "no relay known to serve site {:?}, but {} never told the monitor its site \
                 (no beacon, no answered check)",
                site.site,
                unplaced.join(", ")
            ));
        }
        return (
            FailureClass::Policy,
            "unknown-site",
            format!("no relay known to the monitor serves site {:?}", site.site),
            Vec::new(),
        );
    }
    if let Some((detail, sites)) = policy {
        return (
            FailureClass::Policy,
            "same-failure-everywhere",
            format!(
                "every failure report in all {sites} sites says {detail:?}, and no target \
                 installed"
            ),
            Vec::new(),
        );
    }

    // The relays this target depends on: its own relay and those above it when a report
    // named it, else every relay of the site and above.
    let chain: BTreeSet<&str> = match outcome.relay.as_deref() {
        Some(relay) if context.own.contains(&relay) => {
            let mut chain: BTreeSet<&str> = BTreeSet::from([relay]);
            chain.extend(topology.above.get(relay).into_iter().flatten().copied());
            chain
        }
        _ => context.chain.clone(),
    };

    let blamed: Vec<&str> = chain
        .iter()
        .copied()
        .filter(|r| context.problems.contains_key(r))
        .collect();
    if !blamed.is_empty() {
        let problems = blamed
            .iter()
            .map(|r| format!("{r}: {}", context.problems[r].join("; ")))
            .collect::<Vec<_>>()
            .join("; ");
        if context.site_wide {
            let evidence = format!("{problems}; {}", context.share_text);
            let relays = blamed.iter().map(|r| r.to_string()).collect();
            return (FailureClass::Relay, "relay-unhealthy", evidence, relays);
        }
        return unknown(format!(
            "{problems}; but the failure is not site-wide: {}",
            context.share_text
        ));
    }

    let unknown_relays: Vec<&str> = chain
        .iter()
        .copied()
        .filter(|r| context.unknown.contains(r))
        .collect();
    if !unknown_relays.is_empty() {
        return unknown(format!(
            "no health state known for {} during the window",
            unknown_relays.join(", ")
        ));
    }
    let unmatched: BTreeSet<&str> = chain
        .iter()
        .flat_map(|r| topology.unmatched.get(r).into_iter().flatten().copied())
        .collect();
    if !unmatched.is_empty() {
        return unknown(format!(
            "parent {} is not the URL of any relay the monitor knows (set the parent's \
             advertise_url), so the relays above the site cannot be vouched for",
            unmatched.into_iter().collect::<Vec<_>>().join(", ")
        ));
    }

    if context.served > 0 || site.installed > 0 {
        let what = match &outcome.status {
            Status::Failed => format!("this agent reported failure {:?}", outcome.detail),
            _ => "this agent never reported it installed".to_string(),
        };
        let evidence = format!(
            "relays {} healthy during the window; the site's relays served the bundle {} \
             time(s) and {} other target(s) of the site installed it; {what}",
            chain.iter().copied().collect::<Vec<_>>().join(", "),
            context.served,
            site.installed
        );
        return (FailureClass::Agent, "agent-only", evidence, Vec::new());
    }
    unknown(format!(
        "relays of site {} healthy during the window, but no agent of the site got the \
         bundle; {}",
        site.site, context.share_text
    ))
}

fn milestones(
    deployment: &Deployment,
    outcomes: &HashMap<String, Outcome>,
) -> (Milestones, Vec<(f64, f64)>) {
    let mut times: Vec<i64> = outcomes
        .values()
        .filter_map(|o| o.installed_at)
        .map(|at| (at - deployment.created_at).max(0))
        .collect();
    times.sort_unstable();
    let total = deployment.targets.len();
    let reached = |share: f64| {
        let needed = ((share * total as f64).ceil() as usize).max(1);
        times.get(needed - 1).map(|&ms| ms as f64 / 1000.0)
    };
    let milestones = Milestones {
        p75_seconds: reached(0.75),
        p90_seconds: reached(0.90),
        p100_seconds: (times.len() == total && total > 0)
            .then(|| times.last().map(|&ms| ms as f64 / 1000.0))
            .flatten(),
    };
    let mut curve = vec![(0.0, 0.0)];
    // At most ~200 points: enough for a curve, small for a page.
    let step = (times.len() / 200).max(1);
    for (i, ms) in times.iter().enumerate() {
        if (i + 1) % step == 0 || i + 1 == times.len() {
            curve.push((*ms as f64 / 1000.0, (i + 1) as f64 / total.max(1) as f64));
        }
    }
    (milestones, curve)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::store::Target;

    const T0: i64 = 1_800_000_000_000;
    const DEADLINE: i64 = T0 + 3_600_000;

    fn relay(id: &str, site: &str, parents: &[&str]) -> RelayRow {
        RelayRow {
            id: id.into(),
            site: site.into(),
            url: format!("http://{id}"),
            parents: parents.iter().map(|p| format!("http://{p}")).collect(),
            ..RelayRow::default()
        }
    }

    fn change(relay: &str, at: i64, state: RelayState) -> StateChange {
        StateChange {
            relay: relay.into(),
            at,
            state,
            reason: format!("{relay} {}", state.as_str()),
        }
    }

    fn report(agent: &str, installed: bool, detail: &str, at: i64) -> ReportRow {
        ReportRow {
            agent: agent.into(),
            installed,
            detail: detail.into(),
            at,
            relay: None,
        }
    }

    struct World {
        deployment: Deployment,
        reports: Vec<ReportRow>,
        relays: Vec<RelayRow>,
        history: Vec<StateChange>,
        served: Vec<ServedRow>,
        now: i64,
    }

    /// A root, and sites a and b with ten targets each, all relays up from the start.
    fn world() -> World {
        let mut targets = Vec::new();
        for site in ["a", "b"] {
            for i in 0..10 {
                targets.push(Target {
                    agent: format!("{site}{i}"),
                    site: site.into(),
                });
            }
        }
        World {
            deployment: Deployment {
                id: "d".into(),
                bundle: "bb".into(),
                deadline: DEADLINE,
                created_at: T0,
                targets,
                bundle_state: "present".into(),
                bundle_evidence: String::new(),
            },
            reports: Vec::new(),
            relays: vec![
                relay("root", "hq", &[]),
                relay("ra", "a", &["root"]),
                relay("rb", "b", &["root"]),
            ],
            history: ["root", "ra", "rb"]
                .iter()
                .map(|r| change(r, T0 - 1000, RelayState::Up))
                .collect(),
            served: Vec::new(),
            now: DEADLINE + 1,
        }
    }

    impl World {
        fn install(&mut self, site: &str, range: std::ops::Range<usize>) {
            for i in range {
                let at = T0 + 1000 * (i as i64 + 1);
                self.reports
                    .push(report(&format!("{site}{i}"), true, "", at));
            }
        }

        fn evaluate(&self) -> DeploymentReport {
            evaluate(&Snapshot {
                deployment: &self.deployment,
                reports: &self.reports,
                relays: &self.relays,
                history: &self.history,
                served: &self.served,
                served_slack: 0,
                now: self.now,
                config: AttributionConfig::default(),
            })
        }
    }

    fn verdict<'a>(report: &'a DeploymentReport, agent: &str) -> &'a Verdict {
        report
            .verdicts
            .iter()
            .find(|v| v.agent == agent)
            .unwrap_or_else(|| panic!("no verdict for {agent}: {report:#?}"))
    }

    #[test]
    fn a_site_relay_down_with_the_whole_site_missing_is_relay_fail() {
        let mut w = world();
        w.install("a", 0..10);
        w.history.push(change("rb", T0 + 60_000, RelayState::Down));
        let report = w.evaluate();
        assert_eq!(report.installed, 10);
        assert_eq!(report.missing, 10);
        for i in 0..10 {
            let v = verdict(&report, &format!("b{i}"));
            assert_eq!(
                (v.class, v.rule.as_str()),
                (FailureClass::Relay, "relay-unhealthy")
            );
            assert_eq!(v.relays, vec!["rb".to_string()]);
            assert!(v.evidence.contains("rb: down from"), "{}", v.evidence);
        }
        assert_eq!(report.implicated_relays.len(), 1);
        assert_eq!(report.sites[1].by_class.get("relay"), Some(&10));
    }

    #[test]
    fn a_relay_above_the_site_is_blamed_too() {
        let mut w = world();
        w.install("a", 0..10);
        w.history.push(change("root", T0 + 10, RelayState::Unready));
        w.history.push(change("root", T0 + 20_000, RelayState::Up));
        // Both sites hang below root; b's site-wide failure points at it.
        let report = w.evaluate();
        let v = verdict(&report, "b3");
        assert_eq!(v.class, FailureClass::Relay);
        assert_eq!(v.relays, vec!["root".to_string()]);
        assert!(v.evidence.contains("until"), "{}", v.evidence);
    }

    #[test]
    fn an_outage_outside_the_window_does_not_count() {
        let mut w = world();
        w.install("a", 0..10);
        w.install("b", 0..2);
        w.history.push(change("rb", T0 - 50_000, RelayState::Down));
        w.history.push(change("rb", T0 - 40_000, RelayState::Up));
        w.served.push(ServedRow {
            relay: "rb".into(),
            at: T0 + 1000,
            completed: 2,
            ..ServedRow::default()
        });
        let report = w.evaluate();
        let v = verdict(&report, "b5");
        assert_eq!(
            (v.class, v.rule.as_str()),
            (FailureClass::Agent, "agent-only")
        );
    }

    #[test]
    fn scattered_failures_at_healthy_sites_are_agent_fail() {
        let mut w = world();
        w.install("a", 0..9);
        w.install("b", 0..10);
        w.reports.push(report("a9", false, "disk full", T0 + 5000));
        w.served.push(ServedRow {
            relay: "ra".into(),
            at: T0 + 1000,
            completed: 9,
            ..ServedRow::default()
        });
        let report = w.evaluate();
        assert_eq!(report.verdicts.len(), 1);
        let v = verdict(&report, "a9");
        assert_eq!(v.class, FailureClass::Agent);
        assert_eq!(v.status, Status::Failed);
        assert_eq!(v.detail, "disk full");
        assert!(v.evidence.contains("disk full"), "{}", v.evidence);
    }

    #[test]
    fn a_relay_problem_that_is_not_site_wide_is_unknown() {
        let mut w = world();
        w.install("a", 0..10);
        w.install("b", 0..9);
        w.history.push(change("rb", T0 + 100, RelayState::Down));
        w.history.push(change("rb", T0 + 200, RelayState::Up));
        let report = w.evaluate();
        let v = verdict(&report, "b9");
        assert_eq!(v.class, FailureClass::Unknown);
        assert!(v.evidence.contains("not site-wide"), "{}", v.evidence);
    }

    #[test]
    fn integrity_failures_for_the_bundle_at_a_site_relay_are_relay_fail() {
        let mut w = world();
        w.install("a", 0..10);
        for i in 0..10 {
            w.reports
                .push(report(&format!("b{i}"), false, "hash mismatch", T0 + 9000));
        }
        w.served.push(ServedRow {
            relay: "rb".into(),
            at: T0 + 1000,
            integrity: 3,
            ..ServedRow::default()
        });
        let report = w.evaluate();
        let v = verdict(&report, "b0");
        assert_eq!(v.class, FailureClass::Relay);
        assert!(
            v.evidence.contains("3 integrity failure(s)"),
            "{}",
            v.evidence
        );
    }

    #[test]
    fn a_missing_bundle_is_policy_fail_everywhere() {
        let mut w = world();
        w.deployment.bundle_state = "missing".into();
        w.deployment.bundle_evidence = "root answered 404".into();
        w.history.push(change("rb", T0 + 100, RelayState::Down));
        let report = w.evaluate();
        assert_eq!(report.verdicts.len(), 20);
        assert!(report
            .verdicts
            .iter()
            .all(|v| v.class == FailureClass::Policy && v.rule == "bundle-missing"));
    }

    #[test]
    fn the_same_failure_at_every_site_is_policy_fail() {
        let mut w = world();
        for site in ["a", "b"] {
            for i in 0..5 {
                let agent = format!("{site}{i}");
                w.reports
                    .push(report(&agent, false, "requires KB500", T0 + 100));
            }
        }
        let report = w.evaluate();
        assert_eq!(report.by_class.get("policy"), Some(&20));
        let v = verdict(&report, "b7");
        assert_eq!(v.rule, "same-failure-everywhere");
        assert_eq!(v.status, Status::Missing);

        // One install anywhere, or a different detail, and it is no longer a policy.
        w.install("a", 9..10);
        assert_ne!(verdict(&w.evaluate(), "b0").class, FailureClass::Policy);
    }

    #[test]
    fn targets_at_a_site_no_relay_serves_are_policy_fail() {
        let mut w = world();
        w.install("a", 0..10);
        w.install("b", 0..10);
        w.deployment.targets.push(Target {
            agent: "z1".into(),
            site: "nowhere".into(),
        });
        let report = w.evaluate();
        let v = verdict(&report, "z1");
        assert_eq!(
            (v.class, v.rule.as_str()),
            (FailureClass::Policy, "unknown-site")
        );
    }

    #[test]
    fn a_site_is_not_called_unknown_while_a_relay_has_not_told_its_site() {
        let mut w = world();
        w.install("a", 0..10);
        w.install("b", 0..10);
        w.relays.push(relay("quiet", "", &["root"]));
        w.deployment.targets.push(Target {
            agent: "z1".into(),
            site: "nowhere".into(),
        });
        let v = verdict(&w.evaluate(), "z1").clone();
        assert_eq!(v.class, FailureClass::Unknown, "{v:?}");
        assert!(v.evidence.contains("quiet never told"), "{}", v.evidence);
    }

    #[test]
    fn a_root_that_cannot_reach_its_origin_is_relay_fail_not_a_policy() {
        let mut w = world();
        // Every target fails the same way: it would look like a policy problem...
        for site in ["a", "b"] {
            for i in 0..10 {
                let agent = format!("{site}{i}");
                w.reports
                    .push(report(&agent, false, "download answered 502", T0 + 5000));
            }
        }
        // ...but the root could not reach its origin during the window.
        w.history
            .push(change("root", T0 + 100, RelayState::Unready));
        let report = w.evaluate();
        let v = verdict(&report, "b3");
        assert_eq!(
            (v.class, v.rule.as_str()),
            (FailureClass::Relay, "relay-unhealthy"),
            "{v:?}"
        );
        assert_eq!(v.relays, vec!["root".to_string()]);
    }

    #[test]
    fn a_standby_parent_that_is_down_is_not_blamed() {
        let mut w = world();
        w.relays.push(relay("spare", "hq", &[]));
        w.history.push(change("spare", T0 - 1000, RelayState::Up));
        w.history.push(change("spare", T0 + 100, RelayState::Down));
        w.relays[2].parents = vec!["http://root".into(), "http://spare".into()];
        w.relays[2].parent_in_use = Some("http://root".into());
        w.install("a", 0..10);
        w.install("b", 0..3);
        for i in 3..10 {
            w.reports
                .push(report(&format!("b{i}"), false, "disk full", T0 + 5000));
        }
        let v = verdict(&w.evaluate(), "b5").clone();
        assert_eq!(v.class, FailureClass::Agent, "{v:?}");

        // With no parent in use (none answered), either could be the cause.
        w.relays[2].parent_in_use = None;
        assert_eq!(verdict(&w.evaluate(), "b5").class, FailureClass::Relay);
    }

    #[test]
    fn only_the_relay_an_agent_used_is_blamed_at_a_site_with_two() {
        let mut w = world();
        w.relays.push(relay("rb2", "b", &["root"]));
        w.history.push(change("rb2", T0 - 1000, RelayState::Up));
        w.history.push(change("rb", T0 + 100, RelayState::Down));
        w.install("a", 0..10);
        for i in 0..10 {
            let mut failed = report(&format!("b{i}"), false, "timeout", T0 + 5000);
            failed.relay = Some(if i < 5 { "rb" } else { "rb2" }.into());
            w.reports.push(failed);
        }
        let report = w.evaluate();
        assert_eq!(verdict(&report, "b1").class, FailureClass::Relay);
        assert_eq!(verdict(&report, "b1").relays, vec!["rb".to_string()]);
        let v = verdict(&report, "b7");
        assert_ne!(v.class, FailureClass::Relay, "rb2 was healthy: {v:?}");
    }

    #[test]
    fn a_parent_url_no_relay_has_leaves_the_verdict_unknown() {
        let mut w = world();
        w.relays[1].parents = vec!["http://10.9.9.9:7420".into()];
        w.install("a", 0..9);
        w.reports.push(report("a9", false, "disk full", T0 + 5000));
        let report = w.evaluate();
        let v = verdict(&report, "a9");
        assert_eq!(v.class, FailureClass::Unknown);
        assert!(
            v.evidence.contains("http://10.9.9.9:7420"),
            "{}",
            v.evidence
        );
    }

    #[test]
    fn without_health_data_the_verdict_is_unknown_not_a_guess() {
        let mut w = world();
        w.install("a", 0..10);
        w.history.retain(|c| c.relay != "rb");
        let report = w.evaluate();
        let v = verdict(&report, "b0");
        assert_eq!(v.class, FailureClass::Unknown);
        assert!(v.evidence.contains("no health state known for rb"));
    }

    #[test]
    fn pending_targets_before_the_deadline_get_no_verdict_and_milestones_count() {
        let mut w = world();
        w.now = T0 + 60_000;
        w.install("a", 0..10);
        w.install("b", 0..8);
        let report = w.evaluate();
        assert!(report.verdicts.is_empty());
        assert_eq!(report.pending, 2);
        // Installs at 1,1,2,2,...,8,8,9,10 s: the 15th at 8 s, the 18th at 10 s.
        assert_eq!(report.time_to.p75_seconds, Some(8.0));
        assert_eq!(report.time_to.p90_seconds, Some(10.0));
        assert_eq!(report.time_to.p100_seconds, None);
        assert_eq!(report.curve.last(), Some(&(10.0, 0.9)));
    }
}
