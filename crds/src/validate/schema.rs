//! A walker for the structural OpenAPI v3 schema of a CRD, with the API
//! server's semantics for the subset the generated schema uses: defaulting,
//! unknown-field rejection, types, enums, ranges, lengths, patterns, item
//! counts, map-type lists (unique keys) and `x-kubernetes-validations`.

use std::collections::{BTreeSet, HashMap};

use regex::Regex;
use serde_json::{Map, Value};

use super::cel::RuleEvaluator;
use super::{Problem, ProblemKind};

/// Walks values against a schema, collecting problems.
pub(crate) struct Walker<'r> {
    problems: Vec<Problem>,
    regexes: HashMap<String, Option<Regex>>,
    rules: &'r mut RuleEvaluator,
}

impl<'r> Walker<'r> {
    pub(crate) fn new(rules: &'r mut RuleEvaluator) -> Self {
        Walker {
            problems: Vec::new(),
            regexes: HashMap::new(),
            rules,
        }
    }

    pub(crate) fn into_problems(self) -> Vec<Problem> {
        self.problems
    }

    fn push(&mut self, path: &str, kind: ProblemKind, message: String) {
        self.problems.push(Problem {
            path: path.to_string(),
            kind,
            message,
        });
    }

    /// Applies defaults in `value` and checks it against `schema`. `old` is the
    /// value at the same place in the previous object (transition rules).
    pub(crate) fn walk(
        &mut self,
        schema: &Value,
        value: &mut Value,
        path: &str,
        old: Option<&Value>,
    ) {
        if value.is_null() {
            if schema.get("nullable").and_then(Value::as_bool) == Some(true) {
                return;
            }
            self.push(path, ProblemKind::Type, "must not be null".to_string());
            return;
        }
        if schema
            .get("x-kubernetes-preserve-unknown-fields")
            .and_then(Value::as_bool)
            == Some(true)
            && schema.get("properties").is_none()
        {
            return;
        }
        if !self.check_type(schema, value, path) {
            return;
        }
        // The API server decodes `type: number` as a double, also when the
        // YAML says `1`: do the same, so CEL sees a double either way.
        if schema.get("type").and_then(Value::as_str) == Some("number") && !value.is_f64() {
            if let Some(x) = value.as_f64() {
                if let Some(n) = serde_json::Number::from_f64(x) {
                    *value = Value::Number(n);
                }
            }
        }
        self.check_enum(schema, value, path);
        match value {
            Value::Object(map) => self.walk_object(schema, map, path, old),
            Value::Array(items) => self.walk_array(schema, items, path, old),
            Value::String(s) => self.check_string(schema, s, path),
            Value::Number(_) => self.check_number(schema, value, path),
            _ => {}
        }
        if let Some(rules) = schema
            .get("x-kubernetes-validations")
            .and_then(Value::as_array)
        {
            let had_problems = self.problems.iter().any(|p| p.path.starts_with(path));
            // The API server evaluates a node's rules only when its schema
            // checks passed; so do we, to avoid errors caused by errors.
            if !had_problems {
                for rule in rules {
                    let outcome = self.rules.evaluate(rule, value, old);
                    if let Some(problem) = outcome.into_problem(path) {
                        self.problems.push(problem);
                    }
                }
            }
        }
    }

    fn check_type(&mut self, schema: &Value, value: &Value, path: &str) -> bool {
        let Some(expected) = schema.get("type").and_then(Value::as_str) else {
            return true;
        };
        let ok = match expected {
            "object" => value.is_object(),
            "array" => value.is_array(),
            "string" => value.is_string(),
            "boolean" => value.is_boolean(),
            "integer" => value.is_i64() || value.is_u64(),
            "number" => value.is_number(),
            _ => true,
        };
        if !ok {
            self.push(
                path,
                ProblemKind::Type,
                format!("must be of type {expected}, found {}", describe(value)),
            );
        }
        ok
    }

    fn check_enum(&mut self, schema: &Value, value: &Value, path: &str) {
        let Some(allowed) = schema.get("enum").and_then(Value::as_array) else {
            return;
        };
        if !allowed.contains(value) {
            let list: Vec<String> = allowed.iter().map(Value::to_string).collect();
            self.push(
                path,
                ProblemKind::Enum,
                format!(
                    "unsupported value {value}: supported values: {}",
                    list.join(", ")
                ),
            );
        }
    }

    fn walk_object(
        &mut self,
        schema: &Value,
        map: &mut Map<String, Value>,
        path: &str,
        old: Option<&Value>,
    ) {
        let properties = schema.get("properties").and_then(Value::as_object);
        if let Some(props) = properties {
            // Defaults first, as the API server does on decode.
            for (name, prop) in props {
                if !map.contains_key(name) {
                    if let Some(default) = prop.get("default") {
                        map.insert(name.clone(), default.clone());
                    }
                }
            }
            if let Some(required) = schema.get("required").and_then(Value::as_array) {
                for name in required.iter().filter_map(Value::as_str) {
                    if !map.contains_key(name) {
                        self.push(
                            &join(path, name),
                            ProblemKind::Required,
                            "required value".to_string(),
                        );
                    }
                }
            }
        }
        let additional = schema.get("additionalProperties");
        let preserve = schema
            .get("x-kubernetes-preserve-unknown-fields")
            .and_then(Value::as_bool)
            == Some(true);
        let keys: Vec<String> = map.keys().cloned().collect();
        for key in keys {
            let child_path = join(path, &key);
            let child_old = old.and_then(|o| o.get(&key));
            let child_schema = properties.and_then(|p| p.get(&key)).or(match additional {
                Some(Value::Object(_)) => additional,
                _ => None,
            });
            match child_schema {
                Some(child_schema) => {
                    if let Some(child) = map.get_mut(&key) {
                        self.walk(child_schema, child, &child_path, child_old);
                    }
                }
                None if preserve || additional == Some(&Value::Bool(true)) => {}
                None => {
                    let known: Vec<&str> = properties
                        .map(|p| p.keys().map(String::as_str).collect())
                        .unwrap_or_default();
                    self.push(
                        &child_path,
                        ProblemKind::Unknown,
                        format!("unknown field; known fields here: {}", known.join(", ")),
                    );
                }
            }
        }
        self.check_count(
            schema,
            map.len(),
            path,
            "minProperties",
            "maxProperties",
            "properties",
        );
    }

    fn walk_array(&mut self, schema: &Value, items: &mut [Value], path: &str, old: Option<&Value>) {
        self.check_count(schema, items.len(), path, "minItems", "maxItems", "items");
        if let Some(item_schema) = schema.get("items") {
            let old_items = old.and_then(Value::as_array);
            for (i, item) in items.iter_mut().enumerate() {
                let item_old = old_items.and_then(|o| o.get(i));
                self.walk(item_schema, item, &format!("{path}[{i}]"), item_old);
            }
        }
        if schema.get("x-kubernetes-list-type").and_then(Value::as_str) == Some("map") {
            let keys: Vec<&str> = schema
                .get("x-kubernetes-list-map-keys")
                .and_then(Value::as_array)
                .map(|k| k.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let mut seen = BTreeSet::new();
            for (i, item) in items.iter().enumerate() {
                let key: Vec<String> = keys
                    .iter()
                    .map(|k| item.get(*k).map(Value::to_string).unwrap_or_default())
                    .collect();
                if !seen.insert(key.clone()) {
                    self.push(
                        &format!("{path}[{i}]"),
                        ProblemKind::Duplicate,
                        format!(
                            "duplicate entry with {}: {}",
                            keys.join(", "),
                            key.join(", ")
                        ),
                    );
                }
            }
        }
    }

    fn check_string(&mut self, schema: &Value, s: &str, path: &str) {
        let len = s.chars().count();
        self.check_count(schema, len, path, "minLength", "maxLength", "characters");
        if let Some(pattern) = schema.get("pattern").and_then(Value::as_str) {
            let compiled = self
                .regexes
                .entry(pattern.to_string())
                .or_insert_with(|| Regex::new(pattern).ok());
            match compiled {
                Some(re) if !re.is_match(s) => {
                    self.push(
                        path,
                        ProblemKind::Pattern,
                        format!("value {s:?} does not match the pattern {pattern}"),
                    );
                }
                Some(_) => {}
                None => self.push(
                    path,
                    ProblemKind::Pattern,
                    format!("schema pattern {pattern} is not a valid regex"),
                ),
            }
        }
    }

    fn check_number(&mut self, schema: &Value, value: &Value, path: &str) {
        let Some(x) = value.as_f64() else { return };
        if let Some(min) = schema.get("minimum").and_then(Value::as_f64) {
            let exclusive = schema.get("exclusiveMinimum").and_then(Value::as_bool) == Some(true);
            if x < min || (exclusive && x == min) {
                let op = if exclusive {
                    "greater than"
                } else {
                    "greater than or equal to"
                };
                self.push(
                    path,
                    ProblemKind::Range,
                    format!("{value} must be {op} {}", fmt_num(min)),
                );
            }
        }
        if let Some(max) = schema.get("maximum").and_then(Value::as_f64) {
            let exclusive = schema.get("exclusiveMaximum").and_then(Value::as_bool) == Some(true);
            if x > max || (exclusive && x == max) {
                let op = if exclusive {
                    "less than"
                } else {
                    "less than or equal to"
                };
                self.push(
                    path,
                    ProblemKind::Range,
                    format!("{value} must be {op} {}", fmt_num(max)),
                );
            }
        }
    }

    fn check_count(
        &mut self,
        schema: &Value,
        n: usize,
        path: &str,
        min_key: &str,
        max_key: &str,
        what: &str,
    ) {
        if let Some(min) = schema.get(min_key).and_then(Value::as_u64) {
            if (n as u64) < min {
                self.push(
                    path,
                    ProblemKind::Range,
                    format!("must have at least {min} {what}, found {n}"),
                );
            }
        }
        if let Some(max) = schema.get(max_key).and_then(Value::as_u64) {
            if (n as u64) > max {
                self.push(
                    path,
                    ProblemKind::Range,
                    format!("must have at most {max} {what}, found {n}"),
                );
            }
        }
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn fmt_num(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        format!("{x}")
    }
}

fn describe(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_f64() => "number",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}
