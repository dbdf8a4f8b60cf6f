//! `lb-control rollout`: upgrades a service's nodes one at a time. Each is drained until empty,
//! the operator's command runs for it, and it rejoins: health-checked from scratch, it enters
//! once its node has passed `rise` checks in a row. The rollout stops at the first failure,
//! saying which node and what failed, and leaves that node out of rotation.

use std::{process::Stdio, time::Duration};

use anyhow::{Context, anyhow, bail};
use lb_control::{
    admin_client::AdminClient,
    api::model::BackendInfo,
    backends::State,
    model::{AdminState, ServiceKey},
};
use tokio::time::Instant;

use super::wait;

/// What a rollout does to each node.
pub struct Plan {
    pub service: ServiceKey,
    /// A shell command; `{address}`, `{ip}` and `{id}` stand for the node's.
    pub exec: String,
    /// How long a node may take to drain; then its WebSocket clients are closed (1012).
    pub drain_timeout: Duration,
    /// How long a node may take to pass its checks after the command.
    pub health_timeout: Duration,
}

pub async fn run(client: &AdminClient, plan: &Plan) -> anyhow::Result<()> {
    let started = Instant::now();
    let name = plan.service.to_string();
    let nodes: Vec<BackendInfo> = service_backends(client, &name)
        .await?
        .into_iter()
        .filter(|backend| {
            let disabled = backend.backend.def.admin == AdminState::Disabled;
            if disabled {
                println!(
                    "skipping backend {} ({}): disabled",
                    backend.backend.id, backend.backend.def.address
                );
            }
            !disabled
        })
        .collect();
    if nodes.is_empty() {
        bail!("{name} has no backend to roll out (disabled ones are skipped)");
    }
    println!(
        "rolling out {} backends of {name}, one at a time",
        nodes.len()
    );
    for (index, node) in nodes.iter().enumerate() {
        let id = node.backend.id;
        let step = format!(
            "[{}/{}] backend {id} ({})",
            index + 1,
            nodes.len(),
            node.backend.def.address
        );
        let stopped = |what: String| {
            anyhow!(
                "rollout of {name} stopped at backend {id} ({}), node {} of {}: {what}",
                node.backend.def.address,
                index + 1,
                nodes.len()
            )
        };
        let node_started = Instant::now();

        let others_up = service_backends(client, &name)
            .await?
            .iter()
            .filter(|other| other.backend.id != id && other.state == State::Up)
            .count();
        if others_up == 0 {
            return Err(stopped(
                "no other backend of the service is up, so draining it would leave nothing to \
                 serve; it was not touched"
                    .to_owned(),
            ));
        }
        println!("{step}: draining");
        client.set_admin(id, AdminState::Draining).await?;
        let left = wait::until_empty(client, id, plan.drain_timeout).await?;
        if left > 0 {
            return Err(stopped(format!(
                "{left} open flows after {}; it stays draining: wait for its L4 clients, or \
                 run the rollout again with a longer --timeout",
                humantime::format_duration(plan.drain_timeout)
            )));
        }

        let command = fill_in(&plan.exec, node);
        println!("{step}: running `{command}`");
        let status = tokio::process::Command::new("sh")
            .args(["-c", &command])
            .stdin(Stdio::null())
            .status()
            .await
            .with_context(|| format!("starting `sh -c {command}`"))?;
        if !status.success() {
            return Err(stopped(format!(
                "`{command}` failed ({status}); it stays draining, out of rotation: fix the node, \
                 then `lb-control backend rejoin {id}`"
            )));
        }

        println!("{step}: rejoining: it enters once its health checks pass");
        client.set_admin(id, AdminState::Joining).await?;
        wait::until_up(client, id, plan.health_timeout)
            .await
            .map_err(|error| stopped(format!("{error:#}")))?;
        println!(
            "{step}: up again after {:.1} s",
            node_started.elapsed().as_secs_f64()
        );
    }
    println!(
        "rolled out {} backends of {name} in {:.1} s",
        nodes.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The service's backends, in id order.
async fn service_backends(client: &AdminClient, name: &str) -> anyhow::Result<Vec<BackendInfo>> {
    let services = client.services().await?;
    let service = services
        .into_iter()
        .find(|service| service.name == name)
        .with_context(|| format!("there is no service {name}: see `lb-control service list`"))?;
    let mut backends = service.backends;
    backends.sort_by_key(|backend| backend.backend.id);
    Ok(backends)
}

/// The operator's command for `node`: `{address}` (`10.0.0.5:9944`), `{ip}` and `{id}` filled
/// in.
fn fill_in(exec: &str, node: &BackendInfo) -> String {
    let address = node.backend.def.address;
    exec.replace("{address}", &address.to_string())
        .replace("{ip}", &address.ip().to_string())
        .replace("{id}", &node.backend.id.to_string())
}

#[cfg(test)]
mod tests {
    use lb_control::{
        backends::State,
        model::{Backend, BackendDef, Origin},
    };

    use super::*;

    #[test]
    fn the_command_gets_the_node_filled_in() {
        let node = BackendInfo {
            backend: Backend {
                id: 7,
                service: 1,
                def: BackendDef {
                    address: "10.200.12.2:9944".parse().expect("address"),
                    rpc_port: 9944,
                    weight: 1,
                    admin: AdminState::Enabled,
                    tier: 0,
                },
                origin: Origin::Api,
            },
            service_name: "10.200.0.10:9944/tcp".to_owned(),
            state: State::Up,
            fallback: false,
            saturated: false,
            health: None,
        };
        assert_eq!(
            fill_in(
                "ssh root@{ip} 'systemctl restart polkadot' # {id} {address}",
                &node
            ),
            "ssh root@10.200.12.2 'systemctl restart polkadot' # 7 10.200.12.2:9944"
        );
    }
}
