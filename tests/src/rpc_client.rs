//! A blocking HTTP/1.1 client for JSON-RPC POSTs to sim-node, shared by the lab tests and the
//! benchmarks: keep-alive connections or one request per connection, and which node answered
//! (sim-node names itself in the `x-sim-node` header, so a request through the VIP tells where
//! the balancer sent it).
//!
//! It connects from the calling thread's network namespace: wrap [`RpcConnection::connect`] in
//! [`in_netns`] to connect from a lab host ([`KeepAlive::open`] does). I/O errors stay in the error
//! chain, so a caller can tell a timeout from a reset.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{Context, bail, ensure};

use crate::lab::in_netns;

/// The request every user of this client sends: cheap for the node, and what the health
/// checker and real clients send too.
pub const SYSTEM_HEALTH: &str = r#"{"id":1,"jsonrpc":"2.0","method":"system_health","params":[]}"#;

/// One HTTP answer to a JSON-RPC POST.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The `x-sim-node` header: which node answered, when sim-node did.
    pub node: Option<String>,
    pub body: Vec<u8>,
}

impl Answer {
    /// The answering node, failing when the answer does not name one.
    pub fn node(&self) -> anyhow::Result<&str> {
        self.node
            .as_deref()
            .context("the answer has no x-sim-node header")
    }

    /// The JSON-RPC `result`.
    pub fn result(&self) -> anyhow::Result<serde_json::Value> {
        let reply: serde_json::Value = serde_json::from_slice(&self.body).with_context(|| {
            format!("body {:?} is not JSON", String::from_utf8_lossy(&self.body))
        })?;
        Ok(reply["result"].clone())
    }
}

/// A TCP connection carrying HTTP/1.1 requests, one at a time.
#[derive(Debug)]
pub struct RpcConnection {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
    target: SocketAddr,
}

impl RpcConnection {
    /// Connects to `target`, waiting at most `timeout`; reads and writes then time out after
    /// `timeout` too.
    pub fn connect(target: SocketAddr, timeout: Duration) -> anyhow::Result<RpcConnection> {
        let stream = TcpStream::connect_timeout(&target, timeout)
            .with_context(|| format!("connecting to {target}"))?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        // Small requests and answers: Nagle would hold each back for a delayed ACK.
        stream.set_nodelay(true)?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(RpcConnection {
            stream,
            reader,
            target,
        })
    }

    /// The socket, e.g. to change its timeouts or read its local address.
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// Posts `system_health` and reads the answer; the connection stays open for more.
    pub fn system_health(&mut self) -> anyhow::Result<Answer> {
        self.post(SYSTEM_HEALTH, false)
    }

    /// Posts `system_health` with `Connection: close`: the last request on this connection.
    pub fn system_health_and_close(&mut self) -> anyhow::Result<Answer> {
        self.post(SYSTEM_HEALTH, true)
    }

    /// Posts `body`, then reads one answer, which must be `200 OK`.
    pub fn post(&mut self, body: &str, close: bool) -> anyhow::Result<Answer> {
        let connection = if close { "close" } else { "keep-alive" };
        // One write: a request in pieces would wait for delayed ACKs.
        let request = format!(
            "POST / HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nconnection: {connection}\r\n\r\n{body}",
            self.target,
            body.len()
        );
        self.stream
            .write_all(request.as_bytes())
            .with_context(|| format!("sending to {}", self.target))?;
        self.read_answer()
            .with_context(|| format!("reading the answer from {}", self.target))
    }

    fn read_answer(&mut self) -> anyhow::Result<Answer> {
        let mut status = String::new();
        if self.reader.read_line(&mut status)? == 0 {
            bail!("connection closed before an answer");
        }
        ensure!(
            status.split_whitespace().nth(1) == Some("200"),
            "status {:?}",
            status.trim_end()
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
        Ok(Answer { node, body })
    }
}

/// How long a [`KeepAlive`] waits to connect and for an answer.
const KEEP_ALIVE_IO_TIMEOUT: Duration = Duration::from_secs(5);

/// A keep-alive HTTP/1.1 connection from a lab host to a service, and the node that answered
/// its first request: what a test checks a long-lived L4 connection with.
pub struct KeepAlive {
    connection: RpcConnection,
    pub node: String,
}

impl KeepAlive {
    /// Connects from `netns` and sends a first request, which decides the node.
    pub fn open(netns: &str, target: SocketAddr) -> anyhow::Result<KeepAlive> {
        let connection = in_netns(netns, || {
            RpcConnection::connect(target, KEEP_ALIVE_IO_TIMEOUT)
        })?
        .with_context(|| format!("from {netns}"))?;
        let mut keep_alive = KeepAlive {
            connection,
            node: String::new(),
        };
        keep_alive.node = keep_alive.system_health()?;
        Ok(keep_alive)
    }

    pub fn stream(&self) -> &TcpStream {
        self.connection.stream()
    }

    /// Posts `system_health` on this connection; returns the node that answered.
    pub fn system_health(&mut self) -> anyhow::Result<String> {
        Ok(self.connection.system_health()?.node()?.to_owned())
    }

    /// The next request must be answered by the node of the first one.
    pub fn check_same_node(&mut self) -> anyhow::Result<()> {
        let local = self.stream().local_addr()?;
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

    /// [`KeepAlive::check_same_node`] on every connection at once (a broken one costs its I/O
    /// timeout): each one's outcome, in order.
    pub fn check_all_same_node(connections: &mut [KeepAlive]) -> Vec<anyhow::Result<()>> {
        std::thread::scope(|scope| {
            let checks: Vec<_> = connections
                .iter_mut()
                .map(|connection| scope.spawn(move || connection.check_same_node()))
                .collect();
            checks
                .into_iter()
                .map(|check| {
                    check
                        .join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("the check panicked")))
                })
                .collect()
        })
    }
}
