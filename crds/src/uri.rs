//! Resolution of the URIs a spec uses for models and datasets.
//!
//! * `cache://REL` → `$HETEROTUNE_CACHE/REL` (default `~/.cache/heterotune`),
//!   the cache that `scripts/setup.sh` fills;
//! * `file:///abs`, `file://rel` and `/abs` → a local path;
//! * `s3://bucket/key` → an object in an S3-compatible store.

use std::path::{Path, PathBuf};

/// Environment variable naming the model/data cache.
pub const CACHE_ENV: &str = "HETEROTUNE_CACHE";

/// Environment variable naming a JSON file `{"s3://…": "/local/path"}`: the
/// `s3://` model and dataset URIs that `heterotune job` staged to local
/// paths before starting the trainer (the spec keeps the original URIs, so
/// family keys and manifests do not change).
pub const STAGED_ENV: &str = "HETEROTUNE_STAGED";

/// A parsed location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A local file or directory.
    Local(PathBuf),
    /// An object (or prefix) in an S3-compatible store.
    S3 { bucket: String, key: String },
}

/// Why a URI could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UriError {
    #[error("unsupported URI {0:?}: use cache://, file://, an absolute path, or s3://bucket/key")]
    Unsupported(String),
    #[error("{0:?} has no bucket: use s3://bucket/key")]
    NoBucket(String),
    #[error("cannot resolve {0:?}: neither HETEROTUNE_CACHE nor HOME is set")]
    NoCache(String),
    #[error("{file} (named by HETEROTUNE_STAGED): {message}")]
    Staged { file: String, message: String },
    #[error("{0:?} has a '..' component: name the file or folder itself (a cache:// URI stays inside the cache)")]
    ParentComponent(String),
    #[error("{uri:?} points into {root}, which holds the system's and processes' state, not models or data")]
    SystemPath { uri: String, root: &'static str },
}

/// Folders a model or dataset URI may never name: they hold process and
/// kernel state (a process's environment, with the store's credentials).
const SYSTEM_ROOTS: &[&str] = &["/proc", "/sys", "/dev"];

/// Refuses a local path with a `..` component or inside [`SYSTEM_ROOTS`]
/// (also through a symbolic link, when the path exists).
fn confined(uri: &str, path: PathBuf) -> Result<Location, UriError> {
    if path
        .components()
        .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(UriError::ParentComponent(uri.to_string()));
    }
    let real = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
    for candidate in [&path, &real] {
        if let Some(root) = SYSTEM_ROOTS.iter().find(|r| candidate.starts_with(r)) {
            return Err(UriError::SystemPath {
                uri: uri.to_string(),
                root,
            });
        }
    }
    Ok(Location::Local(path))
}

/// The cache root: `$HETEROTUNE_CACHE`, else `$HOME/.cache/heterotune`.
pub fn cache_root() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os(CACHE_ENV).filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(dir));
    }
    std::env::var_os("HOME").map(|home| Path::new(&home).join(".cache").join("heterotune"))
}

/// `text` with every character other than ASCII letters, digits, `-`, `_`
/// and `.` replaced by `_`: safe as a file name and in object keys.
pub fn file_safe(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The canonical form of a URI as a staging key (no trailing `/`).
pub fn staging_key(uri: &str) -> &str {
    uri.trim_end_matches('/')
}

/// The local copy of `uri` listed in the [`STAGED_ENV`] file, if that
/// variable is set and lists it.
pub fn staged_path(uri: &str) -> Result<Option<PathBuf>, UriError> {
    let Some(file) = std::env::var_os(STAGED_ENV).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    let file = PathBuf::from(file);
    let err = |message: String| UriError::Staged {
        file: file.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(&file).map_err(|e| err(format!("cannot read: {e}")))?;
    let map: std::collections::BTreeMap<String, PathBuf> = serde_json::from_str(&text)
        .map_err(|e| err(format!("not a JSON object of URI to path: {e}")))?;
    Ok(map.get(staging_key(uri)).cloned())
}

/// Resolves `uri` to a [`Location`].
pub fn resolve(uri: &str) -> Result<Location, UriError> {
    if let Some(rest) = uri.strip_prefix("cache://") {
        let root = cache_root().ok_or_else(|| UriError::NoCache(uri.to_string()))?;
        confined(uri, root.join(rest.trim_start_matches('/')))
    } else if let Some(rest) = uri.strip_prefix("file://") {
        confined(uri, PathBuf::from(rest))
    } else if let Some(rest) = uri.strip_prefix("s3://") {
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(UriError::NoBucket(uri.to_string()));
        }
        Ok(Location::S3 {
            bucket: bucket.to_string(),
            key: key.trim_matches('/').to_string(),
        })
    } else if uri.starts_with('/') {
        confined(uri, PathBuf::from(uri))
    } else {
        Err(UriError::Unsupported(uri.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_each_scheme() {
        assert_eq!(
            resolve("file:///data/x.csv"),
            Ok(Location::Local("/data/x.csv".into()))
        );
        assert_eq!(resolve("file://runs"), Ok(Location::Local("runs".into())));
        assert_eq!(resolve("/abs/dir"), Ok(Location::Local("/abs/dir".into())));
        assert_eq!(
            resolve("s3://bucket/a/b/"),
            Ok(Location::S3 {
                bucket: "bucket".into(),
                key: "a/b".into()
            })
        );
        assert_eq!(
            resolve("s3:///x"),
            Err(UriError::NoBucket("s3:///x".into()))
        );
        assert!(matches!(resolve("http://x"), Err(UriError::Unsupported(_))));
        match resolve("cache://models/m") {
            Ok(Location::Local(p)) => assert!(p.ends_with("models/m")),
            other => panic!("{other:?}"),
        }
    }

    /// A spec cannot name a file outside the cache through cache://, nor
    /// the kernel's and processes' state (a process's environment holds
    /// the store's credentials), directly or through a link.
    #[test]
    fn paths_stay_out_of_system_state_and_inside_the_cache() {
        for uri in [
            "cache://../../../etc/passwd",
            "cache://models/../../x",
            "/data/../etc/passwd",
            "file://a/../../b",
        ] {
            assert_eq!(
                resolve(uri),
                Err(UriError::ParentComponent(uri.into())),
                "{uri}"
            );
        }
        for uri in ["/proc/self/environ", "file:///sys/kernel", "/dev/zero"] {
            assert!(
                matches!(resolve(uri), Err(UriError::SystemPath { .. })),
                "{uri}"
            );
        }
        let dir = tempfile::tempdir().expect("dir");
        let link = dir.path().join("environ.csv");
        std::os::unix::fs::symlink("/proc/self/environ", &link).expect("link");
        let err = resolve(&link.display().to_string()).expect_err("through a link");
        assert!(err.to_string().contains("/proc"), "{err}");
    }
}
