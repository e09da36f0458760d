//! The object store of the round protocol: a local folder or an
//! S3-compatible bucket, through the `object_store` crate.
//!
//! Writers upload data first and the manifest last (the commit marker);
//! readers treat an artifact as present only when its manifest is. Transient
//! errors are retried with exponential backoff (with jitter, at most 10 s
//! apart) for up to [`RETRY_BUDGET`] (`HETEROTUNE_STORE_RETRY_SECONDS`), so
//! a store that restarts or drops off the network for a while stalls a run
//! instead of failing it. Error messages name the store by its URI and never
//! include credentials.
//!
//! Reads are bounded: [`Store::get`] refuses a record larger than
//! [`MAX_RECORD_BYTES`] from the object's size before reading its body (and
//! stops a body that runs past what the server announced), and downloads
//! stream to disk, never whole into memory, stopping one byte past a
//! caller's limit ([`Store::download_limited`]) so that verification
//! rejects the object as too large.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use heterotune_crds::layout::{RunLayout, MAX_RECORD_BYTES};
use heterotune_crds::spec::StorageSpec;
use object_store::path::Path as ObjectPath;
use object_store::{GetResult, ObjectStore, ObjectStoreExt, PutMode, PutPayload};
use tokio::io::AsyncWriteExt;

/// Environment variables read for S3 credentials (a Secret mounted as env in
/// a cluster; the user's environment locally).
pub const ACCESS_KEY_ENV: &str = "AWS_ACCESS_KEY_ID";
/// See [`ACCESS_KEY_ENV`].
pub const SECRET_KEY_ENV: &str = "AWS_SECRET_ACCESS_KEY";

/// Store errors. The URI is the store's, without credentials.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The storage URI or settings are unusable.
    #[error("storage {uri}: {message}")]
    Config { uri: String, message: String },
    /// An operation failed after its retries. The message carries the
    /// store's error whole (its own causes included), so the error is not
    /// also its `source`: a printed chain would say it all twice.
    #[error("storage {uri}: {op} {key}: {error}")]
    Operation {
        uri: String,
        op: &'static str,
        key: String,
        error: Box<object_store::Error>,
    },
    /// An object is larger than a reader takes.
    #[error("storage {uri}: {key} holds {size} bytes, more than the {limit} a reader takes: it was not written by HeteroTune (remove or replace it)")]
    TooLarge {
        uri: String,
        key: String,
        size: u64,
        limit: u64,
    },
    /// A local file could not be read or written while staging.
    #[error("{path}: {source}")]
    Local {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl StoreError {
    /// True when the object does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::Operation { error, .. } if matches!(**error, object_store::Error::NotFound { .. }))
    }

    /// True when the store refused the credentials (403/401): an answer
    /// about the key's rights, not a passing failure.
    pub fn is_permission_denied(&self) -> bool {
        matches!(self, StoreError::Operation { error, .. } if matches!(
            **error,
            object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. }
        ))
    }

    /// True when a create-only write found the object already there.
    pub fn is_already_exists(&self) -> bool {
        matches!(self, StoreError::Operation { error, .. } if matches!(**error, object_store::Error::AlreadyExists { .. }))
    }

    /// Label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            StoreError::Config { .. } => "store_config",
            StoreError::Operation { .. } => "store_operation",
            StoreError::TooLarge { .. } => "store_too_large",
            StoreError::Local { .. } => "store_local_io",
        }
    }
}

/// How a bounded read ended.
enum Read {
    /// The whole body: this many bytes.
    Whole(u64),
    /// The object holds more than the limit: its size (announced, or at
    /// least the bytes that came).
    TooLarge(u64),
}

/// An object store plus the key prefix of the storage URI.
#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    prefix: String,
    uri: String,
    /// How long transient errors of one operation are retried.
    retry_budget: Duration,
}

/// How long [`Store`] retries the transient errors of one operation
/// (`object_store`'s own retries of a request come first). A default a
/// restarting S3 server or a short network outage fits in; the environment
/// variable `HETEROTUNE_STORE_RETRY_SECONDS` sets another (0: none).
pub const RETRY_BUDGET: Duration = Duration::from_secs(120);

/// The retry budget of a local folder store.
const LOCAL_RETRY_BUDGET: Duration = Duration::from_secs(1);

/// The variable that overrides [`RETRY_BUDGET`] (whole seconds).
pub const RETRY_ENV: &str = "HETEROTUNE_STORE_RETRY_SECONDS";

fn retry_budget() -> Duration {
    match std::env::var(RETRY_ENV) {
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(s) => Duration::from_secs(s),
            Err(_) => {
                tracing::warn!(value = %v, "{RETRY_ENV} is not a whole number of seconds: using {} s", RETRY_BUDGET.as_secs());
                RETRY_BUDGET
            }
        },
        Err(_) => RETRY_BUDGET,
    }
}

/// Whether an error may go away by itself: not an answer about the object
/// (absent, already there, a failed precondition), about the credentials
/// (refused: retrying a 403 for minutes helps nobody) or an unsupported call.
fn transient(e: &object_store::Error) -> bool {
    !matches!(
        e,
        object_store::Error::NotFound { .. }
            | object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. }
            | object_store::Error::NotSupported { .. }
            | object_store::Error::NotImplemented { .. }
            | object_store::Error::AlreadyExists { .. }
            | object_store::Error::Precondition { .. }
    )
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("uri", &self.uri).finish()
    }
}

/// What [`Store::download_limited`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fetched {
    /// Bytes written to the local file.
    pub written: u64,
    /// True when the object runs past the limit: the file holds its first
    /// `limit + 1` bytes.
    pub truncated: bool,
}

/// Where a read's body goes: memory (a record) or a local file (a download).
enum Sink<'a> {
    Memory(&'a mut Vec<u8>),
    File(tokio::fs::File),
}

/// A local file error inside a store read, as `object_store` reports
/// errors (the read's retry loop handles both alike).
fn local_io(e: std::io::Error) -> object_store::Error {
    object_store::Error::Generic {
        store: "local file",
        source: Box::new(e),
    }
}

impl Sink<'_> {
    async fn write(&mut self, chunk: &[u8]) -> object_store::Result<()> {
        match self {
            Sink::Memory(v) => {
                v.extend_from_slice(chunk);
                Ok(())
            }
            Sink::File(f) => f.write_all(chunk).await.map_err(local_io),
        }
    }
}

/// Reads the local file `path` for an upload.
async fn read_local(path: &Path) -> Result<Bytes, StoreError> {
    tokio::fs::read(path)
        .await
        .map(Bytes::from)
        .map_err(|e| StoreError::Local {
            path: path.to_path_buf(),
            source: e,
        })
}

impl Store {
    /// Opens the store `spec` names. A local path is taken relative to `base`.
    pub fn from_spec(spec: &StorageSpec, base: &Path) -> Result<Store, StoreError> {
        let uri = spec.uri.clone();
        if let Some(rest) = uri.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(StoreError::Config {
                    uri,
                    message: "no bucket: use s3://bucket/prefix".into(),
                });
            }
            let mut builder = object_store::aws::AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .with_virtual_hosted_style_request(!spec.force_path_style)
                .with_retry(object_store::RetryConfig {
                    max_retries: 5,
                    retry_timeout: Duration::from_secs(60),
                    ..Default::default()
                });
            if let Some(endpoint) = &spec.endpoint {
                builder = builder
                    .with_endpoint(endpoint)
                    .with_allow_http(endpoint.starts_with("http://"));
            }
            if let Some(region) = &spec.region {
                builder = builder.with_region(region);
            }
            let store = builder.build().map_err(|e| StoreError::Config {
                uri: uri.clone(),
                message: format!(
                    "{e} (credentials come from {ACCESS_KEY_ENV} / {SECRET_KEY_ENV} or the credentials Secret)"
                ),
            })?;
            return Ok(Store {
                inner: Arc::new(store),
                prefix: prefix.trim_matches('/').to_string(),
                uri,
                retry_budget: retry_budget(),
            });
        }
        let local = if let Some(rest) = uri.strip_prefix("file://") {
            PathBuf::from(rest)
        } else if uri.contains("://") {
            return Err(StoreError::Config {
                uri,
                message: "unsupported scheme: use s3://bucket/prefix, file://path or a path".into(),
            });
        } else {
            PathBuf::from(&uri)
        };
        let root = if local.is_absolute() {
            local
        } else {
            base.join(local)
        };
        std::fs::create_dir_all(&root).map_err(|e| StoreError::Local {
            path: root.clone(),
            source: e,
        })?;
        let fs = object_store::local::LocalFileSystem::new_with_prefix(&root).map_err(|e| {
            StoreError::Config {
                uri: uri.clone(),
                message: e.to_string(),
            }
        })?;
        Ok(Store {
            inner: Arc::new(fs),
            prefix: String::new(),
            uri,
            // A folder: its errors (a full disk, a permission) do not pass.
            retry_budget: LOCAL_RETRY_BUDGET,
        })
    }

    /// Writes `bytes` at `key` unless the object already holds exactly
    /// them; true when it wrote.
    pub async fn put_if_changed(&self, key: &str, bytes: Vec<u8>) -> Result<bool, StoreError> {
        if self.get(key).await?.as_deref() == Some(bytes.as_slice()) {
            return Ok(false);
        }
        self.put(key, bytes.into()).await?;
        Ok(true)
    }

    /// The same store with transient errors retried for `budget` instead,
    /// unless `HETEROTUNE_STORE_RETRY_SECONDS` is set (it always wins).
    pub fn with_retry_budget(mut self, budget: Duration) -> Store {
        if std::env::var_os(RETRY_ENV).is_none() {
            self.retry_budget = budget;
        }
        self
    }

    /// True for a bucket (`s3://`), whose credentials may be confined per
    /// key; false for a folder.
    pub fn is_bucket(&self) -> bool {
        self.uri.starts_with("s3://")
    }

    /// The storage URI (no credentials).
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The key prefix inside the bucket (what [`RunLayout::new`] takes).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn path(key: &str) -> ObjectPath {
        ObjectPath::from(key)
    }

    async fn retry<T, F, Fut>(&self, op: &'static str, key: &str, f: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, object_store::Error>>,
    {
        use backon::{ExponentialBuilder, Retryable};
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(10))
            .with_jitter()
            .without_max_times()
            .with_total_delay(Some(self.retry_budget));
        let mut attempt = 0u32;
        f.retry(backoff)
            .when(transient)
            .notify(|e, delay| {
                attempt += 1;
                tracing::warn!(store = %self.uri, op, key, attempt, retry_in = ?delay, error = %e, "transient store error; retrying");
            })
            .await
            .map_err(|e| self.op_error(op, key, e))
    }

    fn op_error(&self, op: &'static str, key: &str, source: object_store::Error) -> StoreError {
        StoreError::Operation {
            uri: self.uri.clone(),
            op,
            key: key.to_string(),
            error: Box::new(source),
        }
    }

    /// Reads the record `key` (at most [`MAX_RECORD_BYTES`]); `None` when
    /// it does not exist, [`StoreError::TooLarge`] when it is larger.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        self.get_limited(key, MAX_RECORD_BYTES).await
    }

    /// Reads `key` when it holds at most `limit` bytes: the object's size
    /// is checked before its body is read, and a body that runs past it
    /// stops there. `None` when it does not exist.
    pub async fn get_limited(&self, key: &str, limit: u64) -> Result<Option<Bytes>, StoreError> {
        let path = Self::path(key);
        let result = self
            .retry("get", key, || async {
                let mut body = Vec::new();
                let read = self
                    .read_into(&path, limit, &mut Sink::Memory(&mut body))
                    .await?;
                Ok((read, body))
            })
            .await;
        match result {
            Ok((Read::Whole(_), body)) => Ok(Some(Bytes::from(body))),
            Ok((Read::TooLarge(size), _)) => Err(StoreError::TooLarge {
                uri: self.uri.clone(),
                key: key.to_string(),
                size,
                limit,
            }),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Streams the body of `path` into `sink`, at most `limit + 1` bytes:
    /// [`Read::TooLarge`] (with the announced size, or at least `limit + 1`
    /// for a body that ran past it) when the object is larger than `limit`.
    /// A memory sink gets nothing of a too large object; a file sink gets
    /// its first `limit + 1` bytes.
    async fn read_into(
        &self,
        path: &ObjectPath,
        limit: u64,
        sink: &mut Sink<'_>,
    ) -> object_store::Result<Read> {
        let result: GetResult = self.inner.get(path).await?;
        let announced = result.meta.size;
        if announced > limit && matches!(sink, Sink::Memory(_)) {
            return Ok(Read::TooLarge(announced));
        }
        let mut stream = result.into_stream();
        let mut written = 0u64;
        let keep = limit.saturating_add(1);
        while let Some(chunk) = stream.try_next().await? {
            let take = usize::try_from((keep - written).min(chunk.len() as u64)).unwrap_or(0);
            sink.write(&chunk[..take]).await?;
            written += take as u64;
            if written > limit {
                break;
            }
        }
        // Every byte on disk before the caller renames and reads the file.
        if let Sink::File(f) = sink {
            f.flush().await.map_err(local_io)?;
        }
        Ok(if written > limit {
            Read::TooLarge(announced.max(written))
        } else {
            Read::Whole(written)
        })
    }

    /// Writes `key`.
    pub async fn put(&self, key: &str, bytes: Bytes) -> Result<(), StoreError> {
        let path = Self::path(key);
        self.retry("put", key, || async {
            self.inner.put(&path, PutPayload::from(bytes.clone())).await
        })
        .await
        .map(|_| ())
    }

    /// Writes `key` only when it does not exist (create-only: the commit of
    /// the round protocol, `If-None-Match: *` on S3, a hard link on a
    /// folder). True when this call created it; false when it was there
    /// already, unless it holds exactly `bytes` (this writer's own create,
    /// retried after its answer was lost).
    pub async fn put_new(&self, key: &str, bytes: Bytes) -> Result<bool, StoreError> {
        let path = Self::path(key);
        let result = self
            .retry("create", key, || async {
                let payload = PutPayload::from(bytes.clone());
                self.inner
                    .put_opts(&path, payload, PutMode::Create.into())
                    .await
            })
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(e) if e.is_already_exists() => {
                match self.get_limited(key, bytes.len() as u64).await {
                    Ok(there) => Ok(there.as_deref() == Some(&bytes[..])),
                    Err(StoreError::TooLarge { .. }) => Ok(false),
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// True when `key` exists.
    pub async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        let path = Self::path(key);
        match self
            .retry("head", key, || async { self.inner.head(&path).await })
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Every key under `prefix`, sorted.
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let path = Self::path(prefix);
        let mut keys: Vec<String> = self
            .retry("list", prefix, || async {
                self.inner
                    .list(Some(&path))
                    .map_ok(|m| m.location.to_string())
                    .try_collect::<Vec<_>>()
                    .await
            })
            .await?;
        keys.sort();
        Ok(keys)
    }

    /// Deletes `key` (absent is fine).
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let path = Self::path(key);
        match self
            .retry("delete", key, || async { self.inner.delete(&path).await })
            .await
        {
            Err(e) if !e.is_not_found() => Err(e),
            _ => Ok(()),
        }
    }

    /// Deletes every key under `prefix`; returns how many.
    pub async fn delete_prefix(&self, prefix: &str) -> Result<usize, StoreError> {
        let keys = self.list(prefix).await?;
        for key in &keys {
            let path = Self::path(key);
            self.retry("delete", key, || async { self.inner.delete(&path).await })
                .await?;
        }
        Ok(keys.len())
    }

    /// Downloads `key` into the file `local` (streamed; parent folders
    /// created, written under a temporary name and renamed). False when
    /// absent. For the spec's own inputs (models, datasets, private state):
    /// what a client sends goes through [`Self::download_limited`].
    pub async fn download_file(&self, key: &str, local: &Path) -> Result<bool, StoreError> {
        Ok(self.download_limited(key, local, u64::MAX).await?.is_some())
    }

    /// Downloads `key` into the file `local` like [`Self::download_file`],
    /// but at most `limit + 1` bytes: a larger object leaves its first
    /// `limit + 1` bytes (`truncated`), for verification to reject as too
    /// large without the rest ever being read. `None` when absent.
    pub async fn download_limited(
        &self,
        key: &str,
        local: &Path,
        limit: u64,
    ) -> Result<Option<Fetched>, StoreError> {
        let local_err = |e| StoreError::Local {
            path: local.to_path_buf(),
            source: e,
        };
        if let Some(parent) = local.parent() {
            tokio::fs::create_dir_all(parent).await.map_err(local_err)?;
        }
        let tmp = local.with_extension(format!("partial-{}", std::process::id()));
        let path = Self::path(key);
        let result = self
            .retry("get", key, || async {
                let file = tokio::fs::File::create(&tmp).await.map_err(local_io)?;
                self.read_into(&path, limit, &mut Sink::File(file)).await
            })
            .await;
        let read = match result {
            Ok(read) => read,
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                return if e.is_not_found() { Ok(None) } else { Err(e) };
            }
        };
        tokio::fs::rename(&tmp, local).await.map_err(local_err)?;
        Ok(Some(match read {
            Read::Whole(written) => Fetched {
                written,
                truncated: false,
            },
            Read::TooLarge(_) => Fetched {
                written: limit.saturating_add(1),
                truncated: true,
            },
        }))
    }

    /// Uploads the local file `local` to `key`.
    pub async fn upload_file(&self, local: &Path, key: &str) -> Result<u64, StoreError> {
        let bytes = read_local(local).await?;
        let n = bytes.len() as u64;
        self.put(key, bytes).await?;
        Ok(n)
    }

    /// Uploads the local file `local` to `key` create-only ([`Self::put_new`]):
    /// false when another writer's object is there.
    pub async fn create_file(&self, local: &Path, key: &str) -> Result<bool, StoreError> {
        self.put_new(key, read_local(local).await?).await
    }

    /// Downloads every object under the folder `key` into `local_dir`
    /// (keeping relative paths); returns how many. Keys that would leave
    /// `local_dir` (`..`) are refused.
    pub async fn download_prefix(&self, key: &str, local_dir: &Path) -> Result<usize, StoreError> {
        let key = key.trim_matches('/');
        let keys = self.list(key).await?;
        for k in &keys {
            let rel = k.strip_prefix(key).unwrap_or(k).trim_start_matches('/');
            if rel.is_empty() || rel.split('/').any(|p| p == ".." || p.is_empty()) {
                return Err(StoreError::Config {
                    uri: self.uri.clone(),
                    message: format!("refusing to download {k}: not a plain path under {key}"),
                });
            }
            self.download_file(k, &local_dir.join(rel)).await?;
        }
        Ok(keys.len())
    }

    /// The file names directly under the folder `key`.
    pub async fn file_names(&self, key: &str) -> Result<Vec<String>, StoreError> {
        let key = key.trim_matches('/');
        Ok(self
            .list(key)
            .await?
            .into_iter()
            .filter_map(|k| {
                k.strip_prefix(key)
                    .map(|r| r.trim_start_matches('/').to_string())
            })
            .filter(|r| !r.is_empty() && !r.contains('/'))
            .collect())
    }

    /// `spec.retention.keepClientRounds`: once round `completed` is
    /// aggregated, deletes the client artifacts of rounds up to
    /// `completed - keep` (global artifacts stay). Returns how many objects.
    pub async fn prune_client_rounds(
        &self,
        layout: &RunLayout,
        completed: u32,
        keep: u32,
    ) -> Result<usize, StoreError> {
        let mut n = 0;
        for round in 1..=completed.saturating_sub(keep) {
            n += self
                .delete_prefix(&format!("{}/clients", layout.round_dir(round)))
                .await?;
        }
        Ok(n)
    }

    /// Rounds `1..=max` whose global manifest exists, counted from round 1
    /// without gaps (the completed rounds of the run).
    pub async fn completed_rounds(&self, layout: &RunLayout, max: u32) -> Result<u32, StoreError> {
        self.completed_rounds_from(layout, 0, max).await
    }

    /// [`Self::completed_rounds`], counting on from `known` (a hint: when
    /// its global manifest is absent, from round 1 again).
    pub async fn completed_rounds_from(
        &self,
        layout: &RunLayout,
        known: u32,
        max: u32,
    ) -> Result<u32, StoreError> {
        let mut done =
            if known > 0 && known <= max && self.exists(&layout.global_manifest(known)).await? {
                known
            } else {
                0
            };
        while done < max && self.exists(&layout.global_manifest(done + 1)).await? {
            done += 1;
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(dir: &Path) -> Store {
        let spec = StorageSpec {
            uri: "file://store".into(),
            ..StorageSpec::default()
        };
        Store::from_spec(&spec, dir).expect("local store")
    }

    #[test]
    fn a_refused_key_is_an_answer_not_a_passing_failure() {
        let denied = || object_store::Error::PermissionDenied {
            path: "runs/x".into(),
            source: "403 Forbidden".into(),
        };
        assert!(!transient(&denied()));
        assert!(!transient(&object_store::Error::Unauthenticated {
            path: "runs/x".into(),
            source: "401".into(),
        }));
        let e = StoreError::Operation {
            uri: "s3://b".into(),
            op: "head",
            key: "runs/x".into(),
            error: Box::new(denied()),
        };
        assert!(e.is_permission_denied() && !e.is_not_found());
        assert!(transient(&object_store::Error::Generic {
            store: "S3",
            source: "connection reset".into(),
        }));
    }

    #[tokio::test]
    async fn local_round_trip_list_and_delete() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = local(dir.path());
        assert!(dir.path().join("store").is_dir());
        assert_eq!(store.get("a/b.json").await.expect("get"), None);
        store
            .put("a/b.json", Bytes::from_static(b"{}"))
            .await
            .expect("put");
        store
            .put("a/c/d.bin", Bytes::from_static(b"xy"))
            .await
            .expect("put");
        assert_eq!(
            store.get("a/b.json").await.expect("get").as_deref(),
            Some(&b"{}"[..])
        );
        assert!(store.exists("a/c/d.bin").await.expect("exists"));
        assert_eq!(
            store.list("a").await.expect("list"),
            vec!["a/b.json", "a/c/d.bin"]
        );
        assert_eq!(store.delete_prefix("a/c").await.expect("delete"), 1);
        assert!(!store.exists("a/c/d.bin").await.expect("exists"));
    }

    #[tokio::test]
    async fn rounds_are_counted_by_global_manifests_without_gaps() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = local(dir.path());
        let layout = RunLayout::new("", "ns", "run", "uid");
        for r in [1, 2, 4] {
            store
                .put(&layout.global_manifest(r), Bytes::from_static(b"{}"))
                .await
                .expect("put");
        }
        assert_eq!(
            store.completed_rounds(&layout, 10).await.expect("rounds"),
            2
        );
        assert_eq!(store.completed_rounds(&layout, 1).await.expect("rounds"), 1);
        // A hint counts on from there; a stale one falls back to round 1.
        let from = |known| store.completed_rounds_from(&layout, known, 10);
        assert_eq!(from(2).await.expect("rounds"), 2);
        assert_eq!(from(3).await.expect("rounds"), 2);
    }

    #[test]
    fn bad_uris_are_clear() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = StorageSpec {
            uri: "gs://bucket".into(),
            ..StorageSpec::default()
        };
        let err = Store::from_spec(&spec, dir.path()).expect_err("unsupported");
        assert!(err.to_string().contains("unsupported scheme"), "{err}");
        let spec = StorageSpec {
            uri: "s3:///x".into(),
            ..StorageSpec::default()
        };
        assert!(Store::from_spec(&spec, dir.path())
            .expect_err("no bucket")
            .to_string()
            .contains("no bucket"));
    }
}
