//! The JSON-RPC gateway: what the public talks to (`https://…/<key>`) in front of the nodes.
//!
//! - [`server`]: accepting, TLS, HTTP/1.1 and HTTP/2.
//! - [`admission`]: the connection limits, in all and per client (IPv4 address, IPv6 /64).
//! - [`tls`]: certificates from PEM files, ALPN, reload on SIGHUP.
//! - [`pipeline`]: the stages in order, each call's answer (policy, cache, node), and the one
//!   mapping of a refusal to its JSON-RPC error and metric; both transports run it.
//! - [`stages`]: one file per stage: [`stages::auth`] (key check), [`stages::parse`],
//!   [`stages::rate_limit`], [`stages::policy`].
//! - [`service`]: the HTTP transport: one request through the pipeline, framed as HTTP.
//! - [`websocket`]: the WebSocket transport: each message through the pipeline, shared head
//!   subscriptions, the rest on the node's shared connections.
//! - [`clients`]: the WebSocket clients of each node, counted and closed for rolling upgrades.
//! - [`links`]: the pools of upstream WebSocket connections per node that the sessions share.
//! - [`block`]: repeated auth failures of a source address → the kernel blocklist.
//! - [`jsonrpc`]: framing, and every JSON-RPC error the gateway makes.
//! - [`slots`]: counted connections per client and per key.
//! - [`upstream`]: live nodes, the Maglev pick per client, pooled calls within each node's
//!   budget, the retry of reads.
//! - [`remote`]: other sites' gateways as upstreams of a tier, each relayed from a loopback
//!   port so that the rest sees one more node.
//! - [`metrics`]: the gateway's metric families.
//!
//! What the gateway knows of each method (safety, cache rule, subscription, retry) is one
//! table, [`crate::methods`].

pub mod admission;
pub mod block;
pub mod clients;
pub mod jsonrpc;
pub mod links;
pub mod metrics;
pub mod pipeline;
pub mod remote;
pub mod server;
pub mod service;
mod settings;
pub mod slots;
pub mod stages;
pub mod tls;
pub mod upstream;
pub mod websocket;

use std::{net::SocketAddr, sync::Arc};

use thiserror::Error;
use tokio::{
    net::TcpSocket,
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tracing::info;

use self::{
    admission::{Admission, AdmissionLimits},
    links::{LinkLimits, Links, QueueBudget},
    pipeline::{BodyLimits, Pipeline},
    server::ConnectionLimits,
    stages::{auth::Authenticator, rate_limit::RateLimits},
    websocket::WebSocketLimits,
};
pub use self::{
    block::BlockRequest,
    clients::NodeClients,
    metrics::GatewayMetrics,
    server::{Mode, ServingSeat, StopReason},
    settings::{AuthFailureBlock, GatewaySection},
    stages::policy::{MethodPolicy, validate_pattern},
    tls::{Certificates, TlsError},
    upstream::{RemoteNode, Upstream, ViewNodes},
};
use self::{
    metrics::RemoteLabels,
    remote::{Remote, RemoteError},
};
use crate::{
    backends::ClusterView,
    cache::{self, ChainFollower, ResponseCache},
    ha::{handover::Connections, set_ip_option},
    health::{HealthSnapshot, Target},
    keys::ApiKeys,
    model::{ServiceKey, Tier},
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
    #[error("gateway: {0}")]
    Remote(#[from] RemoteError),
    #[error("gateway: starting a serving thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error(
        "gateway: the listening sockets taken over from the running lb-control: {0}; is \
         gateway.listen the same in both?"
    )]
    TakenOver(String),
}

/// The gateway's sockets and certificate, made before anything else starts: a taken port or a
/// bad certificate stops the daemon before it touches the kernel.
pub struct Bound {
    section: GatewaySection,
    /// One listening socket per serving thread, all on the same address (`SO_REUSEPORT`: the
    /// kernel spreads new connections over them).
    listeners: Vec<std::net::TcpListener>,
    address: SocketAddr,
    certificates: Option<Arc<Certificates>>,
    service: Option<ServiceKey>,
    /// Other sites' gateways, relayed: running already, so the health checker can check them
    /// before the gateway serves.
    remotes: Vec<Remote>,
}

impl Bound {
    pub fn local_addr(&self) -> SocketAddr {
        self.address
    }

    /// What the health checker checks of the remote gateways: their relays, as nodes.
    pub fn remote_targets(&self) -> Vec<Target> {
        self.remotes
            .iter()
            .map(|remote| Target::substrate(remote.endpoint()))
            .collect()
    }
}

/// What a running gateway serves from, as the admin API shows it.
#[derive(Clone)]
pub struct GatewayState {
    upstream: Arc<Upstream>,
    remotes: Arc<[RemoteEntry]>,
}

/// A remote gateway: its URL, its tier, and the relay address it is checked and called at.
#[derive(Debug, Clone)]
pub struct RemoteEntry {
    pub url: String,
    pub tier: Tier,
    pub node: SocketAddr,
}

impl GatewayState {
    /// The tier new clients go to now; None while no node takes them.
    pub fn serving_tier(&self) -> Option<Tier> {
        self.upstream.serving_tier()
    }

    /// How many healthy nodes take new clients now (the "least bad" not counted).
    pub fn healthy_nodes(&self) -> usize {
        self.upstream.healthy_nodes()
    }

    pub fn remotes(&self) -> &[RemoteEntry] {
        &self.remotes
    }
}

/// What [`Gateway::prepare`] makes for a [`Bound`].
struct Prepared {
    certificates: Option<Arc<Certificates>>,
    service: Option<ServiceKey>,
    remotes: Vec<Remote>,
}

/// What the gateway runs on besides its config section.
pub struct GatewayContext {
    pub view: watch::Receiver<Arc<ClusterView>>,
    pub keys: ApiKeys,
    pub store: Store,
    pub metrics: Arc<GatewayMetrics>,
    /// Entries of the Maglev table (the data plane's size).
    pub maglev_table_size: u32,
    /// Where block requests go ([`block::apply_requests`] carries them out), when
    /// `[gateway.auth_failures_block]` is set.
    pub blocks: mpsc::UnboundedSender<BlockRequest>,
    /// The WebSocket clients per node, which the admin API reads and closes.
    pub clients: Arc<NodeClients>,
    /// The health checker's snapshots: how the remote gateways fare (the view carries the
    /// backends' health).
    pub health: watch::Receiver<Arc<HealthSnapshot>>,
}

/// Calls in flight on every upstream WebSocket connection of a node before the gateway opens
/// another: a Substrate node buffers 64 messages per connection
/// (`--rpc-message-buffer-capacity-per-connection`).
const CALLS_PER_LINK: u32 = 16;

/// Largest message taken from a node: above Substrate's largest answer
/// (`--rpc-max-response-size`, 15 MiB).
const NODE_MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Connections wait in the kernel's queue up to this many per listener.
const LISTEN_BACKLOG: u32 = 1024;

/// The serving threads: one per CPU. Each runs its own single-threaded runtime on its own
/// listener, as nginx runs a worker per core: a request is read, answered and written on one
/// thread, with no hand-off between threads (a cache hit costs two system calls, a read and a
/// write, and no futex wake-up; `bench gateway` measured +3.5 % on hits, within its noise).
fn serving_threads() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
}

/// Whether the listen address must be on this host when the gateway binds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bind {
    /// It must: a `listen` address the host does not have fails the start.
    LocalAddress,
    /// A floating address of an HA pair (`[ha] floating_addresses`), or every address of a
    /// pair member (the floating ones too): bound before keepalived moves it here
    /// (`IP_FREEBIND`), so a backup answers the moment the address arrives; and
    /// its connections keep sending from it once it is gone again (`IP_TRANSPARENT`: in a
    /// planned handover this host finishes them through second chance, and the kernel routes
    /// nothing from an address the host does not hold otherwise).
    AheadOfFloatingAddress,
}

/// A listening socket on `address` that more sockets may share (`SO_REUSEPORT`).
fn reuseport_listener(address: SocketAddr, bind: Bind) -> std::io::Result<std::net::TcpListener> {
    let socket = if address.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    if bind == Bind::AheadOfFloatingAddress {
        set_ip_option(&socket, libc::IP_FREEBIND)?;
        set_ip_option(&socket, libc::IP_TRANSPARENT)?;
    }
    socket.bind(address)?;
    socket.listen(LISTEN_BACKLOG)?.into_std()
}

/// The gateway's connections as a planned handover drains them: this host gave its address
/// up, and what still reaches it comes through second chance.
pub struct GatewayConnections {
    mode: Arc<watch::Sender<Mode>>,
    admission: Arc<Admission>,
}

impl Connections for GatewayConnections {
    /// Every open connection finishes as at an upgrade (WebSocket clients get 1012), and every
    /// new one after its first answer, while the listeners keep accepting.
    fn drain(&self) {
        self.mode.send_replace(Mode::Draining(StopReason::Handover));
    }

    fn serve_again(&self) {
        self.mode.send_replace(Mode::Serving);
    }

    /// WebSocket sessions included.
    fn open(&self) -> u32 {
        self.admission.open()
    }
}

/// A running gateway. Dropping it does not stop it: call [`Gateway::stop`].
pub struct Gateway {
    address: SocketAddr,
    certificates: Option<Arc<Certificates>>,
    upstream: Arc<Upstream>,
    /// The listening sockets the serving threads accept on (the same sockets, not new ones
    /// on the same port), for an upgrade to hand over.
    listeners: Vec<std::net::TcpListener>,
    mode: Arc<watch::Sender<Mode>>,
    /// The open connections, in all.
    admission: Arc<Admission>,
    /// The serving threads, one per listener.
    serving: Vec<std::thread::JoinHandle<()>>,
    /// Following the view, dropping the links of nodes that left, writing last-used times:
    /// stopped with the server.
    helpers: [JoinHandle<()>; 3],
    /// Follows the nodes' heads and runtime versions for the response cache; stops when dropped.
    follower: ChainFollower,
    /// The remote gateways' relays: they stop when dropped, after the serving threads.
    remotes: Vec<Remote>,
}

impl Gateway {
    /// Loads the certificate and binds `section.listen`.
    pub fn bind(section: &GatewaySection, bind: Bind) -> Result<Bound, GatewayError> {
        let address = section.listen.ok_or(GatewayError::NoListen)?;
        let Prepared {
            certificates,
            service,
            remotes,
        } = Gateway::prepare(section)?;
        let listen_error = |source| GatewayError::Listen { address, source };
        let first = reuseport_listener(address, bind).map_err(listen_error)?;
        // With port 0 the first socket's port is the one the others share.
        let address = first.local_addr().map_err(listen_error)?;
        let mut listeners = vec![first];
        for _ in 1..serving_threads() {
            listeners.push(reuseport_listener(address, bind).map_err(listen_error)?);
        }
        Ok(Bound {
            section: section.clone(),
            listeners,
            address,
            certificates,
            service,
            remotes,
        })
    }

    /// Like [`Gateway::bind`], on the listening sockets of the lb-control this one upgrades
    /// (one per serving thread there): connections waiting in their queues are served here.
    pub fn take_over(
        section: &GatewaySection,
        listeners: Vec<std::net::TcpListener>,
        bind: Bind,
    ) -> Result<Bound, GatewayError> {
        let taken_over = |problem: String| GatewayError::TakenOver(problem);
        let wanted = section.listen.ok_or(GatewayError::NoListen)?;
        let first = listeners
            .first()
            .ok_or_else(|| taken_over("none came".to_owned()))?;
        let address = first
            .local_addr()
            .map_err(|error| taken_over(error.to_string()))?;
        // Port 0 asks for any port: the one the running lb-control got is as good.
        if wanted.ip() != address.ip() || (wanted.port() != 0 && wanted.port() != address.port()) {
            return Err(taken_over(format!(
                "they listen on {address}, the config says {wanted}"
            )));
        }
        // An older lb-control may have made them without it.
        if bind == Bind::AheadOfFloatingAddress {
            for listener in &listeners {
                set_ip_option(listener, libc::IP_TRANSPARENT)
                    .map_err(|source| GatewayError::Listen { address, source })?;
            }
        }
        let Prepared {
            certificates,
            service,
            remotes,
        } = Gateway::prepare(section)?;
        Ok(Bound {
            section: section.clone(),
            listeners,
            address,
            certificates,
            service,
            remotes,
        })
    }

    /// What a start needs besides the sockets: the certificate, the service, the remote
    /// gateways' relays, room for the connections.
    fn prepare(section: &GatewaySection) -> Result<Prepared, GatewayError> {
        let certificates = if section.plain_http {
            None
        } else {
            let (Some(cert), Some(key)) = (&section.tls_cert, &section.tls_key) else {
                return Err(GatewayError::NoCertificate);
            };
            Some(Arc::new(Certificates::load(cert, key)?))
        };
        let service = section.service_key().map_err(GatewayError::Service)?;
        let remotes = section
            .remotes
            .iter()
            .map(|remote| Remote::start(remote.read_files()?, section.upstream_timeout))
            .collect::<Result<Vec<_>, _>>()?;
        admission::raise_open_files_limit(section.max_connections);
        Ok(Prepared {
            certificates,
            service,
            remotes,
        })
    }

    /// Serves on the bound socket until [`Gateway::stop`].
    pub fn start(bound: Bound, context: GatewayContext) -> Result<Gateway, GatewayError> {
        let Bound {
            section,
            listeners,
            address,
            certificates,
            service,
            remotes,
        } = bound;
        if let Some(certificates) = &certificates {
            certificates.report_expiry_to(context.metrics.tls_certificate_expiry.clone());
        }
        let links = Arc::new(Links::new(
            LinkLimits {
                max_links_per_node: section.max_upstream_connections_per_node,
                max_subscriptions_per_link: section.max_subscriptions_per_upstream,
                max_follows_per_link: section.max_follows_per_upstream,
                calls_per_link: CALLS_PER_LINK,
                timeout: section.upstream_timeout,
                idle_timeout: section.upstream_idle_timeout,
                max_message_bytes: NODE_MAX_MESSAGE_BYTES,
            },
            context.metrics.clone(),
        ));
        let upstream = Arc::new(Upstream::new(
            context.maglev_table_size,
            links.clone(),
            section.call_budget(),
            context.metrics.clone(),
        ));
        let remote_nodes: Vec<_> = remotes
            .iter()
            .map(|remote| {
                info!(
                    remote = remote.url(),
                    tier = remote.tier(),
                    node = %remote.endpoint(),
                    "gateway: a remote gateway serves its tier, checked and called as node {} \
                     (its relay)",
                    remote.endpoint()
                );
                context
                    .metrics
                    .remote_info
                    .get_or_create(&RemoteLabels {
                        remote: remote.url().to_owned(),
                        tier: remote.tier().to_string(),
                        node: remote.endpoint().to_string(),
                    })
                    .set(1);
                (remote.endpoint(), remote.tier())
            })
            .collect();
        // The first rotation is in place before the first request.
        upstream.apply(&ViewNodes::of(
            &context.view.borrow(),
            service,
            &RemoteNode::judged(&remote_nodes, &context.health.borrow()),
        ))?;
        let auth = Arc::new(Authenticator::new(&context.keys, context.store));
        let cache = ResponseCache::new(section.cache_bytes);
        let follower = cache::follow(upstream.watch_serving(), cache.clone());
        let failures = section.auth_failures_block.map(|policy| {
            block::FailureTracker::new(policy, section.ipv6_prefix_len, context.blocks)
        });
        let pipeline = Arc::new(Pipeline {
            auth: auth.clone(),
            failures,
            rates: RateLimits::default(),
            policy: MethodPolicy::new(&section.deny, &section.allow),
            upstream: upstream.clone(),
            cache,
            metrics: context.metrics.clone(),
            limits: BodyLimits {
                max_body_bytes: section.max_body_bytes,
                max_batch: section.max_batch,
            },
            websocket: WebSocketLimits {
                max_message_bytes: section.max_body_bytes,
                max_connections_per_key: section.max_connections_per_key,
                max_subscriptions_per_connection: section.max_subscriptions_per_connection,
                max_subscriptions_per_key: section.max_subscriptions_per_key,
                idle_timeout: section.idle_timeout,
            },
            key_connections: Arc::default(),
            key_subscriptions: Arc::default(),
            clients: context.clients,
            links: links.clone(),
            queue_budget: Arc::new(QueueBudget::new(
                section.max_queued_bytes_per_connection,
                section.max_queued_bytes,
            )),
            feeds: follower.feeds(),
        });
        let limits = ConnectionLimits {
            header_timeout: section.header_timeout,
            idle_timeout: section.idle_timeout,
            http2_max_concurrent_streams: section.http2_max_concurrent_streams,
        };
        let admission = Arc::new(Admission::new(
            AdmissionLimits {
                max_connections: section.max_connections,
                max_connections_per_ip: section.max_connections_per_ip,
                ipv6_prefix_len: section.ipv6_prefix_len,
            },
            context.metrics,
        ));
        let (mode, serving_mode) = watch::channel(Mode::Serving);
        // Each listening socket twice (one to serve on, one kept for a handover to a new
        // lb-control), every descriptor above the connections' (see
        // `admission::descriptor_above_connections`: what a crash does to clients that
        // reconnect at once); the descriptors they came with are closed.
        let place = |listener: &std::net::TcpListener| {
            admission::descriptor_above_connections(listener, section.max_connections)
                .map(std::net::TcpListener::from)
                .map_err(|source| GatewayError::Listen { address, source })
        };
        let handover = listeners.iter().map(place).collect::<Result<Vec<_>, _>>()?;
        let listeners = listeners
            .into_iter()
            .map(|listener| place(&listener))
            .collect::<Result<Vec<_>, _>>()?;
        let helpers = [
            tokio::spawn(upstream.clone().follow(
                context.view,
                context.health,
                service,
                remote_nodes,
            )),
            tokio::spawn(links::follow_serving(links, upstream.watch_serving())),
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(stages::auth::TOUCH_INTERVAL);
                loop {
                    tick.tick().await;
                    auth.flush_usage().await;
                }
            }),
        ];
        let mut serving = Vec::with_capacity(listeners.len());
        let seats = ServingSeat::all(listeners.len());
        for (index, (listener, seat)) in listeners.into_iter().zip(seats).enumerate() {
            let serve = server::serve_on(
                listener,
                certificates.clone(),
                pipeline.clone(),
                limits,
                admission.clone(),
                serving_mode.clone(),
                seat,
            );
            let thread = std::thread::Builder::new()
                .name(format!("gateway-{index}"))
                .spawn(serve)
                .map_err(GatewayError::Thread)?;
            serving.push(thread);
        }
        Ok(Gateway {
            address,
            certificates,
            upstream,
            listeners: handover,
            mode: Arc::new(mode),
            admission,
            serving,
            helpers,
            follower,
            remotes,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.address
    }

    /// The listening sockets, for the lb-control that takes over from this one.
    pub fn listeners(&self) -> &[std::net::TcpListener] {
        &self.listeners
    }

    /// Re-reads the certificate files; connections open now keep their certificate.
    pub fn reload_tls(&self) -> Result<(), TlsError> {
        match &self.certificates {
            Some(certificates) => certificates.reload(),
            None => Ok(()),
        }
    }

    /// What it serves from now, for the admin API.
    pub fn state(&self) -> GatewayState {
        GatewayState {
            upstream: self.upstream.clone(),
            remotes: self
                .remotes
                .iter()
                .map(|remote| RemoteEntry {
                    url: remote.url().to_owned(),
                    tier: remote.tier(),
                    node: remote.endpoint(),
                })
                .collect(),
        }
    }

    /// The node a client at `client` is sent to now.
    pub fn node_for(&self, client: std::net::IpAddr) -> Option<SocketAddr> {
        self.upstream.node_for(client)
    }

    /// Its connections, for a planned handover to drain.
    pub fn connections(&self) -> GatewayConnections {
        GatewayConnections {
            mode: self.mode.clone(),
            admission: self.admission.clone(),
        }
    }

    /// Stops accepting, lets open requests finish (a few seconds at most), stops the rest;
    /// WebSocket clients are told `reason`.
    pub async fn stop(self, reason: StopReason) {
        self.mode.send_replace(Mode::Stopped(reason));
        let threads = self.serving;
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await;
        for task in self.helpers {
            task.abort();
        }
        drop(self.follower);
        drop(self.remotes);
    }
}
