//! The control API, on its own listener so faults on the RPC port never affect it:
//!
//! - `GET /status` → [`NodeStatus`]
//! - `POST /fault` with a [`Fault`] (`{"fault":"slow","delay_ms":3000}`) adds a fault;
//!   `{"fault":"none"}` clears all → [`NodeStatus`]
//! - `DELETE /fault` clears every fault → [`NodeStatus`]
//! - `DELETE /requests` zeroes the request counts → [`NodeStatus`]
//!
//! [`ControlClient`] is the matching client (used by `sim-node ctl` and by tests).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::routing::{delete, get};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::clock::BlockNumber;
use super::faults::Fault;
use super::state::NodeState;

/// What `GET /status` reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub id: String,
    pub peer_id: String,
    pub rpc_addr: SocketAddr,
    /// The node's best block (after faults).
    pub best: BlockNumber,
    pub finalized: BlockNumber,
    /// The shared chain's best block, what a healthy node would report.
    pub chain_best: BlockNumber,
    pub faults: Vec<Fault>,
    /// JSON-RPC calls that reached the node, per method (batch entries counted one by one;
    /// `/health` counts as `system_health`).
    pub requests: BTreeMap<String, u64>,
    /// JSON-RPC connections open now, and the most open at once since the node started.
    pub connections: usize,
    pub peak_connections: usize,
    /// Of those, WebSockets (connections past their upgrade): open now, and the most at once.
    pub websockets: usize,
    pub peak_websockets: usize,
    /// The chain's schedule: block `n` is made at `genesis_unix_ms + n × block_time_ms` (Unix
    /// ms), when the node announces it; a client on the same machine compares that with when
    /// a head reaches it.
    pub genesis_unix_ms: u64,
    pub block_time_ms: u64,
}

impl NodeStatus {
    pub fn of(node: &NodeState, rpc_addr: SocketAddr) -> Self {
        let heads = node.heads();
        let clock = node.chain.clock();
        Self {
            id: node.id.clone(),
            peer_id: node.peer_id.clone(),
            rpc_addr,
            best: heads.best,
            finalized: heads.finalized,
            chain_best: clock.best_now(),
            faults: node.faults().to_list(),
            requests: node.request_counts(),
            connections: node.connections(),
            peak_connections: node.peak_connections(),
            websockets: node.websockets(),
            peak_websockets: node.peak_websockets(),
            genesis_unix_ms: clock.genesis_unix_ms(),
            block_time_ms: clock.block_time_ms(),
        }
    }

    pub fn total_requests(&self) -> u64 {
        self.requests.values().sum()
    }
}

#[derive(Clone)]
struct ControlContext {
    node: Arc<NodeState>,
    rpc_addr: SocketAddr,
}

/// Serves the control API on `listener` until `shutdown` is cancelled.
pub async fn serve_control(
    listener: TcpListener,
    node: Arc<NodeState>,
    rpc_addr: SocketAddr,
    shutdown: CancellationToken,
) {
    let router = Router::new()
        .route("/status", get(get_status))
        .route("/fault", delete(clear_faults).post(add_fault))
        .route("/requests", delete(reset_requests))
        .with_state(ControlContext {
            node: node.clone(),
            rpc_addr,
        });
    let served = axum::serve(listener, router)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await;
    if let Err(error) = served {
        tracing::warn!(%error, "sim-node {}: control API stopped", node.id);
    }
}

async fn get_status(State(context): State<ControlContext>) -> Json<NodeStatus> {
    Json(NodeStatus::of(&context.node, context.rpc_addr))
}

async fn add_fault(
    State(context): State<ControlContext>,
    Json(fault): Json<Fault>,
) -> Json<NodeStatus> {
    tracing::info!(?fault, "sim-node {}: fault", context.node.id);
    context.node.set_fault(fault);
    Json(NodeStatus::of(&context.node, context.rpc_addr))
}

async fn clear_faults(State(context): State<ControlContext>) -> Json<NodeStatus> {
    context.node.set_fault(Fault::None);
    Json(NodeStatus::of(&context.node, context.rpc_addr))
}

async fn reset_requests(State(context): State<ControlContext>) -> Json<NodeStatus> {
    context.node.reset_request_counts();
    Json(NodeStatus::of(&context.node, context.rpc_addr))
}

#[derive(Debug, thiserror::Error)]
pub enum ControlClientError {
    #[error("control API {url}")]
    Request {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("control API {url}: HTTP {status}: {body}")]
    Refused {
        url: String,
        status: reqwest::StatusCode,
        body: String,
    },
}

/// Client for a sim-node's control API.
#[derive(Debug, Clone)]
pub struct ControlClient {
    base_url: String,
    http: reqwest::Client,
}

impl ControlClient {
    pub fn new(control_addr: SocketAddr) -> Self {
        Self {
            base_url: format!("http://{control_addr}"),
            http: reqwest::Client::new(),
        }
    }

    pub async fn status(&self) -> Result<NodeStatus, ControlClientError> {
        self.send(reqwest::Method::GET, "/status", None).await
    }

    pub async fn set_fault(&self, fault: Fault) -> Result<NodeStatus, ControlClientError> {
        self.send(reqwest::Method::POST, "/fault", Some(fault))
            .await
    }

    pub async fn clear_faults(&self) -> Result<NodeStatus, ControlClientError> {
        self.send(reqwest::Method::DELETE, "/fault", None).await
    }

    pub async fn reset_requests(&self) -> Result<NodeStatus, ControlClientError> {
        self.send(reqwest::Method::DELETE, "/requests", None).await
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        fault: Option<Fault>,
    ) -> Result<NodeStatus, ControlClientError> {
        let url = format!("{}{path}", self.base_url);
        let request_error = |source| ControlClientError::Request {
            url: url.clone(),
            source,
        };
        let mut request = self.http.request(method, &url);
        if let Some(fault) = fault {
            request = request.json(&fault);
        }
        let response = request.send().await.map_err(request_error)?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            return Err(ControlClientError::Refused { url, status, body });
        }
        response.json().await.map_err(request_error)
    }
}
