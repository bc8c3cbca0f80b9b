//! Shadow rollouts: a candidate version run beside live calls and never used. A shadowed
//! call is recorded on a tape; once it has answered its caller, its input runs through
//! the candidate with every host call answered from that tape (nothing happens twice:
//! no KV write, no event, no request), and the two outcomes are compared and counted.
//!
//! Shadow work is spare work: at most [`PER_TENANT`] replays per tenant and [`IN_ALL`]
//! in all run at once, and a call beyond that is counted as skipped, never queued.
//! Replays run on the engine like any call of their tenant, so they share that
//! tenant's place in the fair queue and take nothing from other tenants.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use deadlift_engine::Grant;
use parking_lot::Mutex;
use serde::Serialize;
use serde_json::Value;

use crate::clock::now_ms;
use crate::releases::{Releases, Routed};
use crate::replay::{Outcome, Recorded, Verdict};

/// Shadow replays one tenant may have running at once.
pub const PER_TENANT: usize = 4;
/// Shadow replays running at once in all.
pub const IN_ALL: usize = 16;
/// Differences kept per rollout, the newest.
const EXAMPLES_KEPT: usize = 10;
/// Largest input plus outputs an example shows in full.
const EXAMPLE_BYTES: usize = 16 * 1024;

/// A shadow rollout's comparisons so far.
#[derive(Debug, Clone, Default, PartialEq, Serialize, utoipa::ToSchema)]
pub struct ShadowStats {
    pub compared: u64,
    pub identical: u64,
    pub changed: u64,
    pub newly_failing: u64,
    pub no_longer_failing: u64,
    pub still_failing: u64,
    pub diverged: u64,
    /// Shadowed calls not compared: too many replays were running.
    pub skipped: u64,
    /// The newest calls that were not identical.
    #[schema(value_type = Vec<ShadowExample>)]
    pub examples: VecDeque<ShadowExample>,
}

/// A live call whose candidate replay differed.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct ShadowExample {
    pub at_unix_ms: i64,
    pub function: String,
    pub verdict: Verdict,
    /// The input (JSON when it is JSON, else text, else hex), unless too large.
    pub input: Value,
    pub live: Outcome,
    pub candidate: Outcome,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub diff: Vec<Value>,
}

/// Every shadow rollout's counts and the replays running.
#[derive(Debug, Default)]
pub(crate) struct Shadows {
    stats: Mutex<HashMap<(String, String), (i64, ShadowStats)>>,
    running: Mutex<Running>,
}

#[derive(Debug, Default)]
struct Running {
    per_tenant: HashMap<String, usize>,
    all: usize,
}

/// A place among the running replays, given back when dropped.
struct Place {
    releases: Arc<Releases>,
    tenant: String,
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut running = self.releases.shadow.running.lock();
        running.all -= 1;
        if let Some(count) = running.per_tenant.get_mut(&self.tenant) {
            *count -= 1;
            if *count == 0 {
                running.per_tenant.remove(&self.tenant);
            }
        }
    }
}

impl Shadows {
    pub(crate) fn stats(&self, tenant: &str, name: &str, started: i64) -> ShadowStats {
        self.stats
            .lock()
            .get(&(tenant.to_owned(), name.to_owned()))
            .filter(|(at, _)| *at == started)
            .map(|(_, stats)| stats.clone())
            .unwrap_or_default()
    }

    pub(crate) fn forget(&self, key: &(String, String)) {
        self.stats.lock().remove(key);
    }

    fn update(
        &self,
        tenant: &str,
        name: &str,
        started: i64,
        change: impl FnOnce(&mut ShadowStats),
    ) {
        let mut all = self.stats.lock();
        let entry = all
            .entry((tenant.to_owned(), name.to_owned()))
            .or_insert_with(|| (started, ShadowStats::default()));
        if entry.0 != started {
            *entry = (started, ShadowStats::default());
        }
        change(&mut entry.1);
    }
}

/// A live call to compare, and its grant: the candidate runs under the same limits.
#[derive(Debug)]
pub struct Shadowed {
    pub call: Recorded,
    pub grant: Grant,
}

impl Releases {
    /// Replays a shadowed live call through the rollout's candidate in the background,
    /// if there is room, and counts the comparison.
    pub fn shadow(self: &Arc<Self>, tenant: &str, routed: &Routed, call: Shadowed) {
        let (Some(candidate), Some(started)) = (&routed.shadow, routed.rollout_started) else {
            return;
        };
        let place = {
            let mut running = self.shadow.running.lock();
            let mine = running.per_tenant.get(tenant).copied().unwrap_or(0);
            if mine >= PER_TENANT || running.all >= IN_ALL {
                None
            } else {
                running.all += 1;
                *running.per_tenant.entry(tenant.to_owned()).or_default() += 1;
                Some(Place {
                    releases: self.clone(),
                    tenant: tenant.to_owned(),
                })
            }
        };
        let Some(place) = place else {
            self.shadow
                .update(tenant, &routed.name, started, |s| s.skipped += 1);
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (this, tenant, name, candidate) = (
            self.clone(),
            tenant.to_owned(),
            routed.name.clone(),
            candidate.module,
        );
        runtime.spawn(async move {
            let _place = place;
            let registry = this.engine().registry().clone();
            let owner = tenant.clone();
            let Ok(Ok(module)) =
                tokio::task::spawn_blocking(move || registry.get(&owner, &candidate)).await
            else {
                return;
            };
            let Shadowed { call, grant } = call;
            let replayed =
                crate::replay::replay(this.engine(), &tenant, &module, &grant, &call).await;
            this.shadow.update(&tenant, &name, started, |stats| {
                stats.compared += 1;
                let count = match replayed.verdict {
                    Verdict::Identical => &mut stats.identical,
                    Verdict::Changed => &mut stats.changed,
                    Verdict::NewlyFailing => &mut stats.newly_failing,
                    Verdict::NoLongerFailing => &mut stats.no_longer_failing,
                    Verdict::StillFailing => &mut stats.still_failing,
                    Verdict::Diverged => &mut stats.diverged,
                };
                *count += 1;
                if replayed.verdict == Verdict::Identical {
                    return;
                }
                let size = call.input.len()
                    + serde_json::to_string(&(&replayed.recorded, &replayed.replayed))
                        .map_or(0, |s| s.len());
                let too_large = || serde_json::json!({ "truncated": true, "bytes": size });
                let (input, live, candidate, diff) = if size <= EXAMPLE_BYTES {
                    (
                        crate::replay::shown(&call.input),
                        replayed.recorded,
                        replayed.replayed,
                        replayed.diff,
                    )
                } else {
                    let cut = |outcome: Outcome| Outcome {
                        output: outcome.output.map(|_| too_large()),
                        error: outcome.error,
                    };
                    (
                        too_large(),
                        cut(replayed.recorded),
                        cut(replayed.replayed),
                        Vec::new(),
                    )
                };
                if stats.examples.len() == EXAMPLES_KEPT {
                    stats.examples.pop_front();
                }
                stats.examples.push_back(ShadowExample {
                    at_unix_ms: now_ms(),
                    function: call.function,
                    verdict: replayed.verdict,
                    input,
                    live,
                    candidate,
                    diff,
                });
            });
        });
    }
}
