//! `cargo xtask bench l4`: the L4 benchmark through the lab, the XDP service beside an ECMP
//! route, nftables DNAT and HAProxy.
//!
//! The benchmark itself is the `bench-l4` binary of the tests crate (it needs the lab and
//! lb-control, which xtask cannot depend on: xtask must build before the eBPF toolchain is
//! set up). [`exec_lab_bench`] builds every binary in release mode, then replaces xtask with
//! the benchmark, so Ctrl-C reaches it directly and it removes its lab on the way out; the
//! other lab benchmarks start the same way.

use std::{os::unix::process::CommandExt, process::Command};

use anyhow::Context;

use crate::{
    build,
    setup::{require_root, workspace_root},
};

/// Where the markdown table goes unless `--output` says otherwise.
const REPORT: &str = "target/bench/l4.md";

/// Builds, then runs `bench-l4 ARGS…` from the workspace root, writing [`REPORT`].
pub fn run(args: &[String]) -> anyhow::Result<()> {
    exec_lab_bench(
        "bench-l4",
        REPORT,
        "the L4 benchmark (it builds network namespaces and loads XDP programs)",
        args,
    )
}

/// Builds every binary in release mode, then replaces this process with the tests crate's
/// benchmark binary `name`, run from the workspace root with `ARGS…` and, unless they say
/// `--output`, `--output <root>/<report>`. `what` names it in the root check.
pub fn exec_lab_bench(name: &str, report: &str, what: &str, args: &[String]) -> anyhow::Result<()> {
    require_root(what)?;
    build::release()?;
    let root = workspace_root();
    // Where `cargo build` just put it: CARGO_TARGET_DIR (relative to here, as cargo takes it)
    // when set.
    let target_dir = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => std::env::current_dir()?.join(dir),
        None => root.join("target"),
    };
    let program = target_dir.join("release").join(name);
    let mut command = Command::new(&program);
    let has_output = args
        .iter()
        .any(|arg| arg == "--output" || arg.starts_with("--output="));
    if !has_output {
        command.arg("--output").arg(root.join(report));
    }
    command.args(args).current_dir(&root);
    let error = command.exec();
    Err(error).with_context(|| format!("starting {}", program.display()))
}
