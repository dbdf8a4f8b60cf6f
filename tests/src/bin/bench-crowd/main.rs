//! `bench-crowd` (`cargo xtask bench crowd`): a crowd of WebSocket clients over TLS through the
//! gateway to 3 sim-nodes with Substrate's limits, the health checker on.
//!
//! The crowd (10,000 clients by default, from several source addresses in the client
//! namespace: the `crowd` binary) subscribes to new heads, holds a subscription on the node
//! each, and calls a cached and an uncached method every few seconds. The report says what a
//! public endpoint must show: no node left the rotation, no client was dropped, the upstream
//! connections each node saw stayed under the gateway's cap; and what the crowd costs:
//! lb-control's resident memory per connected client, the head notifications' delay from node
//! to client, lb-control's CPU time per notification.

mod report;
mod setup;

use std::{path::PathBuf, process::ExitCode, time::Instant};

use anyhow::{Context, bail};
use clap::Parser;
use lb_tests::{
    bench::{
        check_interrupted, find_command, install_interrupt_handler, load_average, publish_report,
        raise_open_files_limit,
    },
    cpu,
    crowd::{CpuShare, CrowdPlan, CrowdProcess},
    lab::MAX_EXTRA_CLIENT_ADDRESSES,
    proc_usage,
};

use setup::Setup;

/// Descriptors lb-control needs beside one per client (nodes, store, admin API, XDP maps).
const SPARE_FILES: u64 = 4096;

#[derive(Debug, Parser)]
#[command(
    about = "Crowd benchmark: thousands of WebSocket clients over TLS through the gateway to 3 sim-nodes",
    long_about = "A crowd of WebSocket clients (the `crowd` binary in the client namespace, from \
                  several source addresses) subscribes to new heads, holds a storage \
                  subscription each and calls a cached and an uncached method every few seconds, \
                  through lb-control's gateway to 3 sim-nodes (Substrate's limits) with the \
                  health checker on. Reports nodes that left the rotation, clients dropped, \
                  upstream connections per node counted at the nodes, lb-control's RSS per \
                  client, head delay p50/p99 and lb-control's CPU per notification. Needs root \
                  and curl."
)]
struct Cli {
    /// Clients in the crowd.
    #[arg(long, default_value_t = 10_000)]
    clients: usize,
    /// Source addresses the clients come from (added to the client namespace).
    #[arg(long, default_value_t = 20)]
    sources: usize,
    /// New clients per second while the crowd gathers.
    #[arg(long, default_value_t = 500.0)]
    ramp_per_second: f64,
    /// Seconds the whole crowd stays connected (the measured phase).
    #[arg(long, default_value_t = 60)]
    hold_seconds: u64,
    /// Mean time between a client's rounds of calls, in ms.
    #[arg(long, default_value_t = 5000)]
    call_interval_ms: u64,
    /// The sim-nodes' block time in ms (a head notification to every client per block).
    #[arg(long, default_value_t = 2000)]
    block_time_ms: u64,
    /// Clients hold no subscription on the node (only the gateway's shared head feed).
    #[arg(long)]
    without_storage_subscription: bool,
    /// Where the markdown report goes.
    #[arg(long, default_value = "target/bench/crowd.md")]
    output: PathBuf,
}

/// The settings a run needs, resolved from the command line.
#[derive(Debug, Clone)]
pub struct Settings {
    pub clients: usize,
    pub sources: usize,
    pub ramp_per_second: f64,
    pub hold_seconds: u64,
    pub call_interval_ms: u64,
    pub block_time_ms: u64,
    pub storage_subscription: bool,
}

fn main() -> ExitCode {
    lb_tests::bench::main("bench-crowd", || run(Cli::parse()))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let settings = settings(&cli)?;
    preflight()?;
    // lb-control, started by the lab from this process, inherits the limit.
    raise_open_files_limit(settings.clients as u64 + SPARE_FILES)?;
    install_interrupt_handler();
    let started = Instant::now();
    let load_before = load_average();
    eprintln!(
        "bench-crowd: {} clients from {} addresses at {}/s, held {} s; load average \
         {load_before:.2}",
        settings.clients, settings.sources, settings.ramp_per_second, settings.hold_seconds
    );
    let setup = Setup::start(&settings).context("setting up the lab")?;
    check_interrupted()?;
    let schedule = setup.lab.node_status(0)?;
    let plan = CrowdPlan {
        gateway: setup.gateway(),
        key: setup.key.clone(),
        ca: setup.certs.ca.clone(),
        sources: setup.sources.clone(),
        clients: settings.clients,
        ramp_per_second: settings.ramp_per_second,
        hold_seconds: settings.hold_seconds,
        call_interval_ms: settings.call_interval_ms,
        storage_subscription: settings.storage_subscription,
        genesis_unix_ms: schedule.genesis_unix_ms,
        block_time_ms: schedule.block_time_ms,
    };
    let before = setup.snapshot()?;
    eprintln!("bench-crowd: lab ready, every node in rotation; the crowd gathers");
    let mut crowd = CrowdProcess::start(
        &setup.lab.client().netns,
        &plan,
        &setup.crowd_log(),
        CpuShare::Idle,
    )?;
    let steady = crowd.steady()?;
    let at_steady = setup.snapshot()?;
    let (crowd_cpu_at_steady, machine_at_steady) =
        (proc_usage::cpu_seconds(crowd.pid())?, cpu::sample()?);
    eprintln!(
        "bench-crowd: {} connected after {:.1} s; holding {} s",
        steady.connected, steady.ramp_seconds, settings.hold_seconds
    );
    crowd.closing()?;
    let at_close = setup.snapshot()?;
    let hold_wall = at_close.at.duration_since(at_steady.at).as_secs_f64();
    let crowd_cores =
        (proc_usage::cpu_seconds(crowd.pid())? - crowd_cpu_at_steady) / hold_wall.max(1e-9);
    let machine = cpu::sample()?.since(&machine_at_steady);
    let summary = crowd.summary()?;
    let after = setup.snapshot()?;

    let markdown = report::markdown(&report::Context {
        settings: &settings,
        nodes: setup.node_addresses(),
        steady: &steady,
        summary: &summary,
        before: &before,
        at_steady: &at_steady,
        at_close: &at_close,
        after: &after,
        crowd_cores,
        machine,
        load_before,
        load_after: load_average(),
        elapsed: started.elapsed(),
    });
    publish_report("bench-crowd", &cli.output, &markdown)
}

fn settings(cli: &Cli) -> anyhow::Result<Settings> {
    if cli.clients == 0 || cli.hold_seconds == 0 || cli.call_interval_ms == 0 {
        bail!("--clients, --hold-seconds and --call-interval-ms must be at least 1");
    }
    if cli.sources == 0 || cli.sources > MAX_EXTRA_CLIENT_ADDRESSES {
        bail!("--sources must be 1 to {MAX_EXTRA_CLIENT_ADDRESSES} (the client's /24)");
    }
    if cli.ramp_per_second.is_nan() || cli.ramp_per_second <= 0.0 || cli.block_time_ms == 0 {
        bail!("--ramp-per-second and --block-time-ms must be above 0");
    }
    Ok(Settings {
        clients: cli.clients,
        sources: cli.sources,
        ramp_per_second: cli.ramp_per_second,
        hold_seconds: cli.hold_seconds,
        call_interval_ms: cli.call_interval_ms,
        block_time_ms: cli.block_time_ms,
        storage_subscription: !cli.without_storage_subscription,
    })
}

/// Fails before building anything when a program is missing.
fn preflight() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the benchmark builds network namespaces and loads XDP programs: run it as root \
             (`cargo xtask bench crowd` as root)"
        );
    }
    if find_command("curl").is_none() {
        bail!("missing program: curl (Debian package curl); install it with `cargo xtask setup`");
    }
    for binary in ["lb-control", "sim-node", "crowd"] {
        lb_tests::lab::binary_path(binary).with_context(|| {
            format!("the benchmark runs {binary}; build it with `cargo build --release --bins`")
        })?;
    }
    Ok(())
}
