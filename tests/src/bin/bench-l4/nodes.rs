//! The nodes: nginx in every node namespace answering the JSON-RPC POST with a fixed body, as
//! in the calibration lab; and their interface counters, which show how a balancer split the
//! load.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use lb_tests::{
    lab::{Lab, in_netns, run_checked},
    nginx,
};

use crate::PORT;

/// The fixed answer, a `system_health` result. The node's name goes in a header, so every
/// node sends a body of the same length and a probe can still tell who answered.
pub const RESPONSE_BODY: &str =
    r#"{"jsonrpc":"2.0","id":1,"result":{"isSyncing":false,"peers":8,"shouldHavePeers":true}}"#;
/// The header naming the node that answered.
pub const NODE_HEADER: &str = "X-Node";
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Long enough for one SYN retransmission (1 s), so a probe that needed one still answers
/// and the caller can report how long it took.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
const POLL: Duration = Duration::from_millis(50);

/// Starts nginx in every node namespace and waits until each answers on its own address.
pub fn start(lab: &mut Lab, workers: usize) -> anyhow::Result<()> {
    let nodes: Vec<_> = lab.nodes().to_vec();
    for (index, node) in nodes.iter().enumerate() {
        let name = format!("node{index}");
        nginx::start(lab, &name, &node.netns, workers, |_| server_block(&name))?;
    }
    for node in &nodes {
        let addr = SocketAddr::from((node.addr_v4, PORT));
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            lab.check_processes()?;
            let answer = in_netns(&node.netns, || post(addr))?;
            if answer.is_ok() {
                break;
            }
            if Instant::now() >= deadline {
                bail!(
                    "nginx in {} did not answer on {addr} within {READY_TIMEOUT:?}",
                    node.netns
                );
            }
            std::thread::sleep(POLL);
        }
    }
    Ok(())
}

fn server_block(name: &str) -> String {
    format!(
        r#"    server {{
        listen {PORT} reuseport backlog=4096;
        location / {{
            default_type application/json;
            add_header {NODE_HEADER} {name};
            return 200 '{RESPONSE_BODY}';
        }}
    }}
"#
    )
}

/// Sends one JSON-RPC POST on a new connection (`Connection: close`) and returns the name of
/// the node that answered it.
pub fn post(addr: SocketAddr) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT)
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(PROBE_TIMEOUT))?;
    stream.set_write_timeout(Some(PROBE_TIMEOUT))?;
    let body = crate::wrk::REQUEST_BODY;
    write!(
        stream,
        "POST / HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .with_context(|| format!("sending to {addr}"))?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .with_context(|| format!("reading the answer from {addr}"))?;
    if !response.starts_with("HTTP/1.1 200") || !response.ends_with(RESPONSE_BODY) {
        bail!("unexpected answer from {addr}: {response:?}");
    }
    let prefix = format!("{}: ", NODE_HEADER.to_ascii_lowercase());
    response
        .lines()
        .find_map(|line| {
            line.to_ascii_lowercase()
                .starts_with(&prefix)
                .then(|| line[prefix.len()..].trim().to_owned())
        })
        .with_context(|| format!("the answer from {addr} has no {NODE_HEADER} header"))
}

/// Packets received so far on every node's interface towards the LB, in node order.
pub fn rx_packets(lab: &Lab) -> anyhow::Result<Vec<u64>> {
    lab.nodes()
        .iter()
        .map(|node| {
            let output = run_checked(lab.exec(&node.netns, "ip")?.args([
                "-j",
                "-s",
                "link",
                "show",
                "dev",
                &node.iface,
            ]))?;
            let links: serde_json::Value = serde_json::from_slice(&output.stdout)
                .with_context(|| format!("parsing `ip -j -s link` in {}", node.netns))?;
            links[0]["stats64"]["rx"]["packets"]
                .as_u64()
                .with_context(|| format!("no rx packet count for {} in {}", node.iface, node.netns))
        })
        .collect()
}
