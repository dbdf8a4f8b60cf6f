//! The chain-aware health checker: decides which nodes may get traffic.
//!
//! A Substrate node that accepts connections is not necessarily useful: it may be syncing,
//! cut off from its peers, stuck on an old block, or a few blocks behind the others, and a
//! client reading from it sees the past. So each node is asked, over a WebSocket the checker
//! keeps open across checks, for `system_health`, its best and finalized block and its genesis
//! hash, and judged against the other nodes of the same chain (same genesis hash): one that
//! trails the best of them by more than `max_lag` blocks, or whose best block has not moved for
//! `stall_after`, is unhealthy like one that does not answer.
//!
//! A node whose connection slots are all taken by clients answers new connections with `HTTP
//! 429` "Too many connections". That node is **saturated**, not down: it keeps its place in the
//! kernel's table (its clients keep working), and the gateway places no new clients on it.
//!
//! - [`settings`](HealthSettings): the `[health]` config section.
//! - `probe`: one check of one node, on the connection it keeps (I/O only).
//! - `judge`: turns checks into verdicts (rise/fall, lag, stall, badness); pure and synchronous,
//!   so its rules are tested with synthetic times.
//! - `checker`: one task per node, so a slow node never delays the others, and a supervisor
//!   that owns the judge, publishes [`HealthSnapshot`]s, logs verdict changes and records
//!   metrics.

mod checker;
mod judge;
mod probe;
mod settings;

use std::{collections::BTreeMap, fmt, net::SocketAddr, time::SystemTime};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub use checker::{Checker, spawn};
pub use settings::HealthSettings;

use crate::model::HealthCheck;

/// One thing to check: a node's endpoint and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Target {
    pub endpoint: SocketAddr,
    pub check: HealthCheck,
    /// Judged from scratch, apart from the node's usual target: a backend joining (or rejoining
    /// after a rollout restarted its node) must pass `rise` checks made from then on, whatever
    /// the node's earlier checks found.
    pub joining: bool,
}

impl Target {
    /// A node's JSON-RPC endpoint checked as a Substrate node (a remote gateway's relay).
    pub fn substrate(endpoint: SocketAddr) -> Target {
        Target {
            endpoint,
            check: HealthCheck::Substrate,
            joining: false,
        }
    }
}

/// The node as logs and metrics name it: its endpoint.
impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.endpoint)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Not judged yet: its first check has not finished.
    Unknown,
    Healthy,
    Unhealthy,
}

/// How far a node is from being useful, for the "keep the least bad" fallback when every node
/// of a service is unhealthy: smaller is better. A node that answers comes before one that
/// answers badly, times out or refuses connections; among answering nodes, the fewer blocks
/// behind its chain's best, the better.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Badness {
    pub condition: Condition,
    /// Blocks behind the best block of the node's chain, at its last answer.
    pub blocks_behind: u64,
}

/// The coarse part of [`Badness`], best first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Condition {
    #[default]
    Healthy,
    /// Answers, but is behind, stalled, syncing or without peers, or is still rising.
    Answering,
    /// Answers with an HTTP error, a JSON-RPC error or something that is not JSON-RPC.
    BadAnswer,
    TimingOut,
    /// Refuses or drops connections.
    Unreachable,
    /// Not checked yet.
    Unchecked,
}

/// What the checker knows about one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct NodeHealth {
    pub verdict: Verdict,
    #[serde(skip)]
    pub badness: Badness,
    /// Why the node is unhealthy, e.g. "best block 12 behind the cluster's best (104)",
    /// "connect: Connection refused (os error 111)", "timed out after 1s", "syncing".
    pub reason: Option<String>,
    /// Best and finalized block number, genesis hash and blocks behind its chain's best, as of
    /// the node's last answer (kept while it does not answer).
    pub best: Option<u64>,
    pub finalized: Option<u64>,
    pub lag: Option<u64>,
    pub genesis: Option<String>,
    /// The last failed check's error, kept after the node recovers.
    pub last_error: Option<String>,
    /// The node refused the checker's new connection at its last check with "too many
    /// connections" (HTTP 429): every connection slot is taken. It is not down for that: it
    /// stays in the kernel's table and keeps its clients, but gets no new gateway clients.
    pub saturated: bool,
    /// Checks passed in a row (none failed since), counted up to `rise`: a node at `rise` has
    /// risen, which a joining backend waits for.
    pub passes: u32,
    /// When the last check finished (RFC 3339).
    #[serde(serialize_with = "serialize_time")]
    #[schema(value_type = Option<String>, example = "2026-11-25T15:20:00.123Z")]
    pub last_checked: Option<SystemTime>,
}

fn serialize_time<S: serde::Serializer>(
    time: &Option<SystemTime>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match time {
        Some(time) => serializer.collect_str(&humantime::format_rfc3339_millis(*time)),
        None => serializer.serialize_none(),
    }
}

impl NodeHealth {
    /// A node not checked yet: what a snapshot says of it before its first check.
    pub fn unchecked() -> Self {
        NodeHealth {
            verdict: Verdict::Unknown,
            badness: Badness {
                condition: Condition::Unchecked,
                blocks_behind: 0,
            },
            reason: None,
            best: None,
            finalized: None,
            lag: None,
            genesis: None,
            last_error: None,
            saturated: false,
            passes: 0,
            last_checked: None,
        }
    }

    /// For nodes that are never checked.
    fn always_healthy() -> Self {
        NodeHealth {
            verdict: Verdict::Healthy,
            badness: Badness::default(),
            ..NodeHealth::unchecked()
        }
    }
}

/// Every checked node's health at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HealthSnapshot {
    pub nodes: BTreeMap<Target, NodeHealth>,
    /// The best block of the cluster: the highest best block among the nodes whose last check
    /// got an answer and that are not syncing. `None` when no such node exists or when the
    /// nodes serve several chains (then see `chains`).
    pub cluster_best: Option<u64>,
    /// The best block of each chain, by genesis hash; a node's lag is measured against its own
    /// chain's, so one load balancer can serve Polkadot and Kusama nodes side by side.
    pub chains: BTreeMap<String, u64>,
    /// The `rise` these verdicts were judged with: a joining backend enters once its node has
    /// passed this many checks in a row.
    pub rise: u32,
}
