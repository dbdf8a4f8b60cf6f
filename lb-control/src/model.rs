//! The domain vocabulary: services, backends, API keys and events as the store keeps them, the
//! admin API shows them and the backend set, health checker, data plane and gateway speak of
//! them. A leaf: it imports nothing of the crate, so every module can use it.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    str::FromStr,
    time::SystemTime,
};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Store-assigned id of a service (never reused).
pub type ServiceId = i64;
/// Store-assigned id of a backend (never reused).
pub type BackendId = i64;
/// A backend's tier: 0 = primary, higher = a backup used only while every lower tier is down.
pub type Tier = u32;

/// The port Substrate nodes serve JSON-RPC on by default.
pub const DEFAULT_RPC_PORT: u16 = 9944;

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Transport protocol of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => IPPROTO_TCP,
            Protocol::Udp => IPPROTO_UDP,
        }
    }
}

/// How a service's packets reach its backends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ForwardingMode {
    /// Full NAT: works with unmodified backends anywhere.
    #[default]
    Nat,
    /// Direct server return over IPIP: backends decapsulate and answer clients directly.
    Dsr,
}

/// A backend's admin or health state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    /// In the Maglev table: gets new flows.
    #[default]
    Up,
    /// Keeps its established flows, gets no new ones.
    Draining,
    /// Out: its flows are dropped from connection tracking and re-hash to live backends.
    Down,
}

/// What an operator decided about a backend; health decides the rest.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    ToSchema,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum AdminState {
    /// In rotation while healthy.
    #[default]
    Enabled,
    /// Keeps its established flows, gets no new ones.
    Draining,
    /// Out of rotation: its flows move to other backends.
    Disabled,
    /// Health-checked from scratch and out of rotation until its node has passed `rise` checks
    /// in a row; then enabled by itself. A node that joins with a join token starts here, and
    /// a rollout puts a node back through it after its upgrade.
    Joining,
}

/// Where a record came from: config-file records follow the file on reload; API records are
/// left alone by a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    Config,
    Api,
}

/// How a service's backends are checked.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum HealthCheck {
    /// TCP connect to the node's RPC port, then JSON-RPC `system_health` and block numbers.
    #[default]
    Substrate,
    /// TCP connect to the backend's own address only.
    Tcp,
    /// Never checked: always healthy.
    None,
}

/// A service as an operator defines it; (vip, port, protocol) identifies it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ServiceDef {
    #[schema(value_type = String, example = "192.0.2.10")]
    pub vip: IpAddr,
    pub port: u16,
    #[schema(value_type = String, example = "tcp")]
    pub protocol: Protocol,
    #[schema(value_type = String, example = "nat")]
    pub mode: ForwardingMode,
    pub check: HealthCheck,
}

impl ServiceDef {
    /// Two services with the same key cannot coexist.
    pub fn key(&self) -> ServiceKey {
        ServiceKey {
            vip: self.vip,
            port: self.port,
            protocol: self.protocol,
        }
    }
}

/// A service's identity: `192.0.2.10:9944/tcp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let protocol = match self.protocol {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        };
        write!(f, "{}/{protocol}", SocketAddr::new(self.vip, self.port))
    }
}

impl FromStr for ServiceKey {
    type Err = String;

    /// `"192.0.2.10:443"` (TCP) or `"192.0.2.10:443/tcp"`.
    fn from_str(text: &str) -> Result<ServiceKey, String> {
        let (address, protocol) = text.split_once('/').unwrap_or((text, "tcp"));
        let protocol = match protocol {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            other => return Err(format!("\"{other}\" is not a protocol: use tcp or udp")),
        };
        let address: SocketAddr = address.parse().map_err(|_| {
            format!("\"{text}\" is not a service: write VIP:port, e.g. \"192.0.2.10:443/tcp\"")
        })?;
        Ok(ServiceKey {
            vip: address.ip(),
            port: address.port(),
            protocol,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Service {
    pub id: ServiceId,
    #[serde(flatten)]
    pub def: ServiceDef,
    pub origin: Origin,
}

/// A backend as an operator defines it; (service, address) identifies it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BackendDef {
    /// Where the service's packets go: the node's address and the service's port on it.
    #[schema(value_type = String, example = "198.51.100.11:9944")]
    pub address: SocketAddr,
    /// The node's JSON-RPC port (health checks and the gateway), on the same address.
    pub rpc_port: u16,
    /// Relative share of new connections (1 or more).
    pub weight: u32,
    pub admin: AdminState,
    /// 0 for a primary (the default), 1, 2, … for backups (another region, a fallback site):
    /// new flows go to the lowest tier that has a backend up. Records written before tiers
    /// existed read as 0.
    #[serde(default)]
    pub tier: Tier,
}

impl BackendDef {
    /// The node's JSON-RPC endpoint: what the health checker checks and the gateway calls.
    pub fn rpc_endpoint(&self) -> SocketAddr {
        SocketAddr::new(self.address.ip(), self.rpc_port)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Backend {
    pub id: BackendId,
    pub service: ServiceId,
    #[serde(flatten)]
    pub def: BackendDef,
    pub origin: Origin,
}

/// Store-assigned id of an API key (never reused).
pub type ApiKeyId = i64;

/// Per-key request rate limit (GCRA: a steady rate and a burst allowance).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RateLimit {
    /// Requests per second, sustained.
    pub rps: u32,
    /// Requests allowed at once above the steady rate.
    pub burst: u32,
}

/// A key's own caps on what it holds open through the gateway's WebSocket: for a plan above
/// the default, or another site's gateway failing over onto this one through one key. Each
/// None takes the gateway's `[gateway.websocket]` default for every key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct KeyCaps {
    /// WebSocket connections open at once (`max_connections_per_key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Subscriptions held on the nodes at once (`max_subscriptions_per_key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_subscriptions: Option<u32>,
}

/// An API key as stored: the secret itself is never kept, only its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyRecord {
    pub id: ApiKeyId,
    pub name: String,
    pub secret_sha256: [u8; 32],
    /// None: unlimited.
    pub rate_limit: Option<RateLimit>,
    pub caps: KeyCaps,
    pub created: SystemTime,
    pub last_used: Option<SystemTime>,
    pub revoked: Option<SystemTime>,
}

/// Who put a prefix on the source blocklist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum BlockSource {
    /// An operator, through the admin API or `lb-control block`.
    Admin,
    /// The gateway, after repeated auth failures of one client (`[gateway.auth_failures_block]`).
    AuthFailure,
    /// Found in the kernel when this lb-control first stored its blocklist: blocked by an
    /// lb-control that kept its blocklist in the kernel only.
    Adopted,
}

impl BlockSource {
    /// Its name on the wire and in the store: `admin`, `auth-failure`, `adopted`.
    pub fn name(self) -> &'static str {
        match self {
            BlockSource::Admin => "admin",
            BlockSource::AuthFailure => "auth-failure",
            BlockSource::Adopted => "adopted",
        }
    }
}

/// A blocked source prefix as stored: its packets are dropped in XDP until `until` (None:
/// until removed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockRecord {
    /// Without host bits.
    pub prefix: ipnet::IpNet,
    pub until: Option<SystemTime>,
    pub source: BlockSource,
    pub created: SystemTime,
}

impl BlockRecord {
    /// Whether the block has ended at `now`.
    pub fn is_expired(&self, now: SystemTime) -> bool {
        self.until.is_some_and(|until| until <= now)
    }
}

/// Store-assigned id of a join token (never reused).
pub type JoinTokenId = i64;

/// A join token as stored: an admin API credential that may add its holder's own address as
/// a backend of `services`, and remove it, and nothing else. Only its secret's SHA-256 is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinTokenRecord {
    pub id: JoinTokenId,
    pub name: String,
    pub secret_sha256: [u8; 32],
    /// The services its holder may join, by key.
    pub services: Vec<ServiceKey>,
    pub created: SystemTime,
    pub revoked: Option<SystemTime>,
}

/// One line of the event log: every change to the backend set and to API keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub id: i64,
    pub at: SystemTime,
    /// What happened, e.g. `backend.added`, `backend.health`, `key.revoked`.
    pub kind: String,
    /// What it happened to, e.g. `backend 3 (10.200.11.2:9944)`.
    pub subject: String,
    /// Why, e.g. `api`, `config reload`, `health: best block 12 behind the cluster`.
    pub detail: String,
}
