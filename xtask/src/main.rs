//! `cargo xtask setup | build | run | test | bench`: the project's one-command workflows.

mod bench;
mod bench_crowd;
mod bench_failover;
mod bench_gateway;
mod bench_ha;
mod bench_l4;
mod build;
mod setup;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(about = "Set up, build, run and test the load balancer")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install what building and testing need and is missing: rust-src, bpf-linker, Debian
    /// packages, the JavaScript test client. Idempotent.
    Setup,
    /// Build everything in release mode.
    Build,
    /// Without arguments: start the lab (3 simulated nodes and the load balancer in network
    /// namespaces) until Ctrl-C; with --ha, the HA lab (a pair of load balancers). With
    /// --config: run lb-control on this host with that file.
    Run {
        /// Run lb-control on the host with this config file instead of starting the lab.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Number of simulated nodes in the lab.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Start the HA lab instead: two LBs (lb-control and keepalived each) sharing the
        /// client's and the nodes' segments, etcd on both and on a fallback site.
        #[arg(long, conflicts_with = "config")]
        ha: bool,
    },
    /// Build and run every test, unit and integration (root, BPF and namespace tests included).
    Test {
        /// Passed to `cargo test` (e.g. a test name filter after `--`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        cargo_args: Vec<String>,
    },
    /// Run a benchmark and write its table under target/bench/ (root; use a quiet machine).
    Bench {
        #[command(subcommand)]
        which: Bench,
    },
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// The XDP program alone: ns per packet from BPF_PROG_TEST_RUN for new flow, established
    /// flow, reply path, passed and blocked packets, beside the bare xdp_pass program; writes
    /// target/bench/xdp.md. Arguments go to the bench_xdp example: --repeat (1000000),
    /// --rounds (5), --singles (20000), --out FILE.
    Xdp {
        /// Arguments for bench_xdp.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// L4 through the lab: the XDP service vs. an ECMP route, nftables DNAT and HAProxy.
    ///
    /// Requests/s, p50/p99 and CPU per request with wrk, keep-alive and a new connection per
    /// request; interleaved runs, medians; writes target/bench/l4.md. Arguments go to the
    /// bench-l4 binary: --seconds (10), --repeats (5), --connections (64),
    /// --only xdp,ecmp,nftables,haproxy, --modes keepalive,close, and more
    /// (`cargo xtask bench l4 -- --help`). A smoke run: `cargo xtask bench l4 --seconds 2
    /// --repeats 1`.
    L4 {
        /// Arguments for bench-l4.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Failover: a sim-node is killed under load; time until the health checker has it down in
    /// the kernel's table, and requests failed until then and after.
    ///
    /// Each run is a fresh lab (3 sim-nodes, default health settings) with new-connection and
    /// keep-alive load from the client; the report gives every run and median/min/max; writes
    /// target/bench/failover.md. Arguments go to the bench-failover binary: --runs (5),
    /// --warmup (3), --after (2), --new-connection-workers (4), --keep-alive (16)
    /// (`cargo xtask bench failover -- --help`).
    Failover {
        /// Arguments for bench-failover.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The gateway over TLS: cache hits and misses vs. straight to a node and vs. nginx
    /// terminating TLS (proxying, and its proxy_cache hits).
    ///
    /// Requests/s and p50/p99 with wrk (keep-alive) from the client namespace, interleaved
    /// runs, medians; RSS of lb-control and nginx; writes target/bench/gateway.md. Arguments go
    /// to the bench-gateway binary: --seconds (10), --repeats (5), --connections (64),
    /// --only gateway-hit,nginx-hit,nginx-proxy,gateway-miss,node,gateway-miss-serial,
    /// node-serial, and more (`cargo xtask bench gateway -- --help`).
    Gateway {
        /// Arguments for bench-gateway.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The HA pair's master fails under load: kill -9 of its lb-control and keepalived, and its
    /// links cut.
    ///
    /// Each run is a fresh HA lab (`cargo xtask run --ha`) loaded from the client: wrk through
    /// the gateway (HTTPS keep-alive) and the L4 NAT service (keep-alive, new connection each),
    /// polkadot.js clients following heads, an admin write loop, long-lived L4 connections of
    /// ages 0.1-10 s. Reports the time to the floating addresses on the standby and to the
    /// first answer per kind, failed requests, L4 connections broken by age, WebSocket
    /// reconnect times and acknowledged writes lost, medians over the runs and the issue's
    /// goals; writes target/bench/ha.md. Arguments go to the bench-ha binary: --runs (5),
    /// --scenarios kill,cut-links,handover, --pace-ms (10), --ws-clients (10), --l4-connections (32),
    /// --after (5) (`cargo xtask bench ha -- --help`). A smoke run: `--runs 1`.
    Ha {
        /// Arguments for bench-ha.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// A crowd of WebSocket clients over TLS through the gateway to 3 sim-nodes (Substrate's
    /// limits, health checker on).
    ///
    /// 10,000 clients from 20 source addresses, each subscribed to new heads and to one
    /// storage key, calling a cached and an uncached method every 5 s; reports nodes that left
    /// the rotation, clients dropped, connections at each node against the gateway's cap,
    /// lb-control's RSS per client, head delay p50/p99 and CPU per notification; writes
    /// target/bench/crowd.md. Arguments go to the bench-crowd binary: --clients (10000),
    /// --sources (20), --ramp-per-second (500), --hold-seconds (60), --call-interval-ms (5000),
    /// --block-time-ms (2000) (`cargo xtask bench crowd -- --help`).
    Crowd {
        /// Arguments for bench-crowd.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup => setup::run(),
        Command::Build => setup::run().and_then(|()| build::release()),
        Command::Run { config, nodes, ha } => {
            setup::run().and_then(|()| build::run(config, nodes, ha))
        }
        Command::Test { cargo_args } => setup::run().and_then(|()| build::test(&cargo_args)),
        Command::Bench {
            which: Bench::Xdp { args },
        } => setup::run().and_then(|()| bench::xdp(&args)),
        Command::Bench {
            which: Bench::L4 { args },
        } => setup::run().and_then(|()| bench_l4::run(&args)),
        Command::Bench {
            which: Bench::Failover { args },
        } => setup::run().and_then(|()| bench_failover::run(&args)),
        Command::Bench {
            which: Bench::Gateway { args },
        } => setup::run().and_then(|()| bench_gateway::run(&args)),
        Command::Bench {
            which: Bench::Ha { args },
        } => setup::run().and_then(|()| bench_ha::run(&args)),
        Command::Bench {
            which: Bench::Crowd { args },
        } => setup::run().and_then(|()| bench_crowd::run(&args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
