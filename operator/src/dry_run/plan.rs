//! The plan as data (what `plan -o json|yaml` prints) and as text (the
//! table `plan` prints by default).

use std::fmt::Write as _;

use heterotune_crds::dtype;
use heterotune_crds::layout::RunLayout;
use heterotune_crds::model::wire;
use heterotune_crds::spec::{ClientSpec, Dtype};
use heterotune_crds::{FederatedTune, FederatedTuneSpec};
use serde::Serialize;

use super::{
    bridge_lines, bridge_upload_bytes, bytes_si, data_line, dtype_line, headline, layer_ranges,
    local_data_profile, model_shape, pool_line, pool_upload_bytes, progress_line,
};
use crate::sizing::{
    self, BridgeModel, DataProfile, ModelShape, Placement, SizingConfig, SizingError, Workload,
};

/// What the units in the plan are.
pub const UNITS: &str = "units: params in millions (M) of parameters; trainable in parameters; \
     upload per client per round (bf16, all it sends: shared adapter deltas, the second model's, pool values) in SI bytes (KB, MB, GB = 10^3, 10^6, 10^9 B); \
     host mem (the trainer's RAM) and GPU mem (one GPU's memory) are estimates in binary bytes \
     (MiB, GiB = 2^20, 2^30 B); layers are 0-based, a-b inclusive";

/// What `heterotune plan` reports.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    /// metadata.name.
    pub name: String,
    /// The run's settings in one line.
    pub headline: String,
    /// spec.rounds.
    pub rounds: u32,
    /// spec.aggregation.algorithm.
    pub algorithm: String,
    /// One entry per client, in spec order.
    pub clients: Vec<ClientPlan>,
    /// The bridge, dtype, data and privacy lines.
    pub notes: Vec<String>,
    /// Bytes all clients upload in one round.
    pub upload_bytes_per_round: u64,
    /// spec.storage.uri.
    pub store: String,
    /// The run's folder in the store.
    pub run_folder: String,
    /// Rounds complete in the store (absent when the store was not read).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completed_rounds: Option<u32>,
    /// Why the store was not read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store_not_checked: Option<String>,
    /// Where a previous run stands, in words.
    pub progress: String,
    /// The units legend.
    pub units: String,
}

/// Where a client's trainer would run.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum PlacementKind {
    /// On one GPU of a profile.
    Gpu,
    /// On CPU.
    Cpu,
    /// As `clients[].resources` says.
    Explicit,
    /// Nowhere: no GPU profile holds it and CPU is not allowed.
    NoFit,
    /// The model's size is unknown.
    UnknownShape,
    /// At its own site (`clients[].site`): the site's agent runs it; the
    /// memory columns are what it needs there, sized as for this cluster.
    Site,
}

/// One client in the plan.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClientPlan {
    /// clients[].name.
    pub name: String,
    /// Its model family's label (the model's name).
    pub family: String,
    /// Backbone parameters.
    pub parameters: Option<u64>,
    /// Backbone layers.
    pub layers: Option<u64>,
    /// The adapted layers (0-based).
    pub adapted_layers: Vec<u64>,
    /// Trainable parameters (the bridge's not included).
    pub trainable_parameters: u64,
    /// Bytes uploaded per round (the bridge's included).
    pub upload_bytes: u64,
    /// Where it would run.
    pub placement: PlacementKind,
    /// The GPU profile, on a GPU.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_profile: Option<String>,
    /// Host memory estimate (RAM): the trainer on CPU, or the host side of a GPU trainer.
    pub host_memory_bytes: Option<u64>,
    /// GPU memory estimate (explicit resources: as sized for a GPU).
    pub gpu_memory_bytes: Option<u64>,
    /// Why it does not fit, or why its size is unknown.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// `clients[].site.name`, for a client its site runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
}

/// What every client's estimate shares.
struct Shared<'a> {
    slots: u64,
    /// Bytes of the bridge's and the pool's tensors every client uploads.
    bridge_upload: u64,
    pool_upload: u64,
    data: Option<DataProfile>,
    bridge: Option<&'a Result<BridgeModel, SizingError>>,
    config: &'a SizingConfig,
}

impl Plan {
    /// The plan of `ft` sized with `config`; `completed_rounds` from the
    /// store, or why it was not read.
    pub fn of(
        ft: &FederatedTune,
        config: &SizingConfig,
        completed_rounds: Result<u32, &str>,
        layout: &RunLayout,
    ) -> Plan {
        let spec = &ft.spec;
        let shapes: Vec<Option<ModelShape>> =
            spec.clients.iter().map(|c| model_shape(&c.model)).collect();
        let data = local_data_profile(spec);
        let bridge_shape = spec.bridge.as_ref().and_then(|b| model_shape(&b.model));
        let bridge = BridgeModel::of(spec, bridge_shape).map(|b| {
            b.map(|mut b| {
                b.workload.data = data;
                b
            })
        });
        let slots = sizing::resolve_slots(spec, &shapes);
        let shared = Shared {
            slots,
            bridge_upload: bridge_upload_bytes(spec, bridge.as_ref()),
            pool_upload: pool_upload_bytes(spec, data),
            data,
            bridge: bridge.as_ref(),
            config,
        };
        let clients: Vec<ClientPlan> = (0..spec.clients.len())
            .map(|i| ClientPlan::of(spec, i, shapes[i].as_ref(), &shared))
            .collect();
        let mut notes: Vec<String> = Vec::new();
        notes.extend(bridge_lines(spec, bridge.as_ref(), config));
        notes.extend(dtype_line(spec, dtype::resolve_this_cpu(Dtype::Auto)));
        notes.push(data_line(spec, data));
        notes.extend(pool_line(spec, data));
        if let Some(p) = &spec.aggregation.privacy {
            let epsilon =
                heterotune_crds::privacy::epsilon(p.noise_multiplier, spec.rounds, p.delta);
            notes.push(format!(
                "differential privacy: ε = {epsilon:.2} at δ = {:e} after all {} rounds \
                 (every client every round; clip norm {}, noise multiplier {})",
                p.delta, spec.rounds, p.clip_norm, p.noise_multiplier
            ));
        }
        Plan {
            name: ft.metadata.name.clone().unwrap_or_default(),
            headline: headline(ft, slots).trim_end().to_string(),
            rounds: spec.rounds,
            algorithm: spec.aggregation.algorithm.as_str().to_string(),
            upload_bytes_per_round: clients.iter().map(|c| c.upload_bytes).sum(),
            clients,
            notes: notes.iter().map(|n| n.trim_end().to_string()).collect(),
            store: spec.storage.uri.clone(),
            run_folder: layout.run_dir().to_string(),
            completed_rounds: completed_rounds.ok(),
            store_not_checked: completed_rounds.err().map(str::to_string),
            progress: progress_line(completed_rounds, spec.rounds),
            units: UNITS.to_string(),
        }
    }

    /// The plan as text: the headline, the client table, the notes, the
    /// store and the units legend.
    pub fn text(&self) -> String {
        let mut out = format!("{}\n\n", self.headline);
        let width = |title: &str, cells: &mut dyn Iterator<Item = usize>| {
            cells.max().unwrap_or(0).max(title.len())
        };
        let wn = width("client", &mut self.clients.iter().map(|c| c.name.len()));
        let wf = width("family", &mut self.clients.iter().map(|c| c.family.len()));
        let wa = width(
            "adapted",
            &mut self.clients.iter().map(|c| c.adapted_cell().len()),
        );
        let _ = writeln!(
            out,
            "{:<wn$} {:<wf$} {:>9} {:>6} {:>wa$} {:>10} {:>10} {:>10} {:>9}  placement",
            "client",
            "family",
            "params",
            "layers",
            "adapted",
            "trainable",
            "upload",
            "host mem",
            "GPU mem"
        );
        let opt = |v: Option<u64>, f: fn(u64) -> String| v.map(f).unwrap_or_else(|| "-".into());
        for c in &self.clients {
            let _ = writeln!(
                out,
                "{:<wn$} {:<wf$} {:>9} {:>6} {:>wa$} {:>10} {:>10} {:>10} {:>9}  {}",
                c.name,
                c.family,
                opt(c.parameters, |p| format!("{:.1} M", p as f64 / 1e6)),
                opt(c.layers, |l| l.to_string()),
                c.adapted_cell(),
                c.trainable_parameters,
                bytes_si(c.upload_bytes),
                opt(c.host_memory_bytes, sizing::human_bytes),
                opt(c.gpu_memory_bytes, sizing::human_bytes),
                c.placement_cell()
            );
        }
        for note in &self.notes {
            let _ = writeln!(out, "\n{note}");
        }
        let _ = writeln!(
            out,
            "\nabout {} uploaded per round in all; store {} (run folder {})",
            bytes_si(self.upload_bytes_per_round),
            self.store,
            self.run_folder
        );
        let _ = writeln!(out, "{}", self.progress);
        let _ = writeln!(out, "\n{}", self.units);
        out
    }
}

impl ClientPlan {
    fn of(
        spec: &FederatedTuneSpec,
        i: usize,
        shape: Option<&ModelShape>,
        shared: &Shared<'_>,
    ) -> ClientPlan {
        let mut plan = ClientPlan {
            name: spec.clients[i].name.clone(),
            family: spec.family_label(i),
            parameters: None,
            layers: None,
            adapted_layers: Vec::new(),
            trainable_parameters: 0,
            upload_bytes: 0,
            placement: PlacementKind::UnknownShape,
            gpu_profile: None,
            host_memory_bytes: None,
            gpu_memory_bytes: None,
            reason: None,
            site: None,
        };
        let Some(shape) = shape else {
            let unknown = SizingError::UnknownModel {
                index: i,
                uri: spec.clients[i].model.uri.clone(),
            };
            plan.reason = Some(unknown.to_string());
            return plan.at_site(&spec.clients[i]);
        };
        let workload = Workload::of(spec, i, shared.slots).with_data(shared.data);
        plan.parameters = Some(shape.parameters);
        plan.layers = Some(shape.num_layers);
        plan.adapted_layers =
            sizing::adapted_layers(shape.num_layers, shared.slots, spec.layer_selection(i));
        plan.trainable_parameters = sizing::trainable_parameters(shape, &workload);
        // What the trainer writes (`wire`): the shared parts of the own
        // model as the spec shares them, the bridge's, the pool values.
        let own = wire::own_upload(spec, i, shape.wire(), shared.slots as usize)
            .map(|t| wire::payload_bytes(&t))
            // a window the slots do not fit: the checks refuse the spec; sized
            // as if every trainable parameter were sent
            .unwrap_or(plan.trainable_parameters * 2);
        plan.upload_bytes = own + shared.bridge_upload + shared.pool_upload;
        let placed = sizing::place(
            &spec.clients[i],
            Some(shape),
            &workload,
            shared.bridge,
            spec.trainer.allow_cpu,
            shared.config,
            i,
        );
        match placed {
            Ok(Placement::Gpu {
                profile,
                estimate,
                host_memory,
            }) => {
                plan.placement = PlacementKind::Gpu;
                plan.gpu_profile = Some(profile.name);
                plan.gpu_memory_bytes = Some(estimate.total);
                plan.host_memory_bytes = Some(host_memory);
            }
            Ok(Placement::Cpu { estimate }) => {
                plan.placement = PlacementKind::Cpu;
                plan.host_memory_bytes = Some(estimate.total);
            }
            Ok(Placement::Explicit { estimate }) => {
                plan.placement = PlacementKind::Explicit;
                plan.gpu_memory_bytes = estimate.map(|e| e.total);
            }
            Err(e) => {
                plan.placement = PlacementKind::NoFit;
                plan.reason = Some(e.to_string());
            }
        }
        plan.at_site(&spec.clients[i])
    }

    /// A client its site runs (`clients[].site`): the operator starts no
    /// trainer for it, so where it fits is the site's matter; what it needs
    /// is still worth showing.
    fn at_site(mut self, client: &ClientSpec) -> ClientPlan {
        if let Some(site) = &client.site {
            self.placement = PlacementKind::Site;
            self.site = Some(site.name.clone());
        }
        self
    }

    fn adapted_cell(&self) -> String {
        match self.layers {
            Some(_) => layer_ranges(&self.adapted_layers),
            None => "?".into(),
        }
    }

    fn placement_cell(&self) -> String {
        match (self.placement, &self.gpu_profile, &self.reason) {
            (PlacementKind::Gpu, Some(p), _) => format!("GPU profile {p}"),
            (PlacementKind::Cpu, ..) => "CPU".into(),
            (PlacementKind::Explicit, ..) => "explicit resources".into(),
            (PlacementKind::NoFit, _, Some(why)) => format!("NO FIT: {why}"),
            (PlacementKind::Site, ..) => format!(
                "site {}: its agent runs it (`heterotune site`)",
                self.site.as_deref().unwrap_or("?")
            ),
            (_, _, why) => format!("unknown model shape: {}", why.as_deref().unwrap_or("?")),
        }
    }
}
