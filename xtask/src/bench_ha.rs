//! `cargo xtask bench ha`: what the clients of an HA pair see when its master fails under load
//! (kill -9, links cut): when the standby answers, what fails, which L4 connections break, how
//! WebSocket clients reconnect, whether acknowledged admin writes survive.
//!
//! The benchmark is the `bench-ha` binary of the tests crate, started like `bench l4` (see
//! [`exec_lab_bench`]).

use crate::bench_l4::exec_lab_bench;

/// Where the markdown report goes unless `--output` says otherwise.
const REPORT: &str = "target/bench/ha.md";

/// Builds, then runs `bench-ha ARGS…` from the workspace root, writing [`REPORT`].
pub fn run(args: &[String]) -> anyhow::Result<()> {
    exec_lab_bench(
        "bench-ha",
        REPORT,
        "the HA benchmark (it builds network namespaces and loads XDP programs)",
        args,
    )
}
