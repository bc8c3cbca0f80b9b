//! Changing what a name stands for: starting a rollout, promoting, rolling back (each
//! checked against the workflow steps and hook bindings that call the name, one change at
//! a time), a release replicated from the cluster, and whether a module may be deleted.

use std::sync::Arc;

use deadlift_engine::registry::ModuleInfo;

use super::table::{entry, put_row, write_row};
use super::{
    DEFAULT_CANARY_PERCENT, DEFAULT_MAX_ERROR_INCREASE, DEFAULT_MIN_CALLS, DEFAULT_WINDOW_S,
    HistoryEntry, MAX_ROLLOUTS_PER_TENANT, NameUse, Release, ReleaseError, ReleaseStatus, Releases,
    Rollout, RolloutMode, RolloutSpec, Version,
};
use crate::clock::now_ms;
use crate::store::DbError;

impl Releases {
    /// Starts a rollout of `spec.candidate` beside `name`'s live version. `uses` are
    /// the workflow steps and hook bindings that call the name: the candidate must serve
    /// them all.
    pub async fn start_rollout(
        self: &Arc<Self>,
        tenant: &str,
        name: &str,
        spec: RolloutSpec,
        uses: Vec<NameUse>,
    ) -> Result<ReleaseStatus, ReleaseError> {
        let defaults = match spec.mode {
            RolloutMode::Canary => DEFAULT_CANARY_PERCENT,
            RolloutMode::Shadow => 100.0,
        };
        let percent = spec.percent.unwrap_or(defaults);
        if !(0.01..=100.0).contains(&percent) {
            return Err(ReleaseError::Invalid(
                "`percent` must be between 0.01 and 100".into(),
            ));
        }
        let window_s = spec.window_s.unwrap_or(DEFAULT_WINDOW_S);
        if !(10..=86_400).contains(&window_s) {
            return Err(ReleaseError::Invalid(
                "`window_s` must be between 10 and 86400".into(),
            ));
        }
        let min_calls = spec.min_calls.unwrap_or(DEFAULT_MIN_CALLS);
        if !(1..=1_000_000).contains(&min_calls) {
            return Err(ReleaseError::Invalid(
                "`min_calls` must be between 1 and 1000000".into(),
            ));
        }
        let max_error_increase = spec
            .max_error_increase
            .unwrap_or(DEFAULT_MAX_ERROR_INCREASE);
        if !(0.0..=100.0).contains(&max_error_increase) {
            return Err(ReleaseError::Invalid(
                "`max_error_increase` must be between 0 and 100".into(),
            ));
        }
        self.change(tenant, name, move |this, tenant, name, current| {
            let candidate = this.version_of(tenant, name, &spec.candidate)?;
            if let Some(rollout) = &current.rollout {
                return Err(ReleaseError::Conflict(format!(
                    "a rollout of {} is in progress; promote it or roll it back first",
                    rollout.candidate.label(name)
                )));
            }
            if candidate.id == current.live.module {
                return Err(ReleaseError::Conflict(format!(
                    "{} is already live",
                    Version::of(&candidate).label(name)
                )));
            }
            if this.db.releases().rollouts(tenant) >= MAX_ROLLOUTS_PER_TENANT {
                return Err(ReleaseError::Conflict(format!(
                    "{MAX_ROLLOUTS_PER_TENANT} rollouts are in progress already; end one first"
                )));
            }
            compatible(&candidate, name, &uses)?;
            let rollout = Rollout {
                candidate: Version::of(&candidate),
                mode: spec.mode,
                percent,
                window_s,
                min_calls,
                max_error_increase,
                // Distinct per rollout: it keys routing draws and the judges.
                started_unix_ms: now_ms().max(
                    current
                        .rollout
                        .as_ref()
                        .map_or(0, |r| r.started_unix_ms + 1),
                ),
            };
            let detail = match spec.mode {
                RolloutMode::Canary => format!(
                    "canary on {percent}% of calls, judged over {window_s} s after {min_calls} calls"
                ),
                RolloutMode::Shadow => format!("shadow of {percent}% of calls"),
            };
            let mut release = Release::clone(&current);
            release.rollout = Some(rollout.clone());
            this.commit(
                tenant,
                name,
                Some(release),
                entry("rollout", &rollout.candidate, Some(detail)),
            )
        })
        .await
    }

    /// Makes `to` (or, without it, the rollout's candidate) `name`'s live version and
    /// ends any rollout.
    pub async fn promote(
        self: &Arc<Self>,
        tenant: &str,
        name: &str,
        to: Option<String>,
        uses: Vec<NameUse>,
    ) -> Result<ReleaseStatus, ReleaseError> {
        self.change(tenant, name, move |this, tenant, name, current| {
            let target = match (&to, &current.rollout) {
                (Some(reference), _) => this.version_of(tenant, name, reference)?,
                (None, Some(rollout)) => this
                    .engine
                    .registry()
                    .get(tenant, &rollout.candidate.module)?,
                (None, None) => {
                    return Err(ReleaseError::Conflict(format!(
                        "no rollout of `{name}` is in progress: name the version to promote"
                    )));
                }
            };
            if target.id == current.live.module {
                return Err(ReleaseError::Conflict(format!(
                    "{} is already live",
                    Version::of(&target).label(name)
                )));
            }
            compatible(&target, name, &uses)?;
            let release = Release {
                live: Version::of(&target),
                previous: Some(current.live.clone()),
                rollout: None,
            };
            let mut detail = format!("was {}", current.live.label(name));
            if let Some(rollout) = &current.rollout {
                detail = format!("{detail}; {}", this.summary(tenant, name, rollout));
            }
            this.commit(
                tenant,
                name,
                Some(release),
                entry("promoted", &Version::of(&target), Some(detail)),
            )
        })
        .await
    }

    /// Ends `name`'s rollout, its candidate no longer serving; without one, makes the
    /// version live before the last promotion live again.
    pub async fn rollback(
        self: &Arc<Self>,
        tenant: &str,
        name: &str,
        uses: Vec<NameUse>,
    ) -> Result<ReleaseStatus, ReleaseError> {
        self.change(tenant, name, move |this, tenant, name, current| {
            if let Some(rollout) = &current.rollout {
                let mut release = Release::clone(&current);
                release.rollout = None;
                let summary = this.summary(tenant, name, rollout);
                return this.commit(
                    tenant,
                    name,
                    Some(release),
                    entry("rolled_back", &rollout.candidate, Some(summary)),
                );
            }
            let Some(previous) = &current.previous else {
                return Err(ReleaseError::Conflict(format!(
                    "`{name}` has no rollout in progress and no earlier live version to go back to"
                )));
            };
            let target = this.engine.registry().get(tenant, &previous.module)?;
            compatible(&target, name, &uses)?;
            let release = Release {
                live: previous.clone(),
                previous: None,
                rollout: None,
            };
            let detail = format!("from {}", current.live.label(name));
            this.commit(
                tenant,
                name,
                Some(release),
                entry("reverted", previous, Some(detail)),
            )
        })
        .await
    }

    /// From now on, releases this agent changes by itself are named on `changes`.
    pub(crate) fn tell_changes(
        &self,
        changes: tokio::sync::mpsc::UnboundedSender<(String, String)>,
    ) {
        let _ = self.changes.set(changes);
    }

    /// Puts a release another agent of the cluster changed (`None`: gone), with no
    /// history entry of its own (the history stays each agent's record).
    pub(crate) async fn replicate(
        self: &Arc<Self>,
        tenant: &str,
        name: &str,
        release: Option<Release>,
    ) -> Result<(), ReleaseError> {
        let this = self.clone();
        let (tenant, name) = (tenant.to_owned(), name.to_owned());
        tokio::task::spawn_blocking(move || {
            // Only versions this agent has, registered under this name, may serve it
            // (else later, once they are here).
            if let Some(release) = &release {
                let versions = std::iter::once(&release.live)
                    .chain(release.rollout.as_ref().map(|r| &r.candidate));
                for version in versions {
                    let info = this.engine.registry().get(&tenant, &version.module)?;
                    if info.name != name {
                        return Err(ReleaseError::Invalid(format!(
                            "{} is registered as `{}`, not as a version of `{name}`",
                            version.module, info.name
                        )));
                    }
                }
            }
            let _serialised = this.writes.lock();
            {
                let mut conn = this.db.lock();
                let tx = conn.transaction().map_err(DbError::from)?;
                put_row(&tx, &tenant, &name, release.as_ref(), now_ms())?;
                tx.commit().map_err(DbError::from)?;
            }
            let started = release
                .as_ref()
                .and_then(|r| r.rollout.as_ref())
                .map(|r| r.started_unix_ms);
            let current = this.db.releases().get(&tenant, &name);
            if current.and_then(|r| r.rollout.as_ref().map(|r| r.started_unix_ms)) != started {
                this.forget(&tenant, &name);
            }
            this.db.releases().put(&tenant, &name, release);
            Ok(())
        })
        .await?
    }

    /// Makes one change to `name`'s release on a blocking thread, one change at a time,
    /// given the release as it is then; answers the release's status after it.
    async fn change(
        self: &Arc<Self>,
        tenant: &str,
        name: &str,
        change: impl FnOnce(&Self, &str, &str, Arc<Release>) -> Result<(), ReleaseError>
        + Send
        + 'static,
    ) -> Result<ReleaseStatus, ReleaseError> {
        let this = self.clone();
        let (owner, key) = (tenant.to_owned(), name.to_owned());
        tokio::task::spawn_blocking(move || {
            let _serialised = this.writes.lock();
            let current = this
                .db
                .releases()
                .get(&owner, &key)
                .ok_or_else(|| ReleaseError::NameNotFound(key.clone()))?;
            change(&this, &owner, &key, current)
        })
        .await??;
        self.status(tenant, name).await
    }

    /// A module registered under `name`: `reference` is a version of it, `name@version`
    /// or a module id.
    fn version_of(
        &self,
        tenant: &str,
        name: &str,
        reference: &str,
    ) -> Result<ModuleInfo, ReleaseError> {
        let full = if reference.starts_with("sha256:") || reference.contains('@') {
            reference.to_owned()
        } else {
            format!("{name}@{reference}")
        };
        let info = self.engine.registry().resolve(tenant, &full)?;
        if info.name != name {
            return Err(ReleaseError::Invalid(format!(
                "`{reference}` is registered as `{}`, not as a version of `{name}`",
                info.name
            )));
        }
        Ok(info)
    }

    fn commit(
        &self,
        tenant: &str,
        name: &str,
        release: Option<Release>,
        entry: HistoryEntry,
    ) -> Result<(), ReleaseError> {
        {
            let mut conn = self.db.lock();
            let tx = conn.transaction().map_err(DbError::from)?;
            write_row(&tx, tenant, name, release.as_ref(), &entry)?;
            tx.commit().map_err(DbError::from)?;
        }
        self.forget(tenant, name);
        self.db.releases().put(tenant, name, release);
        Ok(())
    }

    /// What `name`'s rollout did, in words, for the history entry that ends it.
    fn summary(&self, tenant: &str, name: &str, rollout: &Rollout) -> String {
        match rollout.mode {
            RolloutMode::Canary => {
                let now = u64::try_from(now_ms()).unwrap_or(0);
                let mut judges = self.judges.lock();
                let Some(judge) = judges
                    .get_mut(&(tenant.to_owned(), name.to_owned()))
                    .filter(|j| j.started == rollout.started_unix_ms)
                else {
                    return "the canary served no calls".into();
                };
                let (calls, errors) = judge.candidate.totals(now);
                let (live_calls, live_errors) = judge.live.totals(now);
                format!(
                    "over the last {} s the canary served {calls} calls with {errors} errors, the live version {live_calls} with {live_errors}",
                    rollout.window_s
                )
            }
            RolloutMode::Shadow => {
                let stats = self.shadow.stats(tenant, name, rollout.started_unix_ms);
                format!(
                    "the shadow compared {} calls: {} identical, {} changed, {} newly failing, {} no longer failing, {} still failing, {} diverged ({} skipped)",
                    stats.compared,
                    stats.identical,
                    stats.changed,
                    stats.newly_failing,
                    stats.no_longer_failing,
                    stats.still_failing,
                    stats.diverged,
                    stats.skipped
                )
            }
        }
    }

    /// Drops the counters of `name`'s rollout, which has ended.
    pub(super) fn forget(&self, tenant: &str, name: &str) {
        let key = (tenant.to_owned(), name.to_owned());
        self.judges.lock().remove(&key);
        self.shadow.forget(&key);
    }

    /// Why `module` cannot be deleted now, if it serves its name or is being rolled out.
    pub fn in_use(&self, tenant: &str, module: &ModuleInfo) -> Option<String> {
        let release = self.db.releases().get(tenant, &module.name)?;
        let label = Version::of(module).label(&module.name);
        if let Some(rollout) = &release.rollout
            && (rollout.candidate.module == module.id || release.live.module == module.id)
        {
            return Some(format!(
                "{label} is part of the rollout in progress; promote it or roll it back first"
            ));
        }
        if release.live.module == module.id {
            let others = self
                .engine
                .registry()
                .list(tenant)
                .map(|all| {
                    all.iter()
                        .any(|m| m.name == module.name && m.id != module.id)
                })
                .unwrap_or(true);
            if others {
                return Some(format!(
                    "{label} is the live version of `{}`; promote another version first",
                    module.name
                ));
            }
        }
        None
    }
}

/// Checks that `module` serves every use of `name`: it exports each function called and
/// imports no host function a use does not offer.
fn compatible(module: &ModuleInfo, name: &str, uses: &[NameUse]) -> Result<(), ReleaseError> {
    let label = Version::of(module).label(name);
    for need in uses {
        if !module
            .exports
            .iter()
            .any(|e| e.kind == "function" && e.name == need.function)
        {
            return Err(ReleaseError::Incompatible(format!(
                "{label} exports no function `{}`, which {} calls",
                need.function, need.user
            )));
        }
        if let Some(import) = module
            .imports
            .iter()
            .find(|i| i.module == "extism:host/user" && !need.host_functions.contains(&i.name))
        {
            return Err(ReleaseError::Incompatible(format!(
                "{label} imports host function `{}`, which {} does not offer",
                import.name, need.user
            )));
        }
    }
    Ok(())
}
