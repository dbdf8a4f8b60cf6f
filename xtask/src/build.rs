//! Building, running and testing the workspace.

use std::{os::unix::process::CommandExt, path::PathBuf, process::Command};

use anyhow::Context;

use crate::setup::{require_root, run_step, workspace_root};

/// The default members: every crate but lb-ebpf, which only builds for the BPF target (through
/// lb-control's build script), so `--workspace` would try to build it for the host.
pub fn release() -> anyhow::Result<()> {
    cargo(&["build", "--release", "--bins"])
}

/// Builds what it runs in release mode (not the benchmarks: release builds are whole-program
/// optimised, a few minutes per binary on a small machine), then replaces this process with
/// the lab or with lb-control, so that Ctrl-C reaches it directly and its cleanup runs.
pub fn run(config: Option<PathBuf>, nodes: usize, ha: bool) -> anyhow::Result<()> {
    require_root("running the load balancer")?;
    cargo(&[
        "build",
        "--release",
        "--bin",
        "lb-control",
        "--bin",
        "lab",
        "--bin",
        "sim-node",
    ])?;
    let bin_dir = workspace_root().join("target/release");
    let mut command = match config {
        Some(config) => {
            let mut command = Command::new(bin_dir.join("lb-control"));
            command.arg("run").arg("--config").arg(config);
            command
        }
        None => {
            let mut command = Command::new(bin_dir.join("lab"));
            command.args(["up", "--nodes", &nodes.to_string()]);
            if ha {
                command.arg("--ha");
            }
            command
        }
    };
    let error = command.exec();
    Err(error).with_context(|| format!("starting {:?}", command.get_program()))
}

/// Builds every binary first (integration tests start lb-control, sim-node and the lab as
/// processes), then runs every test of the workspace.
pub fn test(cargo_args: &[String]) -> anyhow::Result<()> {
    require_root("the tests that load XDP programs and build network namespaces")?;
    // With the feature `cargo test` turns on (lb-control's tests use its harness), so the
    // binaries and the tests share one build of lb-control and of its kernel program.
    cargo(&["build", "--bins", "--features", "lb-control/test-harness"])?;
    let mut args = vec!["test".to_owned()];
    args.extend(cargo_args.iter().cloned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    cargo(&args)
}

fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let root = workspace_root();
    let mut command = Command::new(cargo);
    command.args(args).current_dir(&root);
    run_step(&mut command, &format!("cargo {}", args.join(" ")))
}
