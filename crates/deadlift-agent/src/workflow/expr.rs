//! CEL expressions in workflow documents (`if`, `input`, `emit.data`), compiled once at
//! apply and evaluated over JSON: `event` (the triggering CloudEvent, or null), `input`
//! (the run's input) and `steps` (`steps.<id>.output` for every finished step).

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use cel::common::ast::{CallExpr, EntryExpr, Expr, IdedExpr, LiteralValue};
use cel::common::types::CelInt;
use deadlift_engine::Code;
use serde_json::Value;

/// Longest expression accepted, in bytes.
pub const MAX_EXPRESSION_BYTES: usize = 4096;

/// What one evaluation may cost: each element a comprehension (`all`, `exists`, `map`,
/// `filter`, ...) visits, times the number of nodes of the body it runs for that
/// element. Nested comprehensions pay for every inner element. Without loops an
/// expression's cost is bounded by its size, which [`MAX_EXPRESSION_BYTES`] bounds.
pub const EVALUATION_BUDGET: u64 = 1_000_000;

/// The function the metering wraps every comprehension's range in. Its name holds an
/// `@`, which CEL identifiers cannot, so no expression can call it.
const COST_FUNCTION: &str = "@cost";

/// Why an expression did not give a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExpressionError {
    #[error("{0}")]
    Failed(String),
    #[error(
        "`{expression}` needs more than its evaluation budget of {budget} (elements visited by its comprehensions, times the size of their bodies)"
    )]
    OverBudget { expression: String, budget: u64 },
}

impl ExpressionError {
    pub fn code(&self) -> Code {
        match self {
            Self::Failed(_) => Code::ExpressionFailed,
            Self::OverBudget { .. } => Code::ExpressionBudgetExceeded,
        }
    }
}

/// A compiled CEL expression with its source. Cheap to clone.
#[derive(Clone)]
pub struct Expression(Arc<Compiled>);

struct Compiled {
    source: String,
    /// The program with every comprehension's range wrapped in [`COST_FUNCTION`].
    metered: IdedExpr,
    /// Whether it has a comprehension: only those can cost more than their size.
    loops: bool,
}

impl fmt::Debug for Expression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Expression").field(&self.0.source).finish()
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
        let mut metered = program.expression().clone();
        let loops = meter(&mut metered);
        Ok(Self(Arc::new(Compiled {
            source: source.to_owned(),
            metered,
            loops,
        })))
    }

    pub fn source(&self) -> &str {
        &self.0.source
    }

    /// Evaluates to JSON on this thread, within [`EVALUATION_BUDGET`].
    pub fn evaluate(&self, scope: Scope<'_>) -> Result<Value, ExpressionError> {
        let source = &self.0.source;
        let mut context = cel::Context::with_env(standard_env());
        for (name, value) in [
            ("event", scope.event),
            ("input", scope.input),
            ("steps", scope.steps),
        ] {
            context.add_variable_from_value(name, to_cel(value));
        }
        let meter = Arc::new(Meter {
            left: AtomicU64::new(EVALUATION_BUDGET),
            exceeded: AtomicBool::new(false),
        });
        if self.0.loops {
            let meter = meter.clone();
            context
                .add_function(COST_FUNCTION, move |range: cel::Value, weight: i64| {
                    meter.charge(&range, weight)
                })
                .map_err(|e| ExpressionError::Failed(format!("`{source}`: {e}")))?;
        }
        let result = cel::Value::resolve(&self.0.metered, &context);
        // A comprehension may absorb the error of an element (`exists` over `error ||
        // true`): the budget decides, not what was left of the evaluation.
        if meter.exceeded.load(Ordering::Relaxed) {
            return Err(ExpressionError::OverBudget {
                expression: source.clone(),
                budget: EVALUATION_BUDGET,
            });
        }
        let value =
            result.map_err(|e| ExpressionError::Failed(format!("`{source}` failed: {e}")))?;
        value.json().map_err(|e| {
            ExpressionError::Failed(format!("`{source}` gave a value that is not JSON: {e}"))
        })
    }

    /// Evaluates to JSON without holding an async thread: an expression with a
    /// comprehension (which may take up to its budget) runs on the blocking pool, one
    /// without (bounded by its size) runs here.
    pub async fn evaluate_off_async(&self, scope: Scope<'_>) -> Result<Value, ExpressionError> {
        if !self.0.loops {
            return self.evaluate(scope);
        }
        let expression = self.clone();
        let (event, input, steps) = (
            scope.event.clone(),
            scope.input.clone(),
            scope.steps.clone(),
        );
        tokio::task::spawn_blocking(move || {
            expression.evaluate(Scope {
                event: &event,
                input: &input,
                steps: &steps,
            })
        })
        .await
        .unwrap_or_else(|e| Err(ExpressionError::Failed(format!("evaluation stopped: {e}"))))
    }

    /// Evaluates a condition, which must give a boolean.
    pub async fn condition(&self, scope: Scope<'_>) -> Result<bool, ExpressionError> {
        match self.evaluate_off_async(scope).await? {
            Value::Bool(b) => Ok(b),
            other => Err(ExpressionError::Failed(format!(
                "condition `{}` gave {other}, not a boolean",
                self.0.source
            ))),
        }
    }
}

/// What is left of one evaluation's budget.
struct Meter {
    left: AtomicU64,
    exceeded: AtomicBool,
}

impl Meter {
    /// Charges a comprehension for the elements of its range before it visits them,
    /// so an expression over budget stops before doing the work. Once exceeded, every
    /// later comprehension fails at once.
    fn charge(&self, range: &cel::Value, weight: i64) -> Result<cel::Value, cel::ExecutionError> {
        let elements = match range {
            cel::Value::List(items) => items.len(),
            cel::Value::Map(map) => map.map.len(),
            _ => 1,
        } as u64;
        let cost = elements.saturating_mul(weight.max(1).unsigned_abs());
        let charged = self
            .left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                left.checked_sub(cost)
            });
        if charged.is_err() || self.exceeded.load(Ordering::Relaxed) {
            self.exceeded.store(true, Ordering::Relaxed);
            return Err(cel::ExecutionError::function_error(
                COST_FUNCTION,
                "evaluation budget exceeded",
            ));
        }
        Ok(range.clone())
    }
}

/// Wraps the range of every comprehension in `expr` in a call that charges the meter
/// for its elements times the size of the comprehension's body. Says whether it found
/// one.
fn meter(expr: &mut IdedExpr) -> bool {
    let mut found = false;
    match &mut expr.expr {
        Expr::Comprehension(comprehension) => {
            found = true;
            let c = comprehension.as_mut();
            for part in [
                &mut c.iter_range,
                &mut c.accu_init,
                &mut c.loop_cond,
                &mut c.loop_step,
                &mut c.result,
            ] {
                meter(part);
            }
            let weight = nodes(&c.loop_cond) + nodes(&c.loop_step);
            let range = std::mem::take(&mut c.iter_range);
            c.iter_range = IdedExpr {
                id: range.id,
                expr: Expr::Call(CallExpr {
                    func_name: COST_FUNCTION.to_owned(),
                    target: None,
                    args: vec![
                        range,
                        IdedExpr {
                            id: 0,
                            expr: Expr::Literal(LiteralValue::Int(CelInt::from(
                                i64::try_from(weight).unwrap_or(i64::MAX),
                            ))),
                        },
                    ],
                }),
            };
        }
        Expr::Call(call) => {
            if let Some(target) = &mut call.target {
                found |= meter(target);
            }
            for arg in &mut call.args {
                found |= meter(arg);
            }
        }
        Expr::List(list) => {
            for element in &mut list.elements {
                found |= meter(element);
            }
        }
        Expr::Map(map) => {
            for entry in &mut map.entries {
                found |= meter_entry(&mut entry.expr);
            }
        }
        Expr::Struct(strct) => {
            for entry in &mut strct.entries {
                found |= meter_entry(&mut entry.expr);
            }
        }
        Expr::Select(select) => found |= meter(&mut select.operand),
        Expr::Ident(_) | Expr::Literal(_) | Expr::Unspecified => {}
    }
    found
}

fn meter_entry(entry: &mut EntryExpr) -> bool {
    match entry {
        EntryExpr::MapEntry(e) => meter(&mut e.key) | meter(&mut e.value),
        EntryExpr::StructField(f) => meter(&mut f.value),
    }
}

/// The number of nodes of an expression tree.
fn nodes(expr: &IdedExpr) -> u64 {
    let entry = |entry: &EntryExpr| match entry {
        EntryExpr::MapEntry(e) => nodes(&e.key) + nodes(&e.value),
        EntryExpr::StructField(f) => nodes(&f.value),
    };
    1 + match &expr.expr {
        Expr::Comprehension(c) => {
            nodes(&c.iter_range)
                + nodes(&c.accu_init)
                + nodes(&c.loop_cond)
                + nodes(&c.loop_step)
                + nodes(&c.result)
        }
        Expr::Call(call) => {
            call.target.as_deref().map_or(0, nodes) + call.args.iter().map(nodes).sum::<u64>()
        }
        Expr::List(list) => list.elements.iter().map(nodes).sum(),
        Expr::Map(map) => map.entries.iter().map(|e| entry(&e.expr)).sum(),
        Expr::Struct(strct) => strct.entries.iter().map(|e| entry(&e.expr)).sum(),
        Expr::Select(select) => nodes(&select.operand),
        Expr::Ident(_) | Expr::Literal(_) | Expr::Unspecified => 0,
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

    fn eval(source: &str, input: Value) -> Result<Value, ExpressionError> {
        let steps = json!({"aggregate": {"output": {"total": 3, "name": "x"}}});
        let event = json!({"type": "a.b", "data": {"n": 1}});
        Expression::compile(source)
            .map_err(ExpressionError::Failed)?
            .evaluate(Scope {
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
                .to_string()
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
        let refused = futures_executor(not_bool.condition(scope)).unwrap_err();
        assert!(refused.to_string().contains("not a boolean"), "{refused}");
    }

    fn futures_executor<F: std::future::Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(future)
    }

    /// Issue 12: two runs whose `if` iterated 10^7 times froze the HTTP server. An
    /// expression's comprehensions are metered and stop at the budget, with their own
    /// error code, before doing the work.
    #[test]
    fn an_expression_over_its_budget_stops_with_a_typed_error() {
        let hundred = format!(
            "[{}]",
            (0..100)
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(",")
        );
        let costly = format!(
            "{hundred}.all(a, {hundred}.all(b, {hundred}.all(c, {hundred}.all(d, a + b + c + d >= 0))))"
        );
        let error = eval(&costly, json!(null)).unwrap_err();
        assert_eq!(error.code(), Code::ExpressionBudgetExceeded, "{error}");
        // `exists` absorbs an element's error when another gives true: still refused.
        let absorbed = format!(
            "{hundred}.exists(a, a == 99 || {hundred}.all(b, {hundred}.all(c, {hundred}.all(d, true))))"
        );
        assert_eq!(
            eval(&absorbed, json!(null)).unwrap_err().code(),
            Code::ExpressionBudgetExceeded
        );
        // Comprehensions over the data pay for its elements.
        let items: Vec<u32> = (0..20_000).collect();
        assert_eq!(
            eval("input.map(x, x).map(y, input.all(z, z >= 0))", json!(items))
                .unwrap_err()
                .code(),
            Code::ExpressionBudgetExceeded
        );
        // Ordinary work stays well inside it.
        assert_eq!(
            eval("input.filter(x, x % 2 == 0).size()", json!(items)),
            Ok(json!(10_000))
        );
        assert_eq!(
            eval(
                &format!("{hundred}.all(a, {hundred}.exists(b, b == a))"),
                json!(null)
            ),
            Ok(json!(true))
        );
    }
}
