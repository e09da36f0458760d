//! The frozen-prefix cache of the training loop (`train.rs`): each
//! example's output of the frozen prefix, unpadded, in memory and (between
//! rounds) in a safetensors file named by a fingerprint of everything that
//! output depends on.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use tch::{Device, Kind, Tensor};

use crate::artifact::{self, StoreDtype};
use crate::Result;

/// The prefix output of each cached example (by example index), unpadded.
pub(crate) struct PrefixCache {
    /// Example index → its prefix output `[len, hidden]`.
    pub states: HashMap<usize, Tensor>,
}

impl PrefixCache {
    /// A fingerprint of everything the prefix output depends on: the
    /// backbone (`model_id`), the prefix (`prefix`: family and depth), its
    /// compute dtype `kind` and the exact token ids `ids`. A cache file is
    /// reused only when it matches.
    pub fn fingerprint(model_id: &str, prefix: &str, kind: Kind, ids: &[Vec<i64>]) -> String {
        let mut h = sha2::Sha256::new();
        use sha2::Digest as _;
        h.update(model_id.as_bytes());
        h.update(prefix.as_bytes());
        h.update(format!("{kind:?}").as_bytes());
        for row in ids {
            h.update((row.len() as u64).to_le_bytes());
            for id in row {
                h.update(id.to_le_bytes());
            }
        }
        hex::encode(h.finalize())
    }

    /// The cache saved in `file`, on `device`; `None` when the file cannot
    /// be read (an unreadable file is ignored with a warning).
    pub fn load(file: &Path, device: Device) -> Option<PrefixCache> {
        let bytes = std::fs::read(file).ok()?;
        match artifact::from_safetensors_kept(&bytes, file) {
            Ok(map) => {
                let states: HashMap<usize, Tensor> = map
                    .into_iter()
                    .filter_map(|(k, v)| k.parse::<usize>().ok().map(|i| (i, v.to_device(device))))
                    .collect();
                Some(PrefixCache { states })
            }
            Err(e) => {
                tracing::warn!(file = %file.display(), error = %e, "ignoring an unreadable prefix cache");
                None
            }
        }
    }

    /// Saves the cache to `file` (BF16 when the prefix computes in
    /// `kind` BF16, else F32).
    pub fn save(&self, file: &Path, kind: Kind) -> Result<()> {
        let map: BTreeMap<String, Tensor> = self
            .states
            .iter()
            .map(|(i, t)| (i.to_string(), t.shallow_clone()))
            .collect();
        let dtype = if kind == Kind::BFloat16 {
            StoreDtype::Bf16
        } else {
            StoreDtype::F32
        };
        let (bytes, _) = artifact::to_safetensors(&map, dtype)?;
        artifact::write_atomic(file, &bytes)
    }

    /// The prefix outputs of `rows`, padded to `t` tokens and stacked;
    /// `None` unless every row is cached.
    pub fn stacked(&self, rows: &[usize], t: i64) -> Option<Tensor> {
        if !rows.iter().all(|i| self.states.contains_key(i)) {
            return None;
        }
        let parts: Vec<Tensor> = rows
            .iter()
            .map(|i| {
                let s = &self.states[i];
                let pad = t - s.size()[0];
                if pad > 0 {
                    s.constant_pad_nd([0, 0, 0, pad])
                } else {
                    s.shallow_clone()
                }
            })
            .collect();
        Some(Tensor::stack(&parts, 0))
    }
}
