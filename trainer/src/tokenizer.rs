//! Text to token ids, exactly as Hugging Face's fast tokenizer does it.
//!
//! [`TextTokenizer`] wraps a `tokenizer.json` (the `tokenizers` crate, the
//! same code as HF's fast tokenizers). Whatever padding/truncation the file
//! configures is switched off; [`TextTokenizer::encode_batch`] truncates to a
//! caller's `max_len` keeping the special tokens the file's post-processor
//! adds (`[CLS] … [SEP]` for BERT; nothing for SmolLM2, whose HF tokenizer
//! adds no BOS), and pads on the right to the longest sequence in the batch.

use std::path::{Path, PathBuf};

use heterotune_crds::model::{ModelFacts, CONFIG_FILE, TOKENIZER_FILE};
use tch::Tensor;
use tokenizers::{PostProcessor, Tokenizer, TruncationDirection};

use crate::error::{Error, Result};

/// A batch of token ids, right-padded.
#[derive(Debug)]
pub struct Encoded {
    /// `[batch, seq]` int64 token ids; padded positions hold the pad id.
    pub input_ids: Tensor,
    /// `[batch, seq]` int64: 1 for real tokens, 0 for padding.
    pub attention_mask: Tensor,
}

/// A `tokenizer.json` tokenizer with the trainer's padding and truncation.
#[derive(Debug, Clone)]
pub struct TextTokenizer {
    tokenizer: Tokenizer,
    path: PathBuf,
    pad_id: i64,
    /// Special tokens the post-processor adds to a single sequence.
    num_special: usize,
    /// One past the largest id the tokenizer can produce.
    id_bound: usize,
    /// The pad id came from the file's padding section.
    pad_from_file: bool,
}

/// Token names tried, in order, as the padding token.
const PAD_TOKENS: [&str; 4] = ["[PAD]", "<pad>", "<|pad|>", "<|endoftext|>"];

impl TextTokenizer {
    /// Loads `path` (a `tokenizer.json`). The pad id is the file's own
    /// padding id, else the id of a conventional pad token (`[PAD]`, `<pad>`,
    /// `<|pad|>`, `<|endoftext|>`), else 0; padded positions are masked, so
    /// the choice does not change results.
    ///
    /// # Errors
    /// [`Error::Model`] naming the file when it is missing or unreadable.
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::model(
                path,
                "tokenizer file not found (run scripts/setup.sh)",
            ));
        }
        let loaded = Tokenizer::from_file(path)
            .map_err(|e| Error::model(path, format!("cannot load tokenizer: {e}")))?;
        let file_pad = loaded.get_padding().map(|p| i64::from(p.pad_id));
        let mut tokenizer = loaded;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| Error::model(path, format!("cannot disable truncation: {e}")))?;
        let pad_id = file_pad
            .or_else(|| {
                PAD_TOKENS
                    .iter()
                    .find_map(|t| tokenizer.token_to_id(t).map(i64::from))
            })
            .unwrap_or(0);
        let num_special = tokenizer
            .get_post_processor()
            .map(|p| p.added_tokens(false))
            .unwrap_or(0);
        let id_bound = tokenizer
            .get_vocab(true)
            .values()
            .max()
            .map(|&m| m as usize + 1)
            .unwrap_or(0);
        Ok(Self {
            tokenizer,
            path: path.to_path_buf(),
            pad_id,
            num_special,
            id_bound,
            pad_from_file: file_pad.is_some(),
        })
    }

    /// Loads `dir/tokenizer.json` for a model whose embedding table has
    /// `model_vocab_size` rows, checking every id the tokenizer can produce
    /// fits.
    ///
    /// # Errors
    /// [`Error::Model`] for a missing/unreadable tokenizer, or a tokenizer
    /// vocabulary larger than the model's (naming both files).
    /// When the tokenizer file has no padding section, `pad_token_id` (else
    /// `eos_token_id`) from `dir/config.json` is the pad id if present.
    pub fn for_model(dir: &Path, model_vocab_size: usize) -> Result<Self> {
        let path = dir.join(TOKENIZER_FILE);
        let mut tok = Self::from_file(&path)?;
        if tok.id_bound > model_vocab_size {
            return Err(Error::model(
                &path,
                format!(
                    "tokenizer produces ids up to {} but the model in {} has vocab_size {}: tokenizer/vocab mismatch",
                    tok.id_bound - 1,
                    dir.join(CONFIG_FILE).display(),
                    model_vocab_size
                ),
            ));
        }
        if !tok.pad_from_file {
            if let Some(id) = ModelFacts::read(dir).ok().and_then(|f| f.pad_token_id) {
                tok.pad_id = id;
            }
        }
        Ok(tok)
    }

    /// Uses `pad_id` for padded positions.
    pub fn with_pad_id(mut self, pad_id: i64) -> Self {
        self.pad_id = pad_id;
        self
    }

    /// The id written at padded positions.
    pub fn pad_id(&self) -> i64 {
        self.pad_id
    }

    /// One past the largest id this tokenizer can produce.
    pub fn vocab_size(&self) -> usize {
        self.id_bound
    }

    /// Number of special tokens added around one sequence.
    pub fn num_special_tokens(&self) -> usize {
        self.num_special
    }

    /// The `tokenizer.json` this tokenizer was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Token ids of `text` with special tokens, truncated to `max_len`
    /// (special tokens kept, as HF's `truncation=True, max_length=max_len`).
    ///
    /// # Errors
    /// [`Error::Config`] when `max_len` cannot hold the special tokens plus
    /// one token; [`Error::Model`] when tokenisation fails.
    pub fn encode(&self, text: &str, max_len: usize) -> Result<Vec<u32>> {
        if max_len <= self.num_special {
            return Err(Error::config(
                "max_len",
                format!(
                    "{max_len} leaves no room for text next to {} special tokens",
                    self.num_special
                ),
            ));
        }
        let fail = |e| Error::model(&self.path, format!("cannot tokenize {text:?}: {e}"));
        let full = self.tokenizer.encode_fast(text, true).map_err(fail)?;
        if full.len() <= max_len {
            return Ok(full.get_ids().to_vec());
        }
        let mut bare = self.tokenizer.encode_fast(text, false).map_err(fail)?;
        bare.truncate(max_len - self.num_special, 0, TruncationDirection::Right);
        let processed = self
            .tokenizer
            .post_process(bare, None, true)
            .map_err(fail)?;
        Ok(processed.get_ids().to_vec())
    }

    /// Tokenises `texts` (see [`TextTokenizer::encode`]) and pads them on
    /// the right to the longest one (at most `max_len`).
    ///
    /// A text that yields no token at all (an empty string, with a tokenizer
    /// that adds no special tokens, such as SmolLM2's) gets an all-zero mask
    /// row: drop empty texts upstream before pooling over the mask.
    ///
    /// # Errors
    /// As [`TextTokenizer::encode`].
    pub fn encode_batch(&self, texts: &[&str], max_len: usize) -> Result<Encoded> {
        let rows = texts
            .iter()
            .map(|t| self.encode(t, max_len))
            .collect::<Result<Vec<_>>>()?;
        let seq = rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(rows.len() * seq);
        let mut mask = Vec::with_capacity(rows.len() * seq);
        for row in &rows {
            ids.extend(row.iter().map(|&id| i64::from(id)));
            ids.extend(std::iter::repeat_n(self.pad_id, seq - row.len()));
            mask.extend(std::iter::repeat_n(1i64, row.len()));
            mask.extend(std::iter::repeat_n(0i64, seq - row.len()));
        }
        let shape = [rows.len() as i64, seq as i64];
        Ok(Encoded {
            input_ids: Tensor::from_slice(&ids).view(shape),
            attention_mask: Tensor::from_slice(&mask).view(shape),
        })
    }

    /// Text of `ids` (special tokens skipped).
    ///
    /// # Errors
    /// [`Error::Model`] when an id is unknown to the tokenizer.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| Error::model(&self.path, format!("cannot decode {ids:?}: {e}")))
    }
}
