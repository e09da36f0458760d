//! Where `heterotune validate -f` reads FederatedTune documents from, as
//! kubectl does: `-f` repeated, a file, a folder (its `.yaml`, `.yml` and
//! `.json` files, sorted, not recursive) or `-` for standard input; a
//! multi-document YAML stream gives one document per `---` line.

use std::io::Read;
use std::path::{Path, PathBuf};

use heterotune_crds::bounded::{read_stream, read_text, MAX_SPEC_BYTES};

/// One document to validate, with the name errors give it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    /// `file.yaml`, `file.yaml (document 2, line 14)`, `<stdin>`.
    pub source: String,
    /// Its text (lines numbered from the document's first line).
    pub text: String,
}

/// A source that could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read {source_name}: {error}")]
pub struct ReadError {
    /// The path (or `<stdin>`).
    pub source_name: String,
    /// Why.
    #[source]
    pub error: std::io::Error,
}

fn read_error(source_name: &Path, error: std::io::Error) -> ReadError {
    ReadError {
        source_name: source_name.display().to_string(),
        error,
    }
}

/// Every document of `args` in order, reading `-` from `stdin`; a folder
/// with no spec file is an error (a typo should not pass as "all valid").
pub fn documents(args: &[PathBuf], mut stdin: impl Read) -> Result<Vec<Document>, ReadError> {
    let mut out = Vec::new();
    for arg in args {
        if arg.as_os_str() == "-" {
            let text = read_stream(&mut stdin, MAX_SPEC_BYTES)
                .map_err(|e| read_error(Path::new("<stdin>"), e))?;
            out.extend(split("<stdin>", &text));
        } else if arg.is_dir() {
            let files = spec_files(arg)?;
            if files.is_empty() {
                return Err(read_error(
                    arg,
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "the folder holds no .yaml, .yml or .json file",
                    ),
                ));
            }
            for file in files {
                let text = read_text(&file, MAX_SPEC_BYTES).map_err(|e| read_error(&file, e))?;
                out.extend(split(&file.display().to_string(), &text));
            }
        } else {
            let text = read_text(arg, MAX_SPEC_BYTES).map_err(|e| read_error(arg, e))?;
            out.extend(split(&arg.display().to_string(), &text));
        }
    }
    Ok(out)
}

/// The spec files of a folder, sorted.
fn spec_files(dir: &Path) -> Result<Vec<PathBuf>, ReadError> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| read_error(dir, e))? {
        let path = entry.map_err(|e| read_error(dir, e))?.path();
        let spec_like = matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        );
        if spec_like && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// The documents of one stream: split at lines that are `---` (optionally
/// followed by a space and a comment), empty ones dropped. A single
/// document keeps the plain source name.
fn split(source: &str, text: &str) -> Vec<Document> {
    let mut docs: Vec<(usize, String)> = vec![(1, String::new())];
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_end();
        if trimmed == "---" || trimmed.starts_with("--- ") {
            docs.push((i + 2, String::new()));
        } else if let Some((_, doc)) = docs.last_mut() {
            doc.push_str(line);
            doc.push('\n');
        }
    }
    let docs: Vec<(usize, String)> = docs
        .into_iter()
        .filter(|(_, d)| {
            d.lines()
                .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        })
        .collect();
    let many = docs.len() > 1;
    docs.into_iter()
        .enumerate()
        .map(|(n, (line, text))| Document {
            source: if many {
                format!("{source} (document {}, line {line})", n + 1)
            } else {
                source.to_string()
            },
            text,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_splits_at_document_markers() {
        let docs = split(
            "a.yaml",
            "# head\n---\nkind: A\n---   \nkind: B\n--- # c\n\n",
        );
        assert_eq!(
            docs,
            vec![
                Document {
                    source: "a.yaml (document 1, line 3)".into(),
                    text: "kind: A\n".into()
                },
                Document {
                    source: "a.yaml (document 2, line 5)".into(),
                    text: "kind: B\n".into()
                },
            ]
        );
        let one = split("b.yaml", "kind: A\n");
        assert_eq!(one[0].source, "b.yaml");
        assert!(split("c.yaml", "\n# only a comment\n").is_empty());
    }

    #[test]
    fn files_folders_and_stdin() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(dir.path().join("b.yaml"), "kind: B\n").expect("write");
        std::fs::write(dir.path().join("a.yml"), "kind: A\n---\nkind: A2\n").expect("write");
        std::fs::write(dir.path().join("notes.txt"), "not a spec").expect("write");
        let args = [dir.path().to_path_buf(), PathBuf::from("-")];
        let docs = documents(&args, "kind: S\n".as_bytes()).expect("documents");
        let texts: Vec<&str> = docs.iter().map(|d| d.text.as_str()).collect();
        assert_eq!(texts, ["kind: A\n", "kind: A2\n", "kind: B\n", "kind: S\n"]);
        assert_eq!(docs[3].source, "<stdin>");
        let empty = tempfile::tempdir().expect("dir");
        let err = documents(&[empty.path().to_path_buf()], std::io::empty()).expect_err("empty");
        assert!(err.to_string().contains("no .yaml"), "{err}");
        let err =
            documents(&[PathBuf::from("no/such.yaml")], std::io::empty()).expect_err("missing");
        assert!(
            err.to_string().starts_with("cannot read no/such.yaml"),
            "{err}"
        );
    }
}
