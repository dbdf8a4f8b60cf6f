//! sim-node: a simulated Polkadot (Substrate) node that starts in milliseconds.
//!
//! It serves the Substrate JSON-RPC that the gateway, the health checker and real clients
//! (polkadot.js) use, over HTTP and WebSocket on one port (jsonrpsee, as Substrate itself),
//! with real runtime metadata, a chain that grows one block per `block_time`, and faults that
//! a test switches at run time ([`Fault`]) through [`SimNodeHandle`] or the control API.
//!
//! ```no_run
//! # async fn example() -> Result<(), lb_tests::sim_node::SimNodeError> {
//! use std::time::Duration;
//! use lb_tests::sim_node::{Fault, SimNode, SimNodeConfig};
//!
//! let mut config = SimNodeConfig::new("node0");
//! config.block_time = Duration::from_millis(100);
//! let node = SimNode::start(config).await?;
//! println!("JSON-RPC on {}", node.ws_url());
//! node.set_fault(Fault::Slow { delay_ms: 3000 });
//! node.stop().await;
//! # Ok(())
//! # }
//! ```
//!
//! It speaks both the legacy API and the new JSON-RPC spec (`chainSpec_v1_*`, `chainHead_v1_*`,
//! `transaction_v1_*`, `transactionWatch_v1_*`) as a Substrate node does, with Substrate's
//! limits: 100 connections, 1024 subscriptions per connection, and the chainHead limits of
//! [`ChainHeadLimits`].
//!
//! Modules: `clock` (block numbers from the time), `chain` (blocks and their hashes), `runtime` (metadata and runtime calls),
//! `storage` (what storage holds), `rpc` (the legacy methods and `chainSpec_v1_*`),
//! `chain_head` (`chainHead_v1_*`), `transaction` (`transaction_v1_*`,
//! `transactionWatch_v1_*`), `rpc_errors` (every error), `rpc_middleware` (counts and faults),
//! `http_service` (`/health`, `x-sim-node`), `server` (listener), [`control`] (control API and
//! client), [`faults`].

mod chain;
mod chain_head;
mod clock;
pub mod control;
pub mod faults;
mod http_service;
mod identity;
mod primitives;
mod rpc;
mod rpc_errors;
mod rpc_middleware;
mod runtime;
mod scale;
mod server;
mod state;
mod storage;
mod transaction;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper::header::HeaderValue;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use chain::{Header, SignedBlock};
pub use chain_head::ChainHeadLimits;
pub use clock::{BlockNumber, DEFAULT_GENESIS_UNIX_MS};
pub use control::{ControlClient, ControlClientError, NodeStatus};
pub use faults::Fault;
pub use http_service::NODE_ID_HEADER;
pub use primitives::Hash32;

use chain::Chain;
use clock::ChainClock;
use state::NodeState;

/// How a node is set up.
#[derive(Debug, Clone)]
pub struct SimNodeConfig {
    /// The node's name: sent as the `x-sim-node` response header, seeds `system_localPeerId`.
    /// Visible ASCII, at most 64 characters.
    pub id: String,
    /// JSON-RPC (HTTP and WebSocket) listen address; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Control API listen address, if any.
    pub control_listen: Option<SocketAddr>,
    /// One block per `block_time` (at least 1 ms).
    pub block_time: Duration,
    /// When block 0 was made. Nodes with the same genesis and block time serve the same chain.
    pub genesis: SystemTime,
    /// How far the finalized block trails the best block.
    pub finality_lag: BlockNumber,
    /// Peers reported by `system_health` when the `no_peers` fault is off.
    pub peers: u32,
    /// chainHead limits (pinned blocks, operations, follows per connection); Substrate's by
    /// default.
    pub chain_head: ChainHeadLimits,
}

impl SimNodeConfig {
    /// Defaults: 127.0.0.1, free port, no control API, 6 s blocks, the fixed default genesis,
    /// finalized 2 blocks behind best, 8 peers, Substrate's chainHead limits.
    pub fn new(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            control_listen: None,
            block_time: Duration::from_secs(6),
            genesis: UNIX_EPOCH + Duration::from_millis(DEFAULT_GENESIS_UNIX_MS),
            finality_lag: 2,
            peers: 8,
            chain_head: ChainHeadLimits::default(),
        }
    }

    /// Every problem with the config at once.
    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let id_ok = !self.id.is_empty()
            && self.id.len() <= 64
            && self.id.bytes().all(|b| b.is_ascii_graphic());
        if !id_ok {
            problems.push(format!(
                "id {:?}: must be 1 to 64 visible ASCII characters (it is sent as an HTTP header)",
                self.id
            ));
        }
        if self.block_time < Duration::from_millis(1) {
            problems.push(format!(
                "block_time {:?}: must be at least 1 ms",
                self.block_time
            ));
        }
        problems
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SimNodeError {
    #[error("sim-node {id}: invalid config: {}", problems.join("; "))]
    InvalidConfig { id: String, problems: Vec<String> },
    #[error("sim-node {id}: binding the JSON-RPC listener on {addr}")]
    BindRpc {
        id: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("sim-node {id}: binding the control listener on {addr}")]
    BindControl {
        id: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("sim-node {id}: loading the runtime")]
    Runtime {
        id: String,
        #[source]
        source: runtime::RuntimeFixtureError,
    },
    #[error("sim-node {id}: building the JSON-RPC module")]
    Rpc {
        id: String,
        #[source]
        source: rpc::RegisterError,
    },
}

/// Starts nodes.
pub struct SimNode;

impl SimNode {
    /// Binds the listeners and starts serving; returns once the node accepts connections.
    pub async fn start(config: SimNodeConfig) -> Result<SimNodeHandle, SimNodeError> {
        let id = config.id.clone();
        let problems = config.problems();
        if !problems.is_empty() {
            return Err(SimNodeError::InvalidConfig { id, problems });
        }
        let node_id_header =
            HeaderValue::from_str(&config.id).map_err(|_| SimNodeError::InvalidConfig {
                id: id.clone(),
                problems: vec!["id is not a valid HTTP header value".into()],
            })?;
        let runtime = runtime::Runtime::load().map_err(|source| SimNodeError::Runtime {
            id: id.clone(),
            source,
        })?;
        let chain = Chain::new(ChainClock::new(config.genesis, config.block_time));
        let node = Arc::new(NodeState::new(
            id.clone(),
            chain,
            runtime,
            config.finality_lag,
            config.peers,
        ));
        let module =
            rpc::build_module(node.clone(), config.chain_head.clone()).map_err(|source| {
                SimNodeError::Rpc {
                    id: id.clone(),
                    source,
                }
            })?;

        let bind_rpc = |source| SimNodeError::BindRpc {
            id: id.clone(),
            addr: config.listen,
            source,
        };
        let rpc_listener = TcpListener::bind(config.listen).await.map_err(bind_rpc)?;
        let rpc_addr = rpc_listener.local_addr().map_err(bind_rpc)?;
        let control_listener = match config.control_listen {
            None => None,
            Some(addr) => {
                let bind_control = |source| SimNodeError::BindControl {
                    id: id.clone(),
                    addr,
                    source,
                };
                let listener = TcpListener::bind(addr).await.map_err(bind_control)?;
                let local = listener.local_addr().map_err(bind_control)?;
                Some((listener, local))
            }
        };

        let shutdown = CancellationToken::new();
        let mut tasks = JoinSet::new();
        tasks.spawn(server::serve_rpc(
            rpc_listener,
            node.clone(),
            module,
            node_id_header,
            shutdown.clone(),
        ));
        tasks.spawn(advance_heads(node.clone(), shutdown.clone()));
        tasks.spawn(stop_on_exit_fault(node.clone(), shutdown.clone()));
        let control_addr = control_listener.map(|(listener, addr)| {
            tasks.spawn(control::serve_control(
                listener,
                node.clone(),
                rpc_addr,
                shutdown.clone(),
            ));
            addr
        });
        Ok(SimNodeHandle {
            node,
            rpc_addr,
            control_addr,
            shutdown,
            tasks,
        })
    }
}

/// Publishes the node's heads at every block boundary and whenever a fault changes them.
async fn advance_heads(node: Arc<NodeState>, shutdown: CancellationToken) {
    let mut faults = node.subscribe_faults();
    loop {
        let until_next = node.chain.clock().until_next_block(SystemTime::now());
        tokio::select! {
            () = shutdown.cancelled() => return,
            // A little past the boundary, so the clock reads the new block.
            () = tokio::time::sleep(until_next + Duration::from_micros(200)) => {}
            changed = faults.changed() => if changed.is_err() { return },
        }
        node.refresh_heads();
    }
}

/// The `exit` fault stops the whole node.
async fn stop_on_exit_fault(node: Arc<NodeState>, shutdown: CancellationToken) {
    let mut faults = node.subscribe_faults();
    tokio::select! {
        () = shutdown.cancelled() => {}
        exit = faults.wait_for(|faults| faults.exit) => {
            if exit.is_ok() {
                tracing::info!("sim-node {}: exit fault, stopping", node.id);
                shutdown.cancel();
            }
        }
    }
}

/// A running node. Dropping it stops the node (without waiting); [`SimNodeHandle::stop`]
/// stops it and waits until the listeners are closed.
pub struct SimNodeHandle {
    node: Arc<NodeState>,
    rpc_addr: SocketAddr,
    control_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
}

impl SimNodeHandle {
    pub fn id(&self) -> &str {
        &self.node.id
    }

    /// The JSON-RPC address (HTTP and WebSocket).
    pub fn rpc_addr(&self) -> SocketAddr {
        self.rpc_addr
    }

    pub fn http_url(&self) -> String {
        format!("http://{}", self.rpc_addr)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}", self.rpc_addr)
    }

    pub fn control_addr(&self) -> Option<SocketAddr> {
        self.control_addr
    }

    /// `system_localPeerId`.
    pub fn peer_id(&self) -> &str {
        &self.node.peer_id
    }

    /// Adds a fault ([`Fault::None`] clears all).
    pub fn set_fault(&self, fault: Fault) {
        self.node.set_fault(fault);
    }

    pub fn clear_faults(&self) {
        self.node.set_fault(Fault::None);
    }

    pub fn faults(&self) -> Vec<Fault> {
        self.node.faults().to_list()
    }

    /// Calls of `method` that reached the node.
    pub fn request_count(&self, method: &str) -> u64 {
        self.node.request_counts().get(method).copied().unwrap_or(0)
    }

    /// Calls of any method that reached the node.
    pub fn total_requests(&self) -> u64 {
        self.node.request_counts().values().sum()
    }

    pub fn request_counts(&self) -> BTreeMap<String, u64> {
        self.node.request_counts()
    }

    /// Zeroes the request counts, and the most calls in flight to those in flight now.
    pub fn reset_request_counts(&self) {
        self.node.reset_request_counts();
    }

    /// JSON-RPC connections (HTTP and WebSocket) open at the node now.
    pub fn connections(&self) -> usize {
        self.node.connections()
    }

    /// The most JSON-RPC connections open at the node at once since it started.
    pub fn peak_connections(&self) -> usize {
        self.node.peak_connections()
    }

    /// The most JSON-RPC calls the node was answering at once (a batch counts once), since
    /// the start or the last [`SimNodeHandle::reset_request_counts`].
    pub fn most_calls_in_flight(&self) -> u64 {
        self.node.most_calls_in_flight()
    }

    /// The most calls of `method` answered at once (the gateway's own background calls, its
    /// chain follower's, are other methods).
    pub fn most_calls_in_flight_of(&self, method: &str) -> u64 {
        self.node.most_calls_in_flight_of(method)
    }

    /// WebSocket connections open at the node now (a part of [`SimNodeHandle::connections`]).
    pub fn websockets(&self) -> usize {
        self.node.websockets()
    }

    /// The most WebSocket connections open at the node at once since it started.
    pub fn peak_websockets(&self) -> usize {
        self.node.peak_websockets()
    }

    /// The node's best block (after faults).
    pub fn best_number(&self) -> BlockNumber {
        self.node.heads().best
    }

    pub fn finalized_number(&self) -> BlockNumber {
        self.node.heads().finalized
    }

    /// The shared chain's best block: what a healthy node reports now.
    pub fn chain_best_number(&self) -> BlockNumber {
        self.node.chain.clock().best_now()
    }

    /// The hash of block `number` on this node's chain (the same on every node with the same
    /// genesis and block time).
    pub fn block_hash(&self, number: BlockNumber) -> Hash32 {
        self.node.chain.block_hash(number)
    }

    pub fn status(&self) -> NodeStatus {
        NodeStatus::of(&self.node, self.rpc_addr)
    }

    pub fn is_stopped(&self) -> bool {
        self.shutdown.is_cancelled()
    }

    /// Resolves when the node stops (an `exit` fault, or [`SimNodeHandle::stop`]) and its
    /// tasks have finished.
    pub async fn stopped(&mut self) {
        self.shutdown.cancelled().await;
        while self.tasks.join_next().await.is_some() {}
    }

    /// Stops the node: closes the listeners and every connection, and waits for that.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

impl Drop for SimNodeHandle {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
