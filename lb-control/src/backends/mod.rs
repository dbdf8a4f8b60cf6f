//! The backend set: every service and backend with its admin and health state.
//!
//! One path applies every change, whatever its cause (admin API, health checker, config
//! reload): the change and its events are written to the store in one durable transaction, the
//! effective states are recomputed, every Maglev table is rebuilt once and pushed to the kernel,
//! the gateway's view is replaced, one line is logged and the metrics are updated. Nothing is
//! changed in memory or in the kernel unless the store write succeeded.
//!
//! The kernel calls (BPF system calls, tens of milliseconds for a large table) run on tokio's
//! blocking threads, never on an async worker: a backend change does not hold up the gateway.
//! Changes still reach the kernel one at a time and in commit order: each kernel call is made
//! holding the set's lock, from a task of its own that no caller can cancel.
//!
//! The store is the truth, the set in memory follows it: a change starts from the set as the
//! store's transaction reads it (another lb-control may have changed a shared store), and a
//! change another lb-control made arrives through [`BackendSet::follow_store`], which takes
//! the stored set as it is and pushes it the same way.

mod reload;
pub mod rotation;
pub mod settings;
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, BTreeSet},
    panic,
    sync::{
        Arc, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
};

use serde::Serialize;
use thiserror::Error;
use tokio::{
    sync::{Mutex, OwnedMutexGuard, watch},
    task::JoinHandle,
};
use tracing::{error, info, warn};
use utoipa::ToSchema;

pub use self::{
    reload::Declared,
    rotation::{Placement, State},
};
use crate::{
    dataplane::{
        self, ApplyReport, BackendSpec, DataplaneError, LbSettings, ServiceSpec, SpecProblem,
    },
    health::{HealthSnapshot, NodeHealth, Target},
    metrics::{BackendLabels, Metrics, ServiceLabels, TransitionLabels},
    model::{
        AdminState, Backend, BackendDef, BackendId, Origin, Service, ServiceDef, ServiceId,
        ServiceKey, Tier,
    },
    store::{Store, StoreError, Tx},
};

/// Where the backend set's tables go: the XDP program's maps.
pub trait KernelTables: Send {
    fn apply(
        &mut self,
        settings: &LbSettings,
        services: &[ServiceSpec],
    ) -> Result<ApplyReport, DataplaneError>;

    /// A clean shutdown: traffic to the services stops being balanced.
    fn detach(&mut self) -> Result<(), DataplaneError>;

    /// Forgets what this process wrote and reads the tables back: another process wrote them
    /// meanwhile (an upgrade that failed halfway). Tables kept only in memory have nothing to
    /// read back.
    fn reread(&mut self) -> Result<(), DataplaneError> {
        Ok(())
    }
}

impl KernelTables for dataplane::Dataplane {
    fn apply(
        &mut self,
        settings: &LbSettings,
        services: &[ServiceSpec],
    ) -> Result<ApplyReport, DataplaneError> {
        dataplane::Dataplane::apply(self, settings, services)
    }

    fn detach(&mut self) -> Result<(), DataplaneError> {
        dataplane::Dataplane::detach(self)
    }

    fn reread(&mut self) -> Result<(), DataplaneError> {
        dataplane::Dataplane::reread_kernel_state(self)
    }
}

/// The kernel tables, called on a blocking thread.
///
/// `spawn_blocking` rather than a kernel thread fed by a channel: the set's lock already orders
/// every call (each is made holding it, and waited for before the lock is let go), so a
/// thread's queue would add no ordering, and tokio's blocking pool is already there for the
/// store's fsync. The std mutex is never contended; it lets the call borrow the tables from a
/// `'static` closure, and a call that panicked leaves them usable for the next push.
#[derive(Clone)]
struct Kernel(Arc<std::sync::Mutex<Box<dyn KernelTables>>>);

impl Kernel {
    fn new(tables: Box<dyn KernelTables>) -> Kernel {
        Kernel(Arc::new(std::sync::Mutex::new(tables)))
    }

    /// Runs `call` with the tables on a blocking thread and waits for it.
    async fn call<T: Send + 'static>(
        &self,
        call: impl FnOnce(&mut dyn KernelTables) -> T + Send + 'static,
    ) -> T {
        let tables = self.0.clone();
        finish(tokio::task::spawn_blocking(move || {
            let mut tables = tables.lock().unwrap_or_else(PoisonError::into_inner);
            call(tables.as_mut())
        }))
        .await
    }

    async fn apply(
        &self,
        settings: LbSettings,
        services: Vec<ServiceSpec>,
    ) -> Result<ApplyReport, DataplaneError> {
        self.call(move |tables| tables.apply(&settings, &services))
            .await
    }
}

/// The outcome of a task the set spawned: its panic goes on in the caller.
async fn finish<T>(task: JoinHandle<T>) -> T {
    match task.await {
        Ok(value) => value,
        Err(error) if error.is_panic() => panic::resume_unwind(error.into_panic()),
        // Only a runtime shutting down cancels a task, and then no caller is left waiting.
        Err(error) => unreachable!("a backend set task was cancelled: {error}"),
    }
}

/// Why a change was refused or failed; the admin API maps each to its HTTP status.
#[derive(Debug, Error)]
pub enum ChangeError {
    #[error("{what} does not exist")]
    NotFound { what: String },
    #[error("{what} already exists")]
    Conflict { what: String },
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("state store: {0}")]
    Store(StoreError),
    #[error("kernel tables: {0}")]
    Kernel(#[from] DataplaneError),
}

impl From<StoreError> for ChangeError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Conflict { what } => ChangeError::Conflict { what },
            other => ChangeError::Store(other),
        }
    }
}

/// What caused a change: shows in the log, the event log and the transition metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    Api,
    Health,
    Config,
    /// Another lb-control changed the shared store.
    Peer,
}

impl Cause {
    pub fn name(self) -> &'static str {
        match self {
            Cause::Api => "api",
            Cause::Health => "health",
            Cause::Config => "config",
            Cause::Peer => "peer",
        }
    }
}

/// Who asked for a change through the admin API: the operator (the admin token) or a node
/// with a join token. The event log names which.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requester {
    Operator,
    /// The token as the event log names it: `join token 3 (eu-west)`.
    JoinToken(String),
}

impl Requester {
    fn describe(&self) -> &str {
        match self {
            Requester::Operator => Cause::Api.name(),
            Requester::JoinToken(token) => token,
        }
    }
}

/// What a join found: the node added as a joining backend, or there already (left as it is).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Joined {
    Added(Backend),
    Present(Backend),
}

/// A backend as the gateway and the health checker see it.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct BackendView {
    #[serde(flatten)]
    pub backend: Backend,
    pub state: State,
    /// Kept in rotation although unhealthy, because its whole service is.
    pub fallback: bool,
    /// Its node refuses new connections ("too many connections"): it stays in the kernel's
    /// table and keeps its clients, but the gateway places no new clients on it.
    pub saturated: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ServiceView {
    #[serde(flatten)]
    pub service: Service,
    /// `192.0.2.10:9944/tcp`
    pub name: String,
    /// The tier new flows go to: the lowest with a backend up (0 = the primaries); null while
    /// no backend is in rotation.
    pub serving_tier: Option<Tier>,
    pub backends: Vec<BackendView>,
}

/// The whole backend set at one moment; replaced (never mutated) on every change.
#[derive(Debug, Clone, Default, PartialEq, Serialize, ToSchema)]
pub struct ClusterView {
    pub services: Vec<ServiceView>,
}

impl ClusterView {
    /// Every node endpoint the health checker should watch, once each.
    pub fn health_targets(&self) -> Vec<Target> {
        let targets: BTreeSet<Target> = self
            .services
            .iter()
            .flat_map(|service| {
                service
                    .backends
                    .iter()
                    .filter(|backend| backend.state != State::Disabled)
                    .map(|backend| rotation::health_target(&service.service, &backend.backend))
            })
            .collect();
        targets.into_iter().collect()
    }

    pub fn backend(&self, id: BackendId) -> Option<(&ServiceView, &BackendView)> {
        self.services.iter().find_map(|service| {
            service
                .backends
                .iter()
                .find(|backend| backend.backend.id == id)
                .map(|backend| (service, backend))
        })
    }
}

/// A backend with its health, for the admin API and the CLI.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct BackendStatus {
    #[serde(flatten)]
    pub view: BackendView,
    /// The service's name, `192.0.2.10:9944/tcp`.
    pub service_name: String,
    /// None for a backend not checked yet, or of a service without checks.
    pub health: Option<NodeHealth>,
}

struct Inner {
    store: Store,
    kernel: Kernel,
    settings: LbSettings,
    services: BTreeMap<ServiceId, Service>,
    backends: BTreeMap<BackendId, Backend>,
    health: Arc<HealthSnapshot>,
    /// The placements last pushed to the kernel.
    placements: BTreeMap<BackendId, Placement>,
    /// False after a failed kernel push: the next health snapshot or [`BackendSet::resync_kernel`]
    /// pushes again.
    kernel_in_sync: bool,
}

/// The backend set while another lb-control takes its kernel tables over: no change gets
/// through (each waits) until it is resumed or, once the other serves, the process exits.
pub struct Paused(OwnedMutexGuard<Inner>);

/// The one owner of the backend set. Cheap to share: every method takes `&self`.
pub struct BackendSet {
    /// Shared with the task that pushes a change to the kernel and publishes it.
    inner: Arc<Mutex<Inner>>,
    view: Arc<watch::Sender<Arc<ClusterView>>>,
    metrics: Arc<Metrics>,
    /// Whether health transitions are recorded in the store (see [`BackendSet::record_health`]).
    records_health: AtomicBool,
}

impl BackendSet {
    /// Loads the stored set, merges in what the config file declares (records the file
    /// declares but the store lacks are added; config records the file no longer declares are
    /// removed; stored values win for the rest, so runtime changes survive restarts) and
    /// pushes the result to the kernel.
    pub async fn start(
        store: Store,
        kernel: Box<dyn KernelTables>,
        settings: LbSettings,
        declared: &Declared,
        metrics: Arc<Metrics>,
    ) -> Result<BackendSet, ChangeError> {
        // Empty until the first commit below reads the stored set.
        let set = BackendSet {
            inner: Arc::new(Mutex::new(Inner {
                store,
                kernel: Kernel::new(kernel),
                settings,
                services: BTreeMap::new(),
                backends: BTreeMap::new(),
                health: Arc::default(),
                placements: BTreeMap::new(),
                kernel_in_sync: false,
            })),
            view: Arc::new(watch::Sender::new(Arc::default())),
            metrics,
            records_health: AtomicBool::new(true),
        };
        set.commit(Cause::Config, "start", |draft, tx| {
            reload::merge_at_start(draft, tx, declared)
        })
        .await?;
        Ok(set)
    }

    /// The current view; `changed()` on it wakes on every change.
    pub fn subscribe(&self) -> watch::Receiver<Arc<ClusterView>> {
        self.view.subscribe()
    }

    pub fn view(&self) -> Arc<ClusterView> {
        self.view.borrow().clone()
    }

    /// Every backend with its state and health.
    pub async fn backend_statuses(&self) -> Vec<BackendStatus> {
        let view = self.view();
        let health = self.inner.lock().await.health.clone();
        view.services
            .iter()
            .flat_map(|service| {
                service.backends.iter().map(|backend| BackendStatus {
                    view: backend.clone(),
                    service_name: service.name.clone(),
                    health: health
                        .nodes
                        .get(&rotation::health_target(&service.service, &backend.backend))
                        .cloned(),
                })
            })
            .collect()
    }

    pub async fn backend_status(&self, id: BackendId) -> Result<BackendStatus, ChangeError> {
        self.backend_statuses()
            .await
            .into_iter()
            .find(|status| status.view.backend.id == id)
            .ok_or_else(|| not_found_backend(id))
    }

    /// The latest health snapshot the set acted on.
    pub async fn health(&self) -> Arc<HealthSnapshot> {
        self.inner.lock().await.health.clone()
    }

    pub async fn add_service(&self, def: ServiceDef) -> Result<Service, ChangeError> {
        let name = def.key().to_string();
        self.commit(Cause::Api, &format!("service {name} added"), |draft, tx| {
            draft.add_service(tx, def.clone(), Origin::Api)
        })
        .await
    }

    /// Removes a service and its backends.
    pub async fn remove_service(&self, id: ServiceId) -> Result<Service, ChangeError> {
        self.commit(Cause::Api, &format!("service {id} removed"), |draft, tx| {
            draft.remove_service(tx, id, Cause::Api)
        })
        .await
    }

    pub async fn add_backend(
        &self,
        service: ServiceId,
        def: BackendDef,
    ) -> Result<Backend, ChangeError> {
        let address = def.address;
        self.commit(
            Cause::Api,
            &format!("backend {address} added to service {service}"),
            |draft, tx| draft.add_backend(tx, service, def.clone(), Origin::Api),
        )
        .await
    }

    /// Adds `def` to the service `service` as a joining backend (whatever admin state `def`
    /// names): out of rotation until its node has passed `rise` checks. A backend of the
    /// service at the same address is left as it is.
    pub async fn join(
        &self,
        service: ServiceKey,
        def: BackendDef,
        by: &Requester,
    ) -> Result<Joined, ChangeError> {
        let def = BackendDef {
            admin: AdminState::Joining,
            ..def
        };
        let address = def.address;
        self.commit(
            Cause::Api,
            &format!("backend {address} joins {service} ({})", by.describe()),
            |draft, tx| {
                let id = draft
                    .services
                    .values()
                    .find(|s| s.def.key() == service)
                    .map(|s| s.id)
                    .ok_or_else(|| ChangeError::NotFound {
                        what: format!("service {service}"),
                    })?;
                if let Some(present) = draft
                    .backends_of(id)
                    .find(|backend| backend.def.address == address)
                {
                    return Ok(Joined::Present(present.clone()));
                }
                draft
                    .add_backend_by(tx, id, def.clone(), Origin::Api, by.describe())
                    .map(Joined::Added)
            },
        )
        .await
    }

    pub async fn remove_backend(
        &self,
        id: BackendId,
        by: &Requester,
    ) -> Result<Backend, ChangeError> {
        self.commit(Cause::Api, &format!("backend {id} removed"), |draft, tx| {
            draft.remove_backend(tx, id, Cause::Api, by.describe())
        })
        .await
    }

    pub async fn set_admin(
        &self,
        id: BackendId,
        admin: AdminState,
        by: &Requester,
    ) -> Result<Backend, ChangeError> {
        let label = serde_json::to_value(admin)
            .ok()
            .and_then(|value| value.as_str().map(str::to_owned))
            .unwrap_or_default();
        self.commit(
            Cause::Api,
            &format!("backend {id} set {label}"),
            |draft, tx| draft.update_backend(tx, id, by.describe(), |def| def.admin = admin),
        )
        .await
    }

    pub async fn set_weight(&self, id: BackendId, weight: u32) -> Result<Backend, ChangeError> {
        validate_weight(weight)?;
        self.commit(
            Cause::Api,
            &format!("backend {id} weight set to {weight}"),
            |draft, tx| draft.update_backend(tx, id, Cause::Api.name(), |def| def.weight = weight),
        )
        .await
    }

    /// Moves a backend to another tier: new flows go to the lowest tier with a backend up.
    pub async fn set_tier(&self, id: BackendId, tier: Tier) -> Result<Backend, ChangeError> {
        validate_tier(tier)?;
        self.commit(
            Cause::Api,
            &format!("backend {id} moved to tier {tier}"),
            |draft, tx| draft.update_backend(tx, id, Cause::Api.name(), |def| def.tier = tier),
        )
        .await
    }

    /// Applies what the config file now declares, diffed against what it declared before.
    pub async fn reload(
        &self,
        settings: LbSettings,
        before: &Declared,
        after: &Declared,
    ) -> Result<(), ChangeError> {
        self.commit(Cause::Config, "config reloaded", |draft, tx| {
            draft.settings = settings.clone();
            reload::apply_diff(draft, tx, before, after)
        })
        .await
    }

    /// Takes in a new health snapshot; pushes to the kernel only when a backend's state
    /// changes. A change of saturation alone (which the kernel does not see) only replaces the
    /// view.
    pub async fn apply_health(&self, snapshot: Arc<HealthSnapshot>) -> Result<(), ChangeError> {
        let mut inner = self.inner.lock().await;
        inner.health = snapshot;
        // A backup leaves the admission to its master, whose change reaches it through the store.
        if self.records_health.load(Ordering::Relaxed)
            && !inner.draft().risen(&inner.health).is_empty()
        {
            drop(inner);
            return self.admit_risen().await;
        }
        let placements = inner.placements_now();
        if placements == inner.placements && inner.kernel_in_sync {
            return Ok(());
        }
        let unsaturated = |placements: &BTreeMap<BackendId, Placement>| {
            placements
                .iter()
                .map(|(id, placement)| (*id, placement.state, placement.fallback))
                .collect::<Vec<_>>()
        };
        if inner.kernel_in_sync && unsaturated(&placements) == unsaturated(&inner.placements) {
            let view = Arc::new(inner.draft().view(&placements));
            inner.placements = placements;
            self.view.send_replace(view);
            return Ok(());
        }
        drop(inner);
        let unrecorded = if self.records_health.load(Ordering::Relaxed) {
            match self
                .commit(Cause::Health, "health changed", |_, _| Ok(()))
                .await
            {
                // A node that dies while etcd has no quorum still leaves this host's kernel
                // table and rotation; only the event is missing.
                Err(ChangeError::Store(error)) if error.is_unavailable() => {
                    warn!("health changed while the store takes no writes ({error})");
                    "health changed (not recorded: the store takes no writes)"
                }
                committed => return committed,
            }
        } else {
            "health changed (not recorded: a backup leaves the record to its master)"
        };
        // The same push as a commit's, from the set in memory (which follows the store), with
        // no transaction: nothing recorded.
        let inner = self.lock().await;
        let draft = inner.draft();
        let placements = draft.placements(&inner.health);
        self.publish(inner, draft, placements, Cause::Health, unrecorded)
            .await
    }

    /// Enables every joining backend whose node has risen, in one change. Called with each
    /// health snapshot, and every second by the daemon: an admission that failed (a store
    /// without quorum), or one a backup left to its master before it became the master, is
    /// made then.
    pub async fn admit_risen(&self) -> Result<(), ChangeError> {
        if !self.records_health.load(Ordering::Relaxed) {
            return Ok(());
        }
        let health = self.health().await;
        if self.inner.lock().await.draft().risen(&health).is_empty() {
            return Ok(());
        }
        self.commit(Cause::Health, "joining backends admitted", |draft, tx| {
            for id in draft.risen(&health) {
                draft.admit(tx, id, health.rise)?;
            }
            Ok(())
        })
        .await
    }

    /// Whether this set records health transitions in the store (events `backend.state`).
    /// On by default; an HA backup turns it off, as its master records the same transitions
    /// (see `ha`). Its own kernel tables and view follow health either way.
    pub fn record_health(&self, record: bool) {
        self.records_health.store(record, Ordering::Relaxed);
    }

    /// Pushes the set to the kernel again if the last push failed.
    pub async fn resync_kernel(&self) -> Result<(), ChangeError> {
        let mut inner = self.lock().await;
        if inner.kernel_in_sync {
            return Ok(());
        }
        let specs = inner.draft().specs(&inner.placements);
        let settings = inner.settings.clone();
        finish(tokio::spawn(async move {
            inner.kernel.apply(settings, specs).await?;
            inner.kernel_in_sync = true;
            info!("the kernel tables caught up with the backend set");
            Ok(())
        }))
        .await
    }

    /// Detaches the kernel program (a clean shutdown); the stored set stays for the next start.
    pub async fn detach_kernel(&self) -> Result<(), DataplaneError> {
        let inner = self.lock().await;
        finish(tokio::spawn(async move {
            inner.kernel.call(|tables| tables.detach()).await
        }))
        .await
    }

    /// Holds every change back (API, health, config, a peer's) until [`BackendSet::resume`]:
    /// another lb-control takes the kernel tables over, and they have one writer at a time.
    pub async fn pause(&self) -> Paused {
        Paused(self.lock().await)
    }

    /// Lets changes through again after a takeover that failed: the other process may have
    /// written the kernel tables, so they are read back and written whole.
    pub async fn resume(&self, paused: Paused) -> Result<(), ChangeError> {
        let mut inner = paused.0;
        inner.kernel_in_sync = false;
        inner.kernel.call(|tables| tables.reread()).await?;
        drop(inner);
        self.resync_kernel().await
    }

    /// The set's lock, owned, so a task of its own can hold it through a kernel call.
    async fn lock(&self) -> OwnedMutexGuard<Inner> {
        self.inner.clone().lock_owned().await
    }

    /// Takes the services and backends as the store holds them now, after another lb-control
    /// changed them; pushes to the kernel only if they differ from the set in memory.
    pub async fn follow_store(&self) -> Result<(), ChangeError> {
        let inner = self.lock().await;
        let store = inner.store.clone();
        let stored = tokio::task::block_in_place(|| {
            Ok::<_, StoreError>((store.services()?, store.backends()?))
        })?;
        let mut draft = inner.draft();
        draft.take_stored(stored.0, stored.1);
        if draft.services == inner.services && draft.backends == inner.backends {
            return Ok(());
        }
        let placements = draft.placements(&inner.health);
        self.publish(
            inner,
            draft,
            placements,
            Cause::Peer,
            "the shared store changed",
        )
        .await
    }

    /// The one change path. `edit` changes a draft of the set, as the store's transaction reads
    /// it, and writes the same change to the store; the draft replaces the set only after the
    /// store commit, and then the kernel, the view, the log and the metrics follow. `edit` runs
    /// again if the store runs the transaction again (see [`Store::write`]).
    async fn commit<T>(
        &self,
        cause: Cause,
        what: &str,
        mut edit: impl FnMut(&mut Draft, &mut Tx<'_>) -> Result<T, ChangeError>,
    ) -> Result<T, ChangeError> {
        let inner = self.lock().await;
        let health = inner.health.clone();
        let before = inner.placements.clone();
        // Published with `before`: the lock is held from a publish to the next commit.
        let before_view = self.view();
        let store = inner.store.clone();
        // A durable commit waits for fsync: keep it off the async worker's hot path.
        let (value, draft, placements) = tokio::task::block_in_place(|| {
            store.write(|tx| {
                let mut draft = inner.draft();
                draft.take_stored(tx.services()?, tx.backends()?);
                let value = edit(&mut draft, tx)?;
                let placements = draft.placements(&health);
                // The kernel's limits are checked before anything is committed.
                let problems = draft.kernel_problems(&placements);
                if !problems.is_empty() {
                    return Err(ChangeError::Invalid {
                        field: "services".to_owned(),
                        reason: problems
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join("; "),
                    });
                }
                record_transitions(tx, &draft, &before, &placements, cause)?;
                record_serving_tiers(tx, &draft, &before_view, &placements, cause)?;
                Ok((value, draft, placements))
            })
        })?;
        self.publish(inner, draft, placements, cause, what).await?;
        Ok(value)
    }

    /// Makes `draft` the set (it is in the store already) and pushes it: the kernel first,
    /// then the view, the log and the metrics.
    async fn publish(
        &self,
        mut inner: OwnedMutexGuard<Inner>,
        draft: Draft,
        placements: BTreeMap<BackendId, Placement>,
        cause: Cause,
        what: &str,
    ) -> Result<(), ChangeError> {
        inner.settings = draft.settings.clone();
        inner.services = draft.services.clone();
        inner.backends = draft.backends.clone();
        // Until the push below succeeds (a panic in it included), the kernel is behind.
        inner.kernel_in_sync = false;
        let specs = draft.specs(&placements);
        let view = Arc::new(draft.view(&placements));
        let (views, metrics, what) = (self.view.clone(), self.metrics.clone(), what.to_owned());
        // The kernel first, then the view: the gateway and the health checker see a change
        // only once the kernel has it. A task of its own, holding the lock throughout: a
        // caller that stops waiting (an admin request whose client went away) cancels none of
        // it, and the next change waits for it.
        let pushed = tokio::spawn(async move {
            let report = inner.kernel.apply(draft.settings, specs).await;
            let previous_view = views.send_replace(view.clone());
            update_metrics(&metrics, &previous_view, &view, cause);
            inner.placements = placements;
            inner.kernel_in_sync = report.is_ok();
            match report {
                Ok(report) => {
                    info!(
                        cause = cause.name(),
                        services = report.services,
                        backends = report.backends,
                        flows_purged = report.flows_purged,
                        "{what}; {}",
                        describe_rotation(&view)
                    );
                    Ok(())
                }
                Err(error) => {
                    error!(
                        cause = cause.name(),
                        "{what}: the kernel tables were not updated (retried every second): \
                         {error}"
                    );
                    Err(error)
                }
            }
        });
        finish(pushed).await?;
        Ok(())
    }
}

fn update_metrics(metrics: &Metrics, before: &ClusterView, view: &ClusterView, cause: Cause) {
    metrics.backend_set_changes.inc();
    // Backends and services that went away stop being reported.
    for service in &before.services {
        for backend in &service.backends {
            if view.backend(backend.backend.id).is_none() {
                metrics.backend_in_rotation.remove(&BackendLabels {
                    service: service.name.clone(),
                    backend: backend.backend.def.address.to_string(),
                });
            }
        }
        if !view
            .services
            .iter()
            .any(|s| s.service.id == service.service.id)
        {
            let labels = ServiceLabels {
                service: service.name.clone(),
            };
            metrics.service_fallback.remove(&labels);
            metrics.service_serving_tier.remove(&labels);
        }
    }
    for service in &view.services {
        let mut fallback = false;
        for backend in &service.backends {
            let labels = BackendLabels {
                service: service.name.clone(),
                backend: backend.backend.def.address.to_string(),
            };
            metrics
                .backend_in_rotation
                .get_or_create(&labels)
                .set(i64::from(backend.state == State::Up));
            fallback |= backend.fallback;
            let previous = before.backend(backend.backend.id).map(|(_, b)| b.state);
            if previous != Some(backend.state) {
                metrics
                    .backend_transitions
                    .get_or_create(&TransitionLabels {
                        service: labels.service,
                        backend: labels.backend,
                        to: backend.state.name().to_owned(),
                        cause: cause.name().to_owned(),
                    })
                    .inc();
            }
        }
        let labels = ServiceLabels {
            service: service.name.clone(),
        };
        metrics
            .service_fallback
            .get_or_create(&labels)
            .set(i64::from(fallback));
        metrics
            .service_serving_tier
            .get_or_create(&labels)
            .set(service.serving_tier.map_or(-1, i64::from));
        let was = before
            .services
            .iter()
            .find(|s| s.service.id == service.service.id)
            .and_then(|s| s.serving_tier);
        match (was, service.serving_tier) {
            (Some(was), Some(0)) if was > 0 => {
                info!(service = %service.name, "served by its primaries (tier 0) again");
            }
            (was, Some(tier)) if tier > 0 && was != Some(tier) => warn!(
                service = %service.name,
                "no backend of a lower tier is up: served by backup tier {tier}"
            ),
            _ => {}
        }
        if fallback {
            error!(
                service = %service.name,
                "every backend of the service is unhealthy: keeping the least bad in rotation"
            );
        }
    }
}

impl Inner {
    fn draft(&self) -> Draft {
        Draft {
            settings: self.settings.clone(),
            services: self.services.clone(),
            backends: self.backends.clone(),
        }
    }

    fn placements_now(&self) -> BTreeMap<BackendId, Placement> {
        self.draft().placements(&self.health)
    }
}

/// A copy of the set being changed.
pub(crate) struct Draft {
    pub settings: LbSettings,
    pub services: BTreeMap<ServiceId, Service>,
    pub backends: BTreeMap<BackendId, Backend>,
}

impl Draft {
    /// Takes the records as the store holds them; the settings stay.
    fn take_stored(&mut self, services: Vec<Service>, backends: Vec<Backend>) {
        self.services = services.into_iter().map(|s| (s.id, s)).collect();
        self.backends = backends.into_iter().map(|b| (b.id, b)).collect();
    }

    fn placements(&self, health: &HealthSnapshot) -> BTreeMap<BackendId, Placement> {
        self.services
            .values()
            .flat_map(|service| rotation::place(service, self.backends_of(service.id), health))
            .collect()
    }

    fn backends_of(&self, service: ServiceId) -> impl Iterator<Item = &Backend> {
        self.backends
            .values()
            .filter(move |backend| backend.service == service)
    }

    fn specs(&self, placements: &BTreeMap<BackendId, Placement>) -> Vec<ServiceSpec> {
        self.services
            .values()
            .map(|service| ServiceSpec {
                vip: service.def.vip,
                port: service.def.port,
                protocol: service.def.protocol,
                mode: service.def.mode,
                backends: self
                    .backends_of(service.id)
                    .map(|backend| BackendSpec {
                        addr: backend.def.address,
                        weight: backend.def.weight,
                        state: placements
                            .get(&backend.id)
                            .map_or(State::Up, |p| p.state)
                            .kernel(),
                    })
                    .collect(),
            })
            .collect()
    }

    /// What the kernel would refuse of this draft with these placements.
    fn kernel_problems(&self, placements: &BTreeMap<BackendId, Placement>) -> Vec<SpecProblem> {
        dataplane::validate_services(&self.settings, &self.specs(placements))
    }

    fn view(&self, placements: &BTreeMap<BackendId, Placement>) -> ClusterView {
        ClusterView {
            services: self
                .services
                .values()
                .map(|service| ServiceView {
                    service: service.clone(),
                    name: service.def.key().to_string(),
                    serving_tier: rotation::serving_tier(self.backends_of(service.id), placements),
                    backends: self
                        .backends_of(service.id)
                        .map(|backend| {
                            let placement =
                                placements.get(&backend.id).copied().unwrap_or(Placement {
                                    state: State::Up,
                                    fallback: false,
                                    saturated: false,
                                });
                            BackendView {
                                backend: backend.clone(),
                                state: placement.state,
                                fallback: placement.fallback,
                                saturated: placement.saturated,
                            }
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    /// The joining backends whose nodes have risen: ready to enter.
    fn risen(&self, health: &HealthSnapshot) -> Vec<BackendId> {
        self.backends
            .values()
            .filter(|backend| backend.def.admin == AdminState::Joining)
            .filter(|backend| {
                self.services
                    .get(&backend.service)
                    .is_some_and(|service| rotation::has_risen(service, backend, health))
            })
            .map(|backend| backend.id)
            .collect()
    }

    /// Enables joining backend `id`, whose node has passed `rise` checks in a row.
    fn admit(&mut self, tx: &mut Tx<'_>, id: BackendId, rise: u32) -> Result<(), ChangeError> {
        let backend = self
            .backends
            .get_mut(&id)
            .ok_or_else(|| not_found_backend(id))?;
        backend.def.admin = AdminState::Enabled;
        tx.update_backend(id, &backend.def)?;
        tx.record_event(
            "backend.joined",
            &format!("backend {id} ({})", backend.def.address),
            &format!("passed {rise} health checks in a row: in rotation"),
        )?;
        Ok(())
    }

    fn service_name(&self, id: ServiceId) -> String {
        self.services
            .get(&id)
            .map_or_else(|| format!("service {id}"), |s| s.def.key().to_string())
    }

    pub(crate) fn add_service(
        &mut self,
        tx: &mut Tx<'_>,
        def: ServiceDef,
        origin: Origin,
    ) -> Result<Service, ChangeError> {
        let key = def.key();
        if self.services.values().any(|s| s.def.key() == key) {
            return Err(ChangeError::Conflict {
                what: format!("service {key}"),
            });
        }
        let id = tx.insert_service(&def, origin)?;
        tx.record_event(
            "service.added",
            &format!("service {id} ({key})"),
            origin_name(origin),
        )?;
        let service = Service { id, def, origin };
        self.services.insert(id, service.clone());
        Ok(service)
    }

    pub(crate) fn remove_service(
        &mut self,
        tx: &mut Tx<'_>,
        id: ServiceId,
        cause: Cause,
    ) -> Result<Service, ChangeError> {
        let service = self
            .services
            .remove(&id)
            .ok_or_else(|| ChangeError::NotFound {
                what: format!("service {id}"),
            })?;
        tx.delete_service(id)?;
        self.backends.retain(|_, backend| backend.service != id);
        tx.record_event(
            "service.removed",
            &format!("service {id} ({})", service.def.key()),
            cause.name(),
        )?;
        Ok(service)
    }

    pub(crate) fn update_service(
        &mut self,
        tx: &mut Tx<'_>,
        id: ServiceId,
        def: ServiceDef,
    ) -> Result<Service, ChangeError> {
        let service = self
            .services
            .get_mut(&id)
            .ok_or_else(|| ChangeError::NotFound {
                what: format!("service {id}"),
            })?;
        tx.update_service(id, &def)?;
        tx.record_event(
            "service.changed",
            &format!("service {id} ({})", def.key()),
            &format!("mode {:?}, check {:?}", def.mode, def.check),
        )?;
        service.def = def;
        Ok(service.clone())
    }

    pub(crate) fn add_backend(
        &mut self,
        tx: &mut Tx<'_>,
        service: ServiceId,
        def: BackendDef,
        origin: Origin,
    ) -> Result<Backend, ChangeError> {
        self.add_backend_by(tx, service, def, origin, origin_name(origin))
    }

    /// [`Draft::add_backend`], its event naming `by` as who added it.
    fn add_backend_by(
        &mut self,
        tx: &mut Tx<'_>,
        service: ServiceId,
        def: BackendDef,
        origin: Origin,
        by: &str,
    ) -> Result<Backend, ChangeError> {
        let owner = self
            .services
            .get(&service)
            .ok_or_else(|| ChangeError::NotFound {
                what: format!("service {service}"),
            })?;
        validate_weight(def.weight)?;
        validate_tier(def.tier)?;
        if def.address.is_ipv4() != owner.def.vip.is_ipv4() {
            return Err(ChangeError::Invalid {
                field: "address".to_owned(),
                reason: format!(
                    "{} is of another address family than the service's VIP {}",
                    def.address, owner.def.vip
                ),
            });
        }
        if def.address.port() == 0 || def.rpc_port == 0 {
            return Err(ChangeError::Invalid {
                field: if def.rpc_port == 0 {
                    "rpc_port"
                } else {
                    "address"
                }
                .to_owned(),
                reason: "port 0 is not a port a node can listen on".to_owned(),
            });
        }
        if self
            .backends_of(service)
            .any(|backend| backend.def.address == def.address)
        {
            return Err(ChangeError::Conflict {
                what: format!("backend {} in service {}", def.address, owner.def.key()),
            });
        }
        let id = tx.insert_backend(service, &def, origin)?;
        tx.record_event(
            "backend.added",
            &format!(
                "backend {id} ({}) of {}",
                def.address,
                self.service_name(service)
            ),
            by,
        )?;
        let backend = Backend {
            id,
            service,
            def,
            origin,
        };
        self.backends.insert(id, backend.clone());
        Ok(backend)
    }

    /// Removes backend `id`, its event naming `by` as who removed it.
    pub(crate) fn remove_backend(
        &mut self,
        tx: &mut Tx<'_>,
        id: BackendId,
        cause: Cause,
        by: &str,
    ) -> Result<Backend, ChangeError> {
        let backend = self
            .backends
            .remove(&id)
            .ok_or_else(|| not_found_backend(id))?;
        tx.delete_backend(id)?;
        tx.record_event(
            "backend.removed",
            &format!("backend {id} ({})", backend.def.address),
            by,
        )?;
        if backend.origin == Origin::Config && cause == Cause::Api {
            warn!(
                backend = %backend.def.address,
                "removed a backend the config file declares: it comes back at the next start \
                 unless it is removed from the file too"
            );
        }
        Ok(backend)
    }

    /// Changes backend `id`'s definition, its event naming `by` as who changed it.
    pub(crate) fn update_backend(
        &mut self,
        tx: &mut Tx<'_>,
        id: BackendId,
        by: &str,
        change: impl Fn(&mut BackendDef),
    ) -> Result<Backend, ChangeError> {
        let backend = self
            .backends
            .get_mut(&id)
            .ok_or_else(|| not_found_backend(id))?;
        let before = backend.def.clone();
        change(&mut backend.def);
        if backend.def != before {
            tx.update_backend(id, &backend.def)?;
            tx.record_event(
                "backend.changed",
                &format!("backend {id} ({})", backend.def.address),
                &format!(
                    "{by}: weight {} -> {}, admin {:?} -> {:?}, rpc port {} -> {}, tier {} -> {}",
                    before.weight,
                    backend.def.weight,
                    before.admin,
                    backend.def.admin,
                    before.rpc_port,
                    backend.def.rpc_port,
                    before.tier,
                    backend.def.tier
                ),
            )?;
        }
        Ok(backend.clone())
    }
}

/// An event per backend whose effective state changed.
fn record_transitions(
    tx: &mut Tx<'_>,
    draft: &Draft,
    before: &BTreeMap<BackendId, Placement>,
    after: &BTreeMap<BackendId, Placement>,
    cause: Cause,
) -> Result<(), StoreError> {
    for (id, placement) in after {
        let previous = before.get(id).map(|p| p.state);
        if previous.is_some() && previous != Some(placement.state) {
            let address = draft.backends.get(id).map(|b| b.def.address.to_string());
            tx.record_event(
                "backend.state",
                &format!("backend {id} ({})", address.unwrap_or_default()),
                &format!(
                    "{} -> {}{} ({})",
                    previous.map_or("new", State::name),
                    placement.state.name(),
                    if placement.fallback {
                        " (fallback)"
                    } else {
                        ""
                    },
                    cause.name()
                ),
            )?;
        }
    }
    Ok(())
}

/// An event per service whose serving tier changed.
fn record_serving_tiers(
    tx: &mut Tx<'_>,
    draft: &Draft,
    before: &ClusterView,
    after: &BTreeMap<BackendId, Placement>,
    cause: Cause,
) -> Result<(), StoreError> {
    for service in draft.services.values() {
        // A new service (or the start) has none: its backends' events tell.
        let Some(was) = before
            .services
            .iter()
            .find(|known| known.service.id == service.id)
            .map(|known| known.serving_tier)
        else {
            continue;
        };
        let is = rotation::serving_tier(draft.backends_of(service.id), after);
        if was != is {
            tx.record_event(
                "service.tier",
                &format!("service {} ({})", service.id, service.def.key()),
                &format!(
                    "served by {} -> {} ({})",
                    describe_tier(was),
                    describe_tier(is),
                    cause.name()
                ),
            )?;
        }
    }
    Ok(())
}

/// `tier 0`, or `no tier` when no backend is in rotation.
fn describe_tier(tier: Option<Tier>) -> String {
    tier.map_or_else(|| "no tier".to_owned(), |tier| format!("tier {tier}"))
}

fn origin_name(origin: Origin) -> &'static str {
    match origin {
        Origin::Config => "config",
        Origin::Api => "api",
    }
}

fn not_found_backend(id: BackendId) -> ChangeError {
    ChangeError::NotFound {
        what: format!("backend {id}"),
    }
}

/// Weights are relative shares; a cap keeps one backend from crowding the table's fill.
pub const MAX_WEIGHT: u32 = 1000;

/// Tiers are an order of preference (primaries, another region, a fallback site, …): a few
/// suffice, and a cap catches a typo such as a weight given as a tier.
pub const MAX_TIER: Tier = 9;

pub fn validate_tier(tier: Tier) -> Result<(), ChangeError> {
    if tier <= MAX_TIER {
        Ok(())
    } else {
        Err(ChangeError::Invalid {
            field: "tier".to_owned(),
            reason: format!(
                "{tier} is not a tier: use 0 (primary) to {MAX_TIER}, lower tiers first"
            ),
        })
    }
}

pub fn validate_weight(weight: u32) -> Result<(), ChangeError> {
    if (1..=MAX_WEIGHT).contains(&weight) {
        Ok(())
    } else {
        Err(ChangeError::Invalid {
            field: "weight".to_owned(),
            reason: format!("{weight} is not a weight: use 1 to {MAX_WEIGHT}"),
        })
    }
}

/// `svc 10.0.0.1:80/tcp: 2 up, 1 draining; …` for the change log line.
fn describe_rotation(view: &ClusterView) -> String {
    view.services
        .iter()
        .map(|service| {
            let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
            for backend in &service.backends {
                *counts.entry(backend.state.name()).or_default() += 1;
            }
            let counts: Vec<String> = counts
                .iter()
                .map(|(state, count)| format!("{count} {state}"))
                .collect();
            let counts = if counts.is_empty() {
                "no backends".to_owned()
            } else {
                counts.join(", ")
            };
            format!("{}: {counts}", service.name)
        })
        .collect::<Vec<_>>()
        .join("; ")
}
