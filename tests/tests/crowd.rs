//! Crowds of WebSocket clients through the gateway in the lab (the `crowd` binary in the client
//! namespace), with the health checker on: a crowd from several addresses keeps every node in
//! rotation, every client connected, and the nodes' connections under the gateway's cap; one
//! key past its connection cap gets its limit error while another key is served.
//!
//! These tests need root: run them as root or via `cargo xtask test`. They run the binaries,
//! so `cargo build --bins --features lb-control/test-harness` first. The figures (memory,
//! delay, CPU) are the benchmark's (`cargo xtask bench crowd`), never asserted here.

mod common;

use std::{net::SocketAddr, time::Duration};

use anyhow::ensure;
use common::{GATEWAY_PORT, GatewayLab, ServiceConf, VIP_V4, up};
use lb_tests::{
    crowd::{CpuShare, CrowdPlan, CrowdProcess, CrowdSummary},
    lab::Lab,
    prometheus,
};

/// Fast blocks, so every client sees several heads in a short hold.
const BLOCK_TIME: Duration = Duration::from_millis(1000);

/// A lab of 3 sim-nodes behind lb-control with the chain-aware health checker and the gateway
/// with `gateway_options`.
fn start(gateway_options: &str) -> anyhow::Result<(Lab, GatewayLab)> {
    let mut lab = common::start_lab(3, true, BLOCK_TIME);
    let gateway = GatewayLab::start(
        &mut lab,
        &[ServiceConf::checked(VIP_V4, vec![up(0), up(1), up(2)])],
        gateway_options,
    )?;
    common::wait_for("every node in rotation", || {
        Ok(common::kernel_states(&lab)?
            .values()
            .all(|state| *state == "up"))
    })?;
    Ok((lab, gateway))
}

/// A crowd of `clients` with `key` from `sources`, each holding a storage subscription too.
fn plan(
    lab: &Lab,
    gateway: &GatewayLab,
    key: &str,
    sources: Vec<std::net::IpAddr>,
    clients: usize,
) -> anyhow::Result<CrowdPlan> {
    let schedule = lab.node_status(0)?;
    Ok(CrowdPlan {
        gateway: SocketAddr::from((lab.lb().addr_v4, GATEWAY_PORT)),
        key: key.to_owned(),
        ca: gateway.ca.clone(),
        sources,
        clients,
        ramp_per_second: 200.0,
        hold_seconds: 8,
        call_interval_ms: 2000,
        storage_subscription: true,
        genesis_unix_ms: schedule.genesis_unix_ms,
        block_time_ms: schedule.block_time_ms,
    })
}

/// Backend state changes away from `up` so far (`lb_backend_transitions_total`).
fn departures(lab: &Lab) -> anyhow::Result<f64> {
    Ok(prometheus::sum(
        &lab.lb_control_metrics()?,
        "lb_backend_transitions_total",
        |sample| sample.label("to") != Some("up"),
    ))
}

/// No node left the rotation since `departed_before` was read, and every one is up now.
fn assert_every_node_stayed(lab: &Lab, departed_before: f64) -> anyhow::Result<()> {
    let departed = departures(lab)? - departed_before;
    let states = common::kernel_states(lab)?;
    ensure!(
        departed == 0.0 && states.values().all(|state| *state == "up"),
        "nodes left the rotation during the crowd ({departed} transitions out of up): {states:?}"
    );
    Ok(())
}

/// Every connected client stayed, got heads and had each kind of call answered, none failed.
fn assert_served(who: &str, summary: &CrowdSummary) -> anyhow::Result<()> {
    ensure!(
        summary.dropped_total() == 0,
        "{who}: clients dropped by the gateway: {:?}",
        summary.dropped
    );
    ensure!(
        summary.heads_subscribed == summary.connected
            && summary.storage_subscribed == summary.connected,
        "{who}: subscriptions refused: {:?}",
        summary.first_subscription_error
    );
    ensure!(
        summary.clients_without_heads == 0,
        "{who}: {} clients got no head",
        summary.clients_without_heads
    );
    ensure!(
        summary.call_errors() == 0 && summary.clients_without_answers == 0,
        "{who}: {} calls failed, {} clients without an answer of each kind; first error: {:?}",
        summary.call_errors(),
        summary.clients_without_answers,
        summary.first_call_error
    );
    Ok(())
}

#[test]
fn crowd_from_several_addresses_keeps_every_node_and_client_within_the_upstream_cap()
-> anyhow::Result<()> {
    const CLIENTS: usize = 600;
    const UPSTREAM_CAP: usize = 4;
    let (lab, gateway) = start(&format!(
        "max_upstream_connections_per_node = {UPSTREAM_CAP}\n\
         max_connections_per_key = {CLIENTS}\nmax_subscriptions_per_key = {CLIENTS}"
    ))?;
    let sources = lab
        .add_client_addresses(6)?
        .into_iter()
        .map(Into::into)
        .collect();
    let plan = plan(&lab, &gateway, &gateway.secret, sources, CLIENTS)?;
    // The gateway's WebSockets to each node: its chain follower, the health checker's held
    // connection, then the links its clients share (its HTTP calls are not WebSockets).
    let websockets_before: Vec<usize> = (0..3)
        .map(|index| Ok(lab.node_status(index)?.websockets))
        .collect::<anyhow::Result<_>>()?;
    let departed_before = departures(&lab)?;

    let mut crowd = CrowdProcess::start(
        &lab.client().netns,
        &plan,
        &lab.log_dir().join("crowd.log"),
        CpuShare::Batch,
    )?;
    let steady = crowd.steady()?;
    eprintln!(
        "{} clients in place after {:.1} s",
        steady.connected, steady.ramp_seconds
    );
    crowd.closing()?;
    let summary = crowd.summary()?;
    eprintln!(
        "crowd: {} connected, {} heads, {} + {} calls answered, head delay p99 {:.1} ms",
        summary.connected,
        summary.heads,
        summary.cached_calls.ok,
        summary.uncached_calls.ok,
        summary.head_delay.p99_ms
    );

    ensure!(
        summary.connected == CLIENTS,
        "{} of {CLIENTS} connected; refused {:?} {:?}, failed {:?} ({:?})",
        summary.connected,
        summary.refused,
        summary.refusal_bodies,
        summary.failed,
        summary.first_failure
    );
    assert_served("the crowd", &summary)?;
    assert_every_node_stayed(&lab, departed_before)?;
    for (index, before) in websockets_before.into_iter().enumerate() {
        let peak = lab.node_status(index)?.peak_websockets;
        ensure!(
            peak <= before + UPSTREAM_CAP,
            "node{index} saw {peak} WebSocket connections at once: {before} before the crowd, \
             and the gateway's cap is {UPSTREAM_CAP} per node"
        );
    }
    Ok(())
}

#[test]
fn one_key_past_its_connection_cap_gets_429_naming_the_limit_while_another_key_is_served()
-> anyhow::Result<()> {
    const CLIENTS: usize = 250;
    const KEY_CAP: usize = 100;
    let (lab, gateway) = start(&format!("max_connections_per_key = {KEY_CAP}"))?;
    let addresses = lab.add_client_addresses(2)?;
    let departed_before = departures(&lab)?;

    // Another key's client, from another address, calling every half second throughout.
    let other_key = lab.create_api_key("other")?;
    let mut other_plan = plan(&lab, &gateway, &other_key, vec![addresses[1].into()], 1)?;
    other_plan.hold_seconds = 25;
    other_plan.call_interval_ms = 500;
    let mut other = CrowdProcess::start(
        &lab.client().netns,
        &other_plan,
        &lab.log_dir().join("other.log"),
        CpuShare::Batch,
    )?;
    other.steady()?;

    // One key, one address: 250 clients, each subscribed to heads and to storage.
    let one_key = plan(
        &lab,
        &gateway,
        &gateway.secret,
        vec![addresses[0].into()],
        CLIENTS,
    )?;
    let mut crowd = CrowdProcess::start(
        &lab.client().netns,
        &one_key,
        &lab.log_dir().join("crowd.log"),
        CpuShare::Batch,
    )?;
    crowd.steady()?;
    crowd.closing()?;
    let summary = crowd.summary()?;
    other.closing()?;
    let other = other.summary()?;

    ensure!(
        summary.connected == KEY_CAP && summary.refused.get(&429) == Some(&(CLIENTS - KEY_CAP)),
        "{} connected, refused {:?}, failed {:?} ({:?})",
        summary.connected,
        summary.refused,
        summary.failed,
        summary.first_failure
    );
    let body = &summary.refusal_bodies[&429];
    let error: serde_json::Value = serde_json::from_str(body)?;
    let message = error["error"]["message"].as_str().unwrap_or_default();
    ensure!(
        message.contains("WebSocket connections for this API key")
            && message.contains(&format!("at most {KEY_CAP}")),
        "the 429's body does not name the limit: {body}"
    );
    assert_served("the key at its cap", &summary)?;
    ensure!(other.connected == 1, "the other key's client: {other:?}");
    assert_served("the other key", &other)?;
    // A round of calls every ~0.5 s for the whole hold: answered throughout.
    ensure!(
        other.uncached_calls.ok >= 20,
        "the other key got only {} uncached answers in {} s",
        other.uncached_calls.ok,
        other_plan.hold_seconds
    );
    assert_every_node_stayed(&lab, departed_before)?;
    Ok(())
}
