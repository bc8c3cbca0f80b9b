//! Versions behind a module name, and rolling a new one out safely.
//!
//! A bare module name (`loyalty`, not `loyalty@2` or `sha256:…`) means its **live**
//! version wherever it is used: direct calls, workflow steps, hook bindings and the
//! registry's lookups. The first version registered under a name goes live; later ones
//! wait until promoted, so an upload never changes what runs. A **rollout** puts a
//! candidate beside the live version:
//! - as a **canary** it serves a share of calls (all steps of one run take the same
//!   side, chosen from the run id), and its error rate is compared with the live
//!   version's over a sliding window; past the threshold it is rolled back at once, by
//!   the agent itself;
//! - in **shadow** it serves nothing: a share of live calls is recorded and replayed
//!   through it with every host call answered from the live call's tape, and the
//!   outcomes are compared and counted (`shadow.rs`).
//!
//! `promote` makes the candidate (or any version of the name) live; `rollback` ends a
//! rollout, or without one goes back to the version live before the last promotion.
//!
//! Rows are few (one per name) and read on every call, so [`ReleaseTable`] keeps them in
//! memory, written through: SQL first, memory after the commit. Error windows and shadow
//! counts are this process's own and start afresh when it restarts.

use std::collections::HashMap;

use deadlift_engine::registry::{ModuleError, ModuleId, ModuleInfo};
use deadlift_engine::{CallError, Code, Engine};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::clock::now_ms;
use crate::store::{Database, DbError};

pub use crate::shadow::{ShadowExample, ShadowStats, Shadowed};
pub use table::ReleaseTable;
use table::{entry, history, write_row};
pub(crate) use table::{on_delete, on_insert};

mod changes;
mod table;

/// Calls a canary takes by default, in percent.
pub const DEFAULT_CANARY_PERCENT: f64 = 5.0;
/// The window over which error rates are compared, by default.
pub const DEFAULT_WINDOW_S: u64 = 300;
/// Calls the candidate must have served in the window before it is judged, by default.
pub const DEFAULT_MIN_CALLS: u64 = 20;
/// How many percentage points the candidate's error rate may exceed the live one's.
pub const DEFAULT_MAX_ERROR_INCREASE: f64 = 5.0;
/// Rollouts one tenant may have in progress at once: each holds counters and, in
/// shadow, examples in memory.
pub const MAX_ROLLOUTS_PER_TENANT: usize = 16;
/// Buckets a window is counted in.
const BUCKETS: u64 = 30;

/// One version of a module name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Version {
    #[schema(value_type = String)]
    pub module: ModuleId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

impl Version {
    fn of(info: &ModuleInfo) -> Self {
        Self {
            module: info.id,
            version: info.version.clone(),
        }
    }

    /// `name@version`, or the module id when the version has no label.
    pub fn label(&self, name: &str) -> String {
        match &self.version {
            Some(version) => format!("{name}@{version}"),
            None => self.module.to_string(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RolloutMode {
    /// The candidate serves a share of calls and is judged by its error rate.
    #[default]
    Canary,
    /// The candidate runs beside a share of live calls, answered from their tapes, and
    /// serves none.
    Shadow,
}

/// A rollout in progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Rollout {
    pub candidate: Version,
    pub mode: RolloutMode,
    /// The share of calls, in percent, the candidate serves (canary) or shadows.
    pub percent: f64,
    pub window_s: u64,
    pub min_calls: u64,
    /// Percentage points by which the candidate's error rate may exceed the live
    /// version's before it is rolled back.
    pub max_error_increase: f64,
    pub started_unix_ms: i64,
}

impl Rollout {
    fn share_basis_points(&self) -> u64 {
        (self.percent * 100.0).round().clamp(0.0, 10_000.0) as u64
    }
}

/// What a module name stands for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Release {
    pub live: Version,
    /// The version live before the last promotion (where `rollback` goes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<Version>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<Rollout>,
}

/// A rollout as asked for.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RolloutSpec {
    /// The candidate: a version of this name (`2`), `name@version`, or `sha256:<hex>`
    /// of a module registered under this name.
    pub candidate: String,
    #[serde(default)]
    pub mode: RolloutMode,
    /// Share of calls in percent (default 5 for a canary, 100 in shadow).
    #[schema(minimum = 0.01, maximum = 100)]
    pub percent: Option<f64>,
    /// Seconds over which error rates are compared (default 300).
    #[schema(minimum = 10, maximum = 86400)]
    pub window_s: Option<u64>,
    /// Calls the candidate serves in the window before it is judged (default 20).
    #[schema(minimum = 1, maximum = 1000000)]
    pub min_calls: Option<u64>,
    /// Percentage points of errors the candidate may have over the live version
    /// (default 5).
    #[schema(minimum = 0, maximum = 100)]
    pub max_error_increase: Option<f64>,
}

/// One change of a release, for the record.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct HistoryEntry {
    pub at_unix_ms: i64,
    /// `released` (first version), `rollout`, `promoted`, `rolled_back`,
    /// `auto_rolled_back`, `reverted` (back to the previous live version) or `deleted`.
    pub action: String,
    #[schema(value_type = String)]
    pub module: ModuleId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// A canary's calls and errors in its window, beside the live version's.
#[derive(Debug, Clone, Default, PartialEq, Serialize, utoipa::ToSchema)]
pub struct WindowCounts {
    pub live_calls: u64,
    pub live_errors: u64,
    pub candidate_calls: u64,
    pub candidate_errors: u64,
}

/// A name's release as the API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ReleaseStatus {
    pub name: String,
    #[serde(flatten)]
    pub release: Release,
    /// The rollout's counts in its window (canary).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<WindowCounts>,
    /// The rollout's comparisons (shadow).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowStats>,
    /// Newest first.
    pub history: Vec<HistoryEntry>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error(transparent)]
    Module(#[from] ModuleError),
    #[error("no module is registered under the name `{0}`")]
    NameNotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    /// The version lacks what a workflow or hook using the name needs.
    #[error("{0}")]
    Incompatible(String),
    #[error(transparent)]
    Db(#[from] DbError),
    /// The workflows or hook bindings using the name could not be read.
    #[error("cannot read what uses the name: {0}")]
    Lookup(String),
}

impl ReleaseError {
    pub fn code(&self) -> Code {
        match self {
            Self::Module(e) => e.code(),
            Self::NameNotFound(_) => Code::ModuleNotFound,
            Self::Invalid(_) => Code::RolloutInvalid,
            Self::Conflict(_) => Code::RolloutConflict,
            Self::Incompatible(_) => Code::ModuleIncompatible,
            Self::Db(e) => e.code(),
            Self::Lookup(_) => Code::Internal,
        }
    }
}

impl From<tokio::task::JoinError> for ReleaseError {
    fn from(e: tokio::task::JoinError) -> Self {
        Self::Db(e.into())
    }
}

/// Whether a module reference is a bare name (not `name@version`, not an id): what a
/// release routes.
pub fn is_bare_name(reference: &str) -> bool {
    !reference.contains('@') && !reference.starts_with("sha256:")
}

/// Which version serves one call.
#[derive(Debug, Clone, PartialEq)]
pub struct Routed {
    pub name: String,
    pub version: Version,
    /// Served by a canary's candidate.
    pub canary: bool,
    /// A shadow rollout wants this call replayed through its candidate.
    pub shadow: Option<Version>,
    /// The rollout the call counts towards, if any.
    pub(crate) rollout_started: Option<i64>,
}

/// Calls and errors in a sliding window, counted in buckets.
#[derive(Debug)]
struct Window {
    bucket_ms: u64,
    /// (bucket index, calls, errors), oldest first.
    buckets: std::collections::VecDeque<(u64, u64, u64)>,
}

impl Window {
    fn new(window_s: u64) -> Self {
        Self {
            bucket_ms: (window_s * 1000 / BUCKETS).max(1),
            buckets: std::collections::VecDeque::new(),
        }
    }

    fn add(&mut self, now_ms: u64, failed: bool) {
        let index = now_ms / self.bucket_ms;
        match self.buckets.back_mut() {
            Some((at, calls, errors)) if *at == index => {
                *calls += 1;
                *errors += u64::from(failed);
            }
            _ => self.buckets.push_back((index, 1, u64::from(failed))),
        }
        self.expire(index);
    }

    fn expire(&mut self, index: u64) {
        while self
            .buckets
            .front()
            .is_some_and(|(at, _, _)| *at + BUCKETS <= index)
        {
            self.buckets.pop_front();
        }
    }

    fn totals(&mut self, now_ms: u64) -> (u64, u64) {
        self.expire(now_ms / self.bucket_ms);
        self.buckets
            .iter()
            .fold((0, 0), |(c, e), (_, calls, errors)| (c + calls, e + errors))
    }
}

/// A canary's judge: both sides' windows.
#[derive(Debug)]
struct Judge {
    started: i64,
    live: Window,
    candidate: Window,
}

/// Whether a failed call counts against the version that served it: what the plug-in
/// did (trapped, failed, ran out of time, fuel or memory, lacks a function), not what the
/// agent did (shed it, was overloaded, was cancelled or failed inside).
pub fn counts_against_version(error: &CallError) -> bool {
    !matches!(
        error,
        CallError::Overloaded { .. }
            | CallError::Shed { .. }
            | CallError::Cancelled
            | CallError::Internal { .. }
            | CallError::HostFunction { .. }
            | CallError::ModuleNotFound { .. }
            | CallError::InputTooLarge { .. }
    )
}

/// The agent's releases: routing, judging canaries, changing what names stand for.
#[derive(Debug)]
pub struct Releases {
    db: Database,
    engine: Engine,
    judges: Mutex<HashMap<(String, String), Judge>>,
    /// Serialises changes, so each is checked against the state it replaces.
    writes: Mutex<()>,
    /// Told of the releases this agent changed by itself (a canary rolled back), once the
    /// agent is in a cluster.
    changes: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<(String, String)>>,
    pub(crate) shadow: crate::shadow::Shadows,
}

/// What a workflow step or hook binding that uses a name needs of its versions.
#[derive(Debug, Clone)]
pub struct NameUse {
    /// Who uses it, for messages (`workflow `checkout` step `score``).
    pub user: String,
    pub function: String,
    /// The host functions its grant offers.
    pub host_functions: std::collections::BTreeSet<String>,
}

impl Releases {
    pub(crate) fn new(db: Database, engine: Engine) -> Self {
        Self {
            db,
            engine,
            judges: Mutex::default(),
            writes: Mutex::new(()),
            changes: std::sync::OnceLock::new(),
            shadow: crate::shadow::Shadows::default(),
        }
    }

    pub(crate) fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The version that serves a call of `reference` when it is a bare name with a
    /// release (`None` otherwise: `name@version` and ids name one module). `key` keeps a
    /// run's calls on one side of a canary; without one each call draws at random.
    pub fn route(&self, tenant: &str, reference: &str, key: Option<&str>) -> Option<Routed> {
        if !is_bare_name(reference) {
            return None;
        }
        let release = self.db.releases().get(tenant, reference)?;
        let mut routed = Routed {
            name: reference.to_owned(),
            version: release.live.clone(),
            canary: false,
            shadow: None,
            rollout_started: None,
        };
        if let Some(rollout) = &release.rollout {
            routed.rollout_started = Some(rollout.started_unix_ms);
            let draw = match key {
                Some(key) => {
                    let digest = Sha256::new()
                        .chain_update(key.as_bytes())
                        .chain_update([0])
                        .chain_update(reference.as_bytes())
                        .chain_update(rollout.started_unix_ms.to_le_bytes())
                        .finalize();
                    let mut first = [0u8; 8];
                    first.copy_from_slice(&digest[..8]);
                    u64::from_le_bytes(first) % 10_000
                }
                None => (crate::workflow::random_fraction() * 10_000.0) as u64,
            };
            if draw < rollout.share_basis_points() {
                match rollout.mode {
                    RolloutMode::Canary => {
                        routed.version = rollout.candidate.clone();
                        routed.canary = true;
                    }
                    RolloutMode::Shadow => routed.shadow = Some(rollout.candidate.clone()),
                }
            }
        }
        Some(routed)
    }

    /// Counts a routed call's outcome towards its canary, and rolls the canary back when
    /// its error rate is past the threshold.
    pub fn observe(&self, tenant: &str, routed: &Routed, failed: bool) {
        let Some(started) = routed.rollout_started else {
            return;
        };
        let Some(release) = self.db.releases().get(tenant, &routed.name) else {
            return;
        };
        let Some(rollout) = release
            .rollout
            .as_ref()
            .filter(|r| r.started_unix_ms == started && r.mode == RolloutMode::Canary)
        else {
            return;
        };
        let now = u64::try_from(now_ms()).unwrap_or(0);
        let verdict = {
            let mut judges = self.judges.lock();
            let key = (tenant.to_owned(), routed.name.clone());
            let judge = judges.entry(key).or_insert_with(|| Judge {
                started,
                live: Window::new(rollout.window_s),
                candidate: Window::new(rollout.window_s),
            });
            if judge.started != started {
                *judge = Judge {
                    started,
                    live: Window::new(rollout.window_s),
                    candidate: Window::new(rollout.window_s),
                };
            }
            if routed.canary {
                judge.candidate.add(now, failed);
            } else {
                judge.live.add(now, failed);
            }
            let (candidate_calls, candidate_errors) = judge.candidate.totals(now);
            let (live_calls, live_errors) = judge.live.totals(now);
            let rate = |errors: u64, calls: u64| {
                if calls == 0 {
                    0.0
                } else {
                    errors as f64 * 100.0 / calls as f64
                }
            };
            let candidate_rate = rate(candidate_errors, candidate_calls);
            let live_rate = rate(live_errors, live_calls);
            (routed.canary
                && candidate_calls >= rollout.min_calls
                && candidate_rate > live_rate + rollout.max_error_increase)
                .then(|| {
                    format!(
                        "error rate {candidate_rate:.1}% ({candidate_errors} of {candidate_calls} calls) against {live_rate:.1}% ({live_errors} of {live_calls}) for the live version over the last {} s; at most {} points more are allowed",
                        rollout.window_s, rollout.max_error_increase
                    )
                })
        };
        if let Some(detail) = verdict {
            self.auto_rollback(tenant, &routed.name, rollout.clone(), detail);
        }
    }

    /// Stops the canary now (in memory, so the next call goes to the live version) and
    /// writes that down off the call path.
    fn auto_rollback(&self, tenant: &str, name: &str, rollout: Rollout, detail: String) {
        if !self
            .db
            .releases()
            .end_rollout(tenant, name, rollout.started_unix_ms)
        {
            return;
        }
        self.forget(tenant, name);
        if let Some(changes) = self.changes.get() {
            let _ = changes.send((tenant.to_owned(), name.to_owned()));
        }
        tracing::warn!(tenant, module = name, candidate = %rollout.candidate.module, "canary rolled back: {detail}");
        let (db, tenant, name) = (self.db.clone(), tenant.to_owned(), name.to_owned());
        let record = move || {
            // Memory already says what happened; write what memory says now, which a
            // later change may have moved on.
            let current = db
                .releases()
                .get(&tenant, &name)
                .map(|r| Release::clone(&r));
            let entry = entry("auto_rolled_back", &rollout.candidate, Some(detail));
            let mut conn = db.lock();
            let written = conn.transaction().map_err(DbError::from).and_then(|tx| {
                write_row(&tx, &tenant, &name, current.as_ref(), &entry)?;
                Ok(tx.commit()?)
            });
            if let Err(error) = written {
                tracing::error!(%tenant, module = %name, "cannot record an automatic rollback: {error}");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn_blocking(record);
            }
            Err(_) => record(),
        }
    }

    /// A name's release, its rollout's counts and its history.
    pub async fn status(&self, tenant: &str, name: &str) -> Result<ReleaseStatus, ReleaseError> {
        let release = self
            .db
            .releases()
            .get(tenant, name)
            .ok_or_else(|| ReleaseError::NameNotFound(name.to_owned()))?;
        let (db, owner, key) = (self.db.clone(), tenant.to_owned(), name.to_owned());
        let history =
            tokio::task::spawn_blocking(move || history(&db.read(), &owner, &key)).await??;
        let mut window = None;
        let mut shadow = None;
        if let Some(rollout) = &release.rollout {
            match rollout.mode {
                RolloutMode::Canary => {
                    let now = u64::try_from(now_ms()).unwrap_or(0);
                    let mut judges = self.judges.lock();
                    let counts = judges
                        .get_mut(&(tenant.to_owned(), name.to_owned()))
                        .filter(|j| j.started == rollout.started_unix_ms)
                        .map(|judge| {
                            let (live_calls, live_errors) = judge.live.totals(now);
                            let (candidate_calls, candidate_errors) = judge.candidate.totals(now);
                            WindowCounts {
                                live_calls,
                                live_errors,
                                candidate_calls,
                                candidate_errors,
                            }
                        });
                    window = Some(counts.unwrap_or_default());
                }
                RolloutMode::Shadow => {
                    shadow = Some(self.shadow.stats(tenant, name, rollout.started_unix_ms));
                }
            }
        }
        Ok(ReleaseStatus {
            name: name.to_owned(),
            release: Release::clone(&release),
            window,
            shadow,
            history,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_forgets_what_is_older_than_it() {
        let mut window = Window::new(30);
        window.add(0, true);
        window.add(500, false);
        assert_eq!(window.totals(1_000), (2, 1));
        window.add(20_000, false);
        assert_eq!(window.totals(29_999), (3, 1));
        assert_eq!(window.totals(30_500), (1, 0));
        assert_eq!(window.totals(60_000), (0, 0));
    }

    #[test]
    fn a_share_is_counted_in_basis_points() {
        let rollout = Rollout {
            candidate: Version {
                module: ModuleId::of(b"x"),
                version: None,
            },
            mode: RolloutMode::Canary,
            percent: 0.05,
            window_s: 60,
            min_calls: 1,
            max_error_increase: 0.0,
            started_unix_ms: 0,
        };
        assert_eq!(rollout.share_basis_points(), 5);
    }
}
