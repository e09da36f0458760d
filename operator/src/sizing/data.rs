//! What a client's trainer holds of its data: the frozen-prefix cache, from
//! the examples it prepares and their length.

use serde::Serialize;

/// The examples one client's trainer prepares in a round (its training,
/// validation and test examples) and their mean length in tokens. Without
/// one, the estimate counts the prefix cache at its bound
/// (`training.prefixCache.maxMemoryMiB`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DataProfile {
    /// Examples the trainer tokenises and caches the frozen prefix of.
    pub examples: u64,
    /// Mean tokens per example after truncation (at most `maxSeqLength`;
    /// `maxSeqLength` itself is the upper bound when the texts are unknown).
    pub mean_tokens: f64,
}

impl DataProfile {
    /// Bytes of the frozen-prefix cache of these examples: each example's
    /// prefix output, unpadded (`tokens · d` elements of `elt` bytes), its
    /// length capped at `max_tokens`; at most `bound`.
    pub fn prefix_cache_bytes(&self, hidden: u64, elt: u64, max_tokens: u64, bound: u64) -> u64 {
        let tokens = self.mean_tokens.clamp(0.0, max_tokens as f64);
        let bytes = (self.examples as f64 * tokens * (hidden * elt) as f64).ceil() as u64;
        bytes.min(bound)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_is_tokens_times_width_within_its_bound() {
        let p = DataProfile {
            examples: 1000,
            mean_tokens: 12.5,
        };
        // 1000 · 12.5 · 384 · 4 = 19,200,000
        assert_eq!(p.prefix_cache_bytes(384, 4, 32, u64::MAX), 19_200_000);
        assert_eq!(p.prefix_cache_bytes(384, 4, 32, 1_000_000), 1_000_000);
        // Lengths are capped at maxSeqLength: 1000 · 8 · 384 · 2.
        assert_eq!(p.prefix_cache_bytes(384, 2, 8, u64::MAX), 6_144_000);
    }
}
