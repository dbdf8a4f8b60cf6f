//! `cargo xtask bench gateway`: the gateway's cache hits and misses over TLS, beside the node
//! itself and nginx terminating TLS.
//!
//! The benchmark is the `bench-gateway` binary of the tests crate, started like `bench l4`
//! (see [`exec_lab_bench`]).

use crate::bench_l4::exec_lab_bench;

/// Where the markdown table goes unless `--output` says otherwise.
const REPORT: &str = "target/bench/gateway.md";

/// Builds, then runs `bench-gateway ARGS…` from the workspace root, writing [`REPORT`].
pub fn run(args: &[String]) -> anyhow::Result<()> {
    exec_lab_bench(
        "bench-gateway",
        REPORT,
        "the gateway benchmark (it builds network namespaces and loads XDP programs)",
        args,
    )
}
