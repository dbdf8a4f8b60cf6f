//! The XDP load balancer end to end in the lab, with real TCP and UDP from the client namespace
//! through the VIP to sim-nodes: even spread, connection tracking across backend changes,
//! dead nodes, DSR, IPv6, lb-control restarts under load, UDP, and a service with no live
//! backend.
//!
//! These tests need root: run them as root or via `cargo xtask test`. They run the binaries,
//! so `cargo build --bins` first.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{self, BufRead, BufReader, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket},
    path::PathBuf,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use common::{IO_TIMEOUT, system_health_from, wait_for};
use lb_tests::lab::{Lab, SIM_NODE_RPC_PORT, binary_path, in_netns, run_checked};

const VIP_V4: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 10);
const VIP_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 0x10);
/// The NAT source port range lb-control uses by default.
const NAT_PORTS: std::ops::RangeInclusive<u16> = 20_000..=49_999;
/// How long a connection attempt to a service that should drop it is given.
const SHORT_TIMEOUT: Duration = Duration::from_millis(1500);

/// The l4 tests' lab: 3 nodes running sim-node.
fn start_lab() -> Lab {
    common::start_lab(3, true, Duration::from_secs(2))
}

// ---------------------------------------------------------------------------------------------
// lb-control's config file and process
// ---------------------------------------------------------------------------------------------

/// One backend of a service: a lab node and its admin state (`enabled`, `draining`,
/// `disabled`). Health checks are off in these tests: they exercise the kernel path.
#[derive(Debug, Clone, Copy)]
struct BackendConf {
    node: usize,
    admin: &'static str,
}

fn up(node: usize) -> BackendConf {
    BackendConf {
        node,
        admin: "enabled",
    }
}

fn with_admin(node: usize, admin: &'static str) -> BackendConf {
    BackendConf { node, admin }
}

/// A `[[services]]` entry.
#[derive(Debug, Clone)]
struct ServiceConf {
    vip: IpAddr,
    port: u16,
    protocol: &'static str,
    mode: &'static str,
    backends: Vec<BackendConf>,
}

impl ServiceConf {
    /// A TCP service on port 9944 in full NAT mode.
    fn tcp(vip: impl Into<IpAddr>, backends: Vec<BackendConf>) -> ServiceConf {
        ServiceConf {
            vip: vip.into(),
            port: SIM_NODE_RPC_PORT,
            protocol: "tcp",
            mode: "nat",
            backends,
        }
    }

    fn target(&self) -> SocketAddr {
        SocketAddr::new(self.vip, self.port)
    }
}

/// The config file text for `services` in `lab`: NAT from the LB's client-side addresses, DSR
/// outer sources from 10.200.254.0/24 and fd00:200:254::/112.
fn render_config(lab: &Lab, services: &[ServiceConf]) -> String {
    let lb = lab.lb();
    let mut text = format!(
        "[dataplane]\nnat_source_v4 = \"{}\"\nnat_source_v6 = \"{}\"\n\
         dsr_source_v4 = \"10.200.254.0\"\ndsr_source_v6 = \"fd00:200:254::\"\n",
        lb.addr_v4, lb.addr_v6
    );
    for service in services {
        let backends: Vec<String> = service
            .backends
            .iter()
            .map(|backend| {
                let node = lab.node(backend.node);
                let addr = match service.vip {
                    IpAddr::V4(_) => SocketAddr::from((node.addr_v4, service.port)),
                    IpAddr::V6(_) => SocketAddr::from((node.addr_v6, service.port)),
                };
                format!("{{ address = \"{addr}\", admin = \"{}\" }}", backend.admin)
            })
            .collect();
        text += &format!(
            "\n[[services]]\nvip = \"{}\"\nport = {}\nprotocol = \"{}\"\nmode = \"{}\"\n\
             check = \"none\"\nbackends = [{}]\n",
            service.vip,
            service.port,
            service.protocol,
            service.mode,
            backends.join(", ")
        );
    }
    text
}

/// lb-control running in the lab with XDP on the client- and node-facing interfaces, from a
/// config file the test rewrites and reloads with SIGHUP.
struct LbControl {
    config_path: PathBuf,
    pid: u32,
    log_path: PathBuf,
}

impl LbControl {
    fn start(lab: &mut Lab, services: &[ServiceConf]) -> anyhow::Result<LbControl> {
        let config_path = lab.log_dir().join("l4.toml");
        std::fs::write(&config_path, render_config(lab, services))?;
        let mut lb_control = LbControl {
            config_path,
            pid: 0,
            log_path: PathBuf::new(),
        };
        lb_control.spawn(lab)?;
        Ok(lb_control)
    }

    /// Starts an lb-control process on the current config file and waits until it has applied
    /// the services (on a restart the readiness pin already exists, so the log says when).
    fn spawn(&mut self, lab: &mut Lab) -> anyhow::Result<()> {
        let config = self.config_path.to_str().context("utf-8 config path")?;
        let mut args = vec!["--config", config];
        let node_ifaces = lab.lb().node_ifaces.clone();
        for iface in &node_ifaces {
            args.extend(["--interface", iface]);
        }
        let process = lab.spawn_lb_control(&args)?;
        self.pid = process.pid();
        self.log_path = process.log_path().to_owned();
        wait_for("lb-control to apply the services", || {
            Ok(self.applied_count()? >= 1)
        })
        .with_context(|| self.log_tail())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        let log = self.log();
        let start = log.len().saturating_sub(3000);
        format!(
            "lb-control log {}:\n{}",
            self.log_path.display(),
            &log[log.floor_char_boundary(start)..]
        )
    }

    fn applied_count(&self) -> anyhow::Result<usize> {
        Ok(self.log().matches("services applied to the kernel").count())
    }

    /// Rewrites the config with `services`, sends SIGHUP and waits until lb-control has
    /// applied it.
    fn reload(&self, lab: &Lab, services: &[ServiceConf]) -> anyhow::Result<()> {
        let before = self.applied_count()?;
        let failures_before = self.log().matches("config reload failed").count();
        std::fs::write(&self.config_path, render_config(lab, services))?;
        self.signal(libc::SIGHUP);
        wait_for("lb-control to apply the reloaded config", || {
            let log = self.log();
            ensure!(
                log.matches("config reload failed").count() == failures_before,
                "the reload failed"
            );
            Ok(log.matches("services applied to the kernel").count() > before)
        })
        .with_context(|| self.log_tail())
    }

    fn signal(&self, signal: libc::c_int) {
        // SAFETY: plain kill(2) of lb-control, a child of this process that is not reaped
        // before the lab is dropped, so its pid cannot have been reused.
        unsafe { libc::kill(self.pid as libc::pid_t, signal) };
    }

    /// Stops lb-control with `signal`, waits until it has exited, and starts a new one with
    /// the same instance and config.
    fn restart(&mut self, lab: &mut Lab, signal: libc::c_int) -> anyhow::Result<()> {
        self.signal(signal);
        let pid = self.pid;
        wait_for(&format!("lb-control (pid {pid}) to exit"), || {
            Ok(has_exited(pid))
        })
        .with_context(|| self.log_tail())?;
        self.spawn(lab)
    }
}

/// Whether process `pid`, a child of ours, has exited (it stays a zombie until reaped).
fn has_exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
        Err(_) => true,
    }
}

/// Counters from `lb-control stats --json`, as a user reads them.
fn stats(lab: &Lab) -> anyhow::Result<serde_json::Value> {
    let output = run_checked(Command::new(binary_path("lb-control")?).args([
        "stats",
        "--instance",
        lab.prefix(),
        "--json",
    ]))?;
    serde_json::from_slice(&output.stdout).context("parsing `lb-control stats --json`")
}

/// The stats row of service `name` (`vip:port/proto`).
fn service_stats(stats: &serde_json::Value, name: &str) -> anyhow::Result<serde_json::Value> {
    stats["services"]
        .as_array()
        .and_then(|services| services.iter().find(|row| row["service"] == name))
        .cloned()
        .with_context(|| format!("no service {name} in the stats:\n{stats:#}"))
}

// ---------------------------------------------------------------------------------------------
// HTTP over long-lived connections
// ---------------------------------------------------------------------------------------------

/// A keep-alive HTTP/1.1 connection from the client namespace to a service, and the node
/// that answered its first request.
struct KeepAlive {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
    target: SocketAddr,
    node: String,
}

impl KeepAlive {
    /// Connects from `netns` and sends a first request, which decides the node.
    fn open(netns: &str, target: SocketAddr) -> anyhow::Result<KeepAlive> {
        let stream = connect(netns, target, IO_TIMEOUT)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        let reader = BufReader::new(stream.try_clone()?);
        let mut connection = KeepAlive {
            stream,
            reader,
            target,
            node: String::new(),
        };
        connection.node = connection.system_health()?;
        Ok(connection)
    }

    /// Posts `system_health` on this connection; returns the node that answered.
    fn system_health(&mut self) -> anyhow::Result<String> {
        self.send_request()?;
        self.read_response()
    }

    fn send_request(&mut self) -> anyhow::Result<()> {
        let body = r#"{"id":1,"jsonrpc":"2.0","method":"system_health","params":[]}"#;
        // One write: a request in pieces would wait for delayed ACKs (Nagle).
        let request = format!(
            "POST / HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\n\
             content-length: {}\r\n\r\n{body}",
            self.target,
            body.len()
        );
        self.stream.write_all(request.as_bytes())?;
        Ok(())
    }

    /// Reads one response; returns the node that sent it.
    fn read_response(&mut self) -> anyhow::Result<String> {
        let mut status = String::new();
        if self.reader.read_line(&mut status)? == 0 {
            bail!("connection closed before an answer");
        }
        ensure!(
            status.split_whitespace().nth(1) == Some("200"),
            "status {status:?}"
        );
        let (mut length, mut node) = (None, None);
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line)? == 0 {
                bail!("connection closed in the middle of the headers");
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                let value = value.trim();
                if name.eq_ignore_ascii_case("content-length") {
                    length = Some(value.parse::<usize>()?);
                } else if name.eq_ignore_ascii_case("x-sim-node") {
                    node = Some(value.to_owned());
                }
            }
        }
        let mut body = vec![0; length.context("no content-length")?];
        self.reader.read_exact(&mut body)?;
        node.context("no x-sim-node header")
    }

    /// The next request must be answered by the node of the first one.
    fn check_same_node(&mut self) -> anyhow::Result<()> {
        let local = self.stream.local_addr()?;
        let node = self
            .system_health()
            .with_context(|| format!("connection {local} (on {})", self.node))?;
        ensure!(
            node == self.node,
            "connection {local} moved from {} to {node}",
            self.node
        );
        Ok(())
    }
}

/// A TCP connection to `target` from inside `netns`, given at most `timeout` to connect.
fn connect(netns: &str, target: SocketAddr, timeout: Duration) -> anyhow::Result<TcpStream> {
    in_netns(netns, || TcpStream::connect_timeout(&target, timeout))?
        .with_context(|| format!("connecting from {netns} to {target}"))
}

/// Opens `count` keep-alive connections to `target` from the client.
fn open_connections(lab: &Lab, target: SocketAddr, count: usize) -> anyhow::Result<Vec<KeepAlive>> {
    (0..count)
        .map(|_| KeepAlive::open(&lab.client().netns, target))
        .collect()
}

/// How many connections each node answered.
fn count_by_node(connections: &[KeepAlive]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for connection in connections {
        *counts.entry(connection.node.clone()).or_default() += 1;
    }
    counts
}

/// Sends `count` one-request connections to `target`; returns how many each node answered.
fn spread_of_new_connections(
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

/// Every node gets `count / nodes` connections ± 40%: Maglev with the flow hash spreads many
/// flows evenly, and these bounds are more than 5 standard deviations wide, yet fail when a
/// node gets nothing or twice its share.
fn ensure_even(
    counts: &BTreeMap<String, usize>,
    nodes: &[&str],
    count: usize,
) -> anyhow::Result<()> {
    let share = count as f64 / nodes.len() as f64;
    let (low, high) = ((share * 0.6) as usize, (share * 1.4).ceil() as usize);
    for node in nodes {
        let got = counts.get(*node).copied().unwrap_or(0);
        ensure!(
            (low..=high).contains(&got),
            "{node} answered {got} of {count} connections, expected {low}..={high}: {counts:?}"
        );
    }
    ensure!(
        counts.values().sum::<usize>() == count && counts.len() == nodes.len(),
        "answers from nodes outside {nodes:?}: {counts:?}"
    );
    Ok(())
}

/// Established TCP connections on sim-node's port in `netns`: (local, peer) addresses, with
/// IPv4-mapped addresses made plain IPv4.
fn established_on_rpc_port(netns: &str) -> anyhow::Result<Vec<(SocketAddr, SocketAddr)>> {
    let output = run_checked(Command::new("ip").args([
        "netns",
        "exec",
        netns,
        "ss",
        "-Htn",
        "state",
        "established",
        "sport",
        "=",
        &format!(":{SIM_NODE_RPC_PORT}"),
    ]))?;
    let text = String::from_utf8_lossy(&output.stdout);
    let canonical = |addr: SocketAddr| SocketAddr::new(addr.ip().to_canonical(), addr.port());
    text.lines()
        .map(|line| {
            let columns: Vec<&str> = line.split_whitespace().collect();
            let [.., local, peer] = columns[..] else {
                bail!("unexpected ss line {line:?}");
            };
            let parse = |text: &str| {
                text.parse::<SocketAddr>()
                    .with_context(|| format!("address {text:?} in ss line {line:?}"))
            };
            Ok((canonical(parse(local)?), canonical(parse(peer)?)))
        })
        .collect()
}

fn node_index(node: &str) -> anyhow::Result<usize> {
    node.strip_prefix("node")
        .and_then(|index| index.parse().ok())
        .with_context(|| format!("node id {node:?}"))
}

// ---------------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------------

#[test]
fn connections_through_the_vip_reach_all_nodes_evenly() -> anyhow::Result<()> {
    let mut lab = start_lab();
    let service = ServiceConf::tcp(VIP_V4, vec![up(0), up(1), up(2)]);
    LbControl::start(&mut lab, std::slice::from_ref(&service))?;

    const CONNECTIONS: usize = 300;
    let counts = spread_of_new_connections(&lab, service.target(), CONNECTIONS)?;
    ensure_even(&counts, &["node0", "node1", "node2"], CONNECTIONS)?;

    // The kernel's per-backend counters agree with what the client saw: one new flow per
    // connection, on the node that answered it.
    let stats = stats(&lab)?;
    for backend in stats["backends"].as_array().context("backends")? {
        let addr: SocketAddr = backend["backend"].as_str().context("backend")?.parse()?;
        let index = lab
            .nodes()
            .iter()
            .position(|node| IpAddr::V4(node.addr_v4) == addr.ip())
            .with_context(|| format!("backend {addr} is no lab node"))?;
        let answered = counts.get(&format!("node{index}")).copied().unwrap_or(0);
        ensure!(
            backend["new_flows"].as_u64() == Some(answered as u64),
            "backend {addr} counted {} new flows, node{index} answered {answered} connections",
            backend["new_flows"]
        );
    }
    Ok(())
}

#[test]
fn established_connections_survive_adding_removing_and_draining_backends() -> anyhow::Result<()> {
    let mut lab = start_lab();
    let service = |backends| [ServiceConf::tcp(VIP_V4, backends)];
    let lb_control = LbControl::start(&mut lab, &service(vec![up(0), up(1)]))?;
    let target = SocketAddr::from((VIP_V4, SIM_NODE_RPC_PORT));
    const BATCH: usize = 30;

    let mut connections = open_connections(&lab, target, BATCH)?;
    let counts = count_by_node(&connections);
    ensure!(
        counts.keys().eq(["node0", "node1"].iter()),
        "with backends node0 and node1, connections landed on {counts:?}"
    );

    // Step 1: node2 is added. No connection moves; new ones reach node2 too.
    lb_control.reload(&lab, &service(vec![up(0), up(1), up(2)]))?;
    for connection in &mut connections {
        connection.check_same_node().context("after adding node2")?;
    }
    let new = open_connections(&lab, target, BATCH)?;
    let counts = count_by_node(&new);
    ensure!(
        counts.len() == 3,
        "after adding node2, new connections landed on {counts:?}"
    );
    connections.extend(new);

    // Step 2: node1 drains. It keeps its connections and gets no new ones.
    lb_control.reload(
        &lab,
        &service(vec![up(0), with_admin(1, "draining"), up(2)]),
    )?;
    for connection in &mut connections {
        connection
            .check_same_node()
            .context("after draining node1")?;
    }
    let new = open_connections(&lab, target, BATCH)?;
    let counts = count_by_node(&new);
    ensure!(
        !counts.contains_key("node1") && counts.len() == 2,
        "after draining node1, new connections landed on {counts:?}"
    );
    connections.extend(new);

    // Step 3: node0 is removed. Its own connections end (they re-hash to another node, which
    // knows nothing of them); every other connection carries on where it was.
    lb_control.reload(&lab, &service(vec![with_admin(1, "draining"), up(2)]))?;
    let (removed, kept): (Vec<KeepAlive>, Vec<KeepAlive>) = connections
        .into_iter()
        .partition(|connection| connection.node == "node0");
    ensure!(
        !removed.is_empty() && kept.iter().any(|connection| connection.node == "node1"),
        "the steps above must leave connections on node0 and node1: {:?}",
        count_by_node(&kept)
    );
    let mut broken = Vec::new();
    for mut connection in kept {
        if let Err(error) = connection.check_same_node() {
            broken.push(format!("{error:#}"));
        }
    }
    ensure!(
        broken.is_empty(),
        "{} connections on node1 (draining) or node2 broke after node0 was removed:\n{}",
        broken.len(),
        broken.join("\n")
    );
    let new = open_connections(&lab, target, BATCH)?;
    let counts = count_by_node(&new);
    ensure!(
        counts.keys().eq(["node2"].iter()),
        "with node0 removed and node1 draining, new connections landed on {counts:?}"
    );
    Ok(())
}

#[test]
fn killed_node_flows_move_to_live_nodes() -> anyhow::Result<()> {
    let mut lab = start_lab();
    let service = |backends| [ServiceConf::tcp(VIP_V4, backends)];
    let lb_control = LbControl::start(&mut lab, &service(vec![up(0), up(1), up(2)]))?;
    let target = SocketAddr::from((VIP_V4, SIM_NODE_RPC_PORT));
    let connections = open_connections(&lab, target, 30)?;
    let (mut on_dead, mut on_live): (Vec<KeepAlive>, Vec<KeepAlive>) = connections
        .into_iter()
        .partition(|connection| connection.node == "node1");
    ensure!(!on_dead.is_empty(), "no connection landed on node1");

    // node1's host dies: its link goes down first, so nothing it does later (its sim-node
    // closing connections as it is killed) reaches anyone, as with a crashed machine.
    let dead = lab.node(1).clone();
    run_checked(Command::new("ip").args(["-n", &dead.netns, "link", "set", &dead.iface, "down"]))?;
    let sim_node = lab
        .processes()
        .iter()
        .find(|process| process.name() == "sim-node node1")
        .context("sim-node node1 process")?;
    // SAFETY: plain kill(2) of the lab's child process, not reaped before the lab is dropped.
    unsafe { libc::kill(sim_node.pid() as libc::pid_t, libc::SIGKILL) };

    // Until lb-control marks it down, its connections hang: a request gets no answer.
    let probe = &mut on_dead[0];
    probe
        .stream
        .set_read_timeout(Some(Duration::from_secs(1)))?;
    match probe.system_health() {
        Err(error) if is_timeout(&error) => {}
        other => bail!("a request to the dead node1 should hang, got {other:?}"),
    }

    // No health checker yet: the operator marks node1 down.
    lb_control.reload(
        &lab,
        &service(vec![up(0), with_admin(1, "disabled"), up(2)]),
    )?;

    // node1's connections re-hash on their next packet to a live node, which has no such
    // connection and resets it: an error at once instead of a hang. (The probe's request is
    // still being retransmitted; its next retransmission meets the same fate.)
    for connection in &mut on_dead {
        // Long enough for the probe's next retransmission (exponential backoff).
        connection
            .stream
            .set_read_timeout(Some(Duration::from_secs(10)))?;
        let local = connection.stream.local_addr()?;
        let started = Instant::now();
        match connection.system_health() {
            Err(error) if is_reset(&error) => {}
            other => bail!(
                "connection {local} on the dead node1, after it was marked down: expected a \
                 reset from a live node, got {other:?} after {:?}",
                started.elapsed()
            ),
        }
    }
    for connection in &mut on_live {
        connection.check_same_node().context("after node1 died")?;
    }
    let counts = spread_of_new_connections(&lab, target, 30)?;
    ensure!(
        !counts.contains_key("node1") && counts.len() == 2,
        "with node1 down, new connections landed on {counts:?}"
    );
    Ok(())
}

/// Whether `error` is a read that timed out.
fn is_timeout(error: &anyhow::Error) -> bool {
    io_error_kind(error)
        .is_some_and(|kind| matches!(kind, io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut))
}

/// Whether `error` is the peer resetting the connection (or its close, seen as such).
fn is_reset(error: &anyhow::Error) -> bool {
    io_error_kind(error).is_some_and(|kind| {
        matches!(
            kind,
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
        )
    })
}

fn io_error_kind(error: &anyhow::Error) -> Option<io::ErrorKind> {
    error
        .chain()
        .find_map(|cause| cause.downcast_ref::<io::Error>())
        .map(io::Error::kind)
}

#[test]
fn dsr_serves_clients_directly_over_ipv4_and_ipv6() -> anyhow::Result<()> {
    let mut lab = start_lab();
    let dsr = |vip: IpAddr| ServiceConf {
        mode: "dsr",
        ..ServiceConf::tcp(vip, vec![up(0), up(1), up(2)])
    };
    let services = [dsr(VIP_V4.into()), dsr(VIP_V6.into())];
    let dsr_nodes = (0..3)
        .map(|index| lab.prepare_dsr_node(index, &[VIP_V4.into(), VIP_V6.into()]))
        .collect::<Result<Vec<_>, _>>()?;
    LbControl::start(&mut lab, &services)?;
    let client = lab.client().clone();

    for (service, client_addr) in services
        .iter()
        .zip([IpAddr::V4(client.addr_v4), IpAddr::V6(client.addr_v6)])
    {
        let counts = spread_of_new_connections(&lab, service.target(), 60)?;
        ensure!(
            counts.len() == 3,
            "DSR {}: 60 connections reached only {counts:?}",
            service.target()
        );

        // The node sees the client's own address (no NAT), on the VIP it holds itself.
        let mut connection = KeepAlive::open(&client.netns, service.target())?;
        let local = connection.stream.local_addr()?;
        ensure!(local.ip() == client_addr, "client bound {local}");
        let node = lab.node(node_index(&connection.node)?).netns.clone();
        let sockets = established_on_rpc_port(&node)?;
        ensure!(
            sockets.contains(&(service.target(), local)),
            "{node} should hold a connection {} ← {local} (the client itself), has {sockets:?}",
            service.target()
        );
        connection.check_same_node()?;
    }

    // What came through the tunnels: outer sources from the DSR prefixes (the flow hash in
    // their low bits), never the client's address.
    for (index, dsr_node) in dsr_nodes.iter().enumerate() {
        ensure!(dsr_node.packets() > 0, "node{index} unwrapped nothing");
        for source in dsr_node.outer_sources() {
            let in_prefix = match source {
                IpAddr::V4(source) => source.octets()[..3] == [10, 200, 254],
                IpAddr::V6(source) => source.segments()[..7] == [0xfd00, 0x200, 0x254, 0, 0, 0, 0],
            };
            ensure!(
                in_prefix,
                "node{index}: outer source {source} is outside the DSR source prefixes"
            );
        }
        let families: BTreeSet<bool> = dsr_node
            .outer_sources()
            .iter()
            .map(IpAddr::is_ipv4)
            .collect();
        ensure!(
            families.len() == 2,
            "node{index} unwrapped only {families:?} (is_ipv4) packets"
        );
    }
    Ok(())
}

#[test]
fn ipv6_nat_works_end_to_end() -> anyhow::Result<()> {
    let mut lab = start_lab();
    let service = ServiceConf::tcp(VIP_V6, vec![up(0), up(1), up(2)]);
    LbControl::start(&mut lab, std::slice::from_ref(&service))?;

    let counts = spread_of_new_connections(&lab, service.target(), 60)?;
    ensure!(
        counts.len() == 3,
        "60 IPv6 connections reached only {counts:?}"
    );

    // The node sees the LB's NAT source and a port from the NAT range, never the client.
    let mut connection = KeepAlive::open(&lab.client().netns, service.target())?;
    let node = lab.node(node_index(&connection.node)?).clone();
    let sockets = established_on_rpc_port(&node.netns)?;
    let nat_source = IpAddr::V6(lab.lb().addr_v6);
    ensure!(
        sockets
            .iter()
            .any(|(local, peer)| local.ip() == IpAddr::V6(node.addr_v6)
                && peer.ip() == nat_source
                && NAT_PORTS.contains(&peer.port())),
        "{} should hold a connection from {nat_source} (NAT range {NAT_PORTS:?}), has {sockets:?}",
        node.netns
    );
    ensure!(
        sockets
            .iter()
            .all(|(_, peer)| peer.ip() != IpAddr::V6(lab.client().addr_v6)),
        "{} sees the client's own address: {sockets:?}",
        node.netns
    );
    connection.check_same_node()?;
    Ok(())
}

/// Requests on keep-alive connections, round after round, from a thread of its own, counting
/// answers and failures (a failure or an answer from another node is fatal to its connection).
struct Load {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<Vec<String>>,
}

impl Load {
    /// At most this many requests in all, and this long, however the test goes.
    const MAX_REQUESTS: u64 = 200_000;
    const MAX_DURATION: Duration = Duration::from_secs(60);

    fn start(mut connections: Vec<KeepAlive>) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, answered) = (stop.clone(), answered.clone());
            std::thread::spawn(move || {
                let started = Instant::now();
                let mut failures = Vec::new();
                while !stop.load(Ordering::Relaxed)
                    && started.elapsed() < Self::MAX_DURATION
                    && answered.load(Ordering::Relaxed) < Self::MAX_REQUESTS
                    && !connections.is_empty()
                {
                    // A short pause per round keeps two cores free for the rest of the lab.
                    std::thread::sleep(Duration::from_millis(2));
                    connections.retain_mut(|connection| match connection.check_same_node() {
                        Ok(()) => {
                            answered.fetch_add(1, Ordering::Relaxed);
                            true
                        }
                        Err(error) => {
                            failures.push(format!("{:?}: {error:#}", started.elapsed()));
                            false
                        }
                    });
                }
                failures
            })
        };
        Load {
            stop,
            answered,
            thread,
        }
    }

    /// Waits until `count` more requests have been answered.
    fn wait_for_answers(&self, count: u64) -> anyhow::Result<()> {
        let target = self.answered.load(Ordering::Relaxed) + count;
        wait_for(&format!("{count} more answered requests"), || {
            Ok(self.answered.load(Ordering::Relaxed) >= target || self.thread.is_finished())
        })
    }

    /// Stops it; returns how many requests were answered and the failures.
    fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let failures = self
            .thread
            .join()
            .unwrap_or_else(|_| vec!["the load thread panicked".to_owned()]);
        (self.answered.load(Ordering::Relaxed), failures)
    }
}

/// How lb-control goes away before the next one starts, and what the next one then logs.
struct Restart {
    signal: libc::c_int,
    name: &'static str,
    expected_log: &'static str,
}

/// Keeps 12 keep-alive connections busy while lb-control is restarted after each of
/// `restarts`; fails unless every request on them was answered, by the same node.
fn restart_under_load(restarts: &[Restart]) -> anyhow::Result<()> {
    const CONNECTIONS: usize = 12;
    let mut lab = start_lab();
    let service = ServiceConf::tcp(VIP_V4, vec![up(0), up(1), up(2)]);
    let mut lb_control = LbControl::start(&mut lab, std::slice::from_ref(&service))?;
    let connections = open_connections(&lab, service.target(), CONNECTIONS)?;
    let resets_before = tcp_resets_sent(&lab.lb().netns)?;
    let started = Instant::now();
    let load = Load::start(connections);
    load.wait_for_answers(200)?;

    let mut timeline = Vec::new();
    for restart in restarts {
        let name = restart.name;
        timeline.push(format!("{:?}: {name}", started.elapsed()));
        lb_control
            .restart(&mut lab, restart.signal)
            .with_context(|| format!("restarting after {name}"))?;
        timeline.push(format!(
            "{:?}: the next lb-control applied the services",
            started.elapsed()
        ));
        ensure!(
            lb_control.log().contains(restart.expected_log),
            "after {name}, the new lb-control should say {:?}; {}",
            restart.expected_log,
            lb_control.log_tail()
        );
        load.wait_for_answers(200)
            .with_context(|| format!("requests after the restart after {name}"))?;
        let (node, _) = system_health_from(&lab.client().netns, service.target())
            .with_context(|| format!("a new connection after the restart after {name}"))?;
        ensure!(node.is_some(), "no x-sim-node header");
    }

    let (answered, failures) = load.finish();
    let resets = tcp_resets_sent(&lab.lb().netns)? - resets_before;
    ensure!(
        failures.is_empty(),
        "{} of {CONNECTIONS} connections failed or moved while lb-control restarted \
         ({answered} requests answered; the LB namespace's own TCP stack sent {resets} \
         resets meanwhile):\n{}\ntimeline:\n{}",
        failures.len(),
        failures.join("\n"),
        timeline.join("\n")
    );
    Ok(())
}

/// `Tcp: OutRsts` of `netns`: resets its own TCP stack sent (not forwarded ones).
fn tcp_resets_sent(netns: &str) -> anyhow::Result<u64> {
    let output =
        run_checked(Command::new("ip").args(["netns", "exec", netns, "cat", "/proc/net/snmp"]))?;
    let snmp = String::from_utf8_lossy(&output.stdout);
    let mut tcp = snmp.lines().filter(|line| line.starts_with("Tcp: "));
    let (names, values) = (tcp.next(), tcp.next());
    let (names, values) = names
        .zip(values)
        .context("no Tcp lines in /proc/net/snmp")?;
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "OutRsts")
        .and_then(|(_, value)| value.parse().ok())
        .context("no Tcp OutRsts in /proc/net/snmp")
}

#[test]
fn restarting_lb_control_under_load_breaks_no_established_connection() -> anyhow::Result<()> {
    // Killed outright (a crash), and asked to exit for a restart (SIGQUIT): the program stays
    // attached and forwarding; the next lb-control swaps its program into the pinned links.
    restart_under_load(&[
        Restart {
            signal: libc::SIGKILL,
            name: "SIGKILL",
            expected_log: "replaced the running XDP program",
        },
        Restart {
            signal: libc::SIGQUIT,
            name: "SIGQUIT",
            expected_log: "replaced the running XDP program",
        },
    ])
}

/// A UDP server in a node namespace answering every datagram with the node's id and the
/// source address it saw, until dropped.
struct UdpEcho {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl UdpEcho {
    fn start(netns: &str, id: String, port: u16) -> anyhow::Result<UdpEcho> {
        let socket = in_netns(netns, || UdpSocket::bind((Ipv6Addr::UNSPECIFIED, port)))?
            .with_context(|| format!("binding UDP port {port} in {netns}"))?;
        socket.set_read_timeout(Some(Duration::from_millis(100)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut buffer = [0u8; 512];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((_, from)) = socket.recv_from(&mut buffer) {
                        let from = SocketAddr::new(from.ip().to_canonical(), from.port());
                        let _ = socket.send_to(format!("{id} {from}").as_bytes(), from);
                    }
                }
            })
        };
        Ok(UdpEcho {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[test]
fn udp_service_is_balanced() -> anyhow::Result<()> {
    const PORT: u16 = 9953;
    const FLOWS: usize = 300;
    let mut lab = start_lab();
    let _echoes = (0..3)
        .map(|index| UdpEcho::start(&lab.node(index).netns, format!("node{index}"), PORT))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let service = ServiceConf {
        port: PORT,
        protocol: "udp",
        ..ServiceConf::tcp(VIP_V4, vec![up(0), up(1), up(2)])
    };
    LbControl::start(&mut lab, std::slice::from_ref(&service))?;

    // One socket per flow, each connected to the VIP: it only accepts answers from the VIP's
    // address and port, so every answer proves the reply path translated the source back.
    let nat_source = IpAddr::V4(lab.lb().addr_v4);
    let mut counts = BTreeMap::new();
    for flow in 0..FLOWS {
        let socket = in_netns(&lab.client().netns, || {
            UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
        })??;
        socket.connect(service.target())?;
        socket.set_read_timeout(Some(Duration::from_millis(500)))?;
        let mut buffer = [0u8; 512];
        // Datagrams may be lost (e.g. before a neighbour is resolved): a few tries per flow.
        let answer = (0..6).find_map(|_| {
            socket.send(b"ping").ok()?;
            let read = socket.recv(&mut buffer).ok()?;
            Some(String::from_utf8_lossy(&buffer[..read]).into_owned())
        });
        let answer = answer.with_context(|| format!("UDP flow {flow}: no answer in 6 tries"))?;
        let (node, seen_from) = answer
            .split_once(' ')
            .with_context(|| format!("answer {answer:?}"))?;
        let seen_from: SocketAddr = seen_from.parse()?;
        ensure!(
            seen_from.ip() == nat_source && NAT_PORTS.contains(&seen_from.port()),
            "{node} saw UDP flow {flow} from {seen_from}, expected {nat_source} and a NAT port"
        );
        *counts.entry(node.to_owned()).or_default() += 1;
    }
    ensure_even(&counts, &["node0", "node1", "node2"], FLOWS)
}

#[test]
fn service_without_live_backend_drops_and_counts() -> anyhow::Result<()> {
    let mut lab = start_lab();
    let service = |admin| {
        [ServiceConf::tcp(
            VIP_V4,
            (0..3).map(|node| with_admin(node, admin)).collect(),
        )]
    };
    let lb_control = LbControl::start(&mut lab, &service("enabled"))?;
    let target = SocketAddr::from((VIP_V4, SIM_NODE_RPC_PORT));
    let name = format!("{target}/tcp");
    let no_backend_drops = |lab: &Lab| -> anyhow::Result<u64> {
        let row = service_stats(&stats(lab)?, &name)?;
        row["drops"]["no_backend"]
            .as_u64()
            .with_context(|| format!("no drops.no_backend in {row:#}"))
    };
    let mut established = KeepAlive::open(&lab.client().netns, target)?;
    ensure!(
        no_backend_drops(&lab)? == 0,
        "drops before any backend left"
    );

    // Every backend draining: established flows carry on, new ones are dropped and counted.
    lb_control.reload(&lab, &service("draining"))?;
    established
        .check_same_node()
        .context("on a draining node")?;
    let new = connect(&lab.client().netns, target, SHORT_TIMEOUT);
    ensure!(
        new.as_ref().is_err_and(is_timeout),
        "a new connection with every backend draining should time out, got {new:?}"
    );
    let drops = no_backend_drops(&lab)?;
    ensure!(drops >= 1, "the dropped SYNs are not counted as no_backend");

    // Every backend down: the established flow is purged and its packets are dropped too.
    lb_control.reload(&lab, &service("disabled"))?;
    established.stream.set_read_timeout(Some(SHORT_TIMEOUT))?;
    let answer = established.system_health();
    ensure!(
        answer.as_ref().is_err_and(is_timeout),
        "a request on a connection to a down node, with no live backend, should go \
         unanswered; got {answer:?}"
    );
    let new = connect(&lab.client().netns, target, SHORT_TIMEOUT);
    ensure!(
        new.as_ref().is_err_and(is_timeout),
        "a new connection with every backend down should time out, got {new:?}"
    );
    let more = no_backend_drops(&lab)?;
    ensure!(
        more > drops,
        "no_backend drops did not grow ({drops} then {more}) with every backend down"
    );
    Ok(())
}
