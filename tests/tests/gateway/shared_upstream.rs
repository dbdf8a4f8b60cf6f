//! A client under test on the same, single, upstream connection to the node as a hundred
//! other WebSocket clients, which hold storage subscriptions and keep calling while it runs:
//! what the papi and subxt tests share.

use std::time::Duration;

use futures_util::future::join_all;
use lb_tests::sim_node::{BlockNumber, SimNodeHandle};
use serde_json::{Value, json};

use super::{setup::*, websocket::WsTlsClient};

pub const BLOCK_TIME: Duration = Duration::from_millis(200);
/// The other clients.
pub const CLIENTS: usize = 100;

/// One node behind the gateway with a single upstream connection to it, which carries the
/// hundred clients' subscriptions.
pub struct SharedUpstream {
    pub setup: Setup,
    /// The node's WebSockets before the clients came (the gateway's chain follower).
    websockets_before: usize,
    clients: Vec<WsTlsClient>,
    subscriptions: Vec<Value>,
    /// Rounds of calls the clients made while the client under test ran.
    rounds_beside: usize,
}

impl SharedUpstream {
    pub async fn start() -> SharedUpstream {
        let setup = Setup::start_with_blocks(1, BLOCK_TIME, |section| {
            section.max_upstream_connections_per_node = 1;
            // The hundred clients' subscriptions and the follow of the client under test.
            section.max_subscriptions_per_upstream = 128;
            // The hundred clients and the client under test, all with one key.
            section.max_connections_per_key = 128;
        })
        .await;
        let websockets_before = follower_websockets(&setup.nodes[0]).await;
        let (clients, subscriptions) =
            super::upstream_pool::storage_subscribers(&setup, CLIENTS).await;
        SharedUpstream {
            setup,
            websockets_before,
            clients,
            subscriptions,
            rounds_beside: 0,
        }
    }

    pub fn node(&self) -> &SimNodeHandle {
        &self.setup.nodes[0]
    }

    /// The gateway's `wss://` URL with the key in its path.
    pub fn url(&self) -> String {
        format!(
            "wss://127.0.0.1:{}/{}",
            self.setup.gateway.local_addr().port(),
            self.setup.secret
        )
    }

    /// Runs `client` to its end while every other client keeps calling and receiving its
    /// notifications, each getting only its own; returns what `client` returned.
    pub async fn run_beside<T: Send + 'static>(
        &mut self,
        client: impl Future<Output = T> + Send + 'static,
    ) -> T {
        let node = &self.setup.nodes[0];
        let client = tokio::spawn(client);
        let mut rounds = 0;
        while !client.is_finished() {
            join_all(self.clients.iter_mut().zip(&self.subscriptions).map(
                |(other, subscription)| async move {
                    let answer = other.call(UNCACHED_READ, json!([])).await;
                    assert_eq!(answer["result"], node.peer_id(), "{answer}");
                    let change = other.notification().await;
                    assert_is_own_system_number_change(node, subscription, &change);
                },
            ))
            .await;
            rounds += 1;
        }
        self.rounds_beside = rounds;
        client.await.expect("the client under test")
    }

    /// The other clients were served while the client under test ran, the node carried them
    /// all on one WebSocket, and each client's subscription was the node's own, none served by
    /// the gateway alone.
    pub fn assert_all_served_on_one_upstream_connection(&self) {
        assert!(
            self.rounds_beside >= 2,
            "the other clients made {} rounds of calls while the client under test ran",
            self.rounds_beside
        );
        let node = self.node();
        // Counted as WebSockets: the gateway's HTTP pool has connections of its own, which
        // carry the calls its response cache may answer when it cannot yet (`rpc_methods`).
        assert!(
            node.peak_websockets() <= self.websockets_before + 1,
            "the node saw {} WebSockets at once: {} of the chain follower, then one for the \
             client under test and the {CLIENTS} others",
            node.peak_websockets(),
            self.websockets_before
        );
        assert_eq!(node.request_count("state_subscribeStorage"), CLIENTS as u64);
    }
}

/// Checks that `change` is a `state_storage` notification of `subscription` whose
/// `System.Number` is the number of the block it names on `node`.
fn assert_is_own_system_number_change(node: &SimNodeHandle, subscription: &Value, change: &Value) {
    assert_eq!(change["method"], "state_storage", "{change}");
    assert_eq!(
        change["params"]["subscription"], *subscription,
        "another client's notification: {change}"
    );
    let result = &change["params"]["result"];
    let value = result["changes"][0][1]
        .as_str()
        .and_then(|value| value.strip_prefix("0x"))
        .and_then(|value| hex::decode(value).ok())
        .and_then(|bytes| <[u8; 4]>::try_from(bytes).ok())
        .unwrap_or_else(|| panic!("no System.Number in {change}"));
    let number = BlockNumber::from_le_bytes(value);
    assert_eq!(
        result["block"],
        json!(node.block_hash(number)),
        "System.Number is the number of the block it was read at: {change}"
    );
}
