//! `lb-control upgrade` in the lab, under load: a new lb-control process takes the gateway's
//! listening sockets over while wrk keeps HTTPS keep-alive connections busy (HTTP/1.1), Rust
//! clients keep HTTP/2 connections busy, WebSocket clients (Rust, and polkadot.js calling as
//! they follow) follow new heads and an L4 connection goes through the kernel path. No HTTP
//! request fails, every WebSocket client is closed with 1012 and gets back in (polkadot.js
//! sees no error), and the L4 connection carries on.
//!
//! These tests need root: run them as root or via `cargo xtask test`. They run the binaries,
//! so `cargo build --bins --features lb-control/test-harness` first.

mod common;

use std::{
    net::{IpAddr, SocketAddr},
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, ensure};
use common::{
    GATEWAY_PORT, GatewayLab, KeepAlive, ServiceConf, VIP_V4, up, wait_for,
    wss::{Reconnect, WssConnector, spread},
};
use lb_tests::{js_client::FollowingClients, lab::command_in_netns, wrk};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// The read wrk sends: answered by a node (never cached), so the load reaches the nodes
/// through the gateway's upstream as a real one does.
const NODE_READ: &str = r#"{"jsonrpc":"2.0","id":1,"method":"system_localPeerId"}"#;

/// WebSocket clients following new heads across the upgrade.
const WEBSOCKET_CLIENTS: usize = 20;

/// polkadot.js clients (tests/js/follow-restarts.mjs) following heads and calling across the
/// upgrade.
const JS_CLIENTS: usize = 4;

/// HTTP/2 clients, each sending one read after another on its own connection.
const HTTP2_CLIENTS: usize = 4;

/// What the HTTP/2 clients saw: reads answered with a result, and every other outcome (an
/// error of the client, another status, a JSON-RPC error) with the first one's description.
#[derive(Debug, Default)]
struct Http2Tally {
    answered: u64,
    failed: u64,
    first_failure: Option<String>,
}

/// One HTTP/2 client (its own connection) sending reads until `stop`.
async fn send_reads_over_http2(
    client: reqwest::Client,
    url: String,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Http2Tally {
    let mut tally = Http2Tally::default();
    while !stop.load(Ordering::SeqCst) {
        let sent = client
            .post(&url)
            .header("content-type", "application/json")
            .body(NODE_READ)
            .send()
            .await;
        let outcome = match sent {
            Ok(response) if response.version() != reqwest::Version::HTTP_2 => {
                Err(format!("answered over {:?}", response.version()))
            }
            Ok(response) => {
                let status = response.status();
                match response.text().await {
                    Ok(body) if status == 200 && body.contains("\"result\"") => Ok(()),
                    Ok(body) => Err(format!("{status} {body}")),
                    Err(error) => Err(format!("{status}, reading the body: {error}")),
                }
            }
            Err(error) => Err(format!("{error:?}")),
        };
        match outcome {
            Ok(()) => tally.answered += 1,
            Err(failure) => {
                tally.failed += 1;
                tally.first_failure.get_or_insert(failure);
            }
        }
    }
    tally
}

#[test]
fn upgrade_under_load_fails_no_request_and_moves_websockets_to_the_new_process()
-> anyhow::Result<()> {
    // Heads every 500 ms, so a WebSocket client hears one soon after it (re)subscribes.
    let mut lab = common::start_lab(2, true, Duration::from_millis(500));
    let service = ServiceConf::tcp(VIP_V4, vec![up(0), up(1)]);
    let mut gateway = GatewayLab::start(&mut lab, std::slice::from_ref(&service), "")?;
    let client_netns = lab.client().netns.clone();

    // The kernel path: a keep-alive connection through the L4 service.
    let mut l4 = KeepAlive::open(&client_netns, service.target())?;

    let script = lab.log_dir().join("reads.lua");
    std::fs::write(&script, wrk::counting_script(NODE_READ, &[]))?;
    let mut wrk = command_in_netns(&client_netns, "wrk")?;
    wrk.args(["-t2", "-c32", "-d14s", "--timeout", "5s", "-s"])
        .arg(&script)
        .arg(gateway.url("https"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let wrk = wrk.spawn().context("starting wrk")?;
    wait_for("wrk's reads to reach the gateway", || {
        Ok(read_calls(&gateway.metrics(&lab)?) > 500)
    })?;

    // HTTP/2 clients on a runtime whose threads live in the client namespace (threads made
    // there inherit it), so their connections start there.
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&gateway.ca)?)?;
    let http2_runtime = lb_tests::lab::in_netns(&client_netns, || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
    })??;
    let stop_http2 = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let http2_clients = (0..HTTP2_CLIENTS)
        .map(|_| {
            let client = reqwest::Client::builder()
                .add_root_certificate(ca.clone())
                .http2_prior_knowledge()
                .timeout(Duration::from_secs(5))
                .build()?;
            Ok(http2_runtime.spawn(send_reads_over_http2(
                client,
                gateway.url("https"),
                stop_http2.clone(),
            )))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;

    let address = SocketAddr::new(IpAddr::from(lab.lb().addr_v4), GATEWAY_PORT);
    let connector = Arc::new(WssConnector::new(
        &gateway.ca,
        gateway.url("wss"),
        &client_netns,
        address,
    )?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let subscribed = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..WEBSOCKET_CLIENTS)
        .map(|_| {
            let (connector, subscribed) = (connector.clone(), subscribed.clone());
            runtime.spawn(async move { connector.follow_through_close(subscribed).await })
        })
        .collect();
    wait_for("the WebSocket clients to follow heads", || {
        Ok(subscribed.load(Ordering::SeqCst) == WEBSOCKET_CLIENTS)
    })?;
    let js_clients = FollowingClients::start(
        &lab.client().netns,
        &gateway.ca,
        &gateway.url("wss"),
        JS_CLIENTS,
        120,
        lab.log_dir().join("js-clients.ready"),
    )?;

    let old_pid = gateway.lb_control.pid();
    let asked = Instant::now();
    let upgraded = gateway
        .lb_control
        .upgrade(&lab)
        .with_context(|| gateway.lb_control.log_tail())?;
    let answered = asked.elapsed();
    ensure!(upgraded.pid != old_pid, "{upgraded:?}");
    wait_for(
        &format!("the old lb-control (pid {old_pid}) to exit"),
        || Ok(common::has_exited(old_pid)),
    )
    .with_context(|| gateway.lb_control.log_tail())?;
    let old_exited = asked.elapsed();

    let reconnects: Vec<Reconnect> = runtime.block_on(async {
        let mut reconnects = Vec::new();
        for client in clients {
            reconnects.push(client.await??);
        }
        anyhow::Ok(reconnects)
    })?;

    // Until each polkadot.js client is back and has heard a head on its new connection.
    wait_for("the polkadot.js clients to follow heads again", || {
        js_clients.back()
    })?;
    let js = js_clients.finish()?;

    let output = wrk.wait_with_output()?;
    stop_http2.store(true, Ordering::SeqCst);
    let mut http2 = Http2Tally::default();
    for client in http2_clients {
        let tally = http2_runtime.block_on(client)?;
        http2.answered += tally.answered;
        http2.failed += tally.failed;
        if http2.first_failure.is_none() {
            http2.first_failure = tally.first_failure;
        }
    }
    let text = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success(),
        "wrk failed: {text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary = wrk::CountedReads::from_output(&text)?;

    eprintln!(
        "upgrade: `lb-control upgrade` answered after {answered:?} (the new process served \
         {} ms after the request), the old process exited after {old_exited:?}",
        upgraded.took_ms
    );
    eprintln!("wrk across the upgrade: {summary}");
    eprintln!("{HTTP2_CLIENTS} HTTP/2 clients across the upgrade: {http2:?}");
    eprintln!(
        "{WEBSOCKET_CLIENTS} WebSocket clients, from the close to subscribed again: {}; to \
         the first head on the new connection: {}",
        spread(&reconnects, |reconnect| reconnect.subscribed),
        spread(&reconnects, |reconnect| reconnect.first_head)
    );
    // Each reconnection's wall-clock milliseconds: down, connected again, first head.
    let since_down = |to: &str| -> Vec<u64> {
        js["reconnections"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|reconnection| {
                Some(reconnection[to].as_u64()? - reconnection["down"].as_u64()?)
            })
            .collect()
    };
    eprintln!(
        "{JS_CLIENTS} polkadot.js clients: from the close to connected again {:?} ms, to the \
         first head after it {:?} ms; {js}",
        since_down("up"),
        since_down("head")
    );

    ensure!(summary.count("failed")? == 0, "failed: {summary}");
    ensure!(summary.socket_errors()? == 0, "socket errors: {summary}");
    ensure!(
        summary.count("answered")? > 1000,
        "too few reads: {summary}"
    );
    ensure!(http2.failed == 0, "HTTP/2 reads failed: {http2:?}");
    ensure!(http2.answered > 100, "too few HTTP/2 reads: {http2:?}");
    for reconnect in &reconnects {
        ensure!(
            reconnect.close_code == Some(CloseCode::Restart),
            "a client was closed with {:?}, not 1012",
            reconnect.close_code
        );
    }
    ensure!(
        js["errorAnswers"] == 0 && js["cutOff"] == 0,
        "a polkadot.js call failed across the upgrade: {js}"
    );
    ensure!(
        js["reconnected"] == JS_CLIENTS && js["followingAfterReconnect"] == JS_CLIENTS,
        "every polkadot.js client was moved to the new process and followed heads again: {js}"
    );
    // The new process serves what came after: the gateway, the admin API, and the kernel
    // path, where the L4 connection went on all along.
    l4.check_same_node()?;
    let status = gateway.lb_control.cli(&lab, &["status"])?;
    ensure!(status.contains("up"), "{status}");
    ensure!(
        gateway
            .lb_control
            .log()
            .contains("upgrade: the new lb-control serves"),
        "{}",
        gateway.lb_control.log_tail()
    );
    Ok(())
}

#[test]
fn failed_upgrade_leaves_the_running_lb_control_serving() -> anyhow::Result<()> {
    let mut lab = common::start_lab(1, true, Duration::from_secs(2));
    let gateway = GatewayLab::start(&mut lab, &[ServiceConf::tcp(VIP_V4, vec![up(0)])], "")?;
    let config_path = gateway.lb_control.config_path().to_owned();
    let good_config = std::fs::read_to_string(&config_path)?;
    // The new process reads the config as it is now: a broken one ends it at once.
    std::fs::write(&config_path, "[gateway]\nlisten = \"not an address\"\n")?;
    let state_dir = lab.state_dir();
    let output = lab
        .exec(&lab.lb().netns, lb_tests::lab::binary_path("lb-control")?)?
        .args(["upgrade", "--state-dir"])
        .arg(&state_dir)
        .output()?;
    std::fs::write(&config_path, good_config)?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(!output.status.success(), "the upgrade succeeded: {stderr}");
    ensure!(
        stderr.contains("exited") && stderr.contains("before it served"),
        "{stderr}"
    );

    // The same process serves on: the gateway and the admin API answer.
    ensure!(!common::has_exited(gateway.lb_control.pid()));
    let reads_before = read_calls(&gateway.metrics(&lab)?);
    let mut curl = command_in_netns(&lab.client().netns, "curl")?;
    curl.args(["-sS", "--max-time", "5", "--cacert"])
        .arg(&gateway.ca)
        .args(["-H", "content-type: application/json", "-d", NODE_READ])
        .arg(gateway.url("https"));
    let answer = lb_tests::lab::run_checked(&mut curl)?;
    let answer = String::from_utf8_lossy(&answer.stdout);
    ensure!(answer.contains("\"result\""), "{answer}");
    ensure!(read_calls(&gateway.metrics(&lab)?) == reads_before + 1);
    Ok(())
}

/// `lb_gateway_calls_total{class="read",outcome="ok"}` in a scrape.
fn read_calls(metrics: &str) -> u64 {
    metrics
        .lines()
        .find_map(|line| {
            line.strip_prefix("lb_gateway_calls_total{class=\"read\",outcome=\"ok\"} ")
        })
        .and_then(|count| count.parse().ok())
        .unwrap_or(0)
}
