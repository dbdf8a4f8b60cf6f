//! `bench-gateway` (`cargo xtask bench gateway`): requests/s and latency of JSON-RPC POSTs
//! through the gateway over TLS with keep-alive, cache hits and cache misses, beside the same
//! calls straight to a node and through nginx terminating TLS in front of the same nodes, both
//! proxying and answering from its `proxy_cache`.
//!
//! One lab (client, LB, 2 sim-nodes) serves every run: lb-control with its gateway and nginx
//! both listen with TLS on the LB's client-side address, the certificate signed by the lab's
//! CA; wrk runs in the client namespace. Each repeat measures every target once, in an order
//! rotated each repeat (interleaved A/B), after an unmeasured warm-up that also fills the
//! caches; the report gives medians over the repeats, the ratios the goals name, and the
//! resident memory of lb-control and nginx.

mod flood;
mod report;
mod setup;
mod websocket;

use std::{
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
    wrk::{self, Load, WrkResult},
};

use report::Run;
use setup::Setup;

/// A method the gateway caches until the runtime changes and nginx caches by the call's body.
pub const CACHED_METHOD: &str = "state_getRuntimeVersion";
/// A method nobody caches (the node's own peer id): every call reaches a node.
pub const UNCACHED_METHOD: &str = "system_localPeerId";

/// The body of a call of `method` with no parameters.
pub fn call_of(method: &str) -> String {
    format!(r#"{{"jsonrpc":"2.0","id":1,"method":"{method}","params":[]}}"#)
}
/// Nodes behind the gateway and nginx.
pub const NODES: usize = 2;
/// Pause between runs, so one run's closing connections do not land in the next.
const SETTLE: Duration = Duration::from_secs(1);
/// Load average above which the run warns that the machine was not quiet.
const QUIET_LOAD: f64 = 0.5;

/// Where a run sends its requests, and which call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum Target {
    /// The gateway over TLS, the cached call: answered from its cache.
    GatewayHit,
    /// nginx over TLS with `proxy_cache` on POST bodies, the cached call: its cache hits.
    NginxHit,
    /// nginx over TLS proxying to the nodes, the uncached call.
    NginxProxy,
    /// The gateway over TLS, the uncached call: every request goes to a node.
    GatewayMiss,
    /// Plain HTTP straight to node 0's sim-node, the uncached call: the reference for misses.
    Node,
    /// [`Target::GatewayMiss`] on one connection (`wrk -t1 -c1`): the latency a miss adds
    /// without queueing, which at 64 connections on a saturated machine is most of p50.
    GatewayMissSerial,
    /// [`Target::Node`] on one connection: the reference for [`Target::GatewayMissSerial`].
    NodeSerial,
    /// [`Target::GatewayHit`] on a few connections (`--light-connections`): a valid key's
    /// latency while the gateway has room, the reference for [`Target::GatewayHitUnderFlood`].
    GatewayHitLight,
    /// [`Target::GatewayHitLight`] while a second wrk (`--flood-connections`) floods the
    /// gateway with made-up API keys, a new one on every request.
    GatewayHitUnderFlood,
    /// The gateway over `wss://`, the cached call: `--ws-connections` connections, each with
    /// `--ws-in-flight` calls in flight, answered from its cache.
    GatewayWsHit,
    /// The same load, the uncached call: every call rides the gateway's shared upstream
    /// WebSocket connections to a node.
    GatewayWsMiss,
    /// nginx passing WebSockets through (TLS ended there) to the nodes, the cached call (the
    /// node answers it): a WebSocket connection to a node per client.
    NginxWs,
}

impl Target {
    pub fn label(self) -> &'static str {
        match self {
            Target::GatewayHit => "gateway, cache hit",
            Target::NginxHit => "nginx proxy_cache, hit",
            Target::NginxProxy => "nginx proxying",
            Target::GatewayMiss => "gateway, cache miss",
            Target::Node => "straight to the node",
            Target::GatewayMissSerial => "gateway, cache miss, 1 connection",
            Target::NodeSerial => "straight to the node, 1 connection",
            Target::GatewayHitLight => "gateway, cache hit, light load",
            Target::GatewayHitUnderFlood => "gateway, cache hit, light load, made-up key flood",
            Target::GatewayWsHit => "gateway WebSocket, cache hit",
            Target::GatewayWsMiss => "gateway WebSocket, cache miss",
            Target::NginxWs => "nginx WebSocket pass-through",
        }
    }

    /// Runs over WebSocket connections (`ws-load`) rather than HTTP (wrk).
    pub fn is_websocket(self) -> bool {
        matches!(
            self,
            Target::GatewayWsHit | Target::GatewayWsMiss | Target::NginxWs
        )
    }

    /// wrk's threads and connections for this target: one request at a time for the serial
    /// targets, a light load for the flood's pair, else the configured load.
    pub fn threads_and_connections(self, settings: &Settings) -> (usize, usize) {
        match self {
            Target::GatewayMissSerial | Target::NodeSerial => (1, 1),
            Target::GatewayHitLight | Target::GatewayHitUnderFlood => {
                (1, settings.light_connections)
            }
            _ => (settings.threads, settings.connections),
        }
    }

    pub fn is_cached_call(self) -> bool {
        matches!(
            self,
            Target::GatewayHit
                | Target::NginxHit
                | Target::GatewayHitLight
                | Target::GatewayHitUnderFlood
                | Target::GatewayWsHit
                | Target::NginxWs
        )
    }

    pub fn is_gateway(self) -> bool {
        matches!(
            self,
            Target::GatewayHit
                | Target::GatewayMiss
                | Target::GatewayMissSerial
                | Target::GatewayHitLight
                | Target::GatewayHitUnderFlood
                | Target::GatewayWsHit
                | Target::GatewayWsMiss
        )
    }

    pub fn call(self) -> String {
        call_of(self.method())
    }

    /// The method [`Target::call`] calls.
    pub fn method(self) -> &'static str {
        if self.is_cached_call() {
            CACHED_METHOD
        } else {
            UNCACHED_METHOD
        }
    }
}

#[derive(Debug, Parser)]
#[command(
    about = "Gateway benchmark: cache hits and misses over TLS vs. the node and nginx, in the lab",
    long_about = "Requests/s and p50/p99 of JSON-RPC POSTs (wrk, keep-alive) through the gateway \
                  over TLS (a cached and an uncached call), straight to a sim-node, and through \
                  nginx terminating TLS (proxying, and its proxy_cache hits); interleaved runs, \
                  medians over the repeats; RSS of lb-control and nginx. Needs root, wrk, nginx \
                  and curl. Run it on a quiet machine: other load moves the figures."
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
    /// Seconds of unmeasured wrk load before each measured run.
    #[arg(long, default_value_t = 1)]
    warmup: u64,
    /// nginx worker processes (one per core, as `worker_processes auto` would pick).
    #[arg(long, default_value_t = 2)]
    nginx_workers: usize,
    /// Connections of the light load the made-up key flood is measured against (one thread).
    #[arg(long, default_value_t = 8)]
    light_connections: usize,
    /// Connections of the made-up key flood (one thread); each request carries a new key.
    #[arg(long, default_value_t = 32)]
    flood_connections: usize,
    /// WebSocket connections of the WebSocket runs.
    #[arg(long, default_value_t = 64)]
    ws_connections: usize,
    /// Calls each WebSocket connection keeps in flight.
    #[arg(long, default_value_t = 4)]
    ws_in_flight: usize,
    /// Targets to run, comma-separated; default all.
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Target>,
    /// Where the markdown report goes.
    #[arg(long, default_value = "target/bench/gateway.md")]
    output: PathBuf,
}

/// The settings a run needs, resolved from the command line.
#[derive(Debug, Clone)]
pub struct Settings {
    pub seconds: u64,
    pub warmup: u64,
    pub repeats: usize,
    pub connections: usize,
    pub threads: usize,
    pub nginx_workers: usize,
    pub light_connections: usize,
    pub flood_connections: usize,
    pub ws_connections: usize,
    pub ws_in_flight: usize,
    pub targets: Vec<Target>,
}

fn main() -> ExitCode {
    lb_tests::bench::main("bench-gateway", || run(Cli::parse()))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let settings = settings(&cli)?;
    preflight()?;
    install_interrupt_handler();
    let started = Instant::now();
    let load_before = load_average();
    eprintln!(
        "bench-gateway: {} target(s) x {} repeat(s), {} s each (+{} s warm-up); load average \
         {load_before:.2}",
        settings.targets.len(),
        settings.repeats,
        settings.seconds,
        settings.warmup,
    );
    if load_before > QUIET_LOAD {
        eprintln!(
            "bench-gateway: warning: load average {load_before:.2} > {QUIET_LOAD}: the machine \
             is not quiet, the figures will be noisy"
        );
    }
    let mut setup = Setup::start(&settings).context("setting up the lab")?;
    eprintln!("bench-gateway: lab ready, every target answers");

    let mut runs = Vec::new();
    for repeat in 0..settings.repeats {
        let count = settings.targets.len();
        for index in 0..count {
            // Rotate the order each repeat: every target runs in every position.
            let target = settings.targets[(index + repeat) % count];
            check_interrupted()?;
            std::thread::sleep(SETTLE);
            let run = measure(&mut setup, &settings, target, repeat)
                .with_context(|| format!("repeat {}: {}", repeat + 1, target.label()))?;
            eprintln!("bench-gateway:   {run}");
            runs.push(run);
        }
    }
    let memory = setup.memory()?;

    let markdown = report::markdown(&report::Context {
        settings: &settings,
        runs: &runs,
        memory: &memory,
        load_before,
        load_after: load_average(),
        elapsed: started.elapsed(),
    });
    publish_report("bench-gateway", &cli.output, &markdown)
}

/// One measured wrk run after an unmeasured warm-up, with the machine's CPU time and the
/// gateway's cache lookups around it; for [`Target::GatewayHitUnderFlood`], with the flood of
/// made-up keys running around the whole measured run.
fn measure(
    setup: &mut Setup,
    settings: &Settings,
    target: Target,
    repeat: usize,
) -> anyhow::Result<Run> {
    let url = setup.url(target);
    let (threads, connections) = target.threads_and_connections(settings);
    let load = |seconds| -> anyhow::Result<WrkResult> {
        if target.is_websocket() {
            return websocket::run(setup, settings, target, seconds);
        }
        wrk::run(
            &setup.lab,
            &Load {
                netns: &setup.lab.client().netns,
                threads,
                connections,
                seconds,
                script: setup.script(target),
                url: &url,
            },
        )
    };
    if settings.warmup > 0 {
        load(settings.warmup).context("warm-up")?;
    }
    let measured = || -> anyhow::Result<_> {
        let lookups_before = setup.cache_lookups()?;
        let cpu_before = cpu::sample()?;
        let result = load(settings.seconds)?;
        let cpu = cpu::sample()?.since(&cpu_before);
        Ok((result, cpu, setup.cache_lookups()?.since(&lookups_before)))
    };
    let (result, cpu, lookups, flood) = if target == Target::GatewayHitUnderFlood {
        let (measured, flood) = flood::around(setup, settings, measured)?;
        let (result, cpu, lookups) = measured?;
        (result, cpu, lookups, Some(flood))
    } else {
        let (result, cpu, lookups) = measured()?;
        (result, cpu, lookups, None)
    };
    if result.requests == 0 {
        bail!("wrk completed no request: {}", result.errors_line());
    }
    Ok(Run {
        repeat,
        target,
        wrk: result,
        cpu,
        cache: target.is_gateway().then_some(lookups),
        flood,
        memory: setup.memory()?,
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
    if [
        cli.light_connections,
        cli.flood_connections,
        cli.ws_connections,
        cli.ws_in_flight,
    ]
    .contains(&0)
    {
        bail!(
            "--light-connections, --flood-connections, --ws-connections and --ws-in-flight \
             must be at least 1"
        );
    }
    if cli.nginx_workers == 0 {
        bail!("--nginx-workers must be at least 1");
    }
    let mut targets = Vec::new();
    for &target in if cli.only.is_empty() {
        Target::value_variants()
    } else {
        &cli.only
    } {
        if !targets.contains(&target) {
            targets.push(target);
        }
    }
    Ok(Settings {
        seconds: cli.seconds,
        warmup: cli.warmup,
        repeats: cli.repeats,
        connections: cli.connections,
        threads: cli.threads,
        nginx_workers: cli.nginx_workers,
        light_connections: cli.light_connections,
        flood_connections: cli.flood_connections,
        ws_connections: cli.ws_connections,
        ws_in_flight: cli.ws_in_flight,
        targets,
    })
}

/// Fails before building anything when a program is missing, naming the package.
fn preflight() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the benchmark builds network namespaces and loads XDP programs: run it as root \
             (`cargo xtask bench gateway` as root)"
        );
    }
    let needed = [("wrk", "wrk"), ("nginx", "nginx"), ("curl", "curl")];
    let missing: Vec<String> = needed
        .iter()
        .filter(|(command, _)| find_command(command).is_none())
        .map(|(command, package)| format!("{command} (Debian package {package})"))
        .collect();
    if !missing.is_empty() {
        bail!(
            "missing programs: {}; install them with `cargo xtask setup`",
            missing.join(", ")
        );
    }
    for binary in ["lb-control", "sim-node"] {
        lb_tests::lab::binary_path(binary).with_context(|| {
            format!("the benchmark runs {binary}; build it with `cargo build --release --bins`")
        })?;
    }
    Ok(())
}
