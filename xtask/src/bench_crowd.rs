//! `cargo xtask bench crowd`: a crowd of WebSocket clients (10,000 by default) over TLS
//! through the gateway to 3 sim-nodes with the health checker on.
//!
//! The benchmark is the `bench-crowd` binary of the tests crate, started like `bench l4`
//! (see [`exec_lab_bench`]); it runs the `crowd` binary in the client namespace.

use crate::bench_l4::exec_lab_bench;

/// Where the markdown report goes unless `--output` says otherwise.
const REPORT: &str = "target/bench/crowd.md";

/// Builds, then runs `bench-crowd ARGS…` from the workspace root, writing [`REPORT`].
pub fn run(args: &[String]) -> anyhow::Result<()> {
    exec_lab_bench(
        "bench-crowd",
        REPORT,
        "the crowd benchmark (it builds network namespaces and loads XDP programs)",
        args,
    )
}
