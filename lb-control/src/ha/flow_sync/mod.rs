//! L4 flow sync: the master of a pair streams its tracked flows to the backup over the private
//! link, so the NAT and DSR connections through the VIPs carry on after a takeover.
//!
//! The master walks its flow table every 250 ms (`sender::WALK_INTERVAL`) and sends the
//! flows that are new or changed since the walk before and the keys of those that ended, in
//! signed batches (`wire`); on every connection and every 30 s it sends the whole table, which
//! the backup then holds exactly (a restarted backup catches up so). The backup writes them into
//! its own pinned maps (`dataplane::FlowTable`: backend by address, its clock by age). A flow
//! is on the backup within a walk interval and the time to send it; a younger one, at a
//! takeover, is not, and its next packet on the new master is a new flow there (see the README).
//!
//! Only a master sends and only a backup (or fault) installs: the role comes from
//! keepalived's hooks ([`Ha`](super::Ha)). A host that becomes master closes the link it was
//! receiving on; once the old master returns as backup, the new one sends it its table.
//!
//! A planned handover ([`FlowSync::hand_over`], see `ha::handover`) goes over the same link:
//! the whole table at once, then a request that the backup give this host's gateway
//! connections second chance while they drain, which the backup confirms.

mod receiver;
mod sender;
mod wire;

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot, watch},
};

use self::{receiver::Receiving, sender::HandoverRequest};
use super::{RoleState, settings::FlowSyncSection};
use crate::{dataplane::DataplaneError, metrics::Metrics};

#[derive(Debug, thiserror::Error)]
pub enum FlowSyncError {
    #[error("ha.flow_sync.secret_file: {0}")]
    Secret(String),
    #[error("ha.flow_sync.listen: cannot listen on {listen}: {source}")]
    Listen {
        listen: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("timed out {0}")]
    Timeout(&'static str),
    #[error(
        "the flow sync link to the backup at {peer} is down: is lb-control running there, with \
         the same [ha] flow_sync secret?"
    )]
    NotConnected { peer: SocketAddr },
    #[error("the handover on the flow sync link failed: {0}")]
    Handover(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Wire(#[from] wire::WireError),
    #[error("this host's flow table: {0}")]
    Dataplane(#[from] DataplaneError),
    #[error("a flow table task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// How long a handover waits for a flow sync link that is down (the sender reconnects every
/// second), and how often it asks again.
const LINK_WAIT: Duration = Duration::from_secs(5);
const LINK_POLL: Duration = Duration::from_millis(200);

/// The running flow sync, for a planned handover.
#[derive(Clone)]
pub struct FlowSync {
    handovers: mpsc::Sender<HandoverRequest>,
    masters: watch::Receiver<u64>,
}

impl FlowSync {
    /// Sends the whole flow table to the backup now, then asks it to send the segments of
    /// this host's gateway connections back here (second chance) for `drain`; Ok once the
    /// backup has installed the table and armed second chance.
    ///
    /// A link that is down (the sender reconnects every second) is waited for up to
    /// [`LINK_WAIT`].
    pub async fn hand_over(&self, drain: Duration) -> Result<(), FlowSyncError> {
        let deadline = tokio::time::Instant::now() + LINK_WAIT;
        loop {
            let (done, answer) = oneshot::channel();
            let stopped = || FlowSyncError::Handover("the flow sync has stopped".to_owned());
            self.handovers
                .send(HandoverRequest { drain, done })
                .await
                .map_err(|_| stopped())?;
            match answer.await.map_err(|_| stopped())? {
                Err(FlowSyncError::NotConnected { .. })
                    if tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(LINK_POLL).await;
                }
                answered => return answered,
            }
        }
    }

    /// Counts the connections the other host opened here as master: it changes when the other
    /// host becomes master (it sends its flows then).
    pub fn masters(&self) -> watch::Receiver<u64> {
        self.masters.clone()
    }
}

/// Starts both halves: the receiver listens at once (bound here, so a taken port fails the
/// start), the sender runs whenever this host is master. `gateway` is the gateway's listening
/// address, whose connections a handing-over master gets second chance for.
pub async fn start(
    section: &FlowSyncSection,
    pin_dir: PathBuf,
    role: watch::Receiver<RoleState>,
    metrics: Arc<Metrics>,
    gateway: Option<SocketAddr>,
) -> Result<FlowSync, FlowSyncError> {
    let secret: Arc<[u8]> = section.read_secret().map_err(FlowSyncError::Secret)?.into();
    let listener =
        TcpListener::bind(section.listen)
            .await
            .map_err(|source| FlowSyncError::Listen {
                listen: section.listen,
                source,
            })?;
    let (masters, masters_seen) = watch::channel(0);
    tokio::spawn(receiver::run(
        listener,
        Receiving {
            secret: secret.clone(),
            pin_dir: pin_dir.clone(),
            role: role.clone(),
            metrics: metrics.clone(),
            gateway,
            masters,
        },
    ));
    let (handovers, requests) = mpsc::channel(1);
    tokio::spawn(sender::run(
        section.peer,
        secret,
        pin_dir,
        role,
        metrics,
        requests,
    ));
    Ok(FlowSync {
        handovers,
        masters: masters_seen,
    })
}

/// Now as Unix seconds: what `*_timestamp_seconds` gauges hold.
fn unix_seconds_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |since| since.as_secs_f64())
}
