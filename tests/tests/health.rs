//! The health checker against live sim-nodes on 127.0.0.1: healthy nodes are in at once, each
//! fault takes its node out with the reason named, a cleared fault brings it back after `rise`
//! good checks, a node that hangs never delays the checks of the others, and a node whose
//! connection slots are all taken is saturated, not down. The last test runs lb-control in the
//! lab (root, `cargo build --bins` first) to see a saturated node stay in the kernel's table.

mod common;

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, ensure};
use common::{LbControl, ServiceConf, VIP_V4, backend_addr, kernel_states, up, wait_for};
use lb_control::{
    health::{
        self, Checker, Condition, HealthSettings, HealthSnapshot, NodeHealth, Target, Verdict,
    },
    metrics::Metrics,
    model::HealthCheck,
};
use lb_tests::{
    lab::run_checked,
    sim_node::{Fault, SimNode, SimNodeConfig, SimNodeHandle},
};
use prometheus_client::registry::Registry;
use tokio::sync::watch;

/// Fast blocks, so a stalled or lagging node shows within a second.
const BLOCK_TIME: Duration = Duration::from_millis(100);
const INTERVAL: Duration = Duration::from_millis(200);
const STALL_AFTER: Duration = Duration::from_secs(1);
/// How long a test waits for a condition before it fails.
const PATIENCE: Duration = Duration::from_secs(10);

fn settings() -> HealthSettings {
    HealthSettings {
        interval: INTERVAL,
        fast_interval: Duration::from_millis(50),
        timeout: Duration::from_millis(300),
        rise: 2,
        fall: 2,
        max_lag: 5,
        stall_after: STALL_AFTER,
    }
}

/// Sim-nodes of one chain and a checker watching them.
struct Cluster {
    nodes: Vec<SimNodeHandle>,
    targets: watch::Sender<Vec<Target>>,
    snapshots: watch::Receiver<Arc<HealthSnapshot>>,
    registry: Registry,
    // Last: dropping the checker stops the checks before the nodes go.
    _checker: Checker,
}

impl Cluster {
    async fn start(size: usize) -> Cluster {
        let mut nodes = Vec::new();
        for index in 0..size {
            let mut config = SimNodeConfig::new(format!("node{index}"));
            config.block_time = BLOCK_TIME;
            nodes.push(SimNode::start(config).await.expect("sim-node starts"));
        }
        let targets = nodes
            .iter()
            .map(|node| substrate(node.rpc_addr()))
            .collect();
        let (targets, watched) = watch::channel(targets);
        let mut registry = Registry::default();
        let metrics = Arc::new(Metrics::register(&mut registry));
        let checker = health::spawn(settings(), watched, metrics);
        Cluster {
            nodes,
            targets,
            snapshots: checker.snapshots(),
            registry,
            _checker: checker,
        }
    }

    fn target(&self, index: usize) -> Target {
        substrate(self.nodes[index].rpc_addr())
    }

    /// Waits until `condition` holds for a published snapshot; returns that snapshot.
    async fn wait_for(
        &mut self,
        what: &str,
        condition: impl Fn(&HealthSnapshot) -> bool,
    ) -> Arc<HealthSnapshot> {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let snapshot = self.snapshots.borrow_and_update().clone();
            if condition(&snapshot) {
                return snapshot;
            }
            let changed = tokio::time::timeout_at(deadline, self.snapshots.changed()).await;
            assert!(
                changed.is_ok(),
                "timed out after {PATIENCE:?} waiting for {what}; last snapshot: {snapshot:#?}"
            );
        }
    }

    async fn wait_for_node(
        &mut self,
        index: usize,
        what: &str,
        condition: impl Fn(&NodeHealth) -> bool,
    ) -> NodeHealth {
        let target = self.target(index);
        let snapshot = self
            .wait_for(&format!("node{index} {what}"), |snapshot| {
                snapshot.nodes.get(&target).is_some_and(&condition)
            })
            .await;
        snapshot.nodes[&target].clone()
    }

    async fn wait_until_all_healthy(&mut self) -> Arc<HealthSnapshot> {
        let count = self.nodes.len();
        self.wait_for("every node healthy", |snapshot| {
            snapshot.nodes.len() == count
                && snapshot
                    .nodes
                    .values()
                    .all(|node| node.verdict == Verdict::Healthy)
        })
        .await
    }

    fn metrics_text(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("encodes");
        text
    }
}

fn substrate(endpoint: SocketAddr) -> Target {
    Target {
        endpoint,
        check: HealthCheck::Substrate,
        joining: false,
    }
}

fn is_unhealthy_because(node: &NodeHealth, reason: &str) -> bool {
    node.verdict == Verdict::Unhealthy
        && node
            .reason
            .as_deref()
            .is_some_and(|text| text.contains(reason))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_nodes_are_healthy_with_their_blocks_and_checks_counted() {
    let mut cluster = Cluster::start(3).await;
    let snapshot = cluster.wait_until_all_healthy().await;

    let cluster_best = snapshot.cluster_best.expect("a cluster best");
    assert_eq!(snapshot.chains.len(), 1);
    for node in snapshot.nodes.values() {
        let best = node.best.expect("best block");
        assert!(best <= cluster_best);
        assert!(node.finalized.expect("finalized block") < best);
        assert!(node.lag.expect("lag") <= settings().max_lag);
        assert_eq!(node.reason, None);
        assert!(node.last_checked.is_some());
    }
    let metrics = cluster.metrics_text();
    let endpoint = cluster.nodes[0].rpc_addr();
    assert!(
        metrics.contains(&format!(
            "lb_health_checks_total{{node=\"{endpoint}\",result=\"ok\"}}"
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!("lb_node_best_block{{node=\"{endpoint}\"}}")),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syncing_node_goes_out_and_returns_after_rise_good_checks() {
    let mut cluster = Cluster::start(3).await;
    cluster.wait_until_all_healthy().await;

    cluster.nodes[0].set_fault(Fault::Syncing);
    let out = cluster
        .wait_for_node(0, "unhealthy: syncing", |node| {
            is_unhealthy_because(node, "syncing")
        })
        .await;
    assert_eq!(out.badness.condition, Condition::Answering);

    cluster.nodes[0].clear_faults();
    let back = cluster
        .wait_for_node(0, "healthy again", |node| node.verdict == Verdict::Healthy)
        .await;
    assert_eq!(back.reason, None);
    assert_eq!(back.last_error.as_deref(), Some("syncing"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_without_peers_goes_out() {
    let mut cluster = Cluster::start(3).await;
    cluster.wait_until_all_healthy().await;

    cluster.nodes[1].set_fault(Fault::NoPeers);
    cluster
        .wait_for_node(1, "unhealthy: no peers", |node| {
            is_unhealthy_because(node, "no peers")
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_behind_the_cluster_goes_out_as_lagging() {
    let mut cluster = Cluster::start(3).await;
    cluster.wait_until_all_healthy().await;

    cluster.nodes[2].set_fault(Fault::Behind { blocks: 10 });
    let out = cluster
        .wait_for_node(2, "unhealthy: lagging", |node| {
            is_unhealthy_because(node, "behind the cluster's best")
        })
        .await;
    let lag = out.lag.expect("lag");
    assert!(lag > settings().max_lag, "lag {lag}");
    assert_eq!(out.badness.blocks_behind, lag);
    let metrics = cluster.metrics_text();
    assert!(metrics.contains("result=\"lagging\""), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_node_goes_out_after_stall_after() {
    let mut cluster = Cluster::start(3).await;
    cluster.wait_until_all_healthy().await;

    let stalled_at = Instant::now();
    cluster.nodes[0].set_fault(Fault::Stall);
    cluster
        .wait_for_node(0, "unhealthy: stalled", |node| {
            is_unhealthy_because(node, "no new block for 1s")
        })
        .await;
    // The frozen block may have been made up to one block time before the fault.
    let took = stalled_at.elapsed();
    assert!(took >= STALL_AFTER - BLOCK_TIME, "stalled after {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_that_exits_goes_out_as_unreachable_within_interval_and_fall() {
    let mut cluster = Cluster::start(3).await;
    cluster.wait_until_all_healthy().await;

    let exited_at = Instant::now();
    cluster.nodes[1].set_fault(Fault::Exit);
    cluster.nodes[1].stopped().await;
    let out = cluster
        .wait_for_node(1, "unhealthy: unreachable", |node| {
            is_unhealthy_because(node, "connect")
        })
        .await;
    assert_eq!(out.badness.condition, Condition::Unreachable);
    // interval + (fall - 1) * fast_interval, with room for a busy machine.
    let took = exited_at.elapsed();
    assert!(took < Duration::from_secs(1), "out after {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_node_times_out_without_delaying_the_checks_of_the_others() {
    let mut cluster = Cluster::start(3).await;
    cluster.wait_until_all_healthy().await;

    cluster.nodes[0].set_fault(Fault::Slow { delay_ms: 2000 });
    let out = cluster
        .wait_for_node(0, "unhealthy: timeout", |node| {
            is_unhealthy_because(node, "timed out after 300ms")
        })
        .await;
    assert_eq!(out.badness.condition, Condition::TimingOut);

    // While node0 hangs, the others are still checked every interval: with a block every
    // 100 ms each of their checks finds a new best block, so each one is published. Checks
    // that waited for node0's 300 ms timeout would leave gaps of 300 ms or more.
    let others = [cluster.target(1), cluster.target(2)];
    let mut seen: Vec<Vec<SystemTime>> = vec![Vec::new(); others.len()];
    let watch_until = tokio::time::Instant::now() + Duration::from_millis(1200);
    loop {
        let snapshot = cluster.snapshots.borrow_and_update().clone();
        assert_eq!(
            snapshot.nodes[&cluster.target(0)].verdict,
            Verdict::Unhealthy
        );
        for (target, times) in others.iter().zip(&mut seen) {
            let checked = snapshot.nodes[target].last_checked.expect("checked");
            if times.last() != Some(&checked) {
                times.push(checked);
            }
        }
        if tokio::time::timeout_at(watch_until, cluster.snapshots.changed())
            .await
            .is_err()
        {
            break;
        }
    }
    let watched_until = SystemTime::now();
    for (target, times) in others.iter().zip(&seen) {
        let gaps: Vec<Duration> = times
            .windows(2)
            .map(|pair| pair[1].duration_since(pair[0]).unwrap_or_default())
            .chain([watched_until
                .duration_since(*times.last().expect("checked"))
                .unwrap_or_default()])
            .collect();
        assert!(times.len() >= 4, "{target}: checked at {times:?}");
        assert!(
            gaps.iter().all(|gap| *gap < INTERVAL + INTERVAL / 2),
            "{target}: gaps between checks {gaps:?}"
        );
    }
    let metrics = cluster.metrics_text();
    assert!(metrics.contains("result=\"timeout\""), "{metrics}");

    cluster.nodes[0].clear_faults();
    cluster
        .wait_for_node(0, "healthy again", |node| node.verdict == Verdict::Healthy)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checker_follows_the_target_list() {
    let mut cluster = Cluster::start(2).await;
    cluster.wait_until_all_healthy().await;

    let kept = cluster.target(0);
    let tcp = Target {
        endpoint: cluster.nodes[1].rpc_addr(),
        check: HealthCheck::Tcp,
        joining: false,
    };
    // Nothing listens on port 9 of 127.0.0.1, and nothing is asked of an unchecked target.
    let unchecked = Target {
        endpoint: SocketAddr::from(([127, 0, 0, 1], 9)),
        check: HealthCheck::None,
        joining: false,
    };
    cluster.targets.send_replace(vec![kept, tcp, unchecked]);
    let snapshot = cluster
        .wait_for("the new target list, checked", |snapshot| {
            snapshot.nodes.keys().copied().collect::<BTreeSet<_>>()
                == BTreeSet::from([kept, tcp, unchecked])
                && snapshot
                    .nodes
                    .values()
                    .all(|node| node.verdict == Verdict::Healthy)
        })
        .await;
    assert_eq!(snapshot.nodes[&tcp].best, None);
    assert_eq!(snapshot.nodes[&unchecked].last_checked, None);
}

/// Refusals in a row that show a node full: one may be a slot the checker's momentary request
/// for a new connection holds.
const REFUSALS_WHEN_FULL: usize = 3;

/// Opens WebSockets to `url` until the node refuses them with 429 "Too many connections";
/// returns the open ones, which hold the node's slots until dropped.
async fn fill_connection_slots(
    url: &str,
) -> Vec<tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>>
{
    let (mut held, mut refusals) = (Vec::new(), 0);
    loop {
        match tokio_tungstenite::connect_async(url).await {
            Ok((socket, _)) => {
                held.push(socket);
                refusals = 0;
            }
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 429, "refused otherwise");
                refusals += 1;
                if refusals == REFUSALS_WHEN_FULL {
                    return held;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(error) => panic!("connection {} to {url}: {error}", held.len() + 1),
        }
        assert!(
            held.len() <= 100,
            "the node admitted more than 100 connections"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_node_is_saturated_not_down_while_a_dead_node_still_goes_out() {
    let mut cluster = Cluster::start(3).await;
    cluster.wait_until_all_healthy().await;

    // Clients take every slot but the one the checker holds.
    let held = fill_connection_slots(&cluster.nodes[0].ws_url()).await;
    assert_eq!(held.len(), 99, "the checker holds the 100th connection");
    let full = cluster
        .wait_for_node(0, "saturated", |node| node.saturated)
        .await;
    assert_eq!(full.verdict, Verdict::Healthy);
    let endpoint = cluster.nodes[0].rpc_addr();
    let metrics = cluster.metrics_text();
    assert!(
        metrics.contains(&format!("lb_node_saturated{{node=\"{endpoint}\"}} 1")),
        "{metrics}"
    );

    // A node that dies meanwhile goes out as fast as ever.
    let exited_at = Instant::now();
    cluster.nodes[1].set_fault(Fault::Exit);
    cluster.nodes[1].stopped().await;
    cluster
        .wait_for_node(1, "unhealthy: unreachable", |node| {
            is_unhealthy_because(node, "connect")
        })
        .await;
    let took = exited_at.elapsed();
    assert!(took < Duration::from_secs(1), "out after {took:?}");

    // The full node is still checked, on the checker's own connection, and never down: its
    // best block keeps moving.
    let best = full.best.expect("best block");
    let later = cluster
        .wait_for_node(0, "checked at a later block", |node| {
            node.best.is_some_and(|now| now > best + 3)
        })
        .await;
    assert_eq!(later.verdict, Verdict::Healthy);
    assert!(later.saturated);

    drop(held);
    let free = cluster
        .wait_for_node(0, "no longer saturated", |node| !node.saturated)
        .await;
    assert_eq!(free.verdict, Verdict::Healthy);
    let metrics = cluster.metrics_text();
    assert!(
        metrics.contains(&format!("lb_node_saturated{{node=\"{endpoint}\"}} 0")),
        "{metrics}"
    );
}

/// Node `address` as `lb-control health --json` lists it.
fn health_of(
    lb_control: &LbControl,
    lab: &lb_tests::lab::Lab,
    address: SocketAddr,
) -> anyhow::Result<serde_json::Value> {
    let answer = lb_control.cli_json(lab, &["health", "--json"])?;
    answer["nodes"]
        .as_array()
        .and_then(|nodes| {
            nodes
                .iter()
                .find(|node| node["address"] == address.to_string())
        })
        .cloned()
        .with_context(|| format!("no node {address} in `lb-control health`: {answer:#}"))
}

/// Opens plain WebSockets from `netns` to `node` until it answers 429; returns the open ones.
fn fill_connection_slots_from(
    netns: &str,
    node: SocketAddr,
) -> anyhow::Result<Vec<tokio_tungstenite::tungstenite::WebSocket<std::net::TcpStream>>> {
    use tokio_tungstenite::tungstenite::{self, HandshakeError};
    let (mut held, mut refusals) = (Vec::new(), 0);
    loop {
        let stream = common::connect_from(netns, node)?;
        match tungstenite::client(format!("ws://{node}/"), stream) {
            Ok((socket, _)) => {
                held.push(socket);
                refusals = 0;
            }
            Err(HandshakeError::Failure(tungstenite::Error::Http(response))) => {
                ensure!(
                    response.status() == 429,
                    "refused with {}",
                    response.status()
                );
                refusals += 1;
                if refusals == REFUSALS_WHEN_FULL {
                    return Ok(held);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(error) => anyhow::bail!("connection {} to {node}: {error}", held.len() + 1),
        }
        ensure!(
            held.len() <= 100,
            "{node} admitted more than 100 connections"
        );
    }
}

#[test]
fn saturated_node_stays_in_the_kernel_table_and_shows_saturated_in_the_admin_api()
-> anyhow::Result<()> {
    let mut lab = common::start_lab(3, true, Duration::from_secs(1));
    let service = ServiceConf::checked(VIP_V4, (0..3).map(up).collect());
    let lb_control = LbControl::start(&mut lab, std::slice::from_ref(&service))?;
    let full = backend_addr(&lab, 0, service.vip);
    wait_for("node0 checked healthy", || {
        Ok(health_of(&lb_control, &lab, full)?["health"]["verdict"] == "healthy")
    })?;

    // Clients straight to node0's RPC port take every slot but the checker's.
    let netns = lab.lb().netns.clone();
    let held = fill_connection_slots_from(&netns, full)?;
    ensure!(
        held.len() == 99,
        "node0 admitted {} connections",
        held.len()
    );
    wait_for("node0 saturated in `lb-control health`", || {
        let node = health_of(&lb_control, &lab, full)?;
        Ok(node["saturated"] == true && node["health"]["saturated"] == true)
    })
    .with_context(|| lb_control.log_tail())?;
    let node = health_of(&lb_control, &lab, full)?;
    ensure!(node["state"] == "up", "node0 saturated: {node:#}");
    ensure!(
        kernel_states(&lab)?.get(&full) == Some(&"up"),
        "a saturated node left the kernel table"
    );
    let metrics = run_checked(
        lab.exec(&netns, "curl")?
            .args(["-sS", "http://127.0.0.1:9900/metrics"]),
    )?;
    let metrics = String::from_utf8(metrics.stdout)?;
    let rpc = SocketAddr::new(full.ip(), 9944);
    ensure!(
        metrics.contains(&format!("lb_node_saturated{{node=\"{rpc}\"}} 1")),
        "{metrics}"
    );
    ensure!(
        lb_control.log().contains("node is saturated"),
        "{}",
        lb_control.log_tail()
    );

    // A node killed meanwhile leaves the kernel table as fast as ever.
    let dead = backend_addr(&lab, 1, service.vip);
    lab.kill_sim_node(1)?;
    let killed = Instant::now();
    wait_for("node1 down in the kernel", || {
        Ok(kernel_states(&lab)?.get(&dead) == Some(&"down"))
    })?;
    let took = killed.elapsed();
    ensure!(
        took < Duration::from_secs(2),
        "node1 went down {took:?} after it died"
    );
    ensure!(
        kernel_states(&lab)?.get(&full) == Some(&"up"),
        "the saturated node left the kernel table"
    );

    drop(held);
    wait_for("node0 no longer saturated", || {
        Ok(health_of(&lb_control, &lab, full)?["saturated"] == false)
    })
    .with_context(|| lb_control.log_tail())?;
    ensure!(
        lb_control.log().contains("node is no longer saturated"),
        "{}",
        lb_control.log_tail()
    );
    Ok(())
}
