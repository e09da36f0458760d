//! LoRA on the attention query and value projections: the adapter of the
//! baselines (`family-fedavg` of LoRA, HetLoRA, FlexLoRA).
//!
//! For every adapted layer `l` and projection `p` in {query, value}:
//!
//! ```text
//! y = W_p x + scaling · B_{l,p} (A_{l,p} x)      A: [r, d_in], B: [d_out, r]
//! ```
//!
//! Tensor names (the wire format, relative to the `nn::Path` given to
//! [`Lora::new`]; with `vs.root()` they are exactly):
//!
//! | name | shape | init |
//! |---|---|---|
//! | `lora.layer{l}.query.a` | `[r, d]` | `N(0, 1/d)` |
//! | `lora.layer{l}.query.b` | `[d_q, r]` | zeros |
//! | `lora.layer{l}.value.a` | `[r, d]` | `N(0, 1/d)` |
//! | `lora.layer{l}.value.b` | `[d_kv, r]` | zeros |
//!
//! `d_q` is the query projection's output width (`d` for BERT and LLaMA),
//! `d_kv` the value projection's (`n_kv_heads · head_dim` for LLaMA with
//! grouped-query attention, `d` for BERT). B = 0, so a fresh adapter leaves
//! the backbone unchanged.
//!
//! **Heterogeneous ranks.** `A` is drawn row by row from ChaCha8 seeded with
//! `initSeed` on a stream keyed by the tensor's wire name, so the rank-`r`
//! initial `A` is exactly the first `r` rows of any larger rank's: clients of
//! different ranks start from truncations of one max-rank state, which is
//! what HetLoRA and FlexLoRA assume. For the same reason the scaling is
//! `alpha / scaling_rank` with one `scaling_rank` for the whole run
//! (`adapter.rank`), not `alpha / r` per client: with a per-client scaling,
//! padding or truncating factors between ranks would change what they mean.
//! With homogeneous ranks both choices coincide.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tch::{nn, Kind, Tensor};

use crate::adapters::dema::{init_var, InitDist};
use crate::error::{Error, Result};
use crate::models::{Projection, ProjectionDelta};

/// The projections LoRA adapts, in wire-name order.
pub const LORA_PROJECTIONS: [Projection; 2] = [Projection::Query, Projection::Value];

/// Wire-name component of an adapted projection (`query`, `value`).
pub fn projection_name(projection: Projection) -> &'static str {
    match projection {
        Projection::Query => "query",
        Projection::Key => "key",
        Projection::Value => "value",
        Projection::Output => "output",
    }
}

/// Full wire name of a LoRA factor: `lora.layer{layer}.{projection}.{factor}`
/// with `factor` `a` or `b`.
pub fn lora_name(layer: usize, projection: Projection, factor: char) -> String {
    format!("lora.layer{layer}.{}.{factor}", projection_name(projection))
}

/// LoRA hyper-parameters of one client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoraConfig {
    /// This client's rank `r` (`clients[].loraRank`, else `adapter.rank`).
    pub rank: usize,
    /// Scaling numerator (`adapter.loraAlpha`).
    pub alpha: f64,
    /// The rank the scaling divides by; `None` means `rank`. Set it to
    /// `adapter.rank` for every client of a run with heterogeneous ranks
    /// (see the module docs).
    #[serde(default)]
    pub scaling_rank: Option<usize>,
    /// Adapted layers (0-based, ascending, no duplicates).
    pub layers: Vec<usize>,
    /// Seed of the initial values.
    #[serde(default)]
    pub init_seed: u64,
}

impl LoraConfig {
    /// Every layer of a backbone with `num_layers` layers, rank `rank`,
    /// `alpha`, scaling by `alpha / rank`, seed 0.
    pub fn all_layers(num_layers: usize, rank: usize, alpha: f64) -> Self {
        LoraConfig {
            rank,
            alpha,
            scaling_rank: None,
            layers: (0..num_layers).collect(),
            init_seed: 0,
        }
    }

    /// The factor multiplying `B A x`: `alpha / scaling_rank`.
    pub fn scaling(&self) -> f64 {
        self.alpha / self.scaling_rank.unwrap_or(self.rank).max(1) as f64
    }

    /// Checks the values.
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(Error::config("lora.rank", "must be at least 1"));
        }
        if self.scaling_rank == Some(0) {
            return Err(Error::config("lora.scalingRank", "must be at least 1"));
        }
        if !self.alpha.is_finite() {
            return Err(Error::config(
                "lora.alpha",
                format!("must be finite, got {}", self.alpha),
            ));
        }
        if self.layers.windows(2).any(|w| w[0] >= w[1]) {
            return Err(Error::config(
                "lora.layers",
                format!(
                    "must be ascending without duplicates, got {:?}",
                    self.layers
                ),
            ));
        }
        Ok(())
    }
}

/// Input and output widths of the adapted projections of one backbone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProjectionDims {
    /// Width of the projections' input (the hidden size).
    pub hidden: usize,
    /// Output width of the query projection.
    pub query_out: usize,
    /// Output width of the value projection.
    pub value_out: usize,
}

impl ProjectionDims {
    /// All projections `d -> d` (BERT, MPNet, LLaMA without grouped-query attention).
    pub fn square(hidden: usize) -> Self {
        ProjectionDims {
            hidden,
            query_out: hidden,
            value_out: hidden,
        }
    }

    /// A LLaMA decoder: query `d -> heads · head_dim`, value
    /// `d -> kv_heads · head_dim`.
    pub fn llama(config: &crate::models::llama::LlamaConfig) -> Self {
        ProjectionDims {
            hidden: config.hidden_size,
            query_out: config.num_attention_heads * config.head_dim(),
            value_out: config.num_kv_heads() * config.head_dim(),
        }
    }

    /// The projections of the backbone a `config.json` describes (BERT, MPNet:
    /// square; LLaMA: see [`ProjectionDims::llama`]).
    pub fn of_model(config: &crate::models::ModelConfig) -> Self {
        match config {
            crate::models::ModelConfig::Bert(c) => Self::square(c.hidden_size),
            crate::models::ModelConfig::Mpnet(c) => Self::square(c.hidden_size),
            crate::models::ModelConfig::Llama(c) => Self::llama(c),
        }
    }

    /// `(d_in, d_out)` of `projection`.
    pub fn of(&self, projection: Projection) -> (usize, usize) {
        match projection {
            Projection::Value => (self.hidden, self.value_out),
            _ => (self.hidden, self.query_out),
        }
    }
}

/// Trainable LoRA parameter count: `Σ_layers r · (2 d + d_q + d_kv)`.
pub fn lora_parameter_count(cfg: &LoraConfig, dims: &ProjectionDims) -> usize {
    let per_layer: usize = LORA_PROJECTIONS
        .iter()
        .map(|&p| {
            let (d_in, d_out) = dims.of(p);
            cfg.rank * (d_in + d_out)
        })
        .sum();
    per_layer * cfg.layers.len()
}

/// The names and shapes of every LoRA tensor for `cfg` and `dims`, sorted by name.
pub fn lora_shapes(cfg: &LoraConfig, dims: &ProjectionDims) -> BTreeMap<String, Vec<usize>> {
    let mut out = BTreeMap::new();
    for &l in &cfg.layers {
        for p in LORA_PROJECTIONS {
            let (d_in, d_out) = dims.of(p);
            out.insert(lora_name(l, p, 'a'), vec![cfg.rank, d_in]);
            out.insert(lora_name(l, p, 'b'), vec![d_out, cfg.rank]);
        }
    }
    out
}

struct Factors {
    a: Tensor,
    b: Tensor,
}

/// LoRA factors on the query and value projections of one backbone.
pub struct Lora {
    cfg: LoraConfig,
    dims: ProjectionDims,
    scaling: f64,
    factors: BTreeMap<(usize, usize), Factors>,
    names: Vec<String>,
}

impl std::fmt::Debug for Lora {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lora")
            .field("cfg", &self.cfg)
            .field("dims", &self.dims)
            .finish()
    }
}

fn projection_index(projection: Projection) -> Option<usize> {
    LORA_PROJECTIONS.iter().position(|&p| p == projection)
}

impl Lora {
    /// Creates `path / "lora" / "layer{l}" / {"query","value"} / {"a","b"}`
    /// in f32 on `path`'s device (see the module docs for shapes and init).
    pub fn new(path: &nn::Path, cfg: &LoraConfig, dims: &ProjectionDims) -> Result<Lora> {
        cfg.validate()?;
        if dims.hidden == 0 || dims.query_out == 0 || dims.value_out == 0 {
            return Err(Error::config(
                "lora.dims",
                format!("projection widths must be positive, got {dims:?}"),
            ));
        }
        let mut factors = BTreeMap::new();
        let mut names = Vec::new();
        for &l in &cfg.layers {
            for p in LORA_PROJECTIONS {
                let (d_in, d_out) = dims.of(p);
                let sub = path
                    .sub("lora")
                    .sub(format!("layer{l}"))
                    .sub(projection_name(p));
                let a = init_var(
                    &sub,
                    "a",
                    &lora_name(l, p, 'a'),
                    &[cfg.rank, d_in],
                    InitDist::Normal {
                        std: 1.0 / (d_in as f64).sqrt(),
                    },
                    cfg.init_seed,
                )?;
                let b = init_var(
                    &sub,
                    "b",
                    &lora_name(l, p, 'b'),
                    &[d_out, cfg.rank],
                    InitDist::Zeros,
                    cfg.init_seed,
                )?;
                names.push(sub.path("a"));
                names.push(sub.path("b"));
                let index = projection_index(p).unwrap_or(0);
                factors.insert((l, index), Factors { a, b });
            }
        }
        Ok(Lora {
            scaling: cfg.scaling(),
            cfg: cfg.clone(),
            dims: *dims,
            factors,
            names,
        })
    }

    /// The configuration this adapter was built with.
    pub fn config(&self) -> &LoraConfig {
        &self.cfg
    }

    /// The projection widths this adapter was built for.
    pub fn dims(&self) -> &ProjectionDims {
        &self.dims
    }

    /// Full var-store names of every LoRA tensor (layer by layer: query a,
    /// query b, value a, value b). All of them are exchanged.
    pub fn names(&self) -> Vec<String> {
        self.names.clone()
    }

    /// Trainable parameter count of this adapter.
    pub fn parameter_count(&self) -> usize {
        lora_parameter_count(&self.cfg, &self.dims)
    }
}

impl ProjectionDelta for Lora {
    fn delta(&self, layer: usize, projection: Projection, input: &Tensor) -> Option<Tensor> {
        let f = self.factors.get(&(layer, projection_index(projection)?))?;
        let kind = input.kind();
        let x = if kind == Kind::Float {
            input.shallow_clone()
        } else {
            input.to_kind(Kind::Float)
        };
        let out = x.matmul(&f.a.tr()).matmul(&f.b.tr()) * self.scaling;
        Some(if kind == Kind::Float {
            out
        } else {
            out.to_kind(kind)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn build(cfg: &LoraConfig, dims: &ProjectionDims) -> (nn::VarStore, Lora) {
        let vs = nn::VarStore::new(Device::Cpu);
        let lora = Lora::new(&vs.root(), cfg, dims).expect("lora");
        (vs, lora)
    }

    #[test]
    fn names_shapes_and_counts() {
        let cfg = LoraConfig {
            layers: vec![0, 2],
            ..LoraConfig::all_layers(3, 4, 8.0)
        };
        let dims = ProjectionDims {
            hidden: 12,
            query_out: 12,
            value_out: 6,
        };
        let (vs, lora) = build(&cfg, &dims);
        let vars = vs.variables();
        assert_eq!(vars.len(), 8);
        let shapes = lora_shapes(&cfg, &dims);
        for name in lora.names() {
            let want: Vec<i64> = shapes[&name].iter().map(|&d| d as i64).collect();
            assert_eq!(vars[&name].size(), want, "{name}");
        }
        assert_eq!(vars["lora.layer2.value.b"].size(), vec![6, 4]);
        let total: i64 = vars.values().map(|t| t.numel() as i64).sum();
        assert_eq!(total as usize, lora.parameter_count());
        // method.md: LoRA r=8 on q,v of MiniLM-L6 sends 147 KB in bf16.
        let minilm = LoraConfig::all_layers(6, 8, 16.0);
        assert_eq!(
            lora_parameter_count(&minilm, &ProjectionDims::square(384)) * 2,
            147_456
        );
        // SmolLM2-135M (30 layers, 576 wide, 3 kv heads of 64): 922 KB.
        let smol = LoraConfig::all_layers(30, 8, 16.0);
        let dims = ProjectionDims {
            hidden: 576,
            query_out: 576,
            value_out: 192,
        };
        assert_eq!(lora_parameter_count(&smol, &dims) * 2, 921_600);
    }

    #[test]
    fn fresh_adapter_is_zero_and_ranks_share_a_prefix() {
        let dims = ProjectionDims::square(16);
        let small = LoraConfig::all_layers(2, 2, 16.0);
        let large = LoraConfig::all_layers(2, 6, 16.0);
        let (vs_s, lora_s) = build(&small, &dims);
        let (vs_l, _) = build(&large, &dims);
        let x = Tensor::randn([2, 3, 16], (Kind::Float, Device::Cpu));
        let d = lora_s.delta(1, Projection::Query, &x).expect("adapted");
        assert_eq!(d.size(), vec![2, 3, 16]);
        assert_eq!(d.abs().max().double_value(&[]), 0.0);
        assert!(lora_s.delta(1, Projection::Key, &x).is_none());
        assert!(lora_s.delta(5, Projection::Query, &x).is_none());
        let a_s = &vs_s.variables()["lora.layer1.value.a"];
        let a_l = &vs_l.variables()["lora.layer1.value.a"];
        assert!(a_s.equal(&a_l.narrow(0, 0, 2)));
        let std = a_l.std(true).double_value(&[]);
        assert!((std - 0.25).abs() < 0.08, "{std}");
    }

    #[test]
    fn delta_is_scaled_low_rank_product() {
        let dims = ProjectionDims::square(8);
        let cfg = LoraConfig {
            scaling_rank: Some(4),
            ..LoraConfig::all_layers(1, 2, 8.0)
        };
        assert_eq!(cfg.scaling(), 2.0);
        let (vs, lora) = build(&cfg, &dims);
        let vars = vs.variables();
        let b = Tensor::randn([8, 2], (Kind::Float, Device::Cpu));
        tch::no_grad(|| vars["lora.layer0.value.b"].shallow_clone().copy_(&b));
        let x = Tensor::randn([3, 8], (Kind::Float, Device::Cpu));
        let got = lora.delta(0, Projection::Value, &x).expect("adapted");
        let want = x.matmul(&vars["lora.layer0.value.a"].tr()).matmul(&b.tr()) * 2.0;
        assert!((got - want).abs().max().double_value(&[]) < 1e-5);
        let half = lora
            .delta(0, Projection::Value, &x.to_kind(Kind::BFloat16))
            .expect("adapted");
        assert_eq!(half.kind(), Kind::BFloat16);
    }

    #[test]
    fn config_errors() {
        let dims = ProjectionDims::square(8);
        let vs = nn::VarStore::new(Device::Cpu);
        let bad = LoraConfig::all_layers(2, 0, 8.0);
        let err = Lora::new(&vs.root(), &bad, &dims).unwrap_err().to_string();
        assert!(err.contains("lora.rank"), "{err}");
        let bad = LoraConfig {
            layers: vec![1, 1],
            ..LoraConfig::all_layers(2, 2, 8.0)
        };
        let err = Lora::new(&vs.root(), &bad, &dims).unwrap_err().to_string();
        assert!(err.contains("lora.layers"), "{err}");
    }
}
