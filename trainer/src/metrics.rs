//! Classification metrics and resource figures.

/// Accuracy and macro-F1 of predictions against labels over `num_classes`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scores {
    pub accuracy: f64,
    pub macro_f1: f64,
    pub examples: usize,
}

/// Computes [`Scores`]. Classes absent from both predictions and labels are
/// left out of the macro average (as scikit-learn does with `labels=None`).
pub fn scores(predictions: &[usize], labels: &[usize], num_classes: usize) -> Scores {
    let n = predictions.len().min(labels.len());
    if n == 0 {
        return Scores {
            accuracy: 0.0,
            macro_f1: 0.0,
            examples: 0,
        };
    }
    let mut tp = vec![0usize; num_classes];
    let mut fp = vec![0usize; num_classes];
    let mut fn_ = vec![0usize; num_classes];
    let mut correct = 0usize;
    for (&p, &l) in predictions.iter().zip(labels).take(n) {
        if p == l {
            correct += 1;
            if p < num_classes {
                tp[p] += 1;
            }
        } else {
            if p < num_classes {
                fp[p] += 1;
            }
            if l < num_classes {
                fn_[l] += 1;
            }
        }
    }
    let mut f1_sum = 0.0;
    let mut present = 0usize;
    for c in 0..num_classes {
        if tp[c] + fp[c] + fn_[c] == 0 {
            continue;
        }
        present += 1;
        let denom = 2 * tp[c] + fp[c] + fn_[c];
        f1_sum += 2.0 * tp[c] as f64 / denom as f64;
    }
    Scores {
        accuracy: correct as f64 / n as f64,
        macro_f1: if present == 0 {
            0.0
        } else {
            f1_sum / present as f64
        },
        examples: n,
    }
}

/// Peak resident set size of this process in bytes (`VmHWM`), where the
/// platform reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accuracy_and_macro_f1_by_hand() {
        // Class 0: tp 2, fp 1, fn 0 -> F1 = 4/5; class 1: tp 1, fp 0, fn 1 -> 2/3;
        // class 2: tp 0, fp 0, fn 0 -> absent.
        let s = scores(&[0, 0, 1, 0], &[0, 0, 1, 1], 3);
        assert!((s.accuracy - 0.75).abs() < 1e-12);
        assert!((s.macro_f1 - (0.8 + 2.0 / 3.0) / 2.0).abs() < 1e-12);
        assert_eq!(s.examples, 4);
        assert_eq!(scores(&[], &[], 2).examples, 0);
    }

    #[test]
    fn peak_rss_is_reported_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(peak_rss_bytes().unwrap_or(0) > 1024 * 1024);
        }
    }
}
