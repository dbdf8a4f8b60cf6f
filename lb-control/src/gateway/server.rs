//! The listening side: accepts TCP connections, holds each client address to its connection
//! limit, terminates TLS (with the certificate in force when the connection came), and serves
//! HTTP/1.1 or HTTP/2 on it (hyper-util's auto server; upgrades enabled, so WebSocket can join
//! on the same port).
//!
//! A slow client cannot hold a connection past `header_timeout`: it bounds the TLS handshake
//! and the reading of each HTTP/1.1 request's headers.

use std::{
    collections::HashMap,
    convert::Infallible,
    future::Future,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use hyper::{
    rt::{Read, Write},
    service::service_fn,
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{
        conn::auto,
        graceful::{GracefulShutdown, Watcher},
    },
};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use super::{service::Pipeline, tls::Certificates};

/// How long open requests may finish after the gateway is told to stop.
const DRAIN_TIME: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub header_timeout: Duration,
    pub max_connections_per_ip: u32,
}

/// Serves until `shutdown` resolves, then lets open requests finish for a while.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<Certificates>>,
    pipeline: Arc<Pipeline>,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) {
    let counts = Arc::new(ConnectionCounts::default());
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: pause instead of spinning.
                    warn!("gateway: accepting a connection: {error}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Some(slot) = counts.claim(peer.ip(), limits.max_connections_per_ip) else {
            pipeline.metrics.rejected("connection_limit");
            debug!(%peer, "gateway: connection limit of the address reached");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let connection = Connection {
            pipeline: pipeline.clone(),
            peer,
            limits,
            watcher: graceful.watcher(),
        };
        let tls = tls.clone();
        tokio::spawn(async move {
            connection.run(tcp, tls.as_deref()).await;
            drop(slot);
        });
    }
    if tokio::time::timeout(DRAIN_TIME, graceful.shutdown())
        .await
        .is_err()
    {
        info!("gateway: stopped with requests still open after {DRAIN_TIME:?}");
    }
}

struct Connection {
    pipeline: Arc<Pipeline>,
    peer: SocketAddr,
    limits: ConnectionLimits,
    watcher: Watcher,
}

impl Connection {
    async fn run(self, tcp: TcpStream, tls: Option<&Certificates>) {
        let Some(tls) = tls else {
            return self.serve_http(TokioIo::new(tcp)).await;
        };
        let handshake = tls.acceptor().accept(tcp);
        match tokio::time::timeout(self.limits.header_timeout, handshake).await {
            Ok(Ok(stream)) => self.serve_http(TokioIo::new(stream)).await,
            Ok(Err(error)) => debug!(peer = %self.peer, "gateway: TLS handshake failed: {error}"),
            Err(_) => debug!(peer = %self.peer, "gateway: TLS handshake timed out"),
        }
    }

    async fn serve_http<I>(self, io: I)
    where
        I: Read + Write + Unpin + Send + 'static,
    {
        let client = self.peer.ip();
        let pipeline = self.pipeline;
        let service = service_fn(move |request| {
            let pipeline = pipeline.clone();
            async move { Ok::<_, Infallible>(pipeline.handle(request, client).await) }
        });
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.limits.header_timeout);
        builder.http2().timer(TokioTimer::new());
        let connection = builder.serve_connection_with_upgrades(io, service);
        if let Err(error) = self.watcher.watch(connection).await {
            debug!(peer = %self.peer, "gateway: connection ended: {error}");
        }
    }
}

/// Open connections per client address.
#[derive(Default)]
struct ConnectionCounts {
    open: Mutex<HashMap<IpAddr, u32>>,
}

impl ConnectionCounts {
    /// A slot for one more connection from `ip`, unless it holds `max` already.
    fn claim(self: &Arc<Self>, ip: IpAddr, max: u32) -> Option<Slot> {
        let mut open = self
            .open
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let count = open.entry(ip).or_insert(0);
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(Slot {
            counts: self.clone(),
            ip,
        })
    }
}

/// One open connection; frees its place when dropped.
struct Slot {
    counts: Arc<ConnectionCounts>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self
            .counts
            .open
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}
