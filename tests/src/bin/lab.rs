//! `lab`: brings the network-namespace lab up for a person to try (`cargo xtask run`), and
//! sweeps what crashed runs left behind.

use std::{process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use lb_tests::lab::{self, Lab, LabConfig, LabError, SIM_NODE_RPC_PORT};
use tokio::signal::unix::{SignalKind, signal};

/// How often the running lab checks that its processes are still alive.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Parser)]
#[command(
    about = "Network-namespace lab: a client, an XDP load balancer and sim-nodes on one machine"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build the lab, start sim-nodes and lb-control, and keep it up until Ctrl-C or SIGTERM.
    Up {
        /// Number of node namespaces, each running sim-node.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// sim-node's block interval in milliseconds.
        #[arg(long, default_value_t = 6000)]
        block_time_ms: u64,
        /// Route client traffic through the LB namespace without lb-control.
        #[arg(long)]
        no_lb_control: bool,
        /// Extra arguments for `lb-control run` (after `--`).
        #[arg(last = true)]
        lb_control_args: Vec<String>,
    },
    /// Remove namespaces, processes, pinned maps and logs of lab runs whose process is gone.
    Sweep,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match Cli::parse().command {
        Command::Up {
            nodes,
            block_time_ms,
            no_lb_control,
            lb_control_args,
        } => up(
            LabConfig {
                nodes,
                block_time: Duration::from_millis(block_time_ms),
                start_sim_nodes: true,
            },
            (!no_lb_control).then_some(lb_control_args),
        ),
        Command::Sweep => lab::sweep_stale().map(|report| println!("sweep: {report}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("lab: {error}");
            ExitCode::FAILURE
        }
    }
}

fn up(config: LabConfig, lb_control_args: Option<Vec<String>>) -> Result<(), LabError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(LabError::io("starting the signal-handling runtime"))?;
    // Signals are caught from before the first namespace exists, so a Ctrl-C during start-up
    // also ends in the cleanup below instead of killing the process with things left behind.
    let mut signals = runtime.block_on(async {
        let install =
            |kind| signal(kind).map_err(LabError::io(format!("installing a handler for {kind:?}")));
        Ok::<_, LabError>([
            install(SignalKind::interrupt())?,
            install(SignalKind::terminate())?,
            install(SignalKind::hangup())?,
        ])
    })?;
    let mut lab = Lab::start(config)?;
    if let Some(args) = &lb_control_args {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        lab.spawn_lb_control(&args)?;
    }
    print_usage(&lab, lb_control_args.is_some());
    let outcome = runtime.block_on(async {
        let [interrupt, terminate, hangup] = &mut signals;
        let mut watch = tokio::time::interval(WATCH_INTERVAL);
        loop {
            tokio::select! {
                _ = interrupt.recv() => return Ok("Ctrl-C"),
                _ = terminate.recv() => return Ok("SIGTERM"),
                _ = hangup.recv() => return Ok("SIGHUP"),
                _ = watch.tick() => lab.check_processes()?,
            }
        }
    });
    match &outcome {
        Ok(reason) => println!("\n{reason}: stopping lab {}", lab.prefix()),
        Err(error) => eprintln!("lab: {error}\nstopping lab {}", lab.prefix()),
    }
    let teardown = lab.shutdown()?;
    println!("{teardown}");
    outcome.map(drop)
}

fn print_usage(lab: &Lab, with_lb_control: bool) {
    let client = lab.client();
    let lb = lab.lb();
    println!("lab {} is up", lab.prefix());
    println!(
        "  client  netns {:<20} {} {} / {}",
        client.netns, client.iface, client.addr_v4, client.addr_v6
    );
    println!(
        "  lb      netns {:<20} {} {} / {}, towards nodes: {}",
        lb.netns,
        lb.client_iface,
        lb.addr_v4,
        lb.addr_v6,
        lb.node_ifaces.join(", ")
    );
    for (index, node) in lab.nodes().iter().enumerate() {
        println!(
            "  node{index:<3} netns {:<20} {} {} / {}, rpc {}",
            node.netns,
            node.iface,
            node.addr_v4,
            node.addr_v6,
            lab.node_rpc_url(index)
        );
    }
    for process in lab.processes() {
        println!(
            "  running {} (pid {}) in {}, log {}",
            process.name(),
            process.pid(),
            process.netns(),
            process.log_path().display()
        );
    }
    let health = r#"'{"id":1,"jsonrpc":"2.0","method":"system_health"}'"#;
    let curl = format!(
        "ip netns exec {} curl -s -H 'content-type: application/json' -d {health}",
        client.netns
    );
    println!("\nTry (from the client namespace, routed through the LB):");
    for index in 0..lab.nodes().len() {
        println!("  {curl} {}", lab.node_rpc_url(index));
    }
    println!(
        "  {curl} http://[{}]:{SIM_NODE_RPC_PORT}",
        lab.node(0).addr_v6
    );
    if with_lb_control {
        match lab::binary_path("lb-control") {
            Ok(path) => println!("  {} stats --instance {}", path.display(), lab.prefix()),
            Err(_) => println!("  lb-control stats --instance {}", lab.prefix()),
        }
        println!("  (maps pinned under {})", lab.pin_dir().display());
    }
    println!("\nCtrl-C stops everything and removes it.");
}
