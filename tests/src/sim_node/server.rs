//! The JSON-RPC listener: HTTP and WebSocket on one port, served by jsonrpsee behind our own
//! accept loop, so the `close_connections` fault can drop live connections and new ones.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::header::HeaderValue;
use jsonrpsee::RpcModule;
use jsonrpsee::core::middleware::RpcServiceBuilder;
use jsonrpsee::server::{
    RandomStringIdProvider, ServerConfig, ServerHandle, StopHandle, stop_channel,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::http_service::serve_request;
use super::rpc_middleware::FaultInjection;
use super::state::{NodeState, OpenConnection};

/// Substrate's defaults for the RPC server (`--rpc-max-request-size` and friends).
const MAX_BODY_BYTES: u32 = 15 * 1024 * 1024;
const MAX_CONNECTIONS: u32 = 100;
const MAX_SUBSCRIPTIONS_PER_CONNECTION: u32 = 1024;
const MESSAGE_BUFFER_CAPACITY: u32 = 64;

/// The connections accepted since the last `close_connections`: stopping the handle closes
/// them all (jsonrpsee's WebSocket tasks watch it, our HTTP connection tasks too).
struct ConnectionGeneration {
    stop_handle: StopHandle,
    server_handle: ServerHandle,
}

impl ConnectionGeneration {
    fn new() -> Self {
        let (stop_handle, server_handle) = stop_channel();
        Self {
            stop_handle,
            server_handle,
        }
    }

    fn close(&self) {
        // Already stopped means its connections are already closing: nothing to do.
        let _ = self.server_handle.stop();
    }
}

/// Serves JSON-RPC on `listener` until `shutdown` is cancelled.
pub async fn serve_rpc(
    listener: TcpListener,
    node: Arc<NodeState>,
    module: RpcModule<Arc<NodeState>>,
    node_id: HeaderValue,
    shutdown: CancellationToken,
) {
    let config = ServerConfig::builder()
        .max_request_body_size(MAX_BODY_BYTES)
        .max_response_body_size(MAX_BODY_BYTES)
        .max_connections(MAX_CONNECTIONS)
        .max_subscriptions_per_connection(MAX_SUBSCRIPTIONS_PER_CONNECTION)
        .set_message_buffer_capacity(MESSAGE_BUFFER_CAPACITY)
        // Substrate's subscription ids: 16 random characters.
        .set_id_provider(RandomStringIdProvider::new(16))
        .build();
    let rpc_node = node.clone();
    let service_builder = jsonrpsee::server::Server::builder()
        .set_config(config)
        .set_rpc_middleware(
            RpcServiceBuilder::new()
                .layer_fn(move |service| FaultInjection::new(service, rpc_node.clone())),
        )
        .to_service_builder();
    let methods: jsonrpsee::Methods = module.into();
    let mut faults = node.subscribe_faults();
    let mut generation = ConnectionGeneration::new();
    let mut closing = false;

    loop {
        let socket = tokio::select! {
            () = shutdown.cancelled() => break,
            changed = faults.changed() => {
                if changed.is_err() {
                    break;
                }
                let close_now = faults.borrow_and_update().close_connections;
                if close_now && !closing {
                    generation.close();
                    generation = ConnectionGeneration::new();
                }
                closing = close_now;
                continue;
            }
            accepted = listener.accept() => match accepted {
                Ok((socket, _peer)) => socket,
                Err(error) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    tracing::warn!(%error, "sim-node {}: accepting a JSON-RPC connection failed", node.id);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if closing {
            reset_connection(socket);
            continue;
        }
        let _ = socket.set_nodelay(true);
        let rpc = service_builder
            .clone()
            .build(methods.clone(), generation.stop_handle.clone());
        let node_id = node_id.clone();
        // Counted for as long as the socket lives: an upgraded WebSocket outlives `serve`,
        // which hands the socket to jsonrpsee's WebSocket task and returns.
        let open = Arc::new(node.open_connection());
        let connection = open.clone();
        let service = tower::service_fn(move |request| {
            serve_request(rpc.clone(), node_id.clone(), connection.clone(), request)
        });
        let closed = generation.stop_handle.clone();
        let socket = CountedSocket {
            socket,
            _open: open,
        };
        tokio::spawn(async move {
            tokio::select! {
                // Errors here are the client's (bad HTTP, early close): nothing to report.
                _ = jsonrpsee::server::serve(socket, service) => {}
                () = closed.shutdown() => {}
            }
        });
    }
    generation.close();
}

/// An accepted socket that counts as one of the node's open connections until it is dropped.
struct CountedSocket {
    socket: TcpStream,
    _open: Arc<OpenConnection>,
}

impl AsyncRead for CountedSocket {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.socket).poll_read(cx, buf)
    }
}

impl AsyncWrite for CountedSocket {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.socket).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.socket).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.socket.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.socket).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.socket).poll_shutdown(cx)
    }
}

/// Drops a connection with a TCP reset, so the client sees a hard connection error.
fn reset_connection(socket: TcpStream) {
    let _ = socket.set_zero_linger();
    drop(socket);
}
