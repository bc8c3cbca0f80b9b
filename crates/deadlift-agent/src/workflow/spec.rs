//! Workflow definitions: the document a user writes (TOML, or the same as JSON over the
//! API), its validation with errors that name the field, and the compiled form the
//! runner executes (CEL programs parsed once, the trigger parsed once).
//!
//! Steps run as a pipeline in file order unless some step declares `needs`; then the
//! steps form a graph (fan-out, fan-in) that must be acyclic.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::expr::Expression;
use deadlift_engine::error::CallError;
use deadlift_engine::grant::Grant;
use deadlift_engine::names;
use deadlift_engine::subject::{SubjectPattern, validate_subject};

/// Longest workflow name, in bytes.
pub use deadlift_engine::names::MAX_NAME_BYTES;
/// Most steps one workflow may have.
pub const MAX_STEPS: usize = 64;
/// Most attempts a retry policy may ask for.
pub const MAX_ATTEMPTS: u32 = 50;
/// Longest per-step timeout.
pub const MAX_STEP_TIMEOUT: Duration = Duration::from_secs(600);

/// A workflow document as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkflowSpec {
    /// Taken from the route or the file when absent.
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// What starts a run. Without a trigger the workflow runs only when asked over HTTP.
    #[serde(default)]
    pub trigger: Trigger,
    #[schema(min_items = 1)]
    pub steps: Vec<StepSpec>,
}

/// What starts a run: at most one of `event` and `schedule`; every workflow can also be
/// started over HTTP (`POST /v1/workflows/{name}/runs`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Trigger {
    /// A subject pattern matched against each event's type (`*` one token, `>` the rest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    /// A cron expression (5 fields, or 6 with seconds first), evaluated in UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// Started only over HTTP; the same as no trigger, accepted for clarity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<bool>,
}

/// One step: a module call or an event emission.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StepSpec {
    pub id: String,
    /// CEL condition over `event`, `input` and `steps.<id>.output`; a false condition
    /// skips the step.
    #[serde(default, rename = "if", skip_serializing_if = "Option::is_none")]
    pub condition: Option<String>,
    /// CEL expression giving the step's input, instead of the default flow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<String>,
    /// Steps that must finish first; any `needs` makes the workflow a graph.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub needs: Vec<String>,
    /// Module reference: `name`, `name@version` or `sha256:<hex>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call: Option<String>,
    /// The module `call` resolved to when this version was applied (`sha256:<hex>`):
    /// what every run of the version calls. Set by the agent; a document's value is
    /// replaced at apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned: Option<String>,
    /// The exported function to call; `_main` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub grant: Option<Grant>,
    /// Wall-clock limit of each attempt; overrides the grant's `timeout_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetrySpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emit: Option<EmitSpec>,
}

/// An `emit` step: publishes an event into the agent's inbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EmitSpec {
    /// The event type (a subject).
    #[serde(rename = "type")]
    pub event_type: String,
    /// CEL expression giving the event's data; the step's input when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// Send the event to this peer only (through the outbox), instead of routing it here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
}

/// How a failing step is retried.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetrySpec {
    /// Attempts in all, the first included.
    pub attempts: u32,
    #[serde(default)]
    pub backoff: Backoff,
    #[serde(default = "default_initial_ms")]
    pub initial_ms: u64,
    #[serde(default = "default_max_ms")]
    pub max_ms: u64,
    /// Randomise each delay (between half and all of it), so retries do not align.
    #[serde(default = "yes")]
    pub jitter: bool,
    /// Which kinds of error are retried.
    #[serde(default = "default_retry_on")]
    pub retry_on: BTreeSet<ErrorKind>,
}

fn default_initial_ms() -> u64 {
    100
}
fn default_max_ms() -> u64 {
    30_000
}
fn yes() -> bool {
    true
}
fn default_retry_on() -> BTreeSet<ErrorKind> {
    [ErrorKind::Timeout, ErrorKind::Host].into()
}

impl Default for RetrySpec {
    fn default() -> Self {
        Self {
            attempts: 1,
            backoff: Backoff::default(),
            initial_ms: default_initial_ms(),
            max_ms: default_max_ms(),
            jitter: true,
            retry_on: default_retry_on(),
        }
    }
}

impl RetrySpec {
    /// The delay before attempt `next_attempt` (2 for the first retry), before jitter.
    pub fn delay(&self, next_attempt: u32) -> Duration {
        let base = match self.backoff {
            Backoff::Fixed => self.initial_ms,
            Backoff::Exponential => {
                let doublings = next_attempt.saturating_sub(2).min(32);
                self.initial_ms.saturating_mul(1u64 << doublings)
            }
        };
        Duration::from_millis(base.min(self.max_ms))
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Backoff {
    #[default]
    Exponential,
    Fixed,
}

/// Kinds of step failure, for retry policies.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum ErrorKind {
    /// The call hit its time limit.
    Timeout,
    /// A host function failed, the engine was at capacity, or storage failed.
    Host,
    /// The guest returned an error (for example, it rejected its input).
    Guest,
    /// The guest trapped (a bug or a crash in the plug-in).
    Trap,
    /// The call ran out of fuel or memory.
    Limit,
    /// The step cannot work as configured: unknown module or function, a denied import,
    /// an expression that fails, an output that is not JSON. Retrying rarely helps.
    Config,
}

impl ErrorKind {
    pub fn of(error: &CallError) -> Self {
        match error {
            CallError::Timeout { .. } => Self::Timeout,
            CallError::HostFunction { .. }
            | CallError::Overloaded { .. }
            | CallError::Shed { .. }
            | CallError::Internal { .. }
            | CallError::Cancelled => Self::Host,
            CallError::Guest { .. } | CallError::ExitCode { .. } => Self::Guest,
            CallError::Trap { .. } => Self::Trap,
            CallError::FuelExhausted { .. } | CallError::MemoryLimit { .. } => Self::Limit,
            CallError::ModuleNotFound { .. }
            | CallError::FunctionNotFound { .. }
            | CallError::FunctionSignature { .. }
            | CallError::HostFunctionDenied { .. }
            | CallError::HostFunctionUnknown { .. }
            | CallError::ImportDenied { .. }
            | CallError::Link { .. }
            | CallError::InputTooLarge { .. }
            | CallError::OutputTooLarge { .. }
            | CallError::GrantInvalid { .. }
            | CallError::HttpDenied { .. }
            // Only replays diverge, and a replay's call is never retried.
            | CallError::Diverged { .. } => Self::Config,
        }
    }
}

/// One problem found in a workflow document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct FieldError {
    /// Where, e.g. `steps[1].if` or `trigger.schedule`.
    pub field: String,
    pub message: String,
}

/// Why a workflow document was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("the workflow document cannot be parsed: {0}")]
    Syntax(String),
    #[error("the workflow is invalid: {}", summary(.0))]
    Invalid(Vec<FieldError>),
}

fn summary(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(|e| format!("{}: {}", e.field, e.message))
        .collect::<Vec<_>>()
        .join("; ")
}

impl SpecError {
    /// The individual problems, for an API answer.
    pub fn field_errors(&self) -> Vec<FieldError> {
        match self {
            Self::Syntax(message) => vec![FieldError {
                field: String::new(),
                message: message.clone(),
            }],
            Self::Invalid(errors) => errors.clone(),
        }
    }
}

impl WorkflowSpec {
    pub fn from_toml(text: &str) -> Result<Self, SpecError> {
        toml::from_str(text).map_err(|e| SpecError::Syntax(e.to_string()))
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self, SpecError> {
        serde_json::from_slice(bytes).map_err(|e| SpecError::Syntax(e.to_string()))
    }
}

/// Checks a workflow's or a peer's name (see [`names::resource_name`]).
pub fn validate_name(name: &str) -> Result<(), String> {
    names::resource_name(name)
}

fn is_identifier(id: &str) -> bool {
    let mut chars = id.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && id.len() <= MAX_NAME_BYTES
}

/// What a step does, compiled.
#[derive(Debug)]
pub enum Action {
    Call {
        module: String,
        function: String,
        grant: Box<Grant>,
        retry: RetrySpec,
    },
    Emit {
        event_type: String,
        data: Option<Expression>,
        /// A peer to send the event to, instead of routing it locally.
        to: Option<String>,
    },
}

/// A compiled step.
#[derive(Debug)]
pub struct Step {
    pub id: String,
    pub condition: Option<Expression>,
    pub input: Option<Expression>,
    /// Indexes of the steps this one needs (graph mode).
    pub needs: Vec<usize>,
    pub action: Action,
}

/// A validated, compiled workflow version.
#[derive(Debug)]
pub struct Workflow {
    pub spec: WorkflowSpec,
    pub steps: Vec<Step>,
    /// True when any step declares `needs`.
    pub graph: bool,
    pub event_pattern: Option<SubjectPattern>,
    pub schedule: Option<croner::Cron>,
}

/// What validation needs to know about the agent, to catch mistakes at apply time.
pub trait ApplyChecks {
    /// Whether the module reference resolves for the tenant, and what it exports and
    /// imports: `Err(message)` when it does not resolve.
    fn module(&self, reference: &str) -> Result<ModuleFacts, String>;
    /// Whether this agent offers the host function.
    fn offers_host_function(&self, name: &str) -> bool;
    /// How the grant asks for more than the operator's policy lets this tenant grant:
    /// (grant field, why).
    fn grant_excess(&self, grant: &Grant) -> Vec<(&'static str, String)>;
}

/// The exports and host-function imports of a module, for apply-time checks.
#[derive(Debug, Clone, Default)]
pub struct ModuleFacts {
    pub exports: BTreeSet<String>,
    pub host_imports: BTreeSet<String>,
}

/// Parses a cron expression: 5 fields, or 6 with seconds first.
pub fn parse_schedule(text: &str) -> Result<croner::Cron, String> {
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Optional)
        .build()
        .parse(text)
        .map_err(|e| e.to_string())
}

impl Workflow {
    /// Validates `spec` and compiles its expressions. Module references are checked
    /// against `checks` when given (at apply); a stored version is compiled without them.
    pub fn compile(
        spec: WorkflowSpec,
        checks: Option<&dyn ApplyChecks>,
    ) -> Result<Self, SpecError> {
        let mut errors = Vec::new();
        let mut fail = |field: String, message: String| errors.push(FieldError { field, message });

        if let Err(message) = validate_name(&spec.name) {
            fail("name".into(), message);
        }
        if spec.description.as_ref().is_some_and(|d| d.len() > 4096) {
            fail("description".into(), "must be at most 4096 bytes".into());
        }
        let event_pattern = match &spec.trigger.event {
            Some(text) => SubjectPattern::parse(text)
                .map_err(|e| fail("trigger.event".into(), e.to_string()))
                .ok(),
            None => None,
        };
        let schedule = match &spec.trigger.schedule {
            Some(text) => parse_schedule(text)
                .map_err(|e| {
                    fail(
                        "trigger.schedule".into(),
                        format!("not a cron expression: {e}"),
                    )
                })
                .ok(),
            None => None,
        };
        if spec.trigger.event.is_some() && spec.trigger.schedule.is_some() {
            fail(
                "trigger".into(),
                "give at most one of `event` and `schedule`".into(),
            );
        }
        if spec.steps.is_empty() {
            fail("steps".into(), "a workflow needs at least one step".into());
        }
        if spec.steps.len() > MAX_STEPS {
            fail("steps".into(), format!("at most {MAX_STEPS} steps"));
        }

        let mut index_of = HashMap::new();
        for (index, step) in spec.steps.iter().enumerate() {
            if !is_identifier(&step.id) {
                fail(
                    format!("steps[{index}].id"),
                    format!(
                        "`{}` is not an identifier (a letter or `_`, then letters, digits or `_`; at most {MAX_NAME_BYTES} bytes): steps are named in expressions as steps.<id>",
                        step.id
                    ),
                );
            } else if index_of.insert(step.id.as_str(), index).is_some() {
                fail(
                    format!("steps[{index}].id"),
                    format!("`{}` is used by an earlier step", step.id),
                );
            }
        }

        let mut steps = Vec::with_capacity(spec.steps.len());
        for (index, step) in spec.steps.iter().enumerate() {
            let at = |field: &str| format!("steps[{index}].{field}");
            let mut compile = |field: &str, source: &Option<String>| -> Option<Expression> {
                let source = source.as_ref()?;
                Expression::compile(source)
                    .map_err(|e| fail(at(field), e))
                    .ok()
            };
            let condition = compile("if", &step.condition);
            let input = compile("input", &step.input);
            let emit_data = step
                .emit
                .as_ref()
                .and_then(|emit| compile("emit.data", &emit.data));

            let mut needs = Vec::new();
            for need in &step.needs {
                match index_of.get(need.as_str()) {
                    Some(&other) if other == index => {
                        fail(at("needs"), "a step cannot need itself".into())
                    }
                    Some(&other) => needs.push(other),
                    None => fail(at("needs"), format!("no step has the id `{need}`")),
                }
            }

            let action = match (&step.call, &step.emit) {
                (Some(_), Some(_)) | (None, None) => {
                    fail(
                        format!("steps[{index}]"),
                        "a step has exactly one of `call` and `emit`".into(),
                    );
                    continue;
                }
                (None, Some(emit)) => {
                    if let Err(e) = validate_subject(&emit.event_type) {
                        fail(at("emit.type"), e.to_string());
                    }
                    for (field, given) in [
                        ("function", step.function.is_some()),
                        ("grant", step.grant.is_some()),
                        ("retry", step.retry.is_some()),
                        ("timeout_ms", step.timeout_ms.is_some()),
                    ] {
                        if given {
                            fail(at(field), "only `call` steps take this field".into());
                        }
                    }
                    if let Some(peer) = &emit.to
                        && let Err(e) = validate_name(peer)
                    {
                        fail(at("emit.to"), format!("not a peer name: {e}"));
                    }
                    Action::Emit {
                        event_type: emit.event_type.clone(),
                        data: emit_data,
                        to: emit.to.clone(),
                    }
                }
                (Some(module), None) => {
                    let function = step.function.clone().unwrap_or_else(|| "_main".into());
                    let mut grant = step.grant.clone().unwrap_or_default();
                    if let Some(ms) = step.timeout_ms {
                        if ms == 0 || Duration::from_millis(ms) > MAX_STEP_TIMEOUT {
                            fail(
                                at("timeout_ms"),
                                format!("must be between 1 and {}", MAX_STEP_TIMEOUT.as_millis()),
                            );
                        }
                        grant.timeout = Duration::from_millis(ms);
                    }
                    if let Some(checks) = checks {
                        for (field, message) in checks.grant_excess(&grant) {
                            // Directories are refused below, in words of their own.
                            if field != "allowed_paths" {
                                fail(at(&format!("grant.{field}")), message);
                            }
                        }
                    }
                    if !grant.allowed_paths.is_empty() {
                        // A workflow is a tenant's document; the host's file system is
                        // the operator's to share, not the tenant's.
                        fail(
                            at("grant.allowed_paths"),
                            "directories of the agent's host cannot be mapped by a workflow".into(),
                        );
                    }
                    let retry = step.retry.clone().unwrap_or_default();
                    if retry.attempts == 0 || retry.attempts > MAX_ATTEMPTS {
                        fail(
                            at("retry.attempts"),
                            format!("must be between 1 and {MAX_ATTEMPTS}"),
                        );
                    }
                    if retry.initial_ms > retry.max_ms {
                        fail(
                            at("retry.initial_ms"),
                            "must not be larger than `max_ms`".into(),
                        );
                    }
                    if let Some(checks) = checks {
                        for name in &grant.host_functions {
                            if !checks.offers_host_function(name) {
                                fail(
                                    at("grant.host_functions"),
                                    format!("this agent offers no host function `{name}`"),
                                );
                            }
                        }
                        match checks.module(module) {
                            Err(message) => fail(at("call"), message),
                            Ok(facts) => {
                                if !facts.exports.contains(&function) {
                                    fail(
                                        at("function"),
                                        format!(
                                            "module `{module}` exports no function `{function}`"
                                        ),
                                    );
                                }
                                let missing: Vec<&str> = facts
                                    .host_imports
                                    .iter()
                                    .filter(|name| !grant.host_functions.contains(*name))
                                    .map(String::as_str)
                                    .collect();
                                if !missing.is_empty() {
                                    fail(
                                        at("grant.host_functions"),
                                        format!(
                                            "module `{module}` imports host functions the grant does not allow: {}",
                                            missing.join(", ")
                                        ),
                                    );
                                }
                            }
                        }
                    }
                    Action::Call {
                        // A bare name goes to its release at each call (its live
                        // version, or a canary); `name@version` and ids are pinned.
                        module: if crate::releases::is_bare_name(module) {
                            module.clone()
                        } else {
                            step.pinned.clone().unwrap_or_else(|| module.clone())
                        },
                        function,
                        grant: Box::new(grant),
                        retry,
                    }
                }
            };
            steps.push(Step {
                id: step.id.clone(),
                condition,
                input,
                needs,
                action,
            });
        }

        let graph = spec.steps.iter().any(|s| !s.needs.is_empty());
        if graph
            && errors.is_empty()
            && let Some(cycle_at) = find_cycle(&steps)
        {
            errors.push(FieldError {
                field: format!("steps[{cycle_at}].needs"),
                message: "the steps' `needs` form a cycle".into(),
            });
        }

        if !errors.is_empty() {
            return Err(SpecError::Invalid(errors));
        }
        Ok(Self {
            spec,
            steps,
            graph,
            event_pattern,
            schedule,
        })
    }

    /// The module references this workflow calls.
    pub fn modules(&self) -> impl Iterator<Item = &str> {
        self.steps.iter().filter_map(|step| match &step.action {
            Action::Call { module, .. } => Some(module.as_str()),
            Action::Emit { .. } => None,
        })
    }

    /// Steps no other step needs: their outputs make the run's output in graph mode.
    pub fn sinks(&self) -> Vec<usize> {
        let needed: BTreeSet<usize> = self.steps.iter().flat_map(|s| s.needs.clone()).collect();
        (0..self.steps.len())
            .filter(|i| !needed.contains(i))
            .collect()
    }
}

/// Index of a step on a cycle of `needs`, if there is one.
fn find_cycle(steps: &[Step]) -> Option<usize> {
    // Kahn's algorithm: whatever cannot be ordered lies on or behind a cycle.
    let mut remaining: Vec<usize> = steps.iter().map(|s| s.needs.len()).collect();
    let mut dependants: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (index, step) in steps.iter().enumerate() {
        for &need in &step.needs {
            dependants.entry(need).or_default().push(index);
        }
    }
    let mut ready: Vec<usize> = (0..steps.len()).filter(|&i| remaining[i] == 0).collect();
    let mut ordered = 0;
    while let Some(index) = ready.pop() {
        ordered += 1;
        for &dependant in dependants.get(&index).into_iter().flatten() {
            remaining[dependant] -= 1;
            if remaining[dependant] == 0 {
                ready.push(dependant);
            }
        }
    }
    (ordered < steps.len()).then(|| (0..steps.len()).find(|&i| remaining[i] > 0))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compile(toml: &str) -> Result<Workflow, SpecError> {
        Workflow::compile(WorkflowSpec::from_toml(toml).unwrap(), None)
    }

    fn fields(error: SpecError) -> Vec<String> {
        error.field_errors().into_iter().map(|e| e.field).collect()
    }

    #[test]
    fn the_spec_illustration_compiles() {
        let workflow = compile(
            r#"
            name = "satisfaction"
            [trigger]
            event = "payments.discount.sent"
            [[steps]]
            id = "aggregate"
            call = "acme-satisfaction"
            function = "record_discount"
            grant = { host_functions = ["kv_get", "kv_set"], timeout_ms = 200, fuel = 5_000_000 }
            retry = { attempts = 5, backoff = "exponential", initial_ms = 100 }
            [[steps]]
            id = "alert"
            if = "steps.aggregate.output.total_for_customer >= 3"
            emit = { type = "acme.loyalty.milestone", data = "steps.aggregate.output" }
            "#,
        )
        .unwrap();
        assert!(!workflow.graph);
        assert!(
            workflow
                .event_pattern
                .unwrap()
                .matches("payments.discount.sent")
        );
        let Action::Call { grant, retry, .. } = &workflow.steps[0].action else {
            panic!("first step is a call");
        };
        assert_eq!(grant.timeout, Duration::from_millis(200));
        assert_eq!(retry.attempts, 5);
    }

    #[test]
    fn every_problem_is_reported_with_its_field() {
        let error = compile(
            r#"
            name = "bad name!"
            trigger = { event = "a.>.b" }
            [[steps]]
            id = "one"
            call = "m"
            if = "input >"
            retry = { attempts = 0 }
            [[steps]]
            id = "one"
            emit = { type = "x.*" }
            function = "f"
            [[steps]]
            id = "3rd"
            [[steps]]
            id = "files"
            call = "m"
            grant = { wasi = true, allowed_paths = { "/" = "/host" } }
            "#,
        )
        .unwrap_err();
        let fields = fields(error);
        for expected in [
            "name",
            "trigger.event",
            "steps[0].if",
            "steps[0].retry.attempts",
            "steps[1].id",
            "steps[1].emit.type",
            "steps[1].function",
            "steps[2].id",
            "steps[2]",
            "steps[3].grant.allowed_paths",
        ] {
            assert!(
                fields.contains(&expected.to_string()),
                "{expected} missing from {fields:?}"
            );
        }
    }

    #[test]
    fn cycles_and_unknown_needs_are_refused() {
        let error = compile(
            r#"
            name = "g"
            [[steps]]
            id = "a"
            call = "m"
            needs = ["b"]
            [[steps]]
            id = "b"
            call = "m"
            needs = ["a"]
            "#,
        )
        .unwrap_err();
        assert!(error.to_string().contains("cycle"), "{error}");
        let error =
            compile("name = \"g\"\n[[steps]]\nid = \"a\"\ncall = \"m\"\nneeds = [\"zz\"]\n")
                .unwrap_err();
        assert_eq!(fields(error), ["steps[0].needs"]);
    }

    #[test]
    fn schedules_parse_with_or_without_seconds() {
        parse_schedule("*/5 * * * *").unwrap();
        parse_schedule("*/1 * * * * *").unwrap();
        assert!(parse_schedule("every minute").is_err());
    }

    #[test]
    fn exponential_backoff_doubles_up_to_the_cap() {
        let retry = RetrySpec {
            attempts: 10,
            initial_ms: 100,
            max_ms: 1000,
            ..RetrySpec::default()
        };
        let delays: Vec<u64> = (2..7).map(|n| retry.delay(n).as_millis() as u64).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000]);
    }
}
