//! Local validation of a FederatedTune, with the API server's semantics.
//!
//! The checks come from the generated CRD itself ([`crate::crd::crd`]): the
//! structural schema (types, enums, ranges, required fields, unknown fields,
//! unique client names) and every `x-kubernetes-validations` CEL rule,
//! evaluated with cel-rust. So `heterotune validate` and `kubectl apply`
//! accept and reject the same objects. Defaults from the schema are applied
//! on the way, as the API server does.

mod cel;
mod schema;

use std::fmt;

use serde_json::Value;

use crate::{FederatedTune, API_VERSION, KIND};

/// What kind of problem a [`Problem`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemKind {
    /// The document is not valid YAML/JSON.
    Syntax,
    /// A required field is missing.
    Required,
    /// A field the schema does not declare.
    Unknown,
    /// Wrong type.
    Type,
    /// Not one of the allowed values.
    Enum,
    /// Out of range, too long or too short, too many or too few items.
    Range,
    /// Does not match the pattern.
    Pattern,
    /// Two list entries with the same key.
    Duplicate,
    /// A CEL rule failed.
    Rule,
    /// A check that needs more than the document (files, models) failed.
    Reference,
}

/// One problem, at a field path such as `spec.clients[1].model.family`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Field path (empty for the document as a whole).
    pub path: String,
    /// What kind of problem.
    pub kind: ProblemKind,
    /// What is wrong and what is allowed.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every problem found in a document.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Problems(pub Vec<Problem>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl Problems {
    /// The field paths, in order (handy in tests and for machines).
    pub fn paths(&self) -> Vec<&str> {
        self.0.iter().map(|p| p.path.as_str()).collect()
    }
}

fn single(path: &str, kind: ProblemKind, message: impl Into<String>) -> Problems {
    Problems(vec![Problem {
        path: path.to_string(),
        kind,
        message: message.into(),
    }])
}

/// Parses a YAML (or JSON) document into a JSON value.
pub fn parse_document(text: &str) -> Result<Value, Problems> {
    serde_saphyr::from_str::<Value>(text).map_err(|e| {
        let message = match e.location() {
            Some(loc) => format!(
                "invalid YAML at line {}, column {}: {e}",
                loc.line(),
                loc.column()
            ),
            None => format!("invalid YAML: {e}"),
        };
        single("", ProblemKind::Syntax, message)
    })
}

/// Checks `object` (a whole FederatedTune as JSON) against the CRD schema and
/// its CEL rules, applying schema defaults in place. `old` is the previous
/// object for transition rules (immutability), when there is one.
pub fn check_object(object: &mut Value, old: Option<&Value>) -> Vec<Problem> {
    let mut problems = Vec::new();
    match object.get("apiVersion").and_then(Value::as_str) {
        Some(API_VERSION) => {}
        Some(other) => problems.push(Problem {
            path: "apiVersion".into(),
            kind: ProblemKind::Enum,
            message: format!("unsupported value {other:?}: supported values: \"{API_VERSION}\""),
        }),
        None => problems.push(Problem {
            path: "apiVersion".into(),
            kind: ProblemKind::Required,
            message: format!("required value (\"{API_VERSION}\")"),
        }),
    }
    match object.get("kind").and_then(Value::as_str) {
        Some(KIND) => {}
        Some(other) => problems.push(Problem {
            path: "kind".into(),
            kind: ProblemKind::Enum,
            message: format!("unsupported value {other:?}: supported values: \"{KIND}\""),
        }),
        None => problems.push(Problem {
            path: "kind".into(),
            kind: ProblemKind::Required,
            message: format!("required value (\"{KIND}\")"),
        }),
    }
    match object.pointer("/metadata/name").and_then(Value::as_str) {
        Some(name) if is_dns_subdomain(name) => {}
        Some(name) => problems.push(Problem {
            path: "metadata.name".into(),
            kind: ProblemKind::Pattern,
            message: format!(
                "{name:?} is not a valid name: lower-case letters, digits, '-' and '.', starting and ending with a letter or digit, at most 253 characters"
            ),
        }),
        None => problems.push(Problem {
            path: "metadata.name".into(),
            kind: ProblemKind::Required,
            message: "required value".into(),
        }),
    }
    // The namespace names a folder of local runs: only what the API server
    // accepts (a DNS label), never a path such as `../..`.
    match object.pointer("/metadata/namespace") {
        None | Some(Value::Null) => {}
        Some(Value::String(ns)) if is_dns_label(ns) => {}
        Some(other) => problems.push(Problem {
            path: "metadata.namespace".into(),
            kind: ProblemKind::Pattern,
            message: format!(
                "{other} is not a valid namespace: lower-case letters, digits and '-', starting and ending with a letter or digit, at most 63 characters"
            ),
        }),
    }
    if !problems.is_empty() {
        return problems;
    }
    let schema = crate::crd::schema_json();
    let mut rules = cel::RuleEvaluator::default();
    let mut walker = schema::Walker::new(&mut rules);
    // Only spec and status are checked; metadata is the API server's.
    if let (Some(props), Some(map)) = (
        schema.get("properties").and_then(Value::as_object),
        object.as_object_mut(),
    ) {
        for key in ["spec", "status"] {
            match (props.get(key), map.get_mut(key)) {
                (Some(s), Some(v)) => walker.walk(s, v, key, old.and_then(|o| o.get(key))),
                (Some(_), None) if key == "spec" => problems.push(Problem {
                    path: "spec".into(),
                    kind: ProblemKind::Required,
                    message: "required value".into(),
                }),
                _ => {}
            }
        }
    }
    problems.extend(walker.into_problems());
    if problems.is_empty() {
        if let Some(root_rules) = schema
            .get("x-kubernetes-validations")
            .and_then(Value::as_array)
        {
            for rule in root_rules {
                if let Some(p) = rules.evaluate(rule, object, old).into_problem("") {
                    problems.push(strip_leading_dot(p));
                }
            }
        }
    }
    problems
}

fn strip_leading_dot(mut p: Problem) -> Problem {
    if let Some(rest) = p.path.strip_prefix('.') {
        p.path = rest.to_string();
    }
    p
}

fn is_dns_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
}

fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// Parses and validates a FederatedTune document; on success returns the
/// typed object with every default applied.
pub fn parse_federated_tune(text: &str) -> Result<FederatedTune, Problems> {
    let mut value = parse_document(text)?;
    validate_value(&mut value, None)
}

/// Validates a FederatedTune given as JSON (defaults applied in place) and
/// converts it to the typed object. `old` enables the transition rules.
pub fn validate_value(value: &mut Value, old: Option<&Value>) -> Result<FederatedTune, Problems> {
    let problems = check_object(value, old);
    if !problems.is_empty() {
        return Err(Problems(problems));
    }
    serde_json::from_value::<FederatedTune>(value.clone()).map_err(|e| {
        single(
            "spec",
            ProblemKind::Type,
            format!("does not match the FederatedTune type: {e}"),
        )
    })
}

#[cfg(test)]
mod tests;
