//! polkadot-api (papi, `polkadot-api` 2.2.2 running tests/js/papi-check.mjs on the machine's
//! Node.js) through the gateway's `wss://` endpoint with a key, trusting the test CA
//! (`NODE_EXTRA_CA_CERTS`), while a hundred other WebSocket clients hold subscriptions and make
//! calls over the same, single, upstream connection to the node.

use std::{ffi::OsStr, time::Duration};

use futures_util::future::join_all;
use lb_tests::{
    js_client::{
        assert_papi_summary_matches_node, assert_papi_took_the_new_spec, ensure_installed,
        run_with_env, summary_of,
    },
    lab::js_dir,
    sim_node::{BlockNumber, SimNodeHandle},
};
use serde_json::{Value, json};

use super::setup::*;

const BLOCK_TIME: Duration = Duration::from_millis(200);
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(60);
const CLIENTS: usize = 100;

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

#[tokio::test]
async fn papi_follows_the_chain_through_wss_while_a_hundred_clients_share_its_upstream_connection()
{
    ensure_installed("polkadot-api").await;
    let setup = Setup::start_with_blocks(1, BLOCK_TIME, |section| {
        section.max_upstream_connections_per_node = 1;
        // The hundred clients' subscriptions and papi's follow.
        section.max_subscriptions_per_upstream = 128;
        // The hundred clients and papi, all with one key.
        section.max_connections_per_key = 128;
    })
    .await;
    let node = &setup.nodes[0];
    let before = follower_websockets(node).await;

    let (mut clients, subscriptions) =
        super::upstream_pool::storage_subscribers(&setup, CLIENTS).await;

    let ca = setup.dir.0.join("ca.pem");
    std::fs::write(&ca, &setup.ca_pem).expect("CA written");
    let url = format!(
        "wss://127.0.0.1:{}/{}",
        setup.gateway.local_addr().port(),
        setup.secret
    );
    let papi = tokio::spawn(async move {
        run_with_env(
            "node",
            &["--experimental-websocket", "papi-check.mjs", &url],
            &[("NODE_EXTRA_CA_CERTS", OsStr::new(&ca))],
            &js_dir(),
            SCRIPT_TIMEOUT,
        )
        .await
    });

    // While papi runs, every client keeps calling and receiving its notifications, each
    // getting only its own.
    let mut rounds = 0;
    while !papi.is_finished() {
        join_all(
            clients
                .iter_mut()
                .zip(&subscriptions)
                .map(|(client, subscription)| async move {
                    let answer = client.call(UNCACHED_READ, json!([])).await;
                    assert_eq!(answer["result"], node.peer_id(), "{answer}");
                    let change = client.notification().await;
                    assert_is_own_system_number_change(node, subscription, &change);
                }),
        )
        .await;
        rounds += 1;
    }
    let summary = summary_of(&papi.await.expect("the papi task"));

    assert_papi_summary_matches_node(node, &summary);
    assert_papi_took_the_new_spec(node);
    assert!(
        rounds >= 2,
        "the clients made {rounds} rounds of calls while papi ran"
    );
    // Counted as WebSockets: the gateway's HTTP pool has connections of its own, which carry
    // the calls its response cache may answer when it cannot yet (papi's `rpc_methods`).
    assert!(
        node.peak_websockets() <= before + 1,
        "the node saw {} WebSockets at once: {before} of the chain follower, then one for \
         papi and the {CLIENTS} clients",
        node.peak_websockets()
    );
    // Each client's subscription was the node's own, none served by the gateway alone.
    assert_eq!(node.request_count("state_subscribeStorage"), CLIENTS as u64);
}
