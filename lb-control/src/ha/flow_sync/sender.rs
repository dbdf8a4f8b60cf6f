//! The master's half: walks its flow table every [`WALK_INTERVAL`] and sends the backup what
//! changed since the walk before, and the whole table on every (re)connection and every
//! [`FULL_RESYNC_INTERVAL`]. A planned handover ([`HandoverRequest`]) sends the whole table at
//! once and asks the backup for second chance.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use lb_common::flow::FlowKey;
use tokio::{
    io::AsyncReadExt as _,
    net::TcpStream,
    sync::{mpsc, oneshot, watch},
};
use tracing::{info, warn};

use super::{
    FlowSyncError, unix_seconds_now,
    wire::{
        self, Batch, BatchKind, CHALLENGE_LEN, Challenge, Direction, MAX_FLOWS_PER_BATCH, Message,
        Signer,
    },
};
use crate::{
    dataplane::{FlowTable, PortableFlow},
    ha::{Role, RoleState},
    metrics::Metrics,
};

/// How often the master walks its flows: a flow is on the backup this long (and the time to
/// send it) after it was opened.
pub const WALK_INTERVAL: Duration = Duration::from_millis(250);
/// How often the whole table goes again: mends whatever the backup lost meanwhile (flows it
/// skipped for a service or backend it did not have yet, its own LRU evictions).
const FULL_RESYNC_INTERVAL: Duration = Duration::from_secs(30);
/// How long the master waits for the backup to connect or to answer before it tries again.
const PEER_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a handover waits for the backup to have installed the whole table and armed
/// second chance.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(5);

/// A planned handover's request: send the whole table now, then ask the backup to give this
/// host's gateway connections second chance for `drain`; answered once it has.
pub struct HandoverRequest {
    pub drain: Duration,
    pub done: oneshot::Sender<Result<(), FlowSyncError>>,
}

/// The flows as the backup was last sent them.
#[derive(Debug, Default)]
pub struct SentFlows {
    flows: HashMap<FlowKey, PortableFlow>,
}

impl SentFlows {
    /// The batches that bring the backup from what it was sent to `now` (read at
    /// `clock_ns`): the flows that ended and those that are new or changed.
    pub fn delta(&mut self, now: Vec<PortableFlow>, clock_ns: u64) -> Vec<Batch> {
        let now: HashMap<FlowKey, PortableFlow> =
            now.into_iter().map(|flow| (flow.key, flow)).collect();
        let ended: Vec<FlowKey> = self
            .flows
            .keys()
            .filter(|key| !now.contains_key(key))
            .copied()
            .collect();
        let changed: Vec<PortableFlow> = now
            .values()
            .filter(|flow| self.flows.get(&flow.key) != Some(flow))
            .copied()
            .collect();
        self.flows = now;
        if ended.is_empty() && changed.is_empty() {
            return Vec::new();
        }
        let mut batches = Vec::new();
        let (mut ended, mut changed) = (ended.as_slice(), changed.as_slice());
        while !ended.is_empty() || !changed.is_empty() {
            let ended_here = ended.len().min(MAX_FLOWS_PER_BATCH);
            let changed_here = changed.len().min(MAX_FLOWS_PER_BATCH - ended_here);
            batches.push(Batch {
                kind: BatchKind::Delta,
                sender_clock_ns: clock_ns,
                ended: ended[..ended_here].to_vec(),
                changed: changed[..changed_here].to_vec(),
            });
            ended = &ended[ended_here..];
            changed = &changed[changed_here..];
        }
        batches
    }

    /// The whole table `now` in batches, the last marked so: the backup then drops every flow
    /// the snapshot did not name.
    pub fn snapshot(&mut self, now: Vec<PortableFlow>, clock_ns: u64) -> Vec<Batch> {
        let chunks: Vec<&[PortableFlow]> = if now.is_empty() {
            vec![&[]]
        } else {
            now.chunks(MAX_FLOWS_PER_BATCH).collect()
        };
        let parts = chunks.len();
        let batches = chunks
            .into_iter()
            .enumerate()
            .map(|(index, chunk)| Batch {
                kind: BatchKind::Snapshot {
                    last: index + 1 == parts,
                },
                sender_clock_ns: clock_ns,
                ended: Vec::new(),
                changed: chunk.to_vec(),
            })
            .collect();
        self.flows = now.into_iter().map(|flow| (flow.key, flow)).collect();
        batches
    }
}

/// Sends flows to `peer` whenever this host is master, until the process ends; takes
/// handover requests while connected.
pub async fn run(
    peer: SocketAddr,
    secret: Arc<[u8]>,
    pin_dir: PathBuf,
    mut role: watch::Receiver<RoleState>,
    metrics: Arc<Metrics>,
    mut requests: mpsc::Receiver<HandoverRequest>,
) {
    let mut unreachable_logged = false;
    loop {
        tokio::select! {
            master = role.wait_for(|state| state.role == Role::Master) => {
                if master.is_err() {
                    return;
                }
            }
            Some(request) = requests.recv() => {
                let _ = request.done.send(Err(FlowSyncError::NotConnected { peer }));
                continue;
            }
        }
        let stream = match connect(peer).await {
            Ok(stream) => stream,
            Err(error) => {
                if !unreachable_logged {
                    warn!(
                        "flow sync: cannot reach the backup at {peer}: {error}; retrying every {PEER_TIMEOUT:?}"
                    );
                    unreachable_logged = true;
                }
                refuse_waiting(&mut requests, peer);
                tokio::time::sleep(PEER_TIMEOUT).await;
                continue;
            }
        };
        unreachable_logged = false;
        info!("flow sync: connected to the backup at {peer}");
        metrics.ha_flow_sync_connected.set(1);
        let mut link = Link {
            stream,
            pin_dir: &pin_dir,
            metrics: &metrics,
            sent: SentFlows::default(),
            last_full: None,
        };
        let ended = link
            .send_while_master(&secret, &mut role, &mut requests)
            .await;
        metrics.ha_flow_sync_connected.set(0);
        match ended {
            Ok(()) => info!("flow sync: no longer master; disconnected from {peer}"),
            Err(error) => {
                warn!("flow sync: lost the backup at {peer}: {error}");
                refuse_waiting(&mut requests, peer);
                tokio::time::sleep(PEER_TIMEOUT).await;
            }
        }
    }
}

/// Answers the handover requests waiting now: there is no link to hand over on.
fn refuse_waiting(requests: &mut mpsc::Receiver<HandoverRequest>, peer: SocketAddr) {
    while let Ok(request) = requests.try_recv() {
        let _ = request.done.send(Err(FlowSyncError::NotConnected { peer }));
    }
}

async fn connect(peer: SocketAddr) -> Result<(TcpStream, Challenge), FlowSyncError> {
    let mut stream = tokio::time::timeout(PEER_TIMEOUT, TcpStream::connect(peer))
        .await
        .map_err(|_| FlowSyncError::Timeout("connecting"))??;
    stream.set_nodelay(true)?;
    let mut challenge = [0; CHALLENGE_LEN];
    tokio::time::timeout(PEER_TIMEOUT, stream.read_exact(&mut challenge))
        .await
        .map_err(|_| FlowSyncError::Timeout("waiting for its challenge"))??;
    Ok((stream, challenge))
}

/// One connection to the backup, and what it was sent.
struct Link<'a> {
    stream: (TcpStream, Challenge),
    pin_dir: &'a Path,
    metrics: &'a Metrics,
    sent: SentFlows,
    last_full: Option<Instant>,
}

impl Link<'_> {
    /// Walks and sends (and hands over, when asked) until this host is no longer master
    /// (`Ok`) or the connection fails.
    async fn send_while_master(
        &mut self,
        secret: &[u8],
        role: &mut watch::Receiver<RoleState>,
        requests: &mut mpsc::Receiver<HandoverRequest>,
    ) -> Result<(), FlowSyncError> {
        let challenge = self.stream.1;
        let mut signer = Signer::new(secret, &challenge, Direction::ToBackup);
        let mut answers = Signer::new(secret, &challenge, Direction::ToMaster);
        let mut table = FlowTable::open(self.pin_dir)?;
        let mut walks = tokio::time::interval(WALK_INTERVAL);
        walks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let handover = tokio::select! {
                changed = role.changed() => {
                    if changed.is_err() || role.borrow().role != Role::Master {
                        return Ok(());
                    }
                    continue;
                }
                _ = walks.tick() => None,
                Some(request) = requests.recv() => Some(request),
            };
            let Some(request) = handover else {
                table = self.send_walk(table, &mut signer, false).await?;
                continue;
            };
            // A failure ends the link: its state is unknown after a failed exchange.
            let fail = |request: HandoverRequest, error: FlowSyncError| {
                let reason = error.to_string();
                let _ = request.done.send(Err(error));
                FlowSyncError::Handover(reason)
            };
            table = match self.send_walk(table, &mut signer, true).await {
                Ok(walked) => walked,
                Err(error) => return Err(fail(request, error)),
            };
            match self
                .hand_over(request.drain, &mut signer, &mut answers)
                .await
            {
                Ok(()) => {
                    let _ = request.done.send(Ok(()));
                }
                Err(error) => return Err(fail(request, error)),
            }
        }
    }

    /// Reads the flow table and sends what changed, or the whole of it when due or `full`.
    async fn send_walk(
        &mut self,
        table: FlowTable,
        signer: &mut Signer,
        full: bool,
    ) -> Result<FlowTable, FlowSyncError> {
        // The walk is a few hundred system calls for a full table: off the async workers.
        let (table, read) = tokio::task::spawn_blocking(move || {
            let read = table.read_all();
            (table, read)
        })
        .await?;
        let (flows, clock_ns) = read?;
        let full_due = full
            || self
                .last_full
                .is_none_or(|at| at.elapsed() >= FULL_RESYNC_INTERVAL);
        let batches = if full_due {
            self.last_full = Some(Instant::now());
            self.sent.snapshot(flows, clock_ns)
        } else {
            self.sent.delta(flows, clock_ns)
        };
        for batch in batches {
            let flows = batch.changed.len() + batch.ended.len();
            wire::write_message(&mut self.stream.0, signer, &Message::Batch(batch)).await?;
            self.metrics.ha_flows_sent.inc_by(flows as u64);
        }
        self.metrics
            .ha_flow_sync_last_success
            .set(unix_seconds_now());
        Ok(table)
    }

    /// Asks the backup for second chance for `drain` (after the whole table) and waits for its
    /// answer.
    async fn hand_over(
        &mut self,
        drain: Duration,
        signer: &mut Signer,
        answers: &mut Signer,
    ) -> Result<(), FlowSyncError> {
        let stream = &mut self.stream.0;
        wire::write_message(stream, signer, &Message::Handover { drain }).await?;
        let answer = tokio::time::timeout(HANDOVER_TIMEOUT, wire::read_message(stream, answers))
            .await
            .map_err(|_| {
                FlowSyncError::Timeout("waiting for the backup to confirm the handover")
            })??;
        match answer {
            Message::HandoverReady => Ok(()),
            _ => Err(
                wire::WireError::Malformed("the backup answered a handover with a batch").into(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn flow(client_port: u16, backend_host: u8) -> PortableFlow {
        PortableFlow {
            key: FlowKey::from_v4([10, 0, 0, 2], [10, 0, 1, 10], client_port, 9944, 6),
            backend: SocketAddr::from((Ipv4Addr::new(10, 0, 10, backend_host), 9944)),
            nat_port_be: client_port.to_be(),
            hash: u32::from(client_port),
            flags: 0,
            last_seen_ns: 1,
        }
    }

    #[test]
    fn delta_names_ended_flows_and_new_or_changed_ones_only() {
        let mut sent = SentFlows::default();
        let first = sent.snapshot(vec![flow(1, 21), flow(2, 21), flow(3, 21)], 10);
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].kind, BatchKind::Snapshot { last: true });
        assert_eq!(first[0].changed.len(), 3);

        assert!(
            sent.delta(vec![flow(1, 21), flow(2, 21), flow(3, 21)], 20)
                .is_empty(),
            "nothing changed, nothing to send"
        );
        let mut closing = flow(2, 21);
        closing.flags = 1;
        let batches = sent.delta(vec![flow(1, 21), closing, flow(4, 22)], 30);
        assert_eq!(batches.len(), 1);
        let batch = &batches[0];
        assert_eq!(batch.kind, BatchKind::Delta);
        assert_eq!(batch.sender_clock_ns, 30);
        assert_eq!(batch.ended, [flow(3, 21).key]);
        let mut changed: Vec<u16> = batch
            .changed
            .iter()
            .map(|flow| u16::from_be(flow.key.src_port_be))
            .collect();
        changed.sort_unstable();
        assert_eq!(changed, [2, 4]);
    }

    #[test]
    fn large_tables_go_in_batches_of_at_most_the_limit() {
        let many: Vec<PortableFlow> = (0..20_000).map(|port| flow(port, 21)).collect();
        let mut sent = SentFlows::default();
        let snapshot = sent.snapshot(many, 1);
        let sizes: Vec<usize> = snapshot.iter().map(|batch| batch.changed.len()).collect();
        assert_eq!(sizes, [8192, 8192, 3616]);
        let lasts: Vec<BatchKind> = snapshot.iter().map(|batch| batch.kind).collect();
        assert_eq!(
            lasts,
            [
                BatchKind::Snapshot { last: false },
                BatchKind::Snapshot { last: false },
                BatchKind::Snapshot { last: true }
            ]
        );
        let delta = sent.delta(Vec::new(), 2);
        let ended: Vec<usize> = delta.iter().map(|batch| batch.ended.len()).collect();
        assert_eq!(ended, [8192, 8192, 3616]);

        let empty = SentFlows::default().snapshot(Vec::new(), 3);
        assert_eq!(
            empty.len(),
            1,
            "an empty table is one (last) snapshot batch"
        );
        assert_eq!(empty[0].kind, BatchKind::Snapshot { last: true });
    }
}
