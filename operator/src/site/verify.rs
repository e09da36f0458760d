//! What a site trains on: a round's global artifact, downloaded into a
//! scratch folder and accepted only when its manifest says it is the global
//! of that round of this run and its data has the digest the manifest
//! declares.

use std::path::{Path, PathBuf};

use heterotune_crds::digest::sha256_hex;
use heterotune_crds::layout::{ADAPTER_FILE, MANIFEST_FILE};
use heterotune_crds::manifest::{ArtifactKind, ArtifactManifest};

use super::join::{Site, SiteError};
use crate::execution::staging;
use crate::protocol::commit;

impl Site {
    /// The verified local folder of `round`'s global artifact; `None` while
    /// the store does not hold it. A folder verified before is checked again
    /// (a restarted agent trusts nothing it did not just check).
    pub async fn verified_global(&self, round: u32) -> Result<Option<PathBuf>, SiteError> {
        let dest = staging::global_dir(&self.work, round);
        if dest.join(MANIFEST_FILE).is_file() {
            self.verify(round, &dest)?;
            return Ok(Some(dest));
        }
        let scratch = dest.with_extension(format!("download-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&scratch);
        let key = self.layout.global_dir(round);
        if !commit::download_artifact(&self.store, &key, &scratch, u64::MAX).await? {
            return Ok(None);
        }
        if let Err(e) = self.verify(round, &scratch) {
            let _ = std::fs::remove_dir_all(&scratch);
            return Err(e);
        }
        let _ = std::fs::remove_dir_all(&dest);
        std::fs::rename(&scratch, &dest).map_err(|source| SiteError::Local {
            path: dest.clone(),
            source,
        })?;
        Ok(Some(dest))
    }

    /// Checks the global artifact of `round` in the local folder `dir`.
    fn verify(&self, round: u32, dir: &Path) -> Result<(), SiteError> {
        let untrusted = |message: String| SiteError::Untrusted {
            round,
            store: self.store.uri().to_string(),
            key: self.layout.global_manifest(round),
            message,
        };
        let read = |name: &str| {
            std::fs::read(dir.join(name)).map_err(|e| untrusted(format!("{name}: {e}")))
        };
        let manifest = ArtifactManifest::from_slice(&read(MANIFEST_FILE)?)
            .map_err(|e| untrusted(format!("its manifest does not parse: {e}")))?;
        check_manifest(&manifest, self.layout.run_dir(), round).map_err(untrusted)?;
        let data = read(ADAPTER_FILE)?;
        let sha = sha256_hex(&data);
        if !manifest.artifact.sha256.eq_ignore_ascii_case(&sha) {
            return Err(untrusted(format!(
                "its data has sha256 {sha}, its manifest declares {}",
                manifest.artifact.sha256
            )));
        }
        if manifest.artifact.bytes != 0 && manifest.artifact.bytes != data.len() as u64 {
            return Err(untrusted(format!(
                "its data has {} bytes, its manifest declares {}",
                data.len(),
                manifest.artifact.bytes
            )));
        }
        Ok(())
    }
}

/// A global manifest of round `round` of run `run`, or why not.
fn check_manifest(m: &ArtifactManifest, run: &str, round: u32) -> Result<(), String> {
    if m.kind != ArtifactKind::Global {
        return Err(format!("its manifest is of kind {:?}, not global", m.kind));
    }
    if m.run != run {
        return Err(format!("its manifest is of run {}, not {run}", m.run));
    }
    if m.round != round {
        return Err(format!("its manifest is of round {}, not {round}", m.round));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_global_of_another_kind_run_or_round_is_refused() {
        let good = ArtifactManifest::new(ArtifactKind::Global, "ns/r-1", 2, 1, "t");
        assert_eq!(check_manifest(&good, "ns/r-1", 2), Ok(()));
        let e = check_manifest(&good, "ns/other", 2).expect_err("another run");
        assert!(e.contains("ns/other"), "{e}");
        assert!(check_manifest(&good, "ns/r-1", 3).is_err());
        let client = ArtifactManifest::new(ArtifactKind::Client, "ns/r-1", 2, 1, "t");
        assert!(check_manifest(&client, "ns/r-1", 2).is_err());
    }
}
