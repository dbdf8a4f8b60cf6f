//! Prometheus metrics of the control plane. Each module records into the families here; the
//! admin API's `/metrics` encodes the registry (plus the kernel counters, read at scrape time).

use std::sync::atomic::AtomicU64;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, NoLabelSet},
    metrics::{MetricType, counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::store::Store;

/// A backend, as metrics label it: `service="10.200.0.10:9944/tcp", backend="10.200.11.2:9944"`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub service: String,
    pub backend: String,
}

/// A change of a backend's effective state and what caused it (`api`, `health`, `config`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransitionLabels {
    pub service: String,
    pub backend: String,
    pub to: String,
    pub cause: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub service: String,
}

/// A node's RPC endpoint, as the health checker sees it.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabels {
    pub node: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CheckLabels {
    pub node: String,
    /// `ok`, or why the check failed: `unreachable`, `timeout`, `syncing`, `no_peers`, `lagging`,
    /// `stalled`, `bad_answer`; `saturated` when the node refused a new connection with "too
    /// many connections" and the checker held none to ask it on.
    pub result: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdminRequestLabels {
    pub method: String,
    /// The route's template (`/v1/backends/{id}`), not the concrete path.
    pub route: String,
    pub status: u16,
}

/// This lb-control's role in an HA pair: `standalone`, `master`, `backup` or `fault`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoleLabels {
    pub role: String,
}

/// Every metric family of the control plane, registered once.
#[derive(Debug)]
pub struct Metrics {
    /// 1 for a backend in the kernel's Maglev table (gets new flows), else 0.
    pub backend_in_rotation: Family<BackendLabels, Gauge>,
    pub backend_transitions: Family<TransitionLabels, Counter>,
    /// Changes applied to the backend set (each recomputes Maglev and pushes to the kernel).
    pub backend_set_changes: Counter,
    /// 1 while every backend of the service is unhealthy and the least-bad ones are kept.
    pub service_fallback: Family<ServiceLabels, Gauge>,
    /// The tier new flows of the service go to (0 = its primaries); -1 while none is in
    /// rotation.
    pub service_serving_tier: Family<ServiceLabels, Gauge>,
    pub health_checks: Family<CheckLabels, Counter>,
    pub health_check_seconds: Family<NodeLabels, Histogram>,
    pub node_best_block: Family<NodeLabels, Gauge>,
    pub node_finalized_block: Family<NodeLabels, Gauge>,
    pub node_lag_blocks: Family<NodeLabels, Gauge>,
    /// 1 while the node refuses new connections with "too many connections".
    pub node_saturated: Family<NodeLabels, Gauge>,
    pub admin_requests: Family<AdminRequestLabels, Counter>,
    /// Source prefixes on the kernel blocklist (kept by its owner, the blocklist handle).
    pub blocklist_entries: Gauge,
    /// 1 for the role this lb-control has now, 0 for the others.
    pub ha_role: Family<RoleLabels, Gauge>,
    /// Flows (new, changed or ended) the master sent to the backup.
    pub ha_flows_sent: Counter,
    /// Flows (new, changed or ended) the backup received in authenticated batches.
    pub ha_flows_received: Counter,
    /// Flows the backup wrote into its flow table.
    pub ha_flows_installed: Counter,
    /// 1 while the flow sync's link to the other host is up.
    pub ha_flow_sync_connected: Gauge,
    /// When the last batch was sent (master) or installed (backup), as Unix seconds: its age
    /// is `time() - lb_ha_flow_sync_last_success_timestamp_seconds`.
    pub ha_flow_sync_last_success: Gauge<f64, AtomicU64>,
}

impl Metrics {
    /// Creates the families and registers them in `registry` under the `lb` prefix.
    pub fn register(registry: &mut Registry) -> Metrics {
        let metrics = Metrics {
            backend_in_rotation: Family::default(),
            backend_transitions: Family::default(),
            backend_set_changes: Counter::default(),
            service_fallback: Family::default(),
            service_serving_tier: Family::default(),
            health_checks: Family::default(),
            health_check_seconds: Family::new_with_constructor(|| {
                Histogram::new([
                    0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                ])
            }),
            node_best_block: Family::default(),
            node_finalized_block: Family::default(),
            node_lag_blocks: Family::default(),
            node_saturated: Family::default(),
            admin_requests: Family::default(),
            blocklist_entries: Gauge::default(),
            ha_role: Family::default(),
            ha_flows_sent: Counter::default(),
            ha_flows_received: Counter::default(),
            ha_flows_installed: Counter::default(),
            ha_flow_sync_connected: Gauge::default(),
            ha_flow_sync_last_success: Gauge::default(),
        };
        let registry = registry.sub_registry_with_prefix("lb");
        registry.register(
            "backend_in_rotation",
            "1 when the backend is in its service's Maglev table (gets new flows)",
            metrics.backend_in_rotation.clone(),
        );
        registry.register(
            "backend_transitions",
            "Changes of a backend's effective state, by new state and cause",
            metrics.backend_transitions.clone(),
        );
        registry.register(
            "backend_set_changes",
            "Changes applied to the backend set and pushed to the kernel",
            metrics.backend_set_changes.clone(),
        );
        registry.register(
            "service_fallback",
            "1 while every backend of the service is unhealthy and the least-bad ones are kept in rotation",
            metrics.service_fallback.clone(),
        );
        registry.register(
            "service_serving_tier",
            "The tier new flows of the service go to: the lowest with a backend up (0 = primaries); -1 while none is",
            metrics.service_serving_tier.clone(),
        );
        registry.register(
            "health_checks",
            "Health checks by node and result",
            metrics.health_checks.clone(),
        );
        registry.register(
            "health_check_duration_seconds",
            "Time a health check took, connect included",
            metrics.health_check_seconds.clone(),
        );
        registry.register(
            "node_best_block",
            "The node's best block number at its last check",
            metrics.node_best_block.clone(),
        );
        registry.register(
            "node_finalized_block",
            "The node's finalized block number at its last check",
            metrics.node_finalized_block.clone(),
        );
        registry.register(
            "node_lag_blocks",
            "Blocks the node's best block is behind the cluster's best",
            metrics.node_lag_blocks.clone(),
        );
        registry.register(
            "node_saturated",
            "1 while the node refuses new connections with \"too many connections\" (HTTP 429): it keeps its clients and gets no new gateway clients",
            metrics.node_saturated.clone(),
        );
        registry.register(
            "admin_requests",
            "Admin API requests by method, route and status",
            metrics.admin_requests.clone(),
        );
        registry.register(
            "blocklist_entries",
            "Source prefixes on the kernel blocklist",
            metrics.blocklist_entries.clone(),
        );
        registry.register(
            "ha_role",
            "1 for this lb-control's role in its HA pair (standalone, master, backup, fault)",
            metrics.ha_role.clone(),
        );
        registry.register(
            "ha_flows_sent",
            "L4 flows (new, changed or ended) the master sent to the backup",
            metrics.ha_flows_sent.clone(),
        );
        registry.register(
            "ha_flows_received",
            "L4 flows (new, changed or ended) the backup received in authenticated batches",
            metrics.ha_flows_received.clone(),
        );
        registry.register(
            "ha_flows_installed",
            "L4 flows the backup wrote into its flow table",
            metrics.ha_flows_installed.clone(),
        );
        registry.register(
            "ha_flow_sync_connected",
            "1 while the flow sync's link to the other host is up",
            metrics.ha_flow_sync_connected.clone(),
        );
        registry.register(
            "ha_flow_sync_last_success_timestamp_seconds",
            "When the last flow batch was sent (master) or installed (backup)",
            metrics.ha_flow_sync_last_success.clone(),
        );
        metrics
    }
}

/// The state store's calls (`lb_store_calls_total{kind="read"|"write"}`), read from the store's
/// own counters at scrape time: an operator sees whether anything on the request path (a
/// flood of made-up API keys, say) reaches the store.
pub struct StoreCallsCollector(pub Store);

impl std::fmt::Debug for StoreCallsCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("StoreCallsCollector")
            .field(&self.0.location())
            .finish()
    }
}

impl Collector for StoreCallsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let calls = self.0.calls();
        let mut family = encoder.encode_descriptor(
            "store_calls",
            "Calls to the state store (SQLite or etcd), by kind: read, or write (a transaction)",
            None,
            MetricType::Counter,
        )?;
        for (kind, count) in [("read", calls.reads), ("write", calls.writes)] {
            family
                .encode_family(&[("kind", kind)])?
                .encode_counter::<NoLabelSet, _, u64>(&count, None)?;
        }
        Ok(())
    }
}
