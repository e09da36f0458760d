//! Adapters: DeMA (dense mixture of adapters), LoRA, and the classification head.
//!
//! * [`dema`]: the DeMA adapter (shared experts + gate per slot, family
//!   down/up projections per adapted layer), its parameter counts, and the
//!   export / import of named tensors (maps; safetensors bytes and files
//!   are [`crate::artifact`]'s);
//! * [`SlotMap`] (from `heterotune_crds::model`): which layers carry adapters and their slots;
//! * [`head`]: pooling and the linear classification head;
//! * [`lora`]: LoRA on the query/value projections (the baselines);
//! * [`choice`]: which of the two a client trains, built behind one interface.

pub mod choice;
pub mod dema;
pub mod head;
pub mod lora;

pub use choice::{Adapter, AdapterChoice};
pub use dema::{
    export_named, family_parameter_count, load_named, shared_parameter_count, Dema, DemaConfig,
};
pub use head::{ClassifierHead, Pooling};
pub use heterotune_crds::model::{LayerSelection, SlotMap};
