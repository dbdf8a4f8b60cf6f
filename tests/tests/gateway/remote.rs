//! Another site's gateway as an upstream: a gateway with no node of its own serves its HTTPS
//! and WebSocket clients through the other site's gateway (its key, its CA), which treats it
//! as one more client, and a remote it cannot reach fails its calls naming the remote.

use std::time::Duration;

use lb_control::gateway::remote::RemoteSection;
use serde_json::json;

use crate::setup::{LOCALHOST, SYSTEM_NUMBER, Setup, UNCACHED_READ};

/// The other site's gateway (in front of one node) as the only upstream, tier 1, of a gateway
/// with no node of its own.
async fn through_remote(site: &Setup) -> Setup {
    let key_file = site.dir.0.join("site.key");
    let ca_file = site.dir.0.join("site-ca.pem");
    std::fs::write(&key_file, format!("{}\n", site.secret)).expect("key file");
    std::fs::write(&ca_file, &site.ca_pem).expect("CA file");
    let url = format!("https://{LOCALHOST}:{}", site.gateway.local_addr().port());
    Setup::start_with(0, |section| {
        section.remotes = vec![RemoteSection {
            url,
            key_file,
            ca_file,
            tier: 1,
        }];
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gateway_without_nodes_serves_https_and_wss_clients_through_the_remote_gateway() {
    let site = Setup::start(1).await;
    let node = &site.nodes[0];
    let local = through_remote(&site).await;

    let answer = local.call(UNCACHED_READ, json!([])).await;
    assert_eq!(answer["result"], node.peer_id(), "{answer}");

    // Over wss: a call, and a subscription that lives at the node (not a shared one), with its
    // first notification.
    let mut client = local
        .websocket(&format!("/{}", local.secret))
        .await
        .expect("WebSocket through the local gateway");
    let answer = client.call(UNCACHED_READ, json!([])).await;
    assert_eq!(answer["result"], node.peer_id(), "{answer}");
    let subscribed = client
        .call("state_subscribeStorage", json!([[SYSTEM_NUMBER]]))
        .await;
    assert!(subscribed["result"].is_string(), "{subscribed}");
    let changes = tokio::time::timeout(Duration::from_secs(10), client.notification())
        .await
        .expect("the storage subscription's first notification");
    assert_eq!(changes["method"], "state_storage", "{changes}");

    // Both calls and the subscription reached the node, through the other site's gateway,
    // under its key (on the WebSocket connections this gateway keeps to its nodes).
    assert_eq!(node.request_count(UNCACHED_READ), 2);
    assert_eq!(node.request_count("state_subscribeStorage"), 1);
    let site_metrics = site.metrics_text();
    assert!(
        site_metrics.contains("lb_gateway_calls_total{class=\"read\",outcome=\"forwarded\"}"),
        "{site_metrics}"
    );
    let local_metrics = local.metrics_text();
    assert!(
        local_metrics.contains("lb_gateway_serving_tier 1"),
        "{local_metrics}"
    );
    assert!(
        local_metrics.contains(&format!(
            "lb_gateway_remote_info{{remote=\"https://{LOCALHOST}:{}\",tier=\"1\"",
            site.gateway.local_addr().port()
        )),
        "{local_metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_remote_that_refuses_the_key_fails_calls_naming_the_refusal() {
    let site = Setup::start(1).await;
    let local = through_remote(&site).await;
    // The other site revokes the key.
    let revoked = site
        .keys
        .list()
        .expect("keys")
        .into_iter()
        .find(|key| key.revoked.is_none())
        .expect("the site's key");
    site.keys.revoke(revoked.id).expect("revoked");

    let answer = local.call(UNCACHED_READ, json!([])).await;
    let message = answer["error"]["message"].as_str().unwrap_or_default();
    assert_eq!(answer["error"]["code"], -32000, "{answer}");
    assert!(message.contains("401"), "{answer}");
    assert_eq!(site.nodes[0].request_count(UNCACHED_READ), 0);
}
