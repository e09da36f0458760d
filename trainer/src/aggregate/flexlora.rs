//! `flexlora`: FlexLoRA (Bai et al. 2024) within each family: average the
//! full low-rank products `ΔW = B A`, redistribute by truncated SVD to each
//! client's rank.
//!
//! Storage is HetLoRA's (see [`super::hetlora`]): per family the factors at
//! the family's largest rank `R`, `family/<key>/lora.layer{l}.{query,value}.{a,b}`.
//! Here they are the balanced truncated SVD of the aggregated product,
//! `B = U_R √Σ_R`, `A = √Σ_R V_Rᵀ`, components in decreasing singular value
//! (each `U` column's largest-magnitude entry made positive, so the result
//! does not depend on the SVD's sign choice). Truncating them to a client's
//! rank `r` (first `r` rows of `A`, columns of `B`) is then exactly the
//! rank-`r` truncated SVD: a client loads the same tensors as under HetLoRA.
//!
//! Per adapted projection and family, with client `c`'s trained factors
//! `B_c A_c = (truncate(θ_B, r_c) + ΔB_c)(truncate(θ_A, r_c) + ΔA_c)`:
//! `W̄ = Σ_c n_c B_c A_c / N`, the starting point `W₀ = Σ_c n_c
//! truncate(θ_B, r_c) truncate(θ_A, r_c) / N`, `W = W₀ + η (W̄ − W₀)`
//! (`η = 1`: FlexLoRA exactly), then the SVD of `W`. If every client's rank
//! is at least `rank(W̄)`, every client's `B A` equals `W̄` (up to
//! floating point).
//!
//! Cost: a dense `d_out × d_in` f64 accumulator per adapted projection and
//! participating family, `O(d_out · r · d_in)` per client to form `B_c A_c`
//! and one dense SVD per projection and family (libtorch, f64). The SVD is
//! the one place aggregation uses libtorch/LAPACK: its last bits may depend
//! on the LAPACK build, not on the run.

use std::collections::BTreeMap;

use heterotune_crds::spec::AggregationAlgorithm;
use tch::{Kind, Tensor};

use super::array::Array;
use super::common::{
    family_name, family_tensors, lora_schema, truncate, Factor, FamilyAccumulator, FamilySums,
    NextGlobal, HEAD, LORA,
};
use super::{Aggregated, Aggregator, ClientInfo, ClientUpdate, RoundContext};
use crate::{Error, Result};

/// `acc += scale · B A` for `B` `[m, r]`, `A` `[r, n]` (row-major, f64).
fn add_product(acc: &mut [f64], b: &[f64], a: &[f64], m: usize, r: usize, n: usize, scale: f64) {
    for i in 0..m {
        let row = &mut acc[i * n..(i + 1) * n];
        for k in 0..r {
            let coef = scale * b[i * r + k];
            if coef == 0.0 {
                continue;
            }
            for (x, &y) in row.iter_mut().zip(&a[k * n..(k + 1) * n]) {
                *x += coef * y;
            }
        }
    }
}

/// One family's accumulated products.
#[derive(Debug, Default)]
struct FamilyProducts {
    /// Projection stem (`lora.layer3.query`) → `Σ_c n_c B_c A_c`.
    products: BTreeMap<String, Vec<f64>>,
    /// Client rank → `Σ n_c` of the clients of that rank.
    rank_examples: BTreeMap<usize, u64>,
    /// Head deltas and the family's clients/examples.
    sums: FamilySums,
}

/// The `flexlora` aggregator.
#[derive(Debug, Default)]
pub struct FlexLora {
    families: BTreeMap<String, FamilyProducts>,
}

impl FlexLora {
    /// A FlexLoRA aggregator.
    pub fn new() -> Self {
        FlexLora::default()
    }
}

fn stems(previous: &BTreeMap<String, Array>, key: &str) -> Vec<String> {
    family_tensors(previous, key, LORA)
        .keys()
        .filter_map(|n| n.strip_suffix(".a").map(str::to_string))
        .collect()
}

fn factor_pair<'a>(
    previous: &'a BTreeMap<String, Array>,
    key: &str,
    stem: &str,
) -> Result<(&'a Array, &'a Array)> {
    let get = |suffix: &str| {
        let name = family_name(key, &format!("{stem}.{suffix}"));
        previous.get(&name).ok_or_else(|| {
            Error::config(
                "previous global",
                format!("{name} is missing (LoRA factors come in a/b pairs)"),
            )
        })
    };
    let (a, b) = (get("a")?, get("b")?);
    if a.shape.len() != 2 || b.shape.len() != 2 || a.shape[0] != b.shape[1] {
        return Err(Error::config(
            "previous global",
            format!(
                "family {key} {stem}: factor shapes {:?} and {:?} do not pair",
                a.shape, b.shape
            ),
        ));
    }
    Ok((a, b))
}

/// Balanced rank-`rank` SVD factors of the `m × n` matrix `w`: `(A [rank, n], B [m, rank])`.
fn svd_factors(w: &[f64], m: usize, n: usize, rank: usize) -> Result<(Array, Array)> {
    let t = Tensor::f_from_slice(w)?.f_reshape([m as i64, n as i64])?;
    let (u, s, v) = t.f_svd(true, true)?;
    let k = u.size()[1] as usize;
    let u: Vec<f64> = Vec::<f64>::try_from(u.f_contiguous()?.f_flatten(0, -1)?)?;
    let s: Vec<f64> = Vec::<f64>::try_from(s.f_to_kind(Kind::Double)?)?;
    let v: Vec<f64> = Vec::<f64>::try_from(v.f_contiguous()?.f_flatten(0, -1)?)?; // [n, k]
    let mut a = vec![0.0f64; rank * n];
    let mut b = vec![0.0f64; m * rank];
    for c in 0..rank.min(k) {
        let root = s[c].max(0.0).sqrt();
        // Sign convention: the largest-magnitude entry of U[:, c] is positive.
        let mut best = 0usize;
        for i in 0..m {
            if u[i * k + c].abs() > u[best * k + c].abs() {
                best = i;
            }
        }
        let sign = if u[best * k + c] < 0.0 { -1.0 } else { 1.0 };
        for i in 0..m {
            b[i * rank + c] = sign * u[i * k + c] * root;
        }
        for j in 0..n {
            a[c * n + j] = sign * v[j * k + c] * root;
        }
    }
    Ok((
        Array::from_f64(&[rank, n], &a),
        Array::from_f64(&[m, rank], &b),
    ))
}

impl Aggregator for FlexLora {
    fn algorithm(&self) -> AggregationAlgorithm {
        AggregationAlgorithm::Flexlora
    }

    fn expected_tensors(
        &self,
        ctx: &RoundContext<'_>,
        client: &ClientInfo,
    ) -> Result<BTreeMap<String, Vec<usize>>> {
        let schema = lora_schema(ctx, client)?;
        for stem in stems(ctx.previous, &client.family) {
            factor_pair(ctx.previous, &client.family, &stem)?;
        }
        Ok(schema)
    }

    fn add(&mut self, ctx: &RoundContext<'_>, update: ClientUpdate) -> Result<()> {
        let key = &update.family;
        let fam = self.families.entry(key.clone()).or_default();
        let w = update.num_examples as f64;
        let r = update.lora_rank;
        for stem in stems(ctx.previous, key) {
            let (full_a, full_b) = factor_pair(ctx.previous, key, &stem)?;
            let (m, n) = (full_b.shape[0], full_a.shape[1]);
            let trained = |factor: Factor, full: &Array, suffix: &str| -> Result<Vec<f64>> {
                let delta = update
                    .tensors
                    .get(&format!("{stem}.{suffix}"))
                    .ok_or_else(|| {
                        Error::config(
                            "aggregate",
                            format!("verified update lacks {stem}.{suffix}"),
                        )
                    })?;
                Ok(truncate(factor, full, r)
                    .data
                    .iter()
                    .zip(&delta.data)
                    .map(|(&s, &d)| f64::from(s) + f64::from(d))
                    .collect())
            };
            let a = trained(Factor::A, full_a, "a")?;
            let b = trained(Factor::B, full_b, "b")?;
            let acc = fam
                .products
                .entry(stem.clone())
                .or_insert_with(|| vec![0.0; m * n]);
            add_product(acc, &b, &a, m, r, n, w);
        }
        *fam.rank_examples.entry(r).or_default() += update.num_examples;
        // The head (the only non-LoRA tensors) as sample-weighted deltas.
        let head = ClientUpdate {
            client: update.client.clone(),
            family: update.family.clone(),
            num_examples: update.num_examples,
            lora_rank: r,
            tensors: update
                .tensors
                .into_iter()
                .filter(|(n, _)| n.starts_with(HEAD))
                .collect(),
        };
        fam.sums.add(&head);
        Ok(())
    }

    fn finish(self: Box<Self>, ctx: &RoundContext<'_>) -> Result<Aggregated> {
        let mut heads = FamilyAccumulator::new();
        let mut products = BTreeMap::new();
        for (key, fam) in self.families {
            heads.insert(key.clone(), fam.sums);
            products.insert(key, (fam.products, fam.rank_examples));
        }
        let mut next = NextGlobal::new(ctx, &heads);
        for key in ctx.families.keys() {
            let stems = stems(ctx.previous, key);
            let (Some((fam_products, rank_examples)), Some(sums)) =
                (products.get(key), heads.get(key))
            else {
                for stem in &stems {
                    let (a, b) = factor_pair(ctx.previous, key, stem)?;
                    let out = &mut next.out;
                    next.step
                        .carry(out, &family_name(key, &format!("{stem}.a")), a);
                    next.step
                        .carry(out, &family_name(key, &format!("{stem}.b")), b);
                }
                continue;
            };
            let total = sums.examples as f64;
            let mut sq = 0.0;
            for stem in &stems {
                let (full_a, full_b) = factor_pair(ctx.previous, key, stem)?;
                let (m, n, rank) = (full_b.shape[0], full_a.shape[1], full_a.shape[0]);
                let Some(sum) = fam_products.get(stem) else {
                    continue;
                };
                let mut base = vec![0.0; m * n];
                for (&r, &ex) in rank_examples {
                    let a = truncate(Factor::A, full_a, r).to_f64();
                    let b = truncate(Factor::B, full_b, r).to_f64();
                    add_product(&mut base, &b, &a, m, r, n, ex as f64 / total);
                }
                let lr = next.step.lr();
                let w: Vec<f64> = sum
                    .iter()
                    .zip(&base)
                    .map(|(&s, &b0)| {
                        let mean = s / total;
                        sq += (mean - b0) * (mean - b0);
                        b0 + lr * (mean - b0)
                    })
                    .collect();
                let (a, b) = svd_factors(&w, m, n, rank)?;
                next.out.insert(family_name(key, &format!("{stem}.a")), a);
                next.out.insert(family_name(key, &format!("{stem}.b")), b);
            }
            if let Some(f) = next.families.get_mut(key) {
                f.update_norms.insert("lora".into(), sq.sqrt());
            }
        }
        next.average_head(ctx, &heads);
        Ok(next.done(Vec::new(), 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svd_factors_reconstruct_a_low_rank_matrix() {
        // Rank 2, 4 × 3 (row 2 = 2 · row 0, row 3 = 2 · row 1).
        let w = [
            1.0, 2.0, 0.0, //
            0.0, 1.0, 4.0, //
            2.0, 4.0, 0.0, //
            0.0, 2.0, 8.0,
        ];
        let (a, b) = svd_factors(&w, 4, 3, 3).expect("svd");
        let mut back = vec![0.0; 12];
        add_product(&mut back, &b.to_f64(), &a.to_f64(), 4, 3, 3, 1.0);
        for (x, y) in back.iter().zip(&w) {
            assert!((x - y).abs() < 1e-5, "{back:?}");
        }
        // The third component is (numerically) zero.
        assert!(a.data[6..].iter().all(|v| v.abs() < 1e-5));
    }
}
