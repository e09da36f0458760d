//! DeMA, the dense mixture of adapters, as docs/method describes it.
//!
//! At every adapted layer `l` (see [`SlotMap`]) of a backbone of hidden size
//! `d`, with slot `s = slot(l)`:
//!
//! ```text
//! z  = D_l · RMSnorm(h)                 D_l: [r, d]      family part
//! g  = softmax(W_g z + b_g)             W_g: [K, r]      shared (slot s)
//! m  = Σ_k g_k (E_k z + e_k)            E:   [K, r, r]   shared (slot s), all K experts run
//! h' = h + scale · U_l m                U_l: [d, r]      family part, zero-initialised
//! ```
//!
//! `RMSnorm` is parameter-free (`x / sqrt(mean(x²) + 1e-6)`). The adapter
//! acts on the layer's output (the residual stream) and always computes in
//! f32: a bf16/f16 hidden state is cast in and the result cast back.
//!
//! Tensor names are the wire format between clients and server (relative to
//! the `nn::Path` given to [`Dema::new`]; with `vs.root()` they are exactly):
//!
//! | name | shape | part |
//! |---|---|---|
//! | `shared.slot{s}.experts.weight` | `[K, r, r]` | shared across families |
//! | `shared.slot{s}.experts.bias` | `[K, r]` | shared |
//! | `shared.slot{s}.gate.weight` | `[K, r]` | shared |
//! | `shared.slot{s}.gate.bias` | `[K]` | shared |
//! | `family.layer{l}.down.weight` | `[r, d]` | family-specific |
//! | `family.layer{l}.up.weight` | `[d, r]` | family-specific |
//!
//! Initialisation (U = 0, so a fresh adapter is the identity): `D ~ N(0, 1/d)`,
//! `E ~ N(0, 1/r)`, `W_g ~ N(0, 0.1²)`, biases 0. The random draws come from
//! ChaCha8 seeded with `initSeed` on a stream keyed by the tensor's wire name,
//! so every client, of any family and on any device, and the server create
//! bit-identical shared tensors from the same seed, whatever else they build.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::{nn, Device, Kind, Tensor};

use heterotune_crds::model::{LayerSelection, SlotMap};

use crate::data::split::{seeded_rng, standard_normal, uniform01};
use crate::error::{Error, Result};
use crate::models::BackboneInfo;

/// Epsilon of the parameter-free RMS norm on the adapter input.
pub const RMS_EPS: f64 = 1e-6;

fn default_rank() -> usize {
    8
}
fn default_experts() -> usize {
    4
}
fn default_slots() -> usize {
    3
}
fn default_scale() -> f64 {
    1.0
}

/// DeMA hyper-parameters (part of the job configuration).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DemaConfig {
    /// Rank `r` of the common space. Default 8.
    #[serde(default = "default_rank")]
    pub rank: usize,
    /// Number of experts `K` per slot (all active). Default 4.
    #[serde(default = "default_experts")]
    pub experts: usize,
    /// Number of slots `S` (at most the depth of the shallowest family's
    /// window). Default 3.
    #[serde(default = "default_slots")]
    pub slots: usize,
    /// Output scale `s`. Default 1.0.
    #[serde(default = "default_scale")]
    pub scale: f64,
    /// Scale the output by the input's RMS (`adapter.outputScale: residual`):
    /// `h + s · rms(h) · U m`. Default false (`h + s · U m`).
    #[serde(default)]
    pub residual_scale: bool,
    /// Which layers the slot map covers. Default `slotEnds` (full depth).
    #[serde(default)]
    pub layer_selection: LayerSelection,
    /// Adapt every layer of each slot group (sharing the slot's experts)
    /// instead of only the group's last layer. Default false.
    #[serde(default)]
    pub every_layer_in_group: bool,
    /// Seed of the initial values (same seed → same shared tensors on
    /// every client). Default 0.
    #[serde(default)]
    pub init_seed: u64,
}

impl Default for DemaConfig {
    fn default() -> Self {
        DemaConfig {
            rank: default_rank(),
            experts: default_experts(),
            slots: default_slots(),
            scale: default_scale(),
            residual_scale: false,
            layer_selection: LayerSelection::SlotEnds,
            every_layer_in_group: false,
            init_seed: 0,
        }
    }
}

impl DemaConfig {
    /// Checks the values that do not depend on the backbone.
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(Error::config("dema.rank", "must be at least 1"));
        }
        if self.experts == 0 {
            return Err(Error::config("dema.experts", "must be at least 1"));
        }
        if self.slots == 0 {
            return Err(Error::config("dema.slots", "must be at least 1"));
        }
        if !self.scale.is_finite() {
            return Err(Error::config(
                "dema.scale",
                format!("must be finite, got {}", self.scale),
            ));
        }
        Ok(())
    }

    /// The slot map of a backbone with `num_layers` layers.
    pub fn slot_map(&self, num_layers: usize) -> Result<SlotMap> {
        Ok(SlotMap::new(
            num_layers,
            self.slots,
            self.layer_selection,
            self.every_layer_in_group,
        )?)
    }
}

/// Shared (cross-family) parameter count: `S * (K*(r*r + r) + K*r + K)`.
pub fn shared_parameter_count(cfg: &DemaConfig) -> usize {
    let (r, k, s) = (cfg.rank, cfg.experts, cfg.slots);
    s * (k * (r * r + r) + k * r + k)
}

/// Family-specific parameter count for a backbone: `2 * r * d` per adapted
/// layer (`2 * S * r * d` with one adapted layer per slot).
pub fn family_parameter_count(cfg: &DemaConfig, info: &BackboneInfo) -> Result<usize> {
    let adapted = cfg.slot_map(info.num_layers)?.adapted_layers().len();
    Ok(2 * cfg.rank * info.hidden_size * adapted)
}

/// Distribution of a variable's initial values.
#[derive(Debug, Clone, Copy)]
pub(crate) enum InitDist {
    Zeros,
    Normal { std: f64 },
    Uniform { bound: f64 },
}

/// Creates trainable f32 variable `name` under `path`, initialised from
/// ChaCha8(`seed`) on a stream keyed by `key` (the tensor's wire name).
/// Errors if the variable already exists (the var store would silently
/// rename it, breaking the wire names).
pub(crate) fn init_var(
    path: &nn::Path,
    name: &str,
    key: &str,
    dims: &[usize],
    dist: InitDist,
    seed: u64,
) -> Result<Tensor> {
    let full = path.path(name);
    if path.get(name).is_some() {
        return Err(Error::config(
            full,
            "a variable with this name already exists in the var store (create the adapter \
             once per var store path)",
        ));
    }
    let shape: Vec<i64> = dims.iter().map(|&d| d as i64).collect();
    let numel: usize = dims.iter().product();
    let values: Option<Vec<f32>> = match dist {
        InitDist::Zeros => None,
        InitDist::Normal { std } => {
            let mut rng = seeded_rng(seed, name_stream(key));
            Some(
                (0..numel)
                    .map(|_| (standard_normal(&mut rng) * std) as f32)
                    .collect(),
            )
        }
        InitDist::Uniform { bound } => {
            let mut rng = seeded_rng(seed, name_stream(key));
            Some(
                (0..numel)
                    .map(|_| ((2.0 * uniform01(&mut rng) - 1.0) * bound) as f32)
                    .collect(),
            )
        }
    };
    let tensor = match values {
        None => Tensor::f_zeros(&shape, (Kind::Float, path.device()))?,
        Some(v) => Tensor::f_from_slice(&v)?
            .f_reshape(&shape)?
            .f_to_device(path.device())?,
    };
    Ok(path.add(name, tensor, true))
}

/// RNG stream for a tensor: the first 8 bytes of sha256("init:" + key).
fn name_stream(key: &str) -> u64 {
    let digest = Sha256::digest(format!("init:{key}").as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(bytes)
}

struct SlotParams {
    experts_weight: Tensor,
    experts_bias: Tensor,
    gate_weight: Tensor,
    gate_bias: Tensor,
}

struct LayerParams {
    slot: usize,
    down: Tensor,
    up: Tensor,
}

/// A DeMA adapter set for one backbone (see the module docs).
pub struct Dema {
    cfg: DemaConfig,
    map: SlotMap,
    hidden_size: usize,
    slots: Vec<SlotParams>,
    layers: BTreeMap<usize, LayerParams>,
    slot_names: Vec<Vec<String>>,
    family_names: Vec<String>,
}

impl std::fmt::Debug for Dema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dema")
            .field("cfg", &self.cfg)
            .field("hidden_size", &self.hidden_size)
            .field("adapted_layers", &self.map.adapted_layers())
            .finish()
    }
}

impl SlotParams {
    /// Creates slot `s`'s variables under `path / "shared" / "slot{s}"`
    /// (rank `r`, `k` experts); also returns their var-store names.
    fn new(
        path: &nn::Path,
        s: usize,
        r: usize,
        k: usize,
        seed: u64,
    ) -> Result<(Self, Vec<String>)> {
        let slot = format!("slot{s}");
        let experts = path.sub("shared").sub(&slot).sub("experts");
        let gate = path.sub("shared").sub(&slot).sub("gate");
        let key = |part: &str, var: &str| format!("shared.{slot}.{part}.{var}");
        let normal = |std: f64| InitDist::Normal { std };
        let params = SlotParams {
            experts_weight: init_var(
                &experts,
                "weight",
                &key("experts", "weight"),
                &[k, r, r],
                normal(1.0 / (r as f64).sqrt()),
                seed,
            )?,
            experts_bias: init_var(
                &experts,
                "bias",
                &key("experts", "bias"),
                &[k, r],
                InitDist::Zeros,
                seed,
            )?,
            gate_weight: init_var(
                &gate,
                "weight",
                &key("gate", "weight"),
                &[k, r],
                normal(0.1),
                seed,
            )?,
            gate_bias: init_var(
                &gate,
                "bias",
                &key("gate", "bias"),
                &[k],
                InitDist::Zeros,
                seed,
            )?,
        };
        let names = vec![
            experts.path("weight"),
            experts.path("bias"),
            gate.path("weight"),
            gate.path("bias"),
        ];
        Ok((params, names))
    }
}

impl Dema {
    /// Creates the adapter variables under `path` for the backbone `info`
    /// describes: `path / "shared" / "slot{s}" / ...` and
    /// `path / "family" / "layer{l}" / ...`, in f32 on `path`'s device.
    pub fn new(path: &nn::Path, cfg: &DemaConfig, info: &BackboneInfo) -> Result<Dema> {
        cfg.validate()?;
        if info.hidden_size == 0 {
            return Err(Error::config(
                "backbone.hiddenSize",
                "the backbone reports hidden size 0",
            ));
        }
        let map = cfg.slot_map(info.num_layers)?;
        let (r, k, d) = (cfg.rank, cfg.experts, info.hidden_size);
        let seed = cfg.init_seed;
        let mut slots = Vec::with_capacity(cfg.slots);
        let mut slot_names = Vec::with_capacity(cfg.slots);
        for s in 0..cfg.slots {
            let (params, names) = SlotParams::new(path, s, r, k, seed)?;
            slots.push(params);
            slot_names.push(names);
        }
        let mut layers = BTreeMap::new();
        let mut family_names = Vec::new();
        for (l, s) in map.adapted_layers() {
            let layer = format!("layer{l}");
            let down = path.sub("family").sub(&layer).sub("down");
            let up = path.sub("family").sub(&layer).sub("up");
            let params = LayerParams {
                slot: s,
                down: init_var(
                    &down,
                    "weight",
                    &format!("family.{layer}.down.weight"),
                    &[r, d],
                    InitDist::Normal {
                        std: 1.0 / (d as f64).sqrt(),
                    },
                    seed,
                )?,
                up: init_var(
                    &up,
                    "weight",
                    &format!("family.{layer}.up.weight"),
                    &[d, r],
                    InitDist::Zeros,
                    seed,
                )?,
            };
            family_names.push(down.path("weight"));
            family_names.push(up.path("weight"));
            layers.insert(l, params);
        }
        Ok(Dema {
            cfg: cfg.clone(),
            map,
            hidden_size: d,
            slots,
            layers,
            slot_names,
            family_names,
        })
    }

    /// The configuration this adapter was built with.
    pub fn config(&self) -> &DemaConfig {
        &self.cfg
    }

    /// The slot map (adapted layers, first adapted layer, ...).
    pub fn slot_map(&self) -> &SlotMap {
        &self.map
    }

    /// Hidden size of the backbone this adapter was built for.
    pub fn hidden_size(&self) -> usize {
        self.hidden_size
    }

    /// Whether layer `layer`'s output is adapted.
    pub fn is_adapted(&self, layer: usize) -> bool {
        self.layers.contains_key(&layer)
    }

    /// Applies the adapter of layer `layer` to that layer's output `hidden`
    /// (`[..., d]`, any float dtype; the result has `hidden`'s dtype). A
    /// layer without an adapter returns `hidden` unchanged (a shallow clone).
    pub fn apply(&self, layer: usize, hidden: &Tensor) -> Tensor {
        let Some(params) = self.layers.get(&layer) else {
            return hidden.shallow_clone();
        };
        let slot = &self.slots[params.slot];
        let kind = hidden.kind();
        let x = if kind == Kind::Float {
            hidden.shallow_clone()
        } else {
            hidden.to_kind(Kind::Float)
        };
        let inv_rms = (x.square().mean_dim(-1, true, Kind::Float) + RMS_EPS).rsqrt();
        let normed = &x * &inv_rms;
        let z = normed.matmul(&params.down.tr()); // [..., r]
        let gate = (z.matmul(&slot.gate_weight.tr()) + &slot.gate_bias).softmax(-1, Kind::Float); // [..., K]
        let experts = Tensor::einsum("...i,koi->...ko", &[&z, &slot.experts_weight], None::<i64>)
            + &slot.experts_bias; // [..., K, r]
        let mixed = (gate.unsqueeze(-1) * experts).sum_dim_intlist(-2, false, Kind::Float); // [..., r]
        let update = mixed.matmul(&params.up.tr()) * self.cfg.scale;
        let out = if self.cfg.residual_scale {
            x + update / inv_rms
        } else {
            x + update
        };
        if kind == Kind::Float {
            out
        } else {
            out.to_kind(kind)
        }
    }

    /// Full var-store names of the shared tensors, slot by slot (experts
    /// weight, experts bias, gate weight, gate bias).
    pub fn shared_names(&self) -> Vec<String> {
        self.slot_names.iter().flatten().cloned().collect()
    }

    /// Full var-store names of slot `slot`'s shared tensors (empty if no such slot).
    pub fn slot_names(&self, slot: usize) -> Vec<String> {
        self.slot_names.get(slot).cloned().unwrap_or_default()
    }

    /// Full var-store names of the family-specific tensors, layer by layer
    /// (down, up).
    pub fn family_names(&self) -> Vec<String> {
        self.family_names.clone()
    }

    /// Shared parameter count of this adapter.
    pub fn shared_parameter_count(&self) -> usize {
        shared_parameter_count(&self.cfg)
    }

    /// Family-specific parameter count of this adapter.
    pub fn family_parameter_count(&self) -> usize {
        2 * self.cfg.rank * self.hidden_size * self.layers.len()
    }
}

/// Origin named in errors about in-memory tensor maps.
const IN_MEMORY: &str = "<adapter tensors>";

fn shape_of(t: &Tensor) -> Vec<i64> {
    t.size()
}

/// Copies the variables `names` of `vs` into a map of detached CPU f32
/// tensors (independent of the variables: later training does not change them).
pub fn export_named(vs: &nn::VarStore, names: &[String]) -> Result<HashMap<String, Tensor>> {
    let vars = vs.variables();
    let mut out = HashMap::with_capacity(names.len());
    for name in names {
        let var = vars.get(name).ok_or_else(|| {
            Error::model(IN_MEMORY, format!("no variable `{name}` in the var store"))
        })?;
        let copy = var
            .detach()
            .f_to_device(Device::Cpu)?
            .f_to_kind(Kind::Float)?
            .f_contiguous()?
            .copy();
        out.insert(name.clone(), copy);
    }
    Ok(out)
}

/// Copies the tensors `names` from `map` into the variables of `vs`, with
/// exact shape checks (any float dtype and device is accepted and
/// converted). Returns how many tensors were loaded.
///
/// With `strict`, every name must be in `map` and `map` must hold nothing
/// else; without it, names missing from `map` are skipped and extra
/// entries ignored. A name that is not a variable of `vs`, or a shape
/// mismatch, is always an error that names the tensor and both shapes.
pub fn load_named(
    vs: &nn::VarStore,
    map: &HashMap<String, Tensor>,
    names: &[String],
    strict: bool,
) -> Result<usize> {
    let vars = vs.variables();
    if strict {
        let mut extra: Vec<&String> = map.keys().filter(|k| !names.contains(k)).collect();
        if !extra.is_empty() {
            extra.sort();
            return Err(Error::model(
                IN_MEMORY,
                format!("unexpected tensors (strict load): {extra:?}"),
            ));
        }
    }
    let mut loaded = 0;
    for name in names {
        let mut var = vars
            .get(name)
            .ok_or_else(|| {
                Error::model(IN_MEMORY, format!("no variable `{name}` in the var store"))
            })?
            .shallow_clone();
        let Some(src) = map.get(name) else {
            if strict {
                return Err(Error::model(
                    IN_MEMORY,
                    format!("tensor `{name}` missing (strict load)"),
                ));
            }
            continue;
        };
        if shape_of(src) != shape_of(&var) {
            return Err(Error::model(
                IN_MEMORY,
                format!(
                    "tensor `{name}`: expected shape {:?}, found {:?}",
                    shape_of(&var),
                    shape_of(src)
                ),
            ));
        }
        if !src.is_floating_point() {
            return Err(Error::model(
                IN_MEMORY,
                format!(
                    "tensor `{name}`: expected a float tensor, found {:?}",
                    src.kind()
                ),
            ));
        }
        tch::no_grad(|| var.f_copy_(src))?;
        loaded += 1;
    }
    Ok(loaded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::artifact::{from_safetensors_kept, to_safetensors, write_atomic, StoreDtype};
    use crate::models::Family;
    use std::path::Path;

    fn info(d: usize, layers: usize) -> BackboneInfo {
        BackboneInfo {
            family: Family::Bert,
            hidden_size: d,
            num_layers: layers,
            vocab_size: 100,
            num_parameters: 0,
        }
    }

    fn build(d: usize, layers: usize, cfg: &DemaConfig) -> (nn::VarStore, Dema) {
        let vs = nn::VarStore::new(Device::Cpu);
        let dema = Dema::new(&vs.root(), cfg, &info(d, layers)).unwrap();
        (vs, dema)
    }

    fn hidden(d: usize) -> Tensor {
        tch::manual_seed(0);
        Tensor::randn([2, 5, d as i64], (Kind::Float, Device::Cpu)) * 3.0
    }

    #[test]
    fn names_and_shapes() {
        let (vs, dema) = build(32, 6, &DemaConfig::default());
        let vars = vs.variables();
        let shape = |n: &str| vars[n].size();
        assert_eq!(vars.len(), 3 * 4 + 3 * 2);
        for s in 0..3 {
            assert_eq!(
                shape(&format!("shared.slot{s}.experts.weight")),
                vec![4, 8, 8]
            );
            assert_eq!(shape(&format!("shared.slot{s}.experts.bias")), vec![4, 8]);
            assert_eq!(shape(&format!("shared.slot{s}.gate.weight")), vec![4, 8]);
            assert_eq!(shape(&format!("shared.slot{s}.gate.bias")), vec![4]);
        }
        for l in [1, 3, 5] {
            assert_eq!(shape(&format!("family.layer{l}.down.weight")), vec![8, 32]);
            assert_eq!(shape(&format!("family.layer{l}.up.weight")), vec![32, 8]);
        }
        assert_eq!(
            dema.slot_names(1),
            vec![
                "shared.slot1.experts.weight",
                "shared.slot1.experts.bias",
                "shared.slot1.gate.weight",
                "shared.slot1.gate.bias"
            ]
        );
        assert_eq!(dema.shared_names().len(), 12);
        assert_eq!(
            dema.family_names(),
            vec![
                "family.layer1.down.weight",
                "family.layer1.up.weight",
                "family.layer3.down.weight",
                "family.layer3.up.weight",
                "family.layer5.down.weight",
                "family.layer5.up.weight"
            ]
        );
        assert!(vars
            .values()
            .all(|v| v.kind() == Kind::Float && v.requires_grad()));
        assert!(dema.is_adapted(3) && !dema.is_adapted(2));
        assert_eq!(dema.apply(2, &hidden(32)).size(), vec![2, 5, 32]);
        // A prefix path prefixes the names.
        let vs2 = nn::VarStore::new(Device::Cpu);
        let d2 = Dema::new(&(vs2.root() / "dema"), &DemaConfig::default(), &info(32, 6)).unwrap();
        assert_eq!(d2.shared_names()[0], "dema.shared.slot0.experts.weight");
        // Building twice on the same path is an error, not a silent rename.
        let err = Dema::new(&vs.root(), &DemaConfig::default(), &info(32, 6)).unwrap_err();
        assert!(err.to_string().contains("already exists"), "{err}");
    }

    #[test]
    fn init_statistics() {
        let cfg = DemaConfig {
            rank: 16,
            experts: 8,
            ..DemaConfig::default()
        };
        let (vs, _) = build(256, 3, &cfg);
        let vars = vs.variables();
        let std = |n: &str| vars[n].std(true).double_value(&[]);
        assert!((std("family.layer0.down.weight") - 1.0 / 16.0).abs() < 0.005);
        assert!((std("shared.slot0.experts.weight") - 0.25).abs() < 0.02);
        assert!((std("shared.slot0.gate.weight") - 0.1).abs() < 0.02);
        for n in [
            "family.layer0.up.weight",
            "shared.slot0.experts.bias",
            "shared.slot0.gate.bias",
        ] {
            assert_eq!(vars[n].abs().sum(Kind::Float).double_value(&[]), 0.0, "{n}");
        }
    }

    #[test]
    fn shared_init_is_identical_across_families() {
        let cfg = DemaConfig::default();
        let (vs_a, a) = build(32, 6, &cfg);
        let (vs_b, b) = build(48, 30, &cfg);
        assert_eq!(a.shared_names(), b.shared_names());
        let (va, vb) = (vs_a.variables(), vs_b.variables());
        for n in a.shared_names() {
            assert!(va[&n].equal(&vb[&n]), "{n}");
        }
        let other = DemaConfig {
            init_seed: 1,
            ..cfg
        };
        let (vs_c, _) = build(32, 6, &other);
        let n = "shared.slot0.experts.weight";
        assert!(!va[n].equal(&vs_c.variables()[n]));
    }

    #[test]
    fn zero_up_projection_is_the_identity() {
        let (_vs, dema) = build(32, 6, &DemaConfig::default());
        let h = hidden(32);
        for l in [1, 3, 5] {
            assert!(dema.apply(l, &h).equal(&h));
        }
        let hb = h.to_kind(Kind::BFloat16);
        let out = dema.apply(3, &hb);
        assert_eq!(out.kind(), Kind::BFloat16);
        assert!(out.equal(&hb));
    }

    #[test]
    fn training_step_reaches_every_part() {
        use tch::nn::OptimizerConfig;
        let (vs, dema) = build(32, 6, &DemaConfig::default());
        let h = hidden(32);
        let target = Tensor::randn([2, 5, 32], (Kind::Float, Device::Cpu));
        let vars = vs.variables();
        let grad_norm = |n: &str| {
            let g = vars[n].grad();
            if g.defined() {
                g.norm().double_value(&[])
            } else {
                0.0
            }
        };
        let mut opt = nn::Adam::default().build(&vs, 1e-2).unwrap();

        let loss = (dema.apply(3, &h) - &target).square().mean(Kind::Float);
        opt.zero_grad();
        loss.backward();
        // With U = 0 only U gets a gradient.
        assert!(grad_norm("family.layer3.up.weight") > 0.0);
        assert_eq!(grad_norm("shared.slot1.experts.weight"), 0.0);
        opt.step();
        assert!(
            vars["family.layer3.up.weight"]
                .abs()
                .sum(Kind::Float)
                .double_value(&[])
                > 0.0
        );
        let out = dema.apply(3, &h);
        assert!(!out.equal(&h));

        let loss = (out - &target).square().mean(Kind::Float);
        opt.zero_grad();
        loss.backward();
        for n in [
            "family.layer3.down.weight",
            "family.layer3.up.weight",
            "shared.slot1.experts.weight",
            "shared.slot1.experts.bias",
            "shared.slot1.gate.weight",
            "shared.slot1.gate.bias",
        ] {
            assert!(grad_norm(n) > 0.0, "{n} got no gradient");
        }
        // Other slots' experts are untouched by layer 3.
        assert_eq!(grad_norm("shared.slot0.experts.weight"), 0.0);
    }

    #[test]
    fn residual_scale_multiplies_the_update_by_the_tokens_rms() {
        let fixed_cfg = DemaConfig::default();
        let (vs, fixed) = build(32, 3, &fixed_cfg);
        let residual_cfg = DemaConfig {
            residual_scale: true,
            ..DemaConfig::default()
        };
        let (vs_r, residual) = build(32, 3, &residual_cfg);
        let up = Tensor::randn([32, 8], (Kind::Float, Device::Cpu));
        tch::no_grad(|| {
            for v in [&vs, &vs_r] {
                v.variables()["family.layer1.up.weight"]
                    .shallow_clone()
                    .copy_(&up);
            }
        });
        // Tokens at very different scales (as SmolLM2's residual stream).
        let h = hidden(32) * Tensor::from_slice(&[0.3f32, 25.0]).view([2, 1, 1]);
        let rms = (h.square().mean_dim(-1, true, Kind::Float) + RMS_EPS).sqrt();
        let want = &h + (fixed.apply(1, &h) - &h) * &rms;
        let got = residual.apply(1, &h);
        let diff = ((got - &want).abs() / (want.abs() + 1e-3))
            .max()
            .double_value(&[]);
        assert!(diff < 1e-4, "{diff}");
    }

    #[test]
    fn apply_matches_a_per_expert_loop() {
        let (vs, dema) = build(32, 3, &DemaConfig::default());
        let vars = vs.variables();
        tch::no_grad(|| {
            vars["family.layer1.up.weight"]
                .shallow_clone()
                .copy_(&Tensor::randn([32, 8], (Kind::Float, Device::Cpu)));
        });
        let h = hidden(32);
        let got = dema.apply(1, &h);
        let v = |n: &str| vars[n].detach();
        let x = &h / (h.square().mean_dim(-1, true, Kind::Float) + RMS_EPS).sqrt();
        let z = x.matmul(&v("family.layer1.down.weight").tr());
        let g = (z.matmul(&v("shared.slot1.gate.weight").tr()) + v("shared.slot1.gate.bias"))
            .softmax(-1, Kind::Float);
        let mut m = Tensor::zeros([2, 5, 8], (Kind::Float, Device::Cpu));
        for k in 0..4 {
            let e = z.matmul(&v("shared.slot1.experts.weight").get(k).tr())
                + v("shared.slot1.experts.bias").get(k);
            m += g.select(-1, k).unsqueeze(-1) * e;
        }
        let want = &h + m.matmul(&v("family.layer1.up.weight").tr());
        let diff = (got - want).abs().max().double_value(&[]);
        assert!(diff < 1e-4, "{diff}");
    }

    #[test]
    fn parameter_counts() {
        let cfg = DemaConfig::default();
        // method.md: S*(K*(r*r+r) + K*r + K) = 3*(4*72 + 32 + 4) = 972 (1.9 KB in bf16).
        assert_eq!(shared_parameter_count(&cfg), 972);
        assert_eq!(
            family_parameter_count(&cfg, &info(384, 6)).unwrap(),
            2 * 3 * 8 * 384
        );
        for (d, layers, every) in [(32, 6, false), (48, 30, false), (32, 6, true)] {
            let cfg = DemaConfig {
                every_layer_in_group: every,
                ..DemaConfig::default()
            };
            let (vs, dema) = build(d, layers, &cfg);
            let vars = vs.variables();
            let count =
                |names: Vec<String>| -> usize { names.iter().map(|n| vars[n].numel()).sum() };
            assert_eq!(count(dema.shared_names()), shared_parameter_count(&cfg));
            assert_eq!(count(dema.family_names()), dema.family_parameter_count());
            assert_eq!(
                dema.family_parameter_count(),
                family_parameter_count(&cfg, &info(d, layers)).unwrap()
            );
            assert_eq!(
                vars.len(),
                dema.shared_names().len() + dema.family_names().len()
            );
        }
        let every = DemaConfig {
            every_layer_in_group: true,
            ..DemaConfig::default()
        };
        assert_eq!(
            family_parameter_count(&every, &info(32, 6)).unwrap(),
            2 * 6 * 8 * 32
        );
    }

    #[test]
    fn config_errors() {
        let vs = nn::VarStore::new(Device::Cpu);
        let err = Dema::new(&vs.root(), &DemaConfig::default(), &info(32, 2)).unwrap_err();
        assert!(err.to_string().contains("dema.slots"), "{err}");
        let cfg = DemaConfig {
            rank: 0,
            ..DemaConfig::default()
        };
        let err = Dema::new(&vs.root(), &cfg, &info(32, 6)).unwrap_err();
        assert!(err.to_string().contains("dema.rank"), "{err}");
        let cfg: DemaConfig = serde_json::from_str(
            r#"{"rank":4,"layerSelection":{"type":"topWindow","layers":6},"everyLayerInGroup":true}"#,
        )
        .unwrap();
        assert_eq!(cfg.experts, 4);
        assert_eq!(cfg.slots, 3);
        assert_eq!(cfg.scale, 1.0);
        assert_eq!(cfg.layer_selection, LayerSelection::TopWindow { layers: 6 });
    }

    #[test]
    fn save_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let (vs_a, a) = build(32, 6, &DemaConfig::default());
        let cfg_b = DemaConfig {
            init_seed: 9,
            ..DemaConfig::default()
        };
        let (vs_b, b) = build(48, 3, &cfg_b); // another family, other init
        let names = a.shared_names();
        let exported = export_named(&vs_a, &names).unwrap();
        assert_eq!(exported.len(), 12);

        // Through a file in f32 (the artifact format), exactly.
        let sorted: BTreeMap<String, Tensor> = exported
            .iter()
            .map(|(k, v)| (k.clone(), v.shallow_clone()))
            .collect();
        let path = dir.path().join("shared.safetensors");
        let (bytes, _) = to_safetensors(&sorted, StoreDtype::F32).unwrap();
        write_atomic(&path, &bytes).unwrap();
        let read: HashMap<String, Tensor> =
            from_safetensors_kept(&std::fs::read(&path).unwrap(), &path)
                .unwrap()
                .into_iter()
                .collect();
        assert_eq!(
            load_named(&vs_b, &read, &b.shared_names(), true).unwrap(),
            12
        );
        let (va, vb) = (vs_a.variables(), vs_b.variables());
        for n in &names {
            assert!(va[n].equal(&vb[n]), "{n}");
        }

        // bf16 on the wire: equal up to bf16 rounding.
        let (bytes, _) = to_safetensors(&sorted, StoreDtype::Bf16).unwrap();
        assert!(bytes.len() < 972 * 2 + 2048);
        let back: HashMap<String, Tensor> = from_safetensors_kept(&bytes, Path::new("<wire>"))
            .unwrap()
            .into_iter()
            .collect();
        assert_eq!(back[&names[0]].kind(), Kind::BFloat16);
        load_named(&vs_b, &back, &names, true).unwrap();
        let diff = (&va[&names[0]] - &vb[&names[0]])
            .abs()
            .max()
            .double_value(&[]);
        assert!(diff > 0.0 && diff < 1e-2, "{diff}");

        // Exported copies do not alias the variables.
        tch::no_grad(|| {
            let _ = va[&names[0]].shallow_clone().fill_(5.0);
        });
        assert!(exported[&names[0]].max().double_value(&[]) < 5.0);
    }

    #[test]
    fn load_errors_name_the_tensor() {
        let (vs, dema) = build(32, 6, &DemaConfig::default());
        let names = dema.shared_names();
        let mut map = export_named(&vs, &names).unwrap();
        let n = "shared.slot0.experts.weight".to_string();
        map.insert(
            n.clone(),
            Tensor::zeros([4, 8, 16], (Kind::Float, Device::Cpu)),
        );
        let err = load_named(&vs, &map, &names, false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&n) && err.contains("[4, 8, 8]") && err.contains("[4, 8, 16]"),
            "{err}"
        );

        let mut map = export_named(&vs, &names).unwrap();
        map.remove(&n);
        let err = load_named(&vs, &map, &names, true).unwrap_err().to_string();
        assert!(err.contains(&n) && err.contains("missing"), "{err}");
        assert_eq!(load_named(&vs, &map, &names, false).unwrap(), 11);

        let mut map = export_named(&vs, &names).unwrap();
        map.insert(
            "family.layer1.up.weight".into(),
            Tensor::zeros([32, 8], (Kind::Float, Device::Cpu)),
        );
        let err = load_named(&vs, &map, &names, true).unwrap_err().to_string();
        assert!(
            err.contains("unexpected") && err.contains("family.layer1.up.weight"),
            "{err}"
        );

        let err = export_named(&vs, &["nope".to_string()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("`nope`"), "{err}");
    }
}
