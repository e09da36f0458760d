//! The own model's label-skew correction before it is served
//! (`bridge.calibration: poolEnsemble`): a per-class bias on its logits,
//! fitted on the public pool against the federation's ensemble there.
//!
//! The bias `b` minimises the mean cross-entropy of `softmax(logits + b)`
//! against the ensemble's probabilities `t` over the pool. The loss is
//! convex in `b`, its gradient is `mean(softmax(logits + b) − t)`, so at the
//! optimum the model's predictions averaged over the pool equal the
//! ensemble's: a model that over-predicts its client's classes is pulled
//! back to the federation's class balance, and nothing else about it
//! changes (the order of its scores within a class is kept). The Hessian's
//! eigenvalues are at most 1/2, so gradient descent with a step of 2 never
//! overshoots.

use tch::{Device, Kind, Tensor};

use crate::{Error, Result};

/// Largest step count of the fit; it stops earlier once every component of
/// the gradient is below [`TOLERANCE`].
const MAX_STEPS: usize = 5_000;
const TOLERANCE: f64 = 1e-7;
/// Step size (the inverse of the gradient's Lipschitz bound, 1/2).
const STEP: f64 = 2.0;
/// Bound on each bias component: a class the ensemble never predicts drives
/// its bias towards −∞; this keeps it finite.
const BOUND: f64 = 30.0;

/// The bias (`[classes]`, mean zero, f32 on `logits`' device) fitted so that
/// `softmax(logits + bias)` matches `teacher` (`[texts, classes]`
/// probabilities) on average, in the least-cross-entropy sense.
pub fn fit_bias(logits: &Tensor, teacher: &Tensor) -> Result<Tensor> {
    let (ls, ts) = (logits.size(), teacher.size());
    if ls.len() != 2 || ls != ts || ls[0] == 0 {
        return Err(Error::config(
            "spec.bridge.calibration",
            format!(
                "the pool's logits {ls:?} and the ensemble's probabilities {ts:?} do not match \
                 (start a new run if the pool changed)"
            ),
        ));
    }
    let l = logits.to_device(Device::Cpu).to_kind(Kind::Double).detach();
    let t = teacher.to_device(Device::Cpu).to_kind(Kind::Double);
    let mut bias = Tensor::zeros([ls[1]], (Kind::Double, Device::Cpu));
    tch::no_grad(|| {
        for _ in 0..MAX_STEPS {
            let gradient =
                ((&l + &bias).softmax(-1, Kind::Double) - &t).mean_dim(0, false, Kind::Double);
            bias = (&bias - gradient.shallow_clone() * STEP).clamp(-BOUND, BOUND);
            if gradient.abs().max().double_value(&[]) < TOLERANCE {
                break;
            }
        }
    });
    let centred = &bias - bias.mean(Kind::Double);
    Ok(centred.to_kind(Kind::Float).to_device(logits.device()))
}

/// `logits` with `bias` added to every row.
pub fn calibrated(logits: &Tensor, bias: &Tensor) -> Tensor {
    logits + bias.to_device(logits.device())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mean_probs(logits: &Tensor) -> Vec<f64> {
        Vec::<f64>::try_from(
            logits
                .softmax(-1, Kind::Double)
                .mean_dim(0, false, Kind::Double),
        )
        .unwrap()
    }

    #[test]
    fn the_fitted_model_predicts_the_teachers_class_balance_on_average() {
        // A model that says class 0 for most texts; the teacher is balanced.
        let logits =
            Tensor::from_slice(&[3.0f32, 0.0, 2.0, 0.5, 1.0, 0.8, 2.5, -1.0]).reshape([4, 2]);
        let teacher =
            Tensor::from_slice(&[0.9f32, 0.1, 0.2, 0.8, 0.3, 0.7, 0.6, 0.4]).reshape([4, 2]);
        let bias = fit_bias(&logits, &teacher).unwrap();
        let fitted = mean_probs(&calibrated(&logits, &bias));
        let wanted = Vec::<f64>::try_from(teacher.mean_dim(0, false, Kind::Double)).unwrap();
        for (f, w) in fitted.iter().zip(&wanted) {
            assert!((f - w).abs() < 1e-5, "{fitted:?} vs {wanted:?}");
        }
        // Class 1 was under-predicted: its bias is the larger one.
        let b = Vec::<f32>::try_from(&bias).unwrap();
        assert!(b[1] > b[0], "{b:?}");
        assert!((b[0] + b[1]).abs() < 1e-6, "mean zero: {b:?}");
    }

    #[test]
    fn a_model_that_already_matches_its_teacher_is_left_alone() {
        let logits =
            Tensor::from_slice(&[1.0f32, 0.0, -0.5, 0.0, 0.2, 0.1, -1.0, 0.3, 0.0]).reshape([3, 3]);
        let teacher = logits.softmax(-1, Kind::Float);
        let bias = fit_bias(&logits, &teacher).unwrap();
        assert!(bias.abs().max().double_value(&[]) < 1e-5, "{bias}");
    }

    #[test]
    fn a_class_the_teacher_never_predicts_gets_a_finite_bias() {
        let logits = Tensor::from_slice(&[0.0f32, 0.0, 1.0, 0.0]).reshape([2, 2]);
        let teacher = Tensor::from_slice(&[1.0f32, 0.0, 1.0, 0.0]).reshape([2, 2]);
        let bias = Vec::<f32>::try_from(fit_bias(&logits, &teacher).unwrap()).unwrap();
        assert!(bias.iter().all(|b| b.is_finite()), "{bias:?}");
        assert!(bias[0] > bias[1] + 5.0, "{bias:?}");
    }

    #[test]
    fn shapes_that_disagree_are_refused_naming_the_field() {
        let err = fit_bias(
            &Tensor::zeros([4, 2], (Kind::Float, Device::Cpu)),
            &Tensor::zeros([3, 2], (Kind::Float, Device::Cpu)),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("spec.bridge.calibration"), "{err}");
    }
}
