//! A real new-spec client against sim-node: polkadot-api (`polkadot-api` 2.2.2, tests/js) finds
//! `chainHead_v1_*` in `rpc_methods`, so it reads the chain spec with `chainSpec_v1_*`, follows
//! the chain with `chainHead_v1_follow`, takes the metadata from `chainHead_v1_call
//! Metadata_metadata_at_version`, reads storage with `chainHead_v1_storage`, and prints a JSON
//! summary that this test checks. The same client through the gateway: tests/tests/gateway.
//!
//! Needs Node.js 20 on PATH; runs `npm ci` in tests/js when its node_modules is missing.

use std::time::Duration;

use lb_tests::js_client::{
    assert_papi_summary_matches_node, assert_papi_took_the_new_spec, ensure_installed, run,
    summary_of,
};
use lb_tests::lab::js_dir;
use lb_tests::sim_node::{SimNode, SimNodeConfig};

const SCRIPT_TIMEOUT: Duration = Duration::from_secs(60);
const BLOCK_TIME: Duration = Duration::from_millis(200);

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

    assert_papi_summary_matches_node(&node, &summary);
    assert_papi_took_the_new_spec(&node);
    // Nor followed the chain the legacy way.
    assert_eq!(
        node.request_count("chain_subscribeNewHeads"),
        0,
        "{:?}",
        node.request_counts()
    );
}
