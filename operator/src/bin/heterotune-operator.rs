//! `heterotune-operator`: the Kubernetes operator (work in progress).
fn main() {}
