//! `bench-failover` (`cargo xtask bench failover`): how long a node that dies keeps its place
//! in the XDP service's table, and what fails meanwhile.
//!
//! Each run builds a fresh lab (client, LB, 3 sim-nodes) with lb-control balancing the VIP over
//! the nodes with the default health settings, and loads it from the client: workers each
//! opening a new connection per request, and keep-alive connections sending requests in a
//! loop. Once the load is steady, one node's sim-node is killed (SIGKILL; a different node each
//! run) and the kernel's backend table is read every few milliseconds until the node's backend
//! is down there: the removal time. The load goes on for a while after, to show that nothing
//! fails once the node is out. Requests are split by when they ran: before the death, between
//! the death and the removal, after the removal.

mod report;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use clap::{Parser, ValueEnum};
use lb_control::dataplane::read_pinned_stats;
use lb_tests::{
    bench::{check_interrupted, install_interrupt_handler, load_average, publish_report},
    lab::{Lab, LabConfig, SIM_NODE_RPC_PORT, binary_path, in_netns},
    load::{Load, LoadShape, Outcome},
    rpc_client::RpcConnection,
};

use report::{Phase, Run};

/// The service the load goes to.
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 10);
/// Nodes behind it: one dies, two carry on.
pub const NODES: usize = 3;
/// How often the kernel's table is read while waiting for the removal.
pub const KERNEL_POLL: Duration = Duration::from_millis(5);
/// A client's pause after a failed request before its next (see [`LoadShape`]).
pub const PAUSE_AFTER_FAILURE: Duration = Duration::from_millis(10);
/// Longest wait for lb-control's table, and for a dead node's removal, before a run fails.
const TABLE_TIMEOUT: Duration = Duration::from_secs(20);
/// Failures, and lb-control's error lines, kept per run to quote in the report.
const QUOTED_FAILURES: usize = 3;
/// The default `[health]` interval: the kill's moment is spread over it across the runs.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Parser)]
#[command(
    about = "Failover benchmark: a sim-node is killed under load; time until the XDP service \
             drops it, and requests failed meanwhile",
    long_about = "Each run: a fresh lab of 3 sim-nodes behind lb-control (default health \
                  settings), new-connection and keep-alive load from the client, SIGKILL of one \
                  sim-node once the load is steady, the kernel's table read every 5 ms until \
                  the node is down there, then more load. Reports every run and median/min/max. \
                  Needs root."
)]
struct Cli {
    /// Runs, each in a fresh lab.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Seconds of load before the kill (the health checker has judged every node by then).
    #[arg(long, default_value_t = 3)]
    warmup: u64,
    /// Seconds of load after the removal.
    #[arg(long, default_value_t = 2)]
    after: u64,
    /// Workers each opening a new connection per request.
    #[arg(long, default_value_t = 4)]
    new_connection_workers: usize,
    /// Keep-alive connections sending requests in a loop.
    #[arg(long, default_value_t = 16)]
    keep_alive: usize,
    /// XDP attach mode for lb-control.
    #[arg(long, value_enum, default_value_t = XdpMode::Auto)]
    xdp_mode: XdpMode,
    /// Where the markdown report goes.
    #[arg(long, default_value = "target/bench/failover.md")]
    output: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum XdpMode {
    Auto,
    Native,
    Generic,
}

impl XdpMode {
    fn as_arg(self) -> &'static str {
        match self {
            XdpMode::Auto => "auto",
            XdpMode::Native => "native",
            XdpMode::Generic => "generic",
        }
    }
}

/// The settings a run needs, resolved from the command line.
#[derive(Debug, Clone)]
pub struct Settings {
    pub runs: usize,
    pub warmup: Duration,
    pub after: Duration,
    pub shape: LoadShape,
    pub xdp_mode: &'static str,
}

fn main() -> ExitCode {
    lb_tests::bench::main("bench-failover", || run(Cli::parse()))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let settings = settings(&cli)?;
    preflight()?;
    install_interrupt_handler();
    let started = Instant::now();
    let load_before = load_average();
    eprintln!(
        "bench-failover: {} run(s): {} new-connection worker(s) and {} keep-alive connection(s), \
         {:?} of load before the kill, {:?} after the removal; load average {load_before:.2}",
        settings.runs,
        settings.shape.new_connection_workers,
        settings.shape.keep_alive_connections,
        settings.warmup,
        settings.after,
    );
    let mut runs = Vec::new();
    for index in 0..settings.runs {
        check_interrupted()?;
        // A different node each run, so no node's place in the table decides every figure.
        let victim = index % NODES;
        let run = measure_run(&settings, index, victim)
            .with_context(|| format!("run {} (node{victim} killed)", index + 1))?;
        eprintln!("bench-failover:   {run}");
        runs.push(run);
    }
    let markdown = report::markdown(&report::Context {
        settings: &settings,
        runs: &runs,
        load_before,
        load_after: load_average(),
        elapsed: started.elapsed(),
    });
    publish_report("bench-failover", &cli.output, &markdown)
}

/// One run in a lab of its own, which is removed when the run ends, however it ends.
fn measure_run(settings: &Settings, index: usize, victim: usize) -> anyhow::Result<Run> {
    let mut lab = Lab::start(LabConfig {
        nodes: NODES,
        ..LabConfig::default()
    })
    .context("starting the lab")?;
    let lb_control_log = start_lb_control(&mut lab, settings).context("starting lb-control")?;
    let target = SocketAddr::from((VIP, SIM_NODE_RPC_PORT));
    let dead = SocketAddr::from((lab.node(victim).addr_v4, SIM_NODE_RPC_PORT));

    let load = Load::start(&lab.client().netns, target, settings.shape);
    // The checks run on a fixed clock from lb-control's start: each run kills at another point
    // of it, so the runs together sample every phase of the check interval once.
    wait(settings.warmup + CHECK_INTERVAL * index as u32 / settings.runs as u32)?;
    if load.failed() > 0 {
        let failures: Vec<String> = load
            .stop()
            .into_iter()
            .filter_map(|outcome| outcome.answer.err())
            .take(QUOTED_FAILURES)
            .collect();
        bail!(
            "requests failed before any node died, the lab is not steady: {}",
            failures.join("; ")
        );
    }

    let died = Instant::now();
    lab.kill_sim_node(victim)?;
    let mut slowest_read = Duration::ZERO;
    let removed = loop {
        check_interrupted()?;
        let read_started = Instant::now();
        let state = backend_states(&lab)?.get(&dead).copied();
        slowest_read = slowest_read.max(read_started.elapsed());
        if state == Some("down") {
            break Instant::now();
        }
        ensure!(
            died.elapsed() < TABLE_TIMEOUT,
            "node{victim} ({dead}) is still {} in the kernel {TABLE_TIMEOUT:?} after it died",
            state.unwrap_or("absent")
        );
        std::thread::sleep(KERNEL_POLL);
    };
    wait(settings.after)?;
    let mut outcomes = load.stop();
    outcomes.sort_by_key(|outcome| outcome.started);

    let before_death: BTreeSet<&str> = outcomes
        .iter()
        .filter(|outcome| outcome.finished < died)
        .filter_map(|outcome| outcome.answer.as_deref().ok())
        .collect();
    ensure!(
        before_death.len() == NODES,
        "before the death, only {before_death:?} answered"
    );
    let mut run = Run::new(index, victim, removed - died, slowest_read);
    for outcome in &outcomes {
        let phase = phase(outcome, died, removed);
        run.count(phase, outcome);
        if let Err(error) = &outcome.answer
            && phase == Phase::AfterRemoval
        {
            let after = outcome.started - removed;
            // In start order, so the last one seen is the latest.
            run.last_failure_after_removal = Some(after);
            if run.quoted_failures.len() < QUOTED_FAILURES {
                run.quoted_failures
                    .push(format!("{after:?} after the removal: {error}"));
            }
        }
    }
    run.lb_control_errors = error_lines(&lb_control_log);
    Ok(run)
}

/// lb-control's first ERROR lines, without colour codes: a change that failed to reach the
/// kernel says so there.
fn error_lines(log: &Path) -> Vec<String> {
    let log = std::fs::read_to_string(log).unwrap_or_default();
    log.lines()
        .map(without_colours)
        .filter(|line| line.contains(" ERROR "))
        .take(QUOTED_FAILURES)
        .collect()
}

/// `line` without its ANSI escape sequences (`ESC [ … letter`).
fn without_colours(line: &str) -> String {
    let mut plain = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            chars.by_ref().find(char::is_ascii_alphabetic);
        } else {
            plain.push(c);
        }
    }
    plain
}

/// When a request ran: done before the death; started after the removal (it must not fail);
/// or otherwise, overlapping the time the dead node was still in the table.
fn phase(outcome: &Outcome, died: Instant, removed: Instant) -> Phase {
    if outcome.finished < died {
        Phase::BeforeDeath
    } else if outcome.started >= removed {
        Phase::AfterRemoval
    } else {
        Phase::UntilRemoval
    }
}

/// lb-control balancing the VIP over every node, checked with the default health settings;
/// returns, once the kernel's table holds every node, up, and the VIP answers, its log file.
fn start_lb_control(lab: &mut Lab, settings: &Settings) -> anyhow::Result<PathBuf> {
    let nodes: Vec<SocketAddr> = lab
        .nodes()
        .iter()
        .map(|node| SocketAddr::from((node.addr_v4, SIM_NODE_RPC_PORT)))
        .collect();
    let backends: Vec<String> = nodes
        .iter()
        .map(|addr| format!("{{ address = \"{addr}\" }}"))
        .collect();
    let config = format!(
        "[dataplane]\nnat_source_v4 = \"{}\"\n\n[[services]]\nvip = \"{VIP}\"\n\
         port = {SIM_NODE_RPC_PORT}\ncheck = \"substrate\"\nbackends = [{}]\n",
        lab.lb().addr_v4,
        backends.join(", ")
    );
    let path = lab.log_dir().join("lb-control.toml");
    std::fs::write(&path, config).with_context(|| format!("writing {}", path.display()))?;
    let path = path.to_string_lossy().into_owned();
    let mut args = vec!["--config", path.as_str(), "--xdp-mode", settings.xdp_mode];
    let node_ifaces = lab.lb().node_ifaces.clone();
    for iface in &node_ifaces {
        args.extend(["-i", iface.as_str()]);
    }
    let log = lab.spawn_lb_control(&args)?.log_path().to_owned();
    let deadline = Instant::now() + TABLE_TIMEOUT;
    loop {
        check_interrupted()?;
        let states = backend_states(lab)?;
        // The backends' entries are written before the service that names them.
        let all_up = nodes.iter().all(|node| states.get(node) == Some(&"up"));
        if all_up && answers(lab).is_ok() {
            return Ok(log);
        }
        if Instant::now() >= deadline {
            lab.check_processes()?;
            let answer = answers(lab).err().map(|error| format!("{error:#}"));
            bail!(
                "within {TABLE_TIMEOUT:?}, the kernel's table did not hold every node up \
                 ({states:?}) or the VIP did not answer ({answer:?})"
            );
        }
        std::thread::sleep(KERNEL_POLL);
    }
}

/// Whether a request to the VIP from the client is answered.
fn answers(lab: &Lab) -> anyhow::Result<()> {
    let target = SocketAddr::from((VIP, SIM_NODE_RPC_PORT));
    in_netns(&lab.client().netns, || {
        RpcConnection::connect(target, Duration::from_secs(1))?.system_health_and_close()
    })??;
    Ok(())
}

/// Each backend's state in the kernel's table (`up`, `draining`, `down`).
fn backend_states(lab: &Lab) -> anyhow::Result<BTreeMap<SocketAddr, &'static str>> {
    let stats = read_pinned_stats(&lab.pin_dir()).context("reading the pinned maps")?;
    Ok(stats
        .backends
        .iter()
        .map(|backend| (backend.backend, backend.state))
        .collect())
}

/// Sleeps `duration` in short steps, returning early with an error on Ctrl-C.
fn wait(duration: Duration) -> anyhow::Result<()> {
    let until = Instant::now() + duration;
    while Instant::now() < until {
        check_interrupted()?;
        std::thread::sleep(Duration::from_millis(50).min(until - Instant::now()));
    }
    Ok(())
}

fn settings(cli: &Cli) -> anyhow::Result<Settings> {
    if cli.runs == 0 {
        bail!("--runs must be at least 1");
    }
    if cli.new_connection_workers + cli.keep_alive == 0 {
        bail!("--new-connection-workers and --keep-alive cannot both be 0: there would be no load");
    }
    Ok(Settings {
        runs: cli.runs,
        warmup: Duration::from_secs(cli.warmup),
        after: Duration::from_secs(cli.after),
        shape: LoadShape {
            new_connection_workers: cli.new_connection_workers,
            keep_alive_connections: cli.keep_alive,
            pause_after_failure: PAUSE_AFTER_FAILURE,
        },
        xdp_mode: cli.xdp_mode.as_arg(),
    })
}

/// Fails before building anything when not root or a binary is missing.
fn preflight() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the benchmark builds network namespaces and loads XDP programs: run it as root \
             (`cargo xtask bench failover` as root)"
        );
    }
    for name in ["lb-control", "sim-node"] {
        binary_path(name).with_context(|| {
            format!("the benchmark runs {name}; build it with `cargo build --release --bins`")
        })?;
    }
    Ok(())
}
