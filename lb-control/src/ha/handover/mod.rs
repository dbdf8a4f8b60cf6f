//! `lb-control ha handover`: the master gives the floating addresses to the other host of its
//! pair without failing a request, for its own OS update.
//!
//! 1. **Syncing.** The whole L4 flow table goes to the other host over the flow sync link, and
//!    the other host arms second chance (GitHub GLB's model): for the drain, its XDP program
//!    sends the segments of gateway connections it has no socket for back here, over the
//!    private link. It confirms both before anything moves.
//! 2. **Releasing.** A routing rule makes the gateway's addresses local to what arrives on the
//!    private link (the standing second chance's, [`super::second_chance`]: it is in place
//!    already unless it could not be put there at start), then lb-control writes `1` into its
//!    keepalived track file
//!    (`<state_dir>/ha-handover`, `track_file` in keepalived.conf): keepalived goes to FAULT,
//!    removes the addresses and sends a priority-0 advert, and the other host takes them at
//!    once. The handover waits until they are gone here and the other host's flow sync
//!    connects here as master.
//! 3. **Draining.** The gateway finishes its connections as an upgrade does (`Connection:
//!    close` on each HTTP/1.1 answer, GOAWAY on HTTP/2, WebSockets closed with 1012 once their
//!    calls in flight are answered); their segments reach it through second chance, and it
//!    answers the clients directly. It keeps accepting: a connection whose handshake began here
//!    completes here, and finishes after its first answer. L4 flows carry on at the other host
//!    with the flows of step 1.
//! 4. **Handed over** once no connection is left (or the drain time ran out). The drain mode
//!    stays until the other host's second chance ends, then the gateway serves as a backup's
//!    does. The routing rule stays: it is the pair's standing one.
//!
//! lb-control keeps running: the host is in FAULT (keepalived) with its program attached, its
//! gateway bound and its flow table fed by the new master, so the pair stays a pair until the
//! host goes down for its update. keepalived's `init_file 0 overwrite` clears the track file
//! when keepalived starts again (after the reboot); `echo 0 > <state_dir>/ha-handover` makes
//! the host a backup again without one.
//!
//! A failure before the addresses moved undoes what was done (the track file) and leaves this
//! host master.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{error, info, warn};
use utoipa::ToSchema;

use super::{
    Ha, Role,
    flow_sync::FlowSync,
    local_addresses,
    second_chance::{RouteError, StandingSecondChance},
};

/// The drain time when the operator names none.
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(10);
/// The longest drain time: past it, a connection is a client holding on for ever.
pub const MAX_DRAIN: Duration = Duration::from_secs(600);
/// How long keepalived may take to remove the addresses after the track file changed.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the other host may take to connect here as master after the addresses left.
const PEER_MASTER_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the handover looks at the addresses and the open connections.
const POLL: Duration = Duration::from_millis(20);

/// The track file's name in the state directory.
const TRACK_FILE: &str = "ha-handover";

/// Where lb-control tells keepalived to give the addresses up: `<state_dir>/ha-handover`.
pub fn track_file(state_dir: &Path) -> PathBuf {
    state_dir.join(TRACK_FILE)
}

/// The gateway as a handover drains it.
pub trait Connections: Send + Sync {
    /// Finishes every connection (and every new one after its first answer), still accepting.
    fn drain(&self);
    /// Serves new connections as usual again.
    fn serve_again(&self);
    /// The connections open now.
    fn open(&self) -> u32;
}

/// The gateway a handover drains: its connections, and the second chance that brings their
/// segments back here (None without a private link, `[ha] flow_sync`).
pub struct DrainedGateway {
    pub connections: Arc<dyn Connections>,
    pub second_chance: Option<Arc<StandingSecondChance>>,
}

/// Where a handover is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The flow table goes to the other host, which arms second chance.
    Syncing,
    /// keepalived gives the floating addresses up; the other host takes them.
    Releasing,
    /// The gateway's connections finish.
    Draining,
    /// No connection left, or the drain time ran out with `open_connections` left.
    HandedOver,
    /// Stopped before the addresses moved (see `error`); this host is master as before.
    Failed,
}

impl Phase {
    pub fn is_over(self) -> bool {
        matches!(self, Phase::HandedOver | Phase::Failed)
    }
}

/// A handover's progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandoverState {
    pub phase: Phase,
    pub started: SystemTime,
    pub drain: Duration,
    /// The gateway's open connections (at the last look, while draining or after).
    pub open_connections: u32,
    /// From the start until the other host had the flows and armed second chance.
    pub synced_after: Option<Duration>,
    /// ... until the floating addresses left this host.
    pub released_after: Option<Duration>,
    /// ... until the other host connected here as master.
    pub peer_master_after: Option<Duration>,
    /// ... until the last connection finished.
    pub drained_after: Option<Duration>,
    pub error: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error(
        "this lb-control has no [ha] section, so it is standalone: there is no other host to \
         hand over to"
    )]
    NotConfigured,
    #[error(
        "a handover needs [ha] flow_sync: the flows, and the request for second chance, go to \
         the other host over it"
    )]
    NoFlowSync,
    #[error("this host is {0}: hand over from the master")]
    NotMaster(Role),
    #[error("a handover is under way already ({0:?})")]
    UnderWay(Phase),
    #[error("a drain time of {0:?} is out of range: give 1 s to 10 min")]
    DrainOutOfRange(Duration),
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error("the other host did not take the handover: {0}")]
    Sync(#[source] super::flow_sync::FlowSyncError),
    #[error("writing keepalived's track file {path}: {source}")]
    TrackFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "keepalived kept the floating addresses {RELEASE_TIMEOUT:?} after lb-control wrote 1 \
         into {path}: track that file in keepalived.conf (`track_file`, see \
         dist/keepalived/keepalived.conf.example); the handover was undone"
    )]
    NotReleased { path: PathBuf },
}

/// The handover of this lb-control: one at a time.
pub struct Handover {
    ha: Arc<Ha>,
    flow_sync: Option<FlowSync>,
    gateway: Option<DrainedGateway>,
    track_file: PathBuf,
    state: watch::Sender<Option<HandoverState>>,
}

impl Handover {
    pub fn new(
        ha: Arc<Ha>,
        flow_sync: Option<FlowSync>,
        gateway: Option<DrainedGateway>,
        state_dir: &Path,
    ) -> Arc<Handover> {
        Arc::new(Handover {
            ha,
            flow_sync,
            gateway,
            track_file: track_file(state_dir),
            state: watch::Sender::new(None),
        })
    }

    /// The last handover's progress, if there was one.
    pub fn state(&self) -> Option<HandoverState> {
        self.state.borrow().clone()
    }

    /// Starts a handover with `drain` for the gateway's connections, once the checks that need
    /// no other host pass; its progress is in [`Handover::state`].
    pub fn begin(self: &Arc<Self>, drain: Duration) -> Result<HandoverState, HandoverError> {
        let section = self.ha.section().ok_or(HandoverError::NotConfigured)?;
        let role = self.ha.current().role;
        if role != Role::Master {
            return Err(HandoverError::NotMaster(role));
        }
        if !(Duration::from_secs(1)..=MAX_DRAIN).contains(&drain) {
            return Err(HandoverError::DrainOutOfRange(drain));
        }
        let flow_sync = self.flow_sync.clone().ok_or(HandoverError::NoFlowSync)?;
        let second_chance = self
            .gateway
            .as_ref()
            .and_then(|gateway| gateway.second_chance.clone());
        if let Some(second_chance) = &second_chance {
            second_chance.check_reverse_path()?;
        }
        let state = HandoverState {
            phase: Phase::Syncing,
            started: SystemTime::now(),
            drain,
            open_connections: self.open_connections(),
            synced_after: None,
            released_after: None,
            peer_master_after: None,
            drained_after: None,
            error: None,
        };
        let begun = self.state.send_if_modified(|current| {
            if current.as_ref().is_some_and(|state| !state.phase.is_over()) {
                return false;
            }
            *current = Some(state.clone());
            true
        });
        if !begun {
            let phase = self.state().map_or(Phase::Syncing, |state| state.phase);
            return Err(HandoverError::UnderWay(phase));
        }
        info!(drain = ?drain, "ha: handing over to the other host of the pair");
        self.ha
            .record("ha.handover", format!("handing over (drain {drain:?})"));
        let handover = self.clone();
        let floating = section.floating_addresses.clone();
        tokio::spawn(async move {
            handover
                .run(flow_sync, second_chance, floating, drain)
                .await;
        });
        Ok(state)
    }

    async fn run(
        &self,
        flow_sync: FlowSync,
        second_chance: Option<Arc<StandingSecondChance>>,
        floating: Vec<IpAddr>,
        drain: Duration,
    ) {
        let started = Instant::now();
        let released = self
            .release(
                &flow_sync,
                second_chance.as_deref(),
                &floating,
                drain,
                started,
            )
            .await;
        let second_chance_ends = match released {
            Ok(released) => released,
            Err(error) => {
                error!("ha: the handover failed: {error}");
                self.ha
                    .record("ha.handover", format!("failed, still master: {error}"));
                self.update(|state| {
                    state.phase = Phase::Failed;
                    state.error = Some(error.to_string());
                });
                return;
            }
        };
        self.drain(started, second_chance_ends).await;
        if let Some(gateway) = &self.gateway {
            gateway.connections.serve_again();
        }
        info!("ha: second chance is over: the gateway serves new connections as a backup's does");
    }

    /// Steps 1 and 2: the flows and second chance to the other host, the addresses away.
    /// Returns when the other host's second chance ends.
    async fn release(
        &self,
        flow_sync: &FlowSync,
        second_chance: Option<&StandingSecondChance>,
        floating: &[IpAddr],
        drain: Duration,
        started: Instant,
    ) -> Result<Instant, HandoverError> {
        if let Some(second_chance) = second_chance {
            second_chance.ensure_routes().await?;
        }
        // The other host's second chance covers the release's waits and the drain.
        let window = RELEASE_TIMEOUT + PEER_MASTER_TIMEOUT + drain;
        let synced = flow_sync.hand_over(window).await;
        let second_chance_ends = Instant::now() + window;
        if let Err(error) = synced {
            return Err(HandoverError::Sync(error));
        }
        self.update(|state| {
            state.phase = Phase::Releasing;
            state.synced_after = Some(started.elapsed());
        });
        let mut masters = flow_sync.masters();
        masters.borrow_and_update();
        self.write_track_file("1")?;
        if !self.addresses_leave(floating).await {
            // keepalived does not follow the file: this host stays master, as it was.
            if let Err(error) = self.write_track_file("0") {
                warn!("ha: undoing the handover: {error}");
            }
            return Err(HandoverError::NotReleased {
                path: self.track_file.clone(),
            });
        }
        self.update(|state| state.released_after = Some(started.elapsed()));
        info!(after = ?started.elapsed(), "ha: the floating addresses left this host");
        // The other host connects to send its flows once it is master; clients reach it once
        // its gratuitous ARP is out, which comes before.
        match tokio::time::timeout(PEER_MASTER_TIMEOUT, masters.changed()).await {
            Ok(Ok(())) => self.update(|state| state.peer_master_after = Some(started.elapsed())),
            _ => warn!(
                "ha: the other host did not connect here as master within \
                 {PEER_MASTER_TIMEOUT:?}; draining anyway"
            ),
        }
        Ok(second_chance_ends)
    }

    /// Step 3: the gateway's connections finish, until none is left or second chance ends.
    async fn drain(&self, started: Instant, second_chance_ends: Instant) {
        self.update(|state| state.phase = Phase::Draining);
        let Some(gateway) = &self.gateway else {
            self.hand_over_done(started, 0);
            return;
        };
        gateway.connections.drain();
        info!("ha: draining the gateway's connections");
        let mut done = false;
        while Instant::now() < second_chance_ends {
            let open = gateway.connections.open();
            self.update(|state| state.open_connections = open);
            if open == 0 && !done {
                done = true;
                self.hand_over_done(started, 0);
            }
            tokio::time::sleep(POLL).await;
        }
        if !done {
            self.hand_over_done(started, gateway.connections.open());
        }
    }

    /// Records that the handover is done with `left` connections open.
    fn hand_over_done(&self, started: Instant, left: u32) {
        let took = started.elapsed();
        self.update(|state| {
            state.phase = Phase::HandedOver;
            state.open_connections = left;
            if left == 0 {
                state.drained_after = Some(took);
            }
        });
        if left == 0 {
            info!(after = ?took, "ha: handed over: every gateway connection finished");
        } else {
            warn!(
                after = ?took,
                "ha: handed over with {left} gateway connections still open at the end of the \
                 drain: they break when second chance ends"
            );
        }
        self.ha.record(
            "ha.handover",
            format!("handed over after {took:.1?}, {left} gateway connections left"),
        );
    }

    /// Waits until none of `floating` is on this host's interfaces; false after
    /// [`RELEASE_TIMEOUT`].
    async fn addresses_leave(&self, floating: &[IpAddr]) -> bool {
        let deadline = Instant::now() + RELEASE_TIMEOUT;
        while Instant::now() < deadline {
            match local_addresses() {
                Ok(held) if !floating.iter().any(|address| held.contains(address)) => {
                    return true;
                }
                Ok(_) => {}
                Err(error) => warn!("ha: listing this host's addresses: {error}"),
            }
            tokio::time::sleep(POLL).await;
        }
        false
    }

    fn write_track_file(&self, value: &str) -> Result<(), HandoverError> {
        std::fs::write(&self.track_file, format!("{value}\n")).map_err(|source| {
            HandoverError::TrackFile {
                path: self.track_file.clone(),
                source,
            }
        })
    }

    fn open_connections(&self) -> u32 {
        self.gateway
            .as_ref()
            .map_or(0, |gateway| gateway.connections.open())
    }

    fn update(&self, change: impl FnOnce(&mut HandoverState)) {
        self.state.send_modify(|state| {
            if let Some(state) = state {
                change(state);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::registry::Registry;

    use super::*;
    use crate::{ha::HaSection, metrics::Metrics, store::Store};

    /// A handover of an lb-control with `section` and no flow sync running, on a fresh store.
    fn handover(section: Option<HaSection>, dir: &Path) -> Arc<Handover> {
        let store = Store::open(&dir.join("state.db")).expect("store opens");
        let metrics = Arc::new(Metrics::register(&mut Registry::default()));
        Handover::new(Ha::start(section, store, metrics), None, None, dir)
    }

    #[tokio::test]
    async fn a_handover_that_cannot_be_is_refused_naming_why() {
        let dir = std::env::temp_dir().join(format!("lb-handover-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let refusal = |handover: &Arc<Handover>, drain| {
            handover.begin(drain).err().map(|error| error.to_string())
        };

        let standalone = handover(None, &dir);
        assert!(
            refusal(&standalone, DEFAULT_DRAIN)
                .is_some_and(|error| error.contains("no [ha] section")),
        );

        let section: HaSection =
            toml::from_str(r#"floating_addresses = ["192.0.2.10"]"#).expect("an [ha] section");
        let pair = handover(Some(section), &dir);
        // This host holds no floating address: it starts as backup.
        assert_eq!(
            refusal(&pair, DEFAULT_DRAIN).as_deref(),
            Some("this host is backup: hand over from the master")
        );
        pair.ha
            .take(Role::Master)
            .expect("a pair member takes a role");
        assert_eq!(
            refusal(&pair, Duration::from_secs(3600)).as_deref(),
            Some("a drain time of 3600s is out of range: give 1 s to 10 min")
        );
        assert!(
            refusal(&pair, DEFAULT_DRAIN)
                .is_some_and(|error| error.starts_with("a handover needs [ha] flow_sync")),
        );
        assert_eq!(pair.state(), None, "no handover began");
        std::fs::remove_dir_all(&dir).expect("removing the temp dir");
    }
}
