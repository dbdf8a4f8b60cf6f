//! High availability of a pair: this lb-control's role, as keepalived reports it.
//!
//! keepalived moves the floating addresses (VRRP) and calls `lb-control ha notify
//! master|backup|fault` from its notify hooks; that reaches [`Ha::take`] through the admin
//! API. The role decides what this lb-control writes to the shared store, nothing else: a
//! backup keeps its XDP program attached with the current tables, its gateway bound to the
//! floating address (see `gateway::Bind`), its health checker, chain follower and cache warm,
//! so that taking over is only keepalived moving the addresses.
//!
//! What a backup does not write: the health transitions its own checker sees. Both hosts
//! check the same nodes and would record each transition twice, racing for the same etcd
//! transaction; the master's record is the cluster's. A backup still acts on them in its own
//! kernel tables and gateway rotation (health is never shared, each host judges for itself).
//! Nor does it delete expired blocklist entries from the store (it removes them from its own
//! kernel, as the master does): the master's deletion reaches it through the watch.
//! Operator writes through either host's admin API go to the shared store as always (etcd
//! orders them), and a role change is itself an event of the log.
//!
//! The role also decides the direction of the L4 flow sync ([`flow_sync`], with `[ha]
//! flow_sync`): a master sends its tracked flows to the other host, a backup installs them.
//!
//! A master hands its addresses over on purpose with [`handover`] (`lb-control ha handover`):
//! keepalived gives them up when lb-control writes its track file, and the gateway's
//! connections finish here through the other host's second chance. A crashed lb-control's
//! host sends its new gateway connections to the other host through the standing
//! [`second_chance`] until keepalived moves the addresses.
//!
//! Without an `[ha]` section an lb-control is standalone and records everything, as before.

mod addresses;
pub mod flow_sync;
pub mod handover;
pub mod second_chance;
pub mod settings;

use std::{
    fmt,
    sync::Arc,
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{error, info, warn};
use utoipa::ToSchema;

pub use self::{
    addresses::{local_addresses, set_ip_option},
    settings::HaSection,
};
use crate::{
    metrics::{Metrics, RoleLabels},
    store::{Store, StoreError},
};

/// How long a role hook may run before it is killed.
const HOOK_TIMEOUT: Duration = Duration::from_secs(30);

/// What this lb-control is in its pair.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// No `[ha]` section: one host, no pair.
    #[value(skip)]
    Standalone,
    /// Holds the floating addresses and serves.
    Master,
    /// Ready to take over: serves nothing (the addresses are elsewhere), records nothing.
    Backup,
    /// keepalived found this host unfit (a tracked interface down): as a backup.
    Fault,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Standalone, Role::Master, Role::Backup, Role::Fault];

    pub fn name(self) -> &'static str {
        match self {
            Role::Standalone => "standalone",
            Role::Master => "master",
            Role::Backup => "backup",
            Role::Fault => "fault",
        }
    }

    /// Whether this lb-control records what its own health checker sees in the store.
    pub fn records_health(self) -> bool {
        matches!(self, Role::Standalone | Role::Master)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The role now and since when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoleState {
    pub role: Role,
    pub since: SystemTime,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HaError {
    #[error(
        "this lb-control has no [ha] section, so it is standalone: add one (its \
         floating_addresses) to run it in a pair"
    )]
    NotConfigured,
    #[error("a pair member is master, backup or fault; standalone is for lb-controls without [ha]")]
    StandaloneInPair,
}

/// This lb-control's role: the one place that holds it.
pub struct Ha {
    section: Option<HaSection>,
    name: String,
    state: watch::Sender<RoleState>,
    store: Store,
    metrics: Arc<Metrics>,
}

impl Ha {
    /// Standalone without a section; in a pair, master when this host holds every floating
    /// address now (an lb-control restarted on the master), else backup until keepalived says
    /// otherwise.
    pub fn start(section: Option<HaSection>, store: Store, metrics: Arc<Metrics>) -> Arc<Ha> {
        let role = match &section {
            None => Role::Standalone,
            Some(section) => match local_addresses() {
                Ok(held) if section.floating_addresses.iter().all(|a| held.contains(a)) => {
                    Role::Master
                }
                Ok(_) => Role::Backup,
                Err(error) => {
                    warn!("ha: cannot list this host's addresses ({error}); starting as backup");
                    Role::Backup
                }
            },
        };
        let name = section
            .as_ref()
            .and_then(|section| section.name.clone())
            .unwrap_or_else(host_name);
        let ha = Arc::new(Ha {
            section,
            name,
            state: watch::Sender::new(RoleState {
                role,
                since: SystemTime::now(),
            }),
            store,
            metrics,
        });
        ha.show_in_metrics(role);
        if role != Role::Standalone {
            info!(name = %ha.name, role = %role, "ha: starting as {role}");
        }
        ha
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn section(&self) -> Option<&HaSection> {
        self.section.as_ref()
    }

    pub fn current(&self) -> RoleState {
        *self.state.borrow()
    }

    /// Wakes on every change of role.
    pub fn subscribe(&self) -> watch::Receiver<RoleState> {
        self.state.subscribe()
    }

    /// Takes `role` as keepalived reports it. A change is logged, counted, recorded in the
    /// event log and runs the role's hook; the same role again changes nothing (keepalived
    /// repeats itself after a restart).
    pub fn take(&self, role: Role) -> Result<RoleState, HaError> {
        let Some(section) = &self.section else {
            return Err(HaError::NotConfigured);
        };
        if role == Role::Standalone {
            return Err(HaError::StandaloneInPair);
        }
        let previous = self.current();
        if previous.role == role {
            return Ok(previous);
        }
        let now = RoleState {
            role,
            since: SystemTime::now(),
        };
        self.state.send_replace(now);
        self.show_in_metrics(role);
        info!(name = %self.name, from = %previous.role, to = %role, "ha: now {role}");
        self.record(
            "ha.role",
            format!("{} -> {role} (keepalived)", previous.role),
        );
        let hook = match role {
            Role::Master => section.hooks.master.clone(),
            Role::Backup => section.hooks.backup.clone(),
            Role::Fault => section.hooks.fault.clone(),
            Role::Standalone => None,
        };
        if let Some(hook) = hook {
            tokio::spawn(run_hook(hook, previous.role, role));
        }
        Ok(now)
    }

    fn show_in_metrics(&self, current: Role) {
        for role in Role::ALL {
            self.metrics
                .ha_role
                .get_or_create(&RoleLabels {
                    role: role.name().to_owned(),
                })
                .set(i64::from(role == current));
        }
    }

    /// Appends an event of this host (`kind`: `ha.role`, `ha.handover`) to the event log, off
    /// the caller's path: keepalived's hook gets its answer at once, and a store without quorum
    /// (a partitioned host) only costs the record.
    fn record(&self, kind: &'static str, detail: String) {
        let store = self.store.clone();
        let subject = format!("lb-control {}", self.name);
        tokio::task::spawn_blocking(move || {
            let written = store
                .write::<_, StoreError>(|tx| tx.record_event(kind, &subject, &detail).map(drop));
            if let Err(error) = written {
                error!("event log: recording {kind} of {subject} ({detail}): {error}");
            }
        });
    }
}

/// Runs a role hook to its end (or [`HOOK_TIMEOUT`]), logging how it went.
async fn run_hook(hook: Vec<String>, previous: Role, role: Role) {
    let Some((program, args)) = hook.split_first() else {
        return;
    };
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .env("LB_HA_ROLE", role.name())
        .env("LB_HA_PREVIOUS_ROLE", previous.name())
        .kill_on_drop(true);
    match tokio::time::timeout(HOOK_TIMEOUT, command.output()).await {
        Ok(Ok(output)) if output.status.success() => {
            info!(hook = %program, "ha: {role} hook ran");
        }
        Ok(Ok(output)) => error!(
            hook = %program,
            "ha: {role} hook failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ),
        Ok(Err(error)) => error!(hook = %program, "ha: {role} hook could not start: {error}"),
        Err(_) => error!(hook = %program, "ha: {role} hook killed after {HOOK_TIMEOUT:?}"),
    }
}

/// The host's name (`gethostname(2)`), or `lb-control` when it has none.
fn host_name() -> String {
    let mut buffer = [0u8; 256];
    // SAFETY: the buffer is writable for its length; gethostname NUL-terminates within it.
    let result = unsafe { libc::gethostname(buffer.as_mut_ptr().cast(), buffer.len()) };
    let name = std::ffi::CStr::from_bytes_until_nul(&buffer)
        .ok()
        .and_then(|name| name.to_str().ok())
        .filter(|name| result == 0 && !name.is_empty());
    name.unwrap_or("lb-control").to_owned()
}
