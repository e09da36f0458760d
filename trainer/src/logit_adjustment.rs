//! Label-skew correction of the training loss (`training.logitAdjustment:
//! clientPrior`; logit adjustment, Menon et al. 2021, as FedLC applies it
//! to federated label skew).
//!
//! A client's data holds its own label prior `π_k`; a model trained with
//! plain cross-entropy learns `p(y | x)` under `π_k`, so a client whose data
//! is nearly one class says that class for everything. Training on
//! `logits + log π_k − log π_fed` instead leaves the plain logits to learn
//! the posterior under the federation's prior `π_fed`: the correction sits
//! in the loss only; evaluation and everything exchanged use the plain
//! logits.
//!
//! A class the client holds no example of is left out of the softmax
//! (restricted softmax, FedRS): its own data says nothing about telling that
//! class apart, and under Adam a loss that keeps pushing it down moves the
//! weights a full step each time, however small the gradient. A client with
//! one class then has no cross-entropy at all and learns from the
//! distillation terms only. Measured on the heterogeneity benchmark and not
//! the default (docs/method.md, "Logit adjustment").

use tch::{Kind, Tensor};

/// Smallest federation share used, so a class no client holds (share 0)
/// gives a finite offset.
const MIN_FEDERATION_SHARE: f64 = 1e-4;
/// The offset of a class the client holds no example of: far enough below
/// any logit that its softmax share is exactly 0 in f32 (no gradient), and
/// finite, so no `inf − inf` can appear.
pub const ABSENT: f64 = -1e4;

/// Per-class offsets `log π_client(c) − log π_fed(c)`: `π_client` the
/// client's share of its training `labels` in class `c` ([`ABSENT`] for a
/// class it has none of), `π_fed` the federation's prior (uniform when
/// `None`: before the first global that carries one).
pub fn offsets(
    labels: impl IntoIterator<Item = usize>,
    classes: usize,
    federation: Option<&[f64]>,
) -> Vec<f64> {
    let mut counts = vec![0f64; classes];
    for label in labels {
        if let Some(c) = counts.get_mut(label) {
            *c += 1.0;
        }
    }
    let total: f64 = counts.iter().sum();
    let uniform = vec![1.0 / classes.max(1) as f64; classes];
    let fed = federation
        .filter(|f| f.len() == classes)
        .unwrap_or(&uniform);
    let fed_total: f64 = fed.iter().map(|p| p.max(MIN_FEDERATION_SHARE)).sum();
    counts
        .iter()
        .zip(fed)
        .map(|(&n, p)| {
            if n > 0.0 {
                (n / total).ln() - (p.max(MIN_FEDERATION_SHARE) / fed_total).ln()
            } else {
                ABSENT
            }
        })
        .collect()
}

/// `logits` (as f32) plus `offsets` on the class axis: the logits the
/// training cross-entropy sees. Without offsets, the logits as they are.
pub fn adjusted(logits: &Tensor, offsets: Option<&[f64]>) -> Tensor {
    match offsets {
        None => logits.shallow_clone(),
        Some(o) => {
            let o = Tensor::from_slice(o)
                .to_kind(Kind::Float)
                .to_device(logits.device());
            logits.to_kind(Kind::Float) + o
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_balanced_client_in_a_uniform_federation_has_no_offset() {
        let o = offsets([0, 1, 0, 1], 2, None);
        assert!(o.iter().all(|v| v.abs() < 1e-12), "{o:?}");
        let o = offsets([0, 1, 1, 0], 2, Some(&[0.5, 0.5]));
        assert!(o.iter().all(|v| v.abs() < 1e-12), "{o:?}");
    }

    #[test]
    fn a_skewed_client_is_adjusted_by_its_share_and_an_absent_class_left_out() {
        let o = offsets([0, 0, 0, 1], 3, Some(&[0.25, 0.25, 0.5]));
        // π_client = (3/4, 1/4, 0): log 3 and log 1 against log 0.25 each.
        assert!((o[0] - 3f64.ln()).abs() < 1e-9, "{o:?}");
        assert!(o[1].abs() < 1e-9, "{o:?}");
        assert_eq!(o[2], ABSENT);
    }

    #[test]
    fn a_class_the_federation_lacks_stays_finite() {
        let o = offsets([0, 0, 1, 2], 3, Some(&[0.5, 0.5, 0.0]));
        assert!(o.iter().all(|v| v.is_finite()), "{o:?}");
        // A prior of the wrong length reads as uniform.
        assert_eq!(offsets([0, 1], 2, Some(&[1.0])), offsets([0, 1], 2, None));
    }

    #[test]
    fn a_one_class_client_has_no_cross_entropy_and_no_gradient() {
        // Logits that say the class the client lacks: plain cross-entropy on
        // the client's only class is large, the adjusted one 0, and so is
        // its gradient.
        let logits = Tensor::from_slice(&[0.0f32, 1.0])
            .reshape([1, 2])
            .set_requires_grad(true);
        let labels = Tensor::from_slice(&[0i64]);
        let o = offsets(std::iter::repeat_n(0, 98), 2, None);
        let plain = logits.cross_entropy_for_logits(&labels).double_value(&[]);
        let loss = adjusted(&logits, Some(&o)).cross_entropy_for_logits(&labels);
        loss.backward();
        let adj = loss.double_value(&[]);
        let grad = logits.grad().abs().max().double_value(&[]);
        assert!(
            plain > 1.0 && adj == 0.0 && grad == 0.0,
            "plain {plain}, adjusted {adj}, grad {grad}"
        );
        let same = adjusted(&logits, None);
        assert!(same.equal(&logits));
    }
}
