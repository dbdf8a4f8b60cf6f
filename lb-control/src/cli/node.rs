//! `lb-control node join | leave`: run on a node host with a join token, they add the host's
//! own address as a backend of a service (it enters once its health checks pass) and take it
//! out again, drained first. The load balancer sees the host's address as the source of the
//! request: nothing else can be added with a join token.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use lb_control::{
    admin_client::AdminClient,
    api::model::{BackendInfo, JoinRequest},
    model::{AdminState, DEFAULT_RPC_PORT, ServiceKey, Tier},
};

use super::{print_json, wait};

/// Environment variable that carries the join token (wins over `--token-file`).
pub const JOIN_TOKEN_ENV: &str = "LB_JOIN_TOKEN";

#[derive(Debug, Args)]
pub struct NodeArgs {
    /// URL of the load balancer's admin API, e.g. http://10.0.0.1:9900.
    #[arg(long, value_name = "URL")]
    admin: String,
    /// File holding the join token (`lb-control token create`); LB_JOIN_TOKEN wins.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// The service to join or leave: VIP:PORT or VIP:PORT/PROTOCOL.
    #[arg(long)]
    service: ServiceKey,
    /// The service's port on this host.
    #[arg(long, default_value_t = DEFAULT_RPC_PORT)]
    port: u16,
    /// Print the API's JSON instead of sentences.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
pub enum NodeAction {
    /// Add this host as a backend of the service: it enters once its node has passed its
    /// health checks (`rise` in a row). Joining again changes nothing.
    Join {
        #[command(flatten)]
        node: NodeArgs,
        /// The node's JSON-RPC port.
        #[arg(long, default_value_t = DEFAULT_RPC_PORT)]
        rpc_port: u16,
        /// Relative share of new connections.
        #[arg(long, default_value_t = 1)]
        weight: u32,
        /// 0 = primary; 1, 2, … = backups, which get new connections only while every lower
        /// tier is down.
        #[arg(long, default_value_t = 0)]
        tier: Tier,
        /// Return only once the node is in rotation, printing its checks as they pass.
        #[arg(long)]
        wait: bool,
        /// With --wait: how long its checks may take to pass.
        #[arg(long, default_value = "10m", requires = "wait")]
        timeout: humantime::Duration,
    },
    /// Take this host out of the service: drained until it holds no flow and no WebSocket
    /// client (at --timeout its WebSocket clients are closed with 1012), then removed.
    Leave {
        #[command(flatten)]
        node: NodeArgs,
        /// How long to wait for the node to drain.
        #[arg(long, default_value = "10m")]
        timeout: humantime::Duration,
    },
}

pub async fn run(action: NodeAction) -> anyhow::Result<()> {
    match action {
        NodeAction::Join {
            node,
            rpc_port,
            weight,
            tier,
            wait,
            timeout,
        } => {
            let client = client(&node)?;
            let request = JoinRequest {
                service: node.service.to_string(),
                port: node.port,
                rpc_port,
                weight,
                tier,
            };
            let joined = client.join(&request).await?;
            if node.json {
                print_json(&joined)?;
            } else {
                println!(
                    "backend {} ({}) of {}: {}",
                    joined.backend.id,
                    joined.backend.def.address,
                    joined.service_name,
                    wait::describe_joining(&joined)
                );
            }
            if wait && joined.backend.def.admin == AdminState::Joining {
                wait::until_up(&client, joined.backend.id, timeout.into()).await?;
            }
        }
        NodeAction::Leave { node, timeout } => {
            let client = client(&node)?;
            let backend = own_backend(&client, &node).await?;
            let id = backend.backend.id;
            println!(
                "backend {id} ({}) of {}: draining",
                backend.backend.def.address, backend.service_name
            );
            client.set_admin(id, AdminState::Draining).await?;
            let left = wait::until_empty(&client, id, Duration::from(timeout)).await?;
            if left > 0 {
                println!("removing it with {left} open flows: they move to other nodes");
            }
            let removed = client.remove_backend(id).await?;
            if node.json {
                print_json(&removed)?;
            } else {
                println!("removed backend {id} ({})", removed.def.address);
            }
        }
    }
    Ok(())
}

/// The client of the load balancer's admin API, with the join token.
fn client(node: &NodeArgs) -> anyhow::Result<AdminClient> {
    let token = match std::env::var(JOIN_TOKEN_ENV) {
        Ok(token) if !token.is_empty() => token,
        _ => {
            let Some(file) = &node.token_file else {
                bail!("no join token: set {JOIN_TOKEN_ENV}, or pass --token-file");
            };
            std::fs::read_to_string(file)
                .with_context(|| format!("reading the join token from {}", file.display()))?
                .trim()
                .to_owned()
        }
    };
    Ok(AdminClient::new(&node.admin, &token))
}

/// This host's backend of the service at `--port` (a join token lists only its own).
async fn own_backend(client: &AdminClient, node: &NodeArgs) -> anyhow::Result<BackendInfo> {
    let service = node.service.to_string();
    client
        .backends(None)
        .await?
        .into_iter()
        .find(|backend| {
            backend.service_name == service && backend.backend.def.address.port() == node.port
        })
        .with_context(|| {
            format!(
                "this host (as the load balancer sees its address) is no backend of {service} \
                 on port {}",
                node.port
            )
        })
}
