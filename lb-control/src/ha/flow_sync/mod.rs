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

mod receiver;
mod sender;
mod wire;

use std::{
    path::PathBuf,
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use tokio::{net::TcpListener, sync::watch};

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
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Wire(#[from] wire::WireError),
    #[error("this host's flow table: {0}")]
    Dataplane(#[from] DataplaneError),
    #[error("a flow table task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Starts both halves: the receiver listens at once (bound here, so a taken port fails the
/// start), the sender runs whenever this host is master.
pub async fn start(
    section: &FlowSyncSection,
    pin_dir: PathBuf,
    role: watch::Receiver<RoleState>,
    metrics: Arc<Metrics>,
) -> Result<(), FlowSyncError> {
    let secret: Arc<[u8]> = section.read_secret().map_err(FlowSyncError::Secret)?.into();
    let listener =
        TcpListener::bind(section.listen)
            .await
            .map_err(|source| FlowSyncError::Listen {
                listen: section.listen,
                source,
            })?;
    tokio::spawn(receiver::run(
        listener,
        secret.clone(),
        pin_dir.clone(),
        role.clone(),
        metrics.clone(),
    ));
    tokio::spawn(sender::run(section.peer, secret, pin_dir, role, metrics));
    Ok(())
}

/// Now as Unix seconds: what `*_timestamp_seconds` gauges hold.
fn unix_seconds_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |since| since.as_secs_f64())
}
