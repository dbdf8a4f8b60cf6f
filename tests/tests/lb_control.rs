//! lb-control in the lab: the XDP program attached to a veth in a namespace counts real
//! traffic exactly, the BPF filesystem is mounted when missing, devices without native XDP get
//! generic mode with a warning, SIGTERM detaches, and a start-up failure names its cause.
//!
//! These tests need root: run them as root or via `cargo xtask test`.

mod common;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, bail, ensure};
use common::{link_details, system_health_from, wait_for};
use lb_common::stats::{Counters, ProtoSlot};
use lb_control::dataplane::read_pinned_proto_stats;
use lb_tests::lab::{Lab, SIM_NODE_RPC_PORT, binary_path, run_checked};

fn start_lab(nodes: usize, with_sim_nodes: bool) -> Lab {
    common::start_lab(nodes, with_sim_nodes, Duration::from_millis(500))
}

/// `lb-control run` started by the test itself in the lab's LB namespace, its stderr captured.
struct LbControl {
    child: Child,
}

impl LbControl {
    fn start(lab: &Lab, args: &[&str]) -> anyhow::Result<LbControl> {
        let child = Command::new(binary_path("lb-control")?)
            .args(["run", "--netns", &lab.lb().netns])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting lb-control")?;
        Ok(LbControl { child })
    }

    /// Sends SIGTERM and returns the exit status and everything it logged.
    fn stop(self) -> anyhow::Result<(std::process::ExitStatus, String)> {
        // SAFETY: kill has no memory-safety preconditions; the pid is our own child's.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let output = self.child.wait_with_output()?;
        Ok((
            output.status,
            String::from_utf8_lossy(&output.stderr).into_owned(),
        ))
    }
}

/// Packets and bytes as the XDP program counted them and as the interface counted them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RxCounts {
    xdp: Counters,
    interface: Counters,
}

/// The XDP program's totals and the interface's own receive statistics, read until two
/// consecutive readings agree, so a packet arriving between the two reads cannot skew them.
fn settled_rx_counts(lab: &Lab, iface: &str) -> anyhow::Result<RxCounts> {
    let read = || -> anyhow::Result<RxCounts> {
        let xdp = read_pinned_proto_stats(&lab.pin_dir())?.total();
        let output = run_checked(Command::new("ip").args([
            "-n",
            &lab.lb().netns,
            "-j",
            "-s",
            "link",
            "show",
            "dev",
            iface,
        ]))?;
        let link: serde_json::Value = serde_json::from_slice(&output.stdout)?;
        let rx = &link[0]["stats64"]["rx"];
        let interface = Counters {
            packets: rx["packets"].as_u64().context("rx.packets")?,
            bytes: rx["bytes"].as_u64().context("rx.bytes")?,
        };
        Ok(RxCounts { xdp, interface })
    };
    let mut previous = read()?;
    for _ in 0..50 {
        let current = read()?;
        if current == previous {
            return Ok(current);
        }
        previous = current;
    }
    bail!("{iface}: counters kept moving: {previous:?}")
}

#[test]
fn xdp_counts_of_a_real_http_exchange_match_the_interface_statistics() -> anyhow::Result<()> {
    let mut lab = start_lab(1, true);
    lab.spawn_lb_control(&["--xdp-mode", "native"])?;
    let lb = lab.lb().clone();
    let link = link_details(&lb.netns, &lb.client_iface)?;
    ensure!(
        link.contains("xdp "),
        "no native XDP program on {}:\n{link}",
        lb.client_iface
    );
    let tcp_before = read_pinned_proto_stats(&lab.pin_dir())?.by_slot[ProtoSlot::Ipv4Tcp.name()];
    let before = settled_rx_counts(&lab, &lb.client_iface)?;

    let target = SocketAddr::from((lab.node(0).addr_v4, SIM_NODE_RPC_PORT));
    let (node_id, _) = system_health_from(&lab.client().netns, target)?;
    ensure!(
        node_id.as_deref() == Some("node0"),
        "answered by {node_id:?}"
    );

    let after = settled_rx_counts(&lab, &lb.client_iface)?;
    let tcp_after = read_pinned_proto_stats(&lab.pin_dir())?.by_slot[ProtoSlot::Ipv4Tcp.name()];
    let xdp_packets = after.xdp.packets - before.xdp.packets;
    let interface_packets = after.interface.packets - before.interface.packets;
    // SYN, ACK, request, FIN and the ACKs of the reply: an HTTP exchange is at least 5 frames.
    ensure!(
        tcp_after.packets - tcp_before.packets >= 5,
        "ipv4_tcp grew by {} packets for an HTTP exchange: {tcp_before:?} then {tcp_after:?}",
        tcp_after.packets - tcp_before.packets
    );
    ensure!(
        xdp_packets == interface_packets,
        "XDP counted {xdp_packets} packets, {} received {interface_packets}: {before:?} then {after:?}",
        lb.client_iface
    );
    // A veth's rx_bytes leaves out the 14-byte Ethernet header that XDP sees.
    let xdp_bytes = after.xdp.bytes - before.xdp.bytes;
    let interface_bytes = after.interface.bytes - before.interface.bytes;
    ensure!(
        xdp_bytes == interface_bytes + 14 * interface_packets,
        "XDP counted {xdp_bytes} bytes, {} received {interface_bytes} in {interface_packets} \
         frames (+14 bytes of Ethernet header each)",
        lb.client_iface
    );
    Ok(())
}

/// A temporary directory that is not a BPF filesystem until lb-control mounts one on it.
struct MountPoint(PathBuf);

impl Drop for MountPoint {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn filesystem_type(path: &Path) -> anyhow::Result<String> {
    let output = run_checked(Command::new("stat").args(["-f", "-c", "%T"]).arg(path))?;
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

#[test]
fn missing_bpffs_is_mounted_and_sigterm_detaches_the_program() -> anyhow::Result<()> {
    let lab = start_lab(1, false);
    let mount_point = MountPoint(std::env::temp_dir().join(format!("{}-bpffs", lab.prefix())));
    std::fs::create_dir_all(&mount_point.0)?;
    ensure!(
        filesystem_type(&mount_point.0)? != "bpf_fs",
        "already a BPF filesystem"
    );

    let bpffs = mount_point.0.to_str().context("utf-8 temp path")?;
    let lb_iface = lab.lb().client_iface.clone();
    let lb_control = LbControl::start(
        &lab,
        &[
            "--interface",
            &lb_iface,
            "--instance",
            "mounted",
            "--bpffs",
            bpffs,
        ],
    )?;
    let pinned = mount_point.0.join("mounted/PROTO_STATS");
    let link = mount_point.0.join(format!("mounted/link-{lb_iface}"));
    wait_for("the XDP link pinned in the new BPF filesystem", || {
        Ok(link.exists())
    })?;
    ensure!(
        pinned.exists(),
        "the stats map is not pinned next to the link"
    );
    ensure!(filesystem_type(&mount_point.0)? == "bpf_fs");
    let attached = link_details(&lab.lb().netns, &lb_iface)?;
    ensure!(
        attached.contains("xdp "),
        "not attached natively:\n{attached}"
    );

    let (status, log) = lb_control.stop()?;
    ensure!(status.success(), "lb-control exited with {status}:\n{log}");
    ensure!(log.contains("mounted a BPF filesystem"), "log:\n{log}");
    ensure!(log.contains("detached"), "log:\n{log}");
    let details = link_details(&lab.lb().netns, &lb_iface)?;
    ensure!(
        !details.contains("xdp"),
        "still attached after SIGTERM:\n{details}"
    );
    ensure!(
        pinned.exists(),
        "the pinned map must outlive lb-control, for a restart"
    );
    ensure!(!link.exists(), "a clean shutdown must remove the link pin");
    Ok(())
}

#[test]
fn device_without_native_xdp_falls_back_to_generic_mode_with_a_warning() -> anyhow::Result<()> {
    let lab = start_lab(1, false);
    let instance = format!("{}-lo", lab.prefix());
    let lb_control = LbControl::start(&lab, &["--interface", "lo", "--instance", &instance])?;
    let result = wait_for("lb-control attached to lo in generic mode", || {
        Ok(link_details(&lab.lb().netns, "lo")?.contains("xdpgeneric"))
    });
    let (_, log) = lb_control.stop()?;
    let _ = std::fs::remove_dir_all(Path::new("/sys/fs/bpf").join(&instance));
    result.with_context(|| format!("log:\n{log}"))?;
    ensure!(
        log.contains("falling back to generic (SKB) mode"),
        "no fallback warning in:\n{log}"
    );
    Ok(())
}

#[test]
fn native_mode_on_a_device_without_it_names_the_fix() -> anyhow::Result<()> {
    let lab = start_lab(1, false);
    let instance = format!("{}-native", lab.prefix());
    let output = Command::new(binary_path("lb-control")?)
        .args(["run", "--netns", &lab.lb().netns, "--interface", "lo"])
        .args(["--instance", &instance, "--xdp-mode", "native"])
        .output()?;
    let _ = std::fs::remove_dir_all(Path::new("/sys/fs/bpf").join(&instance));
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        !output.status.success(),
        "native mode on lo succeeded:\n{stderr}"
    );
    ensure!(
        stderr.contains("attaching the XDP program to lo in native mode")
            && stderr.contains("try --xdp-mode generic"),
        "stderr:\n{stderr}"
    );
    Ok(())
}

#[test]
fn taken_admin_port_fails_the_start_naming_the_cause() -> anyhow::Result<()> {
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let address = taken.local_addr()?;
    let state_dir = std::env::temp_dir().join(format!("lb-taken-admin-{}", std::process::id()));
    std::fs::create_dir_all(&state_dir)?;
    let config = state_dir.join("lb.toml");
    let instance = format!("taken-admin-{}", std::process::id());
    std::fs::write(
        &config,
        format!(
            "instance = \"{instance}\"\nstate_dir = \"{}\"\n[admin]\nlisten = \"{address}\"\n",
            state_dir.display()
        ),
    )?;
    let mut child = Command::new(binary_path("lb-control")?)
        .args(["run", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting lb-control")?;
    // It must give up at once; were the port not taken it would run, so bound the wait.
    let exited = wait_for("lb-control to exit", || Ok(child.try_wait()?.is_some()));
    if exited.is_err() {
        let _ = child.kill();
    }
    let output = child.wait_with_output()?;
    let _ = std::fs::remove_dir_all(&state_dir);
    let _ = std::fs::remove_dir_all(Path::new("/sys/fs/bpf").join(&instance));
    exited?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(!output.status.success(), "lb-control started:\n{stderr}");
    ensure!(
        stderr.contains(&format!("admin API: cannot listen on {address}: "))
            && stderr.contains("Address already in use"),
        "the cause is not printed:\n{stderr}"
    );
    drop(taken);
    Ok(())
}
