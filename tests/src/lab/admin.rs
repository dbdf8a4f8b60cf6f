//! What tests and benchmarks read and do through lb-control's admin side in the lab: its
//! Prometheus metrics, API keys made with its CLI (as an operator would), and the sim-nodes'
//! own status, asked from the LB namespace (which routes to every node).

use std::path::Path;

use crate::sim_node::{ControlClient, NodeStatus};

use super::{Lab, LabError, binary_path, command_in_netns, in_netns, run_checked};

/// lb-control's `/metrics`, on its admin API's default address in the LB namespace.
const METRICS_URL: &str = "http://127.0.0.1:9900/metrics";
/// The file in lb-control's state directory that holds its admin token (the daemon writes
/// one there at its first start unless the lab did).
const ADMIN_TOKEN_FILE: &str = "admin.token";

impl Lab {
    /// lb-control's Prometheus metrics, scraped with curl inside the LB namespace.
    pub fn lb_control_metrics(&self) -> Result<String, LabError> {
        lb_control_metrics_in(&self.lb().netns)
    }

    /// `lb-control key create --name NAME` in the LB namespace with the admin token from the
    /// state directory; the secret it printed.
    pub fn create_api_key(&self, name: &str) -> Result<String, LabError> {
        create_api_key(&self.lb().netns, &self.state_dir(), name)
    }

    /// Node `index`'s sim-node status (best block, calls per method, connections, the chain's
    /// schedule) from its control API.
    pub fn node_status(&self, index: usize) -> Result<NodeStatus, LabError> {
        let control = ControlClient::new(self.node_control_addr(index));
        in_netns(&self.lb().netns, || {
            // Sockets belong to the namespace of the thread that makes them: a runtime on this
            // thread alone.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(LabError::io("starting a runtime for the control API"))?;
            runtime
                .block_on(control.status())
                .map_err(|source| LabError::NodeControl { index, source })
        })?
    }
}

/// `lb-control key create --name NAME` in `netns`, whose lb-control keeps its admin token in
/// `state_dir`; the secret it printed.
pub(super) fn create_api_key(
    netns: &str,
    state_dir: &Path,
    name: &str,
) -> Result<String, LabError> {
    let token_file = state_dir.join(ADMIN_TOKEN_FILE);
    let token = std::fs::read_to_string(&token_file)
        .map_err(LabError::io(format!("reading {}", token_file.display())))?;
    let mut command = command_in_netns(netns, binary_path("lb-control")?)?;
    command
        .env("LB_ADMIN_TOKEN", token.trim())
        .args(["key", "create", "--name", name]);
    let output = run_checked(&mut command)?;
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find_map(|line| line.strip_prefix("secret: "))
        .map(str::to_owned)
        .ok_or_else(|| {
            LabError::Config("`lb-control key create` printed no `secret: ` line".to_owned())
        })
}

/// The Prometheus metrics of the lb-control in `netns`, scraped with curl there.
pub(crate) fn lb_control_metrics_in(netns: &str) -> Result<String, LabError> {
    let mut curl = command_in_netns(netns, "curl")?;
    curl.args(["-sS", "--max-time", "5", METRICS_URL]);
    let output = run_checked(&mut curl)?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
