//! Pieces every algorithm shares: global tensor names, per-family sums of
//! sample-weighted updates, the server step (learning rate and momentum),
//! family averaging of family-specific parts, and the expected tensors of a
//! client (DeMA and LoRA).

use std::collections::BTreeMap;

use super::array::{axpy_f32, divided, Array};
use super::stats::{FamilyStats, GroupStats};
use super::{Aggregated, ClientInfo, ClientUpdate, RoundContext};
use crate::{Error, Result};

/// Prefix of the server's momentum buffers in a global artifact
/// (`server/momentum/<global tensor name>`); clients never load them.
pub const MOMENTUM_PREFIX: &str = "server/momentum/";

/// Global name of family `key`'s tensor `local` (`family/<key>/<local>`).
pub fn family_name(key: &str, local: &str) -> String {
    format!("family/{key}/{local}")
}

/// Local name prefixes of the family-specific parts.
pub(crate) const FAMILY_PARTS: &str = "family.";
pub(crate) const HEAD: &str = "head.";
pub(crate) const SHARED: &str = "shared.";
pub(crate) const LORA: &str = "lora.";
/// Prefix of the bridge model's tensors (`spec.bridge`), in artifacts, the
/// global and a client's private state: `bridge.` + its var-store name.
pub const BRIDGE_PREFIX: &str = "bridge.";
/// Prefix of the public pool's class probabilities (`poolTeacher:
/// ensemble`, [`super::pool`]): not parameters, values sent as they are.
pub const POOL_PREFIX: &str = "pool.";
/// The global's ensemble on the pool: `[pool texts, classes]` probabilities.
pub const POOL_ENSEMBLE: &str = "pool.ensemble";
/// A client's served probabilities on the pool, `[pool texts, classes]`.
pub const POOL_PROBS: &str = "pool.probs";
/// A client's training examples per class, `[classes]`.
pub const POOL_COUNTS: &str = "pool.counts";
/// The global's label prior: the federation's share of training examples
/// per class, `[classes]` (from the clients' [`POOL_COUNTS`]; the
/// `clientPrior` logit adjustment reads it).
pub const POOL_PRIOR: &str = "pool.prior";

/// The tensors of the previous global under `family/<key>/<local_prefix>`,
/// keyed by their local name (prefix `family/<key>/` stripped).
pub(crate) fn family_tensors<'a>(
    previous: &'a BTreeMap<String, Array>,
    key: &str,
    local_prefix: &str,
) -> BTreeMap<String, &'a Array> {
    let prefix = family_name(key, "");
    previous
        .range(prefix.clone()..)
        .take_while(|(n, _)| n.starts_with(&prefix))
        .filter_map(|(n, a)| {
            let local = &n[prefix.len()..];
            local
                .starts_with(local_prefix)
                .then(|| (local.to_string(), a))
        })
        .collect()
}

/// The previous global's top-level `shared.*` tensors.
pub(crate) fn global_shared(previous: &BTreeMap<String, Array>) -> BTreeMap<String, &Array> {
    previous
        .range(SHARED.to_string()..)
        .take_while(|(n, _)| n.starts_with(SHARED))
        .map(|(n, a)| (n.clone(), a))
        .collect()
}

/// Sample-weighted sums of one family's updates: `Σ_c n_c Δ_c` per tensor.
#[derive(Debug, Default)]
pub(crate) struct FamilySums {
    /// `Σ_c n_c`.
    pub examples: u64,
    /// Contributing clients, in the order they were added.
    pub clients: Vec<String>,
    /// Local tensor name → `Σ_c n_c Δ_c` (f64).
    pub sums: BTreeMap<String, Vec<f64>>,
}

impl FamilySums {
    /// Adds `n_c · Δ_c` for every tensor of `update`.
    pub fn add(&mut self, update: &ClientUpdate) {
        let w = update.num_examples as f64;
        for (name, t) in &update.tensors {
            let acc = self
                .sums
                .entry(name.clone())
                .or_insert_with(|| vec![0.0; t.numel()]);
            axpy_f32(acc, w, &t.data);
        }
        self.record(update);
    }

    /// Records `update`'s client and weight without adding tensors.
    pub fn record(&mut self, update: &ClientUpdate) {
        self.examples += update.num_examples;
        self.clients.push(update.client.clone());
    }

    /// `Σ n_c Δ_c / Σ n_c` of tensor `name`.
    pub fn mean(&self, name: &str) -> Option<Vec<f64>> {
        self.sums
            .get(name)
            .map(|s| divided(s, self.examples as f64))
    }
}

/// Per-family sums, families in sorted order.
pub(crate) type FamilyAccumulator = BTreeMap<String, FamilySums>;

/// `θ ← θ + η m`, `m ← β m + Δ` (β = 0: plain server learning rate).
pub(crate) struct ServerStep<'a> {
    lr: f64,
    momentum: f64,
    previous: &'a BTreeMap<String, Array>,
}

impl<'a> ServerStep<'a> {
    /// The step of the spec's `serverLearningRate` and `serverMomentum`.
    pub fn new(ctx: &RoundContext<'a>) -> Self {
        ServerStep {
            lr: ctx.spec.aggregation.server_learning_rate,
            momentum: ctx.spec.aggregation.server_momentum,
            previous: ctx.previous,
        }
    }

    /// The server learning rate.
    pub fn lr(&self) -> f64 {
        self.lr
    }

    /// Writes `name ← base + η (β m_prev + delta)` into `out` (and the new
    /// momentum buffer when β > 0).
    pub fn apply(
        &self,
        out: &mut BTreeMap<String, Array>,
        name: &str,
        base: &Array,
        delta: &[f64],
    ) {
        debug_assert_eq!(base.numel(), delta.len());
        if self.momentum > 0.0 {
            let key = format!("{MOMENTUM_PREFIX}{name}");
            let m: Vec<f64> = match self.previous.get(&key) {
                Some(prev) if prev.shape == base.shape => prev
                    .data
                    .iter()
                    .zip(delta)
                    .map(|(&p, &d)| self.momentum * f64::from(p) + d)
                    .collect(),
                _ => delta.to_vec(),
            };
            let value: Vec<f64> = base
                .data
                .iter()
                .zip(&m)
                .map(|(&b, &v)| f64::from(b) + self.lr * v)
                .collect();
            out.insert(name.to_string(), Array::from_f64(&base.shape, &value));
            out.insert(key, Array::from_f64(&base.shape, &m));
        } else {
            let value: Vec<f64> = base
                .data
                .iter()
                .zip(delta)
                .map(|(&b, &d)| f64::from(b) + self.lr * d)
                .collect();
            out.insert(name.to_string(), Array::from_f64(&base.shape, &value));
        }
    }

    /// Copies `value` to `name` unchanged (no participant updated it), with
    /// its momentum buffer when momentum is on.
    pub fn carry(&self, out: &mut BTreeMap<String, Array>, name: &str, value: &Array) {
        out.insert(name.to_string(), value.clone());
        if self.momentum > 0.0 {
            let key = format!("{MOMENTUM_PREFIX}{name}");
            if let Some(m) = self.previous.get(&key) {
                out.insert(key, m.clone());
            }
        }
    }
}

/// The new global an algorithm's `finish` builds: the server step, the
/// tensors written so far and the family statistics. Every algorithm
/// starts from [`NextGlobal::new`] and ends with [`NextGlobal::done`];
/// what is averaged within each family goes through
/// [`NextGlobal::step_families`].
pub(crate) struct NextGlobal<'a> {
    /// The server step of the spec.
    pub step: ServerStep<'a>,
    /// Global tensors by global name.
    pub out: BTreeMap<String, Array>,
    /// Per-family statistics.
    pub families: BTreeMap<String, FamilyStats>,
}

impl<'a> NextGlobal<'a> {
    /// An empty global, with the family statistics of `acc`.
    pub fn new(ctx: &RoundContext<'a>, acc: &FamilyAccumulator) -> Self {
        NextGlobal {
            step: ServerStep::new(ctx),
            out: BTreeMap::new(),
            families: family_stats(acc),
        }
    }

    /// For every family of the spec, steps its tensors `tensors_of(key)`
    /// (local name → previous value) by `delta_of(mean, previous)`, `mean`
    /// being the family's sample-weighted mean of that tensor in `acc`;
    /// tensors without one keep their values. Records each participating
    /// family's update norm of this part under `part`.
    pub fn step_families(
        &mut self,
        ctx: &RoundContext<'a>,
        acc: &FamilyAccumulator,
        part: &str,
        tensors_of: impl Fn(&str) -> BTreeMap<String, &'a Array>,
        delta_of: impl Fn(Vec<f64>, &Array) -> Vec<f64>,
    ) {
        for key in ctx.families.keys() {
            let sums = acc.get(key);
            let mut sq = 0.0;
            for (local, prev) in tensors_of(key) {
                let global = family_name(key, &local);
                match sums.and_then(|s| s.mean(&local)) {
                    Some(mean) => {
                        let delta = delta_of(mean, prev);
                        sq += super::array::dot(&delta, &delta);
                        self.step.apply(&mut self.out, &global, prev, &delta);
                    }
                    None => self.step.carry(&mut self.out, &global, prev),
                }
            }
            if sums.is_some() {
                if let Some(f) = self.families.get_mut(key) {
                    f.update_norms.insert(part.to_string(), sq.sqrt());
                }
            }
        }
    }

    /// Averages the family-specific tensors `family/<key>/<local_prefix>*`
    /// of every family within the family (sample-weighted deltas, then the
    /// server step); families without participants keep their values.
    pub fn average_within_families(
        &mut self,
        ctx: &RoundContext<'a>,
        acc: &FamilyAccumulator,
        local_prefix: &str,
        part: &str,
    ) {
        let previous = ctx.previous;
        self.step_families(
            ctx,
            acc,
            part,
            |key| family_tensors(previous, key, local_prefix),
            |mean, _| mean,
        );
    }

    /// The head, within each family, when the spec shares it.
    pub fn average_head(&mut self, ctx: &RoundContext<'a>, acc: &FamilyAccumulator) {
        if ctx.spec.adapter.share.head {
            self.average_within_families(ctx, acc, HEAD, "head");
        }
    }

    /// DeMA's family parts (when the spec shares them) and the head, within
    /// each family.
    pub fn average_family_parts(&mut self, ctx: &RoundContext<'a>, acc: &FamilyAccumulator) {
        if ctx.spec.adapter.share.family_parts {
            self.average_within_families(ctx, acc, FAMILY_PARTS, "familyParts");
        }
        self.average_head(ctx, acc);
    }

    /// The aggregation result, with the shared groups' statistics.
    pub fn done(self, groups: Vec<GroupStats>, conflicts_projected: u64) -> Aggregated {
        Aggregated {
            tensors: self.out,
            families: self.families,
            groups,
            conflicts_projected,
            ..Aggregated::default()
        }
    }
}

/// The sums of `update`'s family in `acc` (empty the first time).
pub(crate) fn sums_of<'s>(
    acc: &'s mut FamilyAccumulator,
    update: &ClientUpdate,
) -> &'s mut FamilySums {
    acc.entry(update.family.clone()).or_default()
}

/// Family statistics skeleton (clients, examples, data share) from `acc`.
pub(crate) fn family_stats(acc: &FamilyAccumulator) -> BTreeMap<String, FamilyStats> {
    let total: u64 = acc.values().map(|s| s.examples).sum();
    acc.iter()
        .map(|(k, s)| {
            (
                k.clone(),
                FamilyStats {
                    clients: s.clients.clone(),
                    examples: s.examples,
                    weight: s.examples as f64 / total.max(1) as f64,
                    update_norms: BTreeMap::new(),
                },
            )
        })
        .collect()
}

fn shapes_of(map: &BTreeMap<String, &Array>) -> BTreeMap<String, Vec<usize>> {
    map.iter()
        .map(|(n, a)| (n.clone(), a.shape.clone()))
        .collect()
}

/// Where a DeMA client's shared tensors come from in the previous global.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SharedSource {
    /// Top-level `shared.*` (cmga, fedavg).
    Global,
    /// `family/<key>/shared.*`, else top-level `shared.*` (family-fedavg).
    PerFamily,
}

/// The shared tensors family `key` starts from, by local name.
pub(crate) fn shared_base<'a>(
    ctx: &RoundContext<'a>,
    key: &str,
    source: SharedSource,
) -> BTreeMap<String, &'a Array> {
    if source == SharedSource::PerFamily {
        let own = family_tensors(ctx.previous, key, SHARED);
        if !own.is_empty() {
            return own;
        }
    }
    global_shared(ctx.previous)
}

/// Checks the previous global's shared tensors against the spec's `r`, `K`
/// and (when set) `S`.
pub(crate) fn check_shared_against_spec(
    ctx: &RoundContext<'_>,
    shared: &BTreeMap<String, &Array>,
    origin: &str,
) -> Result<()> {
    let a = &ctx.spec.adapter;
    let (r, k) = (a.rank as usize, a.experts as usize);
    let mut slots = std::collections::BTreeSet::new();
    for (name, t) in shared {
        let want: Option<Vec<usize>> = if name.ends_with(".experts.weight") {
            Some(vec![k, r, r])
        } else if name.ends_with(".experts.bias") || name.ends_with(".gate.weight") {
            Some(vec![k, r])
        } else if name.ends_with(".gate.bias") {
            Some(vec![k])
        } else {
            None
        };
        if let Some(want) = want {
            if t.shape != want {
                return Err(Error::config(
                    "spec.adapter",
                    format!(
                        "{origin}: {name} has shape {:?} but adapter.rank {r} and adapter.experts {k} imply {want:?}",
                        t.shape
                    ),
                ));
            }
        }
        if let Some(group) = group_of(name) {
            slots.insert(group.to_string());
        }
    }
    if let Some(s) = a.slots {
        if slots.len() != s as usize {
            return Err(Error::config(
                "spec.adapter.slots",
                format!("{origin} holds {} slots, the spec sets {s}", slots.len()),
            ));
        }
    }
    Ok(())
}

/// The group of a shared tensor: `shared.slot3.gate.bias` → `shared.slot3`.
pub(crate) fn group_of(name: &str) -> Option<&str> {
    let mut dots = name.match_indices('.').map(|(i, _)| i);
    dots.next()?;
    let second = dots.next()?;
    Some(&name[..second])
}

/// Orders group names by their trailing number (`slot2` before `slot10`).
pub(crate) fn natural_key(group: &str) -> (String, u64) {
    let digits: String = group
        .chars()
        .rev()
        .take_while(|c| c.is_ascii_digit())
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    let stem = group[..group.len() - digits.len()].to_string();
    (stem, digits.parse().unwrap_or(0))
}

/// The tensors a DeMA client sends: the shared part, plus its family's
/// parts and head when the spec shares them. Shapes come from the previous
/// global (for the family's parts: `family/<key>/...`).
pub(crate) fn dema_schema(
    ctx: &RoundContext<'_>,
    client: &ClientInfo,
    source: SharedSource,
) -> Result<BTreeMap<String, Vec<usize>>> {
    let key = &client.family;
    let shared = shared_base(ctx, key, source);
    if shared.is_empty() {
        return Err(Error::config(
            "previous global",
            "holds no shared.* tensors: the initial global (round 0) must hold DeMA's shared part",
        ));
    }
    check_shared_against_spec(ctx, &shared, "the previous global")?;
    let mut out = shapes_of(&shared);
    let share = &ctx.spec.adapter.share;
    for (on, prefix, what) in [
        (share.family_parts, FAMILY_PARTS, "family parts (down/up)"),
        (share.head, HEAD, "head"),
    ] {
        if !on {
            continue;
        }
        let part = family_tensors(ctx.previous, key, prefix);
        if part.is_empty() {
            return Err(Error::config(
                "previous global",
                format!(
                    "holds no {} tensors for family {key} (client {}) although the spec shares its {what}: \
                     the initial global (round 0) must hold every family's shared parts",
                    family_name(key, &format!("{prefix}*")),
                    client.name
                ),
            ));
        }
        out.extend(shapes_of(&part));
    }
    Ok(out)
}

/// Which factor of a LoRA pair a tensor name is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Factor {
    /// `A` `[r, d_in]`: rank along rows.
    A,
    /// `B` `[d_out, r]`: rank along columns.
    B,
}

/// The factor a LoRA tensor name denotes.
pub(crate) fn factor_of(name: &str) -> Option<Factor> {
    if !name.starts_with(LORA) {
        return None;
    }
    if name.ends_with(".a") {
        Some(Factor::A)
    } else if name.ends_with(".b") {
        Some(Factor::B)
    } else {
        None
    }
}

/// The rank a factor of `shape` holds.
pub(crate) fn rank_of(factor: Factor, shape: &[usize]) -> usize {
    match factor {
        Factor::A => shape.first().copied().unwrap_or(0),
        Factor::B => shape.get(1).copied().unwrap_or(0),
    }
}

/// The shape of a max-rank factor truncated to `rank`.
pub(crate) fn truncated_shape(factor: Factor, shape: &[usize], rank: usize) -> Vec<usize> {
    match factor {
        Factor::A => vec![rank, shape[1]],
        Factor::B => vec![shape[0], rank],
    }
}

/// The first `rank` components of a max-rank factor (rows of A, columns of B).
pub(crate) fn truncate(factor: Factor, full: &Array, rank: usize) -> Array {
    let (rows, cols) = (full.shape[0], full.shape[1]);
    match factor {
        Factor::A => Array {
            shape: vec![rank, cols],
            data: full.data[..rank * cols].to_vec(),
        },
        Factor::B => {
            let total = rank_of(Factor::B, &full.shape);
            let mut data = Vec::with_capacity(rows * rank);
            for row in 0..rows {
                data.extend_from_slice(&full.data[row * total..row * total + rank]);
            }
            Array {
                shape: vec![rows, rank],
                data,
            }
        }
    }
}

/// Adds `scale · x` (a rank-`r` factor, f64) into `acc` (a max-rank factor
/// of `full_shape`), zero-padding the missing components.
pub(crate) fn add_padded(
    acc: &mut [f64],
    full_shape: &[usize],
    factor: Factor,
    x: &[f64],
    rank: usize,
    scale: f64,
) {
    match factor {
        Factor::A => {
            for (a, &v) in acc.iter_mut().zip(x) {
                *a += scale * v;
            }
        }
        Factor::B => {
            let total = full_shape[1];
            for row in 0..full_shape[0] {
                let dst = &mut acc[row * total..row * total + rank];
                for (a, &v) in dst.iter_mut().zip(&x[row * rank..(row + 1) * rank]) {
                    *a += scale * v;
                }
            }
        }
    }
}

/// The tensors a LoRA client of rank `client.lora_rank` sends: its family's
/// `lora.*` factors (stored at the family's largest rank in the previous
/// global) truncated to its rank, plus the head when the spec shares it.
pub(crate) fn lora_schema(
    ctx: &RoundContext<'_>,
    client: &ClientInfo,
) -> Result<BTreeMap<String, Vec<usize>>> {
    let key = &client.family;
    let factors = family_tensors(ctx.previous, key, LORA);
    if factors.is_empty() {
        return Err(Error::config(
            "previous global",
            format!(
                "holds no {} tensors for client {}: the initial global (round 0) must hold every family's LoRA factors",
                family_name(key, "lora.*"),
                client.name
            ),
        ));
    }
    let family_rank = ctx.families.get(key).map(|f| f.lora_rank).unwrap_or(0);
    let mut out = BTreeMap::new();
    for (name, t) in &factors {
        let factor = factor_of(name)
            .filter(|_| t.shape.len() == 2)
            .ok_or_else(|| {
                Error::config(
                    "previous global",
                    format!(
                        "{}: not a 2-D LoRA factor (`.a` or `.b`)",
                        family_name(key, name)
                    ),
                )
            })?;
        let stored = rank_of(factor, &t.shape);
        if stored != family_rank {
            return Err(Error::config(
                "spec.clients[].loraRank",
                format!(
                    "{} holds rank {stored}, but the largest LoRA rank of family {key} in the spec is {family_rank}",
                    family_name(key, name)
                ),
            ));
        }
        out.insert(
            name.clone(),
            truncated_shape(factor, &t.shape, client.lora_rank),
        );
    }
    if ctx.spec.adapter.share.head {
        let head = family_tensors(ctx.previous, key, HEAD);
        if head.is_empty() {
            return Err(Error::config(
                "previous global",
                format!(
                    "holds no {} tensors although the spec shares the head",
                    family_name(key, "head.*")
                ),
            ));
        }
        out.extend(shapes_of(&head));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncate_and_pad_are_inverse() {
        let a = Array::new(vec![3, 2], vec![1., 2., 3., 4., 5., 6.]).expect("a");
        let b = Array::new(vec![2, 3], vec![1., 2., 3., 4., 5., 6.]).expect("b");
        assert_eq!(truncate(Factor::A, &a, 2).data, vec![1., 2., 3., 4.]);
        assert_eq!(truncate(Factor::B, &b, 2).data, vec![1., 2., 4., 5.]);
        assert_eq!(truncate(Factor::B, &b, 2).shape, vec![2, 2]);
        let mut acc = vec![0.0; 6];
        add_padded(&mut acc, &[2, 3], Factor::B, &[1., 2., 4., 5.], 2, 2.0);
        assert_eq!(acc, vec![2., 4., 0., 8., 10., 0.]);
        assert_eq!(group_of("shared.slot3.gate.bias"), Some("shared.slot3"));
        assert_eq!(group_of("shared"), None);
        assert!(natural_key("shared.slot2") < natural_key("shared.slot10"));
    }
}
