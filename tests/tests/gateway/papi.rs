//! polkadot-api (papi, `polkadot-api` 2.2.2 running tests/js/papi-check.mjs on the machine's
//! Node.js) through the gateway's `wss://` endpoint with a key, trusting the test CA
//! (`NODE_EXTRA_CA_CERTS`), while a hundred other WebSocket clients hold subscriptions and make
//! calls over the same, single, upstream connection to the node.

use std::{ffi::OsStr, time::Duration};

use lb_tests::{
    js_client::{
        assert_papi_summary_matches_node, assert_papi_took_the_new_spec, ensure_installed,
        run_with_env, summary_of,
    },
    lab::js_dir,
};

use super::shared_upstream::SharedUpstream;

const SCRIPT_TIMEOUT: Duration = Duration::from_secs(60);

#[tokio::test]
async fn papi_follows_the_chain_through_wss_while_a_hundred_clients_share_its_upstream_connection()
{
    ensure_installed("polkadot-api").await;
    let mut shared = SharedUpstream::start().await;

    let ca = shared.setup.dir.0.join("ca.pem");
    std::fs::write(&ca, &shared.setup.ca_pem).expect("CA written");
    let url = shared.url();
    let output = shared
        .run_beside(async move {
            run_with_env(
                "node",
                &["--experimental-websocket", "papi-check.mjs", &url],
                &[("NODE_EXTRA_CA_CERTS", OsStr::new(&ca))],
                &js_dir(),
                SCRIPT_TIMEOUT,
            )
            .await
        })
        .await;
    let summary = summary_of(&output);

    let node = shared.node();
    assert_papi_summary_matches_node(node, &summary);
    assert_papi_took_the_new_spec(node);
    shared.assert_all_served_on_one_upstream_connection();
}
