//! `bench-ha` (`cargo xtask bench ha`): what the clients of an HA pair see when its master
//! fails under load.
//!
//! Each run builds a fresh HA lab (the one `cargo xtask run --ha` builds: two LBs running
//! lb-control and keepalived, etcd on both and on a fallback site, sim-nodes behind) and loads
//! it from the client: wrk through the gateway and through the L4 NAT service, polkadot.js
//! clients following new heads, an admin write loop, and long-lived L4 connections opened so
//! that their ages at the event are known. Then the event of the run's [`Scenario`] happens to
//! the master, and the run measures when the standby had the floating addresses, when each
//! kind of client was answered again, what failed, which long-lived connections broke, how
//! the WebSocket clients reconnected, and whether every acknowledged write is on the new
//! master. The runs of the scenarios interleave, so a drift of the machine's load shows in
//! all of them alike.

mod load;
mod report;
mod scenario;

use std::{
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, bail, ensure};
use clap::Parser;
use lb_control::ha::Role;
use lb_tests::{
    admin_writes,
    bench::{check_interrupted, install_interrupt_handler, load_average, publish_report},
    lab::{PairConfig, PairLab, binary_path},
    poll::wait_until,
    wrk,
};

use load::{AGE_BUCKETS, AgeBucket, LoadResults, Loads, LongLived, epoch_ms, wait_until_instant};
use report::{Flows, HttpFigures, Run, WebSocketFigures, WriteFigures};
use scenario::{MASTER, STANDBY, Scenario};

/// Nodes behind the pair.
pub const NODES: usize = 3;
/// sim-node's block interval: a reconnected client hears a head soon.
const BLOCK_TIME: Duration = Duration::from_secs(1);
/// keepalived's preempt_delay: longer than a run, so the old master never takes the
/// addresses back within one.
const PREEMPT_DELAY: Duration = Duration::from_secs(60);
/// How often the floating addresses are looked for on the standby after the event.
const VIP_POLL: Duration = Duration::from_millis(5);
/// Longest wait for the standby to take the addresses, and for the pair's roles at start.
const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(10);
/// Broken long-lived connections quoted per run.
const QUOTED_BROKEN: usize = 3;

#[derive(Debug, Parser)]
#[command(
    about = "HA benchmark: the master of the pair fails under load; when the standby answers, \
             what failed, which L4 connections broke, how WebSocket clients reconnected, \
             whether acknowledged admin writes survived",
    long_about = "Each run: a fresh HA lab (cargo xtask run --ha), load from the client (wrk \
                  through the gateway and the L4 NAT service, polkadot.js clients following \
                  heads, an admin write loop, long-lived L4 connections of ages 0.1-10 s), then \
                  the scenario's event on the master (kill: SIGKILL of its lb-control and \
                  keepalived; cut-links: its client and private links down; handover: \
                  lb-control ha handover on it). Reports every run, \
                  medians per scenario and the issue's goals. Needs root."
)]
struct Cli {
    /// Runs of each scenario, each in a fresh lab.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// The scenarios, in the order they take turns.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = Scenario::ALL)]
    scenarios: Vec<Scenario>,
    /// Each wrk connection's pause after an answer before its next request, in ms.
    #[arg(long, default_value_t = 10)]
    pace_ms: u64,
    /// polkadot.js clients following new heads through the gateway.
    #[arg(long, default_value_t = 10)]
    ws_clients: usize,
    /// Long-lived L4 connections, spread evenly over the age buckets.
    #[arg(long, default_value_t = 32)]
    l4_connections: usize,
    /// Seconds of load after the event before the long-lived connections are checked and the
    /// load stops.
    #[arg(long, default_value_t = 5)]
    after: u64,
    /// Where the markdown report goes.
    #[arg(long, default_value = "target/bench/ha.md")]
    output: PathBuf,
}

/// The settings a run needs, resolved from the command line.
#[derive(Debug, Clone)]
pub struct Settings {
    pub runs: usize,
    pub scenarios: Vec<Scenario>,
    pub pace: Duration,
    pub ws_clients: usize,
    pub l4_connections: usize,
    pub after: Duration,
}

fn main() -> ExitCode {
    lb_tests::bench::main("bench-ha", || run(Cli::parse()))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let settings = settings(&cli)?;
    preflight()?;
    install_interrupt_handler();
    let started = Instant::now();
    let load_before = load_average();
    eprintln!(
        "bench-ha: {} run(s) of {}; load average {load_before:.2}",
        settings.runs,
        settings
            .scenarios
            .iter()
            .map(|scenario| scenario.name())
            .collect::<Vec<_>>()
            .join(", "),
    );
    let mut runs = Vec::new();
    for index in 0..settings.runs {
        for &scenario in &settings.scenarios {
            check_interrupted()?;
            let run = measure_run(&settings, scenario, index)
                .with_context(|| format!("{} run {}", scenario.name(), index + 1))?;
            eprintln!("bench-ha:   {}", run.line());
            runs.push(run);
        }
    }
    let markdown = report::markdown(&report::Context {
        settings: &settings,
        runs: &runs,
        load_before,
        load_after: load_average(),
        elapsed: started.elapsed(),
    });
    publish_report("bench-ha", &cli.output, &markdown)
}

/// When the event happened, on each clock a load reports on.
struct Event {
    at: Instant,
    /// `CLOCK_MONOTONIC`, wrk's timelines.
    monotonic: Duration,
    /// Wall-clock ms, the polkadot.js clients'.
    epoch_ms: u64,
}

/// One run in a lab of its own, which is removed when the run ends, however it ends.
fn measure_run(settings: &Settings, scenario: Scenario, index: usize) -> anyhow::Result<Run> {
    let mut lab = PairLab::start(PairConfig {
        nodes: NODES,
        block_time: BLOCK_TIME,
        preempt_delay: PREEMPT_DELAY,
    })
    .context("starting the HA lab")?;
    wait_until(
        "LB a master and LB b backup, as keepalived told them",
        TAKEOVER_TIMEOUT,
        || Ok(lab.role(MASTER)? == Role::Master && lab.role(STANDBY)? == Role::Backup),
    )?;
    let created = lab.cli(MASTER, &["key", "create", "--name", "bench-ha"])?;
    let key = created
        .lines()
        .find_map(|line| line.strip_prefix("secret: "))
        .context("`lb-control key create` printed no secret")?
        .to_owned();
    let loads = Loads::start(&lab, settings, &key)?;
    let service = loads.writes.service();
    let (long_lived, at) = LongLived::open_before_event(&lab, settings.l4_connections)?;
    ensure!(
        loads.writes.log().refused.is_empty(),
        "admin writes were refused before the event: {:?}",
        loads.writes.log().refused.first()
    );

    let event = Event {
        at,
        monotonic: wrk::monotonic_now(),
        epoch_ms: epoch_ms(SystemTime::now()),
    };
    scenario.cause(&mut lab)?;
    let vip_on_standby = loop {
        if lab.holders()?.contains(&STANDBY) {
            break event.at.elapsed();
        }
        ensure!(
            event.at.elapsed() < TAKEOVER_TIMEOUT,
            "the standby did not take the floating addresses within {TAKEOVER_TIMEOUT:?}: {}",
            lab.keepalived_log(STANDBY)
        );
        check_interrupted()?;
        std::thread::sleep(VIP_POLL);
    };
    wait_until_instant(event.at + settings.after)?;
    let checked = long_lived.check(event.at);
    let results = loads.stop()?;
    ensure!(
        lab.role(STANDBY)? == Role::Master,
        "LB b is not master after the event: {}",
        lab.keepalived_log(STANDBY)
    );
    let lost = admin_writes::missing_on(&lab, STANDBY, service, &results.writes)?;
    let mut run = figures(scenario, index, vip_on_standby, &event, settings, results)?;
    run.writes.lost = lost.iter().map(ToString::to_string).collect();
    for (age, check) in checked {
        let bucket = AgeBucket::of(age);
        run.flows[bucket].connections += 1;
        if let Err(error) = check {
            run.flows[bucket].broken += 1;
            if run.broken.len() < QUOTED_BROKEN {
                run.broken
                    .push(format!("{:.0} ms old: {error}", report::ms(age)));
            }
        }
    }
    Ok(run)
}

/// The run's figures from what its loads saw.
fn figures(
    scenario: Scenario,
    index: usize,
    vip_on_standby: Duration,
    event: &Event,
    settings: &Settings,
    results: LoadResults,
) -> anyhow::Result<Run> {
    let http = results
        .http
        .iter()
        .map(|reads| {
            let failed = reads.count("failed")?
                + reads.count("read")?
                + reads.count("write")?
                + reads.count("timeout")?;
            Ok(HttpFigures {
                pause: reads
                    .timeline()?
                    .longest_pause(event.monotonic, settings.after),
                answered: reads.count("answered")?,
                failed,
                refused_connects: reads.count("connect")?,
                first_failure: reads.first_failure().map(str::to_owned),
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let since_event = |at: u64| Duration::from_millis(at.saturating_sub(event.epoch_ms));
    let after_event: Vec<_> = results
        .js
        .reconnections
        .iter()
        .filter(|reconnection| reconnection.down >= event.epoch_ms)
        .collect();
    let websocket = WebSocketFigures {
        clients: results.js.clients,
        reconnect: after_event
            .iter()
            .map(|reconnection| Duration::from_millis(reconnection.up - reconnection.down))
            .collect(),
        event_to_connected: after_event
            .iter()
            .map(|reconnection| since_event(reconnection.up))
            .collect(),
        heads_again: after_event
            .iter()
            .filter(|reconnection| reconnection.head.is_some())
            .count(),
        cut_off: results.js.cut_off,
        error_answers: results.js.error_answers,
    };
    let writes = WriteFigures {
        acknowledged: results.writes.acknowledged.len(),
        refused: results.writes.refused.len(),
        acknowledged_again: results
            .writes
            .first_acknowledged_since(event.at)
            .map(|write| write.at - event.at),
        lost: Vec::new(),
    };
    Ok(Run {
        scenario,
        index,
        vip_on_standby,
        http,
        websocket,
        writes,
        flows: [Flows::default(); AGE_BUCKETS.len()],
        broken: Vec::new(),
    })
}

fn settings(cli: &Cli) -> anyhow::Result<Settings> {
    if cli.runs == 0 {
        bail!("--runs must be at least 1");
    }
    if cli.scenarios.is_empty() {
        bail!("--scenarios names none: give kill, cut-links, handover or several");
    }
    if cli.pace_ms == 0 {
        bail!("--pace-ms must be at least 1: without a pause wrk takes every CPU from the pair");
    }
    if cli.ws_clients == 0 {
        bail!("--ws-clients must be at least 1");
    }
    if cli.l4_connections < AGE_BUCKETS.len() {
        bail!(
            "--l4-connections must be at least {}: one per age bucket",
            AGE_BUCKETS.len()
        );
    }
    if cli.after < 2 {
        bail!("--after must be at least 2 s: the takeover takes about half a second");
    }
    Ok(Settings {
        runs: cli.runs,
        scenarios: cli.scenarios.clone(),
        pace: Duration::from_millis(cli.pace_ms),
        ws_clients: cli.ws_clients,
        l4_connections: cli.l4_connections,
        after: Duration::from_secs(cli.after),
    })
}

/// Fails before building anything when not root or a binary is missing.
fn preflight() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the benchmark builds network namespaces and loads XDP programs: run it as root \
             (`cargo xtask bench ha` as root)"
        );
    }
    for name in ["lb-control", "sim-node"] {
        binary_path(name).with_context(|| {
            format!("the benchmark runs {name}; build it with `cargo build --release --bins`")
        })?;
    }
    for (program, package) in [
        ("keepalived", "keepalived"),
        ("etcd", "etcd-server"),
        ("wrk", "wrk"),
        ("node", "nodejs"),
    ] {
        lb_tests::bench::find_command(program).with_context(|| {
            format!("the benchmark runs {program}: install Debian's {package} (cargo xtask setup)")
        })?;
    }
    Ok(())
}
