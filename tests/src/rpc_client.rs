//! A blocking HTTP/1.1 client for JSON-RPC POSTs to sim-node, shared by the lab tests and the
//! benchmarks: keep-alive connections or one request per connection, and which node answered
//! (sim-node names itself in the `x-sim-node` header, so a request through the VIP tells where
//! the balancer sent it).
//!
//! It connects from the calling thread's network namespace: wrap [`RpcConnection::connect`] in
//! [`in_netns`](crate::lab::in_netns) to connect from a lab host. I/O errors stay in the error
//! chain, so a caller can tell a timeout from a reset.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{Context, bail, ensure};

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
