//! Routing of events inside the writer's transaction: an event is stored once per
//! (tenant, id), put in the outbox of each peer it is sent to, and starts one run per
//! workflow of its tenant whose event trigger matches it.

use std::collections::HashMap;
use std::sync::Arc;

use rusqlite::Connection;
use serde_json::Value;

use super as sql;
use super::Taken;
use super::writer::{
    DELIVERIES_QUEUED, EVENTS_DUPLICATE, EVENTS_STORED, Effects, RUNS_STARTED, Writer,
};
use crate::federation::peers;
use crate::store::DbError;
use crate::workflow::event::{CloudEvent, MAX_DEPTH, TO_EXTENSION};
use crate::workflow::lease::RunLease;
use crate::workflow::records::{Ingested, NewRun, TriggerKind};
use crate::workflow::spec::Workflow;
use deadlift_engine::subject::SubjectPattern;

/// An event trigger: which workflow version runs for which event types.
#[derive(Debug, Clone)]
pub(crate) struct Route {
    pub workflow: String,
    pub version: i64,
    pub pattern: SubjectPattern,
}

/// Routes by tenant, owned by the writer thread, changed only after commits.
pub(crate) type Routes = HashMap<String, Vec<Route>>;

/// Builds the routing table from the live workflows.
pub(super) fn load_routes(conn: &Connection) -> Result<Routes, DbError> {
    let mut routes = Routes::new();
    for (tenant, version) in sql::live_workflows(conn, None)? {
        let name = version.name.clone();
        match Workflow::compile(version.spec, None) {
            Ok(workflow) => {
                if let Some(route) = route_of(&workflow, version.version) {
                    routes.entry(tenant).or_default().push(route);
                }
            }
            Err(error) => {
                tracing::error!(%tenant, workflow = %name, %error, "a stored workflow does not compile; its event trigger is off");
            }
        }
    }
    Ok(routes)
}

pub(super) fn route_of(workflow: &Workflow, version: i64) -> Option<Route> {
    Some(Route {
        workflow: workflow.spec.name.clone(),
        version,
        pattern: workflow.event_pattern.clone()?,
    })
}

impl Writer {
    /// Stores one event and queues a run for every matching workflow of the tenant.
    pub(super) fn ingest(
        &self,
        tx: &Connection,
        tenant: &str,
        event: CloudEvent,
        now: i64,
        effects: &mut Effects,
    ) -> Result<Ingested, DbError> {
        self.ingest_from(tx, tenant, event, None, now, effects)
    }

    /// [`ingest`](Self::ingest), for events that may have come from a peer: the event also
    /// goes to the outbox of every other peer of the tenant that it is sent to.
    pub(super) fn ingest_from(
        &self,
        tx: &Connection,
        tenant: &str,
        event: CloudEvent,
        from_peer: Option<&str>,
        now: i64,
        effects: &mut Effects,
    ) -> Result<Ingested, DbError> {
        self.route(tx, tenant, event, from_peer, None, now, effects)
    }

    /// One event the cluster leased to this agent (`Journal::publish_leased`), maybe
    /// one a peer delivered to an agent of the cluster.
    #[allow(clippy::too_many_arguments)] // one event's whole context, each once
    pub(super) fn ingest_leased(
        &self,
        tx: &Connection,
        tenant: &str,
        event: CloudEvent,
        from_peer: Option<&str>,
        lease: Arc<dyn RunLease>,
        now: i64,
        effects: &mut Effects,
    ) -> Result<Ingested, DbError> {
        self.route(tx, tenant, event, from_peer, Some(&lease), now, effects)
    }

    /// Stores an event, sends it on to peers and starts its runs. With a lease, an event
    /// stored before is routed again (its runs are taken over, not doubled: they keep the
    /// lease's ids) but not sent again.
    #[allow(clippy::too_many_arguments)] // one event's whole context, each once
    fn route(
        &self,
        tx: &Connection,
        tenant: &str,
        mut event: CloudEvent,
        from_peer: Option<&str>,
        lease: Option<&Arc<dyn RunLease>>,
        now: i64,
        effects: &mut Effects,
    ) -> Result<Ingested, DbError> {
        event.complete();
        let id = event.id.clone();
        let (seq, new) = match sql::insert_event(tx, tenant, from_peer, &event, now)? {
            Some(seq) => (seq, true),
            None => match lease
                .map(|_| sql::event_seq(tx, tenant, from_peer, &id))
                .transpose()?
            {
                Some(Some(seq)) => (seq, false),
                _ => {
                    effects.count(EVENTS_DUPLICATE);
                    return Ok(Ingested {
                        id,
                        duplicate: true,
                        runs: Vec::new(),
                        clustered: false,
                    });
                }
            },
        };
        if new {
            effects.count(EVENTS_STORED);
        }
        // Addressed to one peer: to its outbox only, not routed here.
        if let Some(to) = event.extensions.get(TO_EXTENSION).cloned() {
            let mut outgoing = event.clone();
            outgoing.extensions.remove(TO_EXTENSION);
            let to = to.as_str().unwrap_or_default();
            let sendable = self
                .peers
                .check_sends(to, tenant, &outgoing.event_type)
                .is_ok();
            // (An event stored before went to the outbox then.)
            if new && from_peer.is_none() && sendable {
                peers::enqueue(tx, to, &outgoing, now)?;
                effects.outbox_changed = true;
                effects.count(DELIVERIES_QUEUED);
            } else if new {
                tracing::warn!(tenant, event = %id, peer = to, "event addressed to an unknown peer, or one it is not sent to; not sent");
            }
            return Ok(Ingested {
                id,
                duplicate: false,
                runs: Vec::new(),
                clustered: false,
            });
        }
        // An event a peer sent is not relayed to other peers: this agent would sign what
        // it did not author.
        let recipients: Vec<String> = if from_peer.is_some() || !new {
            Vec::new()
        } else {
            self.peers.with(|all| {
                all.iter()
                    .filter(|peer| peer.tenant == tenant && peer.sends(&event.event_type))
                    .map(|peer| peer.name.clone())
                    .collect()
            })
        };
        for peer in recipients {
            peers::enqueue(tx, &peer, &event, now)?;
            effects.outbox_changed = true;
            effects.count(DELIVERIES_QUEUED);
        }
        let mut runs = Vec::new();
        if event.depth() > MAX_DEPTH {
            // Stored (so the sender's id is honoured) but not routed: a loop of
            // workflows triggering each other ends here.
            tracing::warn!(tenant, event = %id, "event chain too deep; not routed");
            return Ok(Ingested {
                id,
                duplicate: false,
                runs,
                clustered: false,
            });
        }
        let trace = event.trace();
        let matching: Vec<&Route> = self
            .routes
            .get(tenant)
            .into_iter()
            .flatten()
            .filter(|route| route.pattern.matches(&event.event_type))
            .collect();
        let event_input = if matching.is_empty() {
            Value::Null
        } else {
            event.input()
        };
        for route in matching {
            let run = NewRun {
                tenant: tenant.to_owned(),
                workflow: route.workflow.clone(),
                version: route.version,
                trigger: TriggerKind::Event,
                input: event_input.clone(),
                event: Some((seq, event.clone())),
                trace: trace.child(),
            };
            let Some(lease) = lease else {
                if let Some(ticket) = sql::insert_run(tx, &run, now)? {
                    effects.count(RUNS_STARTED);
                    runs.push(ticket.run_id.clone());
                    effects.changed_runs.push(ticket.run_seq);
                    effects.tickets.push(ticket);
                }
                continue;
            };
            let run_id = lease.run_id(&route.workflow);
            match sql::take_leased_run(tx, &run, &run_id, &lease.prior(&run_id), now)? {
                Taken::Open(mut ticket) => {
                    if ticket.done.is_empty() && ticket.execution == 0 {
                        effects.count(RUNS_STARTED);
                    }
                    ticket.lease = Some(lease.clone());
                    runs.push(run_id);
                    effects.changed_runs.push(ticket.run_seq);
                    effects.tickets.push(*ticket);
                }
                Taken::Ended(run_seq) => {
                    runs.push(run_id);
                    effects.changed_runs.push(run_seq);
                }
                Taken::Other => {}
            }
        }
        Ok(Ingested {
            id,
            duplicate: false,
            runs,
            clustered: false,
        })
    }
}
