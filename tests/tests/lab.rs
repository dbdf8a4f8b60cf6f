//! The network-namespace lab: it routes client ↔ nodes through the LB namespace, serves
//! sim-node's RPC to the client, and leaves nothing behind however a test ends.
//!
//! These tests need root (namespaces, veths, BPF filesystem): run them as root or via
//! `cargo xtask test`. Without root they fail saying so; they never pass silently.

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpListener},
    os::unix::process::ExitStatusExt,
    path::{Path, PathBuf},
    process::Command,
    sync::{Mutex, OnceLock},
    time::Duration,
};

mod common;

use anyhow::{Context, bail, ensure};
use common::{IO_TIMEOUT, connect_from, link_details, system_health_from};
use lb_tests::lab::{
    self, Lab, LabConfig, LabError, SIM_NODE_RPC_PORT, command_in_netns, in_netns, run_checked,
};

/// The BPF filesystem's root as it was before this process started its first lab.
static BPFFS_ROOT_BEFORE_LABS: OnceLock<Vec<String>> = OnceLock::new();

fn start_lab(nodes: usize, start_sim_nodes: bool) -> Lab {
    BPFFS_ROOT_BEFORE_LABS.get_or_init(|| {
        ensure_bpffs()
            .and_then(|()| bpffs_root_entries_outside_labs())
            .unwrap_or_else(|error| panic!("listing /sys/fs/bpf before the first lab: {error:#}"))
    });
    let config = LabConfig {
        nodes,
        block_time: Duration::from_millis(500),
        start_sim_nodes,
    };
    Lab::start(config).unwrap_or_else(|error| panic!("starting the lab: {error}"))
}

/// Connects from `from_netns` to a listener in `to_netns` on `to_addr`, checks that the
/// listener sees the connection come from `expected_source`, and carries bytes both ways.
fn assert_tcp_path(
    from_netns: &str,
    to_netns: &str,
    to_addr: IpAddr,
    expected_source: IpAddr,
) -> anyhow::Result<()> {
    let listener = in_netns(to_netns, || TcpListener::bind((to_addr, 0)))?
        .with_context(|| format!("listening on {to_addr} in {to_netns}"))?;
    let target = listener.local_addr()?;
    let mut client = connect_from(from_netns, target)?;
    let (mut server, source) = listener.accept()?;
    server.set_read_timeout(Some(IO_TIMEOUT))?;
    ensure!(
        source.ip() == expected_source,
        "{target} saw the connection from {source}, expected {expected_source} (plain routing, no NAT)"
    );
    client.write_all(b"ping")?;
    let mut received = [0; 4];
    server.read_exact(&mut received)?;
    server.write_all(b"pong")?;
    client.read_exact(&mut received)?;
    ensure!(
        &received == b"pong",
        "{target}: reply garbled: {received:?}"
    );
    Ok(())
}

#[test]
fn client_reaches_every_node_through_lb_over_ipv4_and_ipv6() -> anyhow::Result<()> {
    let lab = start_lab(3, false);
    let client = lab.client();
    for node in lab.nodes() {
        assert_tcp_path(
            &client.netns,
            &node.netns,
            node.addr_v4.into(),
            client.addr_v4.into(),
        )?;
        assert_tcp_path(
            &client.netns,
            &node.netns,
            node.addr_v6.into(),
            client.addr_v6.into(),
        )?;
    }
    Ok(())
}

#[test]
fn lb_reaches_every_node_over_ipv4_and_ipv6() -> anyhow::Result<()> {
    let lab = start_lab(2, false);
    let lb = &lab.lb().netns;
    for node in lab.nodes() {
        assert_tcp_path(lb, &node.netns, node.addr_v4.into(), node.gateway_v4.into())?;
        assert_tcp_path(lb, &node.netns, node.addr_v6.into(), node.gateway_v6.into())?;
    }
    Ok(())
}

#[test]
fn lab_veths_have_tx_checksum_offload_off() -> anyhow::Result<()> {
    let lab = start_lab(1, false);
    let node = lab.node(0);
    let ends = [
        (node.netns.as_str(), node.iface.as_str()),
        (lab.lb().netns.as_str(), node.gateway_iface_in_lb.as_str()),
        (lab.client().netns.as_str(), lab.client().iface.as_str()),
        (lab.lb().netns.as_str(), lab.lb().client_iface.as_str()),
    ];
    for (netns, iface) in ends {
        let features = run_checked(lab.exec(netns, "ethtool")?.args(["-k", iface]))?;
        let features = String::from_utf8_lossy(&features.stdout);
        ensure!(
            features.contains("tx-checksumming: off"),
            "{iface} in {netns} still checksums in hardware:\n{features}"
        );
    }
    Ok(())
}

#[test]
fn client_gets_system_health_from_every_sim_node_through_lb() -> anyhow::Result<()> {
    let lab = start_lab(3, true);
    for (index, node) in lab.nodes().iter().enumerate() {
        for addr in [IpAddr::from(node.addr_v4), IpAddr::from(node.addr_v6)] {
            let target = SocketAddr::from((addr, SIM_NODE_RPC_PORT));
            let (node_id, health) = system_health_from(&lab.client().netns, target)?;
            ensure!(
                health["isSyncing"] == false,
                "{target}: system_health result {health}"
            );
            ensure!(
                node_id.as_deref() == Some(&format!("node{index}")),
                "{target} answered as {node_id:?}, expected node{index}"
            );
        }
    }
    Ok(())
}

#[test]
fn client_and_node_veths_carry_native_xdp_pass_program() -> anyhow::Result<()> {
    let lab = start_lab(2, false);
    for host in std::iter::once(lab.client()).chain(lab.nodes()) {
        let link = link_details(&host.netns, &host.iface)?;
        ensure!(
            link.contains("prog/xdp id"),
            "{} in {} has no native XDP program:\n{link}",
            host.iface,
            host.netns
        );
    }
    Ok(())
}

/// Entries of the BPF filesystem's root that are not a lab run's directory.
fn bpffs_root_entries_outside_labs() -> anyhow::Result<Vec<String>> {
    let mut entries = Vec::new();
    for entry in std::fs::read_dir("/sys/fs/bpf")? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if !name.starts_with("lbt-") {
            entries.push(name);
        }
    }
    Ok(entries)
}

#[test]
fn labs_pin_nothing_outside_their_pin_dirs() -> anyhow::Result<()> {
    let lab = start_lab(1, false);
    let before = BPFFS_ROOT_BEFORE_LABS
        .get()
        .map(Vec::as_slice)
        .unwrap_or_default();
    // Compared with the state before any lab of this process, so labs of parallel tests
    // cannot hide a leak by making it before this test looks.
    let pinned: Vec<String> = bpffs_root_entries_outside_labs()?
        .into_iter()
        .filter(|entry| !before.contains(entry))
        .collect();
    ensure!(
        pinned.is_empty(),
        "labs pinned {pinned:?} in /sys/fs/bpf, outside their own directories like {}",
        lab.pin_dir().display()
    );
    Ok(())
}

/// What a test needs to know to check, after the lab is gone, that nothing remains.
struct Footprint {
    prefix: String,
    namespaces: Vec<String>,
    pids: Vec<u32>,
    log_dir: PathBuf,
}

impl Footprint {
    fn of(lab: &Lab) -> Footprint {
        Footprint {
            prefix: lab.prefix().to_owned(),
            namespaces: lab.namespaces().map(str::to_owned).collect(),
            pids: lab
                .processes()
                .iter()
                .map(|process| process.pid())
                .collect(),
            log_dir: lab.log_dir().to_owned(),
        }
    }

    fn assert_gone(&self) -> anyhow::Result<()> {
        let listed = run_checked(Command::new("ip").args(["netns", "list"]))?;
        let listed = String::from_utf8_lossy(&listed.stdout);
        for netns in &self.namespaces {
            ensure!(
                !listed
                    .lines()
                    .any(|line| line.split_whitespace().next() == Some(netns)),
                "namespace {netns} is still there"
            );
        }
        // Every veth lived inside the lab's namespaces; none may have leaked into the root one.
        let veths = run_checked(Command::new("ip").args(["-o", "link", "show", "type", "veth"]))?;
        let veths = String::from_utf8_lossy(&veths.stdout);
        ensure!(
            !veths.lines().any(|line| line.contains(&self.prefix)),
            "veths of {} in the root namespace:\n{veths}",
            self.prefix
        );
        let pin_dir = Path::new("/sys/fs/bpf").join(&self.prefix);
        ensure!(!pin_dir.exists(), "{} is still there", pin_dir.display());
        ensure!(
            !self.log_dir.exists(),
            "{} is still there",
            self.log_dir.display()
        );
        for pid in &self.pids {
            ensure!(
                !Path::new(&format!("/proc/{pid}")).exists(),
                "process {pid} is still there"
            );
        }
        Ok(())
    }
}

#[test]
fn dropped_lab_leaves_no_namespace_veth_pin_or_process() -> anyhow::Result<()> {
    let lab = start_lab(2, true);
    let footprint = Footprint::of(&lab);
    ensure!(
        footprint.pids.len() == 2,
        "expected 2 sim-nodes, got {:?}",
        footprint.pids
    );
    // A program the test itself left running inside the lab goes too.
    let mut stray = lab.exec(&lab.node(1).netns, "sleep")?.arg("600").spawn()?;
    drop(lab);
    footprint.assert_gone()?;
    let status = stray.wait()?;
    ensure!(
        status.signal() == Some(libc::SIGKILL),
        "stray sleep ended with {status}"
    );
    Ok(())
}

#[test]
fn dropped_lab_leaves_no_pinned_maps_or_lb_control_behind() -> anyhow::Result<()> {
    let mut lab = start_lab(1, true);
    lab.spawn_lb_control(&[])?;
    ensure!(
        lab.pin_dir().is_dir(),
        "lb-control pinned nothing in {}",
        lab.pin_dir().display()
    );
    let footprint = Footprint::of(&lab);
    ensure!(
        footprint.pids.len() == 2,
        "expected sim-node and lb-control, got {:?}",
        footprint.pids
    );
    drop(lab);
    footprint.assert_gone()
}

#[test]
fn lab_is_removed_when_test_body_panics() -> anyhow::Result<()> {
    let footprint = Mutex::new(None);
    let outcome = std::panic::catch_unwind(|| {
        let lab = start_lab(2, true);
        *footprint
            .lock()
            .unwrap_or_else(|poison| poison.into_inner()) = Some(Footprint::of(&lab));
        panic!("test body fails while lab {} is up", lab.prefix());
    });
    ensure!(outcome.is_err(), "the test body should have panicked");
    let footprint = footprint
        .into_inner()
        .unwrap_or_else(|poison| poison.into_inner());
    let Some(footprint) = footprint else {
        bail!("the lab did not start, so cleanup after a panic was not exercised");
    };
    footprint.assert_gone()
}

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("{}", LabError::NotRoot);
    }
}

/// Mounts the BPF filesystem at /sys/fs/bpf if it is not there, as lb-control would.
fn ensure_bpffs() -> anyhow::Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    if !mounts
        .lines()
        .any(|line| line.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
    {
        run_checked(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }
    Ok(())
}

#[test]
fn sweep_removes_namespace_process_and_dirs_of_dead_run() -> anyhow::Result<()> {
    require_root();
    ensure_bpffs()?;
    let dead_pid = {
        let mut exited = Command::new("true").spawn()?;
        exited.wait()?;
        exited.id()
    };
    let stale_prefix = format!("lbt-{dead_pid}-0");
    let netns = format!("{stale_prefix}-node0");
    run_checked(Command::new("ip").args(["netns", "add", &netns]))?;
    let mut orphan = command_in_netns(&netns, "sleep")?.arg("600").spawn()?;
    let dirs = [
        Path::new("/sys/fs/bpf").join(&stale_prefix),
        std::env::temp_dir().join(&stale_prefix),
    ];
    for dir in &dirs {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }

    // A lab starting in parallel may sweep these first; either way they must be gone.
    lab::sweep_stale()?;

    ensure!(
        !Path::new("/run/netns").join(&netns).exists(),
        "stale namespace {netns} survived the sweep"
    );
    let status = orphan.wait()?;
    ensure!(
        status.signal() == Some(libc::SIGKILL),
        "orphan in {netns} ended with {status}"
    );
    for dir in &dirs {
        ensure!(!dir.exists(), "{} survived the sweep", dir.display());
    }
    Ok(())
}

#[test]
fn sweep_spares_runs_of_live_processes() -> anyhow::Result<()> {
    let lab = start_lab(1, false);
    lab::sweep_stale()?;
    for netns in lab.namespaces() {
        ensure!(
            Path::new("/run/netns").join(netns).exists(),
            "the sweep removed {netns} of a live run"
        );
    }
    Ok(())
}
