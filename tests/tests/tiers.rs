//! Backend tiers in the lab, under wrk load through the kernel path (a new connection per
//! request, so each request is a new flow) and through the gateway at once: the backup tier
//! gets no new flow and no gateway request while a primary is up, takes both over when every
//! primary dies (the failover time is printed), and gets none again once a primary returns.
//! The same through the gateway with another site's gateway (a second lb-control in another
//! namespace, over https and wss with its own key and CA) as the last tier.
//!
//! These tests need root: run them as root or via `cargo xtask test`. They run the binaries,
//! so `cargo build --bins` first.

mod common;

use std::{
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, ensure};
use common::{GatewayLab, ServiceConf, VIP_V4, backend_addr, backup, up, wait_for};
use lb_tests::{
    lab::Lab,
    prometheus::{samples, sum},
    wrk,
};

const PRIMARIES: [usize; 2] = [0, 1];
const BACKUP: usize = 2;
/// The load through the kernel path asks this, the load through the gateway the other: both
/// are answered by the node itself and asked by nothing else (not the health checker, not the
/// gateway's chain follower), so a node's count of each is what that load sent it.
const L4_METHOD: &str = "system_name";
const GATEWAY_METHOD: &str = "system_localPeerId";
/// Requests a load must have sent a tier before the test takes its counts as steady.
const STEADY: u64 = 200;
/// The longest wait for the backup to take over. The health checker's defaults take a dead
/// node out after interval + (fall - 1) × fast_interval plus a check's timeout, about 2.2 s;
/// twice that leaves room for a machine that wrk (and other work) keeps busy.
const FAILOVER_WITHIN: Duration = Duration::from_millis(4400);
/// A bound on a load's run: the test stops it when it has seen enough.
const LONGEST_LOAD: Duration = Duration::from_secs(120);

/// Calls of `method` node `index` has answered since its sim-node started.
fn answered(lab: &Lab, index: usize, method: &str) -> anyhow::Result<u64> {
    Ok(common::node_status(lab, index)?
        .requests
        .get(method)
        .copied()
        .unwrap_or(0))
}

/// Calls of `method` the primaries have answered.
fn answered_by_primaries(lab: &Lab, method: &str) -> anyhow::Result<u64> {
    PRIMARIES
        .iter()
        .map(|&index| answered(lab, index, method))
        .sum()
}

/// New flows the kernel gave `backend`.
fn new_flows(lab: &Lab, backend: SocketAddr) -> anyhow::Result<u64> {
    let stats = lb_control::dataplane::read_pinned_stats(&lab.pin_dir())?;
    Ok(stats
        .backends
        .iter()
        .filter(|counters| counters.backend == backend)
        .map(|counters| counters.new_flows)
        .sum())
}

/// The service's serving tier and each backend's state, as `lb-control status --json` shows
/// them.
fn status(gateway: &GatewayLab, lab: &Lab) -> anyhow::Result<(serde_json::Value, Vec<String>)> {
    let status = gateway.lb_control.cli_json(lab, &["status", "--json"])?;
    let service = &status["services"][0];
    let states = service["backends"]
        .as_array()
        .with_context(|| format!("no backends in {status:#}"))?
        .iter()
        .map(|backend| backend["state"].as_str().unwrap_or_default().to_owned())
        .collect();
    Ok((service["serving_tier"].clone(), states))
}

/// A wrk script in the lab's log directory.
fn write_script(lab: &Lab, name: &str, text: &str) -> anyhow::Result<PathBuf> {
    let path = lab.log_dir().join(name);
    std::fs::write(&path, text)?;
    Ok(path)
}

fn read(method: &str) -> String {
    format!(r#"{{"jsonrpc":"2.0","id":1,"method":"{method}"}}"#)
}

/// wrk through the gateway, keep-alive, asking [`GATEWAY_METHOD`].
fn load_through_gateway(lab: &Lab, gateway: &GatewayLab) -> anyhow::Result<wrk::Background> {
    let script = write_script(
        lab,
        "gateway.lua",
        &wrk::counting_script(&read(GATEWAY_METHOD), &[]),
    )?;
    wrk::Background::start(&wrk::Load {
        netns: &lab.client().netns,
        threads: 1,
        connections: 8,
        seconds: LONGEST_LOAD.as_secs(),
        script: &script,
        url: &gateway.url("https"),
    })
}

/// The tier the gateway's new clients go to, as `lb_gateway_serving_tier` says.
fn gateway_serving_tier(metrics: &str) -> Option<f64> {
    samples(metrics, "lb_gateway_serving_tier")
        .next()
        .map(|sample| sample.value)
}

#[test]
fn backup_tier_serves_only_while_every_primary_is_down_under_wrk() -> anyhow::Result<()> {
    let mut lab = common::start_lab(3, true, Duration::from_millis(500));
    let service = ServiceConf::checked(VIP_V4, vec![up(0), up(1), backup(BACKUP, 1)]);
    let gateway = GatewayLab::start(&mut lab, std::slice::from_ref(&service), "")?;
    let backup_addr = backend_addr(&lab, BACKUP, service.vip);
    wait_for("the primaries up and the backup standing by", || {
        Ok(status(&gateway, &lab)?
            == (
                serde_json::json!(0),
                vec!["up".to_owned(), "up".to_owned(), "standby".to_owned()],
            ))
    })?;

    let l4_script = write_script(
        &lab,
        "l4.lua",
        &wrk::counting_script(&read(L4_METHOD), &[("Connection", "close")]),
    )?;
    let l4 = wrk::Background::start(&wrk::Load {
        netns: &lab.client().netns,
        threads: 1,
        connections: 4,
        seconds: LONGEST_LOAD.as_secs(),
        script: &l4_script,
        url: &format!("http://{}/", service.target()),
    })?;
    let through_gateway = load_through_gateway(&lab, &gateway)?;

    // Primaries up: the backup gets nothing new, by either path.
    wait_for("both loads answered by the primaries", || {
        Ok(answered_by_primaries(&lab, L4_METHOD)? >= STEADY
            && answered_by_primaries(&lab, GATEWAY_METHOD)? >= STEADY)
    })?;
    ensure!(
        new_flows(&lab, backup_addr)? == 0
            && answered(&lab, BACKUP, L4_METHOD)? == 0
            && answered(&lab, BACKUP, GATEWAY_METHOD)? == 0,
        "the backup got new flows ({}) or requests ({} through the kernel, {} through the \
         gateway) while both primaries were up",
        new_flows(&lab, backup_addr)?,
        answered(&lab, BACKUP, L4_METHOD)?,
        answered(&lab, BACKUP, GATEWAY_METHOD)?
    );

    // Every primary dies: the backup takes both loads over.
    for index in PRIMARIES {
        lab.kill_sim_node(index)?;
    }
    let killed = Instant::now();
    let (mut in_kernel, mut l4_served, mut gateway_served) = (None, None, None);
    wait_for("the backup to take over both loads", || {
        if in_kernel.is_none()
            && common::kernel_states(&lab)?.get(&backup_addr).copied() == Some("up")
        {
            in_kernel = Some(killed.elapsed());
        }
        if l4_served.is_none() && answered(&lab, BACKUP, L4_METHOD)? > 0 {
            l4_served = Some(killed.elapsed());
        }
        if gateway_served.is_none() && answered(&lab, BACKUP, GATEWAY_METHOD)? > 0 {
            gateway_served = Some(killed.elapsed());
        }
        Ok(in_kernel.is_some() && l4_served.is_some() && gateway_served.is_some())
    })
    .with_context(|| gateway.lb_control.log_tail())?;
    let (in_kernel, l4_served, gateway_served) = (
        in_kernel.unwrap_or_default(),
        l4_served.unwrap_or_default(),
        gateway_served.unwrap_or_default(),
    );
    println!(
        "failover to the backup tier after both primaries were killed: up in the kernel's \
         table after {in_kernel:?}; first request answered by the backup through the kernel \
         path after {l4_served:?}, through the gateway after {gateway_served:?}"
    );
    for (what, took) in [
        ("the kernel's table", in_kernel),
        ("the kernel path", l4_served),
        ("the gateway", gateway_served),
    ] {
        ensure!(
            took <= FAILOVER_WITHIN,
            "the backup took over {what} {took:?} after the primaries died (at most \
             {FAILOVER_WITHIN:?})\n{}",
            gateway.lb_control.log_tail()
        );
    }
    wait_for("both loads answered by the backup", || {
        Ok(answered(&lab, BACKUP, L4_METHOD)? >= STEADY
            && answered(&lab, BACKUP, GATEWAY_METHOD)? >= STEADY)
    })?;
    let (serving, _) = status(&gateway, &lab)?;
    ensure!(serving == 1, "status shows tier {serving} serving");
    let metric = format!(
        "lb_service_serving_tier{{service=\"{}/tcp\"}} 1",
        service.target()
    );
    ensure!(
        gateway.metrics(&lab)?.contains(&metric),
        "{metric} missing from the metrics"
    );

    // A primary returns: new flows and requests go to the primaries again; the backup stands
    // by (keeping what it has: with a new connection per request, nothing).
    for index in PRIMARIES {
        lab.restart_sim_node(index)?;
    }
    wait_for("the primaries up again and the backup standing by", || {
        Ok(status(&gateway, &lab)?
            == (
                serde_json::json!(0),
                vec!["up".to_owned(), "up".to_owned(), "standby".to_owned()],
            ))
    })
    .with_context(|| gateway.lb_control.log_tail())?;
    // Requests already on their way to the backup when it stood down are answered first.
    wait_for("both loads answered by the primaries again", || {
        Ok(answered_by_primaries(&lab, L4_METHOD)? >= STEADY / 2
            && answered_by_primaries(&lab, GATEWAY_METHOD)? >= STEADY / 2)
    })?;
    let before = (
        new_flows(&lab, backup_addr)?,
        answered(&lab, BACKUP, L4_METHOD)?,
        answered(&lab, BACKUP, GATEWAY_METHOD)?,
    );
    let (l4_base, gateway_base) = (
        answered_by_primaries(&lab, L4_METHOD)?,
        answered_by_primaries(&lab, GATEWAY_METHOD)?,
    );
    wait_for("more of both loads answered by the primaries", || {
        Ok(answered_by_primaries(&lab, L4_METHOD)? >= l4_base + STEADY
            && answered_by_primaries(&lab, GATEWAY_METHOD)? >= gateway_base + STEADY)
    })?;
    let after = (
        new_flows(&lab, backup_addr)?,
        answered(&lab, BACKUP, L4_METHOD)?,
        answered(&lab, BACKUP, GATEWAY_METHOD)?,
    );
    ensure!(
        after == before,
        "with the primaries back, the backup still got new flows or requests: (new flows, \
         kernel-path requests, gateway requests) went from {before:?} to {after:?}"
    );

    let l4 = l4.stop()?;
    let through_gateway = through_gateway.stop()?;
    println!("wrk through the kernel path (a connection per request): {l4}");
    println!("wrk through the gateway (keep-alive): {through_gateway}");
    Ok(())
}

/// The node whose namespace is the other site.
const SITE_NODE: usize = 2;

#[test]
fn a_remote_gateway_serves_as_the_last_tier_only_while_every_local_node_is_down()
-> anyhow::Result<()> {
    let mut lab = common::start_lab(3, true, Duration::from_millis(500));
    let site = lab.start_remote_site(SITE_NODE)?;
    let service = ServiceConf::checked(VIP_V4, vec![up(0), up(1)]);
    let gateway = GatewayLab::start(
        &mut lab,
        std::slice::from_ref(&service),
        &site.gateway_remote(1),
    )?;
    // The health checker and the gateway name the remote by its relay's address.
    let metrics = gateway.metrics(&lab)?;
    let relay = samples(&metrics, "lb_gateway_remote_info")
        .find(|sample| sample.label("remote") == Some(site.url.as_str()))
        .and_then(|sample| sample.label("node"))
        .with_context(|| format!("no lb_gateway_remote_info for {}:\n{metrics}", site.url))?
        .to_owned();
    wait_for(
        "the remote checked healthy and the primaries serving",
        || {
            let metrics = gateway.metrics(&lab)?;
            let checked = sum(&metrics, "lb_health_checks_total", |sample| {
                sample.label("node") == Some(relay.as_str()) && sample.label("result") == Some("ok")
            });
            Ok(checked >= 2.0 && gateway_serving_tier(&metrics) == Some(0.0))
        },
    )
    .with_context(|| gateway.lb_control.log_tail())?;

    let load = load_through_gateway(&lab, &gateway)?;
    wait_for("the load answered by the primaries", || {
        Ok(answered_by_primaries(&lab, GATEWAY_METHOD)? >= STEADY)
    })?;
    let by_site = |lab: &Lab| answered(lab, SITE_NODE, GATEWAY_METHOD);
    ensure!(
        by_site(&lab)? == 0,
        "the other site answered {} requests while both local nodes were up",
        by_site(&lab)?
    );

    // Every local node dies: the other site serves the gateway's clients.
    for index in PRIMARIES {
        lab.kill_sim_node(index)?;
    }
    let killed = Instant::now();
    wait_for("the other site to answer the load", || {
        Ok(by_site(&lab)? > 0)
    })
    .with_context(|| gateway.lb_control.log_tail())?;
    let took = killed.elapsed();
    println!(
        "failover to the remote gateway after every local node was killed: first request \
         answered by the other site after {took:?}"
    );
    ensure!(
        took <= FAILOVER_WITHIN,
        "the other site answered {took:?} after the local nodes died (at most \
         {FAILOVER_WITHIN:?})\n{}",
        gateway.lb_control.log_tail()
    );
    wait_for("the load answered by the other site", || {
        Ok(by_site(&lab)? >= STEADY)
    })?;
    let metrics = gateway.metrics(&lab)?;
    ensure!(
        gateway_serving_tier(&metrics) == Some(1.0),
        "lb_gateway_serving_tier is not 1 while the other site serves:\n{metrics}"
    );
    let status = gateway.lb_control.cli_json(&lab, &["status", "--json"])?;
    let shown = &status["gateway"];
    ensure!(
        shown["serving_tier"] == 1
            && shown["remotes"][0]["url"] == site.url.as_str()
            && shown["remotes"][0]["health"]["verdict"] == "healthy",
        "`lb-control status` does not show the other site serving: {shown:#}"
    );
    let text = gateway.lb_control.cli(&lab, &["status"])?;
    ensure!(
        text.contains("new clients served by backup tier 1") && text.contains(&site.url),
        "{text}"
    );

    // The local nodes return: the other site gets nothing new.
    for index in PRIMARIES {
        lab.restart_sim_node(index)?;
    }
    wait_for("the primaries serving the gateway again", || {
        Ok(gateway_serving_tier(&gateway.metrics(&lab)?) == Some(0.0))
    })
    .with_context(|| gateway.lb_control.log_tail())?;
    wait_for("the load answered by the primaries again", || {
        Ok(answered_by_primaries(&lab, GATEWAY_METHOD)? >= STEADY / 2)
    })?;
    let before = by_site(&lab)?;
    let base = answered_by_primaries(&lab, GATEWAY_METHOD)?;
    wait_for("more of the load answered by the primaries", || {
        Ok(answered_by_primaries(&lab, GATEWAY_METHOD)? >= base + STEADY)
    })?;
    let after = by_site(&lab)?;
    ensure!(
        after == before,
        "with the local nodes back, the other site still got requests: {before} -> {after}"
    );
    let load = load.stop()?;
    println!("wrk through the gateway (keep-alive): {load}");
    Ok(())
}
