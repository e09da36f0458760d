//! Evaluates a schema's `x-kubernetes-validations` rules with cel-rust, the
//! way the API server does: `self` is the value at the rule's node, `oldSelf`
//! the previous value (transition rules are skipped when there is none).

use std::collections::HashMap;
use std::sync::Arc;

use cel::{Context, Program, Value as CelValue};
use serde_json::Value;

use super::{Problem, ProblemKind};

/// Compiles each rule once and evaluates it against JSON values.
#[derive(Default)]
pub(crate) struct RuleEvaluator {
    programs: HashMap<String, Result<Arc<Program>, String>>,
}

/// What one rule said about one value.
pub(crate) enum Outcome {
    Passed,
    /// A transition rule on a create: not applicable.
    Skipped,
    Failed {
        field_path: Option<String>,
        message: String,
    },
    Broken {
        rule: String,
        message: String,
    },
}

impl Outcome {
    /// The problem to report at `path`, if any.
    pub(crate) fn into_problem(self, path: &str) -> Option<Problem> {
        match self {
            Outcome::Passed | Outcome::Skipped => None,
            Outcome::Failed {
                field_path,
                message,
            } => Some(Problem {
                path: match field_path {
                    Some(fp) => format!("{path}{}", fp),
                    None => path.to_string(),
                },
                kind: ProblemKind::Rule,
                message,
            }),
            Outcome::Broken { rule, message } => Some(Problem {
                path: path.to_string(),
                kind: ProblemKind::Rule,
                message: format!("rule `{rule}` could not be evaluated: {message}"),
            }),
        }
    }
}

impl RuleEvaluator {
    fn program(&mut self, rule: &str) -> Result<Arc<Program>, String> {
        self.programs
            .entry(rule.to_string())
            .or_insert_with(|| {
                Program::compile(rule)
                    .map(Arc::new)
                    .map_err(|e| e.to_string())
            })
            .clone()
    }

    /// Evaluates the rule object `rule` (`{rule, message, fieldPath, reason}`).
    pub(crate) fn evaluate(&mut self, rule: &Value, value: &Value, old: Option<&Value>) -> Outcome {
        let Some(source) = rule.get("rule").and_then(Value::as_str) else {
            return Outcome::Passed;
        };
        let program = match self.program(source) {
            Ok(p) => p,
            Err(e) => {
                return Outcome::Broken {
                    rule: source.to_string(),
                    message: e,
                }
            }
        };
        let uses_old = program.references().has_variable("oldSelf");
        if uses_old && old.is_none() {
            return Outcome::Skipped;
        }
        let mut context = Context::default();
        context.add_variable_from_value("self", to_cel(value));
        if let Some(old) = old {
            context.add_variable_from_value("oldSelf", to_cel(old));
        }
        match program.execute(&context) {
            Ok(CelValue::Bool(true)) => Outcome::Passed,
            Ok(CelValue::Bool(false)) => Outcome::Failed {
                field_path: rule
                    .get("fieldPath")
                    .and_then(Value::as_str)
                    .map(str::to_string),
                message: rule
                    .get("message")
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("failed rule: {source}")),
            },
            Ok(other) => Outcome::Broken {
                rule: source.to_string(),
                message: format!("expected a boolean, got {other:?}"),
            },
            Err(e) => Outcome::Broken {
                rule: source.to_string(),
                message: e.to_string(),
            },
        }
    }
}

/// JSON to CEL with Kubernetes' typing: integers are `int`, not `uint`.
pub(crate) fn to_cel(value: &Value) -> CelValue {
    match value {
        Value::Null => CelValue::Null,
        Value::Bool(b) => CelValue::Bool(*b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                CelValue::Int(i)
            } else if let Some(u) = n.as_u64() {
                CelValue::UInt(u)
            } else {
                CelValue::Float(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Value::String(s) => CelValue::String(Arc::new(s.clone())),
        Value::Array(items) => CelValue::List(Arc::new(items.iter().map(to_cel).collect())),
        Value::Object(map) => {
            let entries: HashMap<String, CelValue> =
                map.iter().map(|(k, v)| (k.clone(), to_cel(v))).collect();
            CelValue::from(entries)
        }
    }
}
