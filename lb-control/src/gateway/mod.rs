//! The JSON-RPC gateway: what the public talks to (`https://…/<key>`) in front of the nodes.
//!
//! - [`server`]: accepting, per-address connection limit, TLS, HTTP/1.1 and HTTP/2.
//! - [`tls`]: certificates from PEM files, ALPN, reload on SIGHUP.
//! - [`service`]: one request: key, body limit, parse, rate limit, policy, upstream.
//! - [`auth`]: where the key is, the cached key check, rate limits, last-used times.
//! - [`block`]: repeated auth failures of a source address → the kernel blocklist.
//! - [`policy`]: which methods never reach a node.
//! - [`jsonrpc`]: framing, and every JSON-RPC error the gateway makes.
//! - [`websocket`]: JSON-RPC over WebSocket, one node connection per client, shared head
//!   subscriptions.
//! - [`slots`]: counted connections per address and per key.
//! - [`upstream`]: live nodes, the Maglev pick per client, pooled calls, the retry of reads.
//! - [`metrics`]: the gateway's metric families.

pub mod auth;
pub mod block;
pub mod jsonrpc;
pub mod metrics;
pub mod policy;
pub mod server;
pub mod service;
pub mod slots;
pub mod tls;
pub mod upstream;
pub mod websocket;

use std::{net::SocketAddr, sync::Arc};

use thiserror::Error;
use tokio::{
    net::TcpListener,
    sync::{mpsc, watch},
    task::JoinHandle,
};

use self::{
    auth::Authenticator,
    server::ConnectionLimits,
    service::{BodyLimits, Pipeline},
    websocket::WebSocketLimits,
};
pub use self::{
    block::BlockRequest,
    metrics::GatewayMetrics,
    policy::{MethodPolicy, validate_pattern},
    tls::{Certificates, TlsError},
    upstream::{Upstream, ViewNodes},
};
use crate::{
    backends::{ClusterView, ServiceKey},
    cache::{self, ChainFollower, ResponseCache},
    config::GatewaySection,
    keys::ApiKeys,
    store::Store,
};

#[derive(Debug, Error)]
pub enum GatewayError {
    #[error("gateway: {0}")]
    Tls(#[from] TlsError),
    #[error("gateway.service: {0}")]
    Service(String),
    #[error("gateway: no listen address (set gateway.listen)")]
    NoListen,
    #[error(
        "gateway: no TLS certificate: set gateway.tls_cert and gateway.tls_key, or plain_http = true"
    )]
    NoCertificate,
    #[error("gateway: cannot listen on {address}: {source}")]
    Listen {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("gateway: the first rotation: {0}")]
    Rotation(#[from] lb_common::maglev::MaglevError),
}

/// The gateway's socket and certificate, made before anything else starts: a taken port or a
/// bad certificate stops the daemon before it touches the kernel.
pub struct Bound {
    section: GatewaySection,
    listener: TcpListener,
    address: SocketAddr,
    certificates: Option<Arc<Certificates>>,
    service: Option<ServiceKey>,
}

impl Bound {
    pub fn local_addr(&self) -> SocketAddr {
        self.address
    }
}

/// What the gateway runs on besides its config section.
pub struct GatewayContext {
    pub view: watch::Receiver<Arc<ClusterView>>,
    pub keys: ApiKeys,
    pub store: Store,
    pub metrics: Arc<GatewayMetrics>,
    /// Entries of the Maglev table (the data plane's size).
    pub maglev_table_size: u32,
    /// Where block requests go (the daemon's blocklist), when
    /// `[gateway.auth_failures_block]` is set.
    pub blocks: mpsc::UnboundedSender<BlockRequest>,
}

/// A running gateway. Dropping it does not stop it: call [`Gateway::stop`].
pub struct Gateway {
    address: SocketAddr,
    certificates: Option<Arc<Certificates>>,
    upstream: Arc<Upstream>,
    stop: tokio::sync::oneshot::Sender<()>,
    serving: JoinHandle<()>,
    /// Following the view and writing last-used times: stopped with the server.
    helpers: [JoinHandle<()>; 2],
    /// Follows the nodes' heads and runtime versions for the response cache; stops when dropped.
    follower: ChainFollower,
}

impl Gateway {
    /// Loads the certificate and binds `section.listen`.
    pub async fn bind(section: &GatewaySection) -> Result<Bound, GatewayError> {
        let address = section.listen.ok_or(GatewayError::NoListen)?;
        let certificates = if section.plain_http {
            None
        } else {
            let (Some(cert), Some(key)) = (&section.tls_cert, &section.tls_key) else {
                return Err(GatewayError::NoCertificate);
            };
            Some(Arc::new(Certificates::load(cert, key)?))
        };
        let service = section.service_key().map_err(GatewayError::Service)?;
        let listen_error = |source| GatewayError::Listen { address, source };
        let listener = TcpListener::bind(address).await.map_err(listen_error)?;
        let address = listener.local_addr().map_err(listen_error)?;
        Ok(Bound {
            section: section.clone(),
            listener,
            address,
            certificates,
            service,
        })
    }

    /// Serves on the bound socket until [`Gateway::stop`].
    pub fn start(bound: Bound, context: GatewayContext) -> Result<Gateway, GatewayError> {
        let Bound {
            section,
            listener,
            address,
            certificates,
            service,
        } = bound;
        let upstream = Arc::new(Upstream::new(
            context.maglev_table_size,
            section.upstream_timeout,
            context.metrics.clone(),
        ));
        // The first rotation is in place before the first request.
        upstream.apply(&ViewNodes::of(&context.view.borrow(), service))?;
        let auth = Arc::new(Authenticator::new(context.keys, context.store));
        let cache = ResponseCache::new(section.cache_bytes);
        let follower = cache::follow(upstream.watch_serving(), cache.clone());
        let failures = section
            .auth_failures_block
            .map(|policy| block::FailureTracker::new(policy, context.blocks));
        let pipeline = Arc::new(Pipeline {
            auth: auth.clone(),
            failures,
            policy: MethodPolicy::new(&section.deny, &section.allow),
            upstream: upstream.clone(),
            cache,
            metrics: context.metrics,
            limits: BodyLimits {
                max_body_bytes: section.max_body_bytes,
                max_batch: section.max_batch,
            },
            websocket: WebSocketLimits {
                max_message_bytes: section.max_body_bytes,
                max_connections_per_key: section.max_connections_per_key,
                max_subscriptions_per_connection: section.max_subscriptions_per_connection,
                idle_timeout: section.idle_timeout,
            },
            key_connections: Arc::default(),
            feeds: follower.feeds(),
        });
        let limits = ConnectionLimits {
            header_timeout: section.header_timeout,
            idle_timeout: section.idle_timeout,
            max_connections_per_ip: section.max_connections_per_ip,
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let helpers = [
            tokio::spawn(upstream.clone().follow(context.view, service)),
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(auth::TOUCH_INTERVAL);
                loop {
                    tick.tick().await;
                    auth.flush_usage().await;
                }
            }),
        ];
        let serving = tokio::spawn(server::serve(
            listener,
            certificates.clone(),
            pipeline,
            limits,
            async {
                let _ = stopped.await;
            },
        ));
        Ok(Gateway {
            address,
            certificates,
            upstream,
            stop,
            serving,
            helpers,
            follower,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.address
    }

    /// Re-reads the certificate files; connections open now keep their certificate.
    pub fn reload_tls(&self) -> Result<(), TlsError> {
        match &self.certificates {
            Some(certificates) => certificates.reload(),
            None => Ok(()),
        }
    }

    /// The node a client at `client` is sent to now.
    pub fn node_for(&self, client: std::net::IpAddr) -> Option<SocketAddr> {
        self.upstream.node_for(client)
    }

    /// Stops accepting, lets open requests finish (a few seconds at most), stops the rest.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.serving.await;
        for task in self.helpers {
            task.abort();
        }
        drop(self.follower);
    }
}
