//! The subcommands that drive a running instance through its admin API: status, services,
//! backends, API keys, join tokens, the blocklist, health, events, rollouts; and, on a node
//! host with a join token, `node join | leave`. Each prints a table or sentences, or the API's
//! JSON with `--json`.

mod handover;
mod node;
mod rollout;
mod table;
mod wait;

use std::{net::SocketAddr, path::PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use lb_control::{
    admin_client::{AdminClient, ClientError, admin_url},
    api::ADMIN_TOKEN_ENV,
    api::model::{
        BackendInfo, BlockInfo, CapsChange, EventInfo, GatewayInfo, HaStatus, HealthInfo, KeyInfo,
        LimitChange, NewBackend, NewBlock, NewKey, NewService, NewToken, ServiceInfo, TokenInfo,
        TokenScope, parse_prefix,
    },
    backends::State,
    config::Config,
    ha::Role,
    model::{
        AdminState, ApiKeyId, BackendId, BlockSource, DEFAULT_RPC_PORT, ForwardingMode,
        HealthCheck, JoinTokenId, Protocol, RateLimit, ServiceId, ServiceKey, Tier,
    },
};
use serde::{Serialize, de::DeserializeOwned};

use self::table::Table;

#[derive(Debug, Args)]
pub struct ApiArgs {
    /// URL of the admin API [default: http:// + the config's admin.listen, 127.0.0.1:9900].
    #[arg(long, global = true, value_name = "URL")]
    admin: Option<String>,
    /// Config file: where the admin API listens, and its token (LB_ADMIN_TOKEN wins).
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Services and backends with their state and health, on one screen.
    Status(ApiArgs),
    /// List, add or remove L4 services.
    Service {
        #[command(flatten)]
        api: ApiArgs,
        #[command(subcommand)]
        action: ServiceAction,
    },
    /// List, add, remove, drain, enable, disable or re-weight backends.
    Backend {
        #[command(flatten)]
        api: ApiArgs,
        #[command(subcommand)]
        action: BackendAction,
    },
    /// Create, list, revoke or limit the gateway's API keys.
    Key {
        #[command(flatten)]
        api: ApiArgs,
        #[command(subcommand)]
        action: KeyAction,
    },
    /// Create, list or revoke join tokens: nodes that register themselves with `node join`.
    Token {
        #[command(flatten)]
        api: ApiArgs,
        #[command(subcommand)]
        action: TokenAction,
    },
    /// On a node host, with a join token: add this host to a service, or take it out.
    #[command(subcommand)]
    Node(node::NodeAction),
    /// Upgrade a service's nodes one at a time: drain each until empty, run a command for it,
    /// and put it back once its health checks pass; stop at the first failure.
    Rollout {
        #[command(flatten)]
        api: ApiArgs,
        /// The service: VIP:PORT or VIP:PORT/PROTOCOL.
        #[arg(long)]
        service: ServiceKey,
        /// Shell command run for each node once it is drained, e.g. `ssh root@{ip} systemctl
        /// restart polkadot`; {address}, {ip} and {id} stand for the node's. A non-zero exit
        /// stops the rollout.
        #[arg(long, value_name = "COMMAND")]
        exec: String,
        /// How long a node may take to drain; then its WebSocket clients are closed with 1012
        /// (they reconnect to another node), and open L4 flows stop the rollout.
        #[arg(long, default_value = "10m")]
        timeout: humantime::Duration,
        /// How long a node may take to pass its health checks after the command.
        #[arg(long, default_value = "10m")]
        health_timeout: humantime::Duration,
    },
    /// Manage the source blocklist of an instance (dropped in XDP before any other work).
    Block {
        #[command(flatten)]
        api: ApiArgs,
        #[command(subcommand)]
        action: BlockAction,
    },
    /// The cluster's best block and every node's health.
    Health(ApiArgs),
    /// This lb-control's role in its HA pair; keepalived's notify hooks call `ha notify`.
    Ha {
        #[command(flatten)]
        api: ApiArgs,
        #[command(subcommand)]
        action: HaAction,
    },
    /// The newest events: every change of services, backends and keys.
    Events {
        #[command(flatten)]
        api: ApiArgs,
        /// How many (1 to 1000).
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
}

#[derive(Debug, Subcommand)]
pub enum ServiceAction {
    List,
    /// Add a service, e.g. `service add 192.0.2.10:9944`.
    Add {
        /// VIP:PORT
        vip: SocketAddr,
        #[arg(long, default_value = "tcp", value_parser = parse_variant::<Protocol>)]
        protocol: Protocol,
        #[arg(long, default_value = "nat", value_parser = parse_variant::<ForwardingMode>)]
        mode: ForwardingMode,
        /// substrate (JSON-RPC health and lag), tcp (connect only) or none.
        #[arg(long, default_value = "substrate", value_parser = parse_variant::<HealthCheck>)]
        check: HealthCheck,
    },
    /// Remove a service and all its backends.
    Remove {
        id: ServiceId,
    },
}

#[derive(Debug, Subcommand)]
pub enum BackendAction {
    List {
        /// Only this service's backends.
        #[arg(long)]
        service: Option<ServiceId>,
    },
    /// Add a backend, e.g. `backend add 10.200.13.2:9944`.
    Add {
        /// The node's address and the service's port on it.
        address: SocketAddr,
        /// The service (needed when there are several).
        #[arg(long)]
        service: Option<ServiceId>,
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
    },
    /// Remove a backend: its flows move to the other backends.
    Remove { id: BackendId },
    /// Keep a backend's flows, give it no new ones.
    Drain {
        id: BackendId,
        /// Return only once the backend holds no open flow and no gateway WebSocket client
        /// (printing the counts as they fall), ready for its upgrade.
        #[arg(long)]
        wait: bool,
        /// With --wait: how long to wait; then its remaining WebSocket clients are closed
        /// with 1012 (they reconnect to another node) and the command fails if flows remain.
        #[arg(long, default_value = "10m", requires = "wait")]
        timeout: humantime::Duration,
    },
    /// Put a backend in rotation (while healthy).
    Enable { id: BackendId },
    /// Put a backend back once its node has passed its health checks, counted from now (after
    /// an upgrade).
    Rejoin { id: BackendId },
    /// Take a backend out of rotation at once.
    Disable { id: BackendId },
    /// Set a backend's weight.
    Weight { id: BackendId, weight: u32 },
    /// Move a backend to another tier (0 = primary).
    Tier { id: BackendId, tier: Tier },
}

#[derive(Debug, Subcommand)]
pub enum KeyAction {
    /// Create a key; its secret is printed once.
    Create {
        /// 1 to 64 letters, digits, '_', '.' or '-'; unique.
        #[arg(long)]
        name: String,
        /// Requests per second (no limit without it).
        #[arg(long)]
        rps: Option<u32>,
        /// Requests at once above the rate [default: rps].
        #[arg(long, requires = "rps")]
        burst: Option<u32>,
        #[command(flatten)]
        caps: CapsArgs,
    },
    List,
    /// Revoke a key for good.
    Revoke {
        id: ApiKeyId,
    },
    /// Set a key's rate limit, or lift it with --unlimited.
    Limit {
        id: ApiKeyId,
        #[arg(
            long,
            required_unless_present = "unlimited",
            conflicts_with = "unlimited"
        )]
        rps: Option<u32>,
        #[arg(long, requires = "rps")]
        burst: Option<u32>,
        #[arg(long)]
        unlimited: bool,
    },
    /// Set a key's own WebSocket caps (a plan above the default, another site's gateway
    /// failing over through one key); a cap not given goes back to the gateway's default.
    Caps {
        id: ApiKeyId,
        #[command(flatten)]
        caps: CapsArgs,
    },
}

/// A key's WebSocket caps; without one, the gateway's `[gateway.websocket]` default.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct CapsArgs {
    /// WebSocket connections open at once [default: the gateway's max_connections_per_key].
    #[arg(long)]
    max_connections: Option<u32>,
    /// Subscriptions on the nodes at once [default: the gateway's max_subscriptions_per_key].
    #[arg(long)]
    max_subscriptions: Option<u32>,
}

#[derive(Debug, Subcommand)]
pub enum TokenAction {
    /// Create a token; its secret is printed once.
    Create {
        /// 1 to 64 letters, digits, '_', '.' or '-'; unique.
        #[arg(long)]
        name: String,
        /// What the token may do: join (add its holder's own address to the services, and
        /// remove it).
        #[arg(long, value_enum, default_value = "join")]
        scope: TokenScope,
        /// A service its holder may join (VIP:PORT or VIP:PORT/PROTOCOL); repeat for several.
        #[arg(long = "service", required = true)]
        services: Vec<ServiceKey>,
    },
    List,
    /// Revoke a token for good (the nodes it joined stay).
    Revoke {
        id: JoinTokenId,
    },
}

#[derive(Debug, Subcommand)]
pub enum HaAction {
    /// The role, since when, and which floating addresses this host holds.
    Status,
    /// Tell the daemon the role keepalived gave this host: `notify_master "lb-control ha
    /// notify master --config /etc/lb-control/lb.toml"`, likewise backup and fault.
    Notify {
        #[arg(value_enum)]
        role: Role,
    },
    /// Hand the floating addresses over to the other host without failing a request (for this
    /// host's OS update): the L4 flows go there, keepalived gives the addresses up, and this
    /// host's gateway connections finish through second chance. Waits until none is left.
    Handover {
        /// How long the gateway's connections may take to finish (1s to 10m).
        #[arg(long, default_value = "10s")]
        drain: humantime::Duration,
    },
}

#[derive(Debug, Subcommand)]
pub enum BlockAction {
    /// Block a source prefix, e.g. 203.0.113.0/24 or 2001:db8::/48 (an address alone is /32 or
    /// /128).
    Add {
        prefix: String,
        /// How long, e.g. 10m or 1h; without it the block stays until removed.
        #[arg(long = "for")]
        duration: Option<humantime::Duration>,
    },
    /// Unblock exactly this prefix.
    Remove { prefix: String },
    /// List blocked prefixes and their expiry.
    List,
}

pub fn run(command: AdminCommand) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(dispatch(command))
}

async fn dispatch(command: AdminCommand) -> anyhow::Result<()> {
    match command {
        AdminCommand::Status(api) => {
            let client = client(&api)?;
            let services = client.services().await?;
            let health = client.health().await?;
            let gateway = client.gateway().await?;
            if api.json {
                print_json(&serde_json::json!({
                    "services": services,
                    "health": health,
                    "gateway": gateway,
                }))?;
            } else {
                print_status(&services, health.cluster_best);
                print_gateway(&gateway);
            }
        }
        AdminCommand::Service { api, action } => {
            let client = client(&api)?;
            match action {
                ServiceAction::List => {
                    show(&api, &client.services().await?, |s| print_services(s))?
                }
                ServiceAction::Add {
                    vip,
                    protocol,
                    mode,
                    check,
                } => {
                    let new = NewService {
                        vip: vip.ip(),
                        port: vip.port(),
                        protocol,
                        mode,
                        check,
                    };
                    show(&api, &client.add_service(&new).await?, |service| {
                        println!("added service {} ({})", service.service.id, service.name);
                    })?;
                }
                ServiceAction::Remove { id } => {
                    show(&api, &client.remove_service(id).await?, |service| {
                        println!(
                            "removed service {id} ({}) and its backends",
                            service.def.key()
                        );
                    })?;
                }
            }
        }
        AdminCommand::Backend { api, action } => backend(&api, action).await?,
        AdminCommand::Key { api, action } => key(&api, action).await?,
        AdminCommand::Token { api, action } => token(&api, action).await?,
        AdminCommand::Node(action) => node::run(action).await?,
        AdminCommand::Rollout {
            api,
            service,
            exec,
            timeout,
            health_timeout,
        } => {
            let plan = rollout::Plan {
                service,
                exec,
                drain_timeout: timeout.into(),
                health_timeout: health_timeout.into(),
            };
            rollout::run(&client(&api)?, &plan).await?;
        }
        AdminCommand::Block { api, action } => block(&api, action).await?,
        AdminCommand::Health(api) => {
            let health = client(&api)?.health().await?;
            show(&api, &health, |health| {
                match health.cluster_best {
                    Some(best) => println!("cluster best block: #{best}"),
                    None => println!("cluster best block: unknown"),
                }
                print_health(&health.nodes);
            })?;
        }
        AdminCommand::Ha { api, action } => {
            let client = client(&api)?;
            let status = match action {
                HaAction::Status => client.ha_status().await?,
                HaAction::Notify { role } => client.set_role(role).await?,
                HaAction::Handover { drain } => {
                    return handover::run(&client, drain.into(), api.json).await;
                }
            };
            show(&api, &status, print_ha)?;
        }
        AdminCommand::Events { api, limit } => {
            show(&api, &client(&api)?.events(None, limit).await?, |e| {
                print_events(e)
            })?;
        }
    }
    Ok(())
}

async fn backend(api: &ApiArgs, action: BackendAction) -> anyhow::Result<()> {
    let client = client(api)?;
    let changed = |verb: &str| {
        let verb = verb.to_owned();
        move |backend: &BackendInfo| {
            println!(
                "backend {} ({}) {verb}: now {}",
                backend.backend.id,
                backend.backend.def.address,
                describe_state(backend)
            );
        }
    };
    match action {
        BackendAction::List { service } => {
            show(api, &client.backends(service).await?, |b| print_backends(b))?;
        }
        BackendAction::Add {
            address,
            service,
            rpc_port,
            weight,
            tier,
        } => {
            let new = NewBackend {
                address,
                service,
                rpc_port,
                weight,
                admin: AdminState::Enabled,
                tier,
            };
            let backend = client.add_backend(&new).await?;
            show(api, &backend, |backend| {
                println!(
                    "added backend {} ({}) to {}: {}",
                    backend.backend.id,
                    backend.backend.def.address,
                    backend.service_name,
                    describe_state(backend)
                );
            })?;
        }
        BackendAction::Remove { id } => {
            show(api, &client.remove_backend(id).await?, |backend| {
                println!("removed backend {id} ({})", backend.def.address);
            })?;
        }
        BackendAction::Drain { id, wait, timeout } => {
            show(
                api,
                &client.set_admin(id, AdminState::Draining).await?,
                changed("drained"),
            )?;
            if wait {
                let left = wait::until_empty(&client, id, timeout.into()).await?;
                anyhow::ensure!(
                    left == 0,
                    "backend {id} still has {left} open flows after {timeout}"
                );
            }
        }
        BackendAction::Enable { id } => show(
            api,
            &client.set_admin(id, AdminState::Enabled).await?,
            changed("enabled"),
        )?,
        BackendAction::Rejoin { id } => show(
            api,
            &client.set_admin(id, AdminState::Joining).await?,
            changed("rejoining"),
        )?,
        BackendAction::Disable { id } => show(
            api,
            &client.set_admin(id, AdminState::Disabled).await?,
            changed("disabled"),
        )?,
        BackendAction::Weight { id, weight } => show(
            api,
            &client.set_weight(id, weight).await?,
            changed("re-weighted"),
        )?,
        BackendAction::Tier { id, tier } => show(
            api,
            &client.set_tier(id, tier).await?,
            changed(&format!("moved to tier {tier}")),
        )?,
    }
    Ok(())
}

async fn key(api: &ApiArgs, action: KeyAction) -> anyhow::Result<()> {
    let client = client(api)?;
    match action {
        KeyAction::Create {
            name,
            rps,
            burst,
            caps,
        } => {
            let created = client
                .create_key(&NewKey {
                    name,
                    rps,
                    burst,
                    max_connections: caps.max_connections,
                    max_subscriptions: caps.max_subscriptions,
                })
                .await?;
            show(api, &created, |key| {
                println!(
                    "created key {} ({}), {}, {}",
                    key.id,
                    key.name,
                    describe_limit(key.rate_limit),
                    describe_caps(key.max_connections, key.max_subscriptions)
                );
                println!("secret: {}", key.secret);
            })?;
            eprintln!(
                "warning: store the secret now: it cannot be shown again (only its hash is kept)"
            );
        }
        KeyAction::List => show(api, &client.keys().await?, |keys| print_keys(keys))?,
        KeyAction::Revoke { id } => show(api, &client.revoke_key(id).await?, |key| {
            println!("revoked key {id} ({})", key.name);
        })?,
        KeyAction::Limit { id, rps, burst, .. } => {
            // Without --rps, clap has made sure --unlimited was given.
            let key = client
                .set_key_limit(id, &LimitChange { rps, burst })
                .await?;
            show(api, &key, |key| {
                println!(
                    "key {id} ({}): {}",
                    key.name,
                    describe_limit(key.rate_limit)
                );
            })?;
        }
        KeyAction::Caps { id, caps } => {
            let change = CapsChange {
                max_connections: caps.max_connections,
                max_subscriptions: caps.max_subscriptions,
            };
            let key = client.set_key_caps(id, &change).await?;
            show(api, &key, |key| {
                println!(
                    "key {id} ({}): {}",
                    key.name,
                    describe_caps(key.max_connections, key.max_subscriptions)
                );
            })?;
        }
    }
    Ok(())
}

async fn token(api: &ApiArgs, action: TokenAction) -> anyhow::Result<()> {
    let client = client(api)?;
    match action {
        TokenAction::Create {
            name,
            scope,
            services,
        } => {
            let new = NewToken {
                name,
                scope,
                services: services.iter().map(ToString::to_string).collect(),
            };
            let created = client.create_token(&new).await?;
            show(api, &created, |created| {
                println!(
                    "created join token {} ({}) for {}",
                    created.token.id,
                    created.token.name,
                    created.token.services.join(", ")
                );
                println!("secret: {}", created.secret);
            })?;
            eprintln!(
                "warning: store the secret now (on the nodes, e.g. /etc/lb-node/join.token): it \
                 cannot be shown again (only its hash is kept)"
            );
        }
        TokenAction::List => show(api, &client.tokens().await?, |tokens| print_tokens(tokens))?,
        TokenAction::Revoke { id } => show(api, &client.revoke_token(id).await?, |token| {
            println!("revoked join token {id} ({})", token.name);
        })?,
    }
    Ok(())
}

async fn block(api: &ApiArgs, action: BlockAction) -> anyhow::Result<()> {
    let client = client(api)?;
    match action {
        BlockAction::Add { prefix, duration } => {
            let prefix = parse_prefix(&prefix).map_err(anyhow::Error::msg)?;
            let new = NewBlock {
                prefix: prefix.to_string(),
                duration: duration.map(|duration| duration.to_string()),
            };
            show(api, &client.block(&new).await?, |entry| match duration {
                Some(duration) => println!("blocked {} for {duration}", entry.prefix),
                None => println!("blocked {} until removed", entry.prefix),
            })?;
        }
        BlockAction::Remove { prefix } => {
            let prefix = parse_prefix(&prefix).map_err(anyhow::Error::msg)?;
            match client.unblock(prefix).await {
                Ok(entry) => show(api, &entry, |entry| println!("unblocked {}", entry.prefix))?,
                Err(ClientError::Api { status, .. })
                    if status == reqwest::StatusCode::NOT_FOUND =>
                {
                    anyhow::bail!("{prefix} is not on the blocklist (`lb-control block list`)")
                }
                Err(error) => return Err(error.into()),
            }
        }
        BlockAction::List => show(api, &client.blocklist().await?, |entries| {
            print_blocklist(entries)
        })?,
    }
    Ok(())
}

/// The client for the API the arguments and the config point at.
fn client(api: &ApiArgs) -> anyhow::Result<AdminClient> {
    let config = match &api.config {
        Some(file) => Config::load(file)?,
        None => Config::default(),
    };
    let url = api
        .admin
        .clone()
        .unwrap_or_else(|| admin_url(config.admin.listen));
    Ok(AdminClient::new(&url, &admin_token(&config)?))
}

/// The token as the daemon resolves it.
fn admin_token(config: &Config) -> anyhow::Result<String> {
    config
        .admin
        .configured_token(&config.state_dir)?
        .with_context(|| {
            format!(
                "no admin token: set {ADMIN_TOKEN_ENV}, or pass the instance's config with --config"
            )
        })
}

/// Prints `value` as JSON with `--json`, else as `table` prints it.
fn show<T: Serialize>(api: &ApiArgs, value: &T, table: impl FnOnce(&T)) -> anyhow::Result<()> {
    if api.json {
        print_json(value)
    } else {
        table(value);
        Ok(())
    }
}

fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Parses a value the way the API spells it (`tcp`, `dsr`, `substrate`).
fn parse_variant<T: DeserializeOwned>(text: &str) -> Result<T, String> {
    serde_json::from_value(serde_json::Value::String(text.to_owned()))
        .map_err(|error| error.to_string())
}

fn print_status(services: &[ServiceInfo], cluster_best: Option<u64>) {
    if services.is_empty() {
        println!("no services: add one with `lb-control service add VIP:PORT`");
        return;
    }
    match cluster_best {
        Some(best) => println!("cluster best block: #{best}"),
        None => println!("cluster best block: unknown"),
    }
    for service in services {
        println!();
        println!(
            "service {}  {}  mode {}  check {}  ({} of {} backends up; {})",
            service.service.id,
            service.name,
            variant_name(&service.service.def.mode),
            variant_name(&service.service.def.check),
            service
                .backends
                .iter()
                .filter(|backend| backend.state.name() == "up")
                .count(),
            service.backends.len(),
            describe_serving_tier(service.serving_tier)
        );
        if !service.backends.is_empty() {
            print_backends(&service.backends);
        }
    }
}

/// The tier the gateway's new clients go to, and its remote gateways with their health.
fn print_gateway(gateway: &GatewayInfo) {
    if !gateway.enabled {
        return;
    }
    println!();
    println!(
        "gateway  new clients {}  ({} healthy nodes)",
        describe_serving_tier(gateway.serving_tier),
        gateway.healthy_nodes
    );
    if gateway.remotes.is_empty() {
        return;
    }
    let mut table = Table::new(&["REMOTE", "TIER", "NODE", "HEALTH"]);
    for remote in &gateway.remotes {
        table.row(vec![
            remote.url.clone(),
            remote.tier.to_string(),
            remote.node.to_string(),
            describe_health(remote.health.as_ref()),
        ]);
    }
    table.print();
}

/// Which tier serves a service: its primaries, a backup tier, or none.
fn describe_serving_tier(tier: Option<Tier>) -> String {
    match tier {
        Some(0) => "served by tier 0 (primaries)".to_owned(),
        Some(tier) => format!("served by backup tier {tier}"),
        None => "no tier serving".to_owned(),
    }
}

fn print_services(services: &[ServiceInfo]) {
    let mut table = Table::new(&["ID", "SERVICE", "MODE", "CHECK", "ORIGIN", "BACKENDS"]);
    for service in services {
        table.row(vec![
            service.service.id.to_string(),
            service.name.clone(),
            variant_name(&service.service.def.mode),
            variant_name(&service.service.def.check),
            variant_name(&service.service.origin),
            service.backends.len().to_string(),
        ]);
    }
    table.print();
}

fn print_backends(backends: &[BackendInfo]) {
    let mut table = Table::new(&[
        "ID", "SERVICE", "ADDRESS", "RPC", "TIER", "WEIGHT", "ADMIN", "STATE", "HEALTH",
    ]);
    for backend in backends {
        table.row(vec![
            backend.backend.id.to_string(),
            backend.service_name.clone(),
            backend.backend.def.address.to_string(),
            backend.backend.def.rpc_port.to_string(),
            backend.backend.def.tier.to_string(),
            backend.backend.def.weight.to_string(),
            variant_name(&backend.backend.def.admin),
            describe_state(backend),
            describe_health(backend.health.as_ref()),
        ]);
    }
    table.print();
}

fn print_health(nodes: &[BackendInfo]) {
    let mut table = Table::new(&[
        "ID",
        "ADDRESS",
        "STATE",
        "VERDICT",
        "BEST",
        "FINALIZED",
        "LAG",
        "CHECKED",
        "REASON / LAST ERROR",
    ]);
    let number = |value: Option<u64>| value.map_or_else(|| "-".to_owned(), |n| n.to_string());
    for node in nodes {
        let health = node.health.as_ref();
        table.row(vec![
            node.backend.id.to_string(),
            node.backend.def.address.to_string(),
            describe_state(node),
            health.map_or_else(|| "unchecked".to_owned(), |h| variant_name(&h.verdict)),
            number(health.and_then(|h| h.best)),
            number(health.and_then(|h| h.finalized)),
            number(health.and_then(|h| h.lag)),
            health
                .and_then(|h| h.last_checked)
                .map_or_else(|| "-".to_owned(), |at| at.to_string()),
            health
                .and_then(|h| h.reason.clone().or_else(|| h.last_error.clone()))
                .unwrap_or_default(),
        ]);
    }
    table.print();
}

fn print_keys(keys: &[KeyInfo]) {
    if keys.is_empty() {
        println!("no API keys: create one with `lb-control key create --name NAME`");
        return;
    }
    let mut table = Table::new(&[
        "ID",
        "NAME",
        "LIMIT",
        "WEBSOCKET CAPS",
        "CREATED",
        "LAST USED",
        "STATUS",
    ]);
    for key in keys {
        table.row(vec![
            key.id.to_string(),
            key.name.clone(),
            describe_limit(key.rate_limit),
            describe_caps(key.max_connections, key.max_subscriptions),
            key.created.to_string(),
            key.last_used
                .map_or_else(|| "never".to_owned(), |at| at.to_string()),
            key.revoked
                .map_or_else(|| "active".to_owned(), |at| format!("revoked {at}")),
        ]);
    }
    table.print();
}

fn print_tokens(tokens: &[TokenInfo]) {
    if tokens.is_empty() {
        println!(
            "no join tokens: create one with `lb-control token create --scope join --service \
             VIP:PORT --name NAME`"
        );
        return;
    }
    let mut table = Table::new(&["ID", "NAME", "SCOPE", "SERVICES", "CREATED", "STATUS"]);
    for token in tokens {
        table.row(vec![
            token.id.to_string(),
            token.name.clone(),
            variant_name(&token.scope),
            token.services.join(", "),
            token.created.to_string(),
            token
                .revoked
                .map_or_else(|| "active".to_owned(), |at| format!("revoked {at}")),
        ]);
    }
    table.print();
}

fn print_events(events: &[EventInfo]) {
    let mut table = Table::new(&["ID", "TIME", "KIND", "SUBJECT", "DETAIL"]);
    for event in events {
        table.row(vec![
            event.id.to_string(),
            event.at.to_string(),
            event.kind.clone(),
            event.subject.clone(),
            event.detail.clone(),
        ]);
    }
    table.print();
}

fn print_blocklist(entries: &[BlockInfo]) {
    if entries.is_empty() {
        println!("the blocklist is empty");
        return;
    }
    println!("{:<44} {:<12} EXPIRES", "PREFIX", "SOURCE");
    for entry in entries {
        let expires = entry.expires.map_or_else(
            || "never".to_owned(),
            |expires| humantime::format_rfc3339_seconds(expires.0).to_string(),
        );
        let source = entry.source.map_or("-", BlockSource::name);
        println!("{:<44} {source:<12} {expires}", entry.prefix.to_string());
    }
}

/// `up`, `up (fallback)` for a backend kept in rotation only because its whole service is
/// unhealthy, `up (saturated)` for one whose node refuses new connections, `joining: 1 check
/// passed in a row` for one waiting for its checks.
fn describe_state(backend: &BackendInfo) -> String {
    if backend.state == State::Joining {
        return wait::describe_joining(backend);
    }
    let mut text = backend.state.name().to_owned();
    if backend.fallback {
        text.push_str(" (fallback)");
    }
    if backend.saturated {
        text.push_str(" (saturated)");
    }
    text
}

fn describe_health(health: Option<&HealthInfo>) -> String {
    let Some(health) = health else {
        return "-".to_owned();
    };
    let mut text = variant_name(&health.verdict);
    if let Some(best) = health.best {
        text.push_str(&format!(" #{best}"));
    }
    if let Some(lag) = health.lag.filter(|lag| *lag > 0) {
        text.push_str(&format!(" (lag {lag})"));
    }
    if let Some(reason) = &health.reason {
        text.push_str(&format!(": {reason}"));
    }
    text
}

fn describe_limit(limit: Option<RateLimit>) -> String {
    limit.map_or_else(
        || "unlimited".to_owned(),
        |limit| format!("{} rps, burst {}", limit.rps, limit.burst),
    )
}

/// A key's WebSocket caps: `default`, or `5000 connections, 20000 subscriptions` with
/// `default` for a cap it does not set.
fn describe_caps(connections: Option<u32>, subscriptions: Option<u32>) -> String {
    let cap = |cap: Option<u32>| cap.map_or_else(|| "default".to_owned(), |cap| cap.to_string());
    if connections.is_none() && subscriptions.is_none() {
        return "default".to_owned();
    }
    format!(
        "{} connections, {} subscriptions",
        cap(connections),
        cap(subscriptions)
    )
}

/// The name the API gives an enum value (`nat`, `draining`, `healthy`).
fn variant_name<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(name)) => name,
        _ => "?".to_owned(),
    }
}

fn print_ha(status: &HaStatus) {
    println!(
        "{}: {} since {}{}",
        status.name,
        status.role,
        status.since,
        if status.records_health {
            ""
        } else {
            " (health transitions left to the master's record)"
        }
    );
    for floating in &status.floating_addresses {
        let held = if floating.held {
            "held here"
        } else {
            "not here"
        };
        println!("  {:<40} {held}", floating.address);
    }
    if let Some(handover) = &status.handover {
        println!(
            "handover started {}: {}, {} gateway connections open here{}",
            handover.started,
            variant_name(&handover.phase),
            handover.open_connections,
            handover
                .error
                .as_deref()
                .map(|error| format!(" ({error})"))
                .unwrap_or_default()
        );
    }
}
