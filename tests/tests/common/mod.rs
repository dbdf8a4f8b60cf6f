//! Helpers shared by the integration tests that run in the lab.
#![allow(
    dead_code,
    unused_imports,
    reason = "each test binary includes this module and uses a different subset of it"
)]

pub mod pair;
pub mod wss;

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    os::unix::fs::DirBuilderExt,
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use lb_control::dataplane::read_pinned_stats;
use lb_tests::{
    lab::{
        Lab, LabConfig, SIM_NODE_RPC_PORT, binary_path, certs::GatewayCerts, command_in_netns,
        in_netns, run_checked,
    },
    rpc_client::RpcConnection,
    sim_node::{ControlClient, Fault, NodeStatus},
};

/// How long a test waits for a condition before it fails, and how often it checks.
pub const POLL_TIMEOUT: Duration = Duration::from_secs(20);
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// A lab of `nodes` node namespaces, running sim-node (a block every `block_time`) only when
/// `with_sim_nodes`; panics with the reason when it cannot be built.
pub fn start_lab(nodes: usize, with_sim_nodes: bool, block_time: Duration) -> Lab {
    let config = LabConfig {
        nodes,
        block_time,
        start_sim_nodes: with_sim_nodes,
    };
    Lab::start(config).unwrap_or_else(|error| panic!("starting the lab: {error}"))
}

/// Polls `condition` until it holds or `POLL_TIMEOUT` passes.
pub fn wait_for(
    what: &str,
    mut condition: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + POLL_TIMEOUT;
    while Instant::now() < deadline {
        if condition()? {
            return Ok(());
        }
        std::thread::sleep(POLL_INTERVAL);
    }
    bail!("timed out after {POLL_TIMEOUT:?} waiting for {what}")
}

pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens a TCP connection to `target` from inside `netns`, with [`IO_TIMEOUT`] to connect and
/// to read.
pub fn connect_from(netns: &str, target: SocketAddr) -> anyhow::Result<TcpStream> {
    let stream = connect(netns, target, IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    Ok(stream)
}

/// Posts `system_health` to `target` on a new connection from inside `netns`; returns the
/// answering node's id (the `x-sim-node` header, when sim-node sends one) and the JSON-RPC
/// result.
pub fn system_health_from(
    netns: &str,
    target: SocketAddr,
) -> anyhow::Result<(Option<String>, serde_json::Value)> {
    let mut connection = in_netns(netns, || RpcConnection::connect(target, IO_TIMEOUT))?
        .with_context(|| format!("from {netns}"))?;
    let answer = connection.system_health_and_close()?;
    let result = answer.result().with_context(|| format!("{target}"))?;
    Ok((answer.node, result))
}

/// The `ip link` line of `iface` in `netns`, which names an attached XDP program.
pub fn link_details(netns: &str, iface: &str) -> anyhow::Result<String> {
    let output = run_checked(Command::new("ip").args(["-n", netns, "link", "show", "dev", iface]))?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The IPv4 VIP the lab tests balance.
pub const VIP_V4: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 10);

// ---------------------------------------------------------------------------------------------
// lb-control's config file and process
// ---------------------------------------------------------------------------------------------

/// One backend of a service: a lab node, its admin state (`enabled`, `draining`,
/// `disabled`) and its tier (0 = primary).
#[derive(Debug, Clone, Copy)]
pub struct BackendConf {
    pub node: usize,
    pub admin: &'static str,
    pub tier: u32,
}

pub fn up(node: usize) -> BackendConf {
    with_admin(node, "enabled")
}

pub fn with_admin(node: usize, admin: &'static str) -> BackendConf {
    BackendConf {
        node,
        admin,
        tier: 0,
    }
}

/// An enabled backend in backup tier `tier`.
pub fn backup(node: usize, tier: u32) -> BackendConf {
    BackendConf { tier, ..up(node) }
}

/// A `[[services]]` entry.
#[derive(Debug, Clone)]
pub struct ServiceConf {
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: &'static str,
    pub mode: &'static str,
    /// `substrate`, `tcp` or `none`.
    pub check: &'static str,
    pub backends: Vec<BackendConf>,
}

impl ServiceConf {
    /// A TCP service on port 9944 in full NAT mode, never health-checked: for tests of the
    /// kernel path, where only the test decides what is up.
    pub fn tcp(vip: impl Into<IpAddr>, backends: Vec<BackendConf>) -> ServiceConf {
        ServiceConf {
            vip: vip.into(),
            port: SIM_NODE_RPC_PORT,
            protocol: "tcp",
            mode: "nat",
            check: "none",
            backends,
        }
    }

    /// [`ServiceConf::tcp`] with the chain-aware health check of its nodes.
    pub fn checked(vip: impl Into<IpAddr>, backends: Vec<BackendConf>) -> ServiceConf {
        ServiceConf {
            check: "substrate",
            ..ServiceConf::tcp(vip, backends)
        }
    }

    pub fn target(&self) -> SocketAddr {
        SocketAddr::new(self.vip, self.port)
    }
}

/// Node `index`'s address for a service on `vip`: same family, the service's port.
pub fn backend_addr(lab: &Lab, index: usize, vip: IpAddr) -> SocketAddr {
    let node = lab.node(index);
    match vip {
        IpAddr::V4(_) => SocketAddr::from((node.addr_v4, SIM_NODE_RPC_PORT)),
        IpAddr::V6(_) => SocketAddr::from((node.addr_v6, SIM_NODE_RPC_PORT)),
    }
}

/// The config file text for `services` in `lab`: NAT from the LB's client-side addresses, DSR
/// outer sources from 10.200.254.0/24 and fd00:200:254::/112, then `sections` (more TOML
/// tables, e.g. `[health]`).
pub fn render_config(lab: &Lab, services: &[ServiceConf], sections: &str) -> String {
    let lb = lab.lb();
    let mut text = format!(
        "[dataplane]\nnat_source_v4 = \"{}\"\nnat_source_v6 = \"{}\"\n\
         dsr_source_v4 = \"10.200.254.0\"\ndsr_source_v6 = \"fd00:200:254::\"\n\n{sections}\n",
        lb.addr_v4, lb.addr_v6
    );
    for service in services {
        let backends: Vec<String> = service
            .backends
            .iter()
            .map(|backend| {
                let mut addr = backend_addr(lab, backend.node, service.vip);
                addr.set_port(service.port);
                format!(
                    "{{ address = \"{addr}\", admin = \"{}\", tier = {} }}",
                    backend.admin, backend.tier
                )
            })
            .collect();
        text += &format!(
            "\n[[services]]\nvip = \"{}\"\nport = {}\nprotocol = \"{}\"\nmode = \"{}\"\n\
             check = \"{}\"\nbackends = [{}]\n",
            service.vip,
            service.port,
            service.protocol,
            service.mode,
            service.check,
            backends.join(", ")
        );
    }
    text
}

/// The admin API token the tests' lb-control uses (from its state directory) and their CLI
/// calls send (in `LB_ADMIN_TOKEN`).
pub const ADMIN_TOKEN: &str = "lab-test-admin-token-0123456789";

/// What lb-control logs once it runs: services in the kernel, health checker and admin API up.
const RUNNING_LOG: &str = "running; SIGHUP reloads the config";
const RELOADED_LOG: &str = "reloaded the config";
const RELOAD_FAILED_LOG: &str = "config reload failed";

/// lb-control running in the lab with XDP on the client- and node-facing interfaces, from a
/// config file the test rewrites and reloads with SIGHUP; its admin API takes [`ADMIN_TOKEN`].
pub struct LbControl {
    config_path: PathBuf,
    /// TOML tables rendered after `[dataplane]` in every version of the config file.
    sections: String,
    pid: u32,
    log_path: PathBuf,
    /// The process is not the lab's (an upgrade started it): this stops it when dropped.
    adopted: bool,
}

impl LbControl {
    pub fn start(lab: &mut Lab, services: &[ServiceConf]) -> anyhow::Result<LbControl> {
        LbControl::start_with(lab, services, "")
    }

    /// Starts it with `sections` (TOML tables, e.g. `[health]`) in its config file.
    pub fn start_with(
        lab: &mut Lab,
        services: &[ServiceConf],
        sections: &str,
    ) -> anyhow::Result<LbControl> {
        let config_path = lab.log_dir().join("lb-control.toml");
        std::fs::write(&config_path, render_config(lab, services, sections))?;
        // The daemon reads its token from the state directory when the file is there.
        let state_dir = lab.state_dir();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&state_dir)?;
        std::fs::write(state_dir.join("admin.token"), format!("{ADMIN_TOKEN}\n"))?;
        let mut lb_control = LbControl {
            config_path,
            sections: sections.to_owned(),
            pid: 0,
            log_path: PathBuf::new(),
            adopted: false,
        };
        lb_control.spawn(lab)?;
        Ok(lb_control)
    }

    /// Starts an lb-control process on the current config file and waits until it runs (on a
    /// restart the readiness pin already exists, so the log says when).
    fn spawn(&mut self, lab: &mut Lab) -> anyhow::Result<()> {
        let config = self.config_path.to_str().context("utf-8 config path")?;
        let mut args = vec!["--config", config];
        let node_ifaces = lab.lb().node_ifaces.clone();
        for iface in &node_ifaces {
            args.extend(["--interface", iface]);
        }
        let process = lab.spawn_lb_control(&args)?;
        self.pid = process.pid();
        self.adopted = false;
        self.log_path = process.log_path().to_owned();
        wait_for("lb-control to run", || Ok(self.log().contains(RUNNING_LOG)))
            .with_context(|| self.log_tail())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn log_tail(&self) -> String {
        format!(
            "lb-control log {}",
            lb_tests::logs::tail(&self.log_path, 3000)
        )
    }

    /// Rewrites the config with `services`, sends SIGHUP and waits until lb-control has
    /// applied it.
    pub fn reload(&self, lab: &Lab, services: &[ServiceConf]) -> anyhow::Result<()> {
        let log = self.log();
        let (before, failures_before) = (
            log.matches(RELOADED_LOG).count(),
            log.matches(RELOAD_FAILED_LOG).count(),
        );
        std::fs::write(
            &self.config_path,
            render_config(lab, services, &self.sections),
        )?;
        self.signal(libc::SIGHUP);
        wait_for("lb-control to apply the reloaded config", || {
            let log = self.log();
            ensure!(
                log.matches(RELOAD_FAILED_LOG).count() == failures_before,
                "the reload failed"
            );
            Ok(log.matches(RELOADED_LOG).count() > before)
        })
        .with_context(|| self.log_tail())
    }

    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: plain kill(2) of lb-control: a child of this process that is not reaped
        // before the lab is dropped, or one an upgrade started, which is stopped only here.
        unsafe { libc::kill(self.pid as libc::pid_t, signal) };
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The config file it runs on (and an upgrade's new process reads).
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// `lb-control upgrade`: a new process takes over, and this follows it from then on.
    pub fn upgrade(&mut self, lab: &Lab) -> anyhow::Result<lb_control::upgrade::Upgraded> {
        let state_dir = lab.state_dir();
        let state_dir = state_dir.to_str().context("utf-8 state directory")?;
        let output = self.cli(lab, &["upgrade", "--state-dir", state_dir, "--json"])?;
        let upgraded: lb_control::upgrade::Upgraded = serde_json::from_str(&output)
            .with_context(|| format!("`lb-control upgrade` printed {output:?}"))?;
        ensure!(upgraded.previous_pid == self.pid, "{upgraded:?}");
        self.pid = upgraded.pid;
        self.adopted = true;
        Ok(upgraded)
    }

    /// Stops lb-control with `signal`, waits until it has exited, and starts a new one with
    /// the same instance, state and config.
    pub fn restart(&mut self, lab: &mut Lab, signal: libc::c_int) -> anyhow::Result<()> {
        self.signal(signal);
        let pid = self.pid;
        wait_for(&format!("lb-control (pid {pid}) to exit"), || {
            Ok(has_exited(pid))
        })
        .with_context(|| self.log_tail())?;
        self.spawn(lab)
    }

    /// Runs `lb-control ARGS…` in the LB namespace, where the admin API listens, with the
    /// token in `LB_ADMIN_TOKEN` as an operator would; returns its standard output.
    pub fn cli(&self, lab: &Lab, args: &[&str]) -> anyhow::Result<String> {
        let output = run_checked(
            lab.exec(&lab.lb().netns, binary_path("lb-control")?)?
                .args(args)
                .env("LB_ADMIN_TOKEN", ADMIN_TOKEN),
        )
        .with_context(|| format!("`lb-control {}`", args.join(" ")))?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// [`LbControl::cli`] with `--json` output, parsed.
    pub fn cli_json(&self, lab: &Lab, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let output = self.cli(lab, args)?;
        serde_json::from_str(&output)
            .with_context(|| format!("`lb-control {}` printed {output:?}", args.join(" ")))
    }
}

impl Drop for LbControl {
    /// The lab stops the processes it started; one an upgrade started is stopped here, before
    /// the lab's namespaces go.
    fn drop(&mut self) {
        if !self.adopted || has_exited(self.pid) {
            return;
        }
        self.signal(libc::SIGTERM);
        let stopped = wait_for("the upgraded lb-control to stop", || {
            Ok(has_exited(self.pid))
        });
        if stopped.is_err() {
            self.signal(libc::SIGKILL);
        }
    }
}

/// Whether process `pid` has exited (a child of ours stays a zombie until reaped).
pub fn has_exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
        Err(_) => true,
    }
}

/// Each backend's state in the kernel (`up`, `draining`, `down`), from lb-control's pinned
/// maps, as `lb-control stats` shows it.
pub fn kernel_states(lab: &Lab) -> anyhow::Result<BTreeMap<SocketAddr, &'static str>> {
    let stats = read_pinned_stats(&lab.pin_dir())?;
    Ok(stats
        .backends
        .iter()
        .map(|backend| (backend.backend, backend.state))
        .collect())
}

// ---------------------------------------------------------------------------------------------
// sim-node faults
// ---------------------------------------------------------------------------------------------

/// Switches `fault` on at node `index` through sim-node's control port (`Fault::None` clears
/// every fault).
pub fn set_fault(lab: &Lab, index: usize, fault: Fault) -> anyhow::Result<NodeStatus> {
    let control = ControlClient::new(lab.node_control_addr(index));
    on_lb_host(lab, control.set_fault(fault))
        .with_context(|| format!("node{index}: setting {fault:?}"))
}

/// Node `index`'s status: best block, faults, JSON-RPC calls per method.
pub fn node_status(lab: &Lab, index: usize) -> anyhow::Result<NodeStatus> {
    Ok(lab.node_status(index)?)
}

/// Runs a control request from the LB's namespace, which routes to every node.
fn on_lb_host<T: Send, E: std::error::Error + Send + Sync + 'static>(
    lab: &Lab,
    request: impl Future<Output = Result<T, E>> + Send,
) -> anyhow::Result<T> {
    let answer = in_netns(&lab.lb().netns, || {
        // Sockets belong to the namespace of the thread that makes them: a runtime on this
        // thread alone.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        anyhow::Ok(runtime.block_on(request)?)
    })??;
    Ok(answer)
}

// ---------------------------------------------------------------------------------------------
// HTTP through the VIP
// ---------------------------------------------------------------------------------------------

pub use lb_tests::rpc_client::KeepAlive;

/// A TCP connection to `target` from inside `netns`, given at most `timeout` to connect.
pub fn connect(netns: &str, target: SocketAddr, timeout: Duration) -> anyhow::Result<TcpStream> {
    in_netns(netns, || TcpStream::connect_timeout(&target, timeout))?
        .with_context(|| format!("connecting from {netns} to {target}"))
}

/// Opens `count` keep-alive connections to `target` from the client.
pub fn open_connections(
    lab: &Lab,
    target: SocketAddr,
    count: usize,
) -> anyhow::Result<Vec<KeepAlive>> {
    (0..count)
        .map(|_| KeepAlive::open(&lab.client().netns, target))
        .collect()
}

/// How many connections each node answered.
pub fn count_by_node(connections: &[KeepAlive]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for connection in connections {
        *counts.entry(connection.node.clone()).or_default() += 1;
    }
    counts
}

/// Sends `count` one-request connections to `target`; returns how many each node answered.
pub fn spread_of_new_connections(
    lab: &Lab,
    target: SocketAddr,
    count: usize,
) -> anyhow::Result<BTreeMap<String, usize>> {
    let mut counts = BTreeMap::new();
    for attempt in 0..count {
        let (node, _) = system_health_from(&lab.client().netns, target)
            .with_context(|| format!("connection {} of {count} to {target}", attempt + 1))?;
        let node = node.context("no x-sim-node header")?;
        *counts.entry(node).or_default() += 1;
    }
    Ok(counts)
}

/// The index of sim-node id `node` (`node2` → 2).
pub fn node_index(node: &str) -> anyhow::Result<usize> {
    node.strip_prefix("node")
        .and_then(|index| index.parse().ok())
        .with_context(|| format!("node id {node:?}"))
}

// ---------------------------------------------------------------------------------------------
// The gateway
// ---------------------------------------------------------------------------------------------

/// The gateway's port on the LB's client-side address.
pub const GATEWAY_PORT: u16 = 8443;

/// lb-control with its gateway serving TLS on the LB's client-side address (a certificate of
/// a throwaway lab CA), and an API key made with the CLI, as an operator would.
pub struct GatewayLab {
    pub lb_control: LbControl,
    /// The lab CA's certificate, which clients trust.
    pub ca: PathBuf,
    /// The gateway's certificate and key files (a test may renew them).
    pub cert: PathBuf,
    pub key: PathBuf,
    pub secret: String,
    address: Ipv4Addr,
}

impl GatewayLab {
    /// Starts lb-control with `services` and a `[gateway]` section with `gateway_options`
    /// (more `key = value` lines) besides listen and TLS.
    pub fn start(
        lab: &mut Lab,
        services: &[ServiceConf],
        gateway_options: &str,
    ) -> anyhow::Result<GatewayLab> {
        GatewayLab::start_with(lab, services, gateway_options, "")
    }

    /// [`GatewayLab::start`] with `sections` (more TOML tables, e.g. `[admin]`) in the config.
    pub fn start_with(
        lab: &mut Lab,
        services: &[ServiceConf],
        gateway_options: &str,
        sections: &str,
    ) -> anyhow::Result<GatewayLab> {
        let address = lab.lb().addr_v4;
        let GatewayCerts { ca, cert, key } =
            GatewayCerts::write(lab.log_dir(), "gateway", &[address.into()])?;
        let section = format!(
            "[gateway]\nlisten = \"{address}:{GATEWAY_PORT}\"\ntls_cert = \"{}\"\n\
             tls_key = \"{}\"\n{gateway_options}\n{sections}\n",
            cert.display(),
            key.display()
        );
        let lb_control = LbControl::start_with(lab, services, &section)?;
        let secret = lab.create_api_key("lab")?;
        Ok(GatewayLab {
            lb_control,
            ca,
            cert,
            key,
            secret,
            address,
        })
    }

    /// `SCHEME://LB:8443/<key>` (`https` or `wss`).
    pub fn url(&self, scheme: &str) -> String {
        format!("{scheme}://{}:{GATEWAY_PORT}/{}", self.address, self.secret)
    }

    /// lb-control's Prometheus metrics, scraped from inside the LB namespace.
    pub fn metrics(&self, lab: &Lab) -> anyhow::Result<String> {
        Ok(lab.lb_control_metrics()?)
    }

    /// `GET /health` on the gateway's port, no key, as a DNS provider's monitor asks it: the
    /// status line (`200 2`: code and HTTP version) and the body.
    pub fn health(&self, lab: &Lab) -> anyhow::Result<(String, serde_json::Value)> {
        let mut curl = command_in_netns(&lab.client().netns, "curl")?;
        curl.args(["-sS", "--max-time", "5", "--cacert"])
            .arg(&self.ca)
            .args(["-w", "\n%{http_code} %{http_version}"])
            .arg(format!("https://{}:{GATEWAY_PORT}/health", self.address));
        let text = String::from_utf8(run_checked(&mut curl)?.stdout)?;
        let (body, status) = text
            .rsplit_once('\n')
            .context("curl printed no status line")?;
        let body = serde_json::from_str(body).with_context(|| format!("not JSON: {body}"))?;
        Ok((status.to_owned(), body))
    }
}

// ---------------------------------------------------------------------------------------------
// JavaScript clients (tests/js)
// ---------------------------------------------------------------------------------------------

/// `spawn_js(netns, ca, flags, script, args)` starts a tests/js script in a lab namespace;
/// `js_summary` reads the JSON line it ends with.
pub use lb_tests::js_client::{spawn_in as spawn_js, summary as js_summary};
