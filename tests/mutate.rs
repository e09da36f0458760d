//! Byte mutations for the bounded fuzz runs of the parsers (crds'
//! `tests/fuzz_spec.rs`, trainer's `tests/fuzz.rs`).

/// `seed` after `edits`, each `(where, byte, what)`: `what % 4` replaces,
/// inserts or deletes the byte at `where % len`, or repeats up to 31 bytes
/// from there.
pub fn mutate(seed: &[u8], edits: &[(usize, u8, u8)]) -> Vec<u8> {
    let mut bytes = seed.to_vec();
    for &(at, byte, op) in edits {
        let i = if bytes.is_empty() {
            0
        } else {
            at % bytes.len()
        };
        match op % 4 {
            0 if !bytes.is_empty() => bytes[i] = byte,
            1 => bytes.insert(i, byte),
            2 if !bytes.is_empty() => {
                bytes.remove(i);
            }
            _ => {
                let end = (i + usize::from(byte % 32)).min(bytes.len());
                let piece = bytes[i..end].to_vec();
                bytes.splice(i..i, piece);
            }
        }
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::mutate;

    #[test]
    fn edits_do_what_they_say() {
        assert_eq!(mutate(b"abc", &[(1, b'x', 0)]), b"axc");
        assert_eq!(mutate(b"abc", &[(1, b'x', 1)]), b"axbc");
        assert_eq!(mutate(b"abc", &[(4, 0, 2)]), b"ac");
        assert_eq!(mutate(b"abc", &[(0, 2, 3)]), b"ababc");
        assert_eq!(mutate(b"", &[(5, b'z', 0), (5, b'y', 1)]), b"y");
    }
}
