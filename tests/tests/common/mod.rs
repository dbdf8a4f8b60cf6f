//! Helpers shared by the integration tests that run in the lab.
#![allow(
    dead_code,
    reason = "each test binary includes this module and uses a different subset of it"
)]

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use lb_tests::lab::{Lab, LabConfig, in_netns, run_checked};

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

/// Opens a TCP connection to `target` from inside `netns`.
pub fn connect_from(netns: &str, target: SocketAddr) -> anyhow::Result<TcpStream> {
    let stream = in_netns(netns, || TcpStream::connect_timeout(&target, IO_TIMEOUT))?
        .with_context(|| format!("connecting from {netns} to {target}"))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    Ok(stream)
}

/// Posts `system_health` to `url` from inside `netns`; returns the answering node's id
/// (the `x-sim-node` header, when sim-node sends one) and the JSON-RPC result.
pub fn system_health_from(
    netns: &str,
    target: SocketAddr,
) -> anyhow::Result<(Option<String>, serde_json::Value)> {
    let mut stream = connect_from(netns, target)?;
    let body = r#"{"id":1,"jsonrpc":"2.0","method":"system_health","params":[]}"#;
    write!(
        stream,
        "POST / HTTP/1.1\r\nhost: {target}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .with_context(|| format!("{target}: no HTTP header end in {response:?}"))?;
    let status = head.split_whitespace().nth(1);
    ensure!(status == Some("200"), "{target}: {head}");
    let node_id = head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("x-sim-node")
            .then(|| value.trim().to_owned())
    });
    let reply: serde_json::Value =
        serde_json::from_str(body).with_context(|| format!("{target}: body {body:?}"))?;
    Ok((node_id, reply["result"].clone()))
}

/// The `ip link` line of `iface` in `netns`, which names an attached XDP program.
pub fn link_details(netns: &str, iface: &str) -> anyhow::Result<String> {
    let output = run_checked(Command::new("ip").args(["-n", netns, "link", "show", "dev", iface]))?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
