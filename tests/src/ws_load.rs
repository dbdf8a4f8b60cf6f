//! WebSocket load: `connections` WebSocket connections over TLS, each keeping `in_flight`
//! JSON-RPC calls of one method in flight (a new call as each answer comes) for `seconds`;
//! what `wrk` is for HTTP, for `bench gateway`'s WebSocket runs. It counts the calls answered
//! with a result and with anything else, and their latencies.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::ServerName;
use serde::{Deserialize, Serialize, de::IgnoredAny};
use tokio_tungstenite::tungstenite::Message;

/// Time to connect, to finish the TLS handshake and the upgrade.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a call may stay unanswered before the run fails.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// What to run.
#[derive(Debug, Clone, clap::Args)]
pub struct WsLoadPlan {
    /// The server, `host:port` (TLS; the certificate must name the host's address).
    #[arg(long)]
    pub server: SocketAddr,
    /// The request path (the gateway's key: `/lbk_…`).
    #[arg(long, default_value = "/")]
    pub path: String,
    /// PEM file of the CA that signed the server's certificate.
    #[arg(long)]
    pub ca: PathBuf,
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Calls each connection keeps in flight.
    #[arg(long, default_value_t = 4)]
    pub in_flight: usize,
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// The method called, with no parameters.
    #[arg(long)]
    pub method: String,
}

/// What a run measured; printed as one line of JSON.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WsLoadSummary {
    /// Calls answered with a result within the run.
    pub answered: u64,
    /// Calls answered with anything else (an error object).
    pub errors: u64,
    pub duration_us: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

/// An answer: its id, and whether it carries a result.
#[derive(Deserialize)]
struct Answer {
    id: u64,
    #[serde(default)]
    result: Option<IgnoredAny>,
}

/// Connects every connection, then runs the load on all of them at once.
pub async fn run(plan: WsLoadPlan) -> anyhow::Result<WsLoadSummary> {
    let tls = tokio_rustls::TlsConnector::from(crate::lab::certs::trusting_client(&plan.ca)?);
    let mut sockets = Vec::with_capacity(plan.connections);
    for index in 0..plan.connections {
        sockets.push(
            connect(&plan, &tls)
                .await
                .with_context(|| format!("connection {}", index + 1))?,
        );
    }
    let plan = Arc::new(plan);
    let started = Instant::now();
    let until = started + Duration::from_secs(plan.seconds);
    let tasks: Vec<_> = sockets
        .into_iter()
        .map(|socket| tokio::spawn(drive(socket, plan.clone(), until)))
        .collect();
    let mut summary = WsLoadSummary::default();
    let mut latencies = Vec::new();
    for task in tasks {
        let (answered, errors, mut own) = task.await.context("a connection's task")??;
        summary.answered += answered;
        summary.errors += errors;
        latencies.append(&mut own);
    }
    summary.duration_us = started.elapsed().as_micros() as u64;
    latencies.sort_unstable();
    let percentile = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(0, |&us| u64::from(us))
    };
    summary.p50_us = percentile(0.50);
    summary.p99_us = percentile(0.99);
    summary.max_us = latencies.last().map_or(0, |&us| u64::from(us));
    Ok(summary)
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

async fn connect(plan: &WsLoadPlan, tls: &tokio_rustls::TlsConnector) -> anyhow::Result<Socket> {
    let connected = async {
        let tcp = tokio::net::TcpStream::connect(plan.server).await?;
        tcp.set_nodelay(true)?;
        let tls = tls
            .connect(ServerName::IpAddress(plan.server.ip().into()), tcp)
            .await?;
        let url = format!("wss://{}{}", plan.server, plan.path);
        let (socket, _) = tokio_tungstenite::client_async(url, tls).await?;
        anyhow::Ok(socket)
    };
    tokio::time::timeout(CONNECT_TIMEOUT, connected)
        .await
        .map_err(|_| anyhow::anyhow!("not connected within {CONNECT_TIMEOUT:?}"))?
}

/// One connection's calls until `until`: the answers with a result, the others, and the
/// latency of each (µs).
async fn drive(
    mut socket: Socket,
    plan: Arc<WsLoadPlan>,
    until: Instant,
) -> anyhow::Result<(u64, u64, Vec<u32>)> {
    let call = |id: u64| {
        Message::text(format!(
            r#"{{"jsonrpc":"2.0","id":{id},"method":"{}","params":[]}}"#,
            plan.method
        ))
    };
    // When each call in flight was sent, by id.
    let mut sent_at = std::collections::HashMap::with_capacity(plan.in_flight);
    let mut next_id = 0u64;
    for _ in 0..plan.in_flight {
        sent_at.insert(next_id, Instant::now());
        socket.feed(call(next_id)).await?;
        next_id += 1;
    }
    socket.flush().await?;
    let (mut answered, mut errors, mut latencies) = (0, 0, Vec::new());
    while !sent_at.is_empty() {
        let message = tokio::time::timeout(CALL_TIMEOUT, socket.next())
            .await
            .map_err(|_| anyhow::anyhow!("no answer within {CALL_TIMEOUT:?}"))?;
        let text = match message {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(other)) => bail!("unexpected message {other:?}"),
            Some(Err(error)) => bail!("the connection failed: {error}"),
            None => bail!("the server closed the connection"),
        };
        let answer: Answer = serde_json::from_str(&text)
            .with_context(|| format!("not an answer to a call: {text}"))?;
        let sent = sent_at
            .remove(&answer.id)
            .with_context(|| format!("an answer to no call in flight: {text}"))?;
        let now = Instant::now();
        if now <= until {
            latencies.push(now.duration_since(sent).as_micros() as u32);
            if answer.result.is_some() {
                answered += 1;
            } else {
                errors += 1;
            }
            sent_at.insert(next_id, now);
            socket.send(call(next_id)).await?;
            next_id += 1;
        }
    }
    let _ = socket.close(None).await;
    Ok((answered, errors, latencies))
}
