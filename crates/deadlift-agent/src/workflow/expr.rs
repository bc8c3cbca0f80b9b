//! CEL expressions in workflow documents (`if`, `input`, `emit.data`), compiled once at
//! apply and evaluated over JSON: `event` (the triggering CloudEvent, or null), `input`
//! (the run's input) and `steps` (`steps.<id>.output` for every finished step).

use std::fmt;
use std::sync::{Arc, OnceLock};

use serde_json::Value;

/// Longest expression accepted, in bytes.
pub const MAX_EXPRESSION_BYTES: usize = 4096;

/// A compiled CEL expression with its source.
pub struct Expression {
    source: String,
    program: cel::Program,
}

impl fmt::Debug for Expression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Expression").field(&self.source).finish()
    }
}

/// The values an expression sees.
#[derive(Debug, Clone, Copy)]
pub struct Scope<'a> {
    pub event: &'a Value,
    pub input: &'a Value,
    /// An object: step id → `{"output": ...}`.
    pub steps: &'a Value,
}

impl Expression {
    /// Parses `source`; the message says what is wrong.
    pub fn compile(source: &str) -> Result<Self, String> {
        if source.len() > MAX_EXPRESSION_BYTES {
            return Err(format!(
                "expression is longer than {MAX_EXPRESSION_BYTES} bytes"
            ));
        }
        let program = cel::Program::compile(source)
            .map_err(|e| format!("not a valid CEL expression: {e}"))?;
        Ok(Self {
            source: source.to_owned(),
            program,
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Evaluates to JSON.
    pub fn evaluate(&self, scope: Scope<'_>) -> Result<Value, String> {
        let mut context = cel::Context::with_env(standard_env());
        for (name, value) in [
            ("event", scope.event),
            ("input", scope.input),
            ("steps", scope.steps),
        ] {
            context.add_variable_from_value(name, to_cel(value));
        }
        let value = self
            .program
            .execute(&context)
            .map_err(|e| format!("`{}` failed: {e}", self.source))?;
        value
            .json()
            .map_err(|e| format!("`{}` gave a value that is not JSON: {e}", self.source))
    }

    /// Evaluates a condition, which must give a boolean.
    pub fn condition(&self, scope: Scope<'_>) -> Result<bool, String> {
        match self.evaluate(scope)? {
            Value::Bool(b) => Ok(b),
            other => Err(format!(
                "condition `{}` gave {other}, not a boolean",
                self.source
            )),
        }
    }
}

/// CEL's standard environment, built once: building it costs more than most
/// evaluations.
fn standard_env() -> Arc<cel::Env> {
    static ENV: OnceLock<Arc<cel::Env>> = OnceLock::new();
    ENV.get_or_init(|| Arc::new(cel::Env::stdlib())).clone()
}

/// JSON to CEL. Integers become CEL `int` whenever they fit, so that `input.n * 2`
/// works (CEL has no arithmetic between `uint` and `int`).
fn to_cel(value: &Value) -> cel::Value {
    match value {
        Value::Null => cel::Value::Null,
        Value::Bool(b) => cel::Value::Bool(*b),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => cel::Value::Int(i),
            (None, Some(u)) => cel::Value::UInt(u),
            _ => cel::Value::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => cel::Value::from(s.as_str()),
        Value::Array(items) => cel::Value::from(items.iter().map(to_cel).collect::<Vec<_>>()),
        Value::Object(map) => cel::Value::from(
            map.iter()
                .map(|(k, v)| (k.clone(), to_cel(v)))
                .collect::<std::collections::HashMap<_, _>>(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn eval(source: &str, input: Value) -> Result<Value, String> {
        let steps = json!({"aggregate": {"output": {"total": 3, "name": "x"}}});
        let event = json!({"type": "a.b", "data": {"n": 1}});
        Expression::compile(source)?.evaluate(Scope {
            event: &event,
            input: &input,
            steps: &steps,
        })
    }

    #[test]
    fn expressions_see_event_input_and_step_outputs() {
        assert_eq!(
            eval("steps.aggregate.output.total >= 3", json!(null)),
            Ok(json!(true))
        );
        assert_eq!(
            eval("input.amount * 2", json!({"amount": 21})),
            Ok(json!(42))
        );
        assert_eq!(eval("event.type", json!(null)), Ok(json!("a.b")));
        assert_eq!(
            eval(
                "{'total': steps.aggregate.output.total, 'tag': input}",
                json!("t")
            ),
            Ok(json!({"total": 3, "tag": "t"}))
        );
        assert_eq!(eval("input == null", json!(null)), Ok(json!(true)));
        assert_eq!(
            eval("input.map(x, x * 2)", json!([1, 2])),
            Ok(json!([2, 4]))
        );
    }

    #[test]
    fn bad_expressions_fail_with_a_message() {
        assert!(Expression::compile("1 +").unwrap_err().contains("CEL"));
        // Names are checked when evaluated: macros (`map(x, ...)`) bind their own.
        assert!(
            eval("secrets.x", json!(null))
                .unwrap_err()
                .contains("secrets")
        );
        assert!(eval("steps.missing.output", json!(null)).is_err());
        let not_bool = Expression::compile("1").unwrap();
        let null = json!(null);
        let scope = Scope {
            event: &null,
            input: &null,
            steps: &null,
        };
        assert!(
            not_bool
                .condition(scope)
                .unwrap_err()
                .contains("not a boolean")
        );
    }
}
