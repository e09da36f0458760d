//! Frozen weights from a memory-mapped `model.safetensors`.
//!
//! [`Weights`] maps the file once and hands out tensors by checkpoint name,
//! checking shape and dtype. When a tensor already has the requested dtype,
//! lives on the CPU and is suitably aligned, the returned tensor *borrows the
//! mapped pages* (no copy: several processes on one machine share them through
//! the page cache); otherwise it is converted into memory owned by libtorch.
//!
//! Borrowed tensors are only valid while the mapping lives: a model keeps the
//! [`WeightStorage`] returned by [`Weights::storage`] next to its tensors and
//! never hands its weight tensors out.

use std::cell::Cell;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::{Mmap, UncheckedAdvice};
use safetensors::tensor::{Dtype, SafeTensors, TensorInfo};
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};

/// Keeps a memory-mapped checkpoint alive for the tensors that borrow it.
#[derive(Debug, Clone)]
pub struct WeightStorage(#[allow(dead_code)] Arc<Mmap>);

/// One tensor's entry in the safetensors header.
#[derive(Debug, Clone)]
struct Entry {
    dtype: Dtype,
    shape: Vec<usize>,
    /// Byte range inside the whole file.
    start: usize,
    end: usize,
}

/// Read-only access to the tensors of one safetensors file.
#[derive(Debug)]
pub struct Weights {
    path: PathBuf,
    mmap: Arc<Mmap>,
    entries: HashMap<String, Entry>,
    device: Device,
    kind: Kind,
    loaded_elements: Cell<usize>,
}

impl Weights {
    /// Memory-maps the safetensors file `path`; [`Weights::get`] returns
    /// tensors of dtype `kind` on `device`.
    ///
    /// # Errors
    /// [`Error::Model`] when the file is missing or its header is invalid, or
    /// when `kind` is not a floating-point kind.
    pub fn open(path: &Path, device: Device, kind: Kind) -> Result<Self> {
        if !matches!(
            kind,
            Kind::Float | Kind::BFloat16 | Kind::Half | Kind::Double
        ) {
            return Err(Error::model(
                path,
                format!("compute dtype must be f32, bf16, f16 or f64, not {kind:?}"),
            ));
        }
        let file = File::open(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::model(path, "weights file not found (run scripts/setup.sh)")
            } else {
                Error::io(path, e)
            }
        })?;
        // SAFETY: the file is opened read-only and mapped read-only (PROT_READ):
        // no writer exists in this process. As with every memory-mapped file,
        // truncating it from another process while mapped is undefined
        // behaviour; model files in the cache are written once by setup.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (header_len, metadata) = SafeTensors::read_metadata(&mmap[..])
            .map_err(|e| Error::model(path, format!("invalid safetensors file: {e}")))?;
        let data_start = 8 + header_len;
        let entries = metadata
            .tensors()
            .into_iter()
            .map(|(name, info): (String, &TensorInfo)| {
                let (start, end) = info.data_offsets;
                let entry = Entry {
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: data_start + start,
                    end: data_start + end,
                };
                (name, entry)
            })
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            mmap: Arc::new(mmap),
            entries,
            device,
            kind,
            loaded_elements: Cell::new(0),
        })
    }

    /// Renames every tensor `prefix + name` to `name` (e.g. strips `bert.`
    /// from checkpoints saved from `BertForSequenceClassification`). A name
    /// present both with and without the prefix keeps the unprefixed one.
    pub fn strip_prefix(&mut self, prefix: &str) {
        let prefixed: Vec<String> = self
            .entries
            .keys()
            .filter(|name| name.starts_with(prefix))
            .cloned()
            .collect();
        for name in prefixed {
            if let Some(entry) = self.entries.remove(&name) {
                let short = name[prefix.len()..].to_string();
                self.entries.entry(short).or_insert(entry);
            }
        }
    }

    /// The safetensors file these weights come from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The dtype tensors are returned in.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The device tensors are returned on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Whether the checkpoint holds a tensor called `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Shape of tensor `name` as stored, if present.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }

    /// Total number of elements handed out by [`Weights::get`] so far.
    pub fn loaded_elements(&self) -> usize {
        self.loaded_elements.get()
    }

    /// A handle that keeps the mapping alive; hold it as long as any tensor
    /// returned by [`Weights::get`].
    pub fn storage(&self) -> WeightStorage {
        WeightStorage(Arc::clone(&self.mmap))
    }

    /// Tensor `name`, checked to have shape `shape`, in this store's dtype
    /// and on its device, without gradient.
    ///
    /// # Errors
    /// [`Error::Model`] naming the file and the tensor when it is missing,
    /// has another shape, or is not a floating-point tensor.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.get_as(name, shape, self.kind)
    }

    /// Like [`Weights::get`] but in dtype `kind` (e.g. f32 norms in a bf16 model).
    ///
    /// # Errors
    /// As [`Weights::get`].
    pub fn get_as(&self, name: &str, shape: &[usize], kind: Kind) -> Result<Tensor> {
        let entry = self.entries.get(name).ok_or_else(|| {
            Error::model(
                &self.path,
                format!("tensor `{name}` is missing from the checkpoint"),
            )
        })?;
        if entry.shape != shape {
            return Err(Error::model(
                &self.path,
                format!(
                    "tensor `{name}` has shape {:?}, expected {shape:?} (does config.json match the weights?)",
                    entry.shape
                ),
            ));
        }
        let stored = stored_kind(entry.dtype).ok_or_else(|| {
            Error::model(
                &self.path,
                format!(
                    "tensor `{name}` has dtype {:?}; only floating-point weights (F32, F16, BF16, F64) are supported",
                    entry.dtype
                ),
            )
        })?;
        let bytes = self.mmap.get(entry.start..entry.end).ok_or_else(|| {
            Error::model(&self.path, format!("tensor `{name}` lies outside the file"))
        })?;
        let size: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        let numel: usize = shape.iter().product();
        let elt = stored.elt_size_in_bytes();
        if bytes.len() != numel * elt {
            return Err(Error::model(
                &self.path,
                format!(
                    "tensor `{name}` holds {} bytes, expected {} for shape {shape:?}",
                    bytes.len(),
                    numel * elt
                ),
            ));
        }
        let aligned = bytes.as_ptr().align_offset(elt) == 0 && numel > 0;
        let tensor = if aligned {
            let strides = contiguous_strides(&size);
            // SAFETY: `bytes` is a live, read-only slice of `self.mmap` of
            // exactly `numel * elt` bytes, aligned for `stored`. The tensor does
            // not own the memory: callers keep `self.storage()` alive as long
            // as the tensor (documented above), and weights are never written.
            unsafe { Tensor::from_blob(bytes.as_ptr(), &size, &strides, stored, Device::Cpu) }
        } else {
            Tensor::f_from_data_size(bytes, &size, stored)?
        };
        // A borrowed tensor is returned as is only when no conversion is needed;
        // otherwise `to_device`/`to_kind` make an owned copy.
        let tensor = tensor.f_to_device(self.device)?.f_to_kind(kind)?;
        self.loaded_elements.set(self.loaded_elements.get() + numel);
        let borrowed = aligned && self.device == Device::Cpu && kind == stored;
        if !borrowed {
            self.release(name);
        }
        Ok(tensor)
    }

    /// Tells the kernel this process no longer needs the mapped pages of
    /// tensor `name` (its data was copied), so they stop counting towards
    /// resident memory. Only pages lying entirely inside the tensor are
    /// dropped; a later access would simply read them from the file again,
    /// so this is harmless even for a tensor still borrowed. Best effort.
    pub fn release(&self, name: &str) {
        /// Rounding to 64 KiB keeps ranges page-aligned on every platform.
        const GRAIN: usize = 1 << 16;
        let Some(entry) = self.entries.get(name) else {
            return;
        };
        let start = entry.start.div_ceil(GRAIN) * GRAIN;
        let end = entry.end / GRAIN * GRAIN;
        if end > start {
            // SAFETY: the mapping is read-only and backed by an unmodified
            // file, so MADV_DONTNEED only drops clean pages that a later
            // access re-reads from the file with the same contents.
            let _ = unsafe {
                self.mmap
                    .unchecked_advise_range(UncheckedAdvice::DontNeed, start, end - start)
            };
        }
    }
}

/// The libtorch kind matching a floating-point safetensors dtype.
fn stored_kind(dtype: Dtype) -> Option<Kind> {
    match dtype {
        Dtype::F32 => Some(Kind::Float),
        Dtype::F16 => Some(Kind::Half),
        Dtype::BF16 => Some(Kind::BFloat16),
        Dtype::F64 => Some(Kind::Double),
        _ => None,
    }
}

fn contiguous_strides(size: &[i64]) -> Vec<i64> {
    let mut strides = vec![1i64; size.len()];
    for i in (0..size.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * size[i + 1];
    }
    strides
}
