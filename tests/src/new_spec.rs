//! Whether a client took the new JSON-RPC spec (`chainSpec_v1_*`, `chainHead_v1_*`) at a
//! sim-node, from the calls the node counted: papi and subxt pick it when `rpc_methods` lists
//! it, and fall back on the legacy API when a new-spec call fails, so a call sim-node serves
//! unlike a real node shows as a legacy read.

use crate::sim_node::SimNodeHandle;

/// The legacy calls that would do the new spec's reads (runtime calls, storage).
pub const LEGACY_READS: [&str; 2] = ["state_call", "state_getStorage"];

/// Each of `calls` reached `node`, and none of [`LEGACY_READS`].
pub fn assert_took_the_new_spec(node: &SimNodeHandle, calls: &[&str]) {
    for method in calls {
        assert!(
            node.request_count(method) >= 1,
            "{method} never called: {:?}",
            node.request_counts()
        );
    }
    for legacy in LEGACY_READS {
        assert_eq!(
            node.request_count(legacy),
            0,
            "{legacy} reached the node, a fall-back on the legacy API: {:?}",
            node.request_counts()
        );
    }
}
