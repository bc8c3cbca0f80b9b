//! The scheduler: starts runs of workflows with a `schedule` trigger at the times their
//! cron expressions give (UTC). Each firing is an event with a deterministic id
//! (`schedule:<workflow>:<unix ms>`), so a firing is never run twice, even across a
//! restart. Firings missed while the agent was down are not caught up. In a cluster,
//! every agent's scheduler sees the same workflows, and only the agent that claims a
//! firing (`FiringClaims`) fires it.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use tokio::sync::Notify;

use super::journal::Journal;
use super::spec::Workflow;

struct Entry {
    tenant: String,
    workflow: String,
    version: i64,
    cron: croner::Cron,
}

/// The schedules of the live workflows. `compiled` keeps each version's parsed
/// schedule, so a reload parses only what changed.
async fn load(
    journal: &Journal,
    compiled: &mut HashMap<(String, String, i64), Option<croner::Cron>>,
) -> Vec<Entry> {
    let live = match journal.live_workflows(None).await {
        Ok(live) => live,
        Err(error) => {
            tracing::warn!(%error, "scheduler cannot read workflows");
            return Vec::new();
        }
    };
    let mut kept = HashMap::with_capacity(live.len());
    let mut entries = Vec::new();
    for (tenant, version) in live {
        let key = (tenant, version.name.clone(), version.version);
        let cron = match compiled.remove(&key) {
            Some(cron) => cron,
            None if version.spec.trigger.schedule.is_none() => None,
            None => Workflow::compile(version.spec, None)
                .ok()
                .and_then(|workflow| workflow.schedule),
        };
        if let Some(cron) = &cron {
            entries.push(Entry {
                tenant: key.0.clone(),
                workflow: key.1.clone(),
                version: key.2,
                cron: cron.clone(),
            });
        }
        kept.insert(key, cron);
    }
    *compiled = kept;
    entries
}

/// Who fires a firing, when several agents could.
#[async_trait::async_trait]
pub trait FiringClaims: Send + Sync + std::fmt::Debug {
    /// Whether this agent fires `workflow`'s firing at `fire_unix_ms`: false when another
    /// agent has claimed it (or the claim could not be made).
    async fn claim(&self, tenant: &str, workflow: &str, fire_unix_ms: i64) -> bool;
}

/// Where the claims are made, once the agent has joined a cluster.
pub(crate) type Claims = Arc<std::sync::OnceLock<Arc<dyn FiringClaims>>>;

pub(crate) async fn run(journal: Journal, changed: Arc<Notify>, claims: Claims) {
    let mut compiled = HashMap::new();
    let mut after = Utc::now();
    loop {
        let entries = load(&journal, &mut compiled).await;
        let next: Vec<Option<DateTime<Utc>>> = entries
            .iter()
            .map(|e| e.cron.find_next_occurrence(&after, false).ok())
            .collect();
        let Some(earliest) = next.iter().flatten().min().copied() else {
            changed.notified().await;
            after = Utc::now();
            continue;
        };
        let wait = (earliest - Utc::now()).to_std().unwrap_or_default();
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = changed.notified() => {
                after = Utc::now().max(after);
                continue;
            }
        }
        for (entry, at) in entries.iter().zip(&next) {
            if *at != Some(earliest) {
                continue;
            }
            if let Some(claims) = claims.get()
                && !claims
                    .claim(&entry.tenant, &entry.workflow, earliest.timestamp_millis())
                    .await
            {
                continue;
            }
            let fired = journal
                .fire_schedule(
                    &entry.tenant,
                    &entry.workflow,
                    entry.version,
                    earliest.timestamp_millis(),
                )
                .await;
            match fired {
                Ok(()) => {}
                Err(crate::store::DbError::Closed) => return,
                Err(error) => {
                    tracing::warn!(workflow = %entry.workflow, %error, "scheduled run not started")
                }
            }
        }
        after = earliest;
    }
}
