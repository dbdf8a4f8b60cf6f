//! The backup's half: takes the master's batches on the private link, checks each one's
//! signature, and writes its flows into this host's flow table. A newer connection replaces
//! an older one (a master that restarted, or a connection whose master died silently); a host
//! that is master takes no flows.
//!
//! A master that hands its addresses over (`Message::Handover`) gets second chance here: for
//! its drain time, the segments of gateway connections this host has no socket for go to it.

use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use lb_common::flow::FlowKey;
use tokio::{
    io::AsyncWriteExt as _,
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinHandle,
};
use tracing::{debug, info, warn};

use super::{
    FlowSyncError, unix_seconds_now,
    wire::{self, Batch, BatchKind, CHALLENGE_LEN, Direction, Message, Signer},
};
use crate::{
    dataplane::{FlowTable, SecondChanceMap, SecondChanceMode, read_second_chance_packets},
    ha::{Role, RoleState},
    metrics::Metrics,
};

/// What the receiver works with besides its connections.
pub struct Receiving {
    pub secret: Arc<[u8]>,
    pub pin_dir: PathBuf,
    pub role: watch::Receiver<RoleState>,
    pub metrics: Arc<Metrics>,
    /// The gateway's listening address, whose connections a handing-over master finishes.
    pub gateway: Option<SocketAddr>,
    /// Counts the connections a master opened here: the other host became master.
    pub masters: watch::Sender<u64>,
}

/// Takes connections on `listener` until the process ends.
pub async fn run(listener: TcpListener, receiving: Receiving) {
    let receiving = Arc::new(receiving);
    let mut current: Option<JoinHandle<()>> = None;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                warn!("flow sync: accepting a connection: {error}");
                continue;
            }
        };
        // Only a master connects: whatever this host is, the other one is master now.
        receiving.masters.send_modify(|count| *count += 1);
        if receiving.role.borrow().role == Role::Master {
            info!("flow sync: refused {peer}: this host is master and takes no flows");
            continue;
        }
        if let Some(previous) = current.take() {
            previous.abort();
        }
        let receiving = receiving.clone();
        current = Some(tokio::spawn(async move {
            info!("flow sync: the master at {peer} connected");
            receiving.metrics.ha_flow_sync_connected.set(1);
            let ended = receive_while_backup(stream, peer, &receiving).await;
            receiving.metrics.ha_flow_sync_connected.set(0);
            match ended {
                Ok(()) => info!("flow sync: this host is master now; closed the link from {peer}"),
                Err(error) => warn!("flow sync: the master at {peer} disconnected: {error}"),
            }
        }));
    }
}

/// Installs batches until this host becomes master (`Ok`) or the connection fails.
async fn receive_while_backup(
    mut stream: TcpStream,
    peer: SocketAddr,
    receiving: &Receiving,
) -> Result<(), FlowSyncError> {
    let challenge: [u8; CHALLENGE_LEN] = rand::random();
    stream.write_all(&challenge).await?;
    let mut from_master = Signer::new(&receiving.secret, &challenge, Direction::ToBackup);
    let mut to_master = Signer::new(&receiving.secret, &challenge, Direction::ToMaster);
    let mut applier = Applier {
        table: FlowTable::open(&receiving.pin_dir)?,
        snapshot: HashSet::new(),
    };
    let mut role = receiving.role.clone();
    let metrics = &receiving.metrics;
    loop {
        let message = tokio::select! {
            changed = role.changed() => {
                if changed.is_err() || role.borrow().role == Role::Master {
                    return Ok(());
                }
                continue;
            }
            message = wire::read_message(&mut stream, &mut from_master) => message?,
        };
        let batch = match message {
            Message::Batch(batch) => batch,
            Message::Handover { drain } => {
                arm_second_chance(receiving, peer.ip(), drain)?;
                wire::write_message(&mut stream, &mut to_master, &Message::HandoverReady).await?;
                continue;
            }
            Message::HandoverReady => {
                return Err(wire::WireError::Malformed("a backup's answer from the master").into());
            }
        };
        metrics
            .ha_flows_received
            .inc_by((batch.changed.len() + batch.ended.len()) as u64);
        let (back, installed) = tokio::task::spawn_blocking(move || {
            let installed = applier.apply(&batch);
            (applier, installed)
        })
        .await?;
        applier = back;
        metrics.ha_flows_installed.inc_by(installed? as u64);
        metrics.ha_flow_sync_last_success.set(unix_seconds_now());
    }
}

/// For `drain`, sends the segments of gateway connections this host has no socket for to the
/// master at `peer`, which hands its addresses over; logs when that ends.
fn arm_second_chance(
    receiving: &Receiving,
    peer: IpAddr,
    drain: Duration,
) -> Result<(), FlowSyncError> {
    let Some(gateway) = receiving.gateway else {
        info!(
            "flow sync: the master at {peer} hands over; this host has no gateway to give second chance for"
        );
        return Ok(());
    };
    SecondChanceMap::open(&receiving.pin_dir, SecondChanceMode::Handover)?
        .arm_for(gateway, peer, drain)?;
    let pin_dir = receiving.pin_dir.clone();
    let before =
        read_second_chance_packets(&pin_dir, SecondChanceMode::Handover).unwrap_or_default();
    info!(
        "ha: the master at {peer} hands over: for {drain:?}, segments to the gateway ({gateway}) of \
         connections this host has no socket for go to it (second chance)"
    );
    // The entry ends itself at its deadline (the XDP program reads it), also if this process
    // does not live that long.
    tokio::spawn(async move {
        tokio::time::sleep(drain).await;
        let sent = read_second_chance_packets(&pin_dir, SecondChanceMode::Handover)
            .unwrap_or_default()
            .saturating_sub(before);
        info!("ha: second chance to {peer} ended; {sent} packets went there");
    });
    Ok(())
}

/// This host's flow table and the snapshot being received.
struct Applier {
    table: FlowTable,
    /// The flows a snapshot named so far: when its last part arrives, every other flow goes.
    snapshot: HashSet<FlowKey>,
}

impl Applier {
    /// Ended flows out, new and changed ones in; returns how many were installed.
    fn apply(&mut self, batch: &Batch) -> Result<usize, FlowSyncError> {
        self.table.remove(&batch.ended)?;
        let report = self.table.install(&batch.changed, batch.sender_clock_ns)?;
        if let BatchKind::Snapshot { last } = batch.kind {
            self.snapshot
                .extend(batch.changed.iter().map(|flow| flow.key));
            if last {
                let stale = self.table.retain(&self.snapshot)?;
                debug!(
                    flows = self.snapshot.len(),
                    stale, "flow sync: a full resync from the master is in"
                );
                self.snapshot.clear();
            }
        }
        if report.skipped > 0 {
            warn!(
                skipped = report.skipped,
                "flow sync: flows of a service or backend this host does not have (yet); the \
                 next full resync brings them"
            );
        }
        Ok(report.installed)
    }
}
