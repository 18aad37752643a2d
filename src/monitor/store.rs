//! The monitor's state in SQLite: relays and their state history, what relays served,
//! agent reports, deployments and their targets.
//!
//! Every write is one transaction with `synchronous = FULL`, so whatever the monitor
//! acknowledged (202 to a beacon or a report batch, 201 to a deployment) survives a crash
//! or a restart. Times are milliseconds since the Unix epoch, UTC.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

use crate::beacon::Beacon;
use crate::reports::{Outcome, Report};

/// Why the store could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("monitor database {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("monitor database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("deployment {0} exists already")]
    DeploymentExists(String),
    #[error("beacon {seq} from {relay} is replayed or old (last {last})")]
    OldBeacon { relay: String, seq: u64, last: u64 },
}

/// A relay's state as the monitor sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RelayState {
    Up,
    Degraded,
    Unready,
    Down,
}

impl RelayState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Degraded => "degraded",
            Self::Unready => "unready",
            Self::Down => "down",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "up" => Self::Up,
            "degraded" => Self::Degraded,
            "unready" => Self::Unready,
            "down" => Self::Down,
            _ => return None,
        })
    }

    /// Whether this state stops a relay from serving its site.
    pub fn is_failure(self) -> bool {
        matches!(self, Self::Down | Self::Unready)
    }
}

/// What the monitor knows of one relay.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RelayRow {
    pub id: String,
    /// Empty for a relay named only in `[checks] relays` that never sent a beacon.
    pub site: String,
    pub url: String,
    pub version: String,
    pub parents: Vec<String>,
    pub parent_in_use: Option<String>,
    pub cache_bytes: u64,
    pub cache_bundles: u64,
    pub last_seq: u64,
    pub last_beacon_at: Option<i64>,
    /// Readiness as the last beacon told it.
    pub beacon_ready: bool,
    pub beacon_failed: Vec<String>,
    pub beacon_degraded: Vec<String>,
    /// The last health check: when, whether it got an answer, and what it said.
    pub check_at: Option<i64>,
    pub check_answered: bool,
    pub check_ready: bool,
    pub check_failed: Vec<String>,
    pub check_degraded: Vec<String>,
    /// Health checks in a row without an answer, and when the first of them ran.
    pub check_failures: u32,
    pub check_failing_since: Option<i64>,
    pub check_error: Option<String>,
    /// The state last recorded, since when and why; `None` before the first evaluation.
    pub state: Option<RelayState>,
    pub state_since: Option<i64>,
    pub state_reason: String,
}

/// One change of a relay's state.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StateChange {
    pub relay: String,
    pub at: i64,
    pub state: RelayState,
    pub reason: String,
}

/// What a health check of one relay URL found.
#[derive(Debug, Clone, PartialEq)]
pub enum CheckResult {
    /// `/readyz` answered (200 or 503) with this relay id and readiness.
    Answered {
        relay: String,
        ready: bool,
        failed: Vec<String>,
        degraded: Vec<String>,
    },
    /// No usable answer.
    Failed(String),
}

/// A deployment: one bundle to a list of targets by a deadline.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Deployment {
    pub id: String,
    pub bundle: String,
    pub deadline: i64,
    pub created_at: i64,
    pub targets: Vec<Target>,
    /// Whether the bundle exists at the root: "present", "missing" or "unknown".
    pub bundle_state: String,
    pub bundle_evidence: String,
}

/// One device a deployment must reach.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    pub agent: String,
    pub site: String,
}

/// A stored agent report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReportRow {
    pub agent: String,
    pub installed: bool,
    pub detail: String,
    pub at: i64,
    pub relay: Option<String>,
}

/// Downloads and integrity failures of one bundle at one relay, summed over a window.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Served {
    pub completed: u64,
    pub failed: u64,
    pub integrity: u64,
}

/// The database, behind one lock (SQLite serializes writers anyway).
#[derive(Debug)]
pub struct Store {
    conn: Mutex<Connection>,
}

/// The layout [`SCHEMA`] creates; kept in SQLite's `user_version`, so a later layout can
/// migrate an older file and an older binary refuses a newer file.
const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS relays (
    id TEXT PRIMARY KEY,
    site TEXT NOT NULL DEFAULT '',
    url TEXT NOT NULL DEFAULT '',
    version TEXT NOT NULL DEFAULT '',
    parents TEXT NOT NULL DEFAULT '[]',
    parent_in_use TEXT,
    cache_bytes INTEGER NOT NULL DEFAULT 0,
    cache_bundles INTEGER NOT NULL DEFAULT 0,
    last_seq INTEGER NOT NULL DEFAULT 0,
    last_beacon_at INTEGER,
    beacon_ready INTEGER NOT NULL DEFAULT 0,
    beacon_failed TEXT NOT NULL DEFAULT '[]',
    beacon_degraded TEXT NOT NULL DEFAULT '[]',
    check_at INTEGER,
    check_answered INTEGER NOT NULL DEFAULT 0,
    check_ready INTEGER NOT NULL DEFAULT 0,
    check_failed TEXT NOT NULL DEFAULT '[]',
    check_degraded TEXT NOT NULL DEFAULT '[]',
    check_failures INTEGER NOT NULL DEFAULT 0,
    check_failing_since INTEGER,
    check_error TEXT,
    state TEXT,
    state_since INTEGER,
    state_reason TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS relay_states (
    relay TEXT NOT NULL,
    at INTEGER NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS relay_states_by_relay ON relay_states (relay, at);
CREATE TABLE IF NOT EXISTS served (
    relay TEXT NOT NULL,
    bundle TEXT NOT NULL,
    at INTEGER NOT NULL,
    completed INTEGER NOT NULL,
    failed INTEGER NOT NULL,
    integrity INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS served_by_bundle ON served (bundle, at);
CREATE TABLE IF NOT EXISTS reports (
    report_id TEXT PRIMARY KEY,
    agent TEXT NOT NULL,
    deployment TEXT NOT NULL,
    bundle TEXT NOT NULL,
    outcome TEXT NOT NULL,
    detail TEXT NOT NULL,
    at INTEGER NOT NULL,
    received_at INTEGER NOT NULL,
    relay TEXT
);
CREATE INDEX IF NOT EXISTS reports_by_deployment ON reports (deployment, agent);
CREATE TABLE IF NOT EXISTS deployments (
    id TEXT PRIMARY KEY,
    bundle TEXT NOT NULL,
    deadline INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    bundle_state TEXT NOT NULL DEFAULT 'unknown',
    bundle_evidence TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS targets (
    deployment TEXT NOT NULL,
    agent TEXT NOT NULL,
    site TEXT NOT NULL,
    PRIMARY KEY (deployment, agent)
);
";

fn json_list(text: &str) -> Vec<String> {
    serde_json::from_str(text).unwrap_or_default()
}

fn to_json(list: &[String]) -> String {
    serde_json::to_string(list).unwrap_or_else(|_| "[]".into())
}

fn ms(at: chrono::DateTime<chrono::Utc>) -> i64 {
    at.timestamp_millis()
}

impl Store {
    /// Opens (creating) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let open_error = |source| StoreError::Open {
            path: path.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| open_error(rusqlite::Error::ToSqlConversionFailure(Box::new(e))))?;
        }
        let conn = Connection::open(path).map_err(open_error)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_error)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(open_error)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(open_error)?;
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .map_err(open_error)?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::Open {
                path: path.display().to_string(),
                source: rusqlite::Error::InvalidParameterName(format!(
                    "schema version {version} is newer than this patchrelay's \
                     ({SCHEMA_VERSION}); use the newer patchrelay"
                )),
            });
        }
        conn.execute_batch(SCHEMA).map_err(open_error)?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(open_error)?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a beacon received at `now`: refuses a sequence not above the last one
    /// stored for that relay (kept across restarts), updates the relay, and adds what it
    /// served to the served log.
    pub fn record_beacon(&self, beacon: &Beacon, now: i64) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let last: Option<i64> = tx
            .query_row(
                "SELECT last_seq FROM relays WHERE id = ?1",
                [&beacon.relay],
                |row| row.get(0),
            )
            .optional()?;
        let last = last.map_or(0, |l| l as u64);
        if last > 0 && beacon.seq <= last {
            return Err(StoreError::OldBeacon {
                relay: beacon.relay.clone(),
                seq: beacon.seq,
                last,
            });
        }
        // A relay first known by URL alone (from [checks] relays) now has a name.
        tx.execute(
            "DELETE FROM relays WHERE id = ?1 AND id != ?2",
            params![beacon.url, beacon.relay],
        )?;
        tx.execute(
            "INSERT INTO relays (id, site, url, version, parents, parent_in_use, cache_bytes,
                cache_bundles, last_seq, last_beacon_at, beacon_ready, beacon_failed,
                beacon_degraded)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)
             ON CONFLICT (id) DO UPDATE SET site = ?2, url = ?3, version = ?4, parents = ?5,
                parent_in_use = ?6, cache_bytes = ?7, cache_bundles = ?8, last_seq = ?9,
                last_beacon_at = ?10, beacon_ready = ?11, beacon_failed = ?12,
                beacon_degraded = ?13",
            params![
                beacon.relay,
                beacon.site,
                beacon.url,
                beacon.version,
                to_json(&beacon.parents),
                beacon.parent_in_use,
                beacon.cache_bytes as i64,
                beacon.cache_bundles as i64,
                beacon.seq as i64,
                now,
                beacon.ready,
                to_json(&beacon.failed),
                to_json(&beacon.degraded),
            ],
        )?;
        let counters = &beacon.since_last;
        let mut bundles: std::collections::BTreeSet<&String> = counters.downloads.keys().collect();
        bundles.extend(counters.integrity.keys());
        for bundle in bundles {
            let downloads = counters.downloads.get(bundle).copied().unwrap_or_default();
            let integrity = counters.integrity.get(bundle).copied().unwrap_or(0);
            tx.execute(
                "INSERT INTO served (relay, bundle, at, completed, failed, integrity)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    beacon.relay,
                    bundle,
                    ms(beacon.sent_at),
                    downloads.completed as i64,
                    downloads.failed as i64,
                    integrity as i64
                ],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Adds a relay known only by URL (from the config), unless one with that URL exists.
    pub fn ensure_configured(&self, url: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO relays (id, url) SELECT ?1, ?1
             WHERE NOT EXISTS (SELECT 1 FROM relays WHERE url = ?1)",
            [url],
        )?;
        Ok(())
    }

    /// Records the result of a health check of `url` at `now`.
    pub fn record_check(
        &self,
        url: &str,
        result: &CheckResult,
        now: i64,
    ) -> Result<(), StoreError> {
        let conn = self.conn();
        match result {
            CheckResult::Answered {
                relay,
                ready,
                failed,
                degraded,
            } => {
                // The answer names the relay: a URL-only row becomes that relay's.
                let named: Option<String> = conn
                    .query_row("SELECT id FROM relays WHERE id = ?1", [relay], |r| r.get(0))
                    .optional()?;
                if named.is_none() {
                    conn.execute(
                        "UPDATE relays SET id = ?1 WHERE url = ?2 AND id = ?2",
                        params![relay, url],
                    )?;
                    conn.execute(
                        "INSERT OR IGNORE INTO relays (id, url) VALUES (?1, ?2)",
                        params![relay, url],
                    )?;
                }
                conn.execute(
                    "UPDATE relays SET check_at = ?2, check_answered = 1, check_ready = ?3,
                        check_failed = ?4, check_degraded = ?5, check_failures = 0,
                        check_failing_since = NULL, check_error = NULL
                     WHERE url = ?1",
                    params![url, now, ready, to_json(failed), to_json(degraded)],
                )?;
            }
            CheckResult::Failed(error) => {
                conn.execute(
                    "UPDATE relays SET check_at = ?2, check_answered = 0,
                        check_failing_since = CASE WHEN check_failures = 0 THEN ?2
                            ELSE check_failing_since END,
                        check_failures = check_failures + 1, check_error = ?3
                     WHERE url = ?1",
                    params![url, now, error],
                )?;
            }
        }
        Ok(())
    }

    /// Every relay, by id.
    pub fn relays(&self) -> Result<Vec<RelayRow>, StoreError> {
        let conn = self.conn();
        let mut statement = conn.prepare(
            "SELECT id, site, url, version, parents, parent_in_use, cache_bytes, cache_bundles,
                last_seq, last_beacon_at, beacon_ready, beacon_failed, beacon_degraded,
                check_at, check_answered, check_ready, check_failed, check_degraded,
                check_failures, check_error, state, state_since, state_reason,
                check_failing_since
             FROM relays ORDER BY id",
        )?;
        let rows = statement.query_map([], |row| {
            Ok(RelayRow {
                id: row.get(0)?,
                site: row.get(1)?,
                url: row.get(2)?,
                version: row.get(3)?,
                parents: json_list(&row.get::<_, String>(4)?),
                parent_in_use: row.get(5)?,
                cache_bytes: row.get::<_, i64>(6)? as u64,
                cache_bundles: row.get::<_, i64>(7)? as u64,
                last_seq: row.get::<_, i64>(8)? as u64,
                last_beacon_at: row.get(9)?,
                beacon_ready: row.get(10)?,
                beacon_failed: json_list(&row.get::<_, String>(11)?),
                beacon_degraded: json_list(&row.get::<_, String>(12)?),
                check_at: row.get(13)?,
                check_answered: row.get(14)?,
                check_ready: row.get(15)?,
                check_failed: json_list(&row.get::<_, String>(16)?),
                check_degraded: json_list(&row.get::<_, String>(17)?),
                check_failures: row.get(18)?,
                check_error: row.get(19)?,
                state: row
                    .get::<_, Option<String>>(20)?
                    .and_then(|s| RelayState::parse(&s)),
                state_since: row.get(21)?,
                state_reason: row.get(22)?,
                check_failing_since: row.get(23)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Sets a relay's state; a change (or the first state) is added to its history.
    /// Returns whether it changed.
    pub fn set_state(
        &self,
        relay: &str,
        state: RelayState,
        reason: &str,
        at: i64,
    ) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let current: Option<Option<String>> = tx
            .query_row("SELECT state FROM relays WHERE id = ?1", [relay], |r| {
                r.get(0)
            })
            .optional()?;
        let Some(current) = current else {
            return Ok(false);
        };
        let changed = current.as_deref() != Some(state.as_str());
        if changed {
            tx.execute(
                "UPDATE relays SET state = ?2, state_since = ?3, state_reason = ?4
                 WHERE id = ?1",
                params![relay, state.as_str(), at, reason],
            )?;
            tx.execute(
                "INSERT INTO relay_states (relay, at, state, reason) VALUES (?1, ?2, ?3, ?4)",
                params![relay, at, state.as_str(), reason],
            )?;
        } else {
            tx.execute(
                "UPDATE relays SET state_reason = ?2 WHERE id = ?1",
                params![relay, reason],
            )?;
        }
        tx.commit()?;
        Ok(changed)
    }

    /// State changes, oldest first; of one relay, or of all.
    pub fn history(&self, relay: Option<&str>) -> Result<Vec<StateChange>, StoreError> {
        let conn = self.conn();
        let mut statement = conn.prepare(
            "SELECT relay, at, state, reason FROM relay_states
             WHERE ?1 IS NULL OR relay = ?1 ORDER BY at, rowid",
        )?;
        let rows = statement.query_map([relay], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, i64>(1)?,
                row.get::<_, String>(2)?,
                row.get::<_, String>(3)?,
            ))
        })?;
        let mut changes = Vec::new();
        for row in rows {
            let (relay, at, state, reason) = row?;
            if let Some(state) = RelayState::parse(&state) {
                changes.push(StateChange {
                    relay,
                    at,
                    state,
                    reason,
                });
            }
        }
        Ok(changes)
    }

    /// Stores the reports not seen before (by `report_id`); returns how many were new.
    pub fn insert_reports(&self, reports: &[Report], now: i64) -> Result<usize, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let mut added = 0;
        {
            let mut insert = tx.prepare(
                "INSERT OR IGNORE INTO reports
                    (report_id, agent, deployment, bundle, outcome, detail, at, received_at,
                     relay)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?;
            for report in reports {
                let outcome = match report.outcome {
                    Outcome::Installed => "installed",
                    Outcome::Failed => "failed",
                };
                added += insert.execute(params![
                    report.report_id,
                    report.agent,
                    report.deployment,
                    report.bundle,
                    outcome,
                    report.detail,
                    ms(report.at),
                    now,
                    report.relay,
                ])?;
            }
        }
        tx.commit()?;
        Ok(added)
    }

    /// The reports of one deployment, oldest first.
    pub fn reports(&self, deployment: &str) -> Result<Vec<ReportRow>, StoreError> {
        let conn = self.conn();
        let mut statement = conn.prepare(
            "SELECT agent, outcome, detail, at, relay FROM reports WHERE deployment = ?1
             ORDER BY at",
        )?;
        let rows = statement.query_map([deployment], |row| {
            Ok(ReportRow {
                agent: row.get(0)?,
                installed: row.get::<_, String>(1)? == "installed",
                detail: row.get(2)?,
                at: row.get(3)?,
                relay: row.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The relays each agent's reports came through (any deployment): agent -> relay.
    pub fn agent_relays(&self) -> Result<std::collections::HashMap<String, String>, StoreError> {
        let conn = self.conn();
        let mut statement = conn.prepare(
            "SELECT agent, relay FROM reports WHERE relay IS NOT NULL ORDER BY received_at",
        )?;
        let rows = statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Adds a deployment; refuses an id in use.
    pub fn create_deployment(&self, deployment: &Deployment) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let inserted = tx.execute(
            "INSERT OR IGNORE INTO deployments (id, bundle, deadline, created_at)
             VALUES (?1, ?2, ?3, ?4)",
            params![
                deployment.id,
                deployment.bundle,
                deployment.deadline,
                deployment.created_at
            ],
        )?;
        if inserted == 0 {
            return Err(StoreError::DeploymentExists(deployment.id.clone()));
        }
        {
            let mut insert = tx.prepare(
                "INSERT OR REPLACE INTO targets (deployment, agent, site) VALUES (?1, ?2, ?3)",
            )?;
            for target in &deployment.targets {
                insert.execute(params![deployment.id, target.agent, target.site])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Records whether a deployment's bundle exists at the root.
    pub fn set_bundle_state(
        &self,
        id: &str,
        state: &str,
        evidence: &str,
    ) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE deployments SET bundle_state = ?2, bundle_evidence = ?3 WHERE id = ?1",
            params![id, state, evidence],
        )?;
        Ok(())
    }

    /// Every deployment, newest first, with its targets.
    pub fn deployments(&self) -> Result<Vec<Deployment>, StoreError> {
        let ids: Vec<String> = {
            let conn = self.conn();
            let mut statement =
                conn.prepare("SELECT id FROM deployments ORDER BY created_at DESC, id")?;
            let rows = statement.query_map([], |row| row.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        let mut deployments = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(deployment) = self.deployment(&id)? {
                deployments.push(deployment);
            }
        }
        Ok(deployments)
    }

    /// One deployment with its targets.
    pub fn deployment(&self, id: &str) -> Result<Option<Deployment>, StoreError> {
        let conn = self.conn();
        let row = conn
            .query_row(
                "SELECT bundle, deadline, created_at, bundle_state, bundle_evidence
                 FROM deployments WHERE id = ?1",
                [id],
                |row| {
                    Ok((
                        row.get::<_, String>(0)?,
                        row.get::<_, i64>(1)?,
                        row.get::<_, i64>(2)?,
                        row.get::<_, String>(3)?,
                        row.get::<_, String>(4)?,
                    ))
                },
            )
            .optional()?;
        let Some((bundle, deadline, created_at, bundle_state, bundle_evidence)) = row else {
            return Ok(None);
        };
        let mut statement = conn.prepare(
            "SELECT agent, site FROM targets WHERE deployment = ?1 ORDER BY site, agent",
        )?;
        let targets = statement
            .query_map([id], |row| {
                Ok(Target {
                    agent: row.get(0)?,
                    site: row.get(1)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(Some(Deployment {
            id: id.to_string(),
            bundle,
            deadline,
            created_at,
            targets,
            bundle_state,
            bundle_evidence,
        }))
    }

    /// What each relay served of `bundle` between `from` and `to` (beacon send times).
    pub fn served(
        &self,
        bundle: &str,
        from: i64,
        to: i64,
    ) -> Result<std::collections::HashMap<String, Served>, StoreError> {
        let conn = self.conn();
        let mut statement = conn.prepare(
            "SELECT relay, SUM(completed), SUM(failed), SUM(integrity) FROM served
             WHERE bundle = ?1 AND at >= ?2 AND at <= ?3 GROUP BY relay",
        )?;
        let rows = statement.query_map(params![bundle, from, to], |row| {
            Ok((
                row.get::<_, String>(0)?,
                Served {
                    completed: row.get::<_, i64>(1)? as u64,
                    failed: row.get::<_, i64>(2)? as u64,
                    integrity: row.get::<_, i64>(3)? as u64,
                },
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}
