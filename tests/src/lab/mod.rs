//! The network-namespace lab: throwaway hosts on one machine for tests and `cargo xtask run`.
//!
//! A [`Lab`] is a client namespace and N node namespaces, each joined by a veth pair to one LB
//! namespace that routes between them, over IPv4 (10.200.0.0/16) and IPv6 (fd00:200::/32):
//! client `10.200.1.2` ↔ LB `client0` `10.200.1.1`; node i `10.200.(10+i).2` ↔ LB `node<i>`
//! `10.200.(10+i).1`. Every veth has TX checksum offload off; the client's and nodes' ends
//! have GRO on and an XDP_PASS program attached, so native-mode XDP on the LB's ends can
//! redirect and `XDP_TX` into them. The lab can run sim-node (or chopsticks, a real runtime) in
//! the node namespaces and lb-control in the LB namespace.
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
mod netns;
mod process;
mod sweep;
mod topology;

use std::{
    ffi::OsStr,
    fmt, io,
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

pub use binaries::{binary_path, js_dir};
pub use chopsticks::CHOPSTICKS_CHAIN;
pub use dsr::{DSR_TUN_IFACE, DsrNode};
pub use error::LabError;
pub use netns::{command_in_netns, in_netns, run_checked};
pub use process::LabProcess;
pub use sweep::{SweepReport, sweep_stale};
pub use topology::{Host, LbHost, MAX_EXTRA_CLIENT_ADDRESSES, MAX_NODES};

use topology::{PeerProgram, Topology};

/// First part of every name a lab makes; the sweep recognises its runs by it.
const PREFIX_STEM: &str = "lbt";
/// Where lb-control pins its maps, under a directory named after its instance.
const BPFFS: &str = "/sys/fs/bpf";
/// What lb-control pins once its program is attached to the client interface: its readiness
/// signal (maps are pinned earlier, at load).
const LB_CONTROL_READY_PIN: &str = "link-client0";

/// sim-node's JSON-RPC port (HTTP and WebSocket), as on a Polkadot node.
pub const SIM_NODE_RPC_PORT: u16 = 9944;
/// sim-node's control port, where tests switch faults.
pub const SIM_NODE_CONTROL_PORT: u16 = 9945;

const SIM_NODE_READY_TIMEOUT: Duration = Duration::from_secs(10);
const LB_CONTROL_READY_TIMEOUT: Duration = Duration::from_secs(20);
const PORT_PROBE_TIMEOUT: Duration = Duration::from_millis(200);
/// How long processes get to exit after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// Sequence number of the next lab in this process: tests run labs in parallel threads.
static NEXT_RUN: AtomicU32 = AtomicU32::new(0);

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
    prefix: String,
    topology: Topology,
    /// Namespaces created so far, in creation order.
    namespaces: Vec<String>,
    /// XDP_PASS programs on the client's and nodes' veths, kept attached while the lab runs.
    peer_programs: Vec<PeerProgram>,
    processes: Vec<LabProcess>,
    log_dir: PathBuf,
    torn_down: bool,
}

impl Lab {
    /// Sweeps stale runs, builds the topology and, if configured, starts and waits for the
    /// sim-nodes. On error everything made so far is removed again.
    pub fn start(config: LabConfig) -> Result<Lab, LabError> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(LabError::NotRoot);
        }
        let prefix = format!(
            "{PREFIX_STEM}-{}-{}",
            std::process::id(),
            NEXT_RUN.fetch_add(1, Ordering::Relaxed)
        );
        let topology = Topology::plan(&prefix, config.nodes)?;
        match sweep_stale() {
            Ok(report) if !report.is_empty() => tracing::info!(%report, "swept stale lab runs"),
            Ok(_) => {}
            // A leftover that cannot be removed does not stop this run: its names differ.
            Err(error) => tracing::warn!(%error, "sweeping stale lab runs"),
        }
        let log_dir = std::env::temp_dir().join(&prefix);
        std::fs::create_dir(&log_dir).map_err(LabError::io(format!(
            "creating log directory {}",
            log_dir.display()
        )))?;
        let mut lab = Lab {
            prefix,
            topology,
            namespaces: Vec::new(),
            peer_programs: Vec::new(),
            processes: Vec::new(),
            log_dir,
            torn_down: false,
        };
        lab.topology.build(&mut lab.namespaces)?;
        lab.topology.attach_peer_programs(&mut lab.peer_programs)?;
        if config.start_sim_nodes {
            lab.start_sim_nodes(config.block_time)?;
        }
        Ok(lab)
    }

    /// The run prefix `lbt-<pid>-<seq>`: every namespace name starts with it, and it is
    /// lb-control's instance name.
    pub fn prefix(&self) -> &str {
        &self.prefix
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

    /// Adds `count` source addresses to the client (see
    /// [`MAX_EXTRA_CLIENT_ADDRESSES`]), for loads that come from several addresses.
    pub fn add_client_addresses(&self, count: usize) -> Result<Vec<Ipv4Addr>, LabError> {
        self.topology.add_client_addresses(count)
    }

    /// Where lb-control (instance = this lab's prefix) pins its maps.
    pub fn pin_dir(&self) -> PathBuf {
        Path::new(BPFFS).join(&self.prefix)
    }

    /// Directory of the processes' log files (removed with the lab).
    pub fn log_dir(&self) -> &Path {
        &self.log_dir
    }

    pub fn processes(&self) -> &[LabProcess] {
        &self.processes
    }

    /// A command that runs `program` inside `netns` (one of this lab's namespaces).
    pub fn exec(&self, netns: &str, program: impl AsRef<OsStr>) -> Result<Command, LabError> {
        command_in_netns(netns, program)
    }

    /// lb-control's state directory (store, admin token): one per lab, kept across restarts
    /// of lb-control within the lab.
    pub fn state_dir(&self) -> PathBuf {
        self.log_dir.join("lb-state")
    }

    /// Starts `lb-control run --interface client0 --instance <prefix> --state-dir … EXTRA…` in the LB
    /// namespace and waits until it has pinned its maps (its program is attached then).
    pub fn spawn_lb_control(&mut self, extra_args: &[&str]) -> Result<&LabProcess, LabError> {
        let program = binary_path("lb-control")?;
        let lb = &self.topology.lb;
        let state_dir = self.state_dir();
        let state_dir = state_dir.to_string_lossy();
        let mut args = vec![
            "run",
            "--interface",
            &lb.client_iface,
            "--instance",
            &self.prefix,
            "--state-dir",
            &state_dir,
        ];
        args.extend_from_slice(extra_args);
        let log = self.log_dir.join("lb-control.log");
        let process = LabProcess::spawn("lb-control".to_owned(), &lb.netns, &program, &args, log)?;
        self.processes.push(process);
        let ready_pin = self.pin_dir().join(LB_CONTROL_READY_PIN);
        let process = self.last_process();
        process.wait_ready(
            &format!("{} to appear", ready_pin.display()),
            LB_CONTROL_READY_TIMEOUT,
            || Ok(ready_pin.exists()),
        )?;
        Ok(process)
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
        let log = self.log_dir.join(format!("{log_name}.log"));
        let process = LabProcess::spawn(name.to_owned(), netns, program.as_ref(), args, log)?;
        self.processes.push(process);
        Ok(self.last_process())
    }

    /// Stops the lab process with this pid (SIGTERM, then SIGKILL after the grace period) and
    /// forgets it; e.g. lb-control between benchmark runs. Unknown pids are an error.
    pub fn stop_process(&mut self, pid: u32) -> Result<(), LabError> {
        let index = self
            .processes
            .iter()
            .position(|process| process.pid() == pid)
            .ok_or_else(|| LabError::Config(format!("no lab process has pid {pid}")))?;
        let mut stopped = [self.processes.remove(index)];
        let problems = process::stop_all(&mut stopped, STOP_GRACE);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(LabError::Cleanup(problems))
        }
    }

    /// Kills node `index`'s sim-node with SIGKILL, as a crash would: the process gets no say,
    /// its kernel closes its sockets. The lab still reaps it at teardown.
    pub fn kill_sim_node(&self, index: usize) -> Result<(), LabError> {
        let name = format!("sim-node node{index}");
        let process = self
            .processes
            .iter()
            .find(|process| process.name() == name)
            .ok_or_else(|| LabError::Config(format!("the lab runs no {name}")))?;
        process.signal(libc::SIGKILL);
        Ok(())
    }

    /// Fails naming the first process that has exited; the lab binary calls it while it waits.
    pub fn check_processes(&mut self) -> Result<(), LabError> {
        self.processes
            .iter_mut()
            .try_for_each(|process| process.check_running("while the lab was running"))
    }

    /// Removes everything, reporting what it removed or what it could not.
    pub fn shutdown(mut self) -> Result<Teardown, LabError> {
        let (teardown, problems) = self.teardown();
        if problems.is_empty() {
            Ok(teardown)
        } else {
            Err(LabError::Cleanup(problems))
        }
    }

    fn start_sim_nodes(&mut self, block_time: Duration) -> Result<(), LabError> {
        let program = binary_path("sim-node")?;
        for (index, node) in self.topology.nodes.iter().enumerate() {
            let id = format!("node{index}");
            let args = [
                // [::] takes IPv4 too (bindv6only is off in new namespaces).
                "--listen".to_owned(),
                format!("[::]:{SIM_NODE_RPC_PORT}"),
                "--control".to_owned(),
                format!("[::]:{SIM_NODE_CONTROL_PORT}"),
                "--id".to_owned(),
                id.clone(),
                "--block-time-ms".to_owned(),
                block_time.as_millis().to_string(),
            ];
            let log = self.log_dir.join(format!("sim-node-{id}.log"));
            let process =
                LabProcess::spawn(format!("sim-node {id}"), &node.netns, &program, &args, log)?;
            self.processes.push(process);
        }
        // All were started first, so they come up in parallel.
        let count = self.topology.nodes.len();
        let first = self.processes.len() - count;
        for (node, process) in self.topology.nodes.iter().zip(&mut self.processes[first..]) {
            let rpc = SocketAddr::from((node.addr_v4, SIM_NODE_RPC_PORT));
            process.wait_ready(&format!("{rpc} to accept"), SIM_NODE_READY_TIMEOUT, || {
                in_netns(&node.netns, || {
                    TcpStream::connect_timeout(&rpc, PORT_PROBE_TIMEOUT).is_ok()
                })
            })?;
        }
        Ok(())
    }

    fn last_process(&mut self) -> &mut LabProcess {
        let last = self.processes.len() - 1;
        &mut self.processes[last]
    }

    /// Stops processes, deletes namespaces (which deletes their veths) and removes the
    /// lab's directories; returns what it did and what went wrong, continuing past failures.
    fn teardown(&mut self) -> (Teardown, Vec<String>) {
        self.torn_down = true;
        let mut teardown = Teardown::default();
        let mut problems = process::stop_all(&mut self.processes, STOP_GRACE);
        teardown.stopped = self
            .processes
            .drain(..)
            .map(|process| format!("{} (pid {})", process.name(), process.pid()))
            .collect();
        for program in self.peer_programs.drain(..) {
            if let Err(error) = program.detach() {
                problems.push(error.to_string());
            }
        }
        for netns in self.namespaces.drain(..).rev() {
            match delete_netns_and_strays(&netns) {
                Ok(()) => teardown.namespaces.push(netns),
                Err(error) => problems.push(error.to_string()),
            }
        }
        for dir in [self.pin_dir(), self.log_dir.clone()] {
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => teardown.paths.push(dir),
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(error) => problems.push(format!("removing {}: {error}", dir.display())),
            }
        }
        (teardown, problems)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.torn_down {
            return;
        }
        let (_, problems) = self.teardown();
        if !problems.is_empty() {
            eprintln!("{}", LabError::Cleanup(problems));
        }
    }
}

/// Kills whatever else still runs in `netns` (e.g. a program a test started there and left
/// running), then deletes it.
fn delete_netns_and_strays(netns: &str) -> Result<(), LabError> {
    for pid in netns::netns_pids(netns)? {
        // SAFETY: plain kill(2) of a process listed as living in this lab's namespace.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    netns::delete_netns(netns)
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
