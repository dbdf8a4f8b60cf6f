//! `bench-l4` (`cargo xtask bench l4`): requests/s, p50/p99 latency and CPU per request of
//! JSON-RPC POSTs through the XDP service, beside three other balancers in the same lab and the
//! same run: a stateless ECMP multipath route (the zero-cost reference), nftables DNAT and
//! HAProxy in TCP mode.
//!
//! One lab (client, LB, two nodes running nginx) serves every run. Each repeat measures every
//! balancer with wrk in both modes (keep-alive, and a new connection per request); each run
//! sets its balancer up from nothing and undoes it completely afterwards, so no run inherits
//! another's flows, NAT ports or conntrack entries. The balancer order rotates each repeat and
//! the mode order alternates, so none always follows the same one (interleaved A/B). The
//! report gives medians over the repeats and the ratios the goals name, as markdown.

mod balancer;
mod nodes;
mod report;
mod wrk;

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use lb_tests::{
    bench::{
        check_interrupted, find_command, install_interrupt_handler, load_average, publish_report,
    },
    cpu,
    lab::{Lab, LabConfig},
};

use balancer::{Balancer, XdpCounters};
use report::{Mode, Run};

/// The service address every balancer answers on (where one can: all four do).
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 10);
/// The service port: nginx listens on it on every node.
pub const PORT: u16 = 80;
/// Nodes behind the balancers, as in the calibration lab.
pub const NODES: usize = 2;
/// Pause between runs, so one run's closing connections do not land in the next.
const SETTLE: Duration = Duration::from_secs(1);
/// Load average above which the report warns that the machine was not quiet.
const QUIET_LOAD: f64 = 0.5;

#[derive(Debug, Parser)]
#[command(
    about = "L4 benchmark: the XDP service vs. ECMP, nftables DNAT and HAProxy, in the lab",
    long_about = "Requests/s, p50/p99 and CPU per request of JSON-RPC POSTs (wrk) through the XDP \
                  service and three reference balancers, keep-alive and with a new connection per \
                  request; interleaved A/B runs, medians over the repeats. Needs root, wrk, nginx, \
                  haproxy and nft. Run it on a quiet machine: other load moves the figures."
)]
struct Cli {
    /// Length of each wrk run, in seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Repeats of the whole set (at least 5 for the figures the goals are judged by).
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Concurrent connections (wrk -c).
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// wrk threads (wrk -t).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Balancers to run, comma-separated; default all four.
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Balancer>,
    /// Modes to run, comma-separated; default both.
    #[arg(long, value_enum, value_delimiter = ',')]
    modes: Vec<Mode>,
    /// Seconds of unmeasured wrk load before each measured run.
    #[arg(long, default_value_t = 1)]
    warmup: u64,
    /// HAProxy threads (`nbthread`); the default, one per core, is what HAProxy picks itself.
    #[arg(long, default_value_t = 2)]
    haproxy_threads: usize,
    /// nginx worker processes per node.
    #[arg(long, default_value_t = 1)]
    nginx_workers: usize,
    /// XDP attach mode for lb-control.
    #[arg(long, value_enum, default_value_t = XdpMode::Auto)]
    xdp_mode: XdpMode,
    /// Where the markdown report goes.
    #[arg(long, default_value = "target/bench/l4.md")]
    output: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum XdpMode {
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
    pub seconds: u64,
    pub warmup: u64,
    pub repeats: usize,
    pub connections: usize,
    pub threads: usize,
    pub balancers: Vec<Balancer>,
    pub modes: Vec<Mode>,
    pub haproxy_threads: usize,
    pub nginx_workers: usize,
    pub xdp_mode: &'static str,
}

fn main() -> ExitCode {
    lb_tests::bench::main("bench-l4", || run(Cli::parse()))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let settings = settings(&cli)?;
    preflight(&settings)?;
    install_interrupt_handler();
    let started = Instant::now();
    let load_before = load_average();
    eprintln!(
        "bench-l4: {} balancer(s) x {} mode(s) x {} repeat(s), {} s each (+{} s warm-up); \
         load average {load_before:.2}",
        settings.balancers.len(),
        settings.modes.len(),
        settings.repeats,
        settings.seconds,
        settings.warmup,
    );
    if load_before > QUIET_LOAD {
        eprintln!(
            "bench-l4: warning: load average {load_before:.2} > {QUIET_LOAD}: the machine is \
             not quiet, the figures will be noisy"
        );
    }

    let script_dir = std::env::temp_dir().join(format!("bench-l4-{}", std::process::id()));
    std::fs::create_dir_all(&script_dir)
        .with_context(|| format!("creating {}", script_dir.display()))?;
    let scripts = wrk::Scripts::write(&script_dir)?;

    let mut runs = Vec::new();
    for repeat in 0..settings.repeats {
        // Rotate the order each repeat: every balancer runs in every position.
        let count = settings.balancers.len();
        let order: Vec<Balancer> = (0..count)
            .map(|index| settings.balancers[(index + repeat) % count])
            .collect();
        // Alternate the mode order too, so neither mode always runs first.
        let modes: Vec<Mode> = if repeat % 2 == 0 {
            settings.modes.clone()
        } else {
            settings.modes.iter().rev().copied().collect()
        };
        for balancer in order {
            for &mode in &modes {
                check_interrupted()?;
                let run = measure_fresh(&scripts, &settings, balancer, mode, repeat).with_context(
                    || {
                        format!(
                            "repeat {}: {} {}",
                            repeat + 1,
                            balancer.label(),
                            mode.label()
                        )
                    },
                )?;
                eprintln!("bench-l4:   {run}");
                runs.push(run);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&script_dir);

    let markdown = report::markdown(&report::Context {
        settings: &settings,
        runs: &runs,
        load_before,
        load_after: load_average(),
        elapsed: started.elapsed(),
    });
    publish_report("bench-l4", &cli.output, &markdown)
}

/// Builds a fresh lab, sets the balancer up, checks it answers, measures one run and removes
/// it all: no run inherits state from another — not flows, NAT ports or conntrack entries, nor
/// the nodes' TIME_WAIT backlog of an earlier run, which slowed the next runs measurably when
/// the lab was shared.
fn measure_fresh(
    scripts: &wrk::Scripts,
    settings: &Settings,
    balancer: Balancer,
    mode: Mode,
    repeat: usize,
) -> anyhow::Result<Run> {
    let mut lab = Lab::start(LabConfig {
        nodes: NODES,
        block_time: Duration::from_secs(6),
        start_sim_nodes: false,
    })
    .context("starting the lab")?;
    nodes::start(&mut lab, settings.nginx_workers).context("starting nginx")?;
    let lab = &mut lab;
    let active = balancer::setup(lab, balancer, settings).context("setting up")?;
    let split = balancer::probe(lab, balancer).context("checking it answers")?;
    eprintln!(
        "bench-l4: repeat {}/{}: {} {}: ready, probe connections per node {split:?}",
        repeat + 1,
        settings.repeats,
        balancer.label(),
        mode.label(),
    );
    if let Some(attached) = active.xdp_attached() {
        eprintln!("bench-l4:   XDP attached: {attached}");
    }
    std::thread::sleep(SETTLE);
    let mut run = measure(lab, scripts, settings, balancer, mode, repeat)?;
    run.xdp_attached = active.xdp_attached().map(str::to_owned);
    active.teardown(lab).context("undoing it")?;
    Ok(run)
}

/// One measured wrk run (after an unmeasured warm-up) with the machine's CPU time around it.
fn measure(
    lab: &Lab,
    scripts: &wrk::Scripts,
    settings: &Settings,
    balancer: Balancer,
    mode: Mode,
    repeat: usize,
) -> anyhow::Result<Run> {
    if settings.warmup > 0 {
        wrk::run(lab, scripts, settings, mode, settings.warmup).context("warm-up")?;
    }
    let is_xdp = balancer == Balancer::Xdp;
    let xdp_before = is_xdp.then(|| XdpCounters::read(lab)).transpose()?;
    let packets_before = nodes::rx_packets(lab)?;
    let cpu_before = cpu::sample()?;
    let result = wrk::run(lab, scripts, settings, mode, settings.seconds)?;
    let cpu_after = cpu::sample()?;
    let packets_after = nodes::rx_packets(lab)?;
    let xdp = match xdp_before {
        Some(before) => Some(XdpCounters::read(lab)?.since(&before)),
        None => None,
    };
    let node_packets: Vec<u64> = packets_after
        .iter()
        .zip(&packets_before)
        .map(|(after, before)| after.saturating_sub(*before))
        .collect();
    if result.requests == 0 {
        bail!("wrk completed no request: {}", result.errors_line());
    }
    Ok(Run {
        repeat,
        balancer,
        mode,
        cpu: cpu_after.since(&cpu_before),
        node_packets,
        wrk: result,
        xdp,
        xdp_attached: None,
    })
}

fn settings(cli: &Cli) -> anyhow::Result<Settings> {
    if cli.seconds == 0 || cli.repeats == 0 || cli.connections == 0 || cli.threads == 0 {
        bail!("--seconds, --repeats, --connections and --threads must be at least 1");
    }
    if cli.connections < cli.threads {
        bail!(
            "--connections {} < --threads {}: wrk needs a connection per thread",
            cli.connections,
            cli.threads
        );
    }
    if cli.haproxy_threads == 0 || cli.nginx_workers == 0 {
        bail!("--haproxy-threads and --nginx-workers must be at least 1");
    }
    let balancers = if cli.only.is_empty() {
        Balancer::value_variants().to_vec()
    } else {
        first_of_each(&cli.only)
    };
    let modes = if cli.modes.is_empty() {
        Mode::value_variants().to_vec()
    } else {
        first_of_each(&cli.modes)
    };
    Ok(Settings {
        seconds: cli.seconds,
        warmup: cli.warmup,
        repeats: cli.repeats,
        connections: cli.connections,
        threads: cli.threads,
        balancers,
        modes,
        haproxy_threads: cli.haproxy_threads,
        nginx_workers: cli.nginx_workers,
        xdp_mode: cli.xdp_mode.as_arg(),
    })
}

/// The items in their order, each once.
fn first_of_each<T: PartialEq + Copy>(items: &[T]) -> Vec<T> {
    let mut unique = Vec::new();
    for item in items {
        if !unique.contains(item) {
            unique.push(*item);
        }
    }
    unique
}

/// Fails before building anything when a program is missing, naming the package.
fn preflight(settings: &Settings) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the benchmark builds network namespaces and loads XDP programs: run it as root \
             (`cargo xtask bench l4` as root)"
        );
    }
    let mut needed = vec![("wrk", "wrk"), ("nginx", "nginx"), ("ip", "iproute2")];
    for balancer in &settings.balancers {
        match balancer {
            Balancer::Nftables => needed.push(("nft", "nftables")),
            Balancer::Haproxy => needed.push(("haproxy", "haproxy")),
            Balancer::Xdp | Balancer::Ecmp => {}
        }
    }
    let missing: Vec<String> = needed
        .iter()
        .filter(|(command, _)| find_command(command).is_none())
        .map(|(command, package)| format!("{command} (Debian package {package})"))
        .collect();
    if !missing.is_empty() {
        bail!(
            "missing programs: {}; install them with `cargo xtask setup` or `apt-get install -y \
             haproxy nftables nginx wrk`",
            missing.join(", ")
        );
    }
    if settings.balancers.contains(&Balancer::Xdp) {
        lb_tests::lab::binary_path("lb-control").context(
            "the XDP balancer runs lb-control; build it with `cargo build --release --bins`",
        )?;
    }
    Ok(())
}
