//! The admin API's wire format: request bodies and answers, shared by the server, the typed
//! client ([`crate::admin_client`]) and the OpenAPI document, so none of them can disagree.
//!
//! Internal records (the backend set's, the health checker's, the key registry's) are turned
//! into these at the edge: the wire format is a contract and changes only on purpose. Times are
//! RFC 3339 strings in UTC.

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, SocketAddr},
    time::{Duration, SystemTime},
};

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use utoipa::{
    IntoParams, ToSchema,
    openapi::{ObjectBuilder, Type},
};

use crate::{
    backends::{BackendStatus, State},
    blocklist::ListedBlock,
    dataplane::Stats,
    ha::{
        Role,
        handover::{HandoverState, Phase as HandoverPhase},
    },
    health::{NodeHealth, Verdict},
    model::{
        AdminState, ApiKeyId, ApiKeyRecord, Backend, BlockRecord, BlockSource, DEFAULT_RPC_PORT,
        Event, ForwardingMode, HealthCheck, JoinTokenId, JoinTokenRecord, KeyCaps, Protocol,
        RateLimit, Service, ServiceDef, ServiceId, Tier,
    },
};

/// A point in time, RFC 3339 in UTC with milliseconds: `2025-01-31T12:00:00.000Z`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp(pub SystemTime);

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_rfc3339_millis(self.0))
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_rfc3339(&text)
            .map(Timestamp)
            .map_err(serde::de::Error::custom)
    }
}

// ---------------------------------------------------------------------------------------------
// Errors.

/// Every error answer: `{ "error": { "code": "…", "message": "…", "field": "…" } }`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    pub code: ErrorCode,
    pub message: String,
    /// The request field at fault, for `invalid` when it is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// What kind of error; each has one HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// 400: a field is missing, malformed or out of range.
    Invalid,
    /// 401: no bearer token, a wrong one, or a revoked join token.
    Unauthorized,
    /// 403: a join token asked for what its scope does not cover.
    Forbidden,
    /// 404: no such record (or no such route).
    NotFound,
    /// 405: the route exists, the method does not.
    MethodNotAllowed,
    /// 409: a record with the same identity exists, or the record is in a state that forbids
    /// the change (a revoked key).
    Conflict,
    /// 503: the state store cannot take the change now (etcd without quorum); nothing was
    /// changed, and what was committed before keeps being served.
    Unavailable,
    /// 500: the state store or the kernel failed.
    Internal,
}

// ---------------------------------------------------------------------------------------------
// Services and backends.

/// Body of `POST /v1/services`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewService {
    #[schema(value_type = String, example = "192.0.2.10")]
    pub vip: IpAddr,
    pub port: u16,
    #[serde(default = "default_protocol")]
    #[schema(schema_with = protocol_schema)]
    pub protocol: Protocol,
    #[serde(default)]
    #[schema(schema_with = mode_schema)]
    pub mode: ForwardingMode,
    #[serde(default)]
    pub check: HealthCheck,
}

impl From<NewService> for ServiceDef {
    fn from(new: NewService) -> Self {
        ServiceDef {
            vip: new.vip,
            port: new.port,
            protocol: new.protocol,
            mode: new.mode,
            check: new.check,
        }
    }
}

fn default_protocol() -> Protocol {
    Protocol::Tcp
}

fn protocol_schema() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(["tcp", "udp"]))
        .default(Some("tcp".into()))
}

fn mode_schema() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(["nat", "dsr"]))
        .default(Some("nat".into()))
}

/// A service with its backends.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ServiceInfo {
    #[serde(flatten)]
    pub service: Service,
    /// `192.0.2.10:9944/tcp`
    pub name: String,
    /// The tier new flows go to: the lowest with a backend up (0 = the primaries); null while
    /// no backend is in rotation.
    #[serde(default)]
    pub serving_tier: Option<Tier>,
    pub backends: Vec<BackendInfo>,
}

/// Body of `POST /v1/backends`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewBackend {
    /// The node's address and the service's port on it.
    #[schema(value_type = String, example = "10.200.13.2:9944")]
    pub address: SocketAddr,
    /// The service's id; may be left out while exactly one service exists.
    #[serde(default)]
    pub service: Option<ServiceId>,
    /// The node's JSON-RPC port (health checks, gateway).
    #[serde(default = "default_rpc_port")]
    #[schema(default = 9944)]
    pub rpc_port: u16,
    #[serde(default = "default_weight")]
    #[schema(default = 1)]
    pub weight: u32,
    #[serde(default)]
    pub admin: AdminState,
    /// 0 = primary; 1, 2, … = backups, which get new flows only while every lower tier is
    /// down.
    #[serde(default)]
    #[schema(default = 0)]
    pub tier: Tier,
}

fn default_rpc_port() -> u16 {
    DEFAULT_RPC_PORT
}

fn default_weight() -> u32 {
    1
}

/// Body of `PUT /v1/backends/{id}/weight`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WeightChange {
    pub weight: u32,
}

/// Body of `PUT /v1/backends/{id}/tier`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TierChange {
    /// 0 = primary; 1, 2, … = backups.
    pub tier: Tier,
}

/// What a backend still carries (`GET /v1/backends/{id}/connections`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BackendConnections {
    /// Open kernel flows to it (no FIN or RST seen), over every service.
    pub flows: u64,
    /// The gateway's WebSocket clients on its node.
    pub websocket_clients: usize,
}

/// `POST /v1/backends/{id}/close-clients`: how many clients were told to reconnect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ClosedClients {
    pub closed: usize,
}

/// A backend with its effective state and its health.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BackendInfo {
    #[serde(flatten)]
    pub backend: Backend,
    /// The service's name, `192.0.2.10:9944/tcp`.
    pub service_name: String,
    pub state: State,
    /// In rotation although unhealthy, because every backend of its service is.
    pub fallback: bool,
    /// Up (or draining), but its node refuses new connections ("too many connections"): it
    /// keeps its flows and clients, and the gateway places no new clients on it.
    #[serde(default)]
    pub saturated: bool,
    /// None until its first check, and for services without checks.
    pub health: Option<HealthInfo>,
}

impl From<BackendStatus> for BackendInfo {
    fn from(status: BackendStatus) -> Self {
        BackendInfo {
            backend: status.view.backend,
            service_name: status.service_name,
            state: status.view.state,
            fallback: status.view.fallback,
            saturated: status.view.saturated,
            health: status.health.map(HealthInfo::from),
        }
    }
}

/// What the health checker last found about a node.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HealthInfo {
    pub verdict: Verdict,
    /// Why the node is unhealthy.
    pub reason: Option<String>,
    pub best: Option<u64>,
    pub finalized: Option<u64>,
    /// Blocks behind the best block of its chain.
    pub lag: Option<u64>,
    /// The genesis hash of the node's chain.
    pub genesis: Option<String>,
    /// The last failed check's error, kept after the node recovers.
    pub last_error: Option<String>,
    /// The node refused the checker's new connection at its last check with "too many
    /// connections" (HTTP 429): every connection slot is taken.
    #[serde(default)]
    pub saturated: bool,
    /// Checks passed in a row, counted up to `rise` (what a joining backend waits for).
    #[serde(default)]
    pub passes: u32,
    #[schema(value_type = Option<String>, format = DateTime)]
    pub last_checked: Option<Timestamp>,
}

impl From<NodeHealth> for HealthInfo {
    fn from(health: NodeHealth) -> Self {
        HealthInfo {
            verdict: health.verdict,
            reason: health.reason,
            best: health.best,
            finalized: health.finalized,
            lag: health.lag,
            genesis: health.genesis,
            last_error: health.last_error,
            saturated: health.saturated,
            passes: health.passes,
            last_checked: health.last_checked.map(Timestamp),
        }
    }
}

/// `GET /v1/health`: the cluster as the health checker sees it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ClusterHealth {
    /// The highest best block among answering, synced nodes; null when there is none or the
    /// nodes serve several chains.
    pub cluster_best: Option<u64>,
    /// Every backend of every service, with its state and health.
    pub nodes: Vec<BackendInfo>,
}

/// `GET /v1/gateway`: what the gateway serves from.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct GatewayInfo {
    /// False without a gateway (`[gateway] listen` unset): the rest is empty then.
    pub enabled: bool,
    /// The tier new clients go to (a remote gateway's included); null while no node takes
    /// them.
    pub serving_tier: Option<Tier>,
    /// Healthy nodes taking new clients (the "least bad" kept while none is healthy do not
    /// count).
    pub healthy_nodes: usize,
    pub remotes: Vec<RemoteInfo>,
}

/// Another site's gateway, an upstream of its tier.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RemoteInfo {
    /// Its URL as configured, without the key.
    pub url: String,
    pub tier: Tier,
    /// The relay address it is checked and called at: its `node` label in the metrics.
    #[schema(value_type = String, example = "127.0.0.1:41234")]
    pub node: SocketAddr,
    /// None until its first check.
    pub health: Option<HealthInfo>,
}

#[derive(Debug, Clone, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct BackendFilter {
    /// Only the backends of this service.
    #[param(value_type = Option<i64>)]
    pub service: Option<ServiceId>,
}

// ---------------------------------------------------------------------------------------------
// API keys.

/// Body of `POST /v1/keys`. Without `rps` the key is unlimited.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    /// 1 to 64 letters, digits, `_`, `.` or `-`; unique among all keys, revoked ones included.
    #[schema(example = "alice")]
    pub name: String,
    /// Requests per second, sustained.
    #[serde(default)]
    pub rps: Option<u32>,
    /// Requests allowed at once above the steady rate; defaults to `rps`.
    #[serde(default)]
    pub burst: Option<u32>,
    /// WebSocket connections the key may hold open at once; without it the gateway's
    /// `max_connections_per_key`.
    #[serde(default)]
    pub max_connections: Option<u32>,
    /// Subscriptions the key may hold on the nodes at once; without it the gateway's
    /// `max_subscriptions_per_key`.
    #[serde(default)]
    pub max_subscriptions: Option<u32>,
}

impl NewKey {
    pub fn caps(&self) -> KeyCaps {
        KeyCaps {
            max_connections: self.max_connections,
            max_subscriptions: self.max_subscriptions,
        }
    }
}

/// Body of `PUT /v1/keys/{id}/caps`: `{ "max_connections": 5000, "max_subscriptions": null }`,
/// null for the gateway's default. Both must be present, so an empty body cannot reset a
/// key's caps by accident.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CapsChange {
    /// WebSocket connections open at once; null: `max_connections_per_key`.
    #[serde(deserialize_with = "present_or_null")]
    #[schema(required = true)]
    pub max_connections: Option<u32>,
    /// Subscriptions on the nodes at once; null: `max_subscriptions_per_key`.
    #[serde(deserialize_with = "present_or_null")]
    #[schema(required = true)]
    pub max_subscriptions: Option<u32>,
}

impl From<CapsChange> for KeyCaps {
    fn from(change: CapsChange) -> Self {
        KeyCaps {
            max_connections: change.max_connections,
            max_subscriptions: change.max_subscriptions,
        }
    }
}

/// Body of `PUT /v1/keys/{id}/limit`: `{ "rps": 10, "burst": 20 }`, or `{ "rps": null }` for
/// no limit. `rps` must be present, so an empty body cannot lift a limit by accident.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitChange {
    #[serde(deserialize_with = "present_or_null")]
    #[schema(required = true)]
    pub rps: Option<u32>,
    /// Defaults to `rps`.
    #[serde(default)]
    pub burst: Option<u32>,
}

/// Makes an `Option` field required (null allowed): serde treats a missing `Option` field as
/// null unless it has its own deserializer.
fn present_or_null<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u32>, D::Error> {
    Option::deserialize(deserializer)
}

/// The rate limit `rps` and `burst` ask for; `burst` without `rps` is an error.
pub fn requested_limit(
    rps: Option<u32>,
    burst: Option<u32>,
) -> Result<Option<RateLimit>, &'static str> {
    match (rps, burst) {
        (Some(rps), burst) => Ok(Some(RateLimit {
            rps,
            burst: burst.unwrap_or(rps),
        })),
        (None, None) => Ok(None),
        (None, Some(_)) => Err("a burst needs a rate: give rps too"),
    }
}

/// An API key as listed: never its secret nor its hash.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct KeyInfo {
    pub id: ApiKeyId,
    pub name: String,
    /// Null: unlimited.
    pub rate_limit: Option<RateLimit>,
    /// WebSocket connections open at once; null: the gateway's `max_connections_per_key`.
    pub max_connections: Option<u32>,
    /// Subscriptions on the nodes at once; null: the gateway's `max_subscriptions_per_key`.
    pub max_subscriptions: Option<u32>,
    #[schema(value_type = String, format = DateTime)]
    pub created: Timestamp,
    #[schema(value_type = Option<String>, format = DateTime)]
    pub last_used: Option<Timestamp>,
    #[schema(value_type = Option<String>, format = DateTime)]
    pub revoked: Option<Timestamp>,
}

impl From<ApiKeyRecord> for KeyInfo {
    fn from(key: ApiKeyRecord) -> Self {
        KeyInfo {
            id: key.id,
            name: key.name,
            rate_limit: key.rate_limit,
            max_connections: key.caps.max_connections,
            max_subscriptions: key.caps.max_subscriptions,
            created: Timestamp(key.created),
            last_used: key.last_used.map(Timestamp),
            revoked: key.revoked.map(Timestamp),
        }
    }
}

/// A key just created, with its secret: the only answer that ever carries it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct KeyCreated {
    pub id: ApiKeyId,
    pub name: String,
    /// `lbk_` and 64 hex digits. Store it now: it cannot be shown again.
    pub secret: String,
    pub rate_limit: Option<RateLimit>,
    pub max_connections: Option<u32>,
    pub max_subscriptions: Option<u32>,
    #[schema(value_type = String, format = DateTime)]
    pub created: Timestamp,
}

// ---------------------------------------------------------------------------------------------
// Join tokens and joins.

/// What a token may do. One scope so far.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum TokenScope {
    /// Add its holder's own address as a backend of the token's services (`POST /v1/join`),
    /// see, drain and remove that backend; nothing else.
    #[default]
    Join,
}

/// Body of `POST /v1/tokens`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    /// 1 to 64 letters, digits, `_`, `.` or `-`; unique among all join tokens.
    #[schema(example = "eu-west-nodes")]
    pub name: String,
    #[serde(default)]
    pub scope: TokenScope,
    /// The services its holder may join, as `VIP:port` or `VIP:port/protocol`; each must exist.
    #[schema(example = json!(["192.0.2.10:9944"]))]
    pub services: Vec<String>,
}

/// A join token as listed: never its secret nor its hash.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TokenInfo {
    pub id: JoinTokenId,
    pub name: String,
    pub scope: TokenScope,
    /// `192.0.2.10:9944/tcp`, …
    pub services: Vec<String>,
    #[schema(value_type = String, format = DateTime)]
    pub created: Timestamp,
    #[schema(value_type = Option<String>, format = DateTime)]
    pub revoked: Option<Timestamp>,
}

impl From<JoinTokenRecord> for TokenInfo {
    fn from(token: JoinTokenRecord) -> Self {
        TokenInfo {
            id: token.id,
            name: token.name,
            scope: TokenScope::Join,
            services: token.services.iter().map(ToString::to_string).collect(),
            created: Timestamp(token.created),
            revoked: token.revoked.map(Timestamp),
        }
    }
}

/// A token just created, with its secret: the only answer that ever carries it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TokenCreated {
    #[serde(flatten)]
    pub token: TokenInfo,
    /// `lbj_` and 64 hex digits. Store it now: it cannot be shown again.
    pub secret: String,
}

/// Body of `POST /v1/join`: the caller's own address (the one its request comes from) joins
/// `service` with the service's `port` on it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    /// The service to join: `VIP:port` or `VIP:port/protocol`.
    #[schema(example = "192.0.2.10:9944")]
    pub service: String,
    /// The port the service's packets go to on the node.
    #[serde(default = "default_rpc_port")]
    #[schema(default = 9944)]
    pub port: u16,
    /// The node's JSON-RPC port (health checks, gateway).
    #[serde(default = "default_rpc_port")]
    #[schema(default = 9944)]
    pub rpc_port: u16,
    #[serde(default = "default_weight")]
    #[schema(default = 1)]
    pub weight: u32,
    /// 0 = primary; 1, 2, … = backups (a node of another region, of the fallback site).
    #[serde(default)]
    #[schema(default = 0)]
    pub tier: Tier,
}

// ---------------------------------------------------------------------------------------------
// The blocklist.

/// Body of `POST /v1/blocklist`: `{ "prefix": "203.0.113.0/24", "for": "10m" }`. Without `for`
/// the prefix stays blocked until removed; blocking a blocked prefix again replaces its expiry.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewBlock {
    /// A source prefix (`203.0.113.0/24`, `2001:db8::/48`) or one address (a /32 or /128);
    /// host bits are dropped.
    #[schema(example = "203.0.113.0/24")]
    pub prefix: String,
    /// How long: `90s`, `10m`, `1h`, `7d`, `1h 30m`.
    #[serde(rename = "for", default, skip_serializing_if = "Option::is_none")]
    #[schema(example = "10m")]
    pub duration: Option<String>,
}

/// A blocked source prefix: its packets are dropped in XDP before any other work.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BlockInfo {
    #[schema(value_type = String, example = "203.0.113.0/24")]
    pub prefix: IpNet,
    /// When the entry expires (to the second); null: blocked until removed.
    #[schema(value_type = Option<String>, format = DateTime)]
    pub expires: Option<Timestamp>,
    /// Who blocked it; absent for an entry of the kernel map that no record describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<BlockSource>,
    /// When it was blocked; absent with `source`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub created: Option<Timestamp>,
}

impl From<ListedBlock> for BlockInfo {
    fn from(listed: ListedBlock) -> Self {
        BlockInfo {
            prefix: listed.entry.prefix,
            expires: listed.entry.expires.map(Timestamp),
            source: listed.source,
            created: listed.created.map(Timestamp),
        }
    }
}

impl From<BlockRecord> for BlockInfo {
    fn from(record: BlockRecord) -> Self {
        BlockInfo {
            prefix: record.prefix,
            expires: record.until.map(Timestamp),
            source: Some(record.source),
            created: Some(Timestamp(record.created)),
        }
    }
}

/// A prefix in CIDR notation, or a single address; the error says what to write instead. The
/// API and the CLI read prefixes with it.
pub fn parse_prefix(text: &str) -> Result<IpNet, String> {
    text.parse::<IpNet>()
        .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| {
            format!(
                "\"{text}\" is not an IP prefix: write e.g. 203.0.113.0/24, 2001:db8::/48 or an \
                 address"
            )
        })
}

// ---------------------------------------------------------------------------------------------
// Events.

#[derive(Debug, Clone, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventQuery {
    /// Only events with a larger id (for following the log); without it, the newest.
    pub after: Option<i64>,
    /// At most this many (default 100, at most 1000).
    pub limit: Option<usize>,
}

pub const DEFAULT_EVENT_LIMIT: usize = 100;
pub const MAX_EVENT_LIMIT: usize = 1000;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EventInfo {
    pub id: i64,
    #[schema(value_type = String, format = DateTime)]
    pub at: Timestamp,
    /// What happened: `backend.added`, `backend.state`, `key.revoked`, …
    pub kind: String,
    /// What it happened to: `backend 3 (10.200.11.2:9944)`.
    pub subject: String,
    /// Why or how: `api`, `up -> down (health)`, …
    pub detail: String,
}

impl From<Event> for EventInfo {
    fn from(event: Event) -> Self {
        EventInfo {
            id: event.id,
            at: Timestamp(event.at),
            kind: event.kind,
            subject: event.subject,
            detail: event.detail,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Stats.

/// The kernel's counters (summed over CPUs since the maps were created) and the gateway's.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StatsReport {
    /// Every packet the XDP program saw, by protocol.
    pub protocols: BTreeMap<String, Traffic>,
    pub total: Traffic,
    /// Drops outside any service (blocked sources, fragments to a VIP), by reason.
    pub drops: BTreeMap<String, u64>,
    pub services: Vec<ServiceTraffic>,
    pub backends: Vec<BackendTraffic>,
    /// The JSON-RPC gateway's counters and gauges, by sample name and labels as `/metrics`
    /// shows them (e.g. `lb_gateway_cache_lookups_total{result="hit"}`); empty without a
    /// gateway.
    pub gateway: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ServiceTraffic {
    /// `192.0.2.10:9944/tcp`
    pub service: String,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    /// Drops by reason.
    pub drops: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BackendTraffic {
    #[schema(value_type = String, example = "10.200.13.2:9944")]
    pub backend: SocketAddr,
    /// As the kernel has it: `up`, `draining` or `down`.
    pub state: String,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

impl From<&Stats> for StatsReport {
    fn from(stats: &Stats) -> Self {
        let names = |counts: &BTreeMap<&'static str, u64>| {
            counts
                .iter()
                .map(|(name, count)| ((*name).to_owned(), *count))
                .collect()
        };
        let total = stats.protocols.total();
        StatsReport {
            protocols: stats
                .protocols
                .by_slot
                .iter()
                .map(|(name, c)| {
                    (
                        (*name).to_owned(),
                        Traffic {
                            packets: c.packets,
                            bytes: c.bytes,
                        },
                    )
                })
                .collect(),
            total: Traffic {
                packets: total.packets,
                bytes: total.bytes,
            },
            drops: names(&stats.drops),
            services: stats
                .services
                .iter()
                .map(|service| ServiceTraffic {
                    service: service.service.clone(),
                    packets: service.packets,
                    bytes: service.bytes,
                    new_flows: service.new_flows,
                    drops: names(&service.drops),
                })
                .collect(),
            backends: stats
                .backends
                .iter()
                .map(|backend| BackendTraffic {
                    backend: backend.backend,
                    state: backend.state.to_owned(),
                    packets: backend.packets,
                    bytes: backend.bytes,
                    new_flows: backend.new_flows,
                })
                .collect(),
            gateway: BTreeMap::new(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// High availability.

/// Body of `POST /v1/ha/role`: the role keepalived's notify hook reports.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RoleChange {
    /// `master`, `backup` or `fault`.
    pub role: Role,
}

/// `GET /v1/ha`: this lb-control's role in its pair.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HaStatus {
    /// This host's name in the pair (`[ha] name`, else the host name).
    pub name: String,
    /// `standalone` without an `[ha]` section.
    pub role: Role,
    /// When it took this role (or started).
    #[schema(value_type = String, format = DateTime)]
    pub since: Timestamp,
    /// Whether health transitions seen here are recorded in the store (not on a backup).
    pub records_health: bool,
    /// The floating addresses of `[ha]`, and whether this host holds each now.
    pub floating_addresses: Vec<FloatingAddress>,
    /// The last handover from this host (`lb-control ha handover`), if there was one since it
    /// started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handover: Option<HandoverInfo>,
}

/// `POST /v1/ha/handover`: hand the floating addresses over to the other host of the pair,
/// failing no request (for this host's OS update).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct HandoverRequest {
    /// How long the gateway's connections may take to finish: `10s` (the default) up to `10m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = "10s")]
    pub drain: Option<String>,
}

/// A handover's progress.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HandoverInfo {
    pub phase: HandoverPhase,
    #[schema(value_type = String, format = DateTime)]
    pub started: Timestamp,
    /// The drain time, in milliseconds.
    pub drain_ms: u64,
    /// The gateway's connections still open here.
    pub open_connections: u32,
    /// Milliseconds from the start until the other host had the flows and armed second
    /// chance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synced_after_ms: Option<u64>,
    /// ... until the floating addresses left this host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub released_after_ms: Option<u64>,
    /// ... until the other host connected here as master.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_master_after_ms: Option<u64>,
    /// ... until the gateway's last connection here finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drained_after_ms: Option<u64>,
    /// Why it failed (phase `failed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl From<HandoverState> for HandoverInfo {
    fn from(state: HandoverState) -> Self {
        let millis = |duration: Duration| u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
        HandoverInfo {
            phase: state.phase,
            started: Timestamp(state.started),
            drain_ms: millis(state.drain),
            open_connections: state.open_connections,
            synced_after_ms: state.synced_after.map(millis),
            released_after_ms: state.released_after.map(millis),
            peer_master_after_ms: state.peer_master_after.map(millis),
            drained_after_ms: state.drained_after.map(millis),
            error: state.error,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FloatingAddress {
    #[schema(value_type = String)]
    pub address: IpAddr,
    /// keepalived has put it on an interface of this host.
    pub held: bool,
}
