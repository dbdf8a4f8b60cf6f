//! `lb-control run`: wires the parts together and runs until a signal.
//!
//! config → state store → data plane → backend set ← health checker, admin API; the backend set
//! pushes every change to the kernel and publishes the view the health checker and the gateway
//! follow.

use std::{
    fs,
    io::Write,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::Context;
use prometheus_client::registry::Registry;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
};
use tracing::{error, info, warn};

use crate::{
    api::{self, AdminContext},
    backends::BackendSet,
    config::Config,
    dataplane::{self, BlocklistHandle, Dataplane, DataplaneConfig},
    gateway::{self, BlockRequest, Gateway, GatewayContext, GatewayMetrics},
    health,
    keys::ApiKeys,
    metrics::Metrics,
    store::Store,
};

/// How often expired blocklist entries are removed and a failed kernel push is retried.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(1);

/// Environment variable that carries the admin token (wins over the config file).
pub const ADMIN_TOKEN_ENV: &str = "LB_ADMIN_TOKEN";

/// The state store's file in the state directory.
pub fn store_path(state_dir: &Path) -> PathBuf {
    state_dir.join("state.db")
}

/// Where a generated admin token is kept.
pub fn generated_token_path(state_dir: &Path) -> PathBuf {
    state_dir.join("admin.token")
}

/// Runs the daemon until SIGINT/SIGTERM (clean shutdown: detach) or SIGQUIT (exit, leaving the
/// program attached for the next start). `reload` re-reads the config on SIGHUP.
pub fn run(config: Config, reload: impl Fn() -> anyhow::Result<Config>) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run_async(config, reload))
}

async fn run_async(
    config: Config,
    reload: impl Fn() -> anyhow::Result<Config>,
) -> anyhow::Result<()> {
    // Installed first, so a signal during start-up still gets a clean shutdown.
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut hangup = signal(SignalKind::hangup())?;
    let mut quit = signal(SignalKind::quit())?;

    // Before anything is written: without root nothing here can work.
    dataplane::require_root()?;
    prepare_state_dir(&config.state_dir)?;
    let token = admin_token(&config)?;
    let store = Store::open(&store_path(&config.state_dir))?;
    // Bound before the data plane starts, so a taken port fails fast and changes nothing.
    let listener = tokio::net::TcpListener::bind(config.admin.listen)
        .await
        .with_context(|| format!("admin API: cannot listen on {}", config.admin.listen))?;
    // Likewise the gateway's port and certificate.
    let gateway_bound = match config.gateway.listen {
        Some(_) => Some(Gateway::bind(&config.gateway)?),
        None => None,
    };

    let dataplane = Dataplane::start(&DataplaneConfig {
        instance: config.instance.clone(),
        interfaces: config.dataplane.interfaces.clone(),
        mode: config.dataplane.xdp_mode,
        bpffs: config.dataplane.bpffs.clone(),
        maglev_table_size: config.dataplane.maglev_table_size,
        max_flows: config.dataplane.max_flows,
    })?;
    let pin_dir = dataplane.pin_dir().to_owned();
    let mut registry = Registry::default();
    let metrics = Arc::new(Metrics::register(&mut registry));
    let gateway_metrics = Arc::new(GatewayMetrics::register(&mut registry));
    let mut declared = config.declared();
    let backends = Arc::new(
        BackendSet::start(
            store.clone(),
            Box::new(dataplane),
            config.lb_settings(),
            &declared,
            metrics.clone(),
        )
        .await?,
    );

    let (targets_tx, targets_rx) = watch::channel(backends.view().health_targets());
    let checker = health::spawn(config.health.clone(), targets_rx, metrics.clone());
    tokio::spawn(follow_view(backends.clone(), targets_tx));
    tokio::spawn(follow_health(backends.clone(), checker.snapshots()));

    let keys = ApiKeys::new(store.clone());
    // The kernel blocklist's one writer: the gateway, the admin API and the expiry below.
    let blocklist = BlocklistHandle::open(&pin_dir, metrics.blocklist_entries.clone())?;
    let (blocks, block_requests) = tokio::sync::mpsc::unbounded_channel::<BlockRequest>();
    tokio::spawn(gateway::block::apply_requests(
        block_requests,
        blocklist.clone(),
    ));
    let gateway = match gateway_bound {
        Some(bound) => Some(Gateway::start(
            bound,
            GatewayContext {
                view: backends.subscribe(),
                keys: keys.clone(),
                store: store.clone(),
                metrics: gateway_metrics,
                maglev_table_size: config.dataplane.maglev_table_size,
                blocks,
            },
        )?),
        None => None,
    };

    let (stop_api, api_stopped) = tokio::sync::oneshot::channel::<()>();
    let context = AdminContext {
        backends: backends.clone(),
        keys: Arc::new(keys),
        store: store.clone(),
        registry: Arc::new(registry),
        metrics: metrics.clone(),
        blocklist: blocklist.clone(),
        pin_dir: pin_dir.clone(),
        token,
    };
    let admin_address = listener.local_addr()?;
    let api_server = tokio::spawn(api::serve(listener, context, async {
        let _ = api_stopped.await;
    }));

    let mut housekeeping = tokio::time::interval(HOUSEKEEPING_INTERVAL);
    info!(
        instance = %config.instance,
        pin_dir = %pin_dir.display(),
        admin = %admin_address,
        gateway = ?gateway.as_ref().map(Gateway::local_addr),
        store = %store.path().display(),
        "running; SIGHUP reloads the config, SIGINT or SIGTERM stops, SIGQUIT exits for a \
         restart (the program keeps forwarding)"
    );
    let detach = loop {
        tokio::select! {
            _ = terminate.recv() => break true,
            _ = interrupt.recv() => break true,
            _ = quit.recv() => {
                // The pinned links keep the program attached: traffic flows on, and the next
                // lb-control swaps its program in and finds the pinned flow table.
                info!("exiting for a restart: the XDP program stays attached and forwarding");
                break false;
            }
            _ = housekeeping.tick() => {
                match blocklist.expire(SystemTime::now()).await {
                    Ok(expired) => {
                        for prefix in expired {
                            info!(%prefix, "blocklist entry expired");
                        }
                    }
                    Err(error) => error!("expiring blocklist entries: {error}"),
                }
                if let Err(error) = backends.resync_kernel().await {
                    error!("the kernel tables are behind the backend set: {error}");
                }
            }
            _ = hangup.recv() => {
                // The certificate files are re-read whatever the config says: renewing a
                // certificate is the common reason for a SIGHUP.
                if let Some(gateway) = &gateway {
                    match gateway.reload_tls() {
                        Ok(()) => info!("gateway: reloaded the TLS certificate"),
                        Err(error) => error!("{error}; keeping the running certificate"),
                    }
                }
                // A bad reload is reported and changes nothing: the running state stays.
                match reload() {
                    Ok(new) => {
                        let after = new.declared();
                        match backends.reload(new.lb_settings(), &declared, &after).await {
                            Ok(()) => {
                                declared = after;
                                checker.update_settings(new.health.clone());
                                if new.admin != config.admin {
                                    warn!("admin API settings changed: they take effect at the next start");
                                }
                                if new.gateway != config.gateway {
                                    warn!("gateway settings changed: they take effect at the next start (certificates are re-read now)");
                                }
                                info!("reloaded the config");
                            }
                            Err(error) => error!("config reload failed, keeping the running state: {error}"),
                        }
                    }
                    Err(error) => error!("config reload failed, keeping the running state: {error}"),
                }
            }
        }
    };
    if let Some(gateway) = gateway {
        gateway.stop().await;
    }
    // Admin requests in flight finish; new ones are refused.
    let _ = stop_api.send(());
    match api_server.await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => error!("admin API: {error}"),
        Err(error) => error!("admin API task: {error}"),
    }
    drop(checker);
    if detach {
        info!("shutting down: detaching the XDP program");
        backends.detach_kernel().await?;
        info!("detached");
    }
    Ok(())
}

/// Keeps the health checker's targets equal to the backend set's nodes.
async fn follow_view(backends: Arc<BackendSet>, targets: watch::Sender<Vec<health::Target>>) {
    let mut view = backends.subscribe();
    while view.changed().await.is_ok() {
        let wanted = view.borrow_and_update().health_targets();
        targets.send_if_modified(|current| {
            let changed = *current != wanted;
            *current = wanted;
            changed
        });
    }
}

/// Hands every health snapshot to the backend set, which acts when a placement changes.
async fn follow_health(
    backends: Arc<BackendSet>,
    mut snapshots: watch::Receiver<Arc<health::HealthSnapshot>>,
) {
    while snapshots.changed().await.is_ok() {
        let snapshot = snapshots.borrow_and_update().clone();
        if let Err(error) = backends.apply_health(snapshot).await {
            error!("applying health changes: {error}");
        }
    }
}

/// Creates the state directory, private to root: it holds the admin token.
fn prepare_state_dir(state_dir: &Path) -> anyhow::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)
        .with_context(|| format!("state directory {}", state_dir.display()))
}

/// The admin token as configured: `LB_ADMIN_TOKEN`, else the config's token or token file,
/// else the one generated into the state directory at an earlier start; None when there is
/// none yet. The daemon and the CLI resolve it the same way.
pub fn configured_admin_token(config: &Config) -> anyhow::Result<Option<String>> {
    if let Ok(token) = std::env::var(ADMIN_TOKEN_ENV)
        && !token.is_empty()
    {
        return Ok(Some(token));
    }
    if let Some(token) = &config.admin.token {
        return Ok(Some(token.clone()));
    }
    if let Some(file) = &config.admin.token_file {
        return read_token(file).map(Some);
    }
    let file = generated_token_path(&config.state_dir);
    if file.exists() {
        return read_token(&file).map(Some);
    }
    Ok(None)
}

/// The configured admin token, or a new one generated into the state directory.
fn admin_token(config: &Config) -> anyhow::Result<String> {
    if let Some(token) = configured_admin_token(config)? {
        return Ok(token);
    }
    let file = generated_token_path(&config.state_dir);
    let token: String = rand::random::<[u8; 24]>()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    let mut out = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&file)
        .with_context(|| format!("writing the admin token to {}", file.display()))?;
    writeln!(out, "{token}")?;
    out.sync_all()?;
    info!(file = %file.display(), "generated an admin API token");
    Ok(token)
}

/// A token file's first line.
pub fn read_token(file: &Path) -> anyhow::Result<String> {
    let text =
        fs::read_to_string(file).with_context(|| format!("admin token file {}", file.display()))?;
    let token = text.lines().next().unwrap_or_default().trim().to_owned();
    anyhow::ensure!(
        token.len() >= crate::config::MIN_TOKEN_LEN,
        "admin token file {}: the token must be at least {} characters",
        file.display(),
        crate::config::MIN_TOKEN_LEN
    );
    Ok(token)
}
