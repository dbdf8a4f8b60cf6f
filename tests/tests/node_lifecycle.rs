//! A node's life behind the load balancer, in the lab: it registers itself with a join token
//! (dist/node/lb-node, run in its own namespace beside its sim-node, as lb-node.service runs it
//! on a real host) and gets traffic only once lb-control's health checks pass; it leaves
//! drained first; and `lb-control rollout` restarts every node of a service, one at a time,
//! under load through the L4 service and the gateway with polkadot.js clients connected,
//! failing no request.
//!
//! These tests need root: run them as root or via `cargo xtask test`. They run the binaries
//! (`cargo build -p lb-tests --bins` and `cargo build -p lb-control` first) and Node.js 20 with
//! tests/js installed (`cargo xtask setup`).

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, ensure};
use common::{
    GatewayLab, LbControl, ServiceConf, VIP_V4, kernel_states, open_connections, set_fault,
    spread_of_new_connections, up, wait_for,
};
use lb_tests::{
    js_client::FollowingClients,
    lab::{Lab, SIM_NODE_RPC_PORT, binary_path},
    sim_node::Fault,
    wrk,
};
use serde_json::Value;

/// A read each node answers itself (never cached): the load reaches the nodes.
const NODE_READ: &str = r#"{"jsonrpc":"2.0","id":1,"method":"system_localPeerId"}"#;

/// The admin API on every address of the LB, so a node reaches it over its own link, as nodes
/// reach a load balancer's private address.
const ADMIN_ON_EVERY_LINK: &str = "[admin]\nlisten = \"0.0.0.0:9900\"\n";

/// `10.200.0.10:9944/tcp`, the service the lab's nodes join.
fn service_name() -> String {
    format!("{VIP_V4}:{SIM_NODE_RPC_PORT}/tcp")
}

/// `lb-control token create --scope join` for the service, as the operator runs it; the secret
/// is written where lb-node reads it.
fn join_token(lab: &Lab, lb_control: &LbControl, name: &str) -> anyhow::Result<PathBuf> {
    let output = lb_control.cli(
        lab,
        &[
            "token",
            "create",
            "--scope",
            "join",
            "--service",
            &service_name(),
            "--name",
            name,
        ],
    )?;
    let secret = output
        .lines()
        .find_map(|line| line.strip_prefix("secret: "))
        .with_context(|| format!("no secret in {output:?}"))?;
    let file = lab.log_dir().join(format!("{name}.token"));
    std::fs::write(&file, format!("{secret}\n"))?;
    Ok(file)
}

/// `dist/node/lb-node ACTION` in node `index`'s namespace, with the settings lb-node.service
/// gives it from /etc/lb-node/node.env; its output goes to the lab's log directory.
fn lb_node(lab: &Lab, index: usize, action: &str, token_file: &Path) -> anyhow::Result<Child> {
    let node = lab.node(index);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/node/lb-node");
    let log = std::fs::File::create(lab.log_dir().join(format!("lb-node-{action}-{index}.log")))?;
    let child = lab
        .exec(&node.netns, "sh")?
        .arg(script)
        .arg(action)
        .env("LB_ADMIN_URL", format!("http://{}:9900", node.gateway_v4))
        .env("LB_SERVICE", service_name())
        .env("NODE_PRIVATE_IP", node.addr_v4.to_string())
        .env("RPC_PORT", SIM_NODE_RPC_PORT.to_string())
        .env("LB_JOIN_TOKEN_FILE", token_file)
        .env("LB_CONTROL", binary_path("lb-control")?)
        .env("READY_TIMEOUT", "20")
        .env("JOIN_TIMEOUT", "60s")
        .env("LEAVE_TIMEOUT", "60s")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("running lb-node {action} in node{index}"))?;
    Ok(child)
}

/// What lb-node printed, for failure messages.
fn lb_node_log(lab: &Lab, index: usize, action: &str) -> String {
    std::fs::read_to_string(lab.log_dir().join(format!("lb-node-{action}-{index}.log")))
        .unwrap_or_default()
}

/// Waits until `child` exits; fails unless it succeeded.
fn exited_successfully(
    child: &mut Child,
    what: &str,
    log: impl Fn() -> String,
) -> anyhow::Result<()> {
    wait_for(&format!("{what} to return"), || {
        Ok(child.try_wait()?.is_some())
    })
    .with_context(&log)?;
    let status = child.wait()?;
    ensure!(status.success(), "{what} failed ({status}): {}", log());
    Ok(())
}

/// The backend at node `index`'s address as `lb-control backend list --json` shows it.
fn backend_of(lab: &Lab, lb_control: &LbControl, index: usize) -> anyhow::Result<Option<Value>> {
    let address = format!("{}:{SIM_NODE_RPC_PORT}", lab.node(index).addr_v4);
    let backends = lb_control.cli_json(lab, &["backend", "list", "--json"])?;
    Ok(backends
        .as_array()
        .context("a list")?
        .iter()
        .find(|backend| backend["address"] == address.as_str())
        .cloned())
}

/// The kernel's state of node `index`'s backend (`up`, `draining`, `down`), if it has one.
fn kernel_state_of(lab: &Lab, index: usize) -> anyhow::Result<Option<&'static str>> {
    let address = lab.node(index).addr_v4;
    Ok(kernel_states(lab)?
        .into_iter()
        .find(|(backend, _)| backend.ip() == address)
        .map(|(_, state)| state))
}

/// The newest events as `lb-control events --json` shows them: (kind, subject, detail).
fn events(lab: &Lab, lb_control: &LbControl) -> anyhow::Result<Vec<(String, String, String)>> {
    let events = lb_control.cli_json(lab, &["events", "--limit", "1000", "--json"])?;
    Ok(events
        .as_array()
        .context("a list")?
        .iter()
        .map(|event| {
            let text = |field: &str| event[field].as_str().unwrap_or_default().to_owned();
            (text("kind"), text("subject"), text("detail"))
        })
        .collect())
}

#[test]
fn a_node_joins_with_its_token_gets_traffic_only_once_its_checks_pass_and_leaves_drained()
-> anyhow::Result<()> {
    let mut lab = common::start_lab(3, true, Duration::from_secs(1));
    let service = ServiceConf::checked(VIP_V4, vec![up(0), up(1)]);
    let gateway = GatewayLab::start_with(
        &mut lab,
        std::slice::from_ref(&service),
        "",
        ADMIN_ON_EVERY_LINK,
    )?;
    let lb = &gateway.lb_control;
    wait_for("node0 and node1 behind the gateway", || {
        Ok(gateway.health(&lab)?.1["nodes"] == 2)
    })?;
    // node2 is ready (synced, with peers) but trails the chain by 20 blocks: lb-control's
    // checks fail it.
    set_fault(&lab, 2, Fault::Behind { blocks: 20 })?;
    let token_file = join_token(&lab, lb, "lab-nodes")?;

    let mut join = lb_node(&lab, 2, "join", &token_file)?;
    let log = || lb_node_log(&lab, 2, "join");
    wait_for("node2 to join and fail its first checks", || {
        Ok(backend_of(&lab, lb, 2)?
            .is_some_and(|backend| backend["health"]["verdict"] == "unhealthy"))
    })
    .with_context(log)?;
    let joining = backend_of(&lab, lb, 2)?.context("node2's backend")?;
    ensure!(joining["state"] == "joining", "{joining}");
    ensure!(joining["admin"] == "joining", "{joining}");
    ensure!(
        kernel_state_of(&lab, 2)? == Some("down"),
        "out of the kernel table"
    );
    let spread = spread_of_new_connections(&lab, service.target(), 60)?;
    ensure!(
        !spread.contains_key("node2"),
        "a connection reached the joining node: {spread:?}"
    );
    ensure!(
        gateway.health(&lab)?.1["nodes"] == 2,
        "the gateway counts only node0 and node1"
    );
    ensure!(
        join.try_wait()?.is_none(),
        "lb-node join returned early: {}",
        log()
    );

    // Its node catches up: it passes its checks, enters, and lb-node returns.
    set_fault(&lab, 2, Fault::None)?;
    exited_successfully(&mut join, "lb-node join", log)?;
    let joined = backend_of(&lab, lb, 2)?.context("node2's backend")?;
    ensure!(
        joined["state"] == "up" && joined["admin"] == "enabled",
        "{joined}"
    );
    ensure!(kernel_state_of(&lab, 2)? == Some("up"));
    let spread = spread_of_new_connections(&lab, service.target(), 60)?;
    ensure!(
        spread.get("node2").is_some_and(|count| *count > 0),
        "{spread:?}"
    );
    ensure!(gateway.health(&lab)?.1["nodes"] == 3);
    let subject = format!(
        "backend {} ({})",
        joined["id"],
        joined["address"].as_str().unwrap_or_default()
    );
    let logged = events(&lab, lb)?;
    ensure!(
        logged
            .iter()
            .any(|(kind, subject_, detail)| kind == "backend.added"
                && subject_.starts_with(&subject)
                && detail == "join token 1 (lab-nodes)"),
        "the event log names the token: {logged:?}"
    );
    ensure!(
        logged
            .iter()
            .any(|(kind, subject_, _)| kind == "backend.joined" && *subject_ == subject),
        "{logged:?}"
    );

    // Leaving drains first: a connection it holds carries on, new ones go elsewhere, and it is
    // removed once its last connection closes.
    let mut held: Vec<_> = open_connections(&lab, service.target(), 24)?
        .into_iter()
        .filter(|connection| connection.node == "node2")
        .collect();
    ensure!(!held.is_empty(), "none of 24 connections reached node2");
    let mut leave = lb_node(&lab, 2, "leave", &token_file)?;
    let log = || lb_node_log(&lab, 2, "leave");
    wait_for("node2 to drain", || {
        Ok(kernel_state_of(&lab, 2)? == Some("draining"))
    })
    .with_context(log)?;
    for connection in &mut held {
        connection.check_same_node()?;
    }
    let spread = spread_of_new_connections(&lab, service.target(), 30)?;
    ensure!(!spread.contains_key("node2"), "{spread:?}");
    ensure!(
        leave.try_wait()?.is_none(),
        "lb-node leave did not wait: {}",
        log()
    );
    drop(held);
    exited_successfully(&mut leave, "lb-node leave", log)?;
    ensure!(
        backend_of(&lab, lb, 2)?.is_none(),
        "node2 is still a backend"
    );
    let logged = events(&lab, lb)?;
    ensure!(
        logged
            .iter()
            .any(|(kind, subject_, detail)| kind == "backend.removed"
                && *subject_ == subject
                && detail == "join token 1 (lab-nodes)"),
        "{logged:?}"
    );
    Ok(())
}

/// What the rollout's `--exec` runs for a node (its address in `$1`): restarts its sim-node
/// as `systemctl restart` restarts a service: SIGTERM, then the same command line again, and
/// returns once it answers.
fn write_restart_script(lab: &Lab) -> anyhow::Result<PathBuf> {
    let sim_node = binary_path("sim-node")?;
    let mut cases = String::new();
    for (index, node) in lab.nodes().iter().enumerate() {
        cases += &format!(
            "    {}:{SIM_NODE_RPC_PORT}) netns={}; args='{}'; log={} ;;\n",
            node.addr_v4,
            node.netns,
            lab.sim_node_args(index).join(" "),
            lab.log_dir()
                .join(format!("sim-node-node{index}.log"))
                .display()
        );
    }
    let script = format!(
        r#"#!/bin/sh
set -eu
case "$1" in
{cases}    *) echo "no lab node at $1" >&2; exit 1 ;;
esac
for pid in $(ip netns pids "$netns"); do
    if [ "$(cat /proc/$pid/comm 2>/dev/null)" = sim-node ]; then
        kill -TERM "$pid"
        # Gone, or a zombie of the test process, which reaps it at teardown.
        while [ -e /proc/$pid ] && [ "$(cut -d' ' -f3 /proc/$pid/stat)" != Z ]; do sleep 0.05; done
    fi
done
ip netns exec "$netns" setsid {sim_node} $args >>"$log" 2>&1 </dev/null &
tries=0
until ip netns exec "$netns" curl -fsS -o /dev/null --max-time 1 "http://$1/health/readiness"; do
    tries=$((tries + 1))
    [ "$tries" -lt 200 ] || {{ echo "sim-node at $1 did not come back" >&2; exit 1; }}
    sleep 0.05
done
echo "restarted sim-node at $1"
"#,
        sim_node = sim_node.display()
    );
    let path = lab.log_dir().join("restart-node.sh");
    std::fs::write(&path, script)?;
    Ok(path)
}

/// The sim-node process in `netns`, other than the lab's own (which the restart replaced).
fn restarted_sim_node(lab: &Lab, netns: &str) -> anyhow::Result<bool> {
    let original = lab
        .processes()
        .iter()
        .find(|process| process.netns() == netns)
        .map(lb_tests::lab::LabProcess::pid);
    let output = Command::new("ip").args(["netns", "pids", netns]).output()?;
    Ok(String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .filter_map(|pid| pid.parse::<u32>().ok())
        .any(|pid| {
            Some(pid) != original
                && std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|comm| comm.trim() == "sim-node")
        }))
}

/// polkadot.js clients that follow heads through the rollout.
const JS_CLIENTS: usize = 6;
/// How long each wrk runs: the rollout (~15 s here) happens within it.
const LOAD_SECONDS: u64 = 40;

#[test]
fn rollout_restarts_every_node_under_load_without_a_failed_request() -> anyhow::Result<()> {
    // Heads every 500 ms: a client that got back in hears one soon.
    let mut lab = common::start_lab(3, true, Duration::from_millis(500));
    let service = ServiceConf::checked(VIP_V4, vec![up(0), up(1), up(2)]);
    let gateway = GatewayLab::start(&mut lab, std::slice::from_ref(&service), "")?;
    wait_for("the three nodes behind the gateway", || {
        Ok(gateway.health(&lab)?.1["nodes"] == 3)
    })?;
    let restart = write_restart_script(&lab)?;

    // polkadot.js clients on the gateway, all on one node (the gateway places a client by its
    // address), which the rollout drains in its turn.
    let clients = FollowingClients::start(
        &lab.client().netns,
        &gateway.ca,
        &gateway.url("wss"),
        JS_CLIENTS,
        300,
        lab.log_dir().join("clients.ready"),
    )?;

    // wrk through the kernel's L4 service (a connection per request, so a drained node empties)
    // and through the gateway (keep-alive).
    let client_netns = lab.client().netns.clone();
    let l4_script = lab.log_dir().join("l4-reads.lua");
    std::fs::write(
        &l4_script,
        wrk::counting_script(NODE_READ, &[("Connection", "close")]),
    )?;
    let gateway_script = lab.log_dir().join("gateway-reads.lua");
    std::fs::write(&gateway_script, wrk::counting_script(NODE_READ, &[]))?;
    let l4_url = format!("http://{}", service.target());
    let gateway_url = gateway.url("https");
    let l4 = wrk::Background::start(&wrk::Load {
        netns: &client_netns,
        threads: 1,
        connections: 4,
        seconds: LOAD_SECONDS,
        script: &l4_script,
        url: &l4_url,
    })?;
    let through_gateway = wrk::Background::start(&wrk::Load {
        netns: &client_netns,
        threads: 1,
        connections: 8,
        seconds: LOAD_SECONDS,
        script: &gateway_script,
        url: &gateway_url,
    })?;
    let load_started = Instant::now();
    wait_for("the load to reach the nodes", || {
        Ok(lb_tests::prometheus::sum(
            &gateway.metrics(&lab)?,
            "lb_gateway_calls_total",
            |sample| sample.label("outcome") == Some("ok"),
        ) > 200.0)
    })?;

    let started = Instant::now();
    let exec = format!("sh {} {{address}}", restart.display());
    let output = gateway.lb_control.cli(
        &lab,
        &[
            "rollout",
            "--service",
            &service_name(),
            "--exec",
            &exec,
            "--timeout",
            "3s",
            "--health-timeout",
            "60s",
        ],
    )?;
    let took = started.elapsed();
    let within_load = load_started.elapsed() < Duration::from_secs(LOAD_SECONDS);

    let l4 = l4.finish()?;
    let through_gateway = through_gateway.finish()?;
    let js = clients.finish()?;
    eprintln!("{output}");
    eprintln!("rollout of 3 nodes: {took:?}");
    eprintln!("wrk through the L4 service: {l4}");
    eprintln!("wrk through the gateway: {through_gateway}");
    eprintln!("polkadot.js clients: {js}");

    ensure!(within_load, "the rollout outlasted the load ({took:?})");
    ensure!(output.contains("rolled out 3 backends"), "{output}");
    for node in lab.nodes() {
        ensure!(
            restarted_sim_node(&lab, &node.netns)?,
            "{}'s sim-node was not restarted",
            node.netns
        );
    }
    for (what, reads) in [("L4", &l4), ("gateway", &through_gateway)] {
        ensure!(reads.count("failed")? == 0, "{what}: failed reads: {reads}");
        ensure!(
            reads.socket_errors()? == 0,
            "{what}: socket errors: {reads}"
        );
        ensure!(
            reads.count("answered")? > 1000,
            "{what}: too few reads: {reads}"
        );
    }
    ensure!(
        js["errorAnswers"] == 0,
        "a client saw an error answer: {js}"
    );
    ensure!(
        js["cutOff"] == 0,
        "a client's call was cut off by its close: {js}"
    );
    ensure!(
        js["reconnected"] == JS_CLIENTS && js["followingAfterReconnect"] == JS_CLIENTS,
        "every client was moved off its node and followed heads again: {js}"
    );
    let joined = events(&lab, &gateway.lb_control)?
        .into_iter()
        .filter(|(kind, _, _)| kind == "backend.joined")
        .count();
    ensure!(
        joined == 3,
        "each node came back through its checks: {joined} joined"
    );
    Ok(())
}
