//! Reading a file a user names (a spec), bounded: only a regular file (a
//! FIFO would hang the reader, a device such as /dev/zero never ends), and
//! at most [`MAX_SPEC_BYTES`], checked before and while reading.

use std::io::Read;
use std::path::Path;

/// Largest spec file accepted: 1.5 MiB, the API server's (etcd's) limit on
/// one object, so no spec that a cluster would take is refused.
pub const MAX_SPEC_BYTES: u64 = 1536 * 1024;

/// The UTF-8 text of `path`, a regular file of at most `max` bytes.
///
/// # Errors
/// `InvalidInput` for a FIFO, device or directory, or a file over `max`
/// bytes (naming the limit); `InvalidData` for text that is not UTF-8;
/// the I/O error otherwise.
pub fn read_text(path: &Path, max: u64) -> std::io::Result<String> {
    let invalid = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, m);
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        return Err(invalid(
            "not a regular file (a FIFO, device or folder): give the path of a YAML or JSON file"
                .into(),
        ));
    }
    if meta.len() > max {
        return Err(invalid(format!(
            "{} bytes, over the {max}-byte limit for a spec",
            meta.len()
        )));
    }
    // The file may grow after the check: read at most one byte past the limit.
    read_stream(std::fs::File::open(path)?, max)
}

/// The UTF-8 text of `reader` (standard input), at most `max` bytes.
///
/// # Errors
/// As [`read_text`] for the size and the encoding.
pub fn read_stream(reader: impl Read, max: u64) -> std::io::Result<String> {
    let mut bytes = Vec::new();
    reader.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("over the {max}-byte limit for a spec"),
        ));
    }
    String::from_utf8(bytes)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_small_regular_files() {
        let dir = tempfile::tempdir().expect("dir");
        let ok = dir.path().join("ok.yaml");
        std::fs::write(&ok, "a: 1\n").expect("write");
        assert_eq!(read_text(&ok, 10).expect("read"), "a: 1\n");
        let big = dir.path().join("big.yaml");
        std::fs::write(&big, "x".repeat(11)).expect("write");
        let err = read_text(&big, 10).expect_err("too big");
        assert!(err.to_string().contains("10-byte limit"), "{err}");
        let err = read_text(Path::new("/dev/zero"), 10).expect_err("device");
        assert!(err.to_string().contains("not a regular file"), "{err}");
        let err = read_text(dir.path(), 10).expect_err("folder");
        assert!(err.to_string().contains("not a regular file"), "{err}");
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().expect("utf-8")).expect("c path");
        // SAFETY: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let err = read_text(&fifo, 10).expect_err("fifo");
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }
}
