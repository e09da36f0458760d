//! The round protocol both executors follow: the object store and its
//! layout ([`store`]), its create-only commits ([`commit`]), what the store says about a run ([`observe`]), and
//! the pure planner that turns that observation into actions ([`planner`]).
//! No Kubernetes and no processes here.

pub mod commit;
pub mod observe;
pub mod planner;
pub mod store;
