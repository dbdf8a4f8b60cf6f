//! A real new-spec client against sim-node: polkadot-api (`polkadot-api` 2.2.2, tests/js) finds
//! `chainHead_v1_*` in `rpc_methods`, so it reads the chain spec with `chainSpec_v1_*`, follows
//! the chain with `chainHead_v1_follow`, takes the metadata from `chainHead_v1_call
//! Metadata_metadata_at_version`, reads storage with `chainHead_v1_storage`, and prints a JSON
//! summary that this test checks.
//!
//! Needs Node.js 20 on PATH; runs `npm ci` in tests/js when its node_modules is missing.

use std::time::Duration;

use lb_tests::js_client::{ensure_installed, run, summary_of};
use lb_tests::lab::js_dir;
use lb_tests::sim_node::{BlockNumber, SimNode, SimNodeConfig, SimNodeHandle};
use serde_json::{Value, json};

const SCRIPT_TIMEOUT: Duration = Duration::from_secs(60);
const BLOCK_TIME: Duration = Duration::from_millis(200);

fn number_of(block: &Value) -> BlockNumber {
    block["number"]
        .as_u64()
        .and_then(|number| BlockNumber::try_from(number).ok())
        .unwrap_or_else(|| panic!("no block number in {block}"))
}

/// The block papi reported is the node's block of that number, with its parent.
fn assert_is_node_block(node: &SimNodeHandle, block: &Value) {
    let number = number_of(block);
    assert_eq!(block["hash"], json!(node.block_hash(number)), "{block}");
    assert_eq!(
        block["parent"],
        json!(node.block_hash(number - 1)),
        "{block}"
    );
}

#[tokio::test]
async fn polkadot_api_reads_chain_spec_finalized_block_and_storage_and_follows_best_blocks() {
    ensure_installed("polkadot-api").await;
    let mut config = SimNodeConfig::new("papi");
    config.block_time = BLOCK_TIME;
    let node = SimNode::start(config).await.expect("sim-node starts");

    let output = run(
        "node",
        &["--experimental-websocket", "papi-check.mjs", &node.ws_url()],
        &js_dir(),
        SCRIPT_TIMEOUT,
    )
    .await;
    let summary = summary_of(&output);

    assert_eq!(summary["chainName"], "Development", "{summary}");
    assert_eq!(
        summary["genesisHash"],
        json!(node.block_hash(0)),
        "{summary}"
    );
    assert_eq!(summary["properties"]["ss58Format"], 42, "{summary}");
    assert_eq!(summary["specName"], "node", "metadata decoded: {summary}");
    assert_eq!(summary["specVersion"], 268, "{summary}");

    let finalized = &summary["finalized"];
    assert_is_node_block(&node, finalized);
    assert_eq!(
        summary["systemNumber"],
        json!(number_of(finalized)),
        "System.Number read at the finalized block: {summary}"
    );

    let best: Vec<&Value> = summary["bestBlocks"]
        .as_array()
        .expect("best blocks")
        .iter()
        .collect();
    assert_eq!(best.len(), 3, "{summary}");
    for block in &best {
        assert_is_node_block(&node, block);
    }
    assert!(
        best.windows(2)
            .all(|pair| number_of(pair[0]) < number_of(pair[1])),
        "best blocks move forward: {summary}"
    );
    assert!(
        number_of(best[0]) >= number_of(finalized),
        "best is not below finalized: {summary}"
    );
    assert_eq!(summary["warnings"], json!([]), "papi complained: {summary}");

    // papi took the new API, not the legacy one.
    for method in [
        "rpc_methods",
        "chainSpec_v1_chainName",
        "chainSpec_v1_genesisHash",
        "chainHead_v1_follow",
        "chainHead_v1_call",
        "chainHead_v1_storage",
    ] {
        assert!(
            node.request_count(method) >= 1,
            "{method} never called: {:?}",
            node.request_counts()
        );
    }
    for legacy in ["state_call", "state_getStorage", "chain_subscribeNewHeads"] {
        assert_eq!(
            node.request_count(legacy),
            0,
            "{legacy}: {:?}",
            node.request_counts()
        );
    }
}
