//! `-o json|yaml|table`: one output format for `validate`, `plan` and
//! `status`. JSON and YAML print the command's serialisable report on
//! stdout (one document); `table` prints its human text.

use serde::Serialize;

/// What `-o` selects.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Human text: aligned tables and lines (`text` is an alias).
    #[default]
    #[value(alias = "text")]
    Table,
    /// One JSON document on stdout.
    Json,
    /// One YAML document on stdout.
    Yaml,
}

/// A report that could not be serialised (a bug: reports are plain data).
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// JSON serialisation failed.
    #[error("cannot write the output as JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// YAML serialisation failed.
    #[error("cannot write the output as YAML: {0}")]
    Yaml(#[from] serde_saphyr::ser::Error),
}

/// `value` as `format` says, ending in a newline; `table` calls `text`.
pub fn render<T: Serialize>(
    format: Output,
    value: &T,
    text: impl FnOnce(&T) -> String,
) -> Result<String, OutputError> {
    Ok(match format {
        Output::Table => text(value),
        Output::Json => format!("{}\n", serde_json::to_string_pretty(value)?),
        Output::Yaml => {
            let yaml = serde_saphyr::to_string(value)?;
            if yaml.ends_with('\n') {
                yaml
            } else {
                format!("{yaml}\n")
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, serde::Deserialize, Debug, PartialEq)]
    #[serde(rename_all = "camelCase")]
    struct Sample {
        run_name: String,
        rounds: u32,
        accuracy: Option<f64>,
    }

    #[test]
    fn every_format_round_trips_and_table_is_the_text() {
        let s = Sample {
            run_name: "ft1".into(),
            rounds: 3,
            accuracy: Some(0.5),
        };
        let json = render(Output::Json, &s, |_| unreachable!()).expect("json");
        assert_eq!(serde_json::from_str::<Sample>(&json).expect("parse"), s);
        assert!(json.contains("\"runName\": \"ft1\""), "{json}");
        let yaml = render(Output::Yaml, &s, |_| unreachable!()).expect("yaml");
        assert_eq!(serde_saphyr::from_str::<Sample>(&yaml).expect("parse"), s);
        assert!(yaml.ends_with('\n'));
        let table = render(Output::Table, &s, |s| {
            format!("{} {}\n", s.run_name, s.rounds)
        });
        assert_eq!(table.expect("text"), "ft1 3\n");
    }
}
