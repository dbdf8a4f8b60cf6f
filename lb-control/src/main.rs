//! The `lb-control` command: runs the daemon and inspects a running instance.

use std::{path::PathBuf, process::ExitCode};

use clap::{Args, Parser, Subcommand};
use lb_control::{
    api::model::StatsReport,
    config::{Config, ConfigError, LogFormat},
    dataplane::{self, AttachMode, Stats},
    netns,
    section::Problem,
    store::{Store, snapshot::Snapshot},
};

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
    /// Run the daemon: load and attach the XDP program, check the nodes' health, serve the admin
    /// API; until SIGINT or SIGTERM.
    Run(RunArgs),
    /// Show an instance's counters: per protocol, per service (with drops by reason), per
    /// backend, and drops outside any service.
    Stats(StatsArgs),
    /// Validate a config file (and the gateway's certificate files) and print every problem in
    /// it.
    CheckConfig {
        /// The config file to check.
        file: PathBuf,
    },
    /// Move the whole state (services, backends, API keys, events) between stores, e.g. from
    /// one host's SQLite file into etcd: `store export > state.json`, then with the etcd
    /// config, `store import state.json`.
    #[command(subcommand)]
    Store(StoreCommand),
    /// Hand over to a new lb-control process (the binary now installed at the running one's
    /// path, with its arguments): it takes the listening sockets over, the running one
    /// finishes its requests, closes WebSockets with 1012 and exits. No gateway request fails.
    Upgrade(UpgradeArgs),
    #[command(flatten)]
    Admin(cli::AdminCommand),
}

#[derive(Debug, Subcommand)]
enum StoreCommand {
    /// Write the store's state as JSON (stdout, or --output).
    Export {
        #[command(flatten)]
        store: StoreArgs,
        /// Write here instead of stdout.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Load a state written by `store export`, ids included, into an empty store.
    Import {
        #[command(flatten)]
        store: StoreArgs,
        /// The file `store export` wrote.
        file: PathBuf,
        /// Drop what the store holds first, instead of refusing a store that is not empty.
        #[arg(long)]
        replace: bool,
    },
}

#[derive(Debug, Args)]
struct StoreArgs {
    /// Config file (TOML): its `[store]` section, else SQLite in its `state_dir`.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// The SQLite store's directory; replaces the config's `state_dir`.
    #[arg(long)]
    state_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct UpgradeArgs {
    /// Config file (TOML) of the running lb-control: its `state_dir`.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// The running lb-control's state directory; replaces the config's `state_dir`.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Print JSON instead of a sentence.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct InstanceArgs {
    /// Config file (TOML); the flags below override it.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    /// Instance name: maps are pinned under <bpffs>/<instance>/.
    #[arg(long, global = true)]
    instance: Option<String>,
    /// Mount point of the BPF filesystem.
    #[arg(long, global = true)]
    bpffs: Option<PathBuf>,
    /// Enter this network namespace (from `ip netns`) first.
    #[arg(long, global = true)]
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
    /// Directory of the state store and the generated admin token; replaces the config's.
    #[arg(long)]
    state_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct StatsArgs {
    #[command(flatten)]
    instance: InstanceArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

mod cli;

/// mimalloc: per-thread free lists suit the gateway's short-lived buffers, a few per request
/// (`bench gateway`, cache hits: 61.3k req/s against 58.0k with glibc malloc).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run_command(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", describe(&error));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, outer to inner ("admin API: cannot listen on …: Address already in
/// use"), each once: a message that already quotes its cause is not followed by it again.
fn describe(error: &anyhow::Error) -> String {
    let mut text = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

fn run_command(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(args) => {
            let run_config = || {
                let mut config = effective_config(&args.instance, &args.interfaces, args.xdp_mode)?;
                if let Some(state_dir) = &args.state_dir {
                    config.state_dir = state_dir.clone();
                }
                anyhow::Ok(config)
            };
            let config = run_config()?;
            enter_netns(&args.instance)?;
            init_logging(cli.log_format.unwrap_or(config.log.format));
            let reload = run_config;
            lb_control::daemon::run(config, reload)
        }
        Command::Stats(args) => {
            let config = effective_config(&args.instance, &[], None)?;
            init_logging(cli.log_format.unwrap_or(config.log.format));
            let pin_dir = dataplane::pin_dir(&config.dataplane.bpffs, &config.instance);
            let stats = dataplane::read_pinned_stats(&pin_dir)?;
            print_stats(&stats, args.json)
        }
        Command::CheckConfig { file } => {
            let config = Config::load(&file)?;
            // The certificate files too: a start must not be the first to find them unreadable.
            let gateway = &config.gateway;
            if let (Some(_), false, Some(cert), Some(key)) = (
                gateway.listen,
                gateway.plain_http,
                &gateway.tls_cert,
                &gateway.tls_key,
            ) {
                lb_control::gateway::Certificates::load(cert, key)
                    .map_err(|error| anyhow::anyhow!("{}: {error}", file.display()))?;
            }
            for remote in &gateway.remotes {
                remote
                    .read_files()
                    .map_err(|error| anyhow::anyhow!("{}: gateway: {error}", file.display()))?;
            }
            if let Some(etcd) = &config.store.etcd {
                // The TLS and password files too, read as a start reads them.
                etcd.read_files()
                    .map_err(|error| anyhow::anyhow!("{}: {error}", file.display()))?;
            }
            println!("{}: ok", file.display());
            Ok(())
        }
        Command::Store(command) => run_store_command(command),
        Command::Upgrade(args) => {
            let mut config = match &args.config {
                Some(file) => Config::load(file)?,
                None => Config::default(),
            };
            if let Some(state_dir) = args.state_dir {
                config.state_dir = state_dir;
            }
            let upgraded = lb_control::upgrade::request(&config.state_dir)?;
            if args.json {
                println!("{}", serde_json::to_string(&upgraded)?);
            } else {
                println!(
                    "upgraded in {} ms: lb-control pid {} serves; pid {} finishes its requests \
                     in flight and exits",
                    upgraded.took_ms, upgraded.pid, upgraded.previous_pid
                );
            }
            Ok(())
        }
        Command::Admin(command) => cli::run(command),
    }
}

fn run_store_command(command: StoreCommand) -> anyhow::Result<()> {
    let open = |args: &StoreArgs| -> anyhow::Result<Store> {
        let mut config = match &args.config {
            Some(file) => Config::load(file)?,
            None => Config::default(),
        };
        if let Some(state_dir) = &args.state_dir {
            config.state_dir = state_dir.clone();
        }
        Ok(Store::open_configured(&config.store, &config.state_dir)?)
    };
    match command {
        StoreCommand::Export { store, output } => {
            let store = open(&store)?;
            let snapshot = store.export()?;
            let text = serde_json::to_string_pretty(&snapshot)? + "\n";
            match output {
                Some(path) => std::fs::write(&path, text)
                    .map_err(|error| anyhow::anyhow!("{}: {error}", path.display()))?,
                None => print!("{text}"),
            }
            eprintln!("exported {} from {}", snapshot.summary(), store.location());
            Ok(())
        }
        StoreCommand::Import {
            store,
            file,
            replace,
        } => {
            let text = std::fs::read_to_string(&file)
                .map_err(|error| anyhow::anyhow!("{}: {error}", file.display()))?;
            let snapshot = Snapshot::parse(&text)
                .map_err(|error| anyhow::anyhow!("{}: {error}", file.display()))?;
            let store = open(&store)?;
            store.import(&snapshot, replace)?;
            println!("imported {} into {}", snapshot.summary(), store.location());
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

/// The counters as a table, or as JSON in the shape `GET /v1/stats` answers.
fn print_stats(stats: &Stats, json: bool) -> anyhow::Result<()> {
    let report = StatsReport::from(stats);
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("{:<12} {:>14} {:>18}", "PROTOCOL", "PACKETS", "BYTES");
    for (name, counters) in &report.protocols {
        println!("{name:<12} {:>14} {:>18}", counters.packets, counters.bytes);
    }
    let total = report.total;
    println!("{:<12} {:>14} {:>18}", "total", total.packets, total.bytes);
    if !report.services.is_empty() {
        println!();
        println!(
            "{:<32} {:>12} {:>14} {:>10}  DROPS",
            "SERVICE", "PACKETS", "BYTES", "NEW FLOWS"
        );
        for service in &report.services {
            println!(
                "{:<32} {:>12} {:>14} {:>10}  {}",
                service.service,
                service.packets,
                service.bytes,
                service.new_flows,
                describe_drops(&service.drops)
            );
        }
    }
    if !report.backends.is_empty() {
        println!();
        println!(
            "{:<32} {:<9} {:>12} {:>14} {:>10}",
            "BACKEND", "STATE", "PACKETS", "BYTES", "NEW FLOWS"
        );
        for backend in &report.backends {
            println!(
                "{:<32} {:<9} {:>12} {:>14} {:>10}",
                backend.backend.to_string(),
                backend.state,
                backend.packets,
                backend.bytes,
                backend.new_flows
            );
        }
    }
    println!();
    println!("drops outside services: {}", describe_drops(&report.drops));
    Ok(())
}

/// "none", or the non-zero reasons with their counts.
fn describe_drops(drops: &std::collections::BTreeMap<String, u64>) -> String {
    let nonzero: Vec<String> = drops
        .iter()
        .filter(|(_, count)| **count > 0)
        .map(|(reason, count)| format!("{reason}={count}"))
        .collect();
    if nonzero.is_empty() {
        "none".to_owned()
    } else {
        nonzero.join(" ")
    }
}
