//! `lab`: brings the network-namespace lab up for a person to try (`cargo xtask run`), and
//! sweeps what crashed runs left behind.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use clap::{Parser, Subcommand};
use lb_control::ha::handover::track_file;
use lb_tests::lab::{
    self, DSR_VIP_V4, GATEWAY_V4, Lab, LabConfig, LabError, Member, NAT_SOURCE_V4, PairConfig,
    PairLab, SIM_NODE_RPC_PORT, VIP_V4 as PAIR_VIP_V4,
    certs::{LabCa, trust_hint, write_pem},
};
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
        /// The HA lab instead: two LBs, each running lb-control and keepalived, on the
        /// client's and the nodes' segments (bridges), etcd on both and on a fallback site.
        #[arg(long, conflicts_with_all = ["no_lb_control", "lb_control_args"])]
        ha: bool,
        /// keepalived's preempt_delay in the HA lab, in seconds.
        #[arg(long, default_value_t = 5, requires = "ha")]
        preempt_delay_s: u64,
        /// Arguments for `lb-control run` (after `--`) instead of the lab's own: by default
        /// lb-control balances the VIPs 10.200.0.10 and fd00:200::10 (port 9944) over every
        /// node.
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
            ha: true,
            preempt_delay_s,
            ..
        } => up_pair(PairConfig {
            nodes,
            block_time: Duration::from_millis(block_time_ms),
            preempt_delay: Duration::from_secs(preempt_delay_s),
        }),
        Command::Up {
            nodes,
            block_time_ms,
            no_lb_control,
            lb_control_args,
            ..
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

/// Ctrl-C, SIGTERM and SIGHUP, caught on a runtime of their own.
struct Signals {
    runtime: tokio::runtime::Runtime,
    signals: [tokio::signal::unix::Signal; 3],
}

impl Signals {
    /// Installed before the first namespace exists, so a Ctrl-C during start-up also ends in
    /// the cleanup instead of killing the process with things left behind.
    fn install() -> Result<Signals, LabError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(LabError::io("starting the signal-handling runtime"))?;
        let signals = runtime.block_on(async {
            let install = |kind| {
                signal(kind).map_err(LabError::io(format!("installing a handler for {kind:?}")))
            };
            Ok::<_, LabError>([
                install(SignalKind::interrupt())?,
                install(SignalKind::terminate())?,
                install(SignalKind::hangup())?,
            ])
        })?;
        Ok(Signals { runtime, signals })
    }

    /// Waits for a signal, running `watch` every [`WATCH_INTERVAL`]; names the signal.
    fn wait(
        &mut self,
        mut watch: impl FnMut() -> Result<(), LabError>,
    ) -> Result<&'static str, LabError> {
        let [interrupt, terminate, hangup] = &mut self.signals;
        self.runtime.block_on(async {
            let mut ticks = tokio::time::interval(WATCH_INTERVAL);
            loop {
                tokio::select! {
                    _ = interrupt.recv() => return Ok("Ctrl-C"),
                    _ = terminate.recv() => return Ok("SIGTERM"),
                    _ = hangup.recv() => return Ok("SIGHUP"),
                    _ = ticks.tick() => watch()?,
                }
            }
        })
    }
}

fn up(config: LabConfig, lb_control_args: Option<Vec<String>>) -> Result<(), LabError> {
    let mut signals = Signals::install()?;
    let mut lab = Lab::start(config)?;
    let lb_config = match &lb_control_args {
        Some(args) if args.is_empty() => {
            let path = write_vip_config(&lab)?;
            let mut args = vec!["--config".to_owned(), path.display().to_string()];
            for iface in &lab.lb().node_ifaces {
                args.extend(["--interface".to_owned(), iface.clone()]);
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            lab.spawn_lb_control(&args)?;
            Some(path)
        }
        Some(args) => {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            lab.spawn_lb_control(&args)?;
            None
        }
        None => None,
    };
    print_usage(&lab, lb_control_args.is_some(), lb_config.as_deref());
    let outcome = signals.wait(|| lab.check_processes());
    match &outcome {
        Ok(reason) => println!("\n{reason}: stopping lab {}", lab.prefix()),
        Err(error) => eprintln!("lab: {error}\nstopping lab {}", lab.prefix()),
    }
    let teardown = lab.shutdown()?;
    println!("{teardown}");
    outcome.map(drop)
}

/// The HA lab until a signal. Its LBs' processes are the user's to kill and restart, so
/// nothing is watched.
fn up_pair(config: PairConfig) -> Result<(), LabError> {
    let mut signals = Signals::install()?;
    let lab = PairLab::start(config)?;
    print_pair_usage(&lab);
    let outcome = signals.wait(|| Ok(()));
    match &outcome {
        Ok(reason) => println!("\n{reason}: stopping lab {}", lab.prefix()),
        Err(error) => eprintln!("lab: {error}\nstopping lab {}", lab.prefix()),
    }
    println!("{}", lab.shutdown()?);
    outcome.map(drop)
}

fn print_pair_usage(lab: &PairLab) {
    let lb_control = lab::binary_path("lb-control").map_or_else(
        |_| "lb-control".to_owned(),
        |path| path.display().to_string(),
    );
    println!("HA lab {} is up: LB a is master", lab.prefix());
    let client = lab.client();
    println!(
        "  client    netns {:<24} {} {}",
        client.netns, client.iface, client.addr_v4
    );
    for member in [Member::A, Member::B] {
        let lb = lab.lb(member);
        println!(
            "  lb-{}      netns {:<24} client0 {}, nodes0 {}, private0 {} (etcd)",
            member.name(),
            lb.netns,
            lb.client_v4,
            lb.node_v4,
            lb.private_v4
        );
        println!(
            "            lb-control {}, keepalived {}",
            lab.config_path(member).display(),
            lab.keepalived_config_path(member).display()
        );
    }
    for node in lab.nodes() {
        println!(
            "  node      netns {:<24} {} {}",
            node.netns, node.iface, node.addr_v4
        );
    }
    let fallback = lab.fallback();
    println!(
        "  fallback  netns {:<24} {} {} (the third etcd member)",
        fallback.netns, fallback.iface, fallback.addr_v4
    );
    println!(
        "  floating (keepalived, VRRPv3 every 100 ms): gateway {GATEWAY_V4}, L4 VIPs \
         {PAIR_VIP_V4} (NAT) and {DSR_VIP_V4} (DSR: the nodes answer the client themselves), \
         NAT source {NAT_SOURCE_V4}; preempt_delay {:?}",
        lab.preempt_delay()
    );
    println!("  logs in {}", lab.log_dir().display());
    let (a, b) = (lab.lb(Member::A), lab.lb(Member::B));
    let cli = |lb: &lab::PairLb, member: Member, args: &str| {
        format!(
            "ip netns exec {} {lb_control} {args} --config {}",
            lb.netns,
            lab.config_path(member).display()
        )
    };
    println!("\nRoles and the floating addresses:");
    println!("  {}", cli(a, Member::A, "ha status"));
    println!("  {}", cli(b, Member::B, "ha status"));
    println!(
        "  the master's admin API from the client: ip netns exec {} curl -s -H 'authorization: \
         Bearer {}' {}/v1/ha",
        client.netns,
        lab.admin_token(),
        lab.floating_admin_url()
    );
    println!(
        "\nCall the gateway at the floating address with a key (made on either LB, kept in etcd):"
    );
    println!("  {}", cli(a, Member::A, "key create --name demo"));
    let health = r#"'{"id":1,"jsonrpc":"2.0","method":"system_health"}'"#;
    println!(
        "  while sleep 0.2; do ip netns exec {} curl -s --max-time 1 --cacert {} \
         -H 'content-type: application/json' -d {health} {}; echo; done",
        client.netns,
        lab.ca().display(),
        lab.gateway_url("<key>")
    );
    println!("\nKill the master (lb-control and keepalived, as a crash) and watch LB b take over:");
    println!(
        "  ip netns pids {} | xargs -r ps -o pid=,comm= -p | grep -E 'lb-control|keepalived'",
        a.netns
    );
    println!("  kill -9 <those pids>; then `ha status` on LB b says master within a second");
    println!("\nHand over without failing a request (as for LB a's OS update), and watch LB b:");
    println!("  {}", cli(a, Member::A, "ha handover"));
    println!(
        "  LB a stays in FAULT; `echo 0 > {}` on it makes it a backup again, which takes the \
         addresses back {:?} later (its preempt_delay)",
        track_file(&lab.state_dir(Member::A)).display(),
        lab.preempt_delay()
    );
    println!("\nCtrl-C stops everything and removes it.");
}

/// The VIPs the lab's lb-control balances over every node, by default.
const VIP_V4: &str = "10.200.0.10";
const VIP_V6: &str = "fd00:200::10";
/// The gateway's HTTPS port on the LB's client-side address.
const GATEWAY_PORT: u16 = 8443;

/// The lab CA's certificate, beside lb-control's config.
fn gateway_ca_path(lab: &Lab) -> PathBuf {
    lab.log_dir().join("gateway-ca.crt")
}

/// A throwaway CA and the gateway's certificate for the LB's client-side address; returns the
/// `[gateway]` section that serves it.
fn write_gateway_certificates(lab: &Lab) -> Result<String, LabError> {
    let ca = LabCa::new()?;
    let leaf = ca.issue(&[lab.lb().addr_v4.into(), lab.lb().addr_v6.into()])?;
    let (cert, key) = (
        lab.log_dir().join("gateway.crt"),
        lab.log_dir().join("gateway.key"),
    );
    write_pem(&gateway_ca_path(lab), &ca.cert_pem())?;
    write_pem(&cert, &leaf.cert_pem)?;
    write_pem(&key, &leaf.key_pem)?;
    Ok(format!(
        "[gateway]\n\
         listen = \"{}:{GATEWAY_PORT}\"\n\
         tls_cert = \"{}\"\n\
         tls_key = \"{}\"\n\
         service = \"{VIP_V4}:{SIM_NODE_RPC_PORT}/tcp\"\n",
        lab.lb().addr_v4,
        cert.display(),
        key.display()
    ))
}

/// Writes an lb-control config that balances both VIPs (full NAT) over every node and serves
/// the gateway over HTTPS with a throwaway certificate, into the lab's own directory (removed
/// with the lab).
fn write_vip_config(lab: &Lab) -> Result<PathBuf, LabError> {
    let backends = |v6: bool| {
        lab.nodes()
            .iter()
            .map(|node| {
                let addr = if v6 {
                    format!("[{}]", node.addr_v6)
                } else {
                    node.addr_v4.to_string()
                };
                format!("{{ address = \"{addr}:{SIM_NODE_RPC_PORT}\" }}")
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let lb = lab.lb();
    let config = format!(
        "# Written by `lab up`: both VIPs balanced over every node by the XDP program.\n\
         # Edit it and `kill -HUP <lb-control pid>` to change backends (admin = \"draining\" |\n\
         # \"disabled\", weight = N), or use `lb-control backend …` inside the LB namespace.\n\
         [dataplane]\n\
         nat_source_v4 = \"{}\"\n\
         nat_source_v6 = \"{}\"\n\
         dsr_source_v4 = \"10.200.254.0\"\n\
         dsr_source_v6 = \"fd00:200:254::\"\n\n\
         [[services]]\n\
         vip = \"{VIP_V4}\"\n\
         port = {SIM_NODE_RPC_PORT}\n\
         backends = [{}]\n\n\
         [[services]]\n\
         vip = \"{VIP_V6}\"\n\
         port = {SIM_NODE_RPC_PORT}\n\
         backends = [{}]\n\n\
         {}",
        lb.addr_v4,
        lb.addr_v6,
        backends(false),
        backends(true),
        write_gateway_certificates(lab)?,
    );
    let path = lab.log_dir().join("lb.toml");
    std::fs::write(&path, config).map_err(LabError::io(format!("writing {}", path.display())))?;
    Ok(path)
}

fn print_usage(lab: &Lab, with_lb_control: bool, lb_config: Option<&Path>) {
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
    if lb_config.is_some() {
        println!("\nTry the load balancer (XDP, full NAT; the x-sim-node header names the node):");
        println!(
            "  for i in $(seq 9); do {curl} -o /dev/null -D - http://{VIP_V4}:{SIM_NODE_RPC_PORT} | grep x-sim-node; done"
        );
        println!("  {curl} http://[{VIP_V6}]:{SIM_NODE_RPC_PORT}");
        let ca = gateway_ca_path(lab);
        println!("\nTry the gateway (HTTPS, API keys): create a key, then call with it:");
        let lb_control = lab::binary_path("lb-control").map_or_else(
            |_| "lb-control".to_owned(),
            |path| path.display().to_string(),
        );
        println!(
            "  LB_ADMIN_TOKEN=$(cat {}) ip netns exec {} {lb_control} key create --name demo",
            lab.state_dir().join("admin.token").display(),
            lb.netns,
        );
        println!(
            "  {curl} --cacert {} https://{}:{GATEWAY_PORT}/<key>",
            ca.display(),
            lb.addr_v4
        );
        println!(
            "  WebSocket clients (polkadot.js, subxt): wss://{}:{GATEWAY_PORT}/<key> \
             (Node.js trusts the CA with NODE_EXTRA_CA_CERTS={})",
            lb.addr_v4,
            ca.display()
        );
        println!("  {}", trust_hint(&ca).replace('\n', "\n  "));
    }
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
    if let Some(path) = lb_config {
        println!(
            "  lb-control's config: {}; edit it, then: kill -HUP {}",
            path.display(),
            lab.processes()
                .iter()
                .find(|process| process.name() == "lb-control")
                .map_or(0, |process| process.pid())
        );
    }
    println!("\nCtrl-C stops everything and removes it.");
}
