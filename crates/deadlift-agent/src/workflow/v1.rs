//! The original Deadlift's workflows (`docs/v1-api.md`): a pipeline of modules named
//! by subject, created with an integer id, run whole by `execute` (the caller waits for
//! the output) and from its second module by events of its first module's subject.
//!
//! A v1 workflow is stored as an ordinary workflow whose first step runs only when the
//! run was not started by an event (an event of the first module's subject means that
//! module already ran). An execute runs the pipeline in memory on the step executor and
//! records the run just after answering: a crash in between loses the record of that
//! call, not its effect on the caller, who has its answer and sent nothing durable.

use std::sync::Arc;

use serde_json::Value;
use tokio::sync::Semaphore;

use super::expr::Scope;
use super::records::{NewRun, TriggerKind};
use super::runner::{add_output, failed, succeeded};
use super::spec::{self, Workflow, WorkflowSpec};
use super::step::StepScope;
use super::{Runtime, TraceParent, WorkflowError};
use crate::store::DbError;
use deadlift_engine::subject::validate_subject;
use deadlift_engine::{CancelToken, Grant};

/// The function a v1 pipeline calls in each module (and a v1 module must export).
pub const V1_ENTRY: &str = "_main";

/// Most finished executes waiting to be recorded: a writer that falls behind slows
/// callers down instead of queueing without limit.
pub(crate) const MAX_UNRECORDED: usize = 4096;

/// The stored name of v1 workflow `id`.
pub fn workflow_name(id: i64) -> String {
    format!("v1-workflow-{id}")
}

/// Bounds the v1 records handed to the journal but not yet committed.
pub(crate) fn unrecorded() -> Arc<Semaphore> {
    Arc::new(Semaphore::new(MAX_UNRECORDED))
}

impl Runtime {
    /// Creates a Deadlift v1 workflow from a pipeline of module subjects (each the
    /// tenant's newest module of that name); returns its integer id.
    pub async fn create_v1(
        &self,
        tenant: &str,
        name: &str,
        description: Option<String>,
        pipeline: Vec<String>,
        grant: Grant,
    ) -> Result<i64, WorkflowError> {
        self.create_v1_as(None, tenant, name, description, pipeline, grant)
            .await
    }

    /// [`create_v1`](Self::create_v1) under a given id (the cluster's, so that ids are
    /// one space across its agents), or the next one here.
    pub async fn create_v1_as(
        &self,
        id: Option<i64>,
        tenant: &str,
        name: &str,
        description: Option<String>,
        pipeline: Vec<String>,
        grant: Grant,
    ) -> Result<i64, WorkflowError> {
        if pipeline.is_empty() {
            return Err(WorkflowError::PipelineEmpty);
        }
        let registry = self.engine.registry().clone();
        let owner = tenant.to_owned();
        let subjects = pipeline.clone();
        let modules = tokio::task::spawn_blocking(move || {
            let all = registry.list(&owner).unwrap_or_default();
            subjects
                .iter()
                .map(|subject| {
                    all.iter()
                        .filter(|m| &m.name == subject)
                        .max_by_key(|m| m.created_unix_ms)
                        .map(|m| m.id.to_string())
                        .ok_or_else(|| WorkflowError::SubjectUnknown(subject.clone()))
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(DbError::from)??;
        let trigger_subject = validate_subject(&pipeline[0])
            .is_ok()
            .then(|| pipeline[0].clone());
        let description = Some(match description {
            Some(text) => format!("Deadlift v1 workflow \"{name}\": {text}"),
            None => format!("Deadlift v1 workflow \"{name}\""),
        });
        let build = move |id: i64| {
            let spec = v1_spec(id, description, trigger_subject, &modules, grant);
            Workflow::compile(spec, None).map_err(|e| e.to_string())
        };
        Ok(self.journal.apply_v1(tenant, id, build).await?)
    }

    /// Makes the shared workflow `v1-workflow-<id>` the v1 workflow `id` here (cluster
    /// mode: another agent created it).
    pub(crate) async fn register_v1(&self, tenant: &str, id: i64) -> Result<(), WorkflowError> {
        Ok(self.journal.register_v1(tenant, id).await?)
    }

    /// The highest v1 workflow id here (0 when none).
    pub async fn max_v1_id(&self) -> Result<i64, WorkflowError> {
        Ok(self.journal.max_v1_id().await?)
    }

    /// Runs a v1 workflow with `input` and answers its output; recorded as a run, in the
    /// caller's trace when it gives one.
    pub async fn execute_v1(
        &self,
        tenant: &str,
        id: i64,
        input: Value,
        trace: Option<TraceParent>,
    ) -> Result<Value, WorkflowError> {
        let name = workflow_name(id);
        let version = self.current_version(tenant, &name).await?;
        let workflow = self
            .runner
            .workflow(tenant, &name, version)
            .await
            .map_err(WorkflowError::RunFailed)?;
        let run = NewRun {
            tenant: tenant.to_owned(),
            workflow: name,
            version,
            trigger: TriggerKind::V1,
            input,
            event: None,
            trace: trace.map_or_else(TraceParent::new_root, |t| t.child()),
        };
        self.execute_in_memory(run, &workflow)
            .await?
            .map_err(WorkflowError::RunFailed)
    }

    /// Runs a pipeline now, in memory, and records the whole run after the answer.
    async fn execute_in_memory(
        &self,
        run: NewRun,
        workflow: &Workflow,
    ) -> Result<Result<Value, super::Failure>, DbError> {
        let cancel = CancelToken::new();
        let at = StepScope {
            tenant: &run.tenant,
            run_id: None,
            trace: &run.trace,
            depth: 0,
            source: &self.runner.source,
            workflow: Some(&run.workflow),
            cancel: &cancel,
            // The agent's default grant, copied when the v1 workflow was created.
            tenant_grant: false,
        };
        let mut outputs = Value::Object(Default::default());
        let mut current = run.input.clone();
        let mut steps = Vec::new();
        let mut emitted = Vec::new();
        let mut result = Ok(Value::Null);
        for step in &workflow.steps {
            let scope = Scope {
                event: &Value::Null,
                input: &run.input,
                steps: &outputs,
            };
            let outcome = self.steps.run(at, step, current.clone(), scope).await;
            if let Some(failure) = outcome.failure() {
                result = Err(failure.clone());
                steps.push(outcome.record);
                break;
            }
            current = outcome.record.output.clone();
            add_output(&mut outputs, &outcome.record);
            let stop = current.is_null() && outcome.record.status == super::StepStatus::Succeeded;
            steps.push(outcome.record);
            emitted.extend(outcome.emitted);
            result = Ok(current.clone());
            if stop {
                break;
            }
        }
        let finish = match &result {
            Ok(output) => succeeded(output.clone()),
            Err(failure) => failed(failure.clone(), false),
        };
        let permit = self
            .v1_unrecorded
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| DbError::Closed)?;
        let workflow = run.workflow.clone();
        let recorded = self.journal.submit_record(run, steps, emitted, finish)?;
        tokio::spawn(async move {
            if let Ok(Err(error)) = recorded.await {
                tracing::error!(%workflow, %error, "a finished run could not be recorded");
            }
            drop(permit);
        });
        Ok(result)
    }
}

/// The stored form of a v1 workflow: step 1 runs only when the run was not started by
/// an event.
fn v1_spec(
    id: i64,
    description: Option<String>,
    trigger_subject: Option<String>,
    modules: &[String],
    grant: Grant,
) -> WorkflowSpec {
    let steps = modules
        .iter()
        .enumerate()
        .map(|(index, module)| spec::StepSpec {
            id: format!("step{}", index + 1),
            condition: (index == 0).then(|| "event == null".to_owned()),
            input: None,
            needs: Vec::new(),
            call: Some(module.clone()),
            pinned: Some(module.clone()),
            function: Some(V1_ENTRY.into()),
            grant: Some(grant.clone()),
            timeout_ms: None,
            retry: None,
            emit: None,
        })
        .collect();
    WorkflowSpec {
        name: workflow_name(id),
        description,
        trigger: spec::Trigger {
            event: trigger_subject,
            schedule: None,
            http: None,
        },
        steps,
    }
}
