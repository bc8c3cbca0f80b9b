//! Replaying a recorded call through another module: its input run again with every host
//! call answered from its tape (nothing the host does happens again), and the outcome
//! compared with the recorded one. The regression replay route and shadow rollouts both
//! come here, so that both judge a call the same way.

use deadlift_engine::registry::ModuleInfo;
use deadlift_engine::tape::{HostCall, Start, Tape};
use deadlift_engine::{CallContext, CallError, CallOutput, Engine, Grant};
use serde::Serialize;
use serde_json::Value;

use crate::tapes::TapeError;

/// How a replayed call compares with its recording.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Identical,
    Changed,
    /// Succeeded when recorded, fails now.
    NewlyFailing,
    /// Failed when recorded, succeeds now.
    NoLongerFailing,
    StillFailing,
    /// The candidate made a host call the tape cannot answer (a new call, or other
    /// arguments); the call was not executed.
    Diverged,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Identical => "identical",
            Self::Changed => "changed",
            Self::NewlyFailing => "newly_failing",
            Self::NoLongerFailing => "no_longer_failing",
            Self::StillFailing => "still_failing",
            Self::Diverged => "diverged",
        }
    }
}

/// What a call gave: its output (JSON when it is JSON, else text, else hex) or its error.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Outcome {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<TapeError>,
}

impl Outcome {
    pub fn of_recording(recorded: &Result<Vec<u8>, TapeError>) -> Self {
        match recorded {
            Ok(output) => Self {
                output: Some(shown(output)),
                error: None,
            },
            Err(error) => Self {
                output: None,
                error: Some(error.clone()),
            },
        }
    }

    pub fn of_call(called: &Result<CallOutput, CallError>) -> Self {
        match called {
            Ok(out) => Self {
                output: Some(shown(&out.output)),
                error: None,
            },
            Err(error) => Self {
                output: None,
                error: Some(TapeError::of(error)),
            },
        }
    }
}

/// A recorded call replayed.
#[derive(Debug, Clone)]
pub struct Replayed {
    pub verdict: Verdict,
    pub recorded: Outcome,
    pub replayed: Outcome,
    /// For JSON outputs that changed: each path that differs, with both values.
    pub diff: Vec<Value>,
    pub fuel_used: u64,
    pub duration_us: u64,
}

/// A call as it was recorded.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub function: String,
    pub input: Vec<u8>,
    /// What the host was asked, and answered, in order.
    pub host_calls: Vec<HostCall>,
    /// The vars and config it started with.
    pub start: Start,
    pub outcome: Result<Vec<u8>, TapeError>,
}

/// Runs a recorded call's input through `module` with its host calls answered from
/// the recording, on an instance with the recorded vars, and compares the outcome. The
/// grant's limits apply; it may name every host function the module imports, since none
/// of them runs. Its config goes over the recorded call's (a candidate's own config, or
/// the replay's, changes what it names and nothing else).
pub async fn replay(
    engine: &Engine,
    tenant: &str,
    module: &ModuleInfo,
    base: &Grant,
    recorded: &Recorded,
) -> Replayed {
    let mut grant = base.clone();
    let mut config = recorded.start.config.clone();
    config.extend(base.config.clone());
    grant.config = config;
    for import in &module.imports {
        if import.module == "extism:host/user" {
            grant.host_functions.insert(import.name.clone());
        }
    }
    if recorded
        .host_calls
        .iter()
        .any(|c| c.function == "http_request")
    {
        grant.allowed_hosts.push("*".into());
    }
    let tape = Tape::replaying_from(recorded.host_calls.clone(), recorded.start.clone());
    let ctx = CallContext::new(tenant).with_tape(tape);
    let called = engine
        .call(
            &module.id,
            &recorded.function,
            &recorded.input,
            &grant,
            &ctx,
        )
        .await;
    compare(&recorded.outcome, &called)
}

/// Judges a replayed call against its recording.
pub fn compare(
    recorded: &Result<Vec<u8>, TapeError>,
    called: &Result<CallOutput, CallError>,
) -> Replayed {
    let recorded_outcome = Outcome::of_recording(recorded);
    let replayed = Outcome::of_call(called);
    let verdict = match (called, recorded.is_err()) {
        (Err(CallError::Diverged { .. }), _) => Verdict::Diverged,
        (Ok(_), false) if replayed == recorded_outcome => Verdict::Identical,
        (Ok(_), false) => Verdict::Changed,
        (Ok(_), true) => Verdict::NoLongerFailing,
        (Err(_), false) => Verdict::NewlyFailing,
        (Err(_), true) => Verdict::StillFailing,
    };
    let mut diff = Vec::new();
    if let (Verdict::Changed, Some(before), Some(after)) =
        (verdict, &recorded_outcome.output, &replayed.output)
    {
        json_diff("", before, after, &mut diff);
    }
    let (fuel_used, duration_us) = called.as_ref().map_or((0, 0), |out| {
        (
            out.fuel_used,
            u64::try_from(out.duration.as_micros()).unwrap_or(u64::MAX),
        )
    });
    Replayed {
        verdict,
        recorded: recorded_outcome,
        replayed,
        diff,
        fuel_used,
        duration_us,
    }
}

/// Bytes as a person reads them: JSON, else text, else hex.
pub fn shown(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap_or_else(|_| match std::str::from_utf8(bytes) {
        Ok(text) => Value::String(text.to_owned()),
        Err(_) => serde_json::json!({ "hex": hex::encode(bytes) }),
    })
}

/// Each JSON Pointer path where `after` differs from `before`, with both values.
pub fn json_diff(path: &str, before: &Value, after: &Value, out: &mut Vec<Value>) {
    match (before, after) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for key in keys {
                let here = format!("{path}/{}", key.replace('~', "~0").replace('/', "~1"));
                match (a.get(key), b.get(key)) {
                    (Some(x), Some(y)) => json_diff(&here, x, y, out),
                    (x, y) => {
                        out.push(serde_json::json!({"path": here, "recorded": x, "replayed": y}))
                    }
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (index, (x, y)) in a.iter().zip(b).enumerate() {
                json_diff(&format!("{path}/{index}"), x, y, out);
            }
        }
        (x, y) if x != y => {
            out.push(serde_json::json!({"path": if path.is_empty() { "/" } else { path }, "recorded": x, "replayed": y}));
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn json_diff_names_each_changed_path() {
        let mut out = Vec::new();
        json_diff(
            "",
            &json!({"a": 1, "b": {"c": [1, 2]}, "d/e": true}),
            &json!({"a": 1, "b": {"c": [1, 3]}, "x": null}),
            &mut out,
        );
        let paths: Vec<&str> = out.iter().filter_map(|d| d["path"].as_str()).collect();
        assert_eq!(paths, ["/b/c/1", "/d~1e", "/x"]);
    }
}
