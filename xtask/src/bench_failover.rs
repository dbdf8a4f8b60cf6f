//! `cargo xtask bench failover`: how long a dead node keeps getting new connections, and what
//! fails meanwhile.
//!
//! The benchmark is the `bench-failover` binary of the tests crate, started like `bench l4`
//! (see [`exec_lab_bench`]).

use crate::bench_l4::exec_lab_bench;

/// Where the markdown table goes unless `--output` says otherwise.
const REPORT: &str = "target/bench/failover.md";

/// Builds, then runs `bench-failover ARGS…` from the workspace root, writing [`REPORT`].
pub fn run(args: &[String]) -> anyhow::Result<()> {
    exec_lab_bench(
        "bench-failover",
        REPORT,
        "the failover benchmark (it builds network namespaces and loads XDP programs)",
        args,
    )
}
