//! The `lb-control` command: runs the daemon and inspects a running instance.

use std::{path::PathBuf, process::ExitCode};

use clap::{Args, Parser, Subcommand};
use lb_control::{
    config::{Config, ConfigError, LogFormat, Problem},
    dataplane::{self, AttachMode, Dataplane, DataplaneConfig, ProtoStats},
    netns,
};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "XDP load balancer and JSON-RPC gateway for Polkadot node clusters"
)]
struct Cli {
    /// Log format; overrides the config file's `log.format`. RUST_LOG sets the level.
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Load the XDP program, attach it, and run until SIGINT or SIGTERM.
    Run(RunArgs),
    /// Show the per-protocol packet and byte counters of an instance.
    Stats(StatsArgs),
    /// Validate a config file and print every problem in it.
    CheckConfig {
        /// The config file to check.
        file: PathBuf,
    },
}

#[derive(Debug, Args)]
struct InstanceArgs {
    /// Config file (TOML); the flags below override it.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Instance name: maps are pinned under <bpffs>/<instance>/.
    #[arg(long)]
    instance: Option<String>,
    /// Mount point of the BPF filesystem.
    #[arg(long)]
    bpffs: Option<PathBuf>,
    /// Enter this network namespace (from `ip netns`) first.
    #[arg(long)]
    netns: Option<String>,
}

#[derive(Debug, Args)]
struct RunArgs {
    #[command(flatten)]
    instance: InstanceArgs,
    /// Interface to attach the XDP program to; repeat for several. Replaces the config's list.
    #[arg(long = "interface", short = 'i')]
    interfaces: Vec<String>,
    /// XDP attach mode.
    #[arg(long, value_enum)]
    xdp_mode: Option<AttachMode>,
}

#[derive(Debug, Args)]
struct StatsArgs {
    #[command(flatten)]
    instance: InstanceArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run_command(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

fn run_command(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(args) => {
            let config = effective_config(&args.instance, &args.interfaces, args.xdp_mode)?;
            enter_netns(&args.instance)?;
            init_logging(cli.log_format.unwrap_or(config.log.format));
            let reload = || effective_config(&args.instance, &args.interfaces, args.xdp_mode);
            run_daemon(config, reload)
        }
        Command::Stats(args) => {
            let config = effective_config(&args.instance, &[], None)?;
            init_logging(cli.log_format.unwrap_or(config.log.format));
            let pin_dir = dataplane::pin_dir(&config.dataplane.bpffs, &config.instance);
            let stats = dataplane::read_pinned_proto_stats(&pin_dir)?;
            print_stats(&stats, args.json);
            Ok(())
        }
        Command::CheckConfig { file } => {
            Config::load(&file)?;
            println!("{}: ok", file.display());
            Ok(())
        }
    }
}

/// Enters the requested network namespace; must happen before any thread starts, as threads
/// started earlier stay where they were.
fn enter_netns(args: &InstanceArgs) -> anyhow::Result<()> {
    if let Some(name) = &args.netns {
        netns::enter(name)?;
    }
    Ok(())
}

/// The config file (or the defaults) with the command-line flags applied, validated.
fn effective_config(
    args: &InstanceArgs,
    interfaces: &[String],
    xdp_mode: Option<AttachMode>,
) -> anyhow::Result<Config> {
    let (mut config, source) = match &args.config {
        Some(file) => (Config::load(file)?, file.clone()),
        None => (Config::default(), PathBuf::from("command line")),
    };
    if let Some(instance) = &args.instance {
        config.instance = instance.clone();
    }
    if let Some(bpffs) = &args.bpffs {
        config.dataplane.bpffs = bpffs.clone();
    }
    if !interfaces.is_empty() {
        config.dataplane.interfaces = interfaces.to_vec();
    }
    if let Some(mode) = xdp_mode {
        config.dataplane.xdp_mode = mode;
    }
    let problems: Vec<Problem> = config.problems();
    if !problems.is_empty() {
        return Err(ConfigError::Invalid {
            file: source,
            problems,
        }
        .into());
    }
    Ok(config)
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn run_daemon(config: Config, reload: impl Fn() -> anyhow::Result<Config>) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        // Installed first, so a signal during start-up still gets a clean shutdown.
        let mut shutdown = ShutdownSignals::install()?;
        let mut hangup = signal(SignalKind::hangup())?;
        let mut dataplane = Dataplane::start(&DataplaneConfig {
            instance: config.instance.clone(),
            interfaces: config.dataplane.interfaces.clone(),
            mode: config.dataplane.xdp_mode,
            bpffs: config.dataplane.bpffs.clone(),
            maglev_table_size: config.dataplane.maglev_table_size,
            max_flows: config.dataplane.max_flows,
        })?;
        apply_services(&mut dataplane, &config)?;
        info!(
            instance = %config.instance,
            pin_dir = %dataplane.pin_dir().display(),
            "running; SIGHUP reloads the config, SIGINT or SIGTERM stops"
        );
        loop {
            tokio::select! {
                () = shutdown.recv() => break,
                _ = hangup.recv() => {
                    // A bad reload is reported and changes nothing: the running state stays.
                    match reload().and_then(|config| apply_services(&mut dataplane, &config)) {
                        Ok(()) => info!("reloaded the config"),
                        Err(error) => error!("config reload failed, keeping the running state: {error}"),
                    }
                }
            }
        }
        info!("shutting down: detaching the XDP program");
        dataplane.detach()?;
        info!("detached");
        Ok(())
    })
}

fn apply_services(dataplane: &mut Dataplane, config: &Config) -> anyhow::Result<()> {
    let report = dataplane.apply(&config.lb_settings(), &config.service_specs())?;
    info!(
        services = report.services,
        backends = report.backends,
        services_removed = report.services_removed,
        backends_removed = report.backends_removed,
        flows_purged = report.flows_purged,
        "services applied to the kernel"
    );
    Ok(())
}

/// SIGTERM and SIGINT, either of which stops the daemon.
struct ShutdownSignals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    fn install() -> std::io::Result<Self> {
        Ok(ShutdownSignals {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.terminate.recv() => {}
            _ = self.interrupt.recv() => {}
        }
    }
}

fn print_stats(stats: &ProtoStats, json: bool) {
    if json {
        let by_slot: serde_json::Map<String, serde_json::Value> = stats
            .by_slot
            .iter()
            .map(|(name, counters)| {
                (
                    (*name).to_owned(),
                    serde_json::json!({ "packets": counters.packets, "bytes": counters.bytes }),
                )
            })
            .collect();
        let total = stats.total();
        let document = serde_json::json!({
            "protocols": by_slot,
            "total": { "packets": total.packets, "bytes": total.bytes },
        });
        println!("{document:#}");
        return;
    }
    println!("{:<12} {:>14} {:>18}", "PROTOCOL", "PACKETS", "BYTES");
    for (name, counters) in &stats.by_slot {
        println!("{name:<12} {:>14} {:>18}", counters.packets, counters.bytes);
    }
    let total = stats.total();
    println!("{:<12} {:>14} {:>18}", "total", total.packets, total.bytes);
}
