//! A node that lags but stays in the rotation never makes a client see an older head than it
//! saw: answers that depend on the head come from a node at the cluster's head, whichever
//! node the client is on, so the shared cache never holds a lagging node's answer.

use std::{net::Ipv4Addr, time::Duration};

use lb_tests::{poll, sim_node::faults::Fault};
use serde_json::{Value, json};

use super::setup::*;

const BLOCK_TIME: Duration = Duration::from_millis(150);
const LAG: u32 = 3;

/// Two loopback addresses the Maglev table sends to different nodes.
fn clients_on_two_nodes(setup: &Setup) -> (Ipv4Addr, Ipv4Addr) {
    let first = Ipv4Addr::LOCALHOST;
    let node = predicted_node(&setup.nodes, first);
    let other = (2..=254)
        .map(|last| Ipv4Addr::new(127, 0, 0, last))
        .find(|address| predicted_node(&setup.nodes, *address) != node)
        .expect("a loopback address on the other node");
    (first, other)
}

fn block_number(answer: &Value) -> u64 {
    let hex = answer["result"]["number"]
        .as_str()
        .unwrap_or_else(|| panic!("a header: {answer}"));
    u64::from_str_radix(hex.trim_start_matches("0x"), 16).expect("hex number")
}

#[tokio::test]
async fn a_lagging_node_never_makes_a_client_see_an_older_head() {
    let setup = Setup::start_with_blocks(2, BLOCK_TIME, |_| {}).await;
    let (lagging_client, other_client) = clients_on_two_nodes(&setup);
    let lagging = predicted_node(&setup.nodes, lagging_client);
    let node = setup
        .nodes
        .iter()
        .find(|node| node.rpc_addr() == lagging)
        .expect("the lagging client's node");
    node.set_fault(Fault::Behind { blocks: LAG });
    let at_head = setup
        .nodes
        .iter()
        .find(|node| node.rpc_addr() != lagging)
        .expect("the other node");
    poll::until("the lagging node is behind", || async {
        at_head.best_number() >= node.best_number() + LAG
    })
    .await;

    let post = |source: Ipv4Addr| {
        let client = setup
            .client_builder()
            .local_address(std::net::IpAddr::V4(source))
            .build()
            .expect("client");
        let url = setup.url(&format!("/{}", setup.secret));
        async move {
            let body = request(1, "chain_getHeader", json!([]));
            let answer: Value = client
                .post(url)
                .json(&body)
                .send()
                .await
                .expect("request")
                .json()
                .await
                .expect("JSON");
            block_number(&answer)
        }
    };
    // The other client fills the cache at each head, the lagging node's client reads right
    // after; both see the head only move forward.
    let mut seen = 0;
    for _ in 0..40 {
        for source in [other_client, lagging_client] {
            let number = post(source).await;
            assert!(
                number >= seen,
                "{source} saw block {number} after block {seen} (the lagging node is at {})",
                node.best_number()
            );
            seen = number;
        }
        let number = post(lagging_client).await;
        assert!(
            number >= u64::from(node.best_number() + LAG - 1),
            "a head-dependent miss of the lagging node's client was answered by it: {number}"
        );
        tokio::time::sleep(BLOCK_TIME / 3).await;
    }
}
