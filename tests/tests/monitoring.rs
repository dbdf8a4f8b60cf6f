//! The monitoring shipped in `dist/`: the Prometheus alert rules pass `promtool`'s checks and
//! their unit tests; then a real Prometheus, configured as `dist/prometheus` says, scrapes a
//! lab pair with those rules loaded: every query of the Grafana dashboard and of the rules
//! evaluates and finds the series it names, a healthy pair raises no alert, and a node that
//! hangs and an lb-control that dies raise theirs.
//!
//! These tests need `promtool` and `prometheus` (Debian's `prometheus`, which `cargo xtask
//! setup` installs); the lab test needs root and the built binaries (`cargo xtask test`).

mod common;

use std::{
    collections::BTreeSet,
    fs::File,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, bail, ensure};
use common::pair::{create_key, start_pair};
use lb_tests::{
    js_client::FollowingClients,
    lab::{
        Member, PairLab, SIM_NODE_CONTROL_PORT, SIM_NODE_RPC_PORT, command_in_netns, run_checked,
    },
    poll::wait_until,
};
use serde_json::Value;

/// `dist/` at the repository's root.
fn dist() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist")
}

fn rules_file() -> PathBuf {
    dist().join("prometheus/lb-control.rules.yml")
}

fn promtool(args: &[&str], dir: &Path) -> anyhow::Result<String> {
    let output = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .context("running promtool (Debian's prometheus package; `cargo xtask setup`)")?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    ensure!(
        output.status.success(),
        "promtool {}: {said}",
        args.join(" ")
    );
    Ok(said)
}

#[test]
fn the_scrape_config_and_alert_rules_pass_promtool_and_their_unit_tests() -> anyhow::Result<()> {
    let dir = dist().join("prometheus");
    // Checks the config and the rule files it loads.
    let checked = promtool(&["check", "config", "prometheus.yml"], &dir)?;
    ensure!(checked.contains("SUCCESS"), "{checked}");
    let tested = promtool(&["test", "rules", "lb-control.rules.test.yml"], &dir)?;
    ensure!(tested.contains("SUCCESS"), "{tested}");
    Ok(())
}

/// Where Prometheus listens, in the client's namespace.
const PROMETHEUS_ADDR: &str = "127.0.0.1:9090";

/// A Prometheus server in the lab's client namespace, scraping both LBs' admin APIs every
/// second and evaluating the shipped rules every second (an operator's would use 15 s).
struct Prometheus {
    child: Child,
    netns: String,
    log: PathBuf,
}

impl Prometheus {
    fn start(lab: &PairLab) -> anyhow::Result<Prometheus> {
        let targets: Vec<String> = [Member::A, Member::B]
            .into_iter()
            .map(|member| format!("\"{}\"", admin_target(lab, member)))
            .collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules}\n\
             scrape_configs:\n  - job_name: lb-control\n    static_configs:\n      \
             - targets: [{targets}]\n        labels:\n          pair: lab\n",
            rules = rules_file().display(),
            targets = targets.join(", "),
        );
        let dir = lab.log_dir().join("prometheus");
        std::fs::create_dir_all(&dir)?;
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config)?;
        let log_path = dir.join("prometheus.log");
        let log = File::create(&log_path)?;
        let netns = lab.client().netns.clone();
        let child = command_in_netns(&netns, "prometheus")?
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={PROMETHEUS_ADDR}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting prometheus (Debian's prometheus package; `cargo xtask setup`)")?;
        Ok(Prometheus {
            child,
            netns,
            log: log_path,
        })
    }

    /// The end of Prometheus's log.
    fn log(&self) -> String {
        lb_tests::logs::tail(&self.log, 2000)
    }

    /// `GET /api/v1/PATH` with `params`: the answer's `data`, failing on an error answer.
    fn api(&self, path: &str, params: &[(&str, &str)]) -> anyhow::Result<Value> {
        let mut command = command_in_netns(&self.netns, "curl")?;
        command
            .args(["-sS", "--max-time", "5", "-G"])
            .arg(format!("http://{PROMETHEUS_ADDR}/api/v1/{path}"));
        for (name, value) in params {
            command
                .arg("--data-urlencode")
                .arg(format!("{name}={value}"));
        }
        let output = run_checked(&mut command)?;
        let answer: Value = serde_json::from_slice(&output.stdout)
            .with_context(|| String::from_utf8_lossy(&output.stdout).into_owned())?;
        ensure!(answer["status"] == "success", "{path} {params:?}: {answer}");
        Ok(answer["data"].clone())
    }

    /// The series an instant query returns.
    fn query(&self, expr: &str) -> anyhow::Result<Vec<Value>> {
        let data = self.api("query", &[("query", expr)])?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }

    /// Alerts pending or firing.
    fn alerts(&self) -> anyhow::Result<Vec<Value>> {
        let data = self.api("alerts", &[])?;
        Ok(data["alerts"].as_array().cloned().unwrap_or_default())
    }

    /// When the rules were last evaluated, as Prometheus says it: a later evaluation changes it.
    fn last_evaluation(&self) -> anyhow::Result<String> {
        let data = self.api("rules", &[])?;
        let group = data["groups"]
            .as_array()
            .and_then(|groups| groups.first())
            .with_context(|| format!("Prometheus loaded no rule group: {data}"))?;
        Ok(group["lastEvaluation"].to_string())
    }

    /// The rules Prometheus could not evaluate, with its error.
    fn unhealthy_rules(&self) -> anyhow::Result<Vec<String>> {
        let data = self.api("rules", &[])?;
        let mut unhealthy = Vec::new();
        for group in data["groups"].as_array().into_iter().flatten() {
            for rule in group["rules"].as_array().into_iter().flatten() {
                if rule["health"] != "ok" {
                    unhealthy.push(format!(
                        "{}: {} {}",
                        rule["name"], rule["health"], rule["lastError"]
                    ));
                }
            }
        }
        Ok(unhealthy)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `member`'s admin API as a scrape target, e.g. `10.200.1.11:9900`.
fn admin_target(lab: &PairLab, member: Member) -> String {
    lab.admin_url(member)
        .trim_start_matches("http://")
        .to_owned()
}

/// Families lb-control creates only once what they count happens, which this test does not
/// bring about: a node's HTTP budget full, an upstream link failing under a client.
const ONLY_UNDER_FAULT: &[&str] = &[
    "lb_gateway_upstream_busy_total",
    "lb_gateway_upstream_connection_failures_total",
];

/// The metric names `text` (PromQL, a rules file) refers to: `up` and every `lb_…` word.
fn metric_names(text: &str, into: &mut BTreeSet<String>) {
    for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if word.starts_with("lb_") || word == "up" {
            into.insert(word.to_owned());
        }
    }
}

/// Every query of the Grafana dashboard, with its template variables as Grafana fills them
/// for "all LBs".
fn dashboard_queries() -> anyhow::Result<Vec<(String, String)>> {
    let path = dist().join("grafana/lb-control.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)
        .with_context(|| format!("{} is not JSON", path.display()))?;
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().context("panels")? {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().context("a target without expr")?;
            let filled = expr
                .replace("$instance", ".*")
                .replace("$__rate_interval", "1m");
            queries.push((panel["title"].as_str().unwrap_or("?").to_owned(), filled));
        }
    }
    ensure!(!queries.is_empty(), "the dashboard has no query");
    Ok(queries)
}

/// Runs `curl ARGS…` in `netns`; its standard output.
fn curl(netns: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut command = command_in_netns(netns, "curl")?;
    command.args(["-sS", "--max-time", "5"]).args(args);
    Ok(String::from_utf8(run_checked(&mut command)?.stdout)?)
}

/// An alert pending or firing with these labels.
fn has_alert(alerts: &[Value], name: &str, labels: &[(&str, &str)]) -> bool {
    alerts.iter().any(|alert| {
        alert["labels"]["alertname"] == name
            && labels
                .iter()
                .all(|(label, value)| alert["labels"][*label] == *value)
    })
}

#[test]
fn prometheus_with_the_shipped_rules_stays_quiet_on_a_healthy_pair_and_alerts_on_a_hung_node_and_a_dead_lb_control()
-> anyhow::Result<()> {
    let mut lab = start_pair(3)?;
    let prometheus = Prometheus::start(&lab)?;
    // Until it listens, the queries fail to connect.
    wait_until(
        "Prometheus scraping both LBs",
        Duration::from_secs(30),
        || {
            Ok(prometheus
                .query(r#"up{job="lb-control"} == 1"#)
                .is_ok_and(|up| up.len() == 2))
        },
    )
    .with_context(|| prometheus.log())?;

    // What users do: a polkadot.js app follows heads and calls, then leaves; a client with a
    // made-up key and one with the wrong HTTP method are refused.
    let key = create_key(&lab, Member::A, "monitoring")?;
    let client = lab.client().netns.clone();
    let wss_url = lab.gateway_url(&key).replacen("https", "wss", 1);
    let app = FollowingClients::start(
        &client,
        lab.ca(),
        &wss_url,
        1,
        60,
        lab.log_dir().join("js-client.ready"),
    )?;
    app.finish()?;
    let ca = lab.ca().display().to_string();
    let made_up = lab.gateway_url(&format!("lbk_{}", "0".repeat(64)));
    curl(&client, &["--cacert", &ca, "-d", "{}", &made_up])?;
    curl(&client, &["--cacert", &ca, &lab.gateway_url(&key)])?;
    wait_until(
        "Prometheus seeing the clients' traces",
        Duration::from_secs(20),
        || {
            Ok([
                "lb_gateway_websocket_closed_total",
                "lb_gateway_auth_failures_total",
                "lb_gateway_rejected_total",
            ]
            .iter()
            .all(|name| {
                prometheus
                    .query(name)
                    .is_ok_and(|series| !series.is_empty())
            }))
        },
    )?;
    // One evaluation of the rules that began after every series above was in.
    let seen = prometheus.last_evaluation()?;
    wait_until("a rule evaluation", Duration::from_secs(10), || {
        Ok(prometheus.last_evaluation()? != seen)
    })?;

    let unhealthy = prometheus.unhealthy_rules()?;
    ensure!(
        unhealthy.is_empty(),
        "rules Prometheus could not evaluate: {unhealthy:#?}"
    );
    let alerts = prometheus.alerts()?;
    ensure!(
        alerts.is_empty(),
        "a healthy pair raised alerts: {}",
        serde_json::to_string_pretty(&alerts)?
    );

    // Every dashboard query evaluates, and every metric the dashboard and the rules name is
    // one lb-control exports.
    let mut names = BTreeSet::new();
    for (panel, expr) in dashboard_queries()? {
        prometheus
            .query(&expr)
            .with_context(|| format!("the dashboard's panel {panel:?}"))?;
        metric_names(&expr, &mut names);
    }
    metric_names(&std::fs::read_to_string(rules_file())?, &mut names);
    let mut missing = Vec::new();
    for name in &names {
        if ONLY_UNDER_FAULT.contains(&name.as_str()) {
            continue;
        }
        if prometheus
            .query(&format!("count({{__name__=\"{name}\"}})"))?
            .is_empty()
        {
            missing.push(name.clone());
        }
    }
    ensure!(
        missing.is_empty(),
        "the dashboard or the rules name metrics no LB exports: {missing:?}"
    );
    for name in ONLY_UNDER_FAULT {
        ensure!(
            names.contains(*name),
            "{name} is listed as used but nothing uses it"
        );
    }

    // node1 hangs: its health checks time out, it leaves the rotation, and the alert is
    // raised by both LBs (each checks the nodes itself).
    let hung = &lab.nodes()[1];
    curl(
        &hung.netns,
        &[
            "--fail",
            "-H",
            "content-type: application/json",
            "-d",
            r#"{"fault":"unresponsive"}"#,
            &format!("http://127.0.0.1:{SIM_NODE_CONTROL_PORT}/fault"),
        ],
    )?;
    let backend = SocketAddr::from((hung.addr_v4, SIM_NODE_RPC_PORT)).to_string();
    let took = wait_until(
        "LbNodeOutOfRotation for the hung node from both LBs",
        Duration::from_secs(30),
        || {
            let alerts = prometheus.alerts()?;
            Ok([Member::A, Member::B].iter().all(|member| {
                has_alert(
                    &alerts,
                    "LbNodeOutOfRotation",
                    &[
                        ("backend", &backend),
                        ("instance", &admin_target(&lab, *member)),
                    ],
                )
            }))
        },
    )?;
    eprintln!("LbNodeOutOfRotation raised {took:?} after node1 hung");

    // LB b's lb-control dies: its scrapes fail.
    lab.kill_lb_control(Member::B)?;
    let b = admin_target(&lab, Member::B);
    let took = wait_until("LbControlDown for LB b", Duration::from_secs(20), || {
        Ok(has_alert(
            &prometheus.alerts()?,
            "LbControlDown",
            &[("instance", &b)],
        ))
    })?;
    eprintln!("LbControlDown raised {took:?} after LB b's lb-control was killed");
    // Nothing else, but what these two explain: the hung node's own alerts, and LB a's flow
    // sync, whose other end died with LB b's lb-control.
    let a = admin_target(&lab, Member::A);
    let explained = |alert: &Value| {
        let labels = &alert["labels"];
        let name = labels["alertname"].as_str().unwrap_or_default();
        matches!(name, "LbNodeOutOfRotation" | "LbControlDown")
            || labels["node"] == backend.as_str()
            || labels["backend"] == backend.as_str()
            || (name == "LbHaFlowSyncDown" && labels["instance"] == a.as_str())
    };
    let alerts = prometheus.alerts()?;
    if let Some(unexpected) = alerts.iter().find(|alert| !explained(alert)) {
        bail!("an alert that nothing here explains: {unexpected}");
    }
    Ok(())
}
