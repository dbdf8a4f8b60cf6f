//! The `[gateway]` section of the configuration: where the gateway listens, its certificate,
//! its request limits and its method policy.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use serde::Deserialize;

use super::{remote::RemoteSection, upstream::CallBudget, validate_pattern};
use crate::{
    model::ServiceKey,
    section::{Problem, parse_duration},
};

/// The JSON-RPC gateway (HTTPS and HTTP/2 in front of the nodes). Off without `listen`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GatewaySection {
    /// e.g. `"0.0.0.0:443"`; None: no gateway.
    pub listen: Option<SocketAddr>,
    /// PEM certificate chain, leaf first; re-read on SIGHUP.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of the leaf certificate; re-read on SIGHUP.
    pub tls_key: Option<PathBuf>,
    /// Serve plain HTTP instead of TLS: only behind something else that terminates TLS.
    pub plain_http: bool,
    /// The service (`"VIP:port"` or `"VIP:port/tcp"`) whose backends' RPC endpoints the gateway
    /// calls; None: every backend of every service, once per RPC endpoint.
    pub service: Option<String>,
    /// Largest request body (HTTP 413 beyond) and largest WebSocket message (close code 1009
    /// beyond) taken.
    pub max_body_bytes: usize,
    /// Most calls in one batch.
    pub max_batch: usize,
    /// Memory budget of the response cache, in bytes (entries' bookkeeping included).
    pub cache_bytes: u64,
    /// Time a client has for the TLS handshake and for each request's headers (slowloris).
    #[serde(deserialize_with = "parse_duration")]
    pub header_timeout: Duration,
    /// A connection with no bytes either way for this long is closed.
    #[serde(deserialize_with = "parse_duration")]
    pub idle_timeout: Duration,
    /// Time a node has to answer one call; a read that runs out goes to another node.
    #[serde(deserialize_with = "parse_duration")]
    pub upstream_timeout: Duration,
    /// An upstream WebSocket connection that carried no call and held no subscription for this
    /// long is closed: a node gets back the connections of a past burst.
    #[serde(deserialize_with = "parse_duration")]
    pub upstream_idle_timeout: Duration,
    /// HTTP calls (HTTP requests' calls, cache misses) one node gets at once; beyond them a
    /// call waits for `upstream_queue_timeout`, then is answered "upstream busy" (-32000).
    pub max_upstream_http_calls_per_node: u32,
    /// How long a call waits for a place at its node; 0: not at all.
    #[serde(deserialize_with = "parse_duration")]
    pub upstream_queue_timeout: Duration,
    /// Open client connections of the whole gateway (every serving thread's together); more
    /// are closed at once.
    pub max_connections: u32,
    /// Open connections one client may hold; more are closed at once. A client is an IPv4
    /// address, or an IPv6 prefix of `ipv6_prefix_len` bits.
    pub max_connections_per_ip: u32,
    /// The IPv6 prefix counted as one client, by `max_connections_per_ip` and by
    /// `auth_failures_block` (which blocks the whole prefix): 64, what one subscriber or
    /// server gets, so a client cannot take a fresh address of its own prefix per connection.
    pub ipv6_prefix_len: u8,
    /// Requests one HTTP/2 connection may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS):
    /// a client queues the rest.
    pub http2_max_concurrent_streams: u32,
    /// Open WebSocket connections one API key may hold; more are refused (HTTP 429).
    pub max_connections_per_key: u32,
    /// Subscriptions one WebSocket connection may hold: the head subscriptions the gateway
    /// serves itself (`chain_subscribeNewHeads`, …) and those on the nodes together.
    pub max_subscriptions_per_connection: u32,
    /// Subscriptions on the nodes (everything but the shared head subscriptions) one API key
    /// may hold over all its connections.
    pub max_subscriptions_per_key: u32,
    /// Upstream WebSocket connections the gateway opens to one node, which every WebSocket
    /// client of that node shares. Keep it well under the node's `--rpc-max-connections`
    /// (Substrate: 100), which also serves the health checker, the chain follower, the HTTP
    /// calls and a standby gateway.
    pub max_upstream_connections_per_node: u32,
    /// Subscriptions on one upstream connection; under the node's
    /// `--rpc-max-subscriptions-per-connection` (Substrate: 1024).
    pub max_subscriptions_per_upstream: u32,
    /// `chainHead_v1_follow` subscriptions on one upstream connection: a Substrate node takes
    /// 4 per connection.
    pub max_follows_per_upstream: u32,
    /// Bytes of answers and notifications one WebSocket client may leave unread; past it the
    /// client is closed (1013) and its subscriptions end.
    pub max_queued_bytes_per_connection: usize,
    /// Bytes of unread answers and notifications of all WebSocket clients together; past it
    /// the client that would add more is closed (1013).
    pub max_queued_bytes: usize,
    /// Methods refused besides the node's unsafe ones: names, or prefixes ending in `*`.
    pub deny: Vec<String>,
    /// Methods let through even if unsafe or denied (allow wins).
    pub allow: Vec<String>,
    /// Put a source address on the kernel blocklist after repeated auth failures; off when
    /// absent.
    pub auth_failures_block: Option<AuthFailureBlock>,
    /// Other sites' gateways (`[[gateway.remotes]]`), each an upstream of its tier: used only
    /// while no local node of a lower tier is up.
    pub remotes: Vec<RemoteSection>,
}

/// `[gateway.auth_failures_block]`: `after` failures (missing, unknown or revoked key) within
/// `within` block the source address for `block_for`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AuthFailureBlock {
    pub after: u32,
    #[serde(default = "default_block_within", deserialize_with = "parse_duration")]
    pub within: Duration,
    #[serde(default = "default_block_for", deserialize_with = "parse_duration")]
    pub block_for: Duration,
}

/// Connections are bounded by the gateway's memory and file descriptors, not by the nodes
/// (which see the upstream connections only): at the goal of 32 KiB per connected client,
/// 20,000 take some 640 MiB; each takes a file descriptor (the nodes' shared connections a few
/// more), within dist/lb-control.service's `LimitNOFILE`. Twice the
/// 10,000 WebSocket clients the gateway is measured with.
const DEFAULT_MAX_CONNECTIONS: u32 = 20_000;

/// IPv6 prefixes shorter than this would count whole providers' customers as one client.
const SHORTEST_IPV6_PREFIX: u8 = 32;

fn default_block_within() -> Duration {
    Duration::from_secs(60)
}

fn default_block_for() -> Duration {
    Duration::from_secs(600)
}

impl Default for GatewaySection {
    fn default() -> Self {
        GatewaySection {
            listen: None,
            tls_cert: None,
            tls_key: None,
            plain_http: false,
            service: None,
            max_body_bytes: 10 * 1024 * 1024,
            max_batch: 100,
            cache_bytes: crate::cache::DEFAULT_MAX_BYTES,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            upstream_timeout: Duration::from_secs(10),
            upstream_idle_timeout: Duration::from_secs(60),
            max_upstream_http_calls_per_node: CallBudget::default().max_calls_per_node,
            upstream_queue_timeout: CallBudget::default().queue_timeout,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_ip: 256,
            ipv6_prefix_len: 64,
            // nginx's http2_max_concurrent_streams is 128, most servers' 100: enough for a
            // browser or a client library's parallel calls, while one connection cannot queue
            // unbounded work (hyper's own default is 200).
            http2_max_concurrent_streams: 100,
            // A dApp's backend, an indexer or a wallet service needs a few to a few dozen; at
            // 100 one key holds at most 1/200 of max_connections, and, while every WebSocket
            // client has a node connection of its own, no more than one node's 100.
            max_connections_per_key: 100,
            max_subscriptions_per_connection: 1024,
            // 1 % of what 3 nodes take under the defaults below (3 × 32 × 512 ≈ 49,000).
            max_subscriptions_per_key: 512,
            // A third of Substrate's 100: room for the HTTP pool, checks, follower, a standby.
            max_upstream_connections_per_node: 32,
            max_subscriptions_per_upstream: 512,
            max_follows_per_upstream: 4,
            // Above the largest answer a node sends (Substrate: 15 MiB).
            max_queued_bytes_per_connection: 16 * 1024 * 1024,
            max_queued_bytes: 512 * 1024 * 1024,
            deny: Vec::new(),
            allow: Vec::new(),
            auth_failures_block: None,
            remotes: Vec::new(),
        }
    }
}

impl GatewaySection {
    /// The nodes' budget of HTTP calls.
    pub fn call_budget(&self) -> CallBudget {
        CallBudget {
            max_calls_per_node: self.max_upstream_http_calls_per_node,
            queue_timeout: self.upstream_queue_timeout,
        }
    }

    /// The service the gateway is limited to, if any.
    pub fn service_key(&self) -> Result<Option<ServiceKey>, String> {
        self.service.as_deref().map(str::parse).transpose()
    }

    /// Every invalid field of the section.
    pub fn problems(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut report = |field: &str, reason: String| {
            problems.push(Problem::new(format!("gateway.{field}"), reason));
        };
        if let Err(reason) = self.service_key() {
            report("service", reason);
        }
        if self.listen.is_some() && !self.plain_http {
            for (field, value) in [("tls_cert", &self.tls_cert), ("tls_key", &self.tls_key)] {
                if value.is_none() {
                    report(
                        field,
                        "required to serve TLS: give a PEM file (or set plain_http = true \
                         behind another TLS terminator)"
                            .to_owned(),
                    );
                }
            }
        }
        for (field, value) in [
            ("max_body_bytes", self.max_body_bytes),
            ("max_batch", self.max_batch),
            ("cache_bytes", self.cache_bytes as usize),
            ("max_connections", self.max_connections as usize),
            (
                "max_upstream_http_calls_per_node",
                self.max_upstream_http_calls_per_node as usize,
            ),
            (
                "http2_max_concurrent_streams",
                self.http2_max_concurrent_streams as usize,
            ),
            (
                "max_connections_per_ip",
                self.max_connections_per_ip as usize,
            ),
            (
                "max_connections_per_key",
                self.max_connections_per_key as usize,
            ),
            (
                "max_subscriptions_per_connection",
                self.max_subscriptions_per_connection as usize,
            ),
            (
                "max_subscriptions_per_key",
                self.max_subscriptions_per_key as usize,
            ),
            (
                "max_upstream_connections_per_node",
                self.max_upstream_connections_per_node as usize,
            ),
            (
                "max_subscriptions_per_upstream",
                self.max_subscriptions_per_upstream as usize,
            ),
            (
                "max_follows_per_upstream",
                self.max_follows_per_upstream as usize,
            ),
            (
                "max_queued_bytes_per_connection",
                self.max_queued_bytes_per_connection,
            ),
            ("max_queued_bytes", self.max_queued_bytes),
        ] {
            if value == 0 {
                report(field, "must be at least 1".to_owned());
            }
        }
        if !(SHORTEST_IPV6_PREFIX..=128).contains(&self.ipv6_prefix_len) {
            report(
                "ipv6_prefix_len",
                format!(
                    "{} is not a prefix length from {SHORTEST_IPV6_PREFIX} to 128 (64: one \
                     subscriber's network)",
                    self.ipv6_prefix_len
                ),
            );
        }
        for (field, value) in [
            ("header_timeout", self.header_timeout),
            ("idle_timeout", self.idle_timeout),
            ("upstream_timeout", self.upstream_timeout),
            ("upstream_idle_timeout", self.upstream_idle_timeout),
        ] {
            if value.is_zero() {
                report(field, "must be longer than 0".to_owned());
            }
        }
        if let Some(block) = &self.auth_failures_block {
            if block.after == 0 {
                report("auth_failures_block.after", "must be at least 1".to_owned());
            }
            for (field, value) in [("within", block.within), ("block_for", block.block_for)] {
                if value.is_zero() {
                    report(
                        &format!("auth_failures_block.{field}"),
                        "must be longer than 0".to_owned(),
                    );
                }
            }
        }
        for (list, patterns) in [("deny", &self.deny), ("allow", &self.allow)] {
            for (i, pattern) in patterns.iter().enumerate() {
                if let Err(reason) = validate_pattern(pattern) {
                    report(&format!("{list}[{i}]"), reason);
                }
            }
        }
        for (i, remote) in self.remotes.iter().enumerate() {
            problems.extend(remote.problems(&format!("gateway.remotes[{i}]")));
        }
        problems
    }
}
