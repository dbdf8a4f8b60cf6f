//! What every lab run owns, whatever its layout (one LB, or an HA pair): its name prefix, the
//! namespaces and XDP_PASS programs made so far, the processes it started, its log directory;
//! and the teardown that removes them all, on drop too.

use std::{
    ffi::OsStr,
    io,
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use super::{
    BPFFS, LabError, PORT_PROBE_TIMEOUT, PREFIX_STEM, SIM_NODE_CONTROL_PORT, SIM_NODE_RPC_PORT,
    Teardown,
    binaries::binary_path,
    in_netns, netns,
    process::{self, LabProcess},
    sweep_stale,
    topology::PeerProgram,
};

const SIM_NODE_READY_TIMEOUT: Duration = Duration::from_secs(10);
const LB_CONTROL_READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long processes get to exit after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// What lb-control logs once it serves (admin API, gateway, health checker).
pub(crate) const LB_CONTROL_RUNNING_LOG: &str = "running; SIGHUP reloads the config";

/// Sequence number of the next lab in this process: tests run labs in parallel threads.
static NEXT_RUN: AtomicU32 = AtomicU32::new(0);

#[derive(Debug)]
pub(crate) struct Run {
    pub prefix: String,
    /// Namespaces created so far, in creation order.
    pub namespaces: Vec<String>,
    /// XDP_PASS programs on peers of the LB's veths, kept attached while the lab runs.
    pub peer_programs: Vec<PeerProgram>,
    pub processes: Vec<LabProcess>,
    pub log_dir: PathBuf,
    torn_down: bool,
}

impl Run {
    /// Checks for root, sweeps stale runs and makes the log directory of a new run.
    pub fn new() -> Result<Run, LabError> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(LabError::NotRoot);
        }
        let prefix = format!(
            "{PREFIX_STEM}-{}-{}",
            std::process::id(),
            NEXT_RUN.fetch_add(1, Ordering::Relaxed)
        );
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
        Ok(Run {
            prefix,
            namespaces: Vec::new(),
            peer_programs: Vec::new(),
            processes: Vec::new(),
            log_dir,
            torn_down: false,
        })
    }

    /// Where lb-control instance `instance` pins its maps.
    pub fn pin_dir(instance: &str) -> PathBuf {
        Path::new(BPFFS).join(instance)
    }

    /// Starts `lb-control run --interface IFACE --instance INSTANCE --state-dir DIR EXTRA…` in
    /// `netns` and waits until it has pinned its maps (its program is attached then).
    pub fn spawn_lb_control(
        &mut self,
        netns: &str,
        iface: &str,
        instance: &str,
        state_dir: &Path,
        extra_args: &[&str],
        log_name: &str,
    ) -> Result<&LabProcess, LabError> {
        let program = binary_path("lb-control")?;
        let state_dir = state_dir.to_string_lossy();
        let mut args = vec![
            "run",
            "--interface",
            iface,
            "--instance",
            instance,
            "--state-dir",
            &state_dir,
        ];
        args.extend_from_slice(extra_args);
        let log = self.log_dir.join(format!("{log_name}.log"));
        let process = LabProcess::spawn(log_name.to_owned(), netns, &program, &args, log)?;
        self.processes.push(process);
        // What lb-control pins once its program is attached to the interface: its readiness
        // signal (maps are pinned earlier, at load).
        let ready_pin = Run::pin_dir(instance).join(format!("link-{iface}"));
        let process = self.last_process();
        process.wait_ready(
            &format!("{} to appear", ready_pin.display()),
            LB_CONTROL_READY_TIMEOUT,
            || Ok(ready_pin.exists()),
        )?;
        Ok(process)
    }

    pub fn spawn_process(
        &mut self,
        name: &str,
        netns: &str,
        program: impl AsRef<Path>,
        args: &[impl AsRef<OsStr>],
        log_name: &str,
    ) -> Result<&mut LabProcess, LabError> {
        let log = self.log_dir.join(format!("{log_name}.log"));
        let process = LabProcess::spawn(name.to_owned(), netns, program.as_ref(), args, log)?;
        self.processes.push(process);
        Ok(self.last_process())
    }

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

    /// The running process named `name`.
    pub fn process(&self, name: &str) -> Result<&LabProcess, LabError> {
        self.processes
            .iter()
            .find(|process| process.name() == name)
            .ok_or_else(|| LabError::Config(format!("the lab runs no {name}")))
    }

    pub fn check_processes(&mut self) -> Result<(), LabError> {
        self.processes
            .iter_mut()
            .try_for_each(|process| process.check_running("while the lab was running"))
    }

    /// Starts sim-node in each of `nodes` (namespace, address) and waits until all answer.
    pub fn start_sim_nodes(
        &mut self,
        nodes: &[(String, std::net::Ipv4Addr)],
        block_time: Duration,
    ) -> Result<(), LabError> {
        for (index, (netns, _)) in nodes.iter().enumerate() {
            let log = self.log_dir.join(format!("sim-node-node{index}.log"));
            let process = spawn_sim_node(index, netns, block_time, log)?;
            self.processes.push(process);
        }
        // All were started first, so they come up in parallel.
        let first = self.processes.len() - nodes.len();
        for ((netns, addr), process) in nodes.iter().zip(&mut self.processes[first..]) {
            wait_until_sim_node_accepts(process, netns, *addr)?;
        }
        Ok(())
    }

    /// Starts node `index`'s sim-node (at `netns`, `addr`) again after its process ended (a
    /// test killed it): the node comes back at the chain's head, since sim-node's chain follows
    /// the clock. Waits until it answers.
    pub fn restart_sim_node(
        &mut self,
        index: usize,
        netns: &str,
        addr: std::net::Ipv4Addr,
        block_time: Duration,
    ) -> Result<(), LabError> {
        let ended = self.reap_ended(&format!("sim-node node{index}"))?;
        let log = self
            .log_dir
            .join(format!("sim-node-node{index}-after-{ended}.log"));
        self.processes
            .push(spawn_sim_node(index, netns, block_time, log)?);
        wait_until_sim_node_accepts(self.last_process(), netns, addr)
    }

    /// Forgets the process named `name`, which a test killed, once reaped (stopped first if it
    /// still runs), so it can be started again; returns its pid, which names the next log.
    pub(crate) fn reap_ended(&mut self, name: &str) -> Result<u32, LabError> {
        let position = self
            .processes
            .iter()
            .position(|process| process.name() == name)
            .ok_or_else(|| LabError::Config(format!("the lab runs no {name}")))?;
        let mut ended = [self.processes.remove(position)];
        let problems = process::stop_all(&mut ended, STOP_GRACE);
        if !problems.is_empty() {
            return Err(LabError::Cleanup(problems));
        }
        Ok(ended[0].pid())
    }

    pub(crate) fn last_process(&mut self) -> &mut LabProcess {
        let last = self.processes.len() - 1;
        &mut self.processes[last]
    }

    pub fn shutdown(mut self) -> Result<Teardown, LabError> {
        let (teardown, problems) = self.teardown();
        if problems.is_empty() {
            Ok(teardown)
        } else {
            Err(LabError::Cleanup(problems))
        }
    }

    /// Stops processes, deletes namespaces (which deletes their veths) and removes the run's
    /// pinned maps (every instance named after its prefix) and its log directory; returns what
    /// it did and what went wrong, continuing past failures.
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
        let mut dirs = self.instance_pin_dirs();
        dirs.push(self.log_dir.clone());
        for dir in dirs {
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => teardown.paths.push(dir),
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(error) => problems.push(format!("removing {}: {error}", dir.display())),
            }
        }
        (teardown, problems)
    }

    /// `<bpffs>/<prefix>` and `<bpffs>/<prefix>-…`: the pins of this run's lb-controls.
    fn instance_pin_dirs(&self) -> Vec<PathBuf> {
        let own = format!("{}-", self.prefix);
        std::fs::read_dir(BPFFS)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|entry| {
                entry
                    .file_name()
                    .to_str()
                    .is_some_and(|name| name == self.prefix || name.starts_with(&own))
            })
            .map(|entry| entry.path())
            .collect()
    }
}

/// sim-node's arguments in node `index`'s namespace.
pub(crate) fn sim_node_args(index: usize, block_time: Duration) -> Vec<String> {
    vec![
        // [::] takes IPv4 too (bindv6only is off in new namespaces).
        "--listen".to_owned(),
        format!("[::]:{SIM_NODE_RPC_PORT}"),
        "--control".to_owned(),
        format!("[::]:{SIM_NODE_CONTROL_PORT}"),
        "--id".to_owned(),
        format!("node{index}"),
        "--block-time-ms".to_owned(),
        block_time.as_millis().to_string(),
    ]
}

impl Drop for Run {
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

/// Starts lab node `index`'s sim-node in `netns`, its output in `log`.
fn spawn_sim_node(
    index: usize,
    netns: &str,
    block_time: Duration,
    log: PathBuf,
) -> Result<LabProcess, LabError> {
    LabProcess::spawn(
        format!("sim-node node{index}"),
        netns,
        &binary_path("sim-node")?,
        &sim_node_args(index, block_time),
        log,
    )
}

/// Waits until the sim-node `process` at `addr` in `netns` accepts RPC connections.
fn wait_until_sim_node_accepts(
    process: &mut LabProcess,
    netns: &str,
    addr: std::net::Ipv4Addr,
) -> Result<(), LabError> {
    let rpc = SocketAddr::from((addr, SIM_NODE_RPC_PORT));
    process.wait_ready(&format!("{rpc} to accept"), SIM_NODE_READY_TIMEOUT, || {
        in_netns(netns, || {
            TcpStream::connect_timeout(&rpc, PORT_PROBE_TIMEOUT).is_ok()
        })
    })
}
