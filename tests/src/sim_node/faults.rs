//! Faults a test can switch on and off while a node runs, and the node's current set of them.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::clock::BlockNumber;

/// One fault, as `POST /fault` takes it: `{"fault":"slow","delay_ms":3000}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "fault", rename_all = "snake_case", deny_unknown_fields)]
pub enum Fault {
    /// Clears every fault.
    None,
    /// Accept connections but never answer a JSON-RPC call (and send no notifications).
    Unresponsive,
    /// Answer every call only after `delay_ms`.
    Slow { delay_ms: u64 },
    /// `system_health.isSyncing` is true, so `/health/readiness` answers 500.
    Syncing,
    /// The best block stops where it is.
    Stall,
    /// The best block is `blocks` below the chain's.
    Behind { blocks: BlockNumber },
    /// `system_health.peers` is 0.
    NoPeers,
    /// Drop every open connection and drop new ones right after accepting them.
    CloseConnections,
    /// Stop the node: the server closes (the binary exits).
    Exit,
}

/// The faults in force; they combine (e.g. slow and behind).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ActiveFaults {
    pub unresponsive: bool,
    pub slow: Option<Duration>,
    pub syncing: bool,
    /// The chain's best block when the stall began; the node's best stays at or below it.
    pub stalled_at: Option<BlockNumber>,
    pub behind: BlockNumber,
    pub no_peers: bool,
    pub close_connections: bool,
    pub exit: bool,
}

impl ActiveFaults {
    /// Adds `fault` (or clears all for [`Fault::None`]). `chain_best` is the chain's best block
    /// now, where a stall freezes the node.
    pub fn apply(&mut self, fault: Fault, chain_best: BlockNumber) {
        match fault {
            Fault::None => *self = Self::default(),
            Fault::Unresponsive => self.unresponsive = true,
            Fault::Slow { delay_ms } => self.slow = Some(Duration::from_millis(delay_ms)),
            Fault::Syncing => self.syncing = true,
            Fault::Stall => {
                self.stalled_at.get_or_insert(chain_best);
            }
            Fault::Behind { blocks } => self.behind = blocks,
            Fault::NoPeers => self.no_peers = true,
            Fault::CloseConnections => self.close_connections = true,
            Fault::Exit => self.exit = true,
        }
    }

    /// The node's best block given the chain's.
    pub fn node_best(&self, chain_best: BlockNumber) -> BlockNumber {
        let reached = self
            .stalled_at
            .map_or(chain_best, |stalled| stalled.min(chain_best));
        reached.saturating_sub(self.behind)
    }

    /// The faults in force, in `POST /fault` form.
    pub fn to_list(&self) -> Vec<Fault> {
        let mut list = Vec::new();
        if self.unresponsive {
            list.push(Fault::Unresponsive);
        }
        if let Some(delay) = self.slow {
            list.push(Fault::Slow {
                delay_ms: delay.as_millis() as u64,
            });
        }
        if self.syncing {
            list.push(Fault::Syncing);
        }
        if self.stalled_at.is_some() {
            list.push(Fault::Stall);
        }
        if self.behind > 0 {
            list.push(Fault::Behind {
                blocks: self.behind,
            });
        }
        if self.no_peers {
            list.push(Fault::NoPeers);
        }
        if self.close_connections {
            list.push(Fault::CloseConnections);
        }
        if self.exit {
            list.push(Fault::Exit);
        }
        list
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_parse_from_control_api_json() {
        let parse = |text| serde_json::from_str::<Fault>(text).expect(text);
        assert_eq!(parse(r#"{"fault":"unresponsive"}"#), Fault::Unresponsive);
        assert_eq!(
            parse(r#"{"fault":"slow","delay_ms":3000}"#),
            Fault::Slow { delay_ms: 3000 }
        );
        assert_eq!(
            parse(r#"{"fault":"behind","blocks":10}"#),
            Fault::Behind { blocks: 10 }
        );
        assert_eq!(parse(r#"{"fault":"no_peers"}"#), Fault::NoPeers);
        assert!(serde_json::from_str::<Fault>(r#"{"fault":"slow"}"#).is_err());
        assert!(serde_json::from_str::<Fault>(r#"{"fault":"melt"}"#).is_err());
    }

    #[test]
    fn stall_and_behind_combine_and_none_clears_everything() {
        let mut faults = ActiveFaults::default();
        faults.apply(Fault::Stall, 100);
        assert_eq!(faults.node_best(120), 100);
        faults.apply(Fault::Behind { blocks: 10 }, 120);
        assert_eq!(faults.node_best(130), 90);
        faults.apply(Fault::Slow { delay_ms: 5 }, 130);
        assert_eq!(
            faults.to_list(),
            [
                Fault::Slow { delay_ms: 5 },
                Fault::Stall,
                Fault::Behind { blocks: 10 }
            ]
        );
        faults.apply(Fault::None, 130);
        assert_eq!(faults, ActiveFaults::default());
        assert_eq!(faults.node_best(130), 130);
    }

    #[test]
    fn behind_more_than_the_chain_height_stays_at_genesis() {
        let faults = ActiveFaults {
            behind: 50,
            ..ActiveFaults::default()
        };
        assert_eq!(faults.node_best(10), 0);
    }
}
