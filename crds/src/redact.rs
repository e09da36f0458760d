//! Credentials taken out of text that leaves a process: a trainer's log
//! lines (a pod's log, the runner's console and errors) and a failed pod's
//! termination message (a FederatedTune's status and Events).
//!
//! The trainer never holds the store's credentials, and the aggregation
//! never prints them; this is the second line: whatever a child process
//! prints, a value that follows a credential-like name (`AWS_SECRET_ACCESS_KEY=…`,
//! `"token": "…"`, `password: …`) or sits in a URL's user information
//! (`https://user:…@host`) is replaced by `<redacted>` before it is logged,
//! kept or published.

use std::borrow::Cow;
use std::sync::LazyLock;

use regex::Regex;

/// What replaces a credential's value.
pub const REDACTED: &str = "<redacted>";

/// A credential-like name (a keyword, optionally ending in `_KEY`, `_ID`,
/// `Token`, ...: `tokenizer` is not one), its separator (`=` or `:`, quotes and spaces
/// around it) and the value up to the next space, quote or separator.
static NAMED: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r#"(?i)([a-z0-9_.-]*?(?:secret|token|passw(?:or)?d|access[_-]?key|api[_-]?key|private[_-]?key|session[_-]?token|credentials?)(?:[_.-]?(?:key|id|token|value|string))*\b)(["']?\s*[:=]\s*["']?)([^\s"'`,;|&()\[\]{}<>]+)"#,
    )
    .expect("a valid pattern")
});

/// A URL's password: `scheme://user:password@`.
static USERINFO: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)([a-z][a-z0-9+.-]*://[^\s/@:]*:)([^\s/@]+)@").expect("a valid pattern")
});

/// `text` with every credential value replaced by [`REDACTED`] (borrowed
/// when there is none).
pub fn credentials(text: &str) -> Cow<'_, str> {
    let named = NAMED.replace_all(text, format!("${{1}}${{2}}{REDACTED}"));
    match USERINFO.replace_all(&named, format!("${{1}}{REDACTED}@")) {
        Cow::Borrowed(_) => named,
        Cow::Owned(s) => Cow::Owned(s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_after_credential_names_are_redacted() {
        let cases = [
            (
                "env: AWS_SECRET_ACCESS_KEY=htcanary-9c41 AWS_ACCESS_KEY_ID=AKIA7F3A HOME=/root",
                "env: AWS_SECRET_ACCESS_KEY=<redacted> AWS_ACCESS_KEY_ID=<redacted> HOME=/root",
            ),
            (
                r#"{"secretKey": "abc/def+ghi", "region": "us-east-1"}"#,
                r#"{"secretKey": "<redacted>", "region": "us-east-1"}"#,
            ),
            ("password: hunter2", "password: <redacted>"),
            // names that only contain a keyword are not credentials
            (
                "tokenizer: cannot read tokenizer.json; maxTokens=512",
                "tokenizer: cannot read tokenizer.json; maxTokens=512",
            ),
            (
                "AWS_SESSION_TOKEN = tok.en.value",
                "AWS_SESSION_TOKEN = <redacted>",
            ),
            (
                "available columns: `X=1`, `api_key=zzz`",
                "available columns: `X=1`, `api_key=<redacted>`",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(credentials(input), want, "{input}");
        }
    }

    #[test]
    fn passwords_in_urls_are_redacted_and_the_rest_kept() {
        assert_eq!(
            credentials("GET https://minio:s3cr3t@store.local:9000/bucket failed"),
            "GET https://minio:<redacted>@store.local:9000/bucket failed"
        );
        assert_eq!(
            credentials("s3://artifacts/runs/default/trec-0f1e2d3c"),
            "s3://artifacts/runs/default/trec-0f1e2d3c"
        );
    }

    #[test]
    fn text_without_credentials_is_borrowed_unchanged() {
        let text = "Error: spec.task.dataset.uri: /data/x.csv: no such file";
        assert!(matches!(credentials(text), Cow::Borrowed(t) if t == text));
    }
}
