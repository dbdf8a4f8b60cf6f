//! `cargo xtask bench xdp`: ns per packet of the XDP program from BPF_PROG_TEST_RUN, beside the
//! bare `xdp_pass` program, in the same run.
//!
//! The benchmark is lb-control's `bench_xdp` example (it needs lb-control and the compiled
//! eBPF objects, which xtask cannot depend on: xtask must build before the eBPF toolchain is
//! set up). This runs it in release mode from the workspace root and has it write its table to
//! `target/bench/xdp.md` as well as print it.

use std::process::Command;

use crate::setup::{require_root, run_step, workspace_root};

/// Where the markdown table goes unless `--out` says otherwise.
const REPORT: &str = "target/bench/xdp.md";

/// Builds and runs `bench_xdp ARGS…` (`--repeat`, `--rounds`, `--singles`, `--out`).
pub fn xdp(args: &[String]) -> anyhow::Result<()> {
    require_root("the XDP benchmark (it builds a network namespace and loads XDP programs)")?;
    let root = workspace_root();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut command = Command::new(cargo);
    command
        .args([
            "run",
            "--quiet",
            "--release",
            "-p",
            "lb-control",
            "--example",
            "bench_xdp",
            "--",
        ])
        .current_dir(&root);
    if !args.iter().any(|arg| arg == "--out") {
        command.arg("--out").arg(root.join(REPORT));
    }
    command.args(args);
    run_step(
        &mut command,
        "the XDP benchmark (cargo run --example bench_xdp)",
    )
}
