//! The nodes behind the gateway: which ones are live, which one a client gets, and the calls
//! made for HTTP clients (and for cache misses) on the nodes' shared WebSocket links
//! ([`super::links`]).
//!
//! A client is kept on one node by a Maglev table over the live nodes (the kernel's
//! `build_table`), indexed by the flow hash of the client's address alone (`client_key`), so
//! its reads see one node's view of the chain. The table is rebuilt whenever the backend set's
//! view (or a remote gateway's health) changes; in it are the `Up` backends and the healthy
//! remote gateways of the best rank (healthy before the "least bad", then the lowest tier), and
//! of those only the ones not saturated (their node refuses new connections: "too many
//! connections") while any is not. A read that fails on its node (connect error, dropped
//! connection, timeout) is sent once to the next node of the table.
//!
//! These calls go over the same links as the WebSocket clients' (not HTTP/1.1 connections of
//! their own): a link carries many calls at once, each write and read of it several, so a miss
//! costs the gateway and the node a frame on an open connection rather than a request of its
//! own (measured in `bench gateway`: misses at 0.84x nginx proxying over pooled HTTP/1.1).
//!
//! A node gets at most `max_upstream_http_calls_per_node` of these calls at once
//! ([`CallBudget`]), whatever the clients send: a call
//! beyond it waits for a place, in the order calls came, up to `upstream_queue_timeout`, then
//! fails as busy ([`UpstreamError::Busy`]). A read its node is too busy for goes to the next node
//! of the table if that one has a place at once (it has waited its turn already); `author_*`
//! calls never go to a second node.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use lb_common::{
    flow::{FAMILY_IPV4, FAMILY_IPV6, FlowKey, flow_hash},
    maglev::{self, MaglevBackend, MaglevError},
};
use prometheus_client::metrics::histogram::Histogram;
use serde_json::value::RawValue;
use thiserror::Error;
use tokio::sync::{Semaphore, SemaphorePermit, watch};
use tracing::{debug, info, warn};

use super::{
    jsonrpc::Outcome,
    links::Links,
    metrics::{GatewayMetrics, UpstreamLabels},
};
use crate::{
    backends::{BackendView, ClusterView, State},
    health::{HealthSnapshot, Target, Verdict},
    methods,
    model::{ServiceKey, Tier},
};

#[derive(Debug, Error)]
pub enum UpstreamError {
    #[error("no node is up")]
    NoNode,
    #[error("node {node}: {reason}")]
    Node { node: SocketAddr, reason: String },
    /// The node had its budget of calls in flight for as long as a call waits.
    #[error("node {node} has {in_flight} calls in flight")]
    Busy { node: SocketAddr, in_flight: u32 },
}

/// How many calls for HTTP clients one node gets at once, and how long a call waits for a
/// place. 48 calls at once keep a node's cores busy; more would only queue inside the node
/// (the connections they ride are bounded by the links' `max_upstream_connections_per_node`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallBudget {
    pub max_calls_per_node: u32,
    pub queue_timeout: Duration,
}

impl Default for CallBudget {
    fn default() -> Self {
        CallBudget {
            max_calls_per_node: 48,
            // Long enough to ride out a burst, short against a client's own timeout (polkadot.js
            // waits 60 s, subxt 30 s): a busy error sooner tells it to back off.
            queue_timeout: Duration::from_secs(1),
        }
    }
}

/// A node the gateway may call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeSpec {
    /// Its JSON-RPC endpoint.
    pub endpoint: SocketAddr,
    pub weight: u32,
}

/// A remote gateway ([`super::remote`]) as the rotation sees it: its relay's endpoint, its
/// tier, and what the health checker last found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteNode {
    pub endpoint: SocketAddr,
    pub tier: Tier,
    /// Not judged unhealthy (a remote not checked yet counts as healthy, as a backend does).
    pub healthy: bool,
    /// It answered "too many connections" (or its site's gateway did).
    pub saturated: bool,
}

impl RemoteNode {
    /// Each of `remotes` (relay endpoint, tier) as the health snapshot judges it.
    pub fn judged(remotes: &[(SocketAddr, Tier)], health: &HealthSnapshot) -> Vec<RemoteNode> {
        remotes
            .iter()
            .map(|&(endpoint, tier)| {
                let node = health.nodes.get(&Target::substrate(endpoint));
                RemoteNode {
                    endpoint,
                    tier,
                    healthy: node.is_none_or(|node| node.verdict != Verdict::Unhealthy),
                    saturated: node.is_some_and(|node| node.saturated),
                }
            })
            .collect()
    }
}

/// A node new clients may go to: an `Up` backend or a healthy remote gateway.
struct Candidate {
    endpoint: SocketAddr,
    weight: u32,
    /// Kept only as the "least bad" of a service with no healthy backend.
    fallback: bool,
    tier: Tier,
    saturated: bool,
}

impl Candidate {
    /// Lower first: healthy nodes before the least bad, then the lower tier.
    fn rank(&self) -> (bool, Tier) {
        (self.fallback, self.tier)
    }
}

fn candidates<'a>(
    view: &'a ClusterView,
    service: Option<ServiceKey>,
    remotes: &'a [RemoteNode],
) -> impl Iterator<Item = Candidate> + 'a {
    let backends = backends_of(view, service)
        .filter(|backend| backend.state == State::Up && backend.backend.def.weight > 0)
        .map(|backend| Candidate {
            endpoint: backend.backend.def.rpc_endpoint(),
            weight: backend.backend.def.weight,
            fallback: backend.fallback,
            tier: backend.backend.def.tier,
            saturated: backend.saturated,
        });
    let remotes = remotes
        .iter()
        .filter(|remote| remote.healthy)
        .map(|remote| Candidate {
            endpoint: remote.endpoint,
            weight: 1,
            fallback: false,
            tier: remote.tier,
            saturated: remote.saturated,
        });
    backends.chain(remotes)
}

/// The live nodes: of the `Up` backends of `service` (of every service when None) and the
/// healthy remote gateways, those of the best rank (the backend set's rule across services:
/// healthy nodes before the "least bad" kept as a fallback, then the lowest tier), once per
/// RPC endpoint (the highest weight wins), ordered by endpoint, and that rank. New clients go
/// to these. Saturated nodes are left out (their new clients go to the next node of their
/// Maglev order), unless every live node is saturated: then nowhere is better, and pooled
/// connections to them may still serve.
fn live_nodes(
    view: &ClusterView,
    service: Option<ServiceKey>,
    remotes: &[RemoteNode],
) -> (Vec<NodeSpec>, Option<(bool, Tier)>) {
    let best = candidates(view, service, remotes)
        .map(|candidate| candidate.rank())
        .min();
    let up: Vec<Candidate> = candidates(view, service, remotes)
        .filter(|candidate| Some(candidate.rank()) == best)
        .collect();
    let any_unsaturated = up.iter().any(|candidate| !candidate.saturated);
    let mut nodes: Vec<NodeSpec> = Vec::new();
    for candidate in up {
        if candidate.saturated && any_unsaturated {
            continue;
        }
        match nodes
            .iter_mut()
            .find(|node| node.endpoint == candidate.endpoint)
        {
            Some(node) => node.weight = node.weight.max(candidate.weight),
            None => nodes.push(NodeSpec {
                endpoint: candidate.endpoint,
                weight: candidate.weight,
            }),
        }
    }
    nodes.sort_by_key(|node| node.endpoint);
    (nodes, best)
}

/// The RPC endpoints that may keep the clients they have: `Up`, `Draining` and `Standby`
/// backends (a draining node, or one of a backup tier while a lower tier serves, takes no new
/// client, and its WebSocket clients stay until it goes down or is disabled) and the healthy
/// remote gateways. Ordered, once each.
fn serving_endpoints(
    view: &ClusterView,
    service: Option<ServiceKey>,
    remotes: &[RemoteNode],
) -> Vec<SocketAddr> {
    let mut endpoints: Vec<SocketAddr> = backends_of(view, service)
        .filter(|backend| backend.state.keeps_connections())
        .map(|backend| backend.backend.def.rpc_endpoint())
        .chain(
            remotes
                .iter()
                .filter(|remote| remote.healthy)
                .map(|remote| remote.endpoint),
        )
        .collect();
    endpoints.sort();
    endpoints.dedup();
    endpoints
}

fn backends_of(
    view: &ClusterView,
    service: Option<ServiceKey>,
) -> impl Iterator<Item = &BackendView> {
    view.services
        .iter()
        .filter(move |entry| service.is_none_or(|key| entry.service.def.key() == key))
        .flat_map(|service| &service.backends)
}

/// What a view (and the remote gateways' health) gives the gateway: the rotation new clients
/// are spread over and its tier, the nodes that may keep the clients they have, and how many
/// of the rotation's nodes are healthy (none when the rotation is the "least bad" kept while
/// no node is).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ViewNodes {
    pub rotation: Vec<NodeSpec>,
    /// The tier of the rotation's nodes; None while it is empty.
    pub tier: Option<Tier>,
    pub serving: Vec<SocketAddr>,
    pub healthy: usize,
}

impl ViewNodes {
    pub fn of(
        view: &ClusterView,
        service: Option<ServiceKey>,
        remotes: &[RemoteNode],
    ) -> ViewNodes {
        let (rotation, rank) = live_nodes(view, service, remotes);
        let healthy = match rank {
            Some((false, _)) => rotation.len(),
            _ => 0,
        };
        ViewNodes {
            rotation,
            tier: rank.map(|(_, tier)| tier),
            serving: serving_endpoints(view, service, remotes),
            healthy,
        }
    }
}

/// The flow-hash key of a client: its address only, IPv4-mapped IPv6 as IPv4.
pub fn client_flow_key(client: IpAddr) -> FlowKey {
    match client.to_canonical() {
        IpAddr::V4(v4) => {
            let mut src = [0; 16];
            src[..4].copy_from_slice(&v4.octets());
            FlowKey::client_key(&src, FAMILY_IPV4)
        }
        IpAddr::V6(v6) => FlowKey::client_key(&v6.octets(), FAMILY_IPV6),
    }
}

/// A live node, its places for calls in flight, and its histogram (looked up once per node,
/// not per call).
struct RotationNode {
    endpoint: SocketAddr,
    calls: Arc<Semaphore>,
    /// Its `lb_gateway_upstream_seconds` histogram.
    seconds: Histogram,
}

/// The live nodes and their Maglev table (entries index `nodes`).
#[derive(Default)]
struct Rotation {
    nodes: Vec<RotationNode>,
    table: Vec<u32>,
}

impl Rotation {
    /// A node that stays from `previous` keeps its places, and with them its calls in flight.
    fn build(
        nodes: &[NodeSpec],
        table_size: u32,
        max_calls_per_node: u32,
        previous: &Rotation,
        metrics: &GatewayMetrics,
    ) -> Result<Rotation, MaglevError> {
        let backends: Vec<MaglevBackend> = nodes
            .iter()
            .zip(0u32..)
            .map(|(node, id)| MaglevBackend {
                id,
                key: MaglevBackend::socket_addr_key(node.endpoint),
                weight: node.weight,
            })
            .collect();
        let table = if nodes.is_empty() {
            Vec::new()
        } else {
            maglev::build_table(&backends, table_size)?
        };
        let nodes = nodes
            .iter()
            .map(|node| {
                let kept = previous
                    .nodes
                    .iter()
                    .find(|kept| kept.endpoint == node.endpoint);
                RotationNode {
                    endpoint: node.endpoint,
                    calls: kept.map_or_else(
                        || Arc::new(Semaphore::new(max_calls_per_node as usize)),
                        |kept| kept.calls.clone(),
                    ),
                    seconds: metrics
                        .upstream_seconds
                        .get_or_create(&UpstreamLabels {
                            node: node.endpoint.to_string(),
                        })
                        .clone(),
                }
            })
            .collect();
        Ok(Rotation { nodes, table })
    }

    /// The client's node, and the node a failed read goes to next (the next other node along
    /// the table, so the retries of one failed node spread over the others).
    fn pick(&self, client: IpAddr) -> Option<(&RotationNode, Option<&RotationNode>)> {
        self.pick_where(client, |_| true)
    }

    /// [`Rotation::pick`] among the nodes that `fit`: the first of them in the client's order
    /// along the table, and the next; the plain pick when none fits.
    fn pick_where(
        &self,
        client: IpAddr,
        fit: impl Fn(SocketAddr) -> bool,
    ) -> Option<(&RotationNode, Option<&RotationNode>)> {
        if self.table.is_empty() {
            return None;
        }
        let slot = flow_hash(&client_flow_key(client)) as usize % self.table.len();
        // Each node once, in the order the table meets it from the client's slot.
        let mut seen = vec![false; self.nodes.len()];
        let order = (0..self.table.len())
            .map(|step| self.table[(slot + step) % self.table.len()] as usize)
            .filter(move |&id| !std::mem::replace(&mut seen[id], true))
            // Stops once every node came (a Maglev table meets them all within a few slots).
            .take(self.nodes.len())
            .map(|id| &self.nodes[id]);
        let mut fitting = order.clone().filter(|node| fit(node.endpoint));
        match fitting.next() {
            Some(first) => Some((first, fitting.next())),
            None => {
                let mut order = order;
                order.next().map(|first| (first, order.next()))
            }
        }
    }
}

/// The upstream side: the rotation, and the calls made on the nodes' links.
pub struct Upstream {
    rotation: ArcSwap<Rotation>,
    /// [`ViewNodes::healthy`] of the rotation in force.
    healthy: AtomicUsize,
    /// [`ViewNodes::tier`] of the rotation in force.
    tier: std::sync::Mutex<Option<Tier>>,
    /// The nodes that may keep clients ([`serving_endpoints`]), for whoever follows them: the
    /// chain follower, and WebSocket sessions bound to a node.
    serving: watch::Sender<Vec<SocketAddr>>,
    table_size: u32,
    links: Arc<Links>,
    budget: CallBudget,
    metrics: Arc<GatewayMetrics>,
}

impl Upstream {
    pub fn new(
        table_size: u32,
        links: Arc<Links>,
        budget: CallBudget,
        metrics: Arc<GatewayMetrics>,
    ) -> Upstream {
        Upstream {
            rotation: ArcSwap::default(),
            healthy: AtomicUsize::new(0),
            tier: std::sync::Mutex::new(None),
            serving: watch::Sender::new(Vec::new()),
            table_size,
            links,
            budget,
            metrics,
        }
    }

    /// Takes a view's nodes. On error (a table too small for them) nothing changes.
    pub fn apply(&self, nodes: &ViewNodes) -> Result<(), MaglevError> {
        let rotation = Rotation::build(
            &nodes.rotation,
            self.table_size,
            self.budget.max_calls_per_node,
            &self.rotation.load(),
            &self.metrics,
        )?;
        self.rotation.store(Arc::new(rotation));
        self.healthy.store(nodes.healthy, Ordering::Relaxed);
        *self.tier.lock().unwrap_or_else(PoisonError::into_inner) = nodes.tier;
        self.metrics
            .serving_tier
            .set(nodes.tier.map_or(-1, i64::from));
        self.serving.send_if_modified(|current| {
            let changed = *current != nodes.serving;
            current.clone_from(&nodes.serving);
            changed
        });
        Ok(())
    }

    /// The nodes that may keep their clients, now and as they change.
    pub fn watch_serving(&self) -> watch::Receiver<Vec<SocketAddr>> {
        self.serving.subscribe()
    }

    /// Keeps the rotation and the serving nodes equal to what the view and the health of the
    /// `remotes` (relay endpoint, tier) give, until the view's sender goes.
    pub async fn follow(
        self: Arc<Self>,
        mut view: watch::Receiver<Arc<ClusterView>>,
        mut health: watch::Receiver<Arc<HealthSnapshot>>,
        service: Option<ServiceKey>,
        remotes: Vec<(SocketAddr, Tier)>,
    ) {
        let mut current = ViewNodes::default();
        // The snapshot judges only the remotes here (the view carries the backends' health):
        // without remotes its changes change nothing.
        let mut follow_health = !remotes.is_empty();
        loop {
            let remotes = RemoteNode::judged(&remotes, &health.borrow_and_update());
            let wanted = ViewNodes::of(&view.borrow_and_update(), service, &remotes);
            if wanted != current {
                match self.apply(&wanted) {
                    Ok(()) => {
                        info!(
                            tier = ?wanted.tier,
                            rotation = ?wanted.rotation.iter().map(|node| node.endpoint).collect::<Vec<_>>(),
                            serving = ?wanted.serving,
                            "gateway nodes updated"
                        );
                        current = wanted;
                    }
                    Err(error) => warn!("gateway rotation unchanged: {error}"),
                }
            }
            tokio::select! {
                changed = view.changed() => if changed.is_err() {
                    return;
                },
                changed = health.changed(), if follow_health => if changed.is_err() {
                    follow_health = false;
                },
            }
        }
    }

    /// The node `client` is sent to now, if any.
    pub fn node_for(&self, client: IpAddr) -> Option<SocketAddr> {
        self.nodes_for(client).map(|(node, _)| node)
    }

    /// The node `client` is sent to now, and the one it goes to when that one fails.
    pub fn nodes_for(&self, client: IpAddr) -> Option<(SocketAddr, Option<SocketAddr>)> {
        self.rotation
            .load()
            .pick(client)
            .map(|(first, second)| (first.endpoint, second.map(|node| node.endpoint)))
    }

    /// How many healthy nodes new clients may go to now (not counting the "least bad" ones
    /// kept while none is healthy).
    pub fn healthy_nodes(&self) -> usize {
        self.healthy.load(Ordering::Relaxed)
    }

    /// The tier new clients go to now; None while no node takes them.
    pub fn serving_tier(&self) -> Option<Tier> {
        *self.tier.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Calls `method` on the client's node, or on the first node in the client's order that
    /// `fits` (a node at the chain's head, for an answer that depends on it); a read that
    /// fails there, or finds no place there in time, goes once to another node.
    pub async fn call(
        &self,
        client: IpAddr,
        method: &str,
        params: Option<&RawValue>,
        fits: impl Fn(SocketAddr) -> bool,
    ) -> Result<Outcome, UpstreamError> {
        // Kept for the call: a node that leaves the rotation meanwhile keeps its places.
        let rotation = self.rotation.load_full();
        let (first, second) = rotation
            .pick_where(client, fits)
            .ok_or(UpstreamError::NoNode)?;
        let error = match self
            .call_node(first, method, params, self.budget.queue_timeout)
            .await
        {
            Ok(outcome) => return Ok(outcome),
            Err(error) => error,
        };
        let Some(second) = second.filter(|_| methods::lookup(method).class.is_retryable()) else {
            return Err(error);
        };
        // A busy node is no fault (and may be every call of a burst): not worth a warning.
        let wait = if matches!(error, UpstreamError::Busy { .. }) {
            debug!(
                "{error}; {method} goes to node {} if it has room",
                second.endpoint
            );
            Duration::ZERO
        } else {
            warn!("{error}; retrying {method} on node {}", second.endpoint);
            self.budget.queue_timeout
        };
        self.count_retry(first.endpoint);
        self.call_node(second, method, params, wait).await
    }

    /// Counts a call or connection moved off `node` after it failed there.
    pub fn count_retry(&self, node: SocketAddr) {
        self.metrics
            .retries
            .get_or_create(&UpstreamLabels {
                node: node.to_string(),
            })
            .inc();
    }

    /// One call to `target` once it has a place for it, waiting up to `wait` for one.
    async fn call_node(
        &self,
        target: &RotationNode,
        method: &str,
        params: Option<&RawValue>,
        wait: Duration,
    ) -> Result<Outcome, UpstreamError> {
        let node = target.endpoint;
        // Held until the answer is in.
        let _place = claim_place(&target.calls, wait)
            .await
            .ok_or(UpstreamError::Busy {
                node,
                in_flight: self.budget.max_calls_per_node,
            })?;
        let failed = |reason: String| UpstreamError::Node { node, reason };
        let link =
            self.links.pool(node).for_call().ok_or_else(|| {
                failed("unreachable: its last connection attempt failed".to_owned())
            })?;
        let started = Instant::now();
        let outcome = link.call(method, params).await.map_err(failed)?;
        target.seconds.observe(started.elapsed().as_secs_f64());
        Ok(outcome)
    }
}

/// A place among a node's calls in flight: at once, or within `wait` in the order the calls
/// came (tokio's semaphore is fair: one that comes later never takes a place first).
async fn claim_place(calls: &Semaphore, wait: Duration) -> Option<SemaphorePermit<'_>> {
    if let Ok(place) = calls.try_acquire() {
        return Some(place);
    }
    if wait.is_zero() {
        return None;
    }
    tokio::time::timeout(wait, calls.acquire()).await.ok()?.ok()
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use prometheus_client::registry::Registry;

    use super::*;
    use crate::{
        backends::ServiceView,
        model::{
            AdminState, Backend, BackendDef, ForwardingMode, HealthCheck, Origin, Protocol,
            Service, ServiceDef,
        },
    };

    /// One service over nodes on ports 1, 2, 3…, each `(state, saturated)`.
    fn view_of(nodes: &[(State, bool)]) -> ClusterView {
        let service = Service {
            id: 1,
            def: ServiceDef {
                vip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)),
                port: 9944,
                protocol: Protocol::Tcp,
                mode: ForwardingMode::Nat,
                check: HealthCheck::Substrate,
            },
            origin: Origin::Config,
        };
        let backends = nodes
            .iter()
            .zip(1..)
            .map(|((state, saturated), port)| BackendView {
                backend: Backend {
                    id: i64::from(port),
                    service: 1,
                    def: BackendDef {
                        address: node(port).endpoint,
                        rpc_port: port,
                        weight: 1,
                        admin: AdminState::Enabled,
                        tier: 0,
                    },
                    origin: Origin::Config,
                },
                state: *state,
                fallback: false,
                saturated: *saturated,
            })
            .collect();
        ClusterView {
            services: vec![ServiceView {
                service,
                name: "192.0.2.10:9944/tcp".to_owned(),
                serving_tier: Some(0),
                backends,
            }],
        }
    }

    #[test]
    fn saturated_nodes_keep_their_clients_and_get_no_new_ones_while_another_node_can() {
        let view = view_of(&[(State::Up, false), (State::Up, true), (State::Up, false)]);
        let nodes = ViewNodes::of(&view, None, &[]);
        assert_eq!(nodes.rotation, vec![node(1), node(3)]);
        assert_eq!(
            nodes.serving,
            vec![node(1).endpoint, node(2).endpoint, node(3).endpoint]
        );

        // Every live node full: none is better than another.
        let view = view_of(&[(State::Up, true), (State::Down, false), (State::Up, true)]);
        assert_eq!(
            ViewNodes::of(&view, None, &[]).rotation,
            vec![node(1), node(3)]
        );
    }

    #[test]
    fn new_clients_go_to_the_lowest_tier_and_healthy_nodes_before_the_least_bad() {
        // Nodes 1 and 2 primaries of one service, 3 a backup up in another service (whose
        // primaries are down), 4 a backup standing by: the primaries take new clients, every
        // node keeps the ones it has.
        let mut view = view_of(&[
            (State::Up, false),
            (State::Up, false),
            (State::Up, false),
            (State::Standby, false),
        ]);
        for backend in &mut view.services[0].backends[2..] {
            backend.backend.def.tier = 1;
        }
        let nodes = ViewNodes::of(&view, None, &[]);
        assert_eq!(nodes.rotation, vec![node(1), node(2)]);
        assert_eq!(nodes.healthy, 2);
        assert_eq!(
            nodes.serving,
            vec![
                node(1).endpoint,
                node(2).endpoint,
                node(3).endpoint,
                node(4).endpoint
            ]
        );

        // The primaries kept only as the least bad: the healthy backup takes the new clients.
        for backend in &mut view.services[0].backends[..2] {
            backend.fallback = true;
        }
        let nodes = ViewNodes::of(&view, None, &[]);
        assert_eq!(nodes.rotation, vec![node(3)]);
        assert_eq!(nodes.healthy, 1);
    }

    #[test]
    fn a_remote_gateway_takes_new_clients_only_while_no_local_node_of_a_lower_tier_is_up() {
        let remote = |healthy| RemoteNode {
            endpoint: node(9).endpoint,
            tier: 2,
            healthy,
            saturated: false,
        };
        // A primary up: the remote keeps what clients it has, gets none new.
        let mut view = view_of(&[(State::Up, false), (State::Standby, false)]);
        view.services[0].backends[1].backend.def.tier = 1;
        let nodes = ViewNodes::of(&view, None, &[remote(true)]);
        assert_eq!((nodes.rotation, nodes.tier), (vec![node(1)], Some(0)));
        assert!(nodes.serving.contains(&node(9).endpoint));

        // Only the least bad left locally: the healthy remote serves, and counts as healthy.
        view.services[0].backends[0].fallback = true;
        view.services[0].backends[1].state = State::Down;
        let nodes = ViewNodes::of(&view, None, &[remote(true)]);
        assert_eq!(
            (nodes.rotation, nodes.tier, nodes.healthy),
            (vec![node(9)], Some(2), 1)
        );

        // The remote unhealthy too: the least bad serve, and nothing counts as healthy; the
        // remote keeps no clients.
        let nodes = ViewNodes::of(&view, None, &[remote(false)]);
        assert_eq!(
            (nodes.rotation, nodes.tier, nodes.healthy),
            (vec![node(1)], Some(0), 0)
        );
        assert!(!nodes.serving.contains(&node(9).endpoint));
    }

    fn node(port: u16) -> NodeSpec {
        NodeSpec {
            endpoint: SocketAddr::from(([127, 0, 0, 1], port)),
            weight: 1,
        }
    }

    fn rotation(nodes: &[NodeSpec]) -> Rotation {
        rotation_after(nodes, &Rotation::default())
    }

    /// A rotation of `nodes` (4 places each) that follows `previous`.
    fn rotation_after(nodes: &[NodeSpec], previous: &Rotation) -> Rotation {
        let metrics = GatewayMetrics::register(&mut Registry::default());
        Rotation::build(nodes, 251, 4, previous, &metrics).unwrap()
    }

    /// The endpoints [`Rotation::pick`] gives `client`.
    fn pick(rotation: &Rotation, client: IpAddr) -> Option<(SocketAddr, Option<SocketAddr>)> {
        rotation
            .pick(client)
            .map(|(first, second)| (first.endpoint, second.map(|node| node.endpoint)))
    }

    #[test]
    fn client_keeps_its_node_and_retries_elsewhere() {
        let rotation = rotation(&[node(1), node(2), node(3)]);
        let client = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));
        let (first, second) = pick(&rotation, client).unwrap();
        assert_eq!(pick(&rotation, client).unwrap().0, first);
        assert_ne!(second, Some(first));
        assert!(second.is_some());
        let mapped = IpAddr::V6(Ipv4Addr::new(192, 0, 2, 7).to_ipv6_mapped());
        assert_eq!(pick(&rotation, mapped).unwrap().0, first);
    }

    #[test]
    fn empty_rotation_has_no_node() {
        let rotation = rotation(&[]);
        assert!(pick(&rotation, IpAddr::V4(Ipv4Addr::LOCALHOST)).is_none());
        let single = self::rotation(&[node(1)]);
        assert_eq!(
            pick(&single, IpAddr::V4(Ipv4Addr::LOCALHOST)),
            Some((node(1).endpoint, None))
        );
    }

    #[test]
    fn a_node_keeps_its_calls_in_flight_across_rotations() {
        let before = rotation(&[node(1), node(2)]);
        let _in_flight = before.nodes[0].calls.try_acquire_many(3).unwrap();
        let after = rotation_after(&[node(1), node(3)], &before);
        assert_eq!(after.nodes[0].endpoint, node(1).endpoint);
        assert_eq!(
            after.nodes[0].calls.available_permits(),
            1,
            "node 1's three calls still count"
        );
        assert_eq!(after.nodes[1].calls.available_permits(), 4, "a new node");
    }

    #[tokio::test]
    async fn a_call_waits_for_a_place_in_turn_and_gives_up_after_its_wait() {
        let calls = Semaphore::new(1);
        let held = claim_place(&calls, Duration::ZERO)
            .await
            .expect("a free place");
        assert!(claim_place(&calls, Duration::ZERO).await.is_none());
        assert!(
            claim_place(&calls, Duration::from_millis(20))
                .await
                .is_none()
        );
        let waiting = claim_place(&calls, Duration::from_secs(10));
        tokio::pin!(waiting);
        assert!(
            tokio::time::timeout(Duration::from_millis(20), waiting.as_mut())
                .await
                .is_err(),
            "no place yet"
        );
        drop(held);
        assert!(
            waiting.await.is_some(),
            "the waiting call takes the freed place"
        );
    }
}
