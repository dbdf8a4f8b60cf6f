//! WebSocket clients over the nodes' shared upstream connections: many clients, few node
//! connections (counted at the node), ids and subscriptions kept apart per client, the pool's
//! caps with their errors, chainHead_v1 operations on the connection of their follow,
//! `transaction_v1` operations stopped and `transactionWatch_v1` watches ended on theirs, and
//! subscriptions ended at the node when their client goes.

use std::time::Duration;

use futures_util::future::join_all;
use lb_tests::{poll, sim_node::faults::Fault};
use serde_json::{Value, json};

use super::{setup::*, websocket::WsTlsClient};

const BLOCK_TIME: Duration = Duration::from_millis(200);

/// `count` WebSocket clients, connected and subscribed to `System.Number` all at once, and
/// the subscription id each got.
pub async fn storage_subscribers(setup: &Setup, count: usize) -> (Vec<WsTlsClient>, Vec<Value>) {
    let mut clients = join_all((0..count).map(|_| setup.connect())).await;
    let subscriptions = join_all(
        clients
            .iter_mut()
            .map(|client| client.call("state_subscribeStorage", json!([[SYSTEM_NUMBER]]))),
    )
    .await
    .into_iter()
    .map(|answer| {
        assert!(answer["result"].is_string(), "{answer}");
        answer["result"].clone()
    })
    .collect();
    (clients, subscriptions)
}

#[tokio::test]
async fn a_hundred_clients_share_the_capped_upstream_connections_each_with_its_own_answers() {
    const CLIENTS: usize = 100;
    let setup = Setup::start_with_blocks(1, BLOCK_TIME, |section| {
        section.max_upstream_connections_per_node = 3;
        section.max_subscriptions_per_upstream = 40;
        section.max_connections_per_key = 1000;
        section.max_subscriptions_per_key = 1000;
    })
    .await;
    let node = &setup.nodes[0];
    // The gateway's chain follower has its own connection.
    let before = follower_websockets(node).await;

    // Every client subscribes at once; each gets its own subscription and its own changes.
    let (mut clients, subscriptions) = storage_subscribers(&setup, CLIENTS).await;
    for (client, subscription) in clients.iter_mut().zip(&subscriptions) {
        assert!(subscription.is_string(), "{subscription}");
        let change = client.notification().await;
        assert_eq!(change["method"], "state_storage", "{change}");
        assert_eq!(change["params"]["subscription"], *subscription, "{change}");
    }
    let mut distinct = subscriptions.clone();
    distinct.sort_by_key(Value::to_string);
    distinct.dedup();
    assert_eq!(distinct.len(), CLIENTS, "subscription ids are per client");

    // Calls in flight together come back to their own client under its own id.
    let answers = join_all(
        clients
            .iter_mut()
            .map(|client| client.call(UNCACHED_READ, json!([]))),
    )
    .await;
    for answer in &answers {
        assert_eq!(answer["result"], node.peer_id(), "{answer}");
    }

    // 3 connections × 40 places: 20 more subscriptions fit, the next is refused.
    for client in clients.iter_mut().take(20) {
        let answer = client
            .call("state_subscribeStorage", json!([[SYSTEM_NUMBER]]))
            .await;
        assert!(answer["result"].is_string(), "{answer}");
    }
    let refused = clients[0]
        .call("state_subscribeStorage", json!([[SYSTEM_NUMBER]]))
        .await;
    assert_eq!(refused["error"]["code"], -32000, "{refused}");
    let message = refused["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("as many subscriptions"), "{refused}");

    assert!(
        node.peak_websockets() <= before + 3,
        "the node saw {} WebSockets at once: {before} before the clients, a pool of 3",
        node.peak_websockets()
    );
    assert!(
        setup
            .metrics_text()
            .contains("lb_gateway_upstream_connections{node=")
    );

    // Clients that go end their subscriptions at the node.
    let unsubscribed = node.request_count("state_unsubscribeStorage");
    let leaving = clients.split_off(CLIENTS / 2);
    drop(leaving);
    poll::until(
        "the gone clients' subscriptions are ended at the node",
        || async {
            node.request_count("state_unsubscribeStorage") >= unsubscribed + (CLIENTS / 2) as u64
        },
    )
    .await;
    // The others still get their changes.
    let change = clients[0].notification().await;
    assert_eq!(change["method"], "state_storage", "{change}");
}

#[tokio::test]
async fn chain_head_operations_go_on_the_connection_of_their_follow() {
    let setup = Setup::start_with_blocks(1, BLOCK_TIME, |section| {
        section.max_upstream_connections_per_node = 2;
    })
    .await;
    let node = &setup.nodes[0];
    let before = follower_websockets(node).await;
    // A node takes 4 follows per connection: 8 clients fill the pool of 2.
    let mut clients = join_all((0..8).map(|_| setup.connect())).await;
    for client in &mut clients {
        let follow = client.call("chainHead_v1_follow", json!([false])).await;
        let subscription = follow["result"].clone();
        assert!(subscription.is_string(), "{follow}");
        let initialized = client.notification().await;
        assert_eq!(initialized["params"]["result"]["event"], "initialized");
        let finalized = initialized["params"]["result"]["finalizedBlockHashes"][0].clone();
        // Known only on the connection that holds the follow: a wrong connection answers
        // with an error or null.
        let header = client
            .call("chainHead_v1_header", json!([subscription, finalized]))
            .await;
        assert!(header["result"].is_string(), "{header}");
        let unpinned = client
            .call("chainHead_v1_unpin", json!([subscription, finalized]))
            .await;
        assert_eq!(unpinned["result"], Value::Null, "{unpinned}");
    }
    let ninth = clients[0].call("chainHead_v1_follow", json!([false])).await;
    assert_eq!(ninth["error"]["code"], -32000, "{ninth}");
    assert!(
        node.peak_websockets() <= before + 2,
        "the node saw {} WebSockets at once: {before} before the clients, a pool of 2",
        node.peak_websockets()
    );

    // An unfollow frees its place for another client.
    let follows = node.request_count("chainHead_v1_unfollow");
    drop(clients.remove(0));
    poll::until("the gone client's follow ends at the node", || async {
        node.request_count("chainHead_v1_unfollow") > follows
    })
    .await;
    let again = clients[0].call("chainHead_v1_follow", json!([false])).await;
    assert!(again["result"].is_string(), "{again}");
}

#[tokio::test]
async fn transactions_broadcast_and_watched_over_shared_connections_end_on_their_own() {
    /// A decodable extrinsic: length 3, format version 4 unsigned, then call bytes.
    const EXTRINSIC: &str = "0x0c040300";
    const CLIENTS: usize = 6;
    let setup = Setup::start_with_blocks(1, BLOCK_TIME, |section| {
        section.max_upstream_connections_per_node = 2;
        // 4 + 2 broadcasts: both connections carry some.
        section.max_subscriptions_per_upstream = 4;
    })
    .await;
    let node = &setup.nodes[0];
    let before = follower_websockets(node).await;
    let mut clients = join_all((0..CLIENTS).map(|_| setup.connect())).await;

    let mut operations = Vec::new();
    for client in &mut clients {
        let broadcast = client
            .call("transaction_v1_broadcast", json!([EXTRINSIC]))
            .await;
        assert!(broadcast["result"].is_string(), "{broadcast}");
        operations.push(broadcast["result"].clone());
    }
    assert_eq!(
        node.peak_websockets(),
        before + 2,
        "the broadcasts filled one connection and went on to the next"
    );
    // A node knows an operation only on the connection that started it: a stop anywhere else
    // is "Invalid operation id".
    for (client, operation) in clients.iter_mut().zip(&operations) {
        let stopped = client.call("transaction_v1_stop", json!([operation])).await;
        assert_eq!(stopped["result"], Value::Null, "{stopped}");
        assert!(stopped.get("error").is_none(), "{stopped}");
    }

    for client in &mut clients {
        let watched = client
            .call("transactionWatch_v1_submitAndWatch", json!([EXTRINSIC]))
            .await;
        let subscription = watched["result"].clone();
        assert!(subscription.is_string(), "{watched}");
        let event = client.notification().await;
        assert_eq!(event["method"], "transactionWatch_v1_watchEvent", "{event}");
        assert_eq!(event["params"]["subscription"], subscription, "{event}");
        assert_eq!(event["params"]["result"], json!({ "event": "validated" }));
        let unwatched = client
            .call("transactionWatch_v1_unwatch", json!([subscription]))
            .await;
        assert_eq!(unwatched["result"], true, "{unwatched}");
    }
    assert!(node.peak_websockets() <= before + 2);
}

#[tokio::test]
async fn a_read_a_hanging_node_does_not_answer_goes_to_the_next_node_after_the_timeout() {
    let setup = Setup::start_with(2, |section| {
        section.upstream_timeout = Duration::from_millis(500);
    })
    .await;
    let mut client = setup.connect().await;
    let first = client.call(UNCACHED_READ, json!([])).await["result"].clone();
    let hanging = setup
        .nodes
        .iter()
        .find(|node| first == node.peer_id())
        .expect("the client's node");
    let other = setup
        .nodes
        .iter()
        .find(|node| first != node.peer_id())
        .expect("the other node");
    // The node keeps its connection open and answers nothing in time.
    hanging.set_fault(lb_tests::sim_node::faults::Fault::Slow { delay_ms: 5_000 });
    // Over WebSocket and over HTTP, whose calls ride the same links.
    let started = std::time::Instant::now();
    let over_websocket = (
        client.call(UNCACHED_READ, json!([])).await,
        started.elapsed(),
    );
    let started = std::time::Instant::now();
    let over_http = (
        setup.call(UNCACHED_READ, json!([])).await,
        started.elapsed(),
    );
    for (answer, took) in [over_websocket, over_http] {
        assert_eq!(answer["result"], other.peer_id(), "{answer}");
        assert!(
            took < Duration::from_secs(4),
            "the read waited for the hanging node: {took:?}"
        );
    }
    // A call that may not be sent twice gets the timeout instead, on either.
    let refused = client.call("author_pendingExtrinsics", json!([])).await;
    let over_http = setup.call("author_pendingExtrinsics", json!([])).await;
    for refused in [refused, over_http] {
        assert_eq!(refused["error"]["code"], -32000, "{refused}");
        let message = refused["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("no answer within"), "{refused}");
    }
}

#[tokio::test]
async fn upstream_connections_a_burst_opened_close_once_idle_and_calls_go_on() {
    let setup = Setup::start_with(1, |section| {
        section.upstream_idle_timeout = Duration::from_millis(600);
    })
    .await;
    let node = &setup.nodes[0];
    let before = follower_websockets(node).await;

    // A burst of HTTP calls a slow node keeps in flight together opens more than one upstream
    // connection.
    node.set_fault(Fault::Slow { delay_ms: 200 });
    let answers = join_all((0..64).map(|_| setup.call(UNCACHED_READ, json!([])))).await;
    node.clear_faults();
    for answer in &answers {
        assert_eq!(answer["result"], node.peer_id(), "{answer}");
    }
    assert!(
        node.peak_websockets() > before + 1,
        "64 calls at once rode one connection: {} at the peak, {before} before",
        node.peak_websockets()
    );

    // Once quiet, the node gets its connections back, down to the chain follower's.
    poll::until(
        "the idle upstream connections close at the node",
        || async { node.websockets() == before },
    )
    .await;

    // The next call opens a connection again.
    let answer = setup.call(UNCACHED_READ, json!([])).await;
    assert_eq!(answer["result"], node.peer_id(), "{answer}");
}
