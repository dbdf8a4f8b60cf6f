//! The backup's half: takes the master's batches on the private link, checks each one's
//! signature, and writes its flows into this host's flow table. A newer connection replaces
//! an older one (a master that restarted, or a connection whose master died silently); a host
//! that is master takes no flows.

use std::{collections::HashSet, path::PathBuf, sync::Arc};

use lb_common::flow::FlowKey;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinHandle,
};
use tracing::{debug, info, warn};

use super::{
    FlowSyncError, unix_seconds_now,
    wire::{Batch, BatchKind, CHALLENGE_LEN, MAX_BATCH_LEN, Signer, TAG_LEN, WireError},
};
use crate::{
    dataplane::FlowTable,
    ha::{Role, RoleState},
    metrics::Metrics,
};

/// Takes connections on `listener` until the process ends.
pub async fn run(
    listener: TcpListener,
    secret: Arc<[u8]>,
    pin_dir: PathBuf,
    role: watch::Receiver<RoleState>,
    metrics: Arc<Metrics>,
) {
    let mut current: Option<JoinHandle<()>> = None;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                warn!("flow sync: accepting a connection: {error}");
                continue;
            }
        };
        if role.borrow().role == Role::Master {
            info!("flow sync: refused {peer}: this host is master and takes no flows");
            continue;
        }
        if let Some(previous) = current.take() {
            previous.abort();
        }
        let (secret, pin_dir, role, metrics) = (
            secret.clone(),
            pin_dir.clone(),
            role.clone(),
            metrics.clone(),
        );
        current = Some(tokio::spawn(async move {
            info!("flow sync: the master at {peer} connected");
            metrics.ha_flow_sync_connected.set(1);
            let ended = receive_while_backup(stream, &secret, pin_dir, role, &metrics).await;
            metrics.ha_flow_sync_connected.set(0);
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
    secret: &[u8],
    pin_dir: PathBuf,
    mut role: watch::Receiver<RoleState>,
    metrics: &Metrics,
) -> Result<(), FlowSyncError> {
    let challenge: [u8; CHALLENGE_LEN] = rand::random();
    stream.write_all(&challenge).await?;
    let mut signer = Signer::new(secret, &challenge);
    let mut applier = Applier {
        table: FlowTable::open(&pin_dir)?,
        snapshot: HashSet::new(),
    };
    loop {
        let batch = tokio::select! {
            changed = role.changed() => {
                if changed.is_err() || role.borrow().role == Role::Master {
                    return Ok(());
                }
                continue;
            }
            batch = read_batch(&mut stream, &mut signer) => batch?,
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

/// Reads the next frame and checks its signature; a frame that fails ends the connection.
async fn read_batch(stream: &mut TcpStream, signer: &mut Signer) -> Result<Batch, FlowSyncError> {
    let len = stream.read_u32().await? as usize;
    if len > MAX_BATCH_LEN {
        return Err(WireError::TooLong(len).into());
    }
    let mut bytes = vec![0; len];
    stream.read_exact(&mut bytes).await?;
    let mut tag = [0; TAG_LEN];
    stream.read_exact(&mut tag).await?;
    signer.verify(&bytes, &tag)?;
    Ok(Batch::decode(&bytes)?)
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
