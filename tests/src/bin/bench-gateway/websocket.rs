//! The WebSocket runs: `ws-load` in the client namespace keeps `--ws-in-flight` calls in flight
//! on each of `--ws-connections` connections over TLS, to the gateway (its cache, or its
//! nodes over the shared upstream connections) or to nginx passing WebSockets through to the
//! nodes. Its summary is read as a wrk result, so the report treats both alike.

use std::{process::Stdio, time::Duration};

use anyhow::{Context, bail};
use lb_tests::{lab::binary_path, wrk::WrkResult, ws_load::WsLoadSummary};

use crate::{Settings, Target, setup::Setup};

/// Time beyond the run's own for connecting and closing.
const OVERRUN_SECONDS: u64 = 30;

/// One `ws-load` run of `target` for `seconds`.
pub fn run(
    setup: &Setup,
    settings: &Settings,
    target: Target,
    seconds: u64,
) -> anyhow::Result<WrkResult> {
    let (server, path) = setup
        .server(target)
        .with_context(|| format!("{} is not served on the LB", target.label()))?;
    let program = binary_path("ws-load")
        .context("the WebSocket runs use ws-load; build it with `cargo build --release --bins`")?;
    let mut command = setup.lab.exec(&setup.lab.client().netns, program)?;
    command
        .args(["--server", &server.to_string(), "--path", &path, "--ca"])
        .arg(setup.ca())
        .args(["--connections", &settings.ws_connections.to_string()])
        .args(["--in-flight", &settings.ws_in_flight.to_string()])
        .args(["--seconds", &seconds.to_string()])
        .args(["--method", target.method()])
        .stdin(Stdio::null());
    let output = lb_tests::bench::output_within(
        &mut command,
        "ws-load",
        Duration::from_secs(seconds + OVERRUN_SECONDS),
    )?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "ws-load failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let summary: WsLoadSummary = serde_json::from_str(stdout.trim())
        .with_context(|| format!("ws-load's summary: {stdout}"))?;
    Ok(WrkResult {
        requests: summary.answered + summary.errors,
        duration: Duration::from_micros(summary.duration_us),
        errors_status: summary.errors,
        p50: Duration::from_micros(summary.p50_us),
        p99: Duration::from_micros(summary.p99_us),
        max: Duration::from_micros(summary.max_us),
        ..WrkResult::default()
    })
}
