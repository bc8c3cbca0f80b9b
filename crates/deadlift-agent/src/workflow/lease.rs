//! Runs held under a lease from outside the agent. In cluster mode an event's runs belong
//! to whichever agent holds the event's lease (`cluster/runs.rs`); the journal and the
//! runner see that only through [`RunLease`]:
//!
//! - a leased run's id is the same on every agent that may hold the event, so that an
//!   agent taking the event over finds the steps another journaled for it;
//! - each of its steps is journaled where every agent sees it **before** this agent
//!   commits it or starts the next step, and a write refused because another agent wrote
//!   first ends the run here ([`LeaseLost`]);
//! - the events a step emits go to the cluster with it, keyed by the run, step and index,
//!   so that a step the next holder runs again does not emit them twice.
//!
//! A leased run left open by a previous process is not resumed at start: its event's
//! next holder (perhaps this agent) resumes it from the shared step journal.

use super::event::CloudEvent;
use super::records::{Finish, StepRecord};

/// Why a leased run stopped on this agent.
#[derive(Debug, thiserror::Error)]
pub enum LeaseLost {
    /// Another agent journaled a step of the run first: the run is its now.
    #[error("another agent took the run over")]
    TakenOver,
    /// The shared journal could not be written for longer than the lease lasts.
    #[error("the cluster's step journal is unreachable: {0}")]
    Unreachable(String),
}

/// What another agent journaled for a run before this agent took its event.
#[derive(Debug, Clone, Default)]
pub struct PriorSteps {
    /// Each step's newest record with its position (a graph step's index).
    pub steps: Vec<(usize, StepRecord)>,
    /// How the run ended, when the step that ended it was journaled.
    pub finish: Option<Finish>,
}

/// One event's lease, handed to the journal with the event.
#[async_trait::async_trait]
pub trait RunLease: Send + Sync + std::fmt::Debug {
    /// The id of this event's run of `workflow`, the same on every agent.
    fn run_id(&self, workflow: &str) -> String;

    /// What was journaled for `run_id` before this agent held the event.
    fn prior(&self, run_id: &str) -> PriorSteps;

    /// Journals a finished step (its emitted events first) in the cluster; the run goes
    /// on only when this answers `Ok`.
    async fn journal_step(
        &self,
        run_id: &str,
        position: usize,
        record: &StepRecord,
        finish: Option<&Finish>,
        emitted: &[CloudEvent],
    ) -> Result<(), LeaseLost>;

    /// Tells the lease's holder that a run stopped here without ending.
    fn lost(&self, run_id: &str, why: &LeaseLost);
}
