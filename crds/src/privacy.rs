//! The privacy accountant of `aggregation.privacy`: ε of client-level
//! differential privacy after some rounds of the Gaussian mechanism.
//!
//! Each round releases sums of client updates clipped to `C` in L2 with
//! Gaussian noise of standard deviation `σ·C`: one client's whole data moves
//! each sum by at most `C`, so a round is the Gaussian mechanism with noise
//! multiplier `σ`, of Rényi DP `ε_α = α / (2σ²)` at every order `α > 1`
//! (Mironov 2017, Prop. 7). Every client takes part in every round (no
//! sampling, so no amplification), and `T` rounds compose to `T·α / (2σ²)`.
//! The conversion to `(ε, δ)` takes the best order of a fixed grid with the
//! bound of Canonne, Kamath & Steinke 2020 (Prop. 12) / Asoodeh et al. 2020:
//! `ε = ε_α + ln(1 − 1/α) − ln(δ·α) / (α − 1)`. The grid and the bound are
//! those of Google's `dp_accounting` `RdpAccountant`; the tests hold the
//! figures to that library's.

/// The Rényi orders tried: 1.1 … 10.9 by 0.1, 11 … 63, 128, 256, 512, 1024.
fn orders() -> impl Iterator<Item = f64> {
    (1..100)
        .map(|x| 1.0 + f64::from(x) / 10.0)
        .chain((11..64).map(f64::from))
        .chain([128.0, 256.0, 512.0, 1024.0])
}

/// ε after `rounds` rounds of the Gaussian mechanism with noise multiplier
/// `noise_multiplier`, at `delta`. Infinite for σ ≤ 0 or δ ≤ 0 (no
/// guarantee), 0 after no round.
pub fn epsilon(noise_multiplier: f64, rounds: u32, delta: f64) -> f64 {
    if rounds == 0 {
        return 0.0;
    }
    if !(noise_multiplier > 0.0 && delta > 0.0 && delta < 1.0) {
        return f64::INFINITY;
    }
    let per_order = f64::from(rounds) / (2.0 * noise_multiplier * noise_multiplier);
    orders()
        .map(|a| {
            let rdp = per_order * a;
            if delta * delta + (-rdp).exp_m1() > 0.0 {
                0.0
            } else {
                rdp + (-1.0 / a).ln_1p() - (delta * a).ln() / (a - 1.0)
            }
        })
        .fold(f64::INFINITY, f64::min)
        .max(0.0)
}

#[cfg(test)]
mod tests {
    use super::epsilon;

    /// Figures of `dp_accounting` 0.6.0 (`RdpAccountant().compose(
    /// GaussianDpEvent(σ), T).get_epsilon(δ)`).
    #[test]
    fn epsilon_matches_dp_accounting() {
        for (sigma, rounds, delta, expected) in [
            (1.0, 1, 1e-5, 4.728507067217623),
            (1.0, 12, 1e-5, 21.44485232771325),
            (2.0, 12, 1e-5, 9.009958991683897),
            (0.5, 6, 1e-6, 36.429216196844386),
            (4.0, 100, 1e-5, 14.132226163159334),
        ] {
            let got = epsilon(sigma, rounds, delta);
            assert!(
                (got - expected).abs() < 1e-9 * expected,
                "σ {sigma}, {rounds} rounds, δ {delta}: {got} vs {expected}"
            );
        }
    }

    #[test]
    fn more_noise_or_fewer_rounds_is_more_private() {
        assert!(epsilon(2.0, 10, 1e-5) < epsilon(1.0, 10, 1e-5));
        assert!(epsilon(1.0, 5, 1e-5) < epsilon(1.0, 10, 1e-5));
        assert_eq!(epsilon(1.0, 0, 1e-5), 0.0);
        assert!(epsilon(0.0, 3, 1e-5).is_infinite());
        assert!(epsilon(1.0, 3, 0.0).is_infinite());
    }
}
