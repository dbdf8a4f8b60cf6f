//! Turns what checks observe into verdicts: the first check decides, afterwards `fall` failures
//! in a row take a node out and `rise` good checks bring it back; an answering node fails when
//! it is syncing, has no peers, has not moved its best block for `stall_after`, or trails its
//! chain's best block by more than `max_lag`. A node that refuses new connections with "too
//! many connections" is saturated, which is not a failure: when the checker still holds its
//! connection the node is judged on its answer there, and when it holds none the node, alive
//! but full, keeps its verdict (a node not judged yet counts as healthy).
//!
//! No I/O and no clock: times come in with each observation, so every rule is tested without
//! sleeping.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant, SystemTime},
};

use super::{Badness, Condition, HealthSettings, HealthSnapshot, NodeHealth, Target, Verdict};
use crate::model::HealthCheck;

/// What one check of a node saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observation {
    /// A Substrate node's answer.
    Chain(ChainStatus),
    /// A TCP check connected.
    Connected,
    /// The node refuses new connections with "too many connections".
    Saturated(Saturation),
    Failed(ProbeFailure),
}

impl Observation {
    /// The node's answer, if it gave one.
    pub fn chain_status(&self) -> Option<&ChainStatus> {
        match self {
            Observation::Chain(status)
            | Observation::Saturated(Saturation {
                status: Some(status),
                ..
            }) => Some(status),
            Observation::Saturated(_) | Observation::Connected | Observation::Failed(_) => None,
        }
    }
}

/// A node whose connection slots are all taken: it answers a new connection with `HTTP 429`
/// "Too many connections".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Saturation {
    /// Its answer on the connection the checker holds; `None` when the checker holds none
    /// (it lost it while the node was full).
    pub status: Option<ChainStatus>,
    /// How it refused: `HTTP 429 Too Many Requests: Too many connections. …`.
    pub refusal: String,
}

/// A Substrate node's answer to one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainStatus {
    pub genesis: String,
    pub best: u64,
    pub finalized: u64,
    pub peers: u64,
    pub is_syncing: bool,
    pub should_have_peers: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeFailure {
    /// Connecting failed, or the connection broke during the exchange.
    Unreachable(String),
    /// The whole check took longer than this.
    Timeout(Duration),
    /// The node answered, but not with what a Substrate node answers.
    BadAnswer(String),
}

/// The result of one check, as the `health_checks` metric labels it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckResult {
    Ok,
    Unreachable,
    Timeout,
    BadAnswer,
    Syncing,
    NoPeers,
    Lagging,
    Stalled,
    /// Saturated, and the checker holds no connection to ask it on.
    Saturated,
}

impl CheckResult {
    pub fn label(self) -> &'static str {
        match self {
            CheckResult::Ok => "ok",
            CheckResult::Unreachable => "unreachable",
            CheckResult::Timeout => "timeout",
            CheckResult::BadAnswer => "bad_answer",
            CheckResult::Syncing => "syncing",
            CheckResult::NoPeers => "no_peers",
            CheckResult::Lagging => "lagging",
            CheckResult::Stalled => "stalled",
            CheckResult::Saturated => "saturated",
        }
    }
}

/// What judging one check decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Judgement {
    pub result: CheckResult,
    /// The node's new verdict, when this check changed it.
    pub new_verdict: Option<Verdict>,
    /// Whether the node is saturated now, when this check changed it.
    pub new_saturated: Option<bool>,
    /// Whether a snapshot would show more than a new check time.
    pub changed: bool,
    /// The node is between verdicts: check it again soon.
    pub pending: bool,
}

/// The health of every node and what judging needs beyond it.
#[derive(Debug)]
pub struct Judge {
    settings: HealthSettings,
    nodes: BTreeMap<Target, NodeRecord>,
}

#[derive(Debug)]
struct NodeRecord {
    health: NodeHealth,
    /// Checks in a row that disagree with the verdict: failures while healthy, successes while
    /// unhealthy.
    streak: u32,
    /// The node's best block and when it was first seen: a stall is measured from then.
    progress: Option<(u64, Instant)>,
    /// (genesis, best) of the last answer, while that answer counts toward its chain's best:
    /// it answered the last check and was not syncing.
    head: Option<(String, u64)>,
}

/// One check's outcome before rise/fall.
struct Finding {
    result: CheckResult,
    /// Whether the check counts as passed, failed, or (`None`) neither.
    passed: Option<bool>,
    reason: Option<String>,
    badness: Badness,
}

impl Judge {
    pub fn new(settings: HealthSettings) -> Self {
        Judge {
            settings,
            nodes: BTreeMap::new(),
        }
    }

    /// New settings apply from each node's next check.
    pub fn set_settings(&mut self, settings: HealthSettings) {
        self.settings = settings;
    }

    /// Starts tracking added targets (unchecked, or healthy for `HealthCheck::None`) and forgets
    /// removed ones; true when the set changed.
    pub fn set_targets(&mut self, targets: &BTreeSet<Target>) -> bool {
        let before = self.nodes.len();
        self.nodes.retain(|target, _| targets.contains(target));
        let mut changed = self.nodes.len() != before;
        for target in targets {
            if !self.nodes.contains_key(target) {
                let health = match target.check {
                    HealthCheck::None => NodeHealth::always_healthy(),
                    HealthCheck::Substrate | HealthCheck::Tcp => NodeHealth::unchecked(),
                };
                self.nodes.insert(
                    *target,
                    NodeRecord {
                        health,
                        streak: 0,
                        progress: None,
                        head: None,
                    },
                );
                changed = true;
            }
        }
        changed
    }

    pub fn health(&self, target: &Target) -> Option<&NodeHealth> {
        self.nodes.get(target).map(|record| &record.health)
    }

    /// Judges one check of `target` that finished at `now` (`checked_at` on the wall clock).
    /// `None` when the target is no longer tracked.
    pub fn record(
        &mut self,
        target: &Target,
        observation: &Observation,
        now: Instant,
        checked_at: SystemTime,
    ) -> Option<Judgement> {
        let chains_before = self.chain_bests();
        let record = self.nodes.get_mut(target)?;
        record.note_head(observation, now);
        let chain_best = observation
            .chain_status()
            .and_then(|status| self.chain_best(&status.genesis));
        let record = self.nodes.get_mut(target)?;
        let finding = assess(
            &self.settings,
            observation,
            chain_best,
            record.progress,
            now,
        );
        let before = record.health.clone();
        let new_verdict = record.count(finding.passed, &self.settings);
        record.apply(observation, &finding, chain_best, checked_at);
        let new_saturated =
            (record.health.saturated != before.saturated).then_some(record.health.saturated);
        let shown_changed = NodeHealth {
            last_checked: before.last_checked,
            ..record.health.clone()
        } != before;
        let pending = record.streak > 0;
        Some(Judgement {
            result: finding.result,
            new_verdict,
            new_saturated,
            changed: shown_changed || self.chain_bests() != chains_before,
            pending,
        })
    }

    pub fn snapshot(&self) -> HealthSnapshot {
        let chains = self.chain_bests();
        let cluster_best = match chains.len() {
            1 => chains.values().next().copied(),
            _ => None,
        };
        HealthSnapshot {
            rise: self.settings.rise,
            nodes: self
                .nodes
                .iter()
                .map(|(target, record)| (*target, record.health.clone()))
                .collect(),
            cluster_best,
            chains,
        }
    }

    fn chain_best(&self, genesis: &str) -> Option<u64> {
        self.nodes
            .values()
            .filter_map(|record| record.head.as_ref())
            .filter(|(chain, _)| chain == genesis)
            .map(|(_, best)| *best)
            .max()
    }

    fn chain_bests(&self) -> BTreeMap<String, u64> {
        let mut chains = BTreeMap::new();
        for (genesis, best) in self
            .nodes
            .values()
            .filter_map(|record| record.head.as_ref())
        {
            let chain_best = chains.entry(genesis.clone()).or_insert(*best);
            *chain_best = (*chain_best).max(*best);
        }
        chains
    }
}

impl NodeRecord {
    fn note_head(&mut self, observation: &Observation, now: Instant) {
        let status = observation.chain_status();
        self.head = status
            .filter(|status| !status.is_syncing)
            .map(|status| (status.genesis.clone(), status.best));
        if let Some(status) = status {
            // Any move counts as progress: a reorg to a lower number is a live node too.
            if self.progress.is_none_or(|(best, _)| best != status.best) {
                self.progress = Some((status.best, now));
            }
        }
    }

    /// Rise/fall: returns the new verdict when this check changes it. A check that neither
    /// passed nor failed (`None`: a saturated node the checker cannot ask) leaves an unhealthy
    /// node as it is and counts as passed otherwise: the node is alive.
    fn count(&mut self, passed: Option<bool>, settings: &HealthSettings) -> Option<Verdict> {
        // Capped, so a node that has long risen shows no change with every check.
        self.health.passes = match passed {
            Some(true) => (self.health.passes + 1).min(settings.rise),
            Some(false) => 0,
            None => self.health.passes,
        };
        let new_verdict = match (self.health.verdict, passed) {
            (Verdict::Unhealthy, None) => None,
            (Verdict::Unknown, Some(true) | None) => Some(Verdict::Healthy),
            (Verdict::Unknown, Some(false)) => Some(Verdict::Unhealthy),
            (Verdict::Healthy, Some(true) | None) | (Verdict::Unhealthy, Some(false)) => {
                self.streak = 0;
                None
            }
            (Verdict::Healthy, Some(false)) => {
                self.streak += 1;
                (self.streak >= settings.fall).then_some(Verdict::Unhealthy)
            }
            (Verdict::Unhealthy, Some(true)) => {
                self.streak += 1;
                (self.streak >= settings.rise).then_some(Verdict::Healthy)
            }
        };
        if let Some(verdict) = new_verdict {
            self.health.verdict = verdict;
            self.streak = 0;
        }
        new_verdict
    }

    fn apply(
        &mut self,
        observation: &Observation,
        finding: &Finding,
        chain_best: Option<u64>,
        checked_at: SystemTime,
    ) {
        let health = &mut self.health;
        if let Some(status) = observation.chain_status() {
            health.best = Some(status.best);
            health.finalized = Some(status.finalized);
            health.lag = chain_best.map(|chain_best| chain_best.saturating_sub(status.best));
            health.genesis = Some(status.genesis.clone());
        }
        health.saturated = matches!(observation, Observation::Saturated(_));
        if let Some(reason) = &finding.reason {
            health.last_error = Some(reason.clone());
        }
        match health.verdict {
            Verdict::Healthy => {
                health.reason = None;
                health.badness = Badness::default();
            }
            Verdict::Unhealthy => {
                // A good check of a node still rising keeps the reason it went out for.
                if finding.reason.is_some() {
                    health.reason = finding.reason.clone();
                }
                health.badness = finding.badness;
            }
            Verdict::Unknown => {}
        }
        health.last_checked = Some(checked_at);
    }
}

fn assess(
    settings: &HealthSettings,
    observation: &Observation,
    chain_best: Option<u64>,
    progress: Option<(u64, Instant)>,
    now: Instant,
) -> Finding {
    let failed = |result, reason: String, condition| Finding {
        result,
        passed: Some(false),
        reason: Some(reason),
        badness: Badness {
            condition,
            blocks_behind: 0,
        },
    };
    let status = match observation {
        Observation::Chain(status)
        | Observation::Saturated(Saturation {
            status: Some(status),
            ..
        }) => status,
        Observation::Saturated(Saturation { status: None, .. }) => {
            return Finding {
                result: CheckResult::Saturated,
                passed: None,
                reason: None,
                badness: Badness {
                    condition: Condition::Answering,
                    blocks_behind: 0,
                },
            };
        }
        Observation::Connected => {
            return Finding {
                result: CheckResult::Ok,
                passed: Some(true),
                reason: None,
                badness: Badness {
                    condition: Condition::Answering,
                    blocks_behind: 0,
                },
            };
        }
        Observation::Failed(ProbeFailure::Unreachable(error)) => {
            return failed(
                CheckResult::Unreachable,
                error.clone(),
                Condition::Unreachable,
            );
        }
        Observation::Failed(ProbeFailure::Timeout(limit)) => {
            return failed(
                CheckResult::Timeout,
                format!("timed out after {}", humantime::format_duration(*limit)),
                Condition::TimingOut,
            );
        }
        Observation::Failed(ProbeFailure::BadAnswer(error)) => {
            return failed(
                CheckResult::BadAnswer,
                format!("bad answer: {error}"),
                Condition::BadAnswer,
            );
        }
    };

    let lag = chain_best.map_or(0, |chain_best| chain_best.saturating_sub(status.best));
    let stalled = progress
        .is_some_and(|(_, since)| now.saturating_duration_since(since) >= settings.stall_after);
    // A syncing node's head means little, so syncing is named first; a stall is named before
    // the lag it causes.
    let (result, reason) = if status.is_syncing {
        (CheckResult::Syncing, Some("syncing".to_owned()))
    } else if status.peers == 0 && status.should_have_peers {
        (CheckResult::NoPeers, Some("no peers".to_owned()))
    } else if stalled {
        (
            CheckResult::Stalled,
            Some(format!(
                "no new block for {} (best {})",
                humantime::format_duration(settings.stall_after),
                status.best
            )),
        )
    } else if lag > settings.max_lag {
        (
            CheckResult::Lagging,
            Some(format!(
                "best block {lag} behind the cluster's best ({})",
                chain_best.unwrap_or_default()
            )),
        )
    } else {
        (CheckResult::Ok, None)
    };
    Finding {
        result,
        passed: Some(result == CheckResult::Ok),
        reason,
        badness: Badness {
            condition: Condition::Answering,
            blocks_behind: lag,
        },
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;

    const GENESIS: &str = "0x91b171bb158e2d3848fa23a9f1c25182fb8e20313b2c1eb49219da7a70ce90c3";
    const STEP: Duration = Duration::from_secs(1);

    fn target(port: u16) -> Target {
        Target {
            endpoint: SocketAddr::from(([127, 0, 0, 1], port)),
            check: HealthCheck::Substrate,
            joining: false,
        }
    }

    fn at_block(best: u64) -> Observation {
        Observation::Chain(ChainStatus {
            genesis: GENESIS.to_owned(),
            best,
            finalized: best.saturating_sub(2),
            peers: 8,
            is_syncing: false,
            should_have_peers: true,
        })
    }

    fn refused() -> Observation {
        Observation::Failed(ProbeFailure::Unreachable(
            "connect: connection refused".to_owned(),
        ))
    }

    /// A judge over `nodes` targets and a clock the test moves by hand.
    struct Bench {
        judge: Judge,
        start: Instant,
        now: Instant,
    }

    impl Bench {
        fn new(settings: HealthSettings, nodes: u16) -> Self {
            let mut judge = Judge::new(settings);
            judge.set_targets(&(1..=nodes).map(target).collect());
            let start = Instant::now();
            Bench {
                judge,
                start,
                now: start,
            }
        }

        fn check(&mut self, port: u16, observation: Observation) -> Judgement {
            let wall = SystemTime::UNIX_EPOCH + self.now.duration_since(self.start);
            self.judge
                .record(&target(port), &observation, self.now, wall)
                .expect("tracked target")
        }

        fn advance(&mut self, by: Duration) {
            self.now += by;
        }

        fn health(&self, port: u16) -> &NodeHealth {
            self.judge.health(&target(port)).expect("tracked target")
        }
    }

    fn healthy_pair() -> Bench {
        let mut bench = Bench::new(HealthSettings::default(), 2);
        bench.check(1, at_block(100));
        bench.check(2, at_block(100));
        bench
    }

    #[test]
    fn passes_count_checks_passed_in_a_row_up_to_rise_and_are_published_until_then() {
        let mut bench = Bench::new(HealthSettings::default(), 2);
        bench.check(2, at_block(100));
        // The first pass decides the verdict; rise (2) passes in a row make the node risen.
        let first = bench.check(1, at_block(100));
        assert_eq!(first.new_verdict, Some(Verdict::Healthy));
        assert_eq!(bench.health(1).passes, 1);
        let second = bench.check(1, at_block(100));
        assert!(second.changed, "reaching rise is news to a joining backend");
        assert_eq!(bench.health(1).passes, 2);
        let third = bench.check(1, at_block(100));
        assert!(
            !third.changed,
            "a risen node's next pass changes nothing shown"
        );
        assert_eq!(bench.health(1).passes, 2);
        // One failure starts the count again, though the verdict holds until `fall`.
        bench.check(1, refused());
        assert_eq!(bench.health(1).verdict, Verdict::Healthy);
        assert_eq!(bench.health(1).passes, 0);
        bench.check(1, at_block(100));
        assert_eq!(bench.health(1).passes, 1);
        assert_eq!(bench.judge.snapshot().rise, 2);
    }

    #[test]
    fn first_check_decides_at_once() {
        let mut bench = Bench::new(HealthSettings::default(), 2);
        assert_eq!(bench.health(1).verdict, Verdict::Unknown);
        assert_eq!(bench.health(1).badness.condition, Condition::Unchecked);

        let up = bench.check(1, at_block(100));
        assert_eq!(up.new_verdict, Some(Verdict::Healthy));
        assert!(!up.pending);
        let down = bench.check(2, refused());
        assert_eq!(down.new_verdict, Some(Verdict::Unhealthy));
        assert_eq!(down.result, CheckResult::Unreachable);
        assert_eq!(
            bench.health(2).reason.as_deref(),
            Some("connect: connection refused")
        );
    }

    #[test]
    fn fall_failures_in_a_row_take_a_node_out() {
        let mut bench = healthy_pair();
        let first = bench.check(1, refused());
        assert_eq!((first.new_verdict, first.pending), (None, true));
        assert_eq!(bench.health(1).verdict, Verdict::Healthy);
        assert_eq!(bench.health(1).reason, None);

        let second = bench.check(1, refused());
        assert_eq!(
            (second.new_verdict, second.pending),
            (Some(Verdict::Unhealthy), false)
        );
        assert_eq!(bench.health(1).badness.condition, Condition::Unreachable);
    }

    #[test]
    fn a_good_check_between_failures_restarts_the_fall_count() {
        let mut bench = healthy_pair();
        bench.check(1, refused());
        let good = bench.check(1, at_block(100));
        assert!(!good.pending);
        bench.check(1, refused());
        assert_eq!(bench.health(1).verdict, Verdict::Healthy);
    }

    #[test]
    fn rise_good_checks_bring_a_node_back_with_its_last_error_kept() {
        let settings = HealthSettings {
            rise: 3,
            ..HealthSettings::default()
        };
        let mut bench = Bench::new(settings, 2);
        bench.check(2, at_block(100));
        bench.check(1, refused());
        for _ in 0..2 {
            let rising = bench.check(1, at_block(100));
            assert_eq!((rising.new_verdict, rising.pending), (None, true));
            let health = bench.health(1);
            assert_eq!(health.verdict, Verdict::Unhealthy);
            assert_eq!(
                health.reason.as_deref(),
                Some("connect: connection refused")
            );
            assert_eq!(health.badness.condition, Condition::Answering);
        }
        let up = bench.check(1, at_block(100));
        assert_eq!(up.new_verdict, Some(Verdict::Healthy));
        let health = bench.health(1);
        assert_eq!(health.reason, None);
        assert_eq!(health.badness, Badness::default());
        assert_eq!(
            health.last_error.as_deref(),
            Some("connect: connection refused")
        );
    }

    #[test]
    fn a_node_more_than_max_lag_behind_its_chain_is_lagging() {
        let mut bench = Bench::new(HealthSettings::default(), 3);
        bench.check(1, at_block(104));
        bench.check(2, at_block(99));
        assert_eq!(bench.health(2).verdict, Verdict::Healthy);
        assert_eq!(bench.health(2).lag, Some(5));

        let judgement = bench.check(3, at_block(92));
        assert_eq!(judgement.result, CheckResult::Lagging);
        let health = bench.health(3);
        assert_eq!(health.verdict, Verdict::Unhealthy);
        assert_eq!(
            health.reason.as_deref(),
            Some("best block 12 behind the cluster's best (104)")
        );
        assert_eq!(health.badness.blocks_behind, 12);
        assert_eq!(bench.judge.snapshot().cluster_best, Some(104));
    }

    #[test]
    fn the_cluster_best_leaves_out_failed_and_syncing_nodes() {
        let mut bench = Bench::new(HealthSettings::default(), 3);
        bench.check(1, at_block(200));
        bench.check(2, at_block(100));
        assert_eq!(bench.health(2).lag, Some(100));

        let Observation::Chain(mut syncing) = at_block(300) else {
            unreachable!()
        };
        syncing.is_syncing = true;
        bench.check(3, Observation::Chain(syncing));
        assert_eq!(bench.judge.snapshot().cluster_best, Some(200));

        let dropped = bench.check(1, refused());
        assert!(dropped.changed);
        assert_eq!(bench.judge.snapshot().cluster_best, Some(100));
        bench.check(2, at_block(101));
        assert_eq!(bench.health(2).lag, Some(0));
    }

    #[test]
    fn nodes_of_other_chains_are_not_compared() {
        let mut bench = Bench::new(HealthSettings::default(), 2);
        bench.check(1, at_block(20_000_000));
        let Observation::Chain(mut kusama) = at_block(25_000_000) else {
            unreachable!()
        };
        kusama.genesis =
            "0xb0a8d493285c2df73290dfb7e61f870f17b41801197a149ca93654499ea3dafe".into();
        bench.check(2, Observation::Chain(kusama.clone()));
        kusama.best = 25_000_001;
        bench.check(2, Observation::Chain(kusama));
        let judgement = bench.check(1, at_block(20_000_001));
        assert_eq!(judgement.result, CheckResult::Ok);
        assert_eq!(bench.health(1).lag, Some(0));
        let snapshot = bench.judge.snapshot();
        assert_eq!(snapshot.chains.len(), 2);
        assert_eq!(snapshot.cluster_best, None);
    }

    #[test]
    fn a_best_block_unmoved_for_stall_after_is_a_stall() {
        let settings = HealthSettings {
            stall_after: Duration::from_secs(10),
            fall: 1,
            ..HealthSettings::default()
        };
        let mut bench = Bench::new(settings, 1);
        bench.check(1, at_block(100));
        for _ in 0..9 {
            bench.advance(STEP);
            assert_eq!(bench.check(1, at_block(100)).result, CheckResult::Ok);
        }
        bench.advance(STEP);
        let stalled = bench.check(1, at_block(100));
        assert_eq!(stalled.result, CheckResult::Stalled);
        assert_eq!(
            bench.health(1).reason.as_deref(),
            Some("no new block for 10s (best 100)")
        );

        bench.advance(STEP);
        assert_eq!(bench.check(1, at_block(101)).result, CheckResult::Ok);
    }

    #[test]
    fn progress_is_measured_across_failed_checks() {
        let settings = HealthSettings {
            stall_after: Duration::from_secs(10),
            ..HealthSettings::default()
        };
        let mut bench = Bench::new(settings, 1);
        bench.check(1, at_block(100));
        bench.advance(Duration::from_secs(30));
        bench.check(1, refused());
        assert_eq!(bench.check(1, at_block(100)).result, CheckResult::Stalled);
    }

    #[test]
    fn syncing_and_peerless_nodes_are_unhealthy() {
        let mut bench = Bench::new(HealthSettings::default(), 3);
        let Observation::Chain(status) = at_block(100) else {
            unreachable!()
        };
        let syncing = ChainStatus {
            is_syncing: true,
            ..status.clone()
        };
        assert_eq!(
            bench.check(1, Observation::Chain(syncing)).result,
            CheckResult::Syncing
        );
        assert_eq!(bench.health(1).reason.as_deref(), Some("syncing"));

        let peerless = ChainStatus {
            peers: 0,
            ..status.clone()
        };
        assert_eq!(
            bench.check(2, Observation::Chain(peerless)).result,
            CheckResult::NoPeers
        );
        assert_eq!(bench.health(2).reason.as_deref(), Some("no peers"));

        let alone_by_design = ChainStatus {
            peers: 0,
            should_have_peers: false,
            ..status
        };
        assert_eq!(
            bench.check(3, Observation::Chain(alone_by_design)).result,
            CheckResult::Ok
        );
    }

    #[test]
    fn badness_puts_answering_nodes_first_and_fewer_blocks_behind_before_more() {
        let mut bench = Bench::new(HealthSettings::default(), 6);
        bench.check(1, at_block(100));
        bench.check(2, at_block(90));
        bench.check(3, at_block(80));
        bench.check(
            4,
            Observation::Failed(ProbeFailure::BadAnswer("HTTP 503".into())),
        );
        bench.check(
            5,
            Observation::Failed(ProbeFailure::Timeout(Duration::from_secs(1))),
        );
        bench.check(6, refused());
        let badness: Vec<Badness> = (2..=6).map(|port| bench.health(port).badness).collect();
        assert!(badness.is_sorted(), "{badness:?}");
        assert!(badness.windows(2).all(|pair| pair[0] != pair[1]));
        assert!(bench.health(1).badness < badness[0]);
        assert_eq!(
            bench.health(5).reason.as_deref(),
            Some("timed out after 1s")
        );
        assert_eq!(
            bench.health(4).reason.as_deref(),
            Some("bad answer: HTTP 503")
        );
    }

    fn saturated(status: Option<Observation>) -> Observation {
        Observation::Saturated(Saturation {
            status: status.and_then(|observation| observation.chain_status().cloned()),
            refusal: "HTTP 429 Too Many Requests: Too many connections".to_owned(),
        })
    }

    #[test]
    fn a_saturated_node_is_judged_on_its_held_connection_and_never_down_for_being_full() {
        let mut bench = Bench::new(HealthSettings::default(), 4);
        bench.check(1, at_block(100));

        // Answers on the checker's connection, refuses new ones: healthy, and saturated.
        let full = bench.check(1, saturated(Some(at_block(100))));
        assert_eq!(
            (full.result, full.new_saturated),
            (CheckResult::Ok, Some(true))
        );
        assert!(full.changed);
        assert_eq!(bench.health(1).verdict, Verdict::Healthy);
        assert!(bench.health(1).saturated);

        // No connection left to ask on: still not down however long it lasts, and a failure
        // before it does not count toward `fall`.
        bench.check(1, refused());
        for _ in 0..5 {
            let judgement = bench.check(1, saturated(None));
            assert_eq!(judgement.result, CheckResult::Saturated);
            assert_eq!((judgement.new_verdict, judgement.pending), (None, false));
        }
        bench.check(1, refused());
        assert_eq!(bench.health(1).verdict, Verdict::Healthy);
        assert_eq!(bench.health(1).best, Some(100));

        // A node first seen saturated is in at once.
        assert_eq!(
            bench.check(2, saturated(None)).new_verdict,
            Some(Verdict::Healthy)
        );

        // Full and behind is down for being behind; an unhealthy node the checker cannot ask
        // stays unhealthy.
        bench.check(1, at_block(104));
        let behind = bench.check(3, saturated(Some(at_block(90))));
        assert_eq!(behind.result, CheckResult::Lagging);
        assert_eq!(bench.health(3).verdict, Verdict::Unhealthy);
        bench.check(4, refused());
        bench.check(4, saturated(None));
        bench.check(4, saturated(None));
        assert_eq!(bench.health(4).verdict, Verdict::Unhealthy);
        assert!(bench.health(4).saturated);

        // Admitting new connections again ends it.
        let admitted = bench.check(2, at_block(104));
        assert_eq!(admitted.new_saturated, Some(false));
        assert!(!bench.health(2).saturated);
    }

    #[test]
    fn only_shown_changes_count_as_changes() {
        let mut bench = healthy_pair();
        bench.advance(STEP);
        assert!(bench.check(1, at_block(100)).changed, "rise passes reached");
        assert!(!bench.check(1, at_block(100)).changed);
        assert!(bench.check(1, at_block(101)).changed);
        assert!(bench.check(2, refused()).changed, "a new last error");
        assert!(bench.check(2, refused()).changed, "a new verdict");
        assert!(!bench.check(2, refused()).changed);
    }

    #[test]
    fn unchecked_targets_are_healthy_and_removed_targets_forgotten() {
        let mut judge = Judge::new(HealthSettings::default());
        let never = Target {
            check: HealthCheck::None,
            ..target(1)
        };
        assert!(judge.set_targets(&[never, target(2)].into()));
        assert_eq!(
            judge.health(&never).map(|h| h.verdict),
            Some(Verdict::Healthy)
        );
        assert!(!judge.set_targets(&[never, target(2)].into()));
        assert!(judge.set_targets(&[never].into()));
        let gone = judge.record(&target(2), &at_block(1), Instant::now(), SystemTime::now());
        assert_eq!(gone, None);
        assert_eq!(judge.snapshot().nodes.len(), 1);
    }
}
