//! The network-namespace lab: throwaway hosts on one machine for tests and `cargo xtask run`.
//!
//! A [`Lab`] is a client namespace and N node namespaces, each joined by a veth pair to one LB
//! namespace that routes between them, over IPv4 (10.200.0.0/16) and IPv6 (fd00:200::/32):
//! client `10.200.1.2` ↔ LB `client0` `10.200.1.1`; node i `10.200.(10+i).2` ↔ LB `node<i>`
//! `10.200.(10+i).1`. Every veth has TX checksum offload off; the client's and nodes' ends
//! have GRO on and an XDP_PASS program attached, so native-mode XDP on the LB's ends can
//! redirect and `XDP_TX` into them. The lab can run sim-node (or chopsticks, a real runtime) in
//! the node namespaces and lb-control in the LB namespace; a node's namespace can also host
//! another site, a second lb-control whose gateway fronts that node ([`Lab::start_remote_site`]),
//! and a killed sim-node can come back ([`Lab::restart_sim_node`]).
//!
//! Everything a lab makes is named with its run prefix `lbt-<pid>-<seq>` and removed when the
//! `Lab` is dropped, on panic too: its processes, its namespaces (with their veths), the
//! pinned-map directory `/sys/fs/bpf/<prefix>` and its log directory. What a crashed run left
//! behind is swept by the next [`Lab::start`] (or by [`sweep_stale`]).

mod admin;
mod binaries;
pub mod certs;
mod chopsticks;
mod dsr;
mod error;
mod etcd;
mod ha;
mod keepalived;
mod netns;
mod pair;
mod process;
mod run;
mod site;
mod sweep;
mod topology;

use std::{
    ffi::OsStr,
    fmt,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

pub use binaries::{binary_path, js_dir};
pub use chopsticks::CHOPSTICKS_CHAIN;
pub use dsr::{DSR_TUN_IFACE, DsrNode};
pub use error::LabError;
pub use ha::{EtcdSite, PAIR_ADMIN_PORT, PAIR_GATEWAY_PORT, PairConfig, PairLab};
pub use netns::{command_in_netns, in_netns, run_checked};
pub use pair::{DSR_VIP_V4, GATEWAY_V4, Member, NAT_SOURCE_V4, PairLb, Station, VIP_V4};
pub use process::LabProcess;
pub use site::RemoteSite;
pub use sweep::{SweepReport, sweep_stale};
pub use topology::{Host, LbHost, MAX_EXTRA_CLIENT_ADDRESSES, MAX_NODES};

use run::Run;
use topology::Topology;

/// First part of every name a lab makes; the sweep recognises its runs by it.
const PREFIX_STEM: &str = "lbt";
/// Where lb-control pins its maps, under a directory named after its instance.
const BPFFS: &str = "/sys/fs/bpf";

/// How long a readiness probe waits for a TCP connection.
const PORT_PROBE_TIMEOUT: Duration = Duration::from_millis(200);

/// sim-node's JSON-RPC port (HTTP and WebSocket), as on a Polkadot node.
pub const SIM_NODE_RPC_PORT: u16 = 9944;

/// The `backends = [ … ]` entries of an lb-control config for the sim-nodes at `nodes`.
pub fn backends_toml(nodes: impl IntoIterator<Item = std::net::Ipv4Addr>) -> String {
    nodes
        .into_iter()
        .map(|node| format!("{{ address = \"{node}:{SIM_NODE_RPC_PORT}\" }}"))
        .collect::<Vec<_>>()
        .join(", ")
}
/// sim-node's control port, where tests switch faults.
pub const SIM_NODE_CONTROL_PORT: u16 = 9945;

#[derive(Debug, Clone)]
pub struct LabConfig {
    /// Number of node namespaces (1 to [`MAX_NODES`]).
    pub nodes: usize,
    /// sim-node's block interval.
    pub block_time: Duration,
    /// Start sim-node in every node namespace (and wait until it answers).
    pub start_sim_nodes: bool,
}

impl Default for LabConfig {
    fn default() -> Self {
        LabConfig {
            nodes: 3,
            block_time: Duration::from_secs(6),
            start_sim_nodes: true,
        }
    }
}

/// A running lab; dropping it removes everything it made.
#[derive(Debug)]
pub struct Lab {
    run: Run,
    topology: Topology,
    /// sim-node's block interval, for nodes started again.
    block_time: Duration,
}

impl Lab {
    /// Sweeps stale runs, builds the topology and, if configured, starts and waits for the
    /// sim-nodes. On error everything made so far is removed again.
    pub fn start(config: LabConfig) -> Result<Lab, LabError> {
        let mut run = Run::new()?;
        let topology = Topology::plan(&run.prefix, config.nodes)?;
        topology.build(&mut run.namespaces)?;
        topology.attach_peer_programs(&mut run.peer_programs)?;
        if config.start_sim_nodes {
            let nodes: Vec<_> = topology
                .nodes
                .iter()
                .map(|node| (node.netns.clone(), node.addr_v4))
                .collect();
            run.start_sim_nodes(&nodes, config.block_time)?;
        }
        Ok(Lab {
            run,
            topology,
            block_time: config.block_time,
        })
    }

    /// Gives the client's link what a client on a machine of its own meets: no XDP program on
    /// the client's end, and the LB's end checksumming and segmenting as a NIC does. For the
    /// gateway's benchmarks: with the program there, the kernel copies every segment the
    /// gateway sends into a page of the client end's pool, and (offloads off for it)
    /// checksums and segments it in software, all in the gateway's write and billed to it,
    /// work a real client's machine does. Afterwards the LB's XDP_TX and redirects into the
    /// client's link no longer deliver: not for the L4 paths.
    pub fn plain_client_link(&mut self) -> Result<(), LabError> {
        let client = &self.topology.client;
        if let Some(at) = self
            .run
            .peer_programs
            .iter()
            .position(|program| program.is_on(&client.netns, &client.iface))
        {
            self.run.peer_programs.remove(at).detach()?;
        }
        let lb = &self.topology.lb.netns;
        let mut ethtool = netns::command_in_netns(lb, "ethtool")?;
        ethtool.args(["-K", &client.gateway_iface_in_lb, "tx", "on", "tso", "on"]);
        netns::run_checked(&mut ethtool).map(drop)
    }

    /// The run prefix `lbt-<pid>-<seq>`: every namespace name starts with it, and it is
    /// lb-control's instance name.
    pub fn prefix(&self) -> &str {
        &self.run.prefix
    }

    pub fn client(&self) -> &Host {
        &self.topology.client
    }

    pub fn lb(&self) -> &LbHost {
        &self.topology.lb
    }

    /// Node `index`; panics when there is no such node, like slice indexing.
    pub fn node(&self, index: usize) -> &Host {
        &self.topology.nodes[index]
    }

    pub fn nodes(&self) -> &[Host] {
        &self.topology.nodes
    }

    /// Every namespace of this lab, the LB's first.
    pub fn namespaces(&self) -> impl Iterator<Item = &str> {
        self.topology.namespaces()
    }

    /// `http://<node addr>:9944`, node `index`'s JSON-RPC endpoint.
    pub fn node_rpc_url(&self, index: usize) -> String {
        format!("http://{}:{SIM_NODE_RPC_PORT}", self.node(index).addr_v4)
    }

    /// Node `index`'s sim-node control endpoint.
    pub fn node_control_addr(&self, index: usize) -> SocketAddr {
        SocketAddr::from((self.node(index).addr_v4, SIM_NODE_CONTROL_PORT))
    }

    /// The arguments sim-node runs with in node `index`'s namespace, as the lab starts it: for
    /// a test that restarts it the way an operator restarts a node.
    pub fn sim_node_args(&self, index: usize) -> Vec<String> {
        run::sim_node_args(index, self.block_time)
    }

    /// Adds `count` source addresses to the client (see
    /// [`MAX_EXTRA_CLIENT_ADDRESSES`]), for loads that come from several addresses.
    pub fn add_client_addresses(&self, count: usize) -> Result<Vec<Ipv4Addr>, LabError> {
        self.topology.add_client_addresses(count)
    }

    /// Where lb-control (instance = this lab's prefix) pins its maps.
    pub fn pin_dir(&self) -> PathBuf {
        Run::pin_dir(&self.run.prefix)
    }

    /// Directory of the processes' log files (removed with the lab).
    pub fn log_dir(&self) -> &Path {
        &self.run.log_dir
    }

    pub fn processes(&self) -> &[LabProcess] {
        &self.run.processes
    }

    /// A command that runs `program` inside `netns` (one of this lab's namespaces).
    pub fn exec(&self, netns: &str, program: impl AsRef<OsStr>) -> Result<Command, LabError> {
        command_in_netns(netns, program)
    }

    /// lb-control's state directory (store, admin token): one per lab, kept across restarts
    /// of lb-control within the lab.
    pub fn state_dir(&self) -> PathBuf {
        self.run.log_dir.join("lb-state")
    }

    /// Starts `lb-control run --interface client0 --instance <prefix> --state-dir … EXTRA…` in the LB
    /// namespace and waits until it has pinned its maps (its program is attached then).
    pub fn spawn_lb_control(&mut self, extra_args: &[&str]) -> Result<&LabProcess, LabError> {
        let state_dir = self.state_dir();
        self.run.spawn_lb_control(
            &self.topology.lb.netns,
            &self.topology.lb.client_iface,
            &self.run.prefix.clone(),
            &state_dir,
            extra_args,
            "lb-control",
        )
    }

    /// Starts `program ARGS…` in `netns` (one of this lab's namespaces), its output in
    /// `<log dir>/<log_name>.log`; the lab stops it with everything else unless
    /// [`Lab::stop_process`] does first. Benchmarks run nginx and HAProxy this way.
    pub fn spawn_process(
        &mut self,
        name: &str,
        netns: &str,
        program: impl AsRef<Path>,
        args: &[impl AsRef<OsStr>],
        log_name: &str,
    ) -> Result<&LabProcess, LabError> {
        self.run
            .spawn_process(name, netns, program, args, log_name)
            .map(|process| &*process)
    }

    /// Stops the lab process with this pid (SIGTERM, then SIGKILL after the grace period) and
    /// forgets it; e.g. lb-control between benchmark runs. Unknown pids are an error.
    pub fn stop_process(&mut self, pid: u32) -> Result<(), LabError> {
        self.run.stop_process(pid)
    }

    /// Kills node `index`'s sim-node with SIGKILL, as a crash would: the process gets no say,
    /// its kernel closes its sockets. The lab still reaps it at teardown.
    pub fn kill_sim_node(&self, index: usize) -> Result<(), LabError> {
        self.run
            .process(&format!("sim-node node{index}"))?
            .signal(libc::SIGKILL);
        Ok(())
    }

    /// Starts node `index`'s sim-node again after [`Lab::kill_sim_node`], as a node that comes
    /// back (at the chain's head), and waits until it accepts connections.
    pub fn restart_sim_node(&mut self, index: usize) -> Result<(), LabError> {
        let node = &self.topology.nodes[index];
        self.run
            .restart_sim_node(index, &node.netns, node.addr_v4, self.block_time)
    }

    /// Fails naming the first process that has exited; the lab binary calls it while it waits.
    pub fn check_processes(&mut self) -> Result<(), LabError> {
        self.run.check_processes()
    }

    /// Removes everything, reporting what it removed or what it could not.
    pub fn shutdown(self) -> Result<Teardown, LabError> {
        self.run.shutdown()
    }
}

/// What [`Lab::shutdown`] removed.
#[derive(Debug, Default)]
pub struct Teardown {
    pub stopped: Vec<String>,
    pub namespaces: Vec<String>,
    pub paths: Vec<PathBuf>,
}

impl fmt::Display for Teardown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "stopped: {}", list_or_none(&self.stopped))?;
        writeln!(
            f,
            "deleted namespaces (and their veths): {}",
            list_or_none(&self.namespaces)
        )?;
        let paths: Vec<String> = self
            .paths
            .iter()
            .map(|path| path.display().to_string())
            .collect();
        write!(f, "removed: {}", list_or_none(&paths))
    }
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "nothing".to_owned()
    } else {
        items.join(", ")
    }
}
