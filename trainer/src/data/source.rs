//! Reading a labelled text dataset from CSV, TSV or JSONL, resolving its
//! labels against a label map, and deduplicating it.
//!
//! The pipeline for every format is the same:
//!
//! 1. read the rows (CSV with a real CSV parser, so quoted fields may span
//!    lines; TSV as tab-separated values with a header line, no quoting,
//!    LF or CRLF; JSONL as one JSON object per line);
//! 2. take the text field (trimmed; empty text is an error) and the label
//!    field (trimmed; in JSONL a string or an integer, in CSV/TSV always a
//!    string, so `1` and `"1"` are the same label);
//! 3. map the raw label through `labelAliases` (e.g. `"1" -> "spam"`), then
//!    look it up in `labels` (the ordered class names: the index in that list
//!    is the class id every client uses);
//! 4. drop rows whose normalised text (trimmed, whitespace runs collapsed to
//!    one space) was already seen: the first occurrence wins, and a
//!    duplicate whose label differs from the kept one is counted as a label
//!    conflict.
//!
//! Errors name the file, the line (the line on which the record starts)
//! and the field.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::readers::{quoted_names, read_delimited, read_jsonl, Fields, RawRecord};
use crate::error::{Error, Result};

/// File format of a dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    /// Comma-separated values with a header line; RFC 4180 quoting (quoted
    /// fields may contain commas, quotes and line breaks).
    Csv,
    /// Tab-separated values with a header line; no quoting; LF or CRLF.
    Tsv,
    /// One JSON object per line.
    Jsonl,
}

impl DataFormat {
    /// Infers the format from a file name's extension: `.csv`; `.tsv` or
    /// `.tab`; `.jsonl` or `.ndjson`. Anything else (including `.txt`,
    /// which is ambiguous) is `None`: set `format` explicitly.
    pub fn from_path(path: &Path) -> Option<DataFormat> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "csv" => Some(DataFormat::Csv),
            "tsv" | "tab" => Some(DataFormat::Tsv),
            "jsonl" | "ndjson" => Some(DataFormat::Jsonl),
            _ => None,
        }
    }
}

fn default_text_field() -> String {
    "text".to_string()
}

fn default_label_field() -> String {
    "label".to_string()
}

/// Where a dataset is and how to read it (part of the job configuration).
///
/// ```json
/// {"uri": "file:///data/sms-spam.csv", "textField": "text", "labelField": "spam",
///  "labels": ["ham", "spam"], "labelAliases": {"0": "ham", "1": "spam"}}
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DatasetConfig {
    /// Local path, optionally with a `file://` prefix. (`s3://` URIs are
    /// staged to a local path before the trainer runs; the trainer itself
    /// rejects them with an error.)
    pub uri: String,
    /// File format; inferred from the extension when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<DataFormat>,
    /// Column (CSV/TSV header) or key (JSONL) holding the text. Default `text`.
    #[serde(default = "default_text_field")]
    pub text_field: String,
    /// Column or key holding the label. Default `label`.
    #[serde(default = "default_label_field")]
    pub label_field: String,
    /// The ordered class names (the label map: class id = index). When
    /// absent, the sorted set of labels found in the file is used (numeric
    /// order when every label is an integer); give the list explicitly in a
    /// federation, since every client must agree on the class ids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Vec<String>>,
    /// Maps raw label values to class names (e.g. `"1" -> "spam"`), applied
    /// before the lookup in `labels`. Raw values not in the map are used as
    /// they are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_aliases: Option<BTreeMap<String, String>>,
    /// Keep at most this many examples (the first ones, after
    /// deduplication, in file order); reading stops there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_examples: Option<usize>,
}

impl DatasetConfig {
    /// A configuration for `uri` with the default field names and nothing else set.
    pub fn new(uri: impl Into<String>) -> Self {
        DatasetConfig {
            uri: uri.into(),
            format: None,
            text_field: default_text_field(),
            label_field: default_label_field(),
            labels: None,
            label_aliases: None,
            max_examples: None,
        }
    }

    /// The local path this configuration points at (`file://` stripped).
    pub fn local_path(&self) -> Result<PathBuf> {
        resolve_uri(&self.uri)
    }

    /// The format: the explicit one, or the one inferred from the extension.
    pub fn resolved_format(&self) -> Result<DataFormat> {
        if let Some(format) = self.format {
            return Ok(format);
        }
        let path = self.local_path()?;
        DataFormat::from_path(&path).ok_or_else(|| {
            Error::config(
                "dataset.format",
                format!(
                    "cannot infer the format of `{}` from its extension; set `format` to \
                     `csv`, `tsv` or `jsonl`",
                    self.uri
                ),
            )
        })
    }

    /// Checks the parts of the configuration that do not need the file.
    pub fn validate(&self) -> Result<()> {
        self.local_path()?;
        self.resolved_format()?;
        if self.text_field.is_empty() {
            return Err(Error::config("dataset.textField", "must not be empty"));
        }
        if self.label_field.is_empty() {
            return Err(Error::config("dataset.labelField", "must not be empty"));
        }
        if self.text_field == self.label_field {
            return Err(Error::config(
                "dataset.labelField",
                format!(
                    "must differ from textField (both are `{}`)",
                    self.text_field
                ),
            ));
        }
        if self.max_examples == Some(0) {
            return Err(Error::config(
                "dataset.maxExamples",
                "must be at least 1 (omit it to keep every example)",
            ));
        }
        if let Some(labels) = &self.labels {
            if labels.is_empty() {
                return Err(Error::config(
                    "dataset.labels",
                    "must name at least one class (omit it to use the labels found in the file)",
                ));
            }
            let mut seen = BTreeSet::new();
            for name in labels {
                if name.trim().is_empty() {
                    return Err(Error::config("dataset.labels", "a class name is empty"));
                }
                if name.trim() != name {
                    return Err(Error::config(
                        "dataset.labels",
                        format!("class name `{name}` has leading or trailing whitespace"),
                    ));
                }
                if !seen.insert(name.as_str()) {
                    return Err(Error::config(
                        "dataset.labels",
                        format!("class `{name}` is listed twice"),
                    ));
                }
            }
            if let Some(aliases) = &self.label_aliases {
                for (raw, name) in aliases {
                    if !seen.contains(name.as_str()) {
                        return Err(Error::config(
                            "dataset.labelAliases",
                            format!(
                                "`{raw}` maps to `{name}`, which is not in labels [{}]",
                                labels.join(", ")
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Turns a dataset URI into a local path: plain paths and `file://` URIs
/// are accepted; `s3://` and other schemes are rejected with an error.
pub fn resolve_uri(uri: &str) -> Result<PathBuf> {
    if uri.trim().is_empty() {
        return Err(Error::config("dataset.uri", "must not be empty"));
    }
    if let Some(rest) = uri.strip_prefix("file://") {
        if rest.is_empty() {
            return Err(Error::config("dataset.uri", "`file://` without a path"));
        }
        return Ok(PathBuf::from(rest));
    }
    if uri.starts_with("s3://") {
        return Err(Error::data(
            uri,
            "s3:// URIs are not read by the trainer itself yet: stage the object to a local \
             path (or a file:// URI) first",
        ));
    }
    if let Some((scheme, _)) = uri.split_once("://") {
        return Err(Error::data(
            uri,
            format!("unsupported URI scheme `{scheme}://`: use a local path or file://"),
        ));
    }
    Ok(PathBuf::from(uri))
}

/// One labelled example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// The text, trimmed (inner whitespace as in the file).
    pub text: String,
    /// Class id: index into the dataset's label list.
    pub label: usize,
}

/// What loading a dataset found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadReport {
    /// Data rows read (header and blank lines not counted).
    pub rows: usize,
    /// Examples kept (after deduplication and `maxExamples`).
    pub examples: usize,
    /// Rows dropped because their normalised text was already seen
    /// (label conflicts included).
    pub duplicates: usize,
    /// Dropped duplicates whose label differed from the kept occurrence's.
    pub label_conflicts: usize,
    /// Kept examples per class name (every class listed, zeros included).
    pub per_label: BTreeMap<String, usize>,
    /// True when the label list was inferred from the file rather than given.
    pub labels_inferred: bool,
}

/// A loaded, deduplicated dataset.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// The file it came from.
    pub path: PathBuf,
    /// Class names; `Example::label` indexes this list.
    pub labels: Vec<String>,
    /// The examples, in file order (first occurrences).
    pub examples: Vec<Example>,
    /// Counts found while loading.
    pub report: LoadReport,
}

/// Normalised form of a text used as the deduplication key: trimmed, with
/// every run of whitespace collapsed to a single space.
pub fn normalize_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for word in text.split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(word);
    }
    out
}

/// Loads, label-maps and deduplicates the dataset `cfg` describes.
pub fn load(cfg: &DatasetConfig) -> Result<Dataset> {
    cfg.validate()?;
    let path = cfg.local_path()?;
    let format = cfg.resolved_format()?;
    let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);

    let mut builder = Builder::new(cfg, &path);
    let fields = Fields {
        text: &cfg.text_field,
        label: &cfg.label_field,
    };
    let mut push = |record: RawRecord| builder.push(record);
    match format {
        DataFormat::Csv => read_delimited(bytes, b',', true, &fields, &path, &mut push)?,
        DataFormat::Tsv => read_delimited(bytes, b'\t', false, &fields, &path, &mut push)?,
        DataFormat::Jsonl => read_jsonl(bytes, &fields, &path, &mut push)?,
    }
    builder.finish()
}

/// Collects rows, resolves labels and deduplicates as rows arrive.
struct Builder<'a> {
    cfg: &'a DatasetConfig,
    path: &'a Path,
    fixed: Option<HashMap<&'a str, usize>>,
    seen: HashMap<String, usize>,
    /// Kept rows: text and resolved class name.
    kept: Vec<(String, String)>,
    rows: usize,
    duplicates: usize,
    label_conflicts: usize,
}

impl<'a> Builder<'a> {
    fn new(cfg: &'a DatasetConfig, path: &'a Path) -> Self {
        let fixed = cfg.labels.as_ref().map(|labels| {
            labels
                .iter()
                .enumerate()
                .map(|(i, name)| (name.as_str(), i))
                .collect::<HashMap<_, _>>()
        });
        Builder {
            cfg,
            path,
            fixed,
            seen: HashMap::new(),
            kept: Vec::new(),
            rows: 0,
            duplicates: 0,
            label_conflicts: 0,
        }
    }

    fn full(&self) -> bool {
        self.cfg
            .max_examples
            .is_some_and(|max| self.kept.len() >= max)
    }

    /// Adds one row. Returns false once `maxExamples` is reached.
    fn push(&mut self, record: RawRecord) -> Result<bool> {
        self.rows += 1;
        let text = record.text.trim();
        if text.is_empty() {
            return Err(Error::data(
                self.path,
                format!(
                    "line {}: field `{}` is empty",
                    record.line, self.cfg.text_field
                ),
            ));
        }
        let raw = record.label.trim();
        if raw.is_empty() {
            return Err(Error::data(
                self.path,
                format!(
                    "line {}: field `{}` (the label) is empty",
                    record.line, self.cfg.label_field
                ),
            ));
        }
        let name = self
            .cfg
            .label_aliases
            .as_ref()
            .and_then(|aliases| aliases.get(raw))
            .map(String::as_str)
            .unwrap_or(raw);
        if let (Some(fixed), Some(labels)) = (&self.fixed, &self.cfg.labels) {
            if !fixed.contains_key(name) {
                // Both are file content: cut and escaped.
                let via = if name != raw {
                    format!(" ({} via labelAliases)", quoted_names(std::iter::once(raw)))
                } else {
                    String::new()
                };
                return Err(Error::data(
                    self.path,
                    format!(
                        "line {}: field `{}`: label {}{via} is not one of the allowed \
                         labels [{}]; add it to `labels` or map it with `labelAliases`",
                        record.line,
                        self.cfg.label_field,
                        quoted_names(std::iter::once(name)),
                        labels.join(", ")
                    ),
                ));
            }
        }
        let key = normalize_text(text);
        if let Some(&index) = self.seen.get(&key) {
            self.duplicates += 1;
            if self.kept[index].1 != name {
                self.label_conflicts += 1;
            }
            return Ok(true);
        }
        self.seen.insert(key, self.kept.len());
        self.kept.push((text.to_string(), name.to_string()));
        Ok(!self.full())
    }

    fn finish(self) -> Result<Dataset> {
        if self.kept.is_empty() {
            return Err(Error::data(
                self.path,
                "no examples: the file has no data rows",
            ));
        }
        let labels_inferred = self.cfg.labels.is_none();
        let labels: Vec<String> = match &self.cfg.labels {
            Some(labels) => labels.clone(),
            None => {
                let found: BTreeSet<&str> = self.kept.iter().map(|(_, l)| l.as_str()).collect();
                let mut found: Vec<String> = found.into_iter().map(str::to_string).collect();
                if found.iter().all(|l| l.parse::<i64>().is_ok()) {
                    found.sort_by_key(|l| l.parse::<i64>().unwrap_or(0));
                }
                tracing::warn!(
                    path = %self.path.display(),
                    labels = ?found,
                    "no `labels` list given: using the labels found in the file, sorted; give \
                     a fixed list so that every client agrees on the class ids"
                );
                found
            }
        };
        let index: HashMap<&str, usize> = labels
            .iter()
            .enumerate()
            .map(|(i, l)| (l.as_str(), i))
            .collect();
        let mut per_label: BTreeMap<String, usize> =
            labels.iter().map(|l| (l.clone(), 0)).collect();
        let mut examples = Vec::with_capacity(self.kept.len());
        for (text, name) in self.kept {
            // Every kept name is in `index`: checked on push (fixed list) or
            // taken from the kept rows (inferred list).
            let Some(&label) = index.get(name.as_str()) else {
                return Err(Error::data(self.path, format!("label `{name}` lost")));
            };
            *per_label.entry(name).or_default() += 1;
            examples.push(Example { text, label });
        }
        check_classes(self.path, self.cfg, &per_label)?;
        let report = LoadReport {
            rows: self.rows,
            examples: examples.len(),
            duplicates: self.duplicates,
            label_conflicts: self.label_conflicts,
            per_label,
            labels_inferred,
        };
        Ok(Dataset {
            path: self.path.to_path_buf(),
            labels,
            examples,
            report,
        })
    }
}

/// Refuses a dataset whose kept examples all carry one class: a one-class
/// task scores 1.000 whatever the model learns. Warns of listed classes
/// with no example (they cannot be learned).
fn check_classes(
    path: &Path,
    cfg: &DatasetConfig,
    per_label: &BTreeMap<String, usize>,
) -> Result<()> {
    let present: Vec<&str> = per_label
        .iter()
        .filter(|(_, &n)| n > 0)
        .map(|(l, _)| l.as_str())
        .collect();
    if let [only] = present.as_slice() {
        let cut = match cfg.max_examples {
            Some(n) => format!(" (only the first {n} unique examples are read: `maxExamples`)"),
            None => String::new(),
        };
        return Err(Error::data(
            path,
            format!(
                "every kept example has the label {}{cut}: a classifier needs examples of at \
                 least two classes (one class scores accuracy 1.000 whatever is learned); check \
                 `labelField` (`{}`), `labelAliases` and the file",
                // An inferred label is file content: cut and escaped.
                quoted_names(std::iter::once(*only)),
                cfg.label_field
            ),
        ));
    }
    let absent: Vec<&str> = per_label
        .iter()
        .filter(|(_, &n)| n == 0)
        .map(|(l, _)| l.as_str())
        .collect();
    if !absent.is_empty() {
        tracing::warn!(
            path = %path.display(),
            classes = ?absent,
            "these classes of `labels` have no example in the file: no client can learn them"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &tempfile::TempDir, name: &str, content: &str) -> String {
        let path = dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        path.to_str().unwrap().to_string()
    }

    #[test]
    fn csv_quoted_fields_span_lines() {
        let dir = tempfile::tempdir().unwrap();
        let uri = write(
            &dir,
            "sms.csv",
            ",spam,text\n0,0,\"Go until jurong, point\"\n1,1,\"Free entry\nline two \"\"quoted\"\"\"\n2,0,plain text\n",
        );
        let mut cfg = DatasetConfig::new(format!("file://{uri}"));
        cfg.label_field = "spam".into();
        cfg.labels = Some(vec!["ham".into(), "spam".into()]);
        cfg.label_aliases = Some(BTreeMap::from([
            ("0".to_string(), "ham".to_string()),
            ("1".to_string(), "spam".to_string()),
        ]));
        let ds = load(&cfg).unwrap();
        assert_eq!(ds.examples.len(), 3);
        assert_eq!(ds.examples[0].text, "Go until jurong, point");
        assert_eq!(ds.examples[1].text, "Free entry\nline two \"quoted\"");
        assert_eq!(ds.examples[1].label, 1);
        assert_eq!(ds.examples[2].label, 0);
        assert_eq!(ds.report.rows, 3);
        assert_eq!(ds.report.per_label["ham"], 2);
        assert!(!ds.report.labels_inferred);
    }

    #[test]
    fn csv_error_line_numbers_follow_multiline_records() {
        let dir = tempfile::tempdir().unwrap();
        let uri = write(
            &dir,
            "d.csv",
            "label,text\nham,\"two\nlines\"\nspam,\"  \"\n",
        );
        let mut cfg = DatasetConfig::new(uri);
        cfg.labels = Some(vec!["ham".into(), "spam".into()]);
        let err = load(&cfg).unwrap_err().to_string();
        assert!(err.contains("line 4"), "{err}");
        assert!(err.contains("`text` is empty"), "{err}");
    }

    #[test]
    fn tsv_with_crlf_and_bom() {
        let dir = tempfile::tempdir().unwrap();
        let uri = write(
            &dir,
            "tweets.tsv",
            "\u{feff}id\tsentiment\ttext\r\n1\t2.7\tSomehow \"blessed\"\r\n2\t-1.5\tbad day\r\n\r\n",
        );
        let mut cfg = DatasetConfig::new(uri);
        cfg.label_field = "sentiment".into();
        let ds = load(&cfg).unwrap();
        assert_eq!(ds.examples.len(), 2);
        assert_eq!(ds.examples[0].text, "Somehow \"blessed\"");
        assert_eq!(ds.labels, vec!["-1.5".to_string(), "2.7".to_string()]);
        assert_eq!(ds.examples[0].label, 1);
        assert!(ds.report.labels_inferred);
    }

    #[test]
    fn tsv_short_row_names_line_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let uri = write(&dir, "d.tsv", "label\ttext\r\na\tx\r\nb\r\n");
        let err = load(&DatasetConfig::new(uri)).unwrap_err().to_string();
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("field `text` missing"), "{err}");
    }

    #[test]
    fn jsonl_integer_and_string_labels() {
        let dir = tempfile::tempdir().unwrap();
        let uri = write(
            &dir,
            "d.jsonl",
            "{\"text\": \"a b\", \"label\": 1}\n\n{\"text\": \"c\", \"label\": \"0\"}\r\n{\"text\": \"d\", \"label\": 10}\n{\"text\": \"e\", \"label\": 2}\n",
        );
        let ds = load(&DatasetConfig::new(uri.clone())).unwrap();
        // Integer labels are their decimal strings; numeric order when all are integers.
        assert_eq!(ds.labels, vec!["0", "1", "2", "10"]);
        let labels: Vec<usize> = ds.examples.iter().map(|e| e.label).collect();
        assert_eq!(labels, vec![1, 0, 3, 2]);

        let mut cfg = DatasetConfig::new(uri);
        cfg.labels = Some(vec!["neg".into(), "pos".into(), "two".into(), "ten".into()]);
        cfg.label_aliases = Some(BTreeMap::from([
            ("0".to_string(), "neg".to_string()),
            ("1".to_string(), "pos".to_string()),
            ("2".to_string(), "two".to_string()),
            ("10".to_string(), "ten".to_string()),
        ]));
        let ds = load(&cfg).unwrap();
        let labels: Vec<usize> = ds.examples.iter().map(|e| e.label).collect();
        assert_eq!(labels, vec![1, 0, 3, 2]);
    }

    #[test]
    fn jsonl_errors_name_line_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let uri = write(
            &dir,
            "d.jsonl",
            "{\"text\":\"a\",\"label\":\"x\"}\n{\"txt\":\"b\",\"label\":\"x\"}\n",
        );
        let err = load(&DatasetConfig::new(uri)).unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
        assert!(err.contains("field `text` missing"), "{err}");
        assert!(err.contains("`txt`"), "{err}");

        let uri = write(&dir, "e.jsonl", "{\"text\":\"a\",\"label\":1.5}\n");
        let err = load(&DatasetConfig::new(uri)).unwrap_err().to_string();
        assert!(
            err.contains("line 1") && err.contains("non-integer"),
            "{err}"
        );

        let uri = write(
            &dir,
            "f.jsonl",
            "{\"text\":\"a\",\"label\":\"x\"}\nnot json\n",
        );
        let err = load(&DatasetConfig::new(uri)).unwrap_err().to_string();
        assert!(err.contains("line 2: invalid JSON"), "{err}");
    }

    #[test]
    fn missing_column_lists_available_columns() {
        let dir = tempfile::tempdir().unwrap();
        let uri = write(&dir, "d.csv", ",spam,text\n0,1,hello\n");
        let err = load(&DatasetConfig::new(uri)).unwrap_err().to_string();
        assert!(err.contains("d.csv"), "{err}");
        assert!(err.contains("no column `label`"), "{err}");
        assert!(err.contains("``, `spam`, `text`"), "{err}");
    }

    #[test]
    fn unknown_label_names_value_line_and_allowed_labels() {
        let dir = tempfile::tempdir().unwrap();
        let uri = write(&dir, "d.csv", "text,label\nhello,ham\nworld,eggs\n");
        let mut cfg = DatasetConfig::new(uri);
        cfg.labels = Some(vec!["ham".into(), "spam".into()]);
        let err = load(&cfg).unwrap_err().to_string();
        assert!(err.contains("d.csv"), "{err}");
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("field `label`"), "{err}");
        assert!(err.contains("`eggs`"), "{err}");
        assert!(err.contains("[ham, spam]"), "{err}");
    }

    #[test]
    fn alias_to_unlisted_label_is_a_config_error() {
        let mut cfg = DatasetConfig::new("x.csv");
        cfg.labels = Some(vec!["ham".into()]);
        cfg.label_aliases = Some(BTreeMap::from([("1".to_string(), "spam".to_string())]));
        let err = cfg.validate().unwrap_err().to_string();
        assert!(
            err.contains("labelAliases") && err.contains("`spam`"),
            "{err}"
        );
    }

    #[test]
    fn dedupe_counts_duplicates_and_conflicts() {
        let dir = tempfile::tempdir().unwrap();
        let uri = write(
            &dir,
            "d.jsonl",
            concat!(
                "{\"text\":\"Hello   world\",\"label\":\"a\"}\n",
                "{\"text\":\" Hello world \",\"label\":\"a\"}\n",
                "{\"text\":\"Hello\\tworld\",\"label\":\"b\"}\n",
                "{\"text\":\"hello world\",\"label\":\"b\"}\n",
                "{\"text\":\"other\",\"label\":\"b\"}\n",
                "{\"text\":\"other\",\"label\":\"b\"}\n",
            ),
        );
        let ds = load(&DatasetConfig::new(uri)).unwrap();
        assert_eq!(ds.report.rows, 6);
        assert_eq!(ds.report.examples, 3);
        assert_eq!(ds.report.duplicates, 3);
        assert_eq!(ds.report.label_conflicts, 1);
        assert_eq!(ds.examples[0].text, "Hello   world"); // first occurrence kept as written
        assert_eq!(ds.examples[0].label, 0);
        assert_eq!(ds.report.per_label["a"], 1);
        assert_eq!(ds.report.per_label["b"], 2);
    }

    #[test]
    fn a_file_with_one_class_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let uri = write(&dir, "d.csv", "text,label\na,x\nb,x\nc,x\n");
        // Inferred labels, and a fixed list whose other class never occurs.
        let inferred = load(&DatasetConfig::new(uri.clone()))
            .unwrap_err()
            .to_string();
        let mut cfg = DatasetConfig::new(uri.clone());
        cfg.labels = Some(vec!["x".into(), "y".into()]);
        let listed = load(&cfg).unwrap_err().to_string();
        for err in [&inferred, &listed] {
            assert!(
                err.contains("label `x`")
                    && err.contains("at least two classes")
                    && err.contains("d.csv"),
                "{err}"
            );
            assert!(!err.contains("maxExamples"), "{err}");
        }
        // Cut to one class by maxExamples: the message says so.
        let uri = write(&dir, "e.csv", "text,label\na,x\nb,x\nc,y\n");
        let mut cfg = DatasetConfig::new(uri);
        cfg.max_examples = Some(2);
        let err = load(&cfg).unwrap_err().to_string();
        assert!(
            err.contains("first 2 unique examples") && err.contains("maxExamples"),
            "{err}"
        );
        // Two classes present and a third listed but absent: loads (with a warning).
        let mut cfg = DatasetConfig::new(write(&dir, "f.csv", "text,label\na,x\nb,y\n"));
        cfg.labels = Some(vec!["x".into(), "y".into(), "z".into()]);
        assert_eq!(load(&cfg).unwrap().report.per_label["z"], 0);
    }

    #[test]
    fn a_label_outside_the_list_is_cut_and_escaped_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        // A wrong labelField can point at a column of secrets: the error
        // must not carry the value whole.
        let secret = format!("AWS_SECRET_ACCESS_KEY={}\u{7}", "k".repeat(60));
        let uri = write(&dir, "d.csv", &format!("text,label\na,x\nb,{secret}\n"));
        let mut cfg = DatasetConfig::new(uri);
        cfg.labels = Some(vec!["x".into(), "y".into()]);
        let err = load(&cfg).unwrap_err().to_string();
        assert!(
            err.contains("is not one of the allowed labels [x, y]"),
            "{err}"
        );
        assert!(err.contains("`AWS_SECRET_ACCESS_KEY=kkkkkkkkkk…`"), "{err}");
        assert!(
            !err.contains(&"k".repeat(20)) && !err.contains('\u{7}'),
            "{err}"
        );
    }

    #[test]
    fn max_examples_stops_after_unique_examples() {
        let dir = tempfile::tempdir().unwrap();
        let uri = write(&dir, "d.csv", "text,label\na,x\na,x\nb,y\nc,x\n");
        let mut cfg = DatasetConfig::new(uri);
        cfg.max_examples = Some(2);
        let ds = load(&cfg).unwrap();
        assert_eq!(ds.examples.len(), 2);
        assert_eq!(ds.report.rows, 3);
        assert_eq!(ds.report.duplicates, 1);
    }

    #[test]
    fn uris_and_formats() {
        assert_eq!(
            resolve_uri("file:///a/b.csv").unwrap(),
            PathBuf::from("/a/b.csv")
        );
        assert_eq!(
            resolve_uri("rel/b.csv").unwrap(),
            PathBuf::from("rel/b.csv")
        );
        let err = resolve_uri("s3://bucket/key.csv").unwrap_err().to_string();
        assert!(err.contains("s3://"), "{err}");
        assert!(resolve_uri("http://x/y").is_err());
        let err = DatasetConfig::new("a/b.txt")
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("dataset.format"), "{err}");
        let mut cfg = DatasetConfig::new("a/b.txt");
        cfg.format = Some(DataFormat::Tsv);
        cfg.validate().unwrap();
        let err = load(&DatasetConfig::new("/nonexistent/x.csv"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/x.csv"), "{err}");
    }

    #[test]
    fn config_serde_is_camel_case() {
        let cfg: DatasetConfig = serde_json::from_str(
            r#"{"uri":"d.txt","format":"tsv","textField":"text","labelField":"sentiment",
                "labels":["neg","pos"],"labelAliases":{"-1":"neg","1":"pos"},"maxExamples":10}"#,
        )
        .unwrap();
        assert_eq!(cfg.format, Some(DataFormat::Tsv));
        assert_eq!(cfg.label_aliases.as_ref().unwrap()["-1"], "neg");
        assert_eq!(cfg.max_examples, Some(10));
        let back = serde_json::to_value(&cfg).unwrap();
        assert_eq!(back["labelField"], "sentiment");
        let minimal: DatasetConfig = serde_json::from_str(r#"{"uri":"d.csv"}"#).unwrap();
        assert_eq!(minimal, DatasetConfig::new("d.csv"));
        assert!(serde_json::from_str::<DatasetConfig>(r#"{"uri":"d.csv","lables":[]}"#).is_err());
    }

    /// The real TREC file made by the setup script, when present.
    #[test]
    fn real_trec_counts() {
        let Ok(cache) = std::env::var("HETEROTUNE_CACHE") else {
            eprintln!("HETEROTUNE_CACHE not set: skipping");
            return;
        };
        let path = Path::new(&cache).join("data/trec/trec.jsonl");
        if !path.exists() {
            eprintln!("{} not found: skipping", path.display());
            return;
        }
        let mut cfg = DatasetConfig::new(path.to_str().unwrap());
        cfg.labels = Some(
            ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
                .map(String::from)
                .to_vec(),
        );
        let ds = load(&cfg).unwrap();
        assert_eq!(ds.report.rows, 15_452);
        // 5,382 distinct (fine label, text) lines, but one question ("What is the
        // chromosome number of an elephant ?") appears as both NUM:count and
        // NUM:other: deduplicating by text leaves 5,381 and NUM 858.
        assert_eq!(ds.report.examples, 5_381);
        assert_eq!(ds.report.label_conflicts, 0);
        let expected = [
            ("ABBR", 86),
            ("DESC", 1153),
            ("ENTY", 1245),
            ("HUM", 1215),
            ("LOC", 824),
            ("NUM", 858),
        ];
        for (name, count) in expected {
            assert_eq!(ds.report.per_label[name], count, "{name}");
        }
    }
}
