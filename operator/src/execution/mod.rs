//! Running the trainer: the `heterotune-trainer` command-line contract and
//! its child processes ([`trainer`]), staging a pod's inputs from object
//! storage ([`staging`]), and the pod side of a cluster run,
//! `heterotune job train | evaluate | aggregate` ([`pod_job`]). The local
//! runner and the pods share all of it.

pub mod pod_job;
pub mod staging;
pub mod trainer;
