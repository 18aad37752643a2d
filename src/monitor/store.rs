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
    #[error("monitor database {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
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
        /// The relay's site; empty from a relay too old to say.
        site: String,
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

/// Downloads and integrity failures of one bundle at one relay in one minute (by the
/// beacons sent in that minute).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ServedRow {
    pub relay: String,
    /// Start of the minute, Unix ms.
    pub at: i64,
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
    bundle TEXT NOT NULL,
    at INTEGER NOT NULL,
    relay TEXT NOT NULL,
    completed INTEGER NOT NULL,
    failed INTEGER NOT NULL,
    integrity INTEGER NOT NULL,
    PRIMARY KEY (bundle, at, relay)
);
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
CREATE INDEX IF NOT EXISTS deployments_by_time ON deployments (created_at);
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
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
                path: dir.display().to_string(),
                source,
            })?;
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
    pub fn record_beacon(
        &self,
        beacon: &Beacon,
        now: i64,
        max_skew_ms: i64,
    ) -> Result<(), StoreError> {
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
        // A relay first known by URL alone (from [checks] relays) now has a name: its
        // history moves to that name.
        if beacon.url != beacon.relay {
            tx.execute(
                "UPDATE relay_states SET relay = ?2 WHERE relay = ?1",
                params![beacon.url, beacon.relay],
            )?;
            tx.execute("DELETE FROM relays WHERE id = ?1", [&beacon.url])?;
        }
        // A beacon counts from when it arrived (relay clocks may be off by up to the
        // allowed skew), unless it is older than any clock error: then it waited in a queue
        // and says how the relay was back then, not now.
        let sent = ms(beacon.sent_at);
        let heard_at = if now - sent > max_skew_ms { sent } else { now };
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
                heard_at,
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
            let minute = ms(beacon.sent_at).div_euclid(60_000) * 60_000;
            tx.execute(
                "INSERT INTO served (relay, bundle, at, completed, failed, integrity)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (bundle, at, relay) DO UPDATE SET
                    completed = completed + excluded.completed,
                    failed = failed + excluded.failed,
                    integrity = integrity + excluded.integrity",
                params![
                    beacon.relay,
                    bundle,
                    minute,
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

    /// Records the result of a health check of `url` at `now`. An answer updates the relay
    /// it names (a row known by URL alone takes that name, with its history); a failure
    /// counts against every relay at that URL.
    pub fn record_check(
        &self,
        url: &str,
        result: &CheckResult,
        now: i64,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        match result {
            CheckResult::Answered {
                relay,
                site,
                ready,
                failed,
                degraded,
            } => {
                let exists = |id: &str| -> rusqlite::Result<bool> {
                    Ok(tx
                        .query_row("SELECT 1 FROM relays WHERE id = ?1", [id], |_| Ok(()))
                        .optional()?
                        .is_some())
                };
                let named = exists(relay)?;
                let by_url = url != relay && exists(url)?;
                if by_url {
                    tx.execute(
                        "UPDATE relay_states SET relay = ?2 WHERE relay = ?1",
                        params![url, relay],
                    )?;
                    if named {
                        tx.execute("DELETE FROM relays WHERE id = ?1", [url])?;
                    } else {
                        tx.execute(
                            "UPDATE relays SET id = ?2 WHERE id = ?1",
                            params![url, relay],
                        )?;
                    }
                } else if !named {
                    tx.execute(
                        "INSERT INTO relays (id, url) VALUES (?1, ?2)",
                        params![relay, url],
                    )?;
                }
                tx.execute(
                    "UPDATE relays SET check_at = ?2, check_answered = 1, check_ready = ?3,
                        check_failed = ?4, check_degraded = ?5, check_failures = 0,
                        check_failing_since = NULL, check_error = NULL,
                        url = CASE WHEN url = '' THEN ?6 ELSE url END,
                        site = CASE WHEN ?7 = '' THEN site ELSE ?7 END
                     WHERE id = ?1",
                    params![
                        relay,
                        now,
                        ready,
                        to_json(failed),
                        to_json(degraded),
                        url,
                        site
                    ],
                )?;
            }
            CheckResult::Failed(error) => {
                tx.execute(
                    "UPDATE relays SET check_at = ?2, check_answered = 0,
                        check_failing_since = CASE WHEN check_failures = 0 THEN ?2
                            ELSE check_failing_since END,
                        check_failures = check_failures + 1, check_error = ?3
                     WHERE url = ?1",
                    params![url, now, error],
                )?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Every relay, by id.
    pub fn relays(&self) -> Result<Vec<RelayRow>, StoreError> {
        let conn = self.conn();
        let mut statement = conn.prepare(&format!("{RELAY_SELECT} ORDER BY id"))?;
        let rows = statement.query_map([], relay_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Sets a relay's state to what `derive` makes of its current row, read in the same
    /// transaction, so a beacon arriving meanwhile cannot be overwritten by a stale
    /// verdict. A change, or the first state, is added to its history; it is dated when
    /// its cause began (as `derive` says), but never before the previous change. Returns
    /// the state and whether it changed; `None` when there is no such relay or nothing
    /// was heard from it yet.
    pub fn update_state<F>(
        &self,
        relay: &str,
        derive: F,
    ) -> Result<Option<(RelayState, String, bool)>, StoreError>
    where
        F: FnOnce(&RelayRow) -> Option<(RelayState, String, i64)>,
    {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let row = tx
            .query_row(&format!("{RELAY_SELECT} WHERE id = ?1"), [relay], relay_row)
            .optional()?;
        let Some(row) = row else {
            return Ok(None);
        };
        let Some((state, reason, since)) = derive(&row) else {
            return Ok(None);
        };
        let at = since.max(row.state_since.unwrap_or(i64::MIN));
        let changed = row.state != Some(state);
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
        } else if row.state_reason != reason {
            tx.execute(
                "UPDATE relays SET state_reason = ?2 WHERE id = ?1",
                params![relay, reason],
            )?;
        }
        tx.commit()?;
        Ok(Some((state, reason, changed)))
    }

    /// Deletes served rows and state changes older than `before`, keeping each relay's
    /// latest state change (the state a later window starts in). Returns rows deleted.
    pub fn prune(&self, before: i64) -> Result<usize, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let mut deleted = tx.execute("DELETE FROM served WHERE at < ?1", [before])?;
        deleted += tx.execute(
            "DELETE FROM relay_states WHERE at < ?1
             AND rowid NOT IN (SELECT MAX(rowid) FROM relay_states GROUP BY relay)",
            [before],
        )?;
        tx.commit()?;
        Ok(deleted)
    }

    /// State changes, oldest first; of one relay, or of all.
    pub fn history(&self, relay: Option<&str>) -> Result<Vec<StateChange>, StoreError> {
        let conn = self.conn();
        let select = "SELECT relay, at, state, reason FROM relay_states";
        let mut statement = match relay {
            Some(_) => conn.prepare(&format!("{select} WHERE relay = ?1 ORDER BY at, rowid"))?,
            None => conn.prepare(&format!("{select} ORDER BY at, rowid"))?,
        };
        let map = |row: &rusqlite::Row<'_>| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, i64>(1)?,
                row.get::<_, String>(2)?,
                row.get::<_, String>(3)?,
            ))
        };
        let rows: Vec<_> = match relay {
            Some(relay) => statement
                .query_map([relay], map)?
                .collect::<Result<_, _>>()?,
            None => statement.query_map([], map)?.collect::<Result<_, _>>()?,
        };
        Ok(rows
            .into_iter()
            .filter_map(|(relay, at, state, reason)| {
                Some(StateChange {
                    relay,
                    at,
                    state: RelayState::parse(&state)?,
                    reason,
                })
            })
            .collect())
    }

    /// The `limit` latest state changes of all relays, newest first.
    pub fn recent_changes(&self, limit: usize) -> Result<Vec<StateChange>, StoreError> {
        let conn = self.conn();
        let mut statement = conn.prepare(
            "SELECT relay, at, state, reason FROM relay_states ORDER BY at DESC, rowid DESC
             LIMIT ?1",
        )?;
        let rows = statement.query_map([limit as i64], |row| {
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

    /// The reports of one deployment about its bundle, oldest first (a report naming
    /// another bundle says nothing about this deployment).
    pub fn reports(&self, deployment: &str, bundle: &str) -> Result<Vec<ReportRow>, StoreError> {
        let conn = self.conn();
        let mut statement = conn.prepare(
            "SELECT agent, outcome, detail, at, relay FROM reports
             WHERE deployment = ?1 AND bundle = ?2 ORDER BY at",
        )?;
        let rows = statement.query_map([deployment, bundle], |row| {
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

    /// (id, bundle, deadline) of the deployments whose bundle is not known present.
    pub fn unsure_bundles(&self) -> Result<Vec<(String, String, i64)>, StoreError> {
        let conn = self.conn();
        let mut statement = conn.prepare(
            "SELECT id, bundle, deadline FROM deployments WHERE bundle_state != 'present'",
        )?;
        let rows = statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
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

    /// The newest `limit` deployments, newest first, with their targets.
    pub fn deployments(&self, limit: usize) -> Result<Vec<Deployment>, StoreError> {
        let ids: Vec<String> = {
            let conn = self.conn();
            let mut statement =
                conn.prepare("SELECT id FROM deployments ORDER BY created_at DESC, id LIMIT ?1")?;
            let rows = statement.query_map([limit as i64], |row| row.get(0))?;
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

    /// What relays served of `bundle` from `from` on, by minute.
    pub fn served(&self, bundle: &str, from: i64) -> Result<Vec<ServedRow>, StoreError> {
        let conn = self.conn();
        let mut statement = conn.prepare(
            "SELECT relay, at, completed, failed, integrity FROM served
             WHERE bundle = ?1 AND at >= ?2 ORDER BY at",
        )?;
        let rows = statement.query_map(params![bundle, from], |row| {
            Ok(ServedRow {
                relay: row.get(0)?,
                at: row.get(1)?,
                completed: row.get::<_, i64>(2)? as u64,
                failed: row.get::<_, i64>(3)? as u64,
                integrity: row.get::<_, i64>(4)? as u64,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

const RELAY_SELECT: &str = "SELECT id, site, url, version, parents, parent_in_use, cache_bytes,
    cache_bundles, last_seq, last_beacon_at, beacon_ready, beacon_failed, beacon_degraded,
    check_at, check_answered, check_ready, check_failed, check_degraded, check_failures,
    check_error, state, state_since, state_reason, check_failing_since FROM relays";

fn relay_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<RelayRow> {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::beacon::{Counters, Downloads};

    fn beacon(relay: &str, url: &str, seq: u64, at_ms: i64) -> Beacon {
        let mut since_last = Counters::default();
        since_last.downloads.insert(
            "b1".into(),
            Downloads {
                completed: 2,
                failed: 1,
            },
        );
        Beacon {
            relay: relay.into(),
            site: "lyon".into(),
            url: url.into(),
            version: "0.1.0".into(),
            seq,
            sent_at: chrono::DateTime::from_timestamp_millis(at_ms).unwrap(),
            uptime_seconds: 1,
            parents: vec![],
            parent_in_use: None,
            cache_bytes: 0,
            cache_bundles: 0,
            upstream: vec![],
            ready: true,
            failed: vec![],
            degraded: vec![],
            since_last,
        }
    }

    #[test]
    fn a_relay_known_by_url_takes_its_name_and_keeps_its_history() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("m.db")).unwrap();
        let url = "http://10.0.0.7:7420";
        store.ensure_configured(url).unwrap();
        store
            .record_check(url, &CheckResult::Failed("refused".into()), 1_000)
            .unwrap();
        let down = |_: &RelayRow| Some((RelayState::Down, "checks".to_string(), 1_000));
        store.update_state(url, down).unwrap();

        let answer = CheckResult::Answered {
            relay: "lyon-1".into(),
            site: "lyon".into(),
            ready: true,
            failed: vec![],
            degraded: vec![],
        };
        store.record_check(url, &answer, 2_000).unwrap();
        let relays = store.relays().unwrap();
        assert_eq!(relays.len(), 1, "{relays:?}");
        assert_eq!(
            (relays[0].id.as_str(), relays[0].url.as_str()),
            ("lyon-1", url)
        );
        assert_eq!(relays[0].site, "lyon", "the check told the relay's site");
        assert_eq!(relays[0].check_failures, 0);
        assert_eq!(
            store.history(Some("lyon-1")).unwrap().len(),
            1,
            "history moved"
        );

        // A beacon from the same relay updates the row; an old sequence is refused, also
        // after reopening the database.
        store
            .record_beacon(&beacon("lyon-1", url, 10, 60_500), 3_000, 300_000)
            .unwrap();
        store
            .record_beacon(&beacon("lyon-1", url, 11, 61_000), 3_100, 300_000)
            .unwrap();
        drop(store);
        let store = Store::open(&dir.path().join("m.db")).unwrap();
        let old = store.record_beacon(&beacon("lyon-1", url, 11, 62_000), 3_200, 300_000);
        assert!(matches!(old, Err(StoreError::OldBeacon { last: 11, .. })));
        assert_eq!(store.relays().unwrap().len(), 1);

        // Both beacons fell in the same minute: one served row, summed.
        let served = store.served("b1", 0).unwrap();
        assert_eq!(served.len(), 1);
        assert_eq!(
            (served[0].at, served[0].completed, served[0].failed),
            (60_000, 4, 2)
        );

        // Pruning drops old rows but keeps each relay's latest state.
        let up = |_: &RelayRow| Some((RelayState::Up, "ok".to_string(), 5_000));
        store.update_state("lyon-1", up).unwrap();
        assert!(store.prune(100_000).unwrap() >= 2);
        assert!(store.served("b1", 0).unwrap().is_empty());
        let history = store.history(Some("lyon-1")).unwrap();
        assert_eq!(history.len(), 1);
        assert_eq!(history[0].state, RelayState::Up);

        // A beacon that waited in the tree longer than any clock error counts from when it
        // was sent, not from when it arrived; a fresh one from when it arrived.
        store
            .record_beacon(&beacon("lyon-1", url, 12, 200_000), 800_000, 300_000)
            .unwrap();
        assert_eq!(store.relays().unwrap()[0].last_beacon_at, Some(200_000));
        store
            .record_beacon(&beacon("lyon-1", url, 13, 810_000), 811_000, 300_000)
            .unwrap();
        assert_eq!(store.relays().unwrap()[0].last_beacon_at, Some(811_000));
    }
}
