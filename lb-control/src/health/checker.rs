//! Scheduling: one task per node checks it on its own clock (and owns the connection its checks
//! share), so a node that hangs until the timeout never delays the checks of the others; a
//! supervisor task owns the [`Judge`], follows the target list, publishes snapshots, logs
//! verdict and saturation changes and records metrics.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use tokio::{
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
};
use tracing::{debug, info, warn};

use super::{
    HealthSettings, HealthSnapshot, Target, Verdict,
    judge::{Judge, Observation},
    probe::Prober,
};
use crate::{
    metrics::{CheckLabels, Metrics, NodeLabels},
    model::HealthCheck,
};

/// Checks waiting for the supervisor; a full queue holds the node tasks back.
const CHECK_QUEUE: usize = 64;

/// Starts checking every target of `targets`, each in its own task, and follows the list:
/// added targets are checked from now on, removed ones stop and leave the snapshot. A new
/// snapshot is published whenever a node's verdict, reason, blocks, lag or error changes.
/// `settings` (and later updates) should have no [`HealthSettings::problems`]. Call it within a
/// Tokio runtime.
pub fn spawn(
    settings: HealthSettings,
    mut targets: watch::Receiver<Vec<Target>>,
    metrics: Arc<Metrics>,
) -> Checker {
    let (settings_sender, settings_receiver) = watch::channel(settings.clone());
    let mut judge = Judge::new(settings);
    // The first snapshot already lists every node, unchecked.
    judge.set_targets(&targets.borrow().iter().copied().collect());
    let (snapshot_sender, snapshots) = watch::channel(Arc::new(judge.snapshot()));
    let (checks_sender, checks) = mpsc::channel(CHECK_QUEUE);
    // So the supervisor starts the node tasks for the current list first thing.
    targets.mark_changed();
    let supervisor = Supervisor {
        judge,
        targets,
        settings: settings_receiver,
        snapshots: snapshot_sender,
        metrics,
        checks,
        checks_sender,
        node_tasks: BTreeMap::new(),
    };
    Checker {
        settings: settings_sender,
        snapshots,
        supervisor: tokio::spawn(supervisor.run()),
    }
}

/// The running checker; dropping it stops every check.
#[derive(Debug)]
pub struct Checker {
    settings: watch::Sender<HealthSettings>,
    snapshots: watch::Receiver<Arc<HealthSnapshot>>,
    supervisor: JoinHandle<()>,
}

impl Checker {
    pub fn snapshots(&self) -> watch::Receiver<Arc<HealthSnapshot>> {
        self.snapshots.clone()
    }

    /// Applies new settings (a config reload) from each node's next check; a node waiting for
    /// its next check is re-timed to the new interval at once.
    pub fn update_settings(&self, settings: HealthSettings) {
        self.settings.send_replace(settings);
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        // The supervisor owns the node tasks: dropping it aborts them.
        self.supervisor.abort();
    }
}

/// One finished check, sent by a node task to the supervisor.
struct Check {
    target: Target,
    observation: Observation,
    took: Duration,
    finished: Instant,
    checked_at: SystemTime,
    /// How soon to check again.
    next: oneshot::Sender<Pace>,
}

#[derive(Debug, Clone, Copy)]
enum Pace {
    Steady,
    /// The node is between verdicts.
    Fast,
}

/// A task that is aborted when this is dropped.
struct NodeTask(JoinHandle<()>);

impl Drop for NodeTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Supervisor {
    judge: Judge,
    targets: watch::Receiver<Vec<Target>>,
    settings: watch::Receiver<HealthSettings>,
    snapshots: watch::Sender<Arc<HealthSnapshot>>,
    metrics: Arc<Metrics>,
    checks: mpsc::Receiver<Check>,
    /// Cloned into every node task.
    checks_sender: mpsc::Sender<Check>,
    node_tasks: BTreeMap<Target, NodeTask>,
}

impl Supervisor {
    async fn run(mut self) {
        let mut targets_open = true;
        loop {
            tokio::select! {
                changed = self.targets.changed(), if targets_open => match changed {
                    Ok(()) => self.follow_targets(),
                    // Nobody changes the list any more: keep checking the last one.
                    Err(_) => targets_open = false,
                },
                changed = self.settings.changed() => match changed {
                    Ok(()) => {
                        let settings = self.settings.borrow_and_update().clone();
                        self.judge.set_settings(settings);
                    }
                    Err(_) => return,
                },
                Some(check) = self.checks.recv() => self.judge_check(check),
            }
        }
    }

    fn follow_targets(&mut self) {
        let wanted: BTreeSet<Target> = self.targets.borrow_and_update().iter().copied().collect();
        let removed: Vec<Target> = self
            .node_tasks
            .keys()
            .filter(|target| !wanted.contains(target))
            .copied()
            .collect();
        for target in removed {
            self.node_tasks.remove(&target);
            if !wanted.iter().any(|kept| kept.endpoint == target.endpoint) {
                self.forget_node_gauges(&target);
            }
        }
        for target in &wanted {
            if target.check != HealthCheck::None && !self.node_tasks.contains_key(target) {
                let task = tokio::spawn(check_node(
                    *target,
                    self.settings.clone(),
                    self.checks_sender.clone(),
                ));
                self.node_tasks.insert(*target, NodeTask(task));
            }
        }
        if self.judge.set_targets(&wanted) {
            self.publish();
        }
    }

    fn judge_check(&mut self, check: Check) {
        let target = check.target;
        let Some(judgement) = self.judge.record(
            &target,
            &check.observation,
            check.finished,
            check.checked_at,
        ) else {
            return; // removed while it was being checked
        };
        let pace = if judgement.pending {
            Pace::Fast
        } else {
            Pace::Steady
        };
        // The task may have been aborted meanwhile; then nobody waits.
        let _ = check.next.send(pace);

        let node = target.to_string();
        let result = judgement.result.label();
        self.metrics
            .health_checks
            .get_or_create(&CheckLabels {
                node: node.clone(),
                result: result.to_owned(),
            })
            .inc();
        let labels = NodeLabels { node };
        self.metrics
            .health_check_seconds
            .get_or_create(&labels)
            .observe(check.took.as_secs_f64());
        let Some(health) = self.judge.health(&target) else {
            return;
        };
        let saturated = match &check.observation {
            Observation::Saturated(saturation) => Some(saturation.refusal.as_str()),
            _ => None,
        };
        self.metrics
            .node_saturated
            .get_or_create(&labels)
            .set(i64::from(health.saturated));
        if check.observation.chain_status().is_some() {
            for (family, value) in [
                (&self.metrics.node_best_block, health.best),
                (&self.metrics.node_finalized_block, health.finalized),
                (&self.metrics.node_lag_blocks, health.lag),
            ] {
                if let Some(value) = value {
                    family
                        .get_or_create(&labels)
                        .set(i64::try_from(value).unwrap_or(i64::MAX));
                }
            }
        }
        debug!(
            node = %target,
            result,
            took = ?check.took,
            best = health.best,
            lag = health.lag,
            "health check"
        );
        match judgement.new_verdict {
            Some(Verdict::Healthy) => info!(node = %target, best = health.best, "node is healthy"),
            Some(Verdict::Unhealthy) => warn!(
                node = %target,
                reason = health.reason.as_deref().unwrap_or_default(),
                "node is unhealthy"
            ),
            Some(Verdict::Unknown) | None => {}
        }
        match judgement.new_saturated {
            Some(true) => warn!(
                node = %target,
                refusal = saturated.unwrap_or_default(),
                "node is saturated: it refuses new connections (too many connections); it keeps \
                 its clients and its place in the kernel table, and gets no new gateway clients"
            ),
            Some(false) => info!(node = %target, "node is no longer saturated"),
            None => {}
        }
        if judgement.changed {
            self.publish();
        }
    }

    fn publish(&self) {
        self.snapshots.send_replace(Arc::new(self.judge.snapshot()));
    }

    /// A removed node's blocks would otherwise be reported at their last value forever.
    fn forget_node_gauges(&self, target: &Target) {
        let labels = NodeLabels {
            node: target.to_string(),
        };
        for family in [
            &self.metrics.node_best_block,
            &self.metrics.node_finalized_block,
            &self.metrics.node_lag_blocks,
            &self.metrics.node_saturated,
        ] {
            family.remove(&labels);
        }
    }
}

/// Checks `target` forever, on the connection its checks share: a check, then a wait from that
/// check's start for the interval the supervisor's verdict asks for.
async fn check_node(
    target: Target,
    mut settings: watch::Receiver<HealthSettings>,
    checks: mpsc::Sender<Check>,
) {
    let mut prober = Prober::new(target);
    loop {
        let timeout = settings.borrow_and_update().timeout;
        let started = Instant::now();
        let observation = prober.check(timeout).await;
        let (next_sender, next) = oneshot::channel();
        let check = Check {
            target,
            observation,
            took: started.elapsed(),
            finished: Instant::now(),
            checked_at: SystemTime::now(),
            next: next_sender,
        };
        if checks.send(check).await.is_err() {
            return;
        }
        let Ok(pace) = next.await else {
            return;
        };
        loop {
            let delay = {
                let settings = settings.borrow_and_update();
                match pace {
                    Pace::Steady => settings.interval,
                    Pace::Fast => settings.fast_interval,
                }
            };
            tokio::select! {
                () = tokio::time::sleep_until((started + delay).into()) => break,
                changed = settings.changed() => if changed.is_err() {
                    return;
                },
            }
        }
    }
}
