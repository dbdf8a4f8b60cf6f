//! `lb-control run`: wires the parts together and runs until a signal.
//!
//! config → state store → data plane → backend set ← health checker, admin API; the backend set
//! pushes every change to the kernel and publishes the view the health checker and the gateway
//! follow. A shared store (etcd) also tells of changes other lb-controls made
//! ([`follow_shared_store`], [`follow_shared_blocklist`]): the backend set, the live API keys
//! and the kernel blocklist re-read their part.
//!
//! A shared store must answer at start (lb-control keeps no local copy to start from); once
//! running, the data plane and the gateway serve from memory and never wait for it.
//!
//! [`Daemon::start`] wires the parts; [`Daemon::serve`] is the event loop, whose steps (a
//! reload, housekeeping, an upgrade) are named methods; [`Daemon::stop`] takes it down.
//!
//! An upgrade ([`crate::upgrade`]) starts a new process that takes the listening sockets over:
//! [`Daemon::start`] is its side of the handover, [`Daemon::upgrade`] the old process's.

use std::{
    fs,
    os::unix::fs::DirBuilderExt,
    path::Path,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context;
use prometheus_client::registry::Registry;
use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
};
use tracing::{error, info, warn};

use crate::{
    api::{self, AdminContext},
    backends::{BackendSet, ClusterView, Declared, Paused},
    blocklist::StoredBlocklist,
    config::Config,
    dataplane::{self, BlocklistHandle, Dataplane},
    gateway::{
        self, Bind, BlockRequest, Bound, Gateway, GatewayContext, GatewayMetrics, NodeClients,
        StopReason,
    },
    ha::{
        Ha, RoleState, flow_sync,
        handover::{DrainedGateway, Handover},
        second_chance::StandingSecondChance,
    },
    health,
    keys::ApiKeys,
    metrics::{Metrics, StoreCallsCollector},
    store::{Store, StoreChanges},
    tokens::JoinTokens,
    upgrade::{self, Predecessor, UpgradeError, UpgradeRequest, Upgraded, Upgrades},
};

/// How often expired blocklist entries are removed and a failed kernel push is retried.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(1);

/// How long to wait before re-reading a shared store that did not answer.
const FOLLOW_RETRY: Duration = Duration::from_secs(1);

/// Runs the daemon until SIGINT/SIGTERM (clean shutdown: detach), SIGQUIT (exit, leaving the
/// program attached for the next start) or an upgrade (a new process serves: exit the same
/// way). `reload` re-reads the config on SIGHUP. Started by an lb-control that upgrades, it
/// takes over from that one.
pub fn run(config: Config, reload: impl Fn() -> anyhow::Result<Config>) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        // Installed first, so a signal during start-up still gets a clean shutdown.
        let mut signals = Signals::install()?;
        let predecessor = Predecessor::inherited()?;
        let mut daemon = Daemon::start(config, predecessor).await?;
        // Only once this process serves: until then the old one takes the requests. Not
        // fatal: after an upgrade, the old process is on its way out.
        let upgrades = Upgrades::listen(&daemon.config.state_dir)
            .inspect_err(|error| {
                error!(
                    "{error}: `lb-control upgrade` cannot reach this process; restart it instead"
                );
            })
            .ok();
        let ending = daemon.serve(&mut signals, upgrades.as_ref(), reload).await;
        daemon.stop(ending).await
    })
}

/// The signals the daemon acts on.
struct Signals {
    terminate: Signal,
    interrupt: Signal,
    hangup: Signal,
    quit: Signal,
}

/// What a signal asks for.
enum Request {
    /// SIGINT, SIGTERM: stop and detach the XDP program.
    Stop,
    /// SIGQUIT: exit for a restart, leaving the XDP program attached and forwarding.
    Restart,
    /// SIGHUP: re-read the config and the certificates.
    Reload,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        Ok(Signals {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
            hangup: signal(SignalKind::hangup())?,
            quit: signal(SignalKind::quit())?,
        })
    }

    async fn next(&mut self) -> Request {
        tokio::select! {
            _ = self.terminate.recv() => Request::Stop,
            _ = self.interrupt.recv() => Request::Stop,
            _ = self.quit.recv() => Request::Restart,
            _ = self.hangup.recv() => Request::Reload,
        }
    }
}

/// How the event loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// Detach the XDP program.
    Stop,
    /// Leave the XDP program attached for the next start.
    Restart,
    /// A new process serves: finish the requests in flight, leave the XDP program attached.
    Upgraded,
}

/// The running parts.
struct Daemon {
    config: Config,
    /// What the config file declared at start or at the last good reload.
    declared: Declared,
    backends: Arc<BackendSet>,
    checker: health::Checker,
    gateway: Option<Gateway>,
    blocklist: StoredBlocklist,
    /// Writes the gateway's block requests to the blocklist; stopped when a new process takes
    /// over (the kernel blocklist's version is read, changed and written: one writer).
    block_applier: JoinHandle<()>,
    /// None while a new process takes over.
    admin: Option<AdminServer>,
    /// The admin API's listening socket, kept to hand over in an upgrade (and to serve on
    /// again if that fails).
    admin_listener: std::net::TcpListener,
    admin_context: AdminContext,
    /// Held from the moment a new process takes the kernel tables over until this one exits:
    /// no change of this process reaches them after the new one wrote them.
    handed_over: Option<Paused>,
    /// In a pair: armed until a clean stop.
    second_chance: Option<Arc<StandingSecondChance>>,
}

/// The admin API's server task and what stops it.
struct AdminServer {
    stop: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
}

impl AdminServer {
    /// Serves the admin API on (a handle of) `listener`.
    fn start(
        listener: &std::net::TcpListener,
        context: AdminContext,
    ) -> anyhow::Result<AdminServer> {
        let listener = tokio::net::TcpListener::from_std(listener.try_clone()?)?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(api::serve(listener, context, async {
            let _ = stopped.await;
        }));
        Ok(AdminServer { stop, task })
    }

    /// Stops accepting and lets the requests in flight finish; the listening socket stays
    /// open where it was kept.
    async fn stop(self) {
        let _ = self.stop.send(());
        match self.task.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => error!("admin API: {error}"),
            Err(error) => error!("admin API task: {error}"),
        }
    }
}

impl Daemon {
    /// Wires the parts together: store, data plane, backend set, health checker, gateway, admin
    /// API. Whatever can fail for a reason the operator must fix (root, a taken port, a bad
    /// certificate) fails before the data plane changes.
    ///
    /// With a `predecessor`, on its listening sockets, and the kernel tables are written only
    /// once it has stopped writing them.
    async fn start(config: Config, mut predecessor: Option<Predecessor>) -> anyhow::Result<Daemon> {
        // Before anything is written: without root nothing here can work.
        dataplane::require_root()?;
        prepare_state_dir(&config.state_dir)?;
        let token = config.admin.token(&config.state_dir)?;
        let store = Store::open_configured(&config.store, &config.state_dir).context(
            "lb-control does not start without its state store: for etcd, check the endpoints \
             and that a majority of the members is up",
        )?;
        // Bound before the data plane starts, so a taken port fails fast and changes nothing.
        let taken_over = predecessor
            .as_mut()
            .and_then(Predecessor::take_admin_listener)
            // A changed admin.listen gets a socket of its own.
            .filter(|listener| is_listening_on(listener, config.admin.listen));
        let admin_listener = match taken_over {
            Some(listener) => listener,
            None => std::net::TcpListener::bind(config.admin.listen)
                .with_context(|| format!("admin API: cannot listen on {}", config.admin.listen))?,
        };
        admin_listener.set_nonblocking(true)?;
        // Likewise the gateway's port and certificate.
        let taken_over = predecessor
            .as_mut()
            .map(Predecessor::take_gateway_listeners)
            .filter(|listeners| !listeners.is_empty());
        // Listening on a floating address, or on every address (the floating ones too).
        let serves_floating = |listen: std::net::SocketAddr| {
            config
                .ha
                .as_ref()
                .is_some_and(|ha| ha.floats(listen.ip()) || listen.ip().is_unspecified())
        };
        let bind = match config.gateway.listen {
            Some(listen) if serves_floating(listen) => Bind::AheadOfFloatingAddress,
            _ => Bind::LocalAddress,
        };
        let gateway_bound = match (config.gateway.listen, taken_over) {
            (Some(_), Some(listeners)) => {
                Some(Gateway::take_over(&config.gateway, listeners, bind)?)
            }
            (Some(_), None) => Some(Gateway::bind(&config.gateway, bind)?),
            (None, taken_over) => {
                if taken_over.is_some() {
                    warn!(
                        "the config has no [gateway] listen any more: the running gateway's \
                         sockets close with it"
                    );
                }
                None
            }
        };

        let mut dataplane = Dataplane::start(&config.dataplane.start_config(&config.instance))?;
        if let Some(predecessor) = &mut predecessor {
            predecessor.stop_writing().await?;
            // Its last writes came after this program's start read the kernel.
            dataplane.reread_kernel_state()?;
            info!("the running lb-control stopped writing: taking the kernel tables over");
        }
        let pin_dir = dataplane.pin_dir().to_owned();
        let mut registry = Registry::default();
        let metrics = Arc::new(Metrics::register(&mut registry));
        let gateway_metrics = Arc::new(GatewayMetrics::register(&mut registry));
        registry
            .sub_registry_with_prefix("lb")
            .register_collector(Box::new(StoreCallsCollector(store.clone())));
        let declared = config.declared();
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

        let ha = Ha::start(config.ha.clone(), store.clone(), metrics.clone());
        backends.record_health(ha.current().role.records_health());
        let flow_sync = match config.ha.as_ref().and_then(|ha| ha.flow_sync.as_ref()) {
            Some(section) => Some(
                flow_sync::start(
                    section,
                    pin_dir.clone(),
                    ha.subscribe(),
                    metrics.clone(),
                    gateway_bound.as_ref().map(Bound::local_addr),
                )
                .await
                .context("the HA flow sync")?,
            ),
            None => None,
        };
        // The kernel blocklist's one writer: the gateway, the admin API, the expiry sweep and
        // the store's changes all go through it.
        let blocklist = StoredBlocklist::start(
            store.clone(),
            BlocklistHandle::open(&pin_dir, metrics.blocklist_entries.clone())?,
            &config.state_dir,
        )
        .await
        .context("the source blocklist")?;
        blocklist.set_deletes_expired(ha.current().role.records_health());
        let second_chance = StandingSecondChance::start(
            config.ha.as_ref(),
            gateway_bound.as_ref().map(Bound::local_addr),
            &admin_listener,
            &pin_dir,
        )
        .await?
        .map(Arc::new);
        tokio::spawn(follow_role(
            ha.subscribe(),
            backends.clone(),
            blocklist.clone(),
        ));

        // The remote gateways' relays are checked like the backends' nodes.
        let remote_targets = gateway_bound
            .as_ref()
            .map(Bound::remote_targets)
            .unwrap_or_default();
        let (targets_tx, targets_rx) =
            watch::channel(health_targets(&backends.view(), &remote_targets));
        let checker = health::spawn(config.health.clone(), targets_rx, metrics.clone());
        tokio::spawn(follow_view(backends.clone(), targets_tx, remote_targets));
        tokio::spawn(follow_health(backends.clone(), checker.snapshots()));

        let keys = ApiKeys::open(store.clone())?;
        if let Some(changes) = store.changes() {
            tokio::spawn(follow_shared_blocklist(changes.clone(), blocklist.clone()));
            tokio::spawn(follow_shared_store(changes, backends.clone(), keys.clone()));
        }
        let (blocks, block_requests) = mpsc::unbounded_channel::<BlockRequest>();
        let block_applier = tokio::spawn(gateway::block::apply_requests(
            block_requests,
            blocklist.clone(),
        ));
        let gateway_clients = Arc::new(NodeClients::default());
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
                    clients: gateway_clients.clone(),
                    health: checker.snapshots(),
                },
            )?),
            None => None,
        };

        let drained_gateway = gateway.as_ref().map(|gateway| DrainedGateway {
            connections: Arc::new(gateway.connections()),
            second_chance: second_chance.clone(),
        });
        let handover = Handover::new(ha.clone(), flow_sync, drained_gateway, &config.state_dir);
        let admin_context = AdminContext {
            backends: backends.clone(),
            keys: Arc::new(keys),
            tokens: JoinTokens::new(store.clone()),
            store: store.clone(),
            registry: Arc::new(registry),
            metrics: metrics.clone(),
            blocklist: blocklist.clone(),
            pin_dir: pin_dir.clone(),
            gateway_clients,
            gateway: gateway.as_ref().map(Gateway::state),
            ha: ha.clone(),
            handover,
            token,
        };
        let admin_address = admin_listener.local_addr()?;
        let admin = AdminServer::start(&admin_listener, admin_context.clone())?;
        if let Some(predecessor) = predecessor {
            predecessor.serving().await?;
        }
        upgrade::systemd::notify_ready();

        info!(
            instance = %config.instance,
            pin_dir = %pin_dir.display(),
            admin = %admin_address,
            gateway = ?gateway.as_ref().map(Gateway::local_addr),
            store = %store.location(),
            role = %ha.current().role,
            "running; SIGHUP reloads the config, SIGINT or SIGTERM stops, SIGQUIT exits for a \
             restart (the program keeps forwarding), `lb-control upgrade` hands over to a new \
             process"
        );
        Ok(Daemon {
            config,
            declared,
            backends,
            checker,
            gateway,
            blocklist,
            block_applier,
            admin: Some(admin),
            admin_listener,
            admin_context,
            handed_over: None,
            second_chance,
        })
    }

    /// The event loop: until a signal ends it.
    async fn serve(
        &mut self,
        signals: &mut Signals,
        upgrades: Option<&Upgrades>,
        reload: impl Fn() -> anyhow::Result<Config>,
    ) -> Ending {
        let mut housekeeping = tokio::time::interval(HOUSEKEEPING_INTERVAL);
        loop {
            tokio::select! {
                request = signals.next() => match request {
                    Request::Stop => return Ending::Stop,
                    Request::Restart => {
                        // The pinned links keep the program attached: traffic flows on, and
                        // the next lb-control swaps its program in and finds the pinned flow
                        // table.
                        info!("exiting for a restart: the XDP program stays attached and forwarding");
                        return Ending::Restart;
                    }
                    Request::Reload => self.reload(&reload).await,
                },
                (upgrades, request) = next_upgrade(upgrades) => {
                    if self.upgrade(upgrades, request).await {
                        return Ending::Upgraded;
                    }
                }
                _ = housekeeping.tick() => self.housekeeping().await,
            }
        }
    }

    /// Hands over to a new process (see [`crate::upgrade`]); true once it serves. When it
    /// fails, this process carries on as before and the requester is told why.
    async fn upgrade(&mut self, upgrades: &Upgrades, request: UpgradeRequest) -> bool {
        let started = Instant::now();
        let outcome = self.hand_over(upgrades, started).await;
        match &outcome {
            Ok(upgraded) => info!(
                pid = upgraded.pid,
                took_ms = upgraded.took_ms,
                "upgrade: the new lb-control serves; finishing the requests in flight and exiting"
            ),
            Err(error) => error!("upgrade failed: {error}"),
        }
        request.answer(&outcome).await;
        outcome.is_ok()
    }

    async fn hand_over(
        &mut self,
        upgrades: &Upgrades,
        started: Instant,
    ) -> Result<Upgraded, UpgradeError> {
        let gateway_listeners = self.gateway.as_ref().map_or(&[][..], Gateway::listeners);
        let mut successor = upgrades.start_successor(gateway_listeners, &self.admin_listener)?;
        info!(
            pid = successor.pid(),
            "upgrade: started the new lb-control on this one's listening sockets"
        );
        successor.ready_to_write().await?;
        // One writer of the kernel tables at a time: this one stops here for good, unless the
        // new one fails before it serves.
        if let Some(admin) = self.admin.take() {
            admin.stop().await;
        }
        let paused = self.backends.pause().await;
        let handed_over = async {
            successor.stopped_writing().await?;
            successor.serving().await
        };
        match handed_over.await {
            Ok(()) => {
                self.block_applier.abort();
                self.handed_over = Some(paused);
                Ok(Upgraded {
                    pid: successor.pid(),
                    previous_pid: std::process::id(),
                    took_ms: started.elapsed().as_millis() as u64,
                })
            }
            Err(error) => {
                self.resume(paused).await;
                Err(error)
            }
        }
    }

    /// After a failed upgrade: writes the kernel tables again and serves the admin API.
    async fn resume(&mut self, paused: Paused) {
        if let Err(error) = self.backends.resume(paused).await {
            error!("resuming after the failed upgrade: {error}; retried every second");
        }
        match AdminServer::start(&self.admin_listener, self.admin_context.clone()) {
            Ok(admin) => self.admin = Some(admin),
            Err(error) => error!("resuming the admin API after the failed upgrade: {error}"),
        }
    }

    /// Expires blocklist entries (and records automatic blocks the store refused before),
    /// retries a kernel push that failed, and admits joining backends whose admission did not
    /// happen with their last health change.
    async fn housekeeping(&mut self) {
        self.blocklist.housekeeping(SystemTime::now()).await;
        if let Err(error) = self.backends.resync_kernel().await {
            error!("the kernel tables are behind the backend set: {error}");
        }
        if let Err(error) = self.backends.admit_risen().await {
            error!("admitting joining backends whose checks passed: {error}");
        }
    }

    /// SIGHUP: re-reads the certificates, then the config; a bad config is reported and
    /// changes nothing.
    async fn reload(&mut self, reload: impl Fn() -> anyhow::Result<Config>) {
        // The certificate files are re-read whatever the config says: renewing a certificate
        // is the common reason for a SIGHUP.
        if let Some(gateway) = &self.gateway {
            match gateway.reload_tls() {
                Ok(()) => info!("gateway: reloaded the TLS certificate"),
                Err(error) => error!("{error}; keeping the running certificate"),
            }
        }
        let new = match reload() {
            Ok(new) => new,
            Err(error) => {
                error!("config reload failed, keeping the running state: {error}");
                return;
            }
        };
        let after = new.declared();
        if let Err(error) = self
            .backends
            .reload(new.lb_settings(), &self.declared, &after)
            .await
        {
            error!("config reload failed, keeping the running state: {error}");
            return;
        }
        self.declared = after;
        self.checker.update_settings(new.health.clone());
        if new.store != self.config.store {
            warn!("store settings changed: they take effect at the next start");
        }
        if new.admin != self.config.admin {
            warn!("admin API settings changed: they take effect at the next start");
        }
        if new.ha != self.config.ha {
            warn!("ha settings changed: they take effect at the next start");
        }
        if new.gateway != self.config.gateway {
            warn!(
                "gateway settings changed: they take effect at the next start (certificates \
                 are re-read now)"
            );
        }
        info!("reloaded the config");
    }

    /// Stops the gateway and the admin API (requests in flight finish), then detaches the XDP
    /// program unless the daemon exits for a restart or an upgrade.
    async fn stop(self, ending: Ending) -> anyhow::Result<()> {
        if let Some(gateway) = self.gateway {
            let reason = match ending {
                Ending::Upgraded => StopReason::Upgrade,
                Ending::Stop | Ending::Restart => StopReason::Shutdown,
            };
            gateway.stop(reason).await;
        }
        // Admin requests in flight finish; new ones are refused.
        if let Some(admin) = self.admin {
            admin.stop().await;
        }
        drop(self.checker);
        if ending == Ending::Stop {
            // Left armed by a restart or an upgrade: the next process serves through them.
            if let Some(second_chance) = &self.second_chance {
                second_chance.stop().await;
            }
            info!("shutting down: detaching the XDP program");
            self.backends.detach_kernel().await?;
            info!("detached");
        }
        Ok(())
    }
}

/// The next upgrade request, if this process takes them.
async fn next_upgrade(upgrades: Option<&Upgrades>) -> (&Upgrades, UpgradeRequest) {
    match upgrades {
        Some(upgrades) => (upgrades, upgrades.next().await),
        None => std::future::pending().await,
    }
}

/// What the health checker checks: the backend set's nodes and the gateway's `remotes`.
fn health_targets(view: &ClusterView, remotes: &[health::Target]) -> Vec<health::Target> {
    let mut targets = view.health_targets();
    targets.extend_from_slice(remotes);
    targets
}

/// Keeps the health checker's targets equal to the backend set's nodes and the gateway's
/// `remotes`.
async fn follow_view(
    backends: Arc<BackendSet>,
    targets: watch::Sender<Vec<health::Target>>,
    remotes: Vec<health::Target>,
) {
    let mut view = backends.subscribe();
    while view.changed().await.is_ok() {
        let wanted = health_targets(&view.borrow_and_update(), &remotes);
        targets.send_if_modified(|current| {
            let changed = *current != wanted;
            *current = wanted;
            changed
        });
    }
}

/// Keeps the backend set's recording of health transitions, and the blocklist's deletion of
/// expired entries, to what the role allows: a backup leaves the record to its master.
async fn follow_role(
    mut role: watch::Receiver<RoleState>,
    backends: Arc<BackendSet>,
    blocklist: StoredBlocklist,
) {
    while role.changed().await.is_ok() {
        let current = role.borrow_and_update().role;
        backends.record_health(current.records_health());
        blocklist.set_deletes_expired(current.records_health());
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

/// Applies the changes other lb-controls make to the shared store: the backend set (kernel
/// tables, gateway rotation) and the live API keys re-read their part when it moves. A store
/// that does not answer (no quorum) is asked again every second; meanwhile everything serves
/// from the last state read.
pub async fn follow_shared_store(
    changes: watch::Receiver<StoreChanges>,
    backends: Arc<BackendSet>,
    keys: ApiKeys,
) {
    let follow_backends = follow_part(
        changes.clone(),
        "backends",
        |changes| changes.backends,
        move || {
            let backends = backends.clone();
            async move { backends.follow_store().await.map_err(|e| e.to_string()) }
        },
    );
    let follow_keys = follow_part(
        changes,
        "API keys",
        |changes| changes.keys,
        move || {
            let keys = keys.clone();
            async move {
                match tokio::task::spawn_blocking(move || keys.reload()).await {
                    Ok(reloaded) => reloaded.map_err(|e| e.to_string()),
                    Err(error) => Err(error.to_string()),
                }
            }
        },
    );
    tokio::join!(follow_backends, follow_keys);
}

/// Keeps this host's kernel blocklist following the shared store's: the blocks and unblocks
/// another lb-control made, and the expiry its master deleted.
pub async fn follow_shared_blocklist(
    changes: watch::Receiver<StoreChanges>,
    blocklist: StoredBlocklist,
) {
    follow_part(
        changes,
        "blocklist",
        |changes| changes.blocklist,
        move || {
            let blocklist = blocklist.clone();
            async move {
                blocklist
                    .follow_store()
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            }
        },
    )
    .await;
}

/// Runs `follow` whenever `part` of the store's changes moves, and once at the start (the
/// follower loaded before this task began to listen); while it fails, again every second.
/// Returns when the store is gone.
async fn follow_part<F: Future<Output = Result<(), String>>>(
    mut changes: watch::Receiver<StoreChanges>,
    what: &str,
    part: impl Fn(&StoreChanges) -> u64,
    mut follow: impl FnMut() -> F,
) {
    let mut applied = None;
    loop {
        let wanted = part(&changes.borrow_and_update());
        let mut behind = false;
        if applied != Some(wanted) {
            match follow().await {
                Ok(()) => applied = Some(wanted),
                Err(error) => {
                    behind = true;
                    warn!("following the shared store's {what}: {error}");
                }
            }
        }
        let ended = if behind {
            tokio::select! {
                () = tokio::time::sleep(FOLLOW_RETRY) => false,
                changed = changes.changed() => changed.is_err(),
            }
        } else {
            changes.changed().await.is_err()
        };
        if ended {
            return;
        }
    }
}

/// Whether `listener` listens where `wanted` says (any port, if it says port 0).
fn is_listening_on(listener: &std::net::TcpListener, wanted: std::net::SocketAddr) -> bool {
    listener.local_addr().is_ok_and(|address| {
        address.ip() == wanted.ip() && (wanted.port() == 0 || address.port() == wanted.port())
    })
}

/// Creates the state directory, private to root: it holds the admin token.
fn prepare_state_dir(state_dir: &Path) -> anyhow::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)
        .with_context(|| format!("state directory {}", state_dir.display()))
}
