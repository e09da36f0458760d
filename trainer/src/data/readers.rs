//! Reading the rows of a CSV, TSV or JSONL file: the text and the raw
//! label of each record, with the line it starts on. Label resolution and
//! deduplication are `source.rs`'s.

use std::path::Path;

use crate::error::{Error, Result};

/// The names of the text and label fields (`textField`, `labelField`).
pub(crate) struct Fields<'a> {
    /// The text field.
    pub text: &'a str,
    /// The label field.
    pub label: &'a str,
}

/// One row as read from a file, before label resolution.
pub(crate) struct RawRecord {
    /// The line on which the record starts (1-based).
    pub line: u64,
    /// The text field, trimmed.
    pub text: String,
    /// The raw label, trimmed.
    pub label: String,
}

fn column_index(
    headers: &csv::StringRecord,
    field: &str,
    role: &str,
    path: &Path,
) -> Result<usize> {
    headers.iter().position(|h| h == field).ok_or_else(|| {
        Error::data(
            path,
            format!(
                "line 1: the header has no column `{field}` ({role}); available columns: {}",
                quoted_names(headers.iter())
            ),
        )
    })
}

/// Most names an error lists, and most characters of each: an error must
/// not carry a file's content (a "header" may be a whole secret-laden line).
const MAX_NAMES: usize = 8;
const MAX_NAME_CHARS: usize = 32;

/// Column or field names for an error message: at most [`MAX_NAMES`], each
/// cut to [`MAX_NAME_CHARS`] and escaped.
pub(crate) fn quoted_names<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let names: Vec<&str> = names.collect();
    let mut shown: Vec<String> = names
        .iter()
        .take(MAX_NAMES)
        .map(|n| {
            let cut: String = n.chars().take(MAX_NAME_CHARS).collect();
            let more = if n.chars().count() > MAX_NAME_CHARS {
                "…"
            } else {
                ""
            };
            format!("`{}{more}`", cut.escape_debug())
        })
        .collect();
    if names.len() > MAX_NAMES {
        shown.push(format!("… ({} more)", names.len() - MAX_NAMES));
    }
    shown.join(", ")
}

pub(crate) fn read_delimited(
    bytes: &[u8],
    delimiter: u8,
    quoting: bool,
    cfg: &Fields<'_>,
    path: &Path,
    push: &mut dyn FnMut(RawRecord) -> Result<bool>,
) -> Result<()> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .delimiter(delimiter)
        .quoting(quoting)
        .flexible(true)
        .from_reader(bytes);
    let headers = reader
        .headers()
        .map_err(|e| Error::data(path, format!("cannot read the header line: {e}")))?
        .clone();
    if headers.is_empty() {
        return Err(Error::data(path, "line 1: empty header line"));
    }
    let text_col = column_index(&headers, cfg.text, "textField", path)?;
    let label_col = column_index(&headers, cfg.label, "labelField", path)?;
    // Line numbers come from byte offsets: the csv crate's own line count
    // is off by one after a CRLF header, and its record offsets may point
    // at the `\n` of the previous line's CRLF, hence the `<=`.
    let newlines: Vec<usize> = bytes
        .iter()
        .enumerate()
        .filter(|(_, &b)| b == b'\n')
        .map(|(i, _)| i)
        .collect();
    let line_at = |byte: u64| newlines.partition_point(|&p| p as u64 <= byte) as u64 + 1;
    let mut record = csv::StringRecord::new();
    loop {
        let more = reader.read_record(&mut record).map_err(|e| {
            let line = e.position().map(|p| line_at(p.byte())).unwrap_or(0);
            let what = match e.kind() {
                csv::ErrorKind::Utf8 { .. } => "invalid UTF-8".to_string(),
                _ => e.to_string(),
            };
            Error::data(path, format!("line {line}: {what}"))
        })?;
        if !more {
            break;
        }
        let line = record.position().map(|p| line_at(p.byte())).unwrap_or(0);
        if record.len() == 1 && record.get(0).is_some_and(|f| f.trim().is_empty()) {
            continue; // a whitespace-only line
        }
        let field = |col: usize, name: &str| -> Result<String> {
            record.get(col).map(str::to_string).ok_or_else(|| {
                Error::data(
                    path,
                    format!(
                        "line {line}: field `{name}` missing: the row has {} fields, the \
                         header {}",
                        record.len(),
                        headers.len()
                    ),
                )
            })
        };
        let text = field(text_col, cfg.text)?;
        let label = field(label_col, cfg.label)?;
        if !push(RawRecord { line, text, label })? {
            break;
        }
    }
    Ok(())
}

pub(crate) fn read_jsonl(
    bytes: &[u8],
    cfg: &Fields<'_>,
    path: &Path,
    push: &mut dyn FnMut(RawRecord) -> Result<bool>,
) -> Result<()> {
    for (i, raw_line) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = i as u64 + 1;
        let raw_line = raw_line.strip_suffix(b"\r").unwrap_or(raw_line);
        let text_line = std::str::from_utf8(raw_line)
            .map_err(|_| Error::data(path, format!("line {line}: invalid UTF-8")))?;
        if text_line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(text_line)
            .map_err(|e| Error::data(path, format!("line {line}: invalid JSON: {e}")))?;
        let serde_json::Value::Object(object) = value else {
            return Err(Error::data(
                path,
                format!("line {line}: expected a JSON object per line"),
            ));
        };
        let get = |name: &str| {
            object.get(name).ok_or_else(|| {
                Error::data(
                    path,
                    format!(
                        "line {line}: field `{name}` missing; available fields: {}",
                        quoted_names(object.keys().map(String::as_str))
                    ),
                )
            })
        };
        let text = match get(cfg.text)? {
            serde_json::Value::String(s) => s.clone(),
            other => {
                return Err(Error::data(
                    path,
                    format!(
                        "line {line}: field `{}` must be a string, found {}",
                        cfg.text,
                        json_kind(other)
                    ),
                ))
            }
        };
        let label = match get(cfg.label)? {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Number(n) if n.is_i64() || n.is_u64() => n.to_string(),
            other => {
                return Err(Error::data(
                    path,
                    format!(
                        "line {line}: field `{}` (the label) must be a string or an integer, \
                         found {}",
                        cfg.label,
                        json_kind(other)
                    ),
                ))
            }
        };
        if !push(RawRecord { line, text, label })? {
            break;
        }
    }
    Ok(())
}

fn json_kind(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::Null => "null".into(),
        serde_json::Value::Bool(b) => format!("a boolean ({b})"),
        serde_json::Value::Number(n) => format!("a non-integer number ({n})"),
        serde_json::Value::String(_) => "a string".into(),
        serde_json::Value::Array(_) => "an array".into(),
        serde_json::Value::Object(_) => "an object".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header line that is really a secret (`/proc/self/environ` read as
    /// CSV) is not echoed: names are cut, escaped and counted.
    #[test]
    fn error_names_are_cut_and_escaped() {
        let secret = format!("AWS_SECRET_ACCESS_KEY={}\0PATH=/bin", "s".repeat(40));
        let text = quoted_names([secret.as_str(), "text"].into_iter());
        assert!(!text.contains(&"s".repeat(33)), "{text}");
        assert!(text.contains("`text`") && text.contains('…'), "{text}");
        let many: Vec<String> = (0..20).map(|i| format!("c{i}")).collect();
        let text = quoted_names(many.iter().map(String::as_str));
        assert!(text.ends_with("… (12 more)"), "{text}");
        assert!(!quoted_names(["a\nb"].into_iter()).contains('\n'));
    }
}
