//! The gateway inside `lb-control run` in the lab: HTTPS from the client namespace to the LB's
//! address, a key made with the CLI, the nodes the backend set has up, `/metrics`, a
//! certificate renewed with SIGHUP, and a key guesser put on the kernel blocklist.
//!
//! These tests need root: run them as root or via `cargo xtask test`. They run the binaries,
//! so `cargo build --bins` first.

mod common;

use std::{path::Path, process::Output, time::Duration};

use anyhow::{Context, ensure};
use common::wait_for;
use lb_tests::lab::{
    Lab, SIM_NODE_RPC_PORT, binary_path,
    certs::{LabCa, write_pem},
    command_in_netns, run_checked,
};

const GATEWAY_PORT: u16 = 8443;

/// lb-control's config: one VIP over every node (not checked, so at once `up`) and the
/// gateway on the LB's client-side address.
fn write_config(lab: &Lab, cert: &Path, key: &Path) -> anyhow::Result<std::path::PathBuf> {
    let lb = lab.lb();
    let backends: Vec<String> = lab
        .nodes()
        .iter()
        .map(|node| format!("{{ address = \"{}:{SIM_NODE_RPC_PORT}\" }}", node.addr_v4))
        .collect();
    let text = format!(
        "[dataplane]\nnat_source_v4 = \"{}\"\n\n\
         [[services]]\nvip = \"10.200.0.10\"\nport = {SIM_NODE_RPC_PORT}\ncheck = \"none\"\n\
         backends = [{}]\n\n\
         [gateway]\nlisten = \"{}:{GATEWAY_PORT}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n\
         auth_failures_block = {{ after = 3 }}\n",
        lb.addr_v4,
        backends.join(", "),
        lb.addr_v4,
        cert.display(),
        key.display(),
    );
    let path = lab.log_dir().join("gateway.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}

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

fn lb_control(lab: &Lab, token: &str, args: &[&str]) -> anyhow::Result<Output> {
    let mut command = command_in_netns(&lab.lb().netns, binary_path("lb-control")?)?;
    command.env("LB_ADMIN_TOKEN", token).args(args);
    Ok(run_checked(&mut command)?)
}

#[test]
fn gateway_serves_https_from_the_daemon_with_a_cli_key() -> anyhow::Result<()> {
    let mut lab = common::start_lab(2, true, Duration::from_secs(2));
    let ca = LabCa::new()?;
    let (ca_path, cert, key) = (
        lab.log_dir().join("ca.crt"),
        lab.log_dir().join("gateway.crt"),
        lab.log_dir().join("gateway.key"),
    );
    let leaf = ca.issue(&[lab.lb().addr_v4.into()])?;
    write_pem(&ca_path, &ca.cert_pem())?;
    write_pem(&cert, &leaf.cert_pem)?;
    write_pem(&key, &leaf.key_pem)?;
    let config = write_config(&lab, &cert, &key)?;
    let config = config.to_str().context("utf-8 path")?.to_owned();
    let pid = lab.spawn_lb_control(&["--config", &config])?.pid();
    let token = std::fs::read_to_string(lab.state_dir().join("admin.token"))?;
    let token = token.trim();

    let created = lb_control(&lab, token, &["key", "create", "--name", "lab"])?;
    let created = String::from_utf8(created.stdout)?;
    let secret = created
        .lines()
        .find_map(|line| line.strip_prefix("secret: "))
        .context("no secret printed")?
        .to_owned();
    let url = format!("https://{}:{GATEWAY_PORT}/{secret}", lab.lb().addr_v4);
    let call = r#"{"jsonrpc":"2.0","id":"lab","method":"system_chain"}"#;
    let (body, status) = curl(&lab, &ca_path, &url, &["-d", call])?;
    ensure!(status == "200 2", "status {status}: {body}");
    ensure!(
        body == r#"{"jsonrpc":"2.0","result":"Development","id":"lab"}"#,
        "{body}"
    );

    let no_key = format!("https://{}:{GATEWAY_PORT}/", lab.lb().addr_v4);
    let (body, status) = curl(&lab, &ca_path, &no_key, &["-d", call, "--http1.1"])?;
    ensure!(status == "401 1.1", "status {status}: {body}");

    let mut scrape = command_in_netns(&lab.lb().netns, "curl")?;
    scrape.args(["-sS", "http://127.0.0.1:9900/metrics"]);
    let metrics = String::from_utf8(run_checked(&mut scrape)?.stdout)?;
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
        &format!("Authorization: Bearer {token}"),
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
    write_pem(&cert, &renewed.cert_pem)?;
    write_pem(&key, &renewed.key_pem)?;
    // SAFETY: plain kill(2) of lb-control, a child of this process that is not reaped before
    // the lab is dropped, so its pid cannot have been reused.
    let sent = unsafe { libc::kill(pid as libc::pid_t, libc::SIGHUP) };
    ensure!(
        sent == 0,
        "SIGHUP to lb-control: {}",
        std::io::Error::last_os_error()
    );
    wait_for("the renewed certificate", || {
        Ok(curl(&lab, &renewed_ca_path, &url, &["-d", call]).is_ok())
    })?;
    ensure!(
        curl(&lab, &ca_path, &url, &["-d", call]).is_err(),
        "the old certificate is still served"
    );

    // The third auth failure (one above) puts the client's address on the blocklist: then even
    // its good requests are dropped in XDP.
    for _ in 0..2 {
        let (_, status) = curl(&lab, &renewed_ca_path, &no_key, &["-d", call])?;
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
    let log = std::fs::read_to_string(lab.log_dir().join("lb-control.log"))?;
    ensure!(
        log.contains("blocked after repeated gateway auth failures"),
        "lb-control did not log the block"
    );
    Ok(())
}
