//! `sim-node`: a simulated Polkadot node (see `lb_tests::sim_node`), and `sim-node ctl`, a
//! client for its control API.
//!
//! ```text
//! sim-node --listen 0.0.0.0:9944 --control 0.0.0.0:9945 --id node0 --block-time-ms 6000
//! sim-node ctl --control 127.0.0.1:9945 fault slow --delay-ms 3000
//! sim-node ctl --control 127.0.0.1:9945 clear
//! ```

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use lb_tests::sim_node::{
    BlockNumber, ControlClient, DEFAULT_GENESIS_UNIX_MS, Fault, SimNode, SimNodeConfig,
};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser)]
#[command(about = "A simulated Polkadot (Substrate) node with switchable faults")]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Talk to a running node's control API.
    Ctl(CtlArgs),
}

#[derive(Args)]
struct RunArgs {
    /// JSON-RPC listen address (HTTP and WebSocket on one port).
    #[arg(long, default_value = "127.0.0.1:9944")]
    listen: SocketAddr,
    /// Control API listen address (faults, status); none when omitted.
    #[arg(long)]
    control: Option<SocketAddr>,
    /// Node name: `x-sim-node` response header, seeds `system_localPeerId`.
    #[arg(long, default_value = "sim-node")]
    id: String,
    /// Block time in milliseconds.
    #[arg(long, default_value_t = 6000)]
    block_time_ms: u64,
    /// Time of block 0 (Unix ms). Nodes with the same genesis and block time share a chain.
    #[arg(long, default_value_t = DEFAULT_GENESIS_UNIX_MS)]
    genesis_unix_ms: u64,
    /// Blocks between best and finalized.
    #[arg(long, default_value_t = 2)]
    finality_lag: BlockNumber,
    /// Peers reported by system_health.
    #[arg(long, default_value_t = 8)]
    peers: u32,
}

#[derive(Args)]
struct CtlArgs {
    /// The node's control address.
    #[arg(long)]
    control: SocketAddr,
    #[command(subcommand)]
    action: CtlAction,
}

#[derive(Subcommand)]
enum CtlAction {
    /// Print the node's status (JSON).
    Status,
    /// Add a fault.
    Fault {
        #[command(subcommand)]
        fault: FaultArg,
    },
    /// Clear every fault.
    Clear,
    /// Zero the per-method request counts.
    ResetRequests,
}

#[derive(Subcommand)]
enum FaultArg {
    /// Never answer JSON-RPC calls.
    Unresponsive,
    /// Answer every call after a delay.
    Slow {
        #[arg(long)]
        delay_ms: u64,
    },
    /// Report syncing (readiness fails).
    Syncing,
    /// Stop the best block where it is.
    Stall,
    /// Report a best block this many blocks below the chain's.
    Behind {
        #[arg(long)]
        blocks: BlockNumber,
    },
    /// Report zero peers.
    NoPeers,
    /// Drop open connections and new ones.
    CloseConnections,
    /// Stop the node process.
    Exit,
}

impl From<FaultArg> for Fault {
    fn from(fault: FaultArg) -> Self {
        match fault {
            FaultArg::Unresponsive => Fault::Unresponsive,
            FaultArg::Slow { delay_ms } => Fault::Slow { delay_ms },
            FaultArg::Syncing => Fault::Syncing,
            FaultArg::Stall => Fault::Stall,
            FaultArg::Behind { blocks } => Fault::Behind { blocks },
            FaultArg::NoPeers => Fault::NoPeers,
            FaultArg::CloseConnections => Fault::CloseConnections,
            FaultArg::Exit => Fault::Exit,
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Ctl(ctl)) => run_ctl(ctl).await,
        None => run_node(cli.run).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("sim-node: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run_node(args: RunArgs) -> anyhow::Result<()> {
    let mut config = SimNodeConfig::new(args.id);
    config.listen = args.listen;
    config.control_listen = args.control;
    config.block_time = Duration::from_millis(args.block_time_ms);
    config.genesis = UNIX_EPOCH + Duration::from_millis(args.genesis_unix_ms);
    config.finality_lag = args.finality_lag;
    config.peers = args.peers;
    let mut node = SimNode::start(config).await?;

    // The listening line tells a supervisor the node is ready, so the handlers go in first: a
    // signal sent right after the line must stop the node cleanly, not kill it.
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let control = node
        .control_addr()
        .map_or_else(|| "off".to_owned(), |addr| addr.to_string());
    let mut stdout = std::io::stdout();
    writeln!(
        stdout,
        "sim-node {} listening: rpc {} (http+ws), control {control}",
        node.id(),
        node.rpc_addr()
    )
    .and_then(|()| stdout.flush())
    .context("writing the listening line to stdout")?;

    tokio::select! {
        () = node.stopped() => return Ok(()),
        _ = terminate.recv() => tracing::info!("SIGTERM, stopping"),
        _ = interrupt.recv() => tracing::info!("SIGINT, stopping"),
    }
    node.stop().await;
    Ok(())
}

async fn run_ctl(args: CtlArgs) -> anyhow::Result<()> {
    let client = ControlClient::new(args.control);
    let status = match args.action {
        CtlAction::Status => client.status().await?,
        CtlAction::Fault { fault } => client.set_fault(fault.into()).await?,
        CtlAction::Clear => client.clear_faults().await?,
        CtlAction::ResetRequests => client.reset_requests().await?,
    };
    println!("{}", serde_json::to_string_pretty(&status)?);
    Ok(())
}
