//! The control plane end to end in the lab: the health checker takes dead, syncing, peerless,
//! lagging, stalled and slow nodes out of the kernel's table and brings them back after `rise`
//! good checks, and backends added and drained through the admin API get (or stop getting)
//! new connections; all seen from the client through the VIP and in the kernel's maps.
//!
//! These tests need root: run them as root or via `cargo xtask test`. They run the binaries,
//! so `cargo build --bins` first.

mod common;

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use common::{
    LbControl, ServiceConf, VIP_V4, backend_addr, count_by_node, kernel_states, node_status,
    open_connections, set_fault, spread_of_new_connections, up, wait_for,
};
use lb_tests::{
    lab::Lab,
    load::{Load, LoadShape},
    sim_node::Fault,
};

/// The default `[health]` settings these tests rely on (lb-control's defaults).
const INTERVAL: Duration = Duration::from_secs(1);
const RISE: u64 = 2;
/// How fast the default settings must take a dead node out of the kernel's table.
const DEAD_NODE_OUT_WITHIN: Duration = Duration::from_secs(2);
/// How often a test reads the kernel's backend states while it times a change.
const KERNEL_POLL: Duration = Duration::from_millis(10);
/// Longest a state change may take in these tests (a stall takes `stall_after` first).
const STATE_CHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// Only the health checker calls this method in these tests, so sim-node's count of it is
/// the count of checks a node answered.
const HEALTH_CHECK_METHOD: &str = "chain_getFinalizedHead";

/// A lab of `nodes` sim-nodes with a block a second: fast enough that a stall of 3 s shows,
/// slow enough that healthy nodes checked a moment apart stay within `max_lag` of each other.
fn start_lab(nodes: usize) -> Lab {
    common::start_lab(nodes, true, Duration::from_secs(1))
}

/// The health-checked service on the VIP over nodes `nodes`.
fn service(nodes: impl IntoIterator<Item = usize>) -> ServiceConf {
    ServiceConf::checked(VIP_V4, nodes.into_iter().map(up).collect())
}

/// Health checks node `index` has answered so far.
fn health_checks(lab: &Lab, index: usize) -> anyhow::Result<u64> {
    Ok(node_status(lab, index)?
        .requests
        .get(HEALTH_CHECK_METHOD)
        .copied()
        .unwrap_or(0))
}

/// Waits until every node in `nodes` has answered `RISE` health checks: the checker then
/// holds a healthy verdict on each, the state a failure is measured from.
fn wait_until_checked(
    lab: &Lab,
    nodes: impl IntoIterator<Item = usize> + Clone,
) -> anyhow::Result<()> {
    wait_for("every node to answer its first health checks", || {
        for index in nodes.clone() {
            if health_checks(lab, index)? < RISE {
                return Ok(false);
            }
        }
        Ok(true)
    })
}

/// Polls the kernel's state of `backend` every [`KERNEL_POLL`] until it is `state`; returns
/// how long that took.
fn wait_for_kernel_state(lab: &Lab, backend: SocketAddr, state: &str) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut last = None;
    while started.elapsed() < STATE_CHANGE_TIMEOUT {
        let now = kernel_states(lab)?.get(&backend).copied();
        if now == Some(state) {
            return Ok(started.elapsed());
        }
        last = now;
        std::thread::sleep(KERNEL_POLL);
    }
    bail!(
        "backend {backend} is still {} in the kernel after {STATE_CHANGE_TIMEOUT:?}, expected \
         {state}",
        last.unwrap_or("absent")
    )
}

/// Waits until `lb-control backend list` shows the backend at `address` in `state`; returns
/// how it shows it. The admin API's view is replaced only once a change is complete in every
/// kernel table, so a new connection made after it meets the new rotation.
fn wait_for_api_state(
    lb_control: &LbControl,
    lab: &Lab,
    address: SocketAddr,
    state: &str,
) -> anyhow::Result<serde_json::Value> {
    let mut listed = serde_json::Value::Null;
    wait_for(
        &format!("`lb-control backend list` to show {address} {state}"),
        || {
            listed = api_backend(lb_control, lab, &["backend", "list"], address)?;
            Ok(listed["state"] == state)
        },
    )?;
    Ok(listed)
}

#[test]
fn dead_node_leaves_the_kernel_table_within_two_seconds() -> anyhow::Result<()> {
    let mut lab = start_lab(3);
    let service = service(0..3);
    let lb_control = LbControl::start(&mut lab, std::slice::from_ref(&service))?;
    wait_until_checked(&lab, 0..3)?;

    // A client opening a new connection per request, all along.
    let load = Load::start(
        &lab.client().netns,
        service.target(),
        LoadShape {
            new_connection_workers: 1,
            keep_alive_connections: 0,
            pause_after_failure: Duration::from_millis(10),
        },
    );
    let answered = load.answered();
    wait_for("the client's first 50 answers", || {
        Ok(load.answered() >= answered + 50)
    })?;

    let dead = backend_addr(&lab, 1, service.vip);
    lab.kill_sim_node(1)?;
    let died = Instant::now();
    let removal =
        wait_for_kernel_state(&lab, dead, "down").with_context(|| lb_control.log_tail())?;
    let removed = Instant::now();
    println!("node1 ({dead}) left the kernel table {removal:?} after its sim-node was killed");

    let answered = load.answered();
    wait_for("60 answers after the removal", || {
        Ok(load.answered() >= answered + 60)
    })?;
    let outcomes = load.stop();
    let failed_meanwhile = outcomes
        .iter()
        .filter(|outcome| !outcome.is_ok() && outcome.finished >= died && outcome.started < removed)
        .count();
    println!("requests failed between the death and the removal: {failed_meanwhile}");
    ensure!(
        removal <= DEAD_NODE_OUT_WITHIN,
        "node1 left the kernel table only {removal:?} after it died; the default health \
         settings should take it out within {DEAD_NODE_OUT_WITHIN:?}"
    );

    // Every connection made after the removal went to the live nodes and was answered.
    let after: Vec<_> = outcomes
        .iter()
        .filter(|outcome| outcome.started >= removed)
        .collect();
    let failed: Vec<String> = after
        .iter()
        .filter_map(|outcome| {
            let error = outcome.answer.as_ref().err()?;
            Some(format!("{:?} after: {error}", outcome.started - removed))
        })
        .collect();
    ensure!(
        failed.is_empty(),
        "{} of {} connections made after node1 was down in the kernel failed (did the kernel \
         still choose it?):\n{}",
        failed.len(),
        after.len(),
        failed.join("\n")
    );
    let nodes: BTreeSet<&str> = after
        .iter()
        .filter_map(|outcome| outcome.answer.as_deref().ok())
        .collect();
    ensure!(
        nodes == BTreeSet::from(["node0", "node2"]),
        "after node1's removal, new connections were answered by {nodes:?}"
    );
    Ok(())
}

#[test]
fn unhealthy_nodes_leave_the_rotation_and_return_after_rise_good_checks() -> anyhow::Result<()> {
    let mut lab = start_lab(3);
    let service = service(0..3);
    let lb_control = LbControl::start_with(
        &mut lab,
        std::slice::from_ref(&service),
        // Short, so the stalled chain shows within the test.
        "[health]\nstall_after = \"3s\"\n",
    )?;
    wait_until_checked(&lab, 0..3)?;
    let sick = backend_addr(&lab, 2, service.vip);

    for (fault, what) in [
        (Fault::Syncing, "syncing"),
        (Fault::NoPeers, "without peers"),
        (Fault::Behind { blocks: 10 }, "10 blocks behind"),
        (Fault::Stall, "stalled"),
    ] {
        set_fault(&lab, 2, fault)?;
        let out = wait_for_kernel_state(&lab, sick, "down")
            .with_context(|| format!("node2 {what}"))
            .with_context(|| lb_control.log_tail())?;
        let reason =
            wait_for_api_state(&lb_control, &lab, sick, "down")?["health"]["reason"].clone();
        let counts = spread_of_new_connections(&lab, service.target(), 30)?;
        ensure!(
            !counts.contains_key("node2"),
            "node2 {what} is down in the kernel, yet new connections reached it: {counts:?}"
        );

        // The clear's answer carries the node's request counts at that moment.
        let checks_before = set_fault(&lab, 2, Fault::None)?
            .requests
            .get(HEALTH_CHECK_METHOD)
            .copied()
            .unwrap_or(0);
        let back = wait_for_kernel_state(&lab, sick, "up")
            .with_context(|| format!("node2 no longer {what}"))
            .with_context(|| lb_control.log_tail())?;
        let checks = health_checks(&lab, 2)? - checks_before;
        println!(
            "node2 {what}: out of the kernel table after {out:?} (reason {reason}); once \
             cleared, back after {back:?} and {checks} checks"
        );
        ensure!(
            checks >= RISE,
            "node2 came back after {checks} health check(s) once no longer {what}; rise is \
             {RISE}"
        );
        wait_for_api_state(&lb_control, &lab, sick, "up")?;
        let counts = spread_of_new_connections(&lab, service.target(), 30)?;
        ensure!(
            counts.contains_key("node2"),
            "node2 is up again, yet 30 new connections reached only {counts:?}"
        );
    }
    Ok(())
}

#[test]
fn slow_node_is_judged_unhealthy_while_the_others_are_checked_on_time() -> anyhow::Result<()> {
    // Slower than the 1 s check timeout: every check of node2 times out.
    const DELAY_MS: u64 = 3000;
    // A check of a healthy node at most this long after the previous one: the interval and
    // some slack, less than the interval plus a timed-out check (what checks made one after
    // the other would show).
    const MAX_GAP: Duration = Duration::from_millis(1500);
    const WATCH_AFTER_DOWN: Duration = Duration::from_secs(3);
    let mut lab = start_lab(3);
    let service = service(0..3);
    let lb_control = LbControl::start(&mut lab, std::slice::from_ref(&service))?;
    wait_until_checked(&lab, 0..3)?;
    let slow = backend_addr(&lab, 2, service.vip);
    let healthy = [0, 1].map(|index| backend_addr(&lab, index, service.vip));

    let last_checked = |lab: &Lab, addr: SocketAddr| -> anyhow::Result<String> {
        let node = api_backend(&lb_control, lab, &["health"], addr)?;
        node["health"]["last_checked"]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("no health.last_checked in {node:#}"))
    };
    let checked_before = healthy.map(|addr| last_checked(&lab, addr));

    set_fault(&lab, 2, Fault::Slow { delay_ms: DELAY_MS })?;
    let started = Instant::now();
    // When each healthy node's count of checks was last seen to grow, and the longest gap.
    let mut last_check = [started; 2];
    let mut counts = [health_checks(&lab, 0)?, health_checks(&lab, 1)?];
    let mut longest = [Duration::ZERO; 2];
    let mut slow_down_after = None;
    while slow_down_after.is_none_or(|after| started.elapsed() < after + WATCH_AFTER_DOWN) {
        ensure!(
            started.elapsed() < STATE_CHANGE_TIMEOUT,
            "node2, slow, is still not down after {STATE_CHANGE_TIMEOUT:?}; {}",
            lb_control.log_tail()
        );
        let states = kernel_states(&lab)?;
        for (index, addr) in healthy.iter().enumerate() {
            let state = states.get(addr).copied().unwrap_or("absent");
            ensure!(
                state == "up",
                "node{index} went {state} while node2 was slow ({:?} in)",
                started.elapsed()
            );
            let count = health_checks(&lab, index)?;
            let now = Instant::now();
            if count > counts[index] {
                counts[index] = count;
                last_check[index] = now;
            }
            longest[index] = longest[index].max(now - last_check[index]);
        }
        if slow_down_after.is_none() && states.get(&slow) == Some(&"down") {
            slow_down_after = Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let slow_down_after = slow_down_after.context("node2 down")?;
    println!(
        "node2 (answers after {DELAY_MS} ms) down after {slow_down_after:?}; longest gap \
         between checks meanwhile: node0 {:?}, node1 {:?}",
        longest[0], longest[1]
    );
    for (index, gap) in longest.iter().enumerate() {
        ensure!(
            *gap <= MAX_GAP,
            "node{index} went {gap:?} without a health check while node2 was slow: checks \
             every {INTERVAL:?} expected"
        );
    }

    // What an operator sees: node2 unhealthy for timing out, the others checked meanwhile
    // (RFC 3339 UTC timestamps of one format order as text).
    let node2 = api_backend(&lb_control, &lab, &["health"], slow)?;
    ensure!(
        node2["state"] == "down" && node2["health"]["verdict"] == "unhealthy",
        "`lb-control health` shows slow node2 as {node2:#}"
    );
    for (index, (addr, before)) in healthy.iter().zip(checked_before).enumerate() {
        let (before, now) = (before?, last_checked(&lab, *addr)?);
        ensure!(
            now > before,
            "`lb-control health`: node{index}'s last check stayed at {before} while node2 was \
             slow ({now} now)"
        );
    }
    Ok(())
}

#[test]
fn backends_added_and_drained_through_the_admin_api_change_new_connections_only()
-> anyhow::Result<()> {
    let mut lab = start_lab(4);
    // The config declares nodes 0 to 2; node3 comes through the API.
    let service = service(0..3);
    let lb_control = LbControl::start(&mut lab, std::slice::from_ref(&service))?;
    wait_until_checked(&lab, 0..3)?;

    let added = backend_addr(&lab, 3, service.vip);
    lb_control.cli(&lab, &["backend", "add", &added.to_string()])?;
    wait_for_kernel_state(&lab, added, "up")?;
    let listed = api_backend(&lb_control, &lab, &["backend", "list"], added)?;
    ensure!(
        listed["state"] == "up",
        "`lb-control backend list` shows node3, added, as {}",
        listed["state"]
    );
    let counts = spread_of_new_connections(&lab, service.target(), 80)?;
    ensure!(
        counts.len() == 4 && counts.contains_key("node3"),
        "after node3 was added through the API, 80 new connections reached {counts:?}"
    );

    let mut connections = open_connections(&lab, service.target(), 40)?;
    let on_node1 = count_by_node(&connections)
        .get("node1")
        .copied()
        .unwrap_or(0);
    ensure!(on_node1 > 0, "none of 40 connections landed on node1");
    let drained = backend_addr(&lab, 1, service.vip);
    let listed = api_backend(&lb_control, &lab, &["backend", "list"], drained)?;
    let id = listed["id"]
        .as_i64()
        .with_context(|| format!("no id in {listed:#}"))?;
    lb_control.cli(&lab, &["backend", "drain", &id.to_string()])?;
    wait_for_kernel_state(&lab, drained, "draining")?;
    let listed = api_backend(&lb_control, &lab, &["backend", "list"], drained)?;
    ensure!(
        listed["state"] == "draining",
        "`lb-control backend list` shows node1, drained, as {}",
        listed["state"]
    );

    let mut broken = Vec::new();
    for connection in &mut connections {
        if let Err(error) = connection.check_same_node() {
            broken.push(format!("{error:#}"));
        }
    }
    ensure!(
        broken.is_empty(),
        "{} of 40 keep-alive connections ({on_node1} of them on node1) broke after node1 was \
         drained:\n{}",
        broken.len(),
        broken.join("\n")
    );
    let counts = spread_of_new_connections(&lab, service.target(), 60)?;
    ensure!(
        !counts.contains_key("node1") && counts.len() == 3,
        "with node1 draining, 60 new connections reached {counts:?}"
    );
    Ok(())
}

/// The backend at `address` as `lb-control ARGS… --json` lists it (`backend list`: a list;
/// `health`: the list under `nodes`): id, state, health with its reason and last check.
fn api_backend(
    lb_control: &LbControl,
    lab: &Lab,
    args: &[&str],
    address: SocketAddr,
) -> anyhow::Result<serde_json::Value> {
    let mut args = args.to_vec();
    args.push("--json");
    let answer = lb_control.cli_json(lab, &args)?;
    let list = answer.get("nodes").unwrap_or(&answer);
    list.as_array()
        .and_then(|backends| {
            backends
                .iter()
                .find(|backend| backend["address"] == address.to_string())
        })
        .cloned()
        .with_context(|| {
            format!(
                "no backend {address} in `lb-control {}`:\n{answer:#}",
                args.join(" ")
            )
        })
}

#[test]
fn drain_wait_returns_once_the_backend_s_last_flow_closes_and_fails_at_its_timeout()
-> anyhow::Result<()> {
    use std::io::{BufRead, BufReader};

    let mut lab = start_lab(2);
    let service = service(0..2);
    let lb_control = LbControl::start(&mut lab, std::slice::from_ref(&service))?;
    wait_until_checked(&lab, 0..2)?;
    let connection = common::KeepAlive::open(&lab.client().netns, service.target())?;
    let node = common::node_index(&connection.node)?;
    let address = backend_addr(&lab, node, service.vip);
    let listed = api_backend(&lb_control, &lab, &["backend", "list"], address)?;
    let id = listed["id"]
        .as_i64()
        .with_context(|| format!("no id in {listed:#}"))?
        .to_string();

    // The connection stays open: the wait runs out and says what is left.
    let error = lb_control
        .cli(
            &lab,
            &["backend", "drain", &id, "--wait", "--timeout", "1s"],
        )
        .expect_err("a drain with an open flow cannot finish in 1 s");
    ensure!(
        format!("{error:#}").contains("still has 1 open flows"),
        "{error:#}"
    );

    // Waiting again, the operator's way; the client closes its connection meanwhile.
    let mut waiting = lab
        .exec(&lab.lb().netns, lb_tests::lab::binary_path("lb-control")?)?
        .args(["backend", "drain", &id, "--wait", "--timeout", "30s"])
        .env("LB_ADMIN_TOKEN", common::ADMIN_TOKEN)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting lb-control backend drain --wait")?;
    let mut lines = BufReader::new(waiting.stdout.take().context("stdout")?).lines();
    let mut printed = Vec::new();
    for line in lines.by_ref() {
        let line = line?;
        let counted = line.contains("1 open flows, 0 WebSocket clients");
        printed.push(line);
        if counted {
            break;
        }
    }
    ensure!(
        printed.iter().any(|line| line.contains("1 open flows")),
        "the wait never showed the open flow: {printed:?}"
    );
    drop(connection);
    printed.extend(lines.map_while(Result::ok));
    let status = waiting.wait()?;
    ensure!(status.success(), "the drain failed: {printed:?}");
    ensure!(
        printed
            .last()
            .is_some_and(|line| line.ends_with("is drained")),
        "{printed:?}"
    );
    Ok(())
}
