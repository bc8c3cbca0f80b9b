//! The scheduler: starts runs of workflows with a `schedule` trigger at the times their
//! cron expressions give (UTC). Each firing is an event with a deterministic id
//! (`schedule:<workflow>:<unix ms>`), so a firing is never run twice, even across a
//! restart. Firings missed while the agent was down are not caught up.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use tokio::sync::{Notify, mpsc, oneshot};

use super::journal;
use super::spec::parse_schedule;
use super::writer::Command;
use crate::store::Database;

struct Entry {
    tenant: String,
    workflow: String,
    version: i64,
    cron: croner::Cron,
}

fn load(db: &Database) -> Vec<Entry> {
    let live = match journal::live_workflows(&db.read(), None) {
        Ok(live) => live,
        Err(error) => {
            tracing::warn!(%error, "scheduler cannot read workflows");
            return Vec::new();
        }
    };
    live.into_iter()
        .filter_map(|(tenant, version)| {
            let cron = parse_schedule(version.spec.trigger.schedule.as_deref()?).ok()?;
            Some(Entry {
                tenant,
                workflow: version.name,
                version: version.version,
                cron,
            })
        })
        .collect()
}

pub(crate) async fn run(
    db: Database,
    commands: mpsc::UnboundedSender<Command>,
    changed: Arc<Notify>,
) {
    let mut after = Utc::now();
    loop {
        let loader = db.clone();
        let entries = tokio::task::spawn_blocking(move || load(&loader))
            .await
            .unwrap_or_default();
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
            let (reply, answer) = oneshot::channel();
            let command = Command::Schedule {
                tenant: entry.tenant.clone(),
                workflow: entry.workflow.clone(),
                version: entry.version,
                fire_unix_ms: earliest.timestamp_millis(),
                reply,
            };
            if commands.send(command).is_err() {
                return;
            }
            match answer.await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    tracing::warn!(workflow = %entry.workflow, %error, "scheduled run not started")
                }
                Err(_) => return,
            }
        }
        after = earliest;
    }
}
