//! The gateway's metric families, registered beside the control plane's under `lb_gateway_`.

use std::sync::atomic::AtomicU64;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

/// A call by its method class (`read`, `author`) and what became of it: `ok`, `error` (the
/// node's JSON-RPC error), `refused` (method policy), `invalid`, `upstream_failed`, `busy` (no
/// place at its node in time).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    // Static: the labels of every call are looked up on the hot path, without allocating.
    pub class: &'static str,
    pub outcome: &'static str,
}

/// `missing`, `unknown` (or revoked), `store` (the store could not be read).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthFailureLabels {
    pub reason: String,
}

/// A node's RPC endpoint.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub node: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectedLabels {
    /// `body_too_big`, `batch_too_big`, `parse_error`, `invalid_request`, `method_not_allowed`,
    /// `connection_limit` (connections of one client), `total_connection_limit` (connections
    /// of the gateway), `key_connection_limit` (WebSocket connections of one key),
    /// `subscription_limit`, `no_node`, `auth_failures_blocked` (a source address sent to the
    /// blocklist).
    pub reason: String,
}

#[derive(Debug)]
pub struct GatewayMetrics {
    pub calls: Family<CallLabels, Counter>,
    pub auth_failures: Family<AuthFailureLabels, Counter>,
    pub rate_limited: Counter,
    pub rejected: Family<RejectedLabels, Counter>,
    pub upstream_seconds: Family<UpstreamLabels, Histogram>,
    /// Calls sent to a second node after `node` failed them or had no place for them.
    pub retries: Family<UpstreamLabels, Counter>,
    /// Calls answered "upstream busy": `node` (the last one tried) had its budget of calls in
    /// flight for as long as a call waits.
    pub upstream_busy: Family<UpstreamLabels, Counter>,
    /// Response cache lookups by result: `hit`, `miss`, `coalesced` (shared another caller's
    /// upstream call), `uncacheable`.
    pub cache_lookups: Family<CacheLabels, Counter>,
    pub cache_bytes: Gauge,
    pub cache_entries: Gauge,
    /// Open client connections, HTTP and WebSocket.
    pub connections: Gauge,
    /// Open WebSocket connections.
    pub websocket_sessions: Gauge,
    /// WebSocket connections ended, by who or what ended them.
    pub websocket_closed: Family<ClosedLabels, Counter>,
    /// Head subscriptions served from the shared per-node feeds.
    pub shared_subscriptions: Gauge,
    /// From the chain follower receiving a node's head (or runtime version) to its notification
    /// written to a subscribed client: how far behind the fan-out to the clients runs.
    pub feed_delivery_seconds: Histogram,
    /// Open upstream WebSocket connections (links) per node, which client sessions share.
    pub upstream_links: Family<UpstreamLabels, Gauge>,
    /// Upstream links that failed (connect, send, receive, closed by the node).
    pub upstream_link_failures: Family<UpstreamLabels, Counter>,
    /// Client subscriptions held on a node's links.
    pub upstream_subscriptions: Family<UpstreamLabels, Gauge>,
    /// Bytes of answers and notifications waiting for WebSocket clients to read them.
    pub queued_bytes: Gauge,
    /// The tier new clients go to: the lowest with a node up, a remote gateway's included;
    /// -1 while no node is.
    pub serving_tier: Gauge,
    /// 1 for each remote gateway, labelled with its URL, tier and the relay address that logs
    /// and the `node` labels name it by.
    pub remote_info: Family<RemoteLabels, Gauge>,
    /// When the TLS certificate in force ends, as Unix seconds (0 without TLS): its time
    /// left is `lb_gateway_tls_certificate_expiry_timestamp_seconds - time()`.
    pub tls_certificate_expiry: Gauge<f64, AtomicU64>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RemoteLabels {
    pub remote: String,
    pub tier: String,
    pub node: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClosedLabels {
    /// `client`, `node_left` (out of rotation), `node_lost` (its connection failed),
    /// `node_upgrading` (closed for a drain's end), `too_slow` (over its queue budget),
    /// `message_too_big`, `idle`, `gateway_stopping`, `gateway_upgrading`, `gateway_handover`.
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    pub result: &'static str,
}

impl GatewayMetrics {
    pub fn register(registry: &mut Registry) -> GatewayMetrics {
        let metrics = GatewayMetrics {
            calls: Family::default(),
            auth_failures: Family::default(),
            rate_limited: Counter::default(),
            rejected: Family::default(),
            upstream_seconds: Family::new_with_constructor(|| {
                Histogram::new([
                    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ])
            }),
            retries: Family::default(),
            upstream_busy: Family::default(),
            cache_lookups: Family::default(),
            cache_bytes: Gauge::default(),
            cache_entries: Gauge::default(),
            connections: Gauge::default(),
            websocket_sessions: Gauge::default(),
            websocket_closed: Family::default(),
            shared_subscriptions: Gauge::default(),
            // Finer around 100 ms, the delivery a crowd's clients are promised.
            feed_delivery_seconds: Histogram::new([
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.5, 1.0, 2.5,
            ]),
            upstream_links: Family::default(),
            upstream_link_failures: Family::default(),
            upstream_subscriptions: Family::default(),
            queued_bytes: Gauge::default(),
            serving_tier: Gauge::default(),
            remote_info: Family::default(),
            tls_certificate_expiry: Gauge::default(),
        };
        let registry = registry.sub_registry_with_prefix("lb_gateway");
        registry.register(
            "calls",
            "JSON-RPC calls by method class and outcome",
            metrics.calls.clone(),
        );
        registry.register(
            "auth_failures",
            "Requests refused for their API key, by reason",
            metrics.auth_failures.clone(),
        );
        registry.register(
            "rate_limited",
            "Requests refused by their key's rate limit",
            metrics.rate_limited.clone(),
        );
        registry.register(
            "rejected",
            "Requests and connections refused by a gateway limit, by reason",
            metrics.rejected.clone(),
        );
        registry.register(
            "upstream_duration_seconds",
            "Time a node took to answer one call, by node",
            metrics.upstream_seconds.clone(),
        );
        registry.register(
            "retries",
            "Reads sent to another node after this node failed them or had no place for them",
            metrics.retries.clone(),
        );
        registry.register(
            "upstream_busy",
            "Calls answered upstream busy: the node had max_upstream_http_calls_per_node in flight",
            metrics.upstream_busy.clone(),
        );
        registry.register(
            "cache_lookups",
            "Response cache lookups by result",
            metrics.cache_lookups.clone(),
        );
        registry.register(
            "cache_bytes",
            "Bytes the response cache holds, bookkeeping included",
            metrics.cache_bytes.clone(),
        );
        registry.register(
            "cache_entries",
            "Answers the response cache holds",
            metrics.cache_entries.clone(),
        );
        registry.register(
            "connections",
            "Open client connections (HTTP and WebSocket)",
            metrics.connections.clone(),
        );
        registry.register(
            "websocket_sessions",
            "Open WebSocket connections",
            metrics.websocket_sessions.clone(),
        );
        registry.register(
            "websocket_closed",
            "WebSocket connections ended, by reason",
            metrics.websocket_closed.clone(),
        );
        registry.register(
            "shared_subscriptions",
            "Head subscriptions served from one upstream subscription per node",
            metrics.shared_subscriptions.clone(),
        );
        registry.register(
            "feed_delivery_seconds",
            "Time from a node's head notification reaching the gateway to its copy written to \
             each subscribed client",
            metrics.feed_delivery_seconds.clone(),
        );
        registry.register(
            "upstream_connections",
            "Open upstream WebSocket connections that client sessions share, by node",
            metrics.upstream_links.clone(),
        );
        registry.register(
            "upstream_connection_failures",
            "Upstream WebSocket connections that failed, by node",
            metrics.upstream_link_failures.clone(),
        );
        registry.register(
            "upstream_subscriptions",
            "Client subscriptions held on a node's upstream connections, by node",
            metrics.upstream_subscriptions.clone(),
        );
        registry.register(
            "queued_bytes",
            "Bytes of answers and notifications waiting for WebSocket clients to read them",
            metrics.queued_bytes.clone(),
        );
        registry.register(
            "serving_tier",
            "The tier new clients go to: the lowest with a node up, remote gateways included; -1 while none is",
            metrics.serving_tier.clone(),
        );
        registry.register(
            "remote_info",
            "1 per remote gateway: its URL, tier, and the relay address that node labels name it by",
            metrics.remote_info.clone(),
        );
        registry.register(
            "tls_certificate_expiry_timestamp_seconds",
            "When the gateway's TLS certificate in force ends (notAfter, Unix seconds; 0 without TLS)",
            metrics.tls_certificate_expiry.clone(),
        );
        metrics
    }

    pub fn rejected(&self, reason: &str) {
        self.rejected
            .get_or_create(&RejectedLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }
}
