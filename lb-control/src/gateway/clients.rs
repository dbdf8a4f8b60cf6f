//! The WebSocket clients of each node: how many a node holds now (what a rolling upgrade waits
//! for while it drains the node), and closing them all with 1012 so they reconnect elsewhere
//! (what it does when the wait runs out).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
};

use futures_util::StreamExt;
use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;

/// Open sessions per node (its RPC endpoint), and the node whose clients are told to go.
pub struct NodeClients {
    open: Mutex<HashMap<SocketAddr, usize>>,
    closing: broadcast::Sender<SocketAddr>,
}

impl Default for NodeClients {
    fn default() -> Self {
        NodeClients {
            open: Mutex::default(),
            // Closes are rare (one per node per rollout step); a session that lags behind
            // sixteen of them is closed at its node's next one.
            closing: broadcast::channel(16).0,
        }
    }
}

impl NodeClients {
    /// WebSocket clients on `node` now.
    pub fn count(&self, node: SocketAddr) -> usize {
        self.lock().get(&node).copied().unwrap_or(0)
    }

    /// Tells every session on `node` to close (1012); returns how many there were.
    pub fn close(&self, node: SocketAddr) -> usize {
        let open = self.count(node);
        let _ = self.closing.send(node);
        open
    }

    /// A session on `node`: counted until the seat drops.
    pub fn seat(self: &Arc<Self>, node: SocketAddr) -> Seat {
        *self.lock().entry(node).or_insert(0) += 1;
        Seat {
            clients: self.clone(),
            node,
            closing: BroadcastStream::new(self.closing.subscribe()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<SocketAddr, usize>> {
        self.open
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// One session's place on its node.
pub struct Seat {
    clients: Arc<NodeClients>,
    node: SocketAddr,
    /// A stream, which stays registered with the channel between the session's calls of
    /// [`Seat::told_to_close`] (a receiver's `recv()` registers anew at each).
    closing: BroadcastStream<SocketAddr>,
}

impl Seat {
    /// Resolves when the session's node's clients are told to close.
    pub async fn told_to_close(&mut self) {
        while let Some(told) = self.closing.next().await {
            if told.is_ok_and(|node| node == self.node) {
                return;
            }
        }
        std::future::pending().await
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        let mut open = self.clients.lock();
        if let Some(count) = open.get_mut(&self.node) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.node);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sessions_are_counted_per_node_and_only_their_node_closes_them() {
        let clients = Arc::new(NodeClients::default());
        let (a, b): (SocketAddr, SocketAddr) = (
            "10.0.0.1:9944".parse().unwrap(),
            "10.0.0.2:9944".parse().unwrap(),
        );
        let mut on_a = clients.seat(a);
        let on_b = clients.seat(b);
        assert_eq!((clients.count(a), clients.count(b)), (1, 1));
        assert_eq!(clients.close(b), 1);
        assert_eq!(clients.close(a), 1);
        // A's session hears its own node's close, past B's.
        tokio::time::timeout(std::time::Duration::from_secs(1), on_a.told_to_close())
            .await
            .expect("told");
        drop((on_a, on_b));
        assert_eq!((clients.count(a), clients.count(b)), (0, 0));
    }
}
