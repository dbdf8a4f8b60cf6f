//! JSON-RPC over HTTPS.

use std::{
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use lb_control::{
    gateway::AuthFailureBlock,
    model::{KeyCaps, RateLimit},
};
use lb_tests::{lab::certs::write_pem, sim_node::faults::Fault};
use reqwest::{StatusCode, Version};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use lb_tests::poll;

use super::setup::*;

#[tokio::test]
async fn valid_key_works_in_every_position() {
    let setup = Setup::start(1).await;
    let client = setup.client();
    let body = request(1, UNCACHED_READ, json!([]));
    let secret = &setup.secret;
    let requests = [
        ("path", client.post(setup.url(&format!("/{secret}")))),
        (
            "query",
            client.post(setup.url(&format!("/?apikey={secret}"))),
        ),
        (
            "header",
            client.post(setup.url("/")).header("x-api-key", secret),
        ),
        ("bearer", client.post(setup.url("/")).bearer_auth(secret)),
    ];
    for (position, builder) in requests {
        let response = builder.json(&body).send().await.expect("request");
        assert_eq!(response.status(), StatusCode::OK, "key in the {position}");
        let answer: Value = response.json().await.expect("JSON");
        assert!(
            answer["result"].is_string(),
            "key in the {position}: {answer}"
        );
        assert_eq!(answer["id"], 1);
    }
    assert_eq!(setup.nodes[0].request_count(UNCACHED_READ), 4);
}

#[tokio::test]
async fn missing_unknown_and_revoked_keys_get_401_and_nothing_reaches_a_node() {
    let setup = Setup::start(2).await;
    let body = request(1, "system_chain", json!([]));
    let revoked = setup
        .keys
        .create("leaving", None, KeyCaps::default())
        .expect("key");
    assert_eq!(
        setup
            .post(&format!("/{}", revoked.secret), &body)
            .await
            .status(),
        StatusCode::OK
    );
    setup.keys.revoke(revoked.record.id).expect("revoked");
    // Refused from the revocation on (polled: the assertion allows for any delay up to 3 s).
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let status = setup
            .post(&format!("/{}", revoked.secret), &body)
            .await
            .status();
        if status == StatusCode::UNAUTHORIZED {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "revoked key still accepted: {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = setup.node_requests();
    for path in [
        "/".to_owned(),
        "/lbk_0000000000000000000000000000000000000000000000000000000000000000".to_owned(),
        format!("/{}", revoked.secret),
    ] {
        let response = setup.post(&path, &body).await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{path}");
        let answer: Value = response.json().await.expect("JSON-RPC error body");
        assert_eq!(error_code(&answer), -32001, "{answer}");
        assert_eq!(answer["id"], Value::Null);
    }
    assert_eq!(
        setup.node_requests(),
        before,
        "a refused request reached a node"
    );
    assert!(
        setup
            .metrics_text()
            .contains("lb_gateway_auth_failures_total{reason=\"missing\"} 1"),
        "{}",
        setup.metrics_text()
    );
}

#[tokio::test]
async fn over_rate_requests_get_429_with_retry_after() {
    let setup = Setup::start(1).await;
    let limited = setup
        .keys
        .create(
            "limited",
            Some(RateLimit { rps: 1, burst: 2 }),
            KeyCaps::default(),
        )
        .expect("key");
    let path = format!("/{}", limited.secret);
    let body = request(1, "system_chain", json!([]));
    for _ in 0..2 {
        assert_eq!(setup.post(&path, &body).await.status(), StatusCode::OK);
    }
    let before = setup.node_requests();
    let response = setup.post(&path, &body).await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .expect("Retry-After in seconds");
    assert!((1..=2).contains(&retry_after), "Retry-After {retry_after}");
    let answer: Value = response.json().await.expect("JSON");
    assert_eq!(error_code(&answer), -32005);
    assert_eq!(setup.node_requests(), before);
    // Another key is not held back by this one.
    assert_eq!(
        setup.call("system_chain", json!([])).await["result"],
        "Development"
    );
}

#[tokio::test]
async fn unsafe_method_is_refused_with_the_node_error() {
    let setup = Setup::start(1).await;
    let answer = setup.call("author_rotateKeys", json!([])).await;
    assert_eq!(
        answer["error"],
        json!({"code": -32601, "message": "RPC call is unsafe to be called externally"})
    );
    // The gateway answers exactly what the node would.
    let direct = call_straight(&setup.nodes[0], "author_rotateKeys", json!([])).await;
    assert_eq!(answer["error"], direct["error"]);
    assert_eq!(
        setup.nodes[0].request_count("author_rotateKeys"),
        1,
        "only the direct call"
    );
}

/// `sc_rpc_api::UnsafeRpcError`'s text (polkadot-sdk `substrate/client/rpc-api/src/policy.rs:61`).
const UNSAFE_RPC: &str = "RPC call is unsafe to be called externally";

/// Every method a node started with `--rpc-methods safe` refuses, with the code it answers,
/// read from polkadot-sdk's source (paths under `substrate/`; commit d2321da0, the published
/// `sc-rpc` 57.0.0 and `sc-rpc-api` 0.61.0, unless noted). Each is a caller of
/// `sc_rpc_api::check_if_safe`; what code it answers depends on the error type it returns:
/// `UnsafeRpcError` itself becomes -32601 (`client/rpc-api/src/policy.rs:67-70`).
const NODE_REFUSALS: &[(&str, i64)] = &[
    // client/rpc/src/author/mod.rs:145,155,165,171,185,200; author::Error passes it through
    // (client/rpc-api/src/author/error.rs:181).
    ("author_insertKey", -32601),
    ("author_rotateKeys", -32601),
    ("author_rotateKeysWithOwner", -32601),
    ("author_hasSessionKeys", -32601),
    ("author_hasKey", -32601),
    ("author_removeExtrinsic", -32601),
    // client/rpc/src/system/mod.rs:122,129,136,151,180,187; system::Error passes it through
    // (client/rpc-api/src/system/error.rs:63).
    ("system_peers", -32601),
    ("system_unstable_networkState", -32601),
    ("system_addReservedPeer", -32601),
    ("system_removeReservedPeer", -32601),
    ("system_addLogFilter", -32601),
    ("system_resetLogFilter", -32601),
    // client/rpc/src/offchain/mod.rs:59,75,92; client/rpc-api/src/offchain/error.rs:48.
    ("offchain_localStorageSet", -32601),
    ("offchain_localStorageClear", -32601),
    ("offchain_localStorageGet", -32601),
    // client/rpc/src/dev/mod.rs:72; client/rpc-api/src/dev/error.rs:58.
    ("dev_getBlockStats", -32601),
    // client/rpc/src/statement/mod.rs:47 (RpcResult) at commit ac2b0e3f (sc-rpc 50.0.0,
    // sc-rpc-api 0.54.0); later releases dropped the method.
    ("statement_dump", -32601),
    // utils/frame/rpc/system/src/lib.rs:52 (the alias), :121 (RpcResult).
    ("system_dryRun", -32601),
    ("system_dryRunAt", -32601),
    // utils/frame/rpc/state-trie-migration-rpc/src/lib.rs:139,168 (RpcResult): a state_ name
    // outside the state API, so not its code.
    ("state_trieMigrationStatus", -32601),
    // client/consensus/babe/rpc/src/lib.rs:94,188.
    ("babe_epochAuthorship", -32601),
    // Without keys only: client/rpc/src/state/state_full.rs:431-433 rejects the subscription
    // with `ErrorObject::from(UnsafeRpcError)`.
    ("state_subscribeStorage", -32601),
    // client/rpc/src/state/mod.rs:232,295,328 return state::Error, whose UnsafeRpcCalled
    // (transparent: the same text) takes the state API's catch-all code 4003
    // (client/rpc-api/src/state/error.rs:52,67).
    ("state_getPairs", 4003),
    ("state_queryStorage", 4003),
    ("state_traceBlock", 4003),
];

/// Of [`NODE_REFUSALS`], what sim-node cannot be asked over HTTP: a method newer than the node
/// it imitates, and a subscription (compared over WebSocket).
const NOT_ASKED_OF_SIM_NODE: &[&str] = &["author_rotateKeysWithOwner", "state_subscribeStorage"];

#[tokio::test]
async fn every_method_a_safe_node_refuses_gets_the_node_code_and_never_reaches_a_node() {
    let setup = Setup::start(1).await;
    let before = setup.node_requests();
    for (method, code) in NODE_REFUSALS {
        let answer = setup.call(method, json!([])).await;
        assert_eq!(
            answer["error"],
            json!({"code": code, "message": UNSAFE_RPC}),
            "{method}"
        );
    }
    assert_eq!(
        setup.node_requests(),
        before,
        "a refused call reached a node"
    );
    // sim-node, asked directly, answers the same.
    for (method, code) in NODE_REFUSALS {
        if NOT_ASKED_OF_SIM_NODE.contains(method) {
            continue;
        }
        let direct = call_straight(&setup.nodes[0], method, json!([])).await;
        assert_eq!(
            direct["error"],
            json!({"code": code, "message": UNSAFE_RPC}),
            "sim-node's {method}"
        );
    }
    // Safe neighbours of the refused methods pass and are answered by the node.
    for (method, params) in [
        ("state_getStorage", json!(["0x3a636f6465"])),
        ("state_queryStorageAt", json!([["0x3a636f6465"]])),
        ("system_health", json!([])),
        ("author_pendingExtrinsics", json!([])),
    ] {
        let answer = setup.call(method, params).await;
        assert!(answer.get("result").is_some(), "{method}: {answer}");
    }
}

#[tokio::test]
async fn batch_is_answered_in_order_with_the_client_ids() {
    let setup = Setup::start(1).await;
    let batch = json!([
        request("a", "system_chain", json!([])),
        request(7, "author_insertKey", json!(["aura", "//Alice", "0x00"])),
        { "jsonrpc": "1.0", "id": 8, "method": "system_chain" },
        { "jsonrpc": "2.0", "method": "system_chain" },
        request("z", "chain_getBlockHash", json!([0])),
    ]);
    let response = setup.post(&format!("/{}", setup.secret), &batch).await;
    assert_eq!(response.status(), StatusCode::OK);
    let answers: Vec<Value> = response.json().await.expect("a batch answer");
    let ids: Vec<&Value> = answers.iter().map(|answer| &answer["id"]).collect();
    assert_eq!(
        ids,
        [&json!("a"), &json!(7), &json!(8), &json!("z")],
        "{answers:#?}"
    );
    assert_eq!(answers[0]["result"], "Development");
    assert_eq!(error_code(&answers[1]), -32601);
    assert_eq!(error_code(&answers[2]), -32600);
    assert_eq!(
        answers[3]["result"],
        json!(setup.nodes[0].block_hash(0).to_string())
    );
    assert_eq!(setup.nodes[0].request_count("author_insertKey"), 0);
}

#[tokio::test]
async fn malformed_bodies_get_their_errors() {
    let setup = Setup::start(1).await;
    let client = setup.client();
    let url = setup.url(&format!("/{}", setup.secret));
    let send = |body: Vec<u8>| {
        client
            .post(&url)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let before = setup.node_requests();

    let response = send(b"{\"jsonrpc\":\"2.0\",".to_vec()).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(error_code(&response.json().await.unwrap()), -32700);

    let huge = format!("[\"{}\"]", "x".repeat(64 * 1024));
    let response = send(huge.into_bytes()).await.unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(error_code(&answer), -32007);
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("65536 bytes")
    );

    let long: Vec<Value> = (0..11)
        .map(|id| request(id, "system_chain", json!([])))
        .collect();
    let response = send(serde_json::to_vec(&long).unwrap()).await.unwrap();
    let answer: Value = response.json().await.unwrap();
    assert_eq!(error_code(&answer), -32010);
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("at most 10")
    );

    assert_eq!(
        setup.node_requests(),
        before,
        "a malformed body reached a node"
    );
}

#[tokio::test]
async fn client_sticks_to_the_node_maglev_predicts() {
    let setup = Setup::start(3).await;
    let expected = predicted_node(&setup.nodes, Ipv4Addr::LOCALHOST);
    assert_eq!(setup.gateway.node_for(LOCALHOST), Some(expected));
    for _ in 0..12 {
        assert!(setup.call(UNCACHED_READ, json!([])).await["result"].is_string());
    }
    for node in &setup.nodes {
        let count = node.request_count(UNCACHED_READ);
        if node.rpc_addr() == expected {
            assert_eq!(count, 12, "the predicted node {expected} served them all");
        } else {
            assert_eq!(count, 0, "node {} got requests", node.rpc_addr());
        }
    }
}

#[tokio::test]
async fn reads_are_retried_on_another_node_when_the_clients_node_dies() {
    let mut setup = Setup::start(3).await;
    let expected = predicted_node(&setup.nodes, Ipv4Addr::LOCALHOST);
    // Warm the pool, so the dead node's idle connections are in it too.
    assert!(setup.call(UNCACHED_READ, json!([])).await["result"].is_string());
    let index = setup
        .nodes
        .iter()
        .position(|node| node.rpc_addr() == expected)
        .unwrap();
    setup.nodes.remove(index).stop().await;
    // The control plane has not noticed (the view still says Up): every read must still work.
    for id in 0..20 {
        let answer = setup.call(UNCACHED_READ, json!([])).await;
        assert!(answer["result"].is_string(), "read {id} failed: {answer}");
    }
    assert_eq!(
        setup
            .nodes
            .iter()
            .map(|node| node.request_count(UNCACHED_READ))
            .sum::<u64>(),
        20
    );
    let metrics = setup.metrics_text();
    assert!(
        metrics.contains(&format!(
            "lb_gateway_retries_total{{node=\"{expected}\"}} 20"
        )),
        "{metrics}"
    );
}

/// Waits until the chain follower's subscriptions reached every node, then zeroes the nodes'
/// counts: what they count from then on is the clients'.
async fn count_from_here(setup: &Setup) {
    poll::until("the follower subscribed at every node", || async {
        setup.nodes.iter().all(|node| {
            FOLLOWER_SUBSCRIPTIONS
                .iter()
                .all(|method| node.request_count(method) > 0)
        })
    })
    .await;
    for node in &setup.nodes {
        node.reset_request_counts();
    }
}

/// `count` concurrent calls of `method`, each on its own connection.
async fn concurrent_calls(setup: &Setup, method: &str, count: usize) -> Vec<Value> {
    futures_util::future::join_all((0..count).map(|_| setup.call(method, json!([])))).await
}

/// The answers that are results, and the busy errors' messages.
fn results_and_busy(answers: &[Value]) -> (usize, Vec<String>) {
    let results = answers
        .iter()
        .filter(|answer| answer.get("result").is_some());
    let busy = answers
        .iter()
        .filter(|answer| answer.get("result").is_none())
        .map(|answer| {
            assert_eq!(error_code(answer), -32000, "{answer}");
            answer["error"]["message"].as_str().unwrap().to_owned()
        })
        .collect();
    (results.count(), busy)
}

#[tokio::test]
async fn calls_beyond_a_nodes_budget_wait_then_get_busy_and_the_node_never_has_more() {
    let setup = Setup::start_with(1, |section| {
        section.max_upstream_http_calls_per_node = 4;
        section.upstream_queue_timeout = Duration::from_millis(200);
    })
    .await;
    count_from_here(&setup).await;
    let node = &setup.nodes[0];
    // Slower than the wait: the calls beyond the first four cannot get a place in time.
    node.set_fault(Fault::Slow { delay_ms: 1000 });
    let answers = concurrent_calls(&setup, UNCACHED_READ, 10).await;
    let (results, busy) = results_and_busy(&answers);
    assert_eq!(results, 4, "{answers:#?}");
    let expected = format!(
        "Upstream busy: node {} has 4 calls in flight; try again",
        node.rpc_addr()
    );
    assert_eq!(busy, vec![expected; 6]);
    assert_eq!(node.most_calls_in_flight_of(UNCACHED_READ), 4);
    assert_eq!(node.request_count(UNCACHED_READ), 4);
    let metrics = setup.metrics_text();
    for line in [
        format!(
            "lb_gateway_upstream_busy_total{{node=\"{}\"}} 6",
            node.rpc_addr()
        ),
        "lb_gateway_calls_total{class=\"read\",outcome=\"busy\"} 6".to_owned(),
    ] {
        assert!(metrics.contains(&line), "no {line} in:\n{metrics}");
    }

    // Calls that wait less than the wait get their place in turn.
    node.set_fault(Fault::None);
    node.set_fault(Fault::Slow { delay_ms: 20 });
    let answers = concurrent_calls(&setup, UNCACHED_READ, 10).await;
    assert_eq!(results_and_busy(&answers), (10, Vec::new()));
    assert_eq!(node.most_calls_in_flight_of(UNCACHED_READ), 4);
}

#[tokio::test]
async fn a_busy_nodes_reads_go_to_the_next_node_and_author_calls_never_do() {
    let setup = Setup::start_with(2, |section| {
        section.max_upstream_http_calls_per_node = 2;
        section.upstream_queue_timeout = Duration::from_millis(200);
    })
    .await;
    count_from_here(&setup).await;
    let own = predicted_node(&setup.nodes, Ipv4Addr::LOCALHOST);
    let (own, next) = if setup.nodes[0].rpc_addr() == own {
        (&setup.nodes[0], &setup.nodes[1])
    } else {
        (&setup.nodes[1], &setup.nodes[0])
    };
    for node in &setup.nodes {
        node.set_fault(Fault::Slow { delay_ms: 1000 });
    }
    // Two on the client's node, two on the next one, two busy (named after the next node,
    // the last one tried).
    let answers = concurrent_calls(&setup, UNCACHED_READ, 6).await;
    let (results, busy) = results_and_busy(&answers);
    assert_eq!(results, 4, "{answers:#?}");
    let expected = format!(
        "Upstream busy: node {} has 2 calls in flight; try again",
        next.rpc_addr()
    );
    assert_eq!(busy, vec![expected; 2]);
    for node in [own, next] {
        assert_eq!(node.request_count(UNCACHED_READ), 2, "{}", node.rpc_addr());
        assert_eq!(
            node.most_calls_in_flight_of(UNCACHED_READ),
            2,
            "{}",
            node.rpc_addr()
        );
    }
    let metrics = setup.metrics_text();
    let line = format!("lb_gateway_retries_total{{node=\"{}\"}} 4", own.rpc_addr());
    assert!(metrics.contains(&line), "no {line} in:\n{metrics}");

    // author_* calls are never sent to a second node, busy or not.
    let answers = concurrent_calls(&setup, "author_pendingExtrinsics", 3).await;
    let (results, busy) = results_and_busy(&answers);
    assert_eq!(results, 2, "{answers:#?}");
    let expected = format!(
        "Upstream busy: node {} has 2 calls in flight; try again",
        own.rpc_addr()
    );
    assert_eq!(busy, vec![expected]);
    assert_eq!(own.request_count("author_pendingExtrinsics"), 2);
    assert_eq!(next.request_count("author_pendingExtrinsics"), 0);
}

#[tokio::test]
async fn http2_and_http1_both_work() {
    let setup = Setup::start(1).await;
    let body = request(1, "system_chain", json!([]));
    let url = setup.url(&format!("/{}", setup.secret));
    let h2 = setup.client().post(&url).json(&body).send().await.unwrap();
    assert_eq!(h2.version(), Version::HTTP_2, "ALPN h2");
    assert_eq!(h2.json::<Value>().await.unwrap()["result"], "Development");
    let h1 = setup
        .client_builder()
        .http1_only()
        .build()
        .unwrap()
        .post(&url)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(h1.version(), Version::HTTP_11);
    assert_eq!(h1.json::<Value>().await.unwrap()["result"], "Development");
}

#[tokio::test]
async fn http2_connection_gets_its_stream_limit_and_cannot_exceed_it() {
    let setup = Setup::start_with(1, |section| {
        section.http2_max_concurrent_streams = 3;
    })
    .await;
    let tls = setup
        .tls_with_alpn(setup.tcp().await, b"h2")
        .await
        .expect("TLS with ALPN h2");
    let (sender, connection) = h2::client::handshake(tls).await.expect("HTTP/2 handshake");
    tokio::spawn(connection);
    poll::until("the gateway's SETTINGS arrive", || {
        let streams = sender.current_max_send_streams();
        async move { streams == 3 }
    })
    .await;

    // Six slow calls at once on the one connection: the client queues what the limit holds
    // back, and the node never has more than three of them.
    setup.nodes[0].set_fault(Fault::Slow { delay_ms: 200 });
    let body = serde_json::to_vec(&request(1, UNCACHED_READ, json!([]))).unwrap();
    let calls = (0..6).map(|_| {
        let sender = sender.clone();
        let body = body.clone();
        let url = setup.url(&format!("/{}", setup.secret));
        async move {
            let mut sender = sender.ready().await.expect("a stream");
            let request = hyper::Request::post(url)
                .header("content-type", "application/json")
                .body(())
                .unwrap();
            let (response, mut stream) = sender.send_request(request, false).expect("sent");
            stream.send_data(body.into(), true).expect("body sent");
            let response = response.await.expect("an answer");
            assert_eq!(response.status(), StatusCode::OK);
            let mut body = response.into_body();
            let mut bytes = Vec::new();
            while let Some(chunk) = body.data().await {
                let chunk = chunk.expect("body");
                let _ = body.flow_control().release_capacity(chunk.len());
                bytes.extend_from_slice(&chunk);
            }
            serde_json::from_slice::<Value>(&bytes).expect("JSON")
        }
    });
    for answer in futures_util::future::join_all(calls).await {
        assert!(answer["result"].is_string(), "{answer}");
    }
    assert_eq!(setup.nodes[0].most_calls_in_flight_of(UNCACHED_READ), 3);
}

#[tokio::test]
async fn certificate_reload_serves_new_connections_and_keeps_open_ones() {
    let setup = Setup::start(1).await;
    let url = setup.url(&format!("/{}", setup.secret));
    let body = request(1, "system_chain", json!([]));
    let peer_cert = |response: &reqwest::Response| {
        response
            .extensions()
            .get::<reqwest::tls::TlsInfo>()
            .and_then(|info| info.peer_certificate().map(<[u8]>::to_vec))
            .expect("TLS info")
    };
    let open = setup.client();
    let first = open.post(&url).json(&body).send().await.unwrap();
    let old_cert = peer_cert(&first);

    let renewed = setup.ca.issue(&[LOCALHOST]).expect("renewed certificate");
    write_pem(&setup.dir.0.join("gateway.crt"), &renewed.cert_pem).unwrap();
    write_pem(&setup.dir.0.join("gateway.key"), &renewed.key_pem).unwrap();
    setup.gateway.reload_tls().expect("reload");

    let fresh = setup.client().post(&url).json(&body).send().await.unwrap();
    assert_ne!(
        peer_cert(&fresh),
        old_cert,
        "a new connection gets the new certificate"
    );
    // The open HTTP/2 connection carries on with the certificate it was made with.
    let again = open.post(&url).json(&body).send().await.unwrap();
    assert_eq!(again.status(), StatusCode::OK);
    assert_eq!(peer_cert(&again), old_cert);

    // A broken file is refused and the running certificate stays.
    write_pem(&setup.dir.0.join("gateway.key"), "not a key").unwrap();
    let error = setup.gateway.reload_tls().expect_err("bad key").to_string();
    assert!(error.contains("gateway.tls_key"), "{error}");
    let still = setup.client().post(&url).json(&body).send().await.unwrap();
    assert_eq!(peer_cert(&still), peer_cert(&fresh));
}

#[tokio::test]
async fn the_certificate_s_end_is_a_metric_and_follows_a_reload() {
    let setup = Setup::start(1).await;
    let expiry = || {
        lb_tests::prometheus::sum(
            &setup.metrics_text(),
            "lb_gateway_tls_certificate_expiry_timestamp_seconds",
            |_| true,
        )
    };
    // The certificate the gateway started with: LabCa::issue's, valid until 4096.
    assert_eq!(
        expiry(),
        rcgen::date_time_ymd(4096, 1, 1).unix_timestamp() as f64
    );
    let first = setup.ca.issue_until(&[LOCALHOST], (2031, 6, 30)).unwrap();
    let renewed = setup.ca.issue_until(&[LOCALHOST], (2031, 9, 28)).unwrap();
    for leaf in [&first, &renewed] {
        write_pem(&setup.dir.0.join("gateway.crt"), &leaf.cert_pem).unwrap();
        write_pem(&setup.dir.0.join("gateway.key"), &leaf.key_pem).unwrap();
        setup.gateway.reload_tls().expect("reload");
        assert_eq!(expiry(), leaf.not_after_unix as f64);
    }
    // A reload that fails leaves the certificate in force, and its end.
    write_pem(&setup.dir.0.join("gateway.key"), "not a key").unwrap();
    setup.gateway.reload_tls().expect_err("bad key");
    assert_eq!(expiry(), renewed.not_after_unix as f64);
}

#[tokio::test]
async fn last_use_of_a_key_reaches_the_store() {
    let setup = Setup::start(1).await;
    setup.call("system_chain", json!([])).await;
    poll::until("the key's last use is recorded", || async {
        setup.store.api_keys().unwrap()[0].last_used.is_some()
    })
    .await;
}

#[tokio::test]
async fn slow_client_is_cut_off_after_the_header_timeout_while_others_are_served() {
    let setup = Setup::start_with(1, |section| {
        section.header_timeout = Duration::from_millis(300);
    })
    .await;
    // Connects and never starts the TLS handshake.
    let mut silent = setup.tcp().await;
    // Completes the handshake, then sends headers that never end.
    let mut dribbling = setup.tls().await.expect("TLS handshake");
    dribbling
        .write_all(b"POST / HTTP/1.1\r\nhost: localhost\r\n")
        .await
        .unwrap();
    assert_eq!(
        setup.call("system_chain", json!([])).await["result"],
        "Development",
        "others are served meanwhile"
    );
    let (_, silent_for) = read_until_closed(&mut silent).await;
    let (_, dribbling_for) = read_until_closed(&mut dribbling).await;
    for held in [silent_for, dribbling_for] {
        assert!(held < Duration::from_secs(3), "held for {held:?}");
    }
}

#[tokio::test]
async fn idle_connection_is_closed_after_the_idle_timeout() {
    let setup = Setup::start_with(1, |section| {
        section.idle_timeout = Duration::from_millis(300);
    })
    .await;
    let mut stream = setup.tls().await.expect("TLS handshake");
    let body = serde_json::to_vec(&request(1, "system_chain", json!([]))).unwrap();
    let head = format!(
        "POST /{} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n",
        setup.secret,
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&body).await.unwrap();
    let (received, closed_after) = read_until_closed(&mut stream).await;
    let text = String::from_utf8_lossy(&received);
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    assert!(text.contains("Development"), "{text}");
    assert!(
        closed_after >= Duration::from_millis(250) && closed_after < Duration::from_secs(3),
        "a keep-alive connection closed after {closed_after:?}"
    );
}

#[tokio::test]
async fn tls_garbage_is_dropped_and_others_are_served() {
    let setup = Setup::start(1).await;
    let mut plain = setup.tcp().await;
    plain
        .write_all(b"POST / HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    let (received, _) = read_until_closed(&mut plain).await;
    assert!(
        !String::from_utf8_lossy(&received).contains("HTTP/1.1"),
        "plain HTTP was served on the TLS port"
    );
    assert_eq!(
        setup.call("system_chain", json!([])).await["result"],
        "Development"
    );
}

#[tokio::test]
async fn connections_beyond_the_per_address_limit_are_closed() {
    let setup = Setup::start_with(1, |section| {
        section.max_connections_per_ip = 2;
    })
    .await;
    let first = setup.tls().await.expect("first connection");
    let _second = setup.tls().await.expect("second connection");
    let mut third = setup.tcp().await;
    let (received, _) = read_until_closed(&mut third).await;
    assert!(received.is_empty(), "the third connection got an answer");
    assert!(
        setup
            .metrics_text()
            .contains("lb_gateway_rejected_total{reason=\"connection_limit\"} 1")
    );
    // A closed connection frees its place once the gateway has seen it close; until then a
    // new connection is still refused (its handshake fails).
    drop(first);
    poll::until("the freed place is given out", || async {
        let Ok(mut stream) = setup.tls().await else {
            return false;
        };
        answers_a_get(&mut stream).await
    })
    .await;
}

#[tokio::test]
async fn connections_beyond_the_gateway_limit_are_closed_whatever_their_address() {
    let setup = Setup::start_with(1, |section| {
        section.max_connections = 2;
    })
    .await;
    let source = |last: u8| IpAddr::from([127, 0, 0, last]);
    let first = setup
        .tls_over(setup.tcp_from(source(1)).await)
        .await
        .expect("first connection");
    let _second = setup
        .tls_over(setup.tcp_from(source(2)).await)
        .await
        .expect("second connection, another address");
    let mut third = setup.tcp_from(source(3)).await;
    let (received, _) = read_until_closed(&mut third).await;
    assert!(received.is_empty(), "the third connection got an answer");
    let metrics = setup.metrics_text();
    assert!(
        metrics.contains("lb_gateway_rejected_total{reason=\"total_connection_limit\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("lb_gateway_connections 2"), "{metrics}");
    drop(first);
    poll::until("the freed place is given to a new client", || async {
        let tcp = setup.tcp_from(source(4)).await;
        let Ok(mut stream) = setup.tls_over(tcp).await else {
            return false;
        };
        answers_a_get(&mut stream).await
    })
    .await;
}

#[tokio::test]
async fn ipv6_connections_beyond_the_per_client_limit_are_closed() {
    let setup = Setup::start_with(1, |section| {
        section.listen = Some("[::1]:0".parse().unwrap());
        section.max_connections_per_ip = 2;
    })
    .await;
    let _first = setup.tls().await.expect("first connection over IPv6");
    let _second = setup.tls().await.expect("second connection over IPv6");
    let mut third = setup.tcp().await;
    let (received, _) = read_until_closed(&mut third).await;
    assert!(received.is_empty(), "the third connection got an answer");
    let metrics = setup.metrics_text();
    assert!(
        metrics.contains("lb_gateway_rejected_total{reason=\"connection_limit\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn repeated_auth_failures_ask_for_the_source_to_be_blocked() {
    let mut setup = Setup::start_with(1, |section| {
        section.auth_failures_block = Some(AuthFailureBlock {
            after: 3,
            within: Duration::from_secs(60),
            block_for: Duration::from_secs(600),
        });
    })
    .await;
    let body = request(1, "system_chain", json!([]));
    for _ in 0..2 {
        assert_eq!(
            setup.post("/", &body).await.status(),
            StatusCode::UNAUTHORIZED
        );
    }
    // Good requests do not count.
    setup.call("system_chain", json!([])).await;
    assert!(
        setup.blocks.try_recv().is_err(),
        "blocked before the third failure"
    );
    assert_eq!(
        setup.post("/lbk_wrong", &body).await.status(),
        StatusCode::UNAUTHORIZED
    );
    let request = tokio::time::timeout(PATIENCE, setup.blocks.recv())
        .await
        .expect("a block request")
        .expect("the channel is open");
    assert_eq!(request.prefix.to_string(), "127.0.0.1/32");
    assert!(request.until > std::time::SystemTime::now() + Duration::from_secs(590));
}

#[tokio::test]
async fn answers_the_chain_fixes_are_served_from_the_cache() {
    let setup = Setup::start(1).await;
    let genesis = setup.call("chain_getBlockHash", json!([0])).await["result"].clone();
    let node = &setup.nodes[0];
    for _ in 0..3 {
        // Fixed by its block hash: one node call, whoever asks.
        let header = setup.call("chain_getHeader", json!([genesis])).await;
        assert_eq!(header["result"]["number"], "0x0", "{header}");
        // Changes only with a runtime upgrade.
        assert_eq!(
            setup.call("system_chain", json!([])).await["result"],
            "Development"
        );
    }
    assert_eq!(node.request_count("chain_getBlockHash"), 1);
    assert_eq!(node.request_count("chain_getHeader"), 1);
    assert_eq!(node.request_count("system_chain"), 1);
    // A null result (a block the chain has not reached) is never kept.
    for _ in 0..2 {
        let answer = setup.call("chain_getBlockHash", json!([1_000_000])).await;
        assert_eq!(answer["result"], Value::Null, "{answer}");
    }
    assert_eq!(node.request_count("chain_getBlockHash"), 3);
    let metrics = setup.metrics_text();
    assert!(
        metrics.contains("lb_gateway_cache_lookups_total{result=\"hit\"} 4"),
        "{metrics}"
    );
}

#[tokio::test]
async fn identical_concurrent_requests_share_one_node_call() {
    let setup = Setup::start(1).await;
    let genesis = setup.call("chain_getBlockHash", json!([0])).await["result"].clone();
    // Slow answers keep the first call in flight while the others arrive.
    setup.nodes[0].set_fault(Fault::Slow { delay_ms: 300 });
    let calls = (0..100).map(|_| setup.call("chain_getBlock", json!([genesis])));
    let answers = futures_util::future::join_all(calls).await;
    for answer in &answers {
        assert_eq!(answer["result"]["block"]["header"]["number"], "0x0");
    }
    assert_eq!(setup.nodes[0].request_count("chain_getBlock"), 1);
}

#[tokio::test]
async fn revoked_key_gets_401_at_its_next_request_on_an_open_connection() {
    let setup = Setup::start(1).await;
    let created = setup
        .keys
        .create("keep-alive", None, KeyCaps::default())
        .expect("key");
    // One client, one kept-alive connection for both requests.
    let client = setup.client();
    let url = setup.url(&format!("/{}", created.secret));
    let body = request(1, "system_chain", json!([]));
    let before = client.post(&url).json(&body).send().await.expect("request");
    assert_eq!(before.status(), StatusCode::OK);
    setup.keys.revoke(created.record.id).expect("revoked");
    let after = client.post(&url).json(&body).send().await.expect("request");
    assert_eq!(after.status(), StatusCode::UNAUTHORIZED);
    let answer: Value = after.json().await.expect("JSON-RPC error body");
    assert_eq!(error_code(&answer), -32001, "{answer}");
}

#[tokio::test]
async fn made_up_and_malformed_keys_get_401_without_a_store_query_while_valid_keys_are_served() {
    const REQUESTS: usize = 10_000;
    const CONCURRENCY: usize = 16;
    let setup = Setup::start(1).await;
    let client = setup.client();
    let body = request(1, "system_chain", json!([]));
    // Served once first, so the valid calls below come from the cache.
    setup.call("system_chain", json!([])).await;
    let salt = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos();
    let path = |index: usize| -> (String, StatusCode) {
        let made_up = hex::encode(lb_control::keys::digest(&format!("{salt}-{index}")));
        match index % 8 {
            // Every eighth a valid key, served meanwhile.
            0 => (format!("/{}", setup.secret), StatusCode::OK),
            1 => (format!("/lbk_{}", &made_up[..40]), StatusCode::UNAUTHORIZED),
            2 => (
                format!("/lbk_{}", made_up.to_uppercase()),
                StatusCode::UNAUTHORIZED,
            ),
            3 => (format!("/key_{made_up}"), StatusCode::UNAUTHORIZED),
            _ => (format!("/lbk_{made_up}"), StatusCode::UNAUTHORIZED),
        }
    };
    let before = setup.store.calls();
    let started = Instant::now();
    let mut next = 0;
    while next < REQUESTS {
        let batch: Vec<_> = (next..REQUESTS.min(next + CONCURRENCY))
            .map(|index| {
                let (path, expected) = path(index);
                let request = client.post(setup.url(&path)).json(&body).send();
                async move {
                    let response = request.await.expect("request");
                    assert_eq!(response.status(), expected, "{path}");
                    let answer: Value = response.json().await.expect("JSON");
                    if expected == StatusCode::OK {
                        assert_eq!(answer["result"], "Development", "{answer}");
                    } else {
                        assert_eq!(error_code(&answer), -32001, "{path}: {answer}");
                    }
                }
            })
            .collect();
        next += batch.len();
        futures_util::future::join_all(batch).await;
    }
    let took = started.elapsed();
    let after = setup.store.calls();
    eprintln!("{REQUESTS} requests in {took:?}; store calls {before:?} -> {after:?}");
    assert_eq!(after.reads, before.reads, "a key check read the store");
    // The valid key's last use is written once a second at most, never per request.
    let flushes = took.as_secs() + 2;
    assert!(
        after.writes - before.writes <= flushes,
        "{} store writes in {took:?}",
        after.writes - before.writes
    );
    let metrics = setup.metrics_text();
    for (reason, count) in [
        ("malformed", 3 * REQUESTS / 8),
        ("unknown", 4 * REQUESTS / 8),
    ] {
        let line = format!("lb_gateway_auth_failures_total{{reason=\"{reason}\"}} {count}");
        assert!(metrics.contains(&line), "no {line} in:\n{metrics}");
    }
}

#[tokio::test]
async fn health_needs_no_key_and_says_whether_a_node_can_serve() {
    let setup = Setup::start(2).await;
    let client = setup.client();
    let health = || async {
        let response = client
            .get(setup.url("/health"))
            .send()
            .await
            .expect("request");
        let status = response.status();
        (status, response.json::<Value>().await.expect("JSON"))
    };
    assert_eq!(
        health().await,
        (StatusCode::OK, json!({"status": "ok", "nodes": 2}))
    );
    assert_eq!(setup.node_requests(), 0, "a health probe reaches no node");
    setup.set_states(|_| Some(lb_control::backends::State::Down));
    poll::until("the gateway has no node left", || async {
        health().await.0 == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    assert_eq!(
        health().await,
        (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "unavailable", "nodes": 0})
        )
    );
}

/// Whether the gateway answers a GET on `stream` (405: JSON-RPC takes POST), i.e. serves it.
async fn answers_a_get(stream: &mut (impl AsyncReadExt + AsyncWriteExt + Unpin)) -> bool {
    if stream
        .write_all(b"GET / HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 64];
    matches!(stream.read(&mut buf).await, Ok(n) if buf[..n].starts_with(b"HTTP/1.1 405"))
}
