//! What a wrapper aggregator (bridge, robust combine, privacy) passes on to
//! the aggregator it wraps unchanged: [`pass_to_inner!`].

/// In an `impl Aggregator` of a wrapper around `self.inner`: the named
/// methods (`algorithm`, `plan`, `expected_tensors`) passed on unchanged.
macro_rules! pass_to_inner {
    ($($method:ident),+) => { $(pass_to_inner!(@ $method);)+ };
    (@ algorithm) => {
        fn algorithm(&self) -> heterotune_crds::spec::AggregationAlgorithm {
            self.inner.algorithm()
        }
    };
    (@ plan) => {
        fn plan(&mut self, accepted: &[(&str, &str)]) {
            self.inner.plan(accepted);
        }
    };
    (@ expected_tensors) => {
        fn expected_tensors(
            &self,
            ctx: &RoundContext<'_>,
            client: &ClientInfo,
        ) -> Result<std::collections::BTreeMap<String, Vec<usize>>> {
            self.inner.expected_tensors(ctx, client)
        }
    };
}
