//! The waits of a node's lifecycle, shared by `backend drain --wait`, `node join --wait`,
//! `node leave` and `rollout`: until a drained backend is empty, and until a joining backend
//! is in rotation. Each prints its progress as it changes.

use std::time::Duration;

use anyhow::bail;
use lb_control::{
    admin_client::AdminClient, api::model::BackendInfo, backends::State, health::Verdict,
    model::BackendId,
};
use tokio::time::Instant;

/// How often a drain's wait looks at the backend's connections.
const DRAIN_POLL: Duration = Duration::from_millis(500);
/// How often a join's wait looks at the backend's state (a check passes every second or so),
/// and a drain's at its closed clients leaving.
const STATE_POLL: Duration = Duration::from_millis(200);
/// How long closed WebSocket clients may take to leave: the gateway's grace for their calls in
/// flight, and a margin.
const CLIENTS_LEAVE: Duration = Duration::from_secs(3);

/// Waits until backend `id` holds no open flow and no WebSocket client, printing the counts
/// whenever they change; past `timeout`, closes its WebSocket clients (1012: they reconnect to
/// another node). Returns the open flows left: 0 once it is empty.
pub async fn until_empty(
    client: &AdminClient,
    id: BackendId,
    timeout: Duration,
) -> anyhow::Result<u64> {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        let now = client.backend_connections(id).await?;
        if last != Some(now) {
            println!(
                "backend {id}: {} open flows, {} WebSocket clients",
                now.flows, now.websocket_clients
            );
            last = Some(now);
        }
        if now.flows == 0 && now.websocket_clients == 0 {
            println!("backend {id} is drained");
            return Ok(0);
        }
        if Instant::now() >= deadline {
            let closed = client.close_backend_clients(id).await?.closed;
            println!(
                "backend {id}: {} elapsed; closing {closed} WebSocket clients (1012: they \
                 reconnect to another node)",
                humantime::format_duration(timeout)
            );
            // Each closes once its calls in flight are answered (the gateway gives it 2 s):
            // the node serves them until then.
            let gone_by = Instant::now() + CLIENTS_LEAVE;
            let mut left = client.backend_connections(id).await?;
            while left.websocket_clients > 0 && Instant::now() < gone_by {
                tokio::time::sleep(STATE_POLL).await;
                left = client.backend_connections(id).await?;
            }
            println!(
                "backend {id}: {} open flows, {} WebSocket clients",
                left.flows, left.websocket_clients
            );
            return Ok(left.flows);
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
}

/// Waits until joining backend `id` is up (its node passed its health checks), printing its
/// checks as they pass; fails past `timeout` naming what its node's last check found.
pub async fn until_up(
    client: &AdminClient,
    id: BackendId,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        let backend = client.backend(id).await?;
        let progress = (
            backend.state,
            backend.health.as_ref().map(|health| health.passes),
        );
        match backend.state {
            State::Up => {
                println!("backend {id} is in rotation");
                return Ok(());
            }
            State::Joining if last != Some(progress) => {
                println!("backend {id}: {}", describe_joining(&backend));
                last = Some(progress);
            }
            State::Joining => {}
            other => bail!(
                "backend {id} is {} now, not joining: someone else changed it",
                other.name()
            ),
        }
        if Instant::now() >= deadline {
            bail!(
                "backend {id} is still joining after {}: {}; it enters by itself once its \
                 checks pass",
                humantime::format_duration(timeout),
                describe_joining(&backend)
            );
        }
        tokio::time::sleep(STATE_POLL).await;
    }
}

/// `joining: 1 check passed in a row`, `joining: connect: Connection refused`, `joining: not
/// checked yet`.
pub fn describe_joining(backend: &BackendInfo) -> String {
    let Some(health) = backend
        .health
        .as_ref()
        .filter(|health| health.verdict != Verdict::Unknown)
    else {
        return format!("{}: not checked yet", backend.state.name());
    };
    let passes = match health.passes {
        1 => "1 check passed in a row".to_owned(),
        passes => format!("{passes} checks passed in a row"),
    };
    match health.reason.as_deref().or(health.last_error.as_deref()) {
        Some(reason) if health.passes == 0 => format!("{}: {reason}", backend.state.name()),
        _ => format!("{}: {passes}", backend.state.name()),
    }
}
