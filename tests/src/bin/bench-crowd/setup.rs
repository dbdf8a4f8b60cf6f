//! The benchmark's lab: 3 sim-nodes with Substrate's limits, lb-control with its health
//! checker and its gateway (TLS from the lab's CA, an API key made with the CLI, limits that
//! admit the crowd), the crowd's source addresses in the client namespace; and what is read
//! around the run: lb-control's CPU time and memory, its metrics, the nodes' connections.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use lb_tests::{
    lab::{
        Lab, LabConfig, SIM_NODE_RPC_PORT, backends_toml, certs::GatewayCerts, command_in_netns,
        run_checked,
    },
    proc_usage::{self, ProcessMemory},
    prometheus,
    sim_node::NodeStatus,
};

use crate::Settings;

/// The gateway's TLS port, on the LB's client-side address.
pub const GATEWAY_PORT: u16 = 8443;
/// Nodes behind the gateway.
pub const NODES: usize = 3;
/// `max_upstream_connections_per_node`, written into the config (the default, said out loud
/// so the report's cap is the one that was set).
pub const UPSTREAM_CAP: u32 = 32;
/// How long lb-control gets to put every node in rotation and to answer through the gateway.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(200);

/// The running lab.
pub struct Setup {
    pub lab: Lab,
    pub certs: GatewayCerts,
    pub key: String,
    pub lb_control: u32,
    pub sources: Vec<IpAddr>,
}

impl Setup {
    pub fn start(settings: &Settings) -> anyhow::Result<Setup> {
        let mut lab = Lab::start(LabConfig {
            nodes: NODES,
            block_time: Duration::from_millis(settings.block_time_ms),
            start_sim_nodes: true,
        })?;
        lab.plain_client_link()?;
        let lb = lab.lb().addr_v4;
        let certs = GatewayCerts::write(lab.log_dir(), "gateway", &[lb.into()])?;
        let config = lab.log_dir().join("lb-control.toml");
        std::fs::write(&config, lb_control_config(&lab, &certs, settings))
            .with_context(|| format!("writing {}", config.display()))?;
        let config = config.to_str().context("the lab's path is not UTF-8")?;
        let lb_control = lab.spawn_lb_control(&["--config", config])?.pid();
        let key = lab
            .create_api_key("crowd")
            .context("creating an API key with lb-control")?;
        let sources = lab
            .add_client_addresses(settings.sources)?
            .into_iter()
            .map(IpAddr::from)
            .collect();
        let setup = Setup {
            lab,
            certs,
            key,
            lb_control,
            sources,
        };
        setup.wait_until_ready()?;
        Ok(setup)
    }

    pub fn gateway(&self) -> SocketAddr {
        SocketAddr::from((self.lab.lb().addr_v4, GATEWAY_PORT))
    }

    /// The nodes' RPC addresses (the backends' addresses in lb-control's config).
    pub fn node_addresses(&self) -> Vec<SocketAddr> {
        self.lab
            .nodes()
            .iter()
            .map(|node| SocketAddr::from((node.addr_v4, SIM_NODE_RPC_PORT)))
            .collect()
    }

    /// lb-control, the nodes and the metrics, now.
    pub fn snapshot(&self) -> anyhow::Result<Snapshot> {
        let nodes = (0..NODES)
            .map(|index| self.lab.node_status(index))
            .collect::<Result<_, _>>()?;
        Ok(Snapshot {
            at: Instant::now(),
            cpu_seconds: proc_usage::cpu_seconds(self.lb_control)?,
            memory: ProcessMemory::read(self.lb_control)?,
            nodes,
            metrics: self.lab.lb_control_metrics()?,
        })
    }

    /// Every node in rotation (the health checker has seen them), and the gateway answering a
    /// call over TLS from the client.
    fn wait_until_ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let url = format!("https://{}/{}", self.gateway(), self.key);
        loop {
            let metrics = self.lab.lb_control_metrics()?;
            let in_rotation = prometheus::sum(&metrics, "lb_backend_in_rotation", |_| true);
            let answered = in_rotation as usize == NODES && {
                let mut curl = command_in_netns(&self.lab.client().netns, "curl")?;
                curl.args(["-sS", "--max-time", "5", "--cacert"])
                    .arg(&self.certs.ca)
                    .args([
                        "-H",
                        "content-type: application/json",
                        "-d",
                        r#"{"jsonrpc":"2.0","id":1,"method":"system_chain"}"#,
                    ])
                    .arg(&url);
                run_checked(&mut curl)
                    .is_ok_and(|output| String::from_utf8_lossy(&output.stdout).contains("result"))
            };
            if answered {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "after {READY_TIMEOUT:?}: {in_rotation} of {NODES} nodes in rotation, or the \
                     gateway does not answer; lb-control's log is in {}",
                    self.lab.log_dir().display()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Where the crowd writes its log.
    pub fn crowd_log(&self) -> PathBuf {
        self.lab.log_dir().join("crowd.log")
    }
}

/// lb-control's config: one VIP over the nodes with the chain-aware health check, and the
/// gateway with limits that admit the whole crowd (one key, a share of it per address).
fn lb_control_config(lab: &Lab, certs: &GatewayCerts, settings: &Settings) -> String {
    let lb = lab.lb().addr_v4;
    let per_address = settings.clients.div_ceil(settings.sources) + 64;
    let whole_crowd = settings.clients + 64;
    format!(
        "[dataplane]\nnat_source_v4 = \"{lb}\"\n\n\
         [[services]]\nvip = \"10.200.0.10\"\nport = {SIM_NODE_RPC_PORT}\ncheck = \"substrate\"\n\
         backends = [{}]\n\n\
         [gateway]\nlisten = \"{lb}:{GATEWAY_PORT}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n\
         max_connections_per_ip = {per_address}\nmax_connections_per_key = {whole_crowd}\n\
         max_subscriptions_per_key = {whole_crowd}\n\
         max_upstream_connections_per_node = {UPSTREAM_CAP}\n",
        backends_toml(lab.nodes().iter().map(|node| node.addr_v4)),
        certs.cert.display(),
        certs.key.display(),
    )
}

/// What is read at one moment of the run.
pub struct Snapshot {
    pub at: Instant,
    /// lb-control's user + system CPU time so far.
    pub cpu_seconds: f64,
    pub memory: ProcessMemory,
    pub nodes: Vec<NodeStatus>,
    /// lb-control's `/metrics`.
    pub metrics: String,
}

impl Snapshot {
    /// Transitions of each backend out of `up` so far (`lb_backend_transitions_total`, to
    /// `down`, `draining` or `disabled`), by backend.
    pub fn departures(&self) -> Vec<(String, f64)> {
        let mut by_backend: Vec<(String, f64)> = Vec::new();
        for sample in prometheus::samples(&self.metrics, "lb_backend_transitions_total") {
            if sample.label("to") == Some("up") {
                continue;
            }
            let backend = sample.label("backend").unwrap_or("?").to_owned();
            match by_backend.iter_mut().find(|(known, _)| *known == backend) {
                Some((_, count)) => *count += sample.value,
                None => by_backend.push((backend, sample.value)),
            }
        }
        by_backend
    }

    /// Backends out of rotation now (`lb_backend_in_rotation` 0).
    pub fn out_of_rotation(&self) -> Vec<String> {
        prometheus::samples(&self.metrics, "lb_backend_in_rotation")
            .filter(|sample| sample.value == 0.0)
            .map(|sample| sample.label("backend").unwrap_or("?").to_owned())
            .collect()
    }

    /// Health checks by node that did not pass (`lb_health_checks_total`, result not `ok`),
    /// as `node result count` lines.
    pub fn failed_checks(&self) -> Vec<(String, String, f64)> {
        prometheus::samples(&self.metrics, "lb_health_checks_total")
            .filter(|sample| sample.label("result") != Some("ok"))
            .map(|sample| {
                (
                    sample.label("node").unwrap_or("?").to_owned(),
                    sample.label("result").unwrap_or("?").to_owned(),
                    sample.value,
                )
            })
            .collect()
    }

    /// The gateway's open upstream WebSocket connections to each node
    /// (`lb_gateway_upstream_connections`).
    pub fn gateway_upstream_connections(&self) -> Vec<(String, f64)> {
        prometheus::samples(&self.metrics, "lb_gateway_upstream_connections")
            .map(|sample| (sample.label("node").unwrap_or("?").to_owned(), sample.value))
            .collect()
    }
}
