//! A real client against sim-node: `@polkadot/api` 16.5.6 (tests/js) connects over WebSocket,
//! decodes the runtime metadata, reads a header, a block and storage, follows new heads, and
//! prints a JSON summary that this test checks.
//!
//! Needs Node.js 20 on PATH; runs `npm ci` in tests/js when its node_modules is missing.

use std::time::Duration;

use lb_tests::js_client::{ensure_installed, is_expected_polkadot_js_warning, run, summary_of};
use lb_tests::lab::js_dir;
use lb_tests::sim_node::{SimNode, SimNodeConfig};
use serde_json::Value;

const SCRIPT_TIMEOUT: Duration = Duration::from_secs(60);

fn block_number_of(value: &Value) -> u64 {
    value
        .as_u64()
        .unwrap_or_else(|| panic!("not a block number: {value}"))
}

#[tokio::test]
async fn polkadot_js_connects_decodes_and_follows_new_heads() {
    ensure_installed("@polkadot/api").await;
    let mut config = SimNodeConfig::new("polkadot-js");
    config.block_time = Duration::from_millis(200);
    let node = SimNode::start(config).await.expect("sim-node starts");

    let output = run(
        "node",
        &["check-sim-node.mjs", &node.ws_url()],
        &js_dir(),
        SCRIPT_TIMEOUT,
    )
    .await;
    let summary = summary_of(&output);

    assert_eq!(summary["specName"], "node", "{summary}");
    assert_eq!(summary["specVersion"], 268, "{summary}");
    assert_eq!(summary["transactionVersion"], 2, "{summary}");
    assert_eq!(
        summary["metadataVersion"], 16,
        "picked the newest metadata via the runtime API"
    );
    assert_eq!(summary["chain"], "Development");
    assert_eq!(summary["genesisHash"], node.block_hash(0).to_string());

    // polkadot.js hashes the header itself: the hash must be the one the node serves.
    let header_number = block_number_of(&summary["header"]["number"]);
    let served_hash = node.block_hash(u32::try_from(header_number).expect("u32 block number"));
    assert_eq!(
        summary["header"]["hash"],
        served_hash.to_string(),
        "{summary}"
    );
    assert_eq!(
        summary["blockExtrinsics"],
        serde_json::json!(["timestamp.set"]),
        "{summary}"
    );
    assert!(
        block_number_of(&summary["systemNumber"]) >= header_number,
        "{summary}"
    );
    assert!(
        summary["timestampNow"]
            .as_u64()
            .is_some_and(|ms| ms > 1_700_000_000_000),
        "{summary}"
    );

    let heads: Vec<u64> = summary["heads"]
        .as_array()
        .expect("heads")
        .iter()
        .map(block_number_of)
        .collect();
    assert!(heads.len() >= 3, "{summary}");
    assert!(
        heads.windows(2).all(|pair| pair[0] < pair[1]),
        "increasing heads: {heads:?}"
    );

    let warnings: Vec<&str> = summary["warnings"]
        .as_array()
        .expect("warnings")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        warnings
            .iter()
            .all(|warning| is_expected_polkadot_js_warning(warning)),
        "polkadot.js complained: {warnings:?}"
    );
    assert_eq!(
        node.request_count("chain_subscribeNewHead"),
        1,
        "polkadot.js subscribes with the alias"
    );
    assert!(
        node.request_count("state_call") >= 1,
        "metadata came from the runtime API"
    );
}
