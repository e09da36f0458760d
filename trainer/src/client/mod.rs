//! One client of a run on this machine: loading it (its backbone, adapter
//! and head, its data, its private state and the global it received:
//! [`load::load_client`]), training it for one round and writing its
//! artifact ([`round::train_round`]), evaluating it
//! ([`evaluate::evaluate`]).

pub mod bridge;
pub mod evaluate;
pub mod load;
pub mod round;

pub use evaluate::{evaluate, to_json};
pub use load::{
    adapter_choice, load_client, model_id, pooling, settings, train_settings, ClientOptions,
    LoadedClient,
};
pub use round::{train_round, TrainRound, TrainSummary};
