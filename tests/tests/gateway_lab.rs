//! The gateway inside `lb-control run` in the lab: HTTPS from the client namespace to the LB's
//! address, a key made with the CLI, the nodes the backend set has up, `/metrics`, a
//! certificate renewed with SIGHUP, a key guesser put on the kernel blocklist, and reads under
//! a wrk load that survive a node dying and leave a lagging node once the health checker drops
//! it.
//!
//! These tests need root: run them as root or via `cargo xtask test`. They run the binaries,
//! so `cargo build --bins` first.

mod common;

use std::{path::Path, process::Stdio, time::Duration};

use anyhow::{Context, ensure};
use common::{GATEWAY_PORT, GatewayLab, ServiceConf, VIP_V4, up, wait_for};
use lb_tests::{
    lab::{
        Lab,
        certs::{LabCa, write_pem},
        command_in_netns, run_checked,
    },
    sim_node::faults::Fault,
    wrk,
};

/// `curl` from the client namespace: the body and the last line (`-w`) apart.
fn curl(lab: &Lab, ca: &Path, url: &str, extra: &[&str]) -> anyhow::Result<(String, String)> {
    let mut command = command_in_netns(&lab.client().netns, "curl")?;
    command.args(["-sS", "--max-time", "5", "--cacert"]);
    command.arg(ca);
    command.args([
        "-H",
        "content-type: application/json",
        "-w",
        "\n%{http_code} %{http_version}",
    ]);
    command.args(extra);
    command.arg(url);
    let output = run_checked(&mut command)?;
    let text = String::from_utf8(output.stdout)?;
    let (body, status) = text
        .rsplit_once('\n')
        .context("curl printed no status line")?;
    Ok((body.to_owned(), status.to_owned()))
}

#[test]
fn gateway_serves_https_from_the_daemon_with_a_cli_key() -> anyhow::Result<()> {
    let mut lab = common::start_lab(2, true, Duration::from_secs(2));
    let gateway = GatewayLab::start(
        &mut lab,
        &[ServiceConf::tcp(VIP_V4, vec![up(0), up(1)])],
        "auth_failures_block = { after = 3 }",
    )?;
    let (ca_path, url) = (&gateway.ca, gateway.url("https"));
    let call = r#"{"jsonrpc":"2.0","id":"lab","method":"system_chain"}"#;
    let (body, status) = curl(&lab, ca_path, &url, &["-d", call])?;
    ensure!(status == "200 2", "status {status}: {body}");
    ensure!(
        body == r#"{"jsonrpc":"2.0","result":"Development","id":"lab"}"#,
        "{body}"
    );

    let no_key = format!("https://{}:{GATEWAY_PORT}/", lab.lb().addr_v4);
    let (body, status) = curl(&lab, ca_path, &no_key, &["-d", call, "--http1.1"])?;
    ensure!(status == "401 1.1", "status {status}: {body}");

    let metrics = gateway.metrics(&lab)?;
    ensure!(
        metrics.contains("lb_gateway_calls_total{class=\"read\",outcome=\"ok\"} 1"),
        "{metrics}"
    );
    ensure!(metrics.contains("lb_gateway_auth_failures_total{reason=\"missing\"} 1"));
    // The admin API's stats carry the same gateway counters.
    let mut stats = command_in_netns(&lab.lb().netns, "curl")?;
    stats.args([
        "-sS",
        "-H",
        &format!("Authorization: Bearer {}", common::ADMIN_TOKEN),
        "http://127.0.0.1:9900/v1/stats",
    ]);
    let stats: serde_json::Value = serde_json::from_slice(&run_checked(&mut stats)?.stdout)?;
    ensure!(
        stats["gateway"]["lb_gateway_calls_total{class=\"read\",outcome=\"ok\"}"] == 1,
        "{stats}"
    );

    // A renewed certificate from another CA: after SIGHUP only the new CA is accepted.
    let renewed_ca = LabCa::new()?;
    let renewed = renewed_ca.issue(&[lab.lb().addr_v4.into()])?;
    let renewed_ca_path = lab.log_dir().join("renewed-ca.crt");
    write_pem(&renewed_ca_path, &renewed_ca.cert_pem())?;
    write_pem(&gateway.cert, &renewed.cert_pem)?;
    write_pem(&gateway.key, &renewed.key_pem)?;
    gateway.lb_control.signal(libc::SIGHUP);
    wait_for("the renewed certificate", || {
        Ok(curl(&lab, &renewed_ca_path, &url, &["-d", call]).is_ok())
    })?;
    ensure!(
        curl(&lab, ca_path, &url, &["-d", call]).is_err(),
        "the old certificate is still served"
    );

    // The third auth failure (one above) puts the client's address on the blocklist: then even
    // its good requests are dropped in XDP.
    for _ in 0..2 {
        let (_, status) = curl(&lab, &renewed_ca_path, &no_key, &["-d", call])
            .with_context(|| gateway.lb_control.log_tail())?;
        ensure!(status.starts_with("401"), "status {status}");
    }
    wait_for("the client's address to be blocked", || {
        Ok(curl(
            &lab,
            &renewed_ca_path,
            &url,
            &["-d", call, "--max-time", "1"],
        )
        .is_err())
    })?;
    ensure!(
        gateway
            .lb_control
            .log()
            .contains("blocked after repeated gateway auth failures"),
        "lb-control did not log the block"
    );
    // The block is in the state store too (after the kernel: serving never waits for it), so
    // a restart that lost the pinned maps, or a pair's other host, has it.
    let state_dir = lab.state_dir();
    let state_dir = state_dir.to_str().context("utf-8 state directory")?;
    let client = format!("{}/32", lab.client().addr_v4);
    wait_for("the block in the state store", || {
        let export = gateway
            .lb_control
            .cli_json(&lab, &["store", "export", "--state-dir", state_dir])?;
        Ok(export["blocklist"].as_array().is_some_and(|blocks| {
            blocks.iter().any(|block| {
                block["prefix"] == client.as_str() && block["source"] == "auth-failure"
            })
        }))
    })?;
    Ok(())
}

#[test]
fn cli_revoke_closes_a_subscription_only_websocket_with_1008_within_two_seconds()
-> anyhow::Result<()> {
    use std::{net::SocketAddr, time::Instant};

    use lb_tests::{lab::certs::trusting_client, ws_client::WsClient};
    use rustls::pki_types::ServerName;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

    // Blocks every 200 ms keep the subscription's notifications coming.
    let mut lab = common::start_lab(1, true, Duration::from_millis(200));
    let gateway = GatewayLab::start(&mut lab, &[ServiceConf::tcp(VIP_V4, vec![up(0)])], "")?;
    let keys = gateway
        .lb_control
        .cli_json(&lab, &["key", "list", "--json"])?;
    let id = keys[0]["id"]
        .as_u64()
        .context("the lab key's id")?
        .to_string();
    let address = lab.lb().addr_v4;
    let tcp = common::connect_from(
        &lab.client().netns,
        SocketAddr::from((address, GATEWAY_PORT)),
    )?;
    tcp.set_read_timeout(None)?;
    tcp.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let tls = tokio_rustls::TlsConnector::from(trusting_client(&gateway.ca)?)
            .connect(
                ServerName::from(std::net::IpAddr::from(address)),
                tokio::net::TcpStream::from_std(tcp)?,
            )
            .await?;
        let (stream, _) = tokio_tungstenite::client_async(gateway.url("wss"), tls).await?;
        let mut ws = WsClient::new(stream);
        let subscribed = ws
            .call("chain_subscribeNewHeads", serde_json::json!([]))
            .await;
        ensure!(subscribed["result"].is_string(), "{subscribed}");
        let head = ws.notification().await;
        ensure!(head["method"] == "chain_newHead", "{head}");
        // From here the client only reads (tungstenite sends no ping of its own; the gateway's
        // first ping is 30 s away).
        gateway.lb_control.cli(&lab, &["key", "revoke", &id])?;
        let revoked_at = Instant::now();
        // Heads keep coming while the connection is open: the wait is bounded here.
        let frame = tokio::time::timeout(Duration::from_secs(10), ws.closed())
            .await
            .context("still open and notified 10 s after the revoke")?
            .context("no close frame")?;
        let took = revoked_at.elapsed();
        eprintln!("`lb-control key revoke` to close: {took:?}");
        ensure!(frame.code == CloseCode::Policy, "{frame:?}");
        ensure!(
            took <= Duration::from_secs(2),
            "closed {took:?} after the revoke"
        );
        Ok(())
    })
}

/// The lab node (index) whose sim-node has `peer_id`.
fn node_with_peer_id(lab: &Lab, peer_id: &str) -> anyhow::Result<usize> {
    (0..lab.nodes().len())
        .find(|&index| {
            common::node_status(lab, index).is_ok_and(|status| status.peer_id == peer_id)
        })
        .with_context(|| format!("no node has peer id {peer_id}"))
}

/// The read every request of these tests makes: answered by the node itself (not cached), and
/// differently by each node, so an answer names the node that gave it.
const NODE_READ: &str = r#"{"jsonrpc":"2.0","id":1,"method":"system_localPeerId"}"#;

#[test]
fn reads_under_wrk_survive_a_node_dying_and_leave_a_lagging_node() -> anyhow::Result<()> {
    let mut lab = common::start_lab(3, true, Duration::from_millis(500));
    let gateway = GatewayLab::start(
        &mut lab,
        &[ServiceConf::checked(VIP_V4, vec![up(0), up(1), up(2)])],
        "",
    )?;
    let url = gateway.url("https");
    let peer_of = |lab: &Lab| -> anyhow::Result<String> {
        let (body, status) = curl(lab, &gateway.ca, &url, &["-d", NODE_READ])?;
        ensure!(status.starts_with("200"), "status {status}: {body}");
        let answer: serde_json::Value = serde_json::from_str(&body)?;
        answer["result"]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("no result: {body}"))
    };
    wait_for("the gateway to answer", || Ok(peer_of(&lab).is_ok()))?;
    let first = node_with_peer_id(&lab, &peer_of(&lab)?)?;

    let script = lab.log_dir().join("reads.lua");
    std::fs::write(&script, wrk::counting_script(NODE_READ, &[]))?;
    let mut wrk = command_in_netns(&lab.client().netns, "wrk")?;
    wrk.args(["-t2", "-c16", "-d8s", "--timeout", "5s", "-s"])
        .arg(&script)
        .arg(&url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let wrk = wrk.spawn().context("starting wrk")?;
    // Under way: the gateway has answered reads of this load.
    wait_for("wrk's reads to reach the gateway", || {
        Ok(gateway.metrics(&lab)?.lines().any(|line| {
            line.starts_with("lb_gateway_calls_total{class=\"read\",outcome=\"ok\"}")
                && line
                    .rsplit(' ')
                    .next()
                    .and_then(|count| count.parse::<u64>().ok())
                    .is_some_and(|count| count > 500)
        }))
    })?;
    lab.kill_sim_node(first)?;
    let output = wrk.wait_with_output()?;
    let text = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success(),
        "wrk failed: {text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary = wrk::CountedReads::from_output(&text)?;
    eprintln!("wrk through the gateway while node{first} died: {summary}");
    ensure!(summary.count("failed")? == 0, "reads failed: {summary}");
    ensure!(summary.socket_errors()? == 0, "socket errors: {summary}");
    ensure!(
        summary.count("answered")? > 1000,
        "too few reads: {summary}"
    );
    let metrics = gateway.metrics(&lab)?;
    ensure!(
        metrics
            .lines()
            .any(|line| line.starts_with("lb_gateway_retries_total{")),
        "no read was retried, so the dead node was never tried: {metrics}"
    );

    // The reads moved to another node; make it lag. Once the health checker drops it, it gets
    // no more reads.
    wait_for("the dead node to leave the rotation", || {
        Ok(common::kernel_states(&lab)?
            .values()
            .filter(|state| **state == "up")
            .count()
            == 2)
    })?;
    let second = node_with_peer_id(&lab, &peer_of(&lab)?)?;
    ensure!(second != first);
    common::set_fault(&lab, second, Fault::Behind { blocks: 20 })?;
    let lagging = lab.node(second).addr_v4;
    // Down in the kernel, and out of the gateway's rotation (the view reaches the gateway
    // just after the kernel): `/health` counts the one node left.
    wait_for("the lagging node to be down", || {
        Ok(common::kernel_states(&lab)?
            .iter()
            .any(|(backend, state)| backend.ip() == lagging && *state == "down")
            && gateway.health(&lab)?.1["nodes"] == 1)
    })?;
    let reads_before = common::node_status(&lab, second)?
        .requests
        .get("system_localPeerId")
        .copied();
    for _ in 0..20 {
        let peer = peer_of(&lab)?;
        ensure!(
            node_with_peer_id(&lab, &peer)? != second,
            "a read reached the lagging node"
        );
    }
    let reads_after = common::node_status(&lab, second)?
        .requests
        .get("system_localPeerId")
        .copied();
    ensure!(
        reads_before == reads_after,
        "{reads_before:?} -> {reads_after:?}"
    );
    Ok(())
}

#[test]
fn health_endpoint_answers_503_within_the_fall_time_once_every_node_is_down() -> anyhow::Result<()>
{
    let mut lab = common::start_lab(2, true, Duration::from_secs(1));
    let gateway = GatewayLab::start(
        &mut lab,
        &[ServiceConf::checked(VIP_V4, vec![up(0), up(1)])],
        "",
    )?;
    wait_for("both nodes up behind the gateway", || {
        let (status, body) = gateway.health(&lab)?;
        Ok(status.starts_with("200") && body["nodes"] == 2)
    })?;
    let (_, body) = gateway.health(&lab)?;
    ensure!(body["status"] == "ok", "{body}");

    lab.kill_sim_node(0)?;
    lab.kill_sim_node(1)?;
    let killed = std::time::Instant::now();
    wait_for("503 from /health", || {
        Ok(gateway.health(&lab)?.0.starts_with("503"))
    })?;
    let took = killed.elapsed();
    let (_, body) = gateway.health(&lab)?;
    ensure!(
        body == serde_json::json!({"status": "unavailable", "nodes": 0}),
        "{body}"
    );
    eprintln!("/health answered 503 {took:?} after the last node died");
    // The checker's defaults: a dead node is out after interval + (fall - 1) × fast_interval
    // plus a check's timeout, about 2.2 s; twice that leaves room for a loaded machine.
    ensure!(
        took < Duration::from_millis(4400),
        "503 took {took:?}, beyond the health checker's fall time"
    );
    Ok(())
}
