//! The scheduler: starts runs of workflows with a `schedule` trigger at the times their
//! cron expressions give (UTC). Each firing is an event with a deterministic id
//! (`schedule:<workflow>:<unix ms>`), so a firing is never run twice, even across a
//! restart. Firings missed while the agent was down are not caught up.

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

pub(crate) async fn run(journal: Journal, changed: Arc<Notify>) {
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
