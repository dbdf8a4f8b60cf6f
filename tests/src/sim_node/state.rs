//! What one node knows and reports: its identity, its view of the chain under the current
//! faults, and how many requests of each method reached it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::chain::Chain;
use super::clock::BlockNumber;
use super::faults::{ActiveFaults, Fault};
use super::identity::local_peer_id;
use super::primitives::Hash32;
use super::runtime::Runtime;
use super::storage::Storage;

/// `system_health` result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Health {
    pub peers: u32,
    pub is_syncing: bool,
    pub should_have_peers: bool,
}

/// The node's best and finalized block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Heads {
    pub best: BlockNumber,
    pub finalized: BlockNumber,
}

pub struct NodeState {
    pub id: String,
    pub peer_id: String,
    pub chain: Chain,
    pub runtime: Runtime,
    pub storage: Storage,
    /// Blocks between best and finalized.
    finality_lag: BlockNumber,
    /// Peers reported while the `no_peers` fault is off.
    peers: u32,
    faults: watch::Sender<ActiveFaults>,
    /// Updated by the block ticker whenever the best or finalized block moves.
    heads: watch::Sender<Heads>,
    requests: Mutex<BTreeMap<String, u64>>,
    /// JSON-RPC connections (HTTP and WebSocket) open now, and the most open at once.
    connections: AtomicUsize,
    peak_connections: AtomicUsize,
    /// Calls being answered now (a batch counts once: it is one request).
    in_flight: AtomicU64,
    /// The most calls answered at once since the start or the last reset of the counts.
    most_in_flight: AtomicU64,
    /// The same per method (a batch counts under "batch"): a test's own calls, apart from
    /// what the gateway's chain follower and health checker ask meanwhile.
    in_flight_by_method: Mutex<BTreeMap<String, InFlight>>,
    /// Of those, the upgraded ones (WebSockets).
    websockets: AtomicUsize,
    peak_websockets: AtomicUsize,
}

/// One open JSON-RPC connection, counted while it lives, and as a WebSocket too once upgraded.
pub struct OpenConnection {
    node: Arc<NodeState>,
    websocket: AtomicBool,
}

impl OpenConnection {
    /// Counts the connection as a WebSocket as well (once), until it closes.
    pub fn mark_websocket(&self) {
        if !self.websocket.swap(true, Ordering::Relaxed) {
            let open = self.node.websockets.fetch_add(1, Ordering::Relaxed) + 1;
            self.node.peak_websockets.fetch_max(open, Ordering::Relaxed);
        }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.node.connections.fetch_sub(1, Ordering::Relaxed);
        if self.websocket.load(Ordering::Relaxed) {
            self.node.websockets.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// One call being answered; it ends when dropped.
pub struct CallInFlight<'a> {
    node: &'a NodeState,
    method: String,
}

impl Drop for CallInFlight<'_> {
    fn drop(&mut self) {
        self.node.in_flight.fetch_sub(1, Ordering::SeqCst);
        if let Some(calls) = self.node.by_method().get_mut(&self.method) {
            calls.now -= 1;
        }
    }
}

/// Calls of one method being answered now, and the most at once.
#[derive(Debug, Clone, Copy, Default)]
struct InFlight {
    now: u64,
    most: u64,
}

impl NodeState {
    pub fn new(
        id: String,
        chain: Chain,
        runtime: Runtime,
        finality_lag: BlockNumber,
        peers: u32,
    ) -> Self {
        let peer_id = local_peer_id(&id);
        let storage = Storage::new(*chain.clock(), runtime.code());
        let state = Self {
            id,
            peer_id,
            chain,
            runtime,
            storage,
            finality_lag,
            peers,
            faults: watch::Sender::new(ActiveFaults::default()),
            heads: watch::Sender::new(Heads::default()),
            requests: Mutex::new(BTreeMap::new()),
            connections: AtomicUsize::new(0),
            peak_connections: AtomicUsize::new(0),
            in_flight: AtomicU64::new(0),
            most_in_flight: AtomicU64::new(0),
            in_flight_by_method: Mutex::default(),
            websockets: AtomicUsize::new(0),
            peak_websockets: AtomicUsize::new(0),
        };
        state.refresh_heads();
        state
    }

    pub fn faults(&self) -> ActiveFaults {
        self.faults.borrow().clone()
    }

    pub fn subscribe_faults(&self) -> watch::Receiver<ActiveFaults> {
        self.faults.subscribe()
    }

    pub fn set_fault(&self, fault: Fault) {
        let chain_best = self.chain.clock().best_now();
        self.faults
            .send_modify(|faults| faults.apply(fault, chain_best));
        self.refresh_heads();
    }

    /// The node's heads now, computed from the clock (not the ticker's last update).
    pub fn heads(&self) -> Heads {
        let best = self
            .faults
            .borrow()
            .node_best(self.chain.clock().best_now());
        Heads {
            best,
            finalized: best.saturating_sub(self.finality_lag),
        }
    }

    /// Publishes the current heads to subscribers if they moved.
    pub fn refresh_heads(&self) {
        let heads = self.heads();
        self.heads.send_if_modified(|published| {
            let changed = *published != heads;
            *published = heads;
            changed
        });
    }

    pub fn subscribe_heads(&self) -> watch::Receiver<Heads> {
        self.heads.subscribe()
    }

    pub fn health(&self) -> Health {
        let faults = self.faults.borrow();
        Health {
            peers: if faults.no_peers { 0 } else { self.peers },
            is_syncing: faults.syncing,
            should_have_peers: true,
        }
    }

    /// The block a `[hash]` argument names: the best block when absent, `None` when the hash
    /// is not a block this node has (unknown, or above its best).
    pub fn resolve_block(&self, hash: Option<Hash32>) -> Option<BlockNumber> {
        let best = self.heads().best;
        match hash {
            None => Some(best),
            Some(hash) => self.chain.block_number_of(&hash, best),
        }
    }

    pub fn record_request(&self, method: &str) {
        let mut requests = self
            .requests
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *requests.entry(method.to_owned()).or_default() += 1;
    }

    /// Counts a call in flight until the returned guard drops.
    pub fn start_call(&self, method: &str) -> CallInFlight<'_> {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_in_flight.fetch_max(now, Ordering::SeqCst);
        let mut by_method = self.by_method();
        let calls = by_method.entry(method.to_owned()).or_default();
        calls.now += 1;
        calls.most = calls.most.max(calls.now);
        CallInFlight {
            node: self,
            method: method.to_owned(),
        }
    }

    pub fn most_calls_in_flight(&self) -> u64 {
        self.most_in_flight.load(Ordering::SeqCst)
    }

    /// The most calls of `method` answered at once.
    pub fn most_calls_in_flight_of(&self, method: &str) -> u64 {
        self.by_method().get(method).map_or(0, |calls| calls.most)
    }

    fn by_method(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, InFlight>> {
        self.in_flight_by_method
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn request_counts(&self) -> BTreeMap<String, u64> {
        self.requests
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Counts a connection the node accepted until the returned guard drops.
    pub fn open_connection(self: &Arc<Self>) -> OpenConnection {
        let open = self.connections.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak_connections.fetch_max(open, Ordering::Relaxed);
        OpenConnection {
            node: self.clone(),
            websocket: AtomicBool::new(false),
        }
    }

    /// JSON-RPC connections open now.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// The most JSON-RPC connections open at once since the node started.
    pub fn peak_connections(&self) -> usize {
        self.peak_connections.load(Ordering::Relaxed)
    }

    /// WebSocket connections open now.
    pub fn websockets(&self) -> usize {
        self.websockets.load(Ordering::Relaxed)
    }

    /// The most WebSocket connections open at once since the node started.
    pub fn peak_websockets(&self) -> usize {
        self.peak_websockets.load(Ordering::Relaxed)
    }

    pub fn reset_request_counts(&self) {
        self.requests
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clear();
        self.most_in_flight
            .store(self.in_flight.load(Ordering::SeqCst), Ordering::SeqCst);
        for calls in self.by_method().values_mut() {
            calls.most = calls.now;
        }
    }
}
