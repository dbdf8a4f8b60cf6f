//! sim-node, end to end over real sockets on 127.0.0.1: every method's shape over HTTP and
//! WebSocket, the chain, subscriptions, the new spec's chainHead follow, operations, pinning and
//! transactions, Substrate's connection and subscription limits, every fault, the health
//! endpoints, the control API and the binary.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use lb_tests::poll::{self, PATIENCE};
use lb_tests::sim_node::{
    BlockNumber, ChainHeadLimits, ControlClient, Fault, NODE_ID_HEADER, SimNode, SimNodeConfig,
    SimNodeHandle,
};
use lb_tests::ws_client::WsClient;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio_tungstenite::MaybeTlsStream;

const SYSTEM_NUMBER_KEY: &str =
    "0x26aa394eea5630e07c48ae0c9558cef702a5c1b19ab7a04f536c519aca4983ac";
/// `:code`, the runtime.
const CODE_KEY: &str = "0x3a636f6465";
/// `:unset`, a key nothing writes.
const UNSET_KEY: &str = "0x3a756e736574";
/// `twox128("System")`: the prefix of System.Number.
const SYSTEM_PREFIX: &str = "0x26aa394eea5630e07c48ae0c9558cef7";
/// The new JSON-RPC spec's methods a Substrate node serves (and lists in `rpc_methods`).
const NEW_SPEC_METHODS: &[&str] = &[
    "chainHead_v1_body",
    "chainHead_v1_call",
    "chainHead_v1_continue",
    "chainHead_v1_follow",
    "chainHead_v1_header",
    "chainHead_v1_stopOperation",
    "chainHead_v1_storage",
    "chainHead_v1_unfollow",
    "chainHead_v1_unpin",
    "chainSpec_v1_chainName",
    "chainSpec_v1_genesisHash",
    "chainSpec_v1_properties",
    "transactionWatch_v1_submitAndWatch",
    "transactionWatch_v1_unwatch",
    "transaction_v1_broadcast",
    "transaction_v1_stop",
];
/// A decodable extrinsic: length 3, format version 4 unsigned, then call bytes.
const EXTRINSIC: &str = "0x0c040300";
/// Long enough that the best block does not move while a shape test runs.
const STEADY_BLOCK_TIME: Duration = Duration::from_secs(3600);
const FAST_BLOCK_TIME: Duration = Duration::from_millis(50);

async fn start_node(id: &str, block_time: Duration) -> SimNodeHandle {
    let mut config = SimNodeConfig::new(id);
    config.block_time = block_time;
    config.control_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    SimNode::start(config).await.expect("sim-node starts")
}

fn request(method: &str, params: Value) -> Value {
    json!({ "jsonrpc": "2.0", "id": 1, "method": method, "params": params })
}

async fn http_post(node: &SimNodeHandle, body: &Value) -> Value {
    reqwest::Client::new()
        .post(node.http_url())
        .json(body)
        .send()
        .await
        .expect("HTTP request")
        .json()
        .await
        .expect("JSON response")
}

async fn http_call(node: &SimNodeHandle, method: &str, params: Value) -> Value {
    http_post(node, &request(method, params)).await
}

fn block_number(header: &Value) -> BlockNumber {
    let hex = header["number"].as_str().expect("number is a string");
    BlockNumber::from_str_radix(hex.strip_prefix("0x").expect("0x prefix"), 16).expect("hex number")
}

fn is_hash(value: &Value) -> bool {
    value
        .as_str()
        .is_some_and(|s| s.len() == 66 && s.starts_with("0x"))
}

/// Checks one method's answer; `answer` is the full JSON-RPC response.
fn check_answer(node: &SimNodeHandle, method: &str, params: &Value, answer: &Value) {
    let context = format!("{method} {params}: {answer}");
    let result = &answer["result"];
    let best = node.best_number();
    match method {
        "rpc_methods" => {
            let methods: Vec<&str> = result["methods"]
                .as_array()
                .expect(&context)
                .iter()
                .filter_map(Value::as_str)
                .collect();
            for served in [
                "chain_getHeader",
                "chain_subscribeNewHead",
                "state_call",
                "system_health",
            ]
            .iter()
            .chain(NEW_SPEC_METHODS)
            {
                assert!(methods.contains(served), "{served}: {context}");
            }
            assert!(
                !methods.iter().any(|method| method.starts_with("archive_")),
                "lists only what it serves (not an archive node): {context}"
            );
            assert!(methods.windows(2).all(|w| w[0] < w[1]), "sorted: {context}");
        }
        "system_health" => {
            assert_eq!(
                *result,
                json!({ "peers": 8, "isSyncing": false, "shouldHavePeers": true }),
                "{context}"
            )
        }
        "system_chain" | "system_name" | "system_version" => {
            assert!(result.is_string(), "{context}")
        }
        "system_properties" | "chainSpec_v1_properties" => assert_eq!(
            *result,
            json!({ "ss58Format": 42, "tokenDecimals": 12, "tokenSymbol": "DEV" }),
            "{context}"
        ),
        "chainSpec_v1_chainName" => assert_eq!(*result, "Development", "{context}"),
        "chainSpec_v1_genesisHash" => {
            assert_eq!(*result, json!(node.block_hash(0)), "{context}")
        }
        "system_syncState" => {
            assert_eq!(result["currentBlock"], best, "{context}");
            assert_eq!(result["highestBlock"], best, "{context}");
        }
        "system_localPeerId" => {
            assert_eq!(result, node.peer_id(), "{context}");
            assert!(node.peer_id().starts_with("12D3KooW"), "{context}");
        }
        "chain_getHeader" if params == &json!([node.block_hash(5)]) => {
            assert_eq!(result["number"], "0x5", "{context}");
            assert_eq!(result["parentHash"], json!(node.block_hash(4)), "{context}");
        }
        "chain_getHeader" => {
            assert_eq!(block_number(result), best, "{context}");
            for field in ["parentHash", "stateRoot", "extrinsicsRoot"] {
                assert!(is_hash(&result[field]), "{field}: {context}");
            }
            assert_eq!(
                result["digest"]["logs"].as_array().map(Vec::len),
                Some(2),
                "{context}"
            );
        }
        "chain_getBlock" => {
            assert_eq!(block_number(&result["block"]["header"]), best, "{context}");
            let extrinsics = result["block"]["extrinsics"].as_array().expect(&context);
            assert!(
                extrinsics[0]
                    .as_str()
                    .is_some_and(|x| x.starts_with("0x280403")),
                "{context}"
            );
            assert_eq!(result["justifications"], Value::Null, "{context}");
        }
        "chain_getBlockHash" if params == &json!([[1, "0x2"]]) => {
            assert_eq!(
                *result,
                json!([node.block_hash(1), node.block_hash(2)]),
                "{context}"
            )
        }
        "chain_getBlockHash" if params == &json!([u32::MAX]) => {
            assert_eq!(*result, Value::Null, "a block beyond best: {context}")
        }
        "chain_getBlockHash" if params == &json!([5]) || params == &json!(["0x5"]) => {
            assert_eq!(*result, json!(node.block_hash(5)), "{context}")
        }
        "chain_getBlockHash" | "chain_getHead" => {
            assert_eq!(*result, json!(node.block_hash(best)), "{context}")
        }
        "chain_getFinalizedHead" | "chain_getFinalisedHead" => {
            assert_eq!(*result, json!(node.block_hash(best - 2)), "{context}")
        }
        "state_getRuntimeVersion" | "chain_getRuntimeVersion" => {
            assert_eq!(result["specName"], "node", "{context}");
            assert_eq!(result["specVersion"], 268, "{context}");
            assert_eq!(result["transactionVersion"], 2, "{context}");
        }
        "state_getMetadata" => {
            assert!(
                result
                    .as_str()
                    .is_some_and(|m| m.starts_with("0x6d6574610e")),
                "meta + V14: {method}"
            )
        }
        "state_call" => {
            let function = params[0].as_str().expect(&context);
            let output = result.as_str().expect(&context);
            match (function, params[1].as_str()) {
                // spec_name "node" with its compact length.
                ("Core_version", _) => assert!(output.starts_with("0x106e6f6465"), "{context}"),
                ("Metadata_metadata_versions", _) => {
                    assert_eq!(output, "0x0c0e0000000f00000010000000")
                }
                ("Metadata_metadata", _) => assert_eq!(&output[10..20], "6d6574610e", "{method}"),
                ("Metadata_metadata_at_version", Some("0x10000000")) => {
                    assert!(
                        output.starts_with("0x01") && output[4..30].contains("6d65746110"),
                        "{method}"
                    )
                }
                ("Metadata_metadata_at_version", _) => assert_eq!(output, "0x00", "{context}"),
                _ => panic!("unchecked {context}"),
            }
        }
        "state_getStorage" if params[0] == UNSET_KEY => {
            assert_eq!(*result, Value::Null, "{context}")
        }
        // The runtime: a WebAssembly module (a stand-in, see sim_node::runtime).
        "state_getStorage" if params[0] == CODE_KEY => assert!(
            result
                .as_str()
                .is_some_and(|code| code.starts_with("0x0061736d")),
            "{context}"
        ),
        "state_getStorage" => assert_eq!(
            *result,
            json!(format!("0x{}", hex::encode(best.to_le_bytes())))
        ),
        "state_queryStorageAt" => {
            let expected_number = format!("0x{}", hex::encode(best.to_le_bytes()));
            assert_eq!(
                *result,
                json!([{ "block": node.block_hash(best), "changes": [[SYSTEM_NUMBER_KEY, expected_number], [UNSET_KEY, null]] }]),
                "{context}"
            );
        }
        "author_submitExtrinsic" => assert_eq!(
            *result,
            // blake2b-256 of 0x1234, the transaction hash a real node returns.
            "0x35826d51e070a6d9ac7e69df455191dc02f66678879a12511f5a91d8befacb11",
            "{context}"
        ),
        "author_pendingExtrinsics" => assert_eq!(*result, json!([]), "{context}"),
        _ => panic!("no check for {context}"),
    }
}

fn method_cases(node: &SimNodeHandle) -> Vec<(&'static str, Value)> {
    vec![
        ("rpc_methods", json!([])),
        ("system_health", json!([])),
        ("system_chain", json!([])),
        ("system_name", json!([])),
        ("system_version", json!([])),
        ("system_properties", json!([])),
        ("system_syncState", json!([])),
        ("system_localPeerId", json!([])),
        ("chain_getHeader", json!([])),
        ("chain_getHeader", json!([node.block_hash(5)])),
        ("chain_getBlock", json!([])),
        ("chain_getBlockHash", json!([])),
        ("chain_getBlockHash", json!([5])),
        ("chain_getBlockHash", json!(["0x5"])),
        ("chain_getBlockHash", json!([[1, "0x2"]])),
        ("chain_getBlockHash", json!([u32::MAX])),
        ("chain_getHead", json!([])),
        ("chain_getFinalizedHead", json!([])),
        ("chain_getFinalisedHead", json!([])),
        ("state_getRuntimeVersion", json!([])),
        ("chain_getRuntimeVersion", json!([])),
        ("state_getMetadata", json!([])),
        ("state_call", json!(["Core_version", "0x"])),
        ("state_call", json!(["Metadata_metadata", "0x"])),
        ("state_call", json!(["Metadata_metadata_versions", "0x"])),
        (
            "state_call",
            json!(["Metadata_metadata_at_version", "0x10000000"]),
        ),
        (
            "state_call",
            json!(["Metadata_metadata_at_version", "0x11000000"]),
        ),
        ("state_getStorage", json!([SYSTEM_NUMBER_KEY])),
        ("state_getStorage", json!([UNSET_KEY])),
        ("state_getStorage", json!([CODE_KEY])),
        (
            "state_queryStorageAt",
            json!([[SYSTEM_NUMBER_KEY, UNSET_KEY]]),
        ),
        ("author_submitExtrinsic", json!(["0x1234"])),
        ("author_pendingExtrinsics", json!([])),
        ("chainSpec_v1_chainName", json!([])),
        ("chainSpec_v1_genesisHash", json!([])),
        ("chainSpec_v1_properties", json!([])),
    ]
}

#[tokio::test]
async fn every_method_answers_with_the_node_shape_over_http() {
    let node = start_node("shapes-http", STEADY_BLOCK_TIME).await;
    for (method, params) in method_cases(&node) {
        let answer = http_call(&node, method, params.clone()).await;
        check_answer(&node, method, &params, &answer);
    }
}

#[tokio::test]
async fn every_method_answers_with_the_node_shape_over_websocket() {
    let node = start_node("shapes-ws", STEADY_BLOCK_TIME).await;
    let mut ws = WsClient::connect(&node.ws_url()).await;
    for (method, params) in method_cases(&node) {
        let answer = ws.call(method, params.clone()).await;
        check_answer(&node, method, &params, &answer);
    }
}

#[tokio::test]
async fn unknown_blocks_answer_null_for_chain_lookups_and_an_error_for_state() {
    let node = start_node("unknown-blocks", STEADY_BLOCK_TIME).await;
    let unknown = format!("0x{}", "ab".repeat(32));
    let future_block = node.block_hash(node.best_number() + 100);
    for hash in [json!(unknown), json!(future_block)] {
        assert_eq!(
            http_call(&node, "chain_getHeader", json!([hash])).await["result"],
            Value::Null
        );
        assert_eq!(
            http_call(&node, "chain_getBlock", json!([hash])).await["result"],
            Value::Null
        );
        let state = http_call(&node, "state_getStorage", json!([SYSTEM_NUMBER_KEY, hash])).await;
        assert_eq!(state["error"]["code"], 4003, "{state}");
    }
    let malformed = http_call(&node, "chain_getHeader", json!(["0x1234"])).await;
    assert_eq!(malformed["error"]["code"], -32602, "{malformed}");
    let too_big = http_call(&node, "chain_getBlockHash", json!(["0x100000000"])).await;
    assert_eq!(too_big["error"]["code"], 3001, "{too_big}");
    let bad_call = http_call(&node, "state_call", json!(["Nope_nope", "0x"])).await;
    assert_eq!(bad_call["error"]["code"], 4003, "{bad_call}");
    let bad_extrinsic = http_call(&node, "author_submitExtrinsic", json!(["0xzz"])).await;
    assert_eq!(bad_extrinsic["error"]["code"], -32602, "{bad_extrinsic}");
}

#[tokio::test]
async fn unsafe_methods_are_refused_as_a_safe_rpc_node_does() {
    let node = start_node("unsafe", STEADY_BLOCK_TIME).await;
    for method in [
        "author_insertKey",
        "author_rotateKeys",
        "author_hasSessionKeys",
        "author_hasKey",
        "system_addReservedPeer",
        "system_removeReservedPeer",
    ] {
        let answer = http_call(&node, method, json!([])).await;
        assert_eq!(
            answer["error"],
            json!({ "code": -32601, "message": "RPC call is unsafe to be called externally" }),
            "{method}"
        );
    }
    // The state API's unsafe methods answer inside its error type: code 4003
    // (polkadot-sdk substrate/client/rpc-api/src/state/error.rs:52,67).
    let answer = http_call(&node, "state_getPairs", json!([])).await;
    assert_eq!(
        answer["error"],
        json!({ "code": 4003, "message": "RPC call is unsafe to be called externally" })
    );
}

#[tokio::test]
async fn string_ids_missing_params_and_batches_work() {
    let node = start_node("ids", STEADY_BLOCK_TIME).await;
    let answer = http_post(
        &node,
        &json!({ "jsonrpc": "2.0", "id": "abc-1", "method": "chain_getHeader" }),
    )
    .await;
    assert_eq!(answer["id"], "abc-1");
    assert_eq!(block_number(&answer["result"]), node.best_number());

    let mut ws = WsClient::connect(&node.ws_url()).await;
    ws.send_text(r#"{"jsonrpc":"2.0","id":"ws-id","method":"system_health"}"#.to_owned())
        .await;
    let answer = ws.next_message().await.expect("answer");
    assert_eq!(answer["id"], "ws-id");
    assert_eq!(answer["result"]["peers"], 8);

    let batch = json!([
        request("system_chain", json!([])),
        request("chain_getHead", json!([]))
    ]);
    let answers = http_post(&node, &batch).await;
    assert_eq!(answers.as_array().map(Vec::len), Some(2), "{answers}");
    assert_eq!(node.request_count("chain_getHead"), 1);
}

#[tokio::test]
async fn malformed_requests_get_json_rpc_errors_and_the_node_keeps_serving() {
    let node = start_node("malformed", STEADY_BLOCK_TIME).await;
    let client = reqwest::Client::new();
    let garbage = client
        .post(node.http_url())
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .expect("HTTP request");
    let garbage: Value = garbage.json().await.expect("JSON error body");
    assert_eq!(garbage["error"]["code"], -32700);
    let unknown = http_call(&node, "no_such_method", json!([])).await;
    assert_eq!(
        unknown["error"],
        json!({ "code": -32601, "message": "Method not found" })
    );
    let wrong_type = http_call(&node, "state_call", json!([1, 2])).await;
    assert_eq!(wrong_type["error"]["code"], -32602);
    let subscribe_over_http = http_call(&node, "chain_subscribeNewHeads", json!([])).await;
    assert!(
        subscribe_over_http["error"].is_object(),
        "{subscribe_over_http}"
    );
    assert_eq!(
        http_call(&node, "system_health", json!([])).await["result"]["peers"],
        8
    );
}

#[tokio::test]
async fn chain_advances_and_nodes_agree_on_every_hash() {
    let a = start_node("agree-a", FAST_BLOCK_TIME).await;
    let b = start_node("agree-b", FAST_BLOCK_TIME).await;
    let start = block_number(&http_call(&a, "chain_getHeader", json!([])).await["result"]);
    poll::until("the chain grows 3 blocks", || async {
        block_number(&http_call(&a, "chain_getHeader", json!([])).await["result"]) >= start + 3
    })
    .await;
    for number in [start, start + 1, start + 2] {
        let from_a = http_call(&a, "chain_getBlockHash", json!([number])).await["result"].clone();
        let from_b = http_call(&b, "chain_getBlockHash", json!([number])).await["result"].clone();
        assert_eq!(from_a, from_b, "block {number}");
        let child = http_call(&b, "chain_getHeader", json!([b.block_hash(number + 1)])).await;
        // Every 2048 blocks the parent hash is sim-node's segment link (a stand-in that keeps
        // hashing cheap, see sim_node::chain), not the parent's own hash; either way it must
        // resolve to the parent block on every node.
        let parent_hash = child["result"]["parentHash"].clone();
        let parent = http_call(&a, "chain_getHeader", json!([parent_hash])).await;
        let by_hash = http_call(&a, "chain_getHeader", json!([from_a])).await;
        assert!(by_hash["result"].is_object(), "{by_hash}");
        assert_eq!(
            parent["result"], by_hash["result"],
            "block {number} is the parent of the next"
        );
    }
}

#[tokio::test]
async fn subscriptions_deliver_increasing_heads_and_the_runtime_version() {
    let node = start_node("subscriptions", FAST_BLOCK_TIME).await;
    let mut ws = WsClient::connect(&node.ws_url()).await;
    // polkadot.js subscribes with the alias.
    let subscribed = ws.call("chain_subscribeNewHead", json!([])).await;
    let subscription = subscribed["result"].clone();
    assert!(subscription.is_string(), "{subscribed}");
    let mut numbers = Vec::new();
    while numbers.len() < 3 {
        let notification = ws.notification().await;
        assert_eq!(notification["method"], "chain_newHead", "{notification}");
        assert_eq!(notification["params"]["subscription"], subscription);
        numbers.push(block_number(&notification["params"]["result"]));
    }
    assert!(
        numbers.windows(2).all(|w| w[0] < w[1]),
        "increasing: {numbers:?}"
    );
    let unsubscribed = ws
        .call("chain_unsubscribeNewHeads", json!([subscription]))
        .await;
    assert_eq!(unsubscribed["result"], true);

    let mut ws = WsClient::connect(&node.ws_url()).await;
    let finalized = ws.call("chain_subscribeFinalizedHeads", json!([])).await;
    assert!(finalized["result"].is_string(), "{finalized}");
    let first = ws.notification().await;
    assert_eq!(first["method"], "chain_finalizedHead");
    let second = ws.notification().await;
    assert!(block_number(&second["params"]["result"]) > block_number(&first["params"]["result"]));

    let mut ws = WsClient::connect(&node.ws_url()).await;
    ws.call("state_subscribeRuntimeVersion", json!([])).await;
    let version = ws.notification().await;
    assert_eq!(version["method"], "state_runtimeVersion");
    assert_eq!(version["params"]["result"]["specVersion"], 268);

    let mut ws = WsClient::connect(&node.ws_url()).await;
    ws.call("state_subscribeStorage", json!([[SYSTEM_NUMBER_KEY]]))
        .await;
    let initial = ws.notification().await;
    assert_eq!(initial["method"], "state_storage");
    let next = ws.notification().await;
    assert_ne!(
        initial["params"]["result"]["block"],
        next["params"]["result"]["block"]
    );
}

#[tokio::test]
async fn health_endpoints_follow_substrate_and_name_the_node() {
    let node = start_node("health-node", STEADY_BLOCK_TIME).await;
    let client = reqwest::Client::new();
    let health = client
        .get(format!("{}/health", node.http_url()))
        .send()
        .await
        .expect("GET /health");
    assert_eq!(health.status(), 200);
    assert_eq!(health.headers()[NODE_ID_HEADER], "health-node");
    let body: Value = health.json().await.expect("JSON");
    assert_eq!(
        body,
        json!({ "peers": 8, "isSyncing": false, "shouldHavePeers": true })
    );
    let ready = client
        .get(format!("{}/health/readiness", node.http_url()))
        .send()
        .await
        .expect("GET");
    assert_eq!(ready.status(), 200);
    let post = client
        .post(format!("{}/health", node.http_url()))
        .send()
        .await
        .expect("POST");
    assert_eq!(post.status(), 405);
    let rpc = client
        .post(node.http_url())
        .json(&request("system_chain", json!([])))
        .send()
        .await
        .expect("RPC");
    assert_eq!(rpc.headers()[NODE_ID_HEADER], "health-node");
    assert_eq!(
        node.request_count("system_health"),
        2,
        "/health is proxied to system_health"
    );
}

async fn readiness_status(node: &SimNodeHandle) -> u16 {
    reqwest::get(format!("{}/health/readiness", node.http_url()))
        .await
        .expect("GET /health/readiness")
        .status()
        .as_u16()
}

#[tokio::test]
async fn syncing_fault_reports_syncing_and_fails_readiness() {
    let node = start_node("syncing", STEADY_BLOCK_TIME).await;
    node.set_fault(Fault::Syncing);
    assert_eq!(
        http_call(&node, "system_health", json!([])).await["result"]["isSyncing"],
        true
    );
    assert_eq!(readiness_status(&node).await, 500);
    node.clear_faults();
    assert_eq!(readiness_status(&node).await, 200);
}

#[tokio::test]
async fn no_peers_fault_reports_zero_peers_and_fails_readiness() {
    let node = start_node("lonely", STEADY_BLOCK_TIME).await;
    node.set_fault(Fault::NoPeers);
    assert_eq!(
        http_call(&node, "system_health", json!([])).await["result"]["peers"],
        0
    );
    assert_eq!(readiness_status(&node).await, 500);
}

#[tokio::test]
async fn unresponsive_fault_makes_requests_time_out_until_cleared() {
    let node = start_node("hung", STEADY_BLOCK_TIME).await;
    node.set_fault(Fault::Unresponsive);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .expect("client");
    let error = client
        .post(node.http_url())
        .json(&request("system_health", json!([])))
        .send()
        .await
        .expect_err("no answer while unresponsive");
    assert!(error.is_timeout(), "{error}");
    let health = client
        .get(format!("{}/health", node.http_url()))
        .send()
        .await;
    assert!(
        health.is_err_and(|error| error.is_timeout()),
        "/health hangs too"
    );
    node.clear_faults();
    assert_eq!(
        http_call(&node, "system_health", json!([])).await["result"]["peers"],
        8
    );
}

#[tokio::test]
async fn slow_fault_delays_every_answer() {
    let node = start_node("slow", STEADY_BLOCK_TIME).await;
    node.set_fault(Fault::Slow { delay_ms: 400 });
    let started = Instant::now();
    http_call(&node, "system_health", json!([])).await;
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );
    let mut ws = WsClient::connect(&node.ws_url()).await;
    let started = Instant::now();
    ws.call("chain_getHead", json!([])).await;
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn concurrent_calls_are_counted_while_in_flight() {
    let node = start_node("busy", STEADY_BLOCK_TIME).await;
    node.set_fault(Fault::Slow { delay_ms: 300 });
    let calls = (0..5).map(|_| http_call(&node, "system_health", json!([])));
    futures_util::future::join_all(calls).await;
    assert_eq!(node.most_calls_in_flight(), 5);
    node.reset_request_counts();
    assert_eq!(
        node.most_calls_in_flight(),
        0,
        "none in flight after the reset"
    );
    http_call(&node, "system_health", json!([])).await;
    assert_eq!(node.most_calls_in_flight(), 1);
}

#[tokio::test]
async fn stall_fault_stops_the_head_while_the_chain_moves_on() {
    let stalled = start_node("stalled", FAST_BLOCK_TIME).await;
    let healthy = start_node("healthy", FAST_BLOCK_TIME).await;
    stalled.set_fault(Fault::Stall);
    let stalled_at =
        block_number(&http_call(&stalled, "chain_getHeader", json!([])).await["result"]);
    poll::until("the chain moves 5 blocks past the stall", || async {
        block_number(&http_call(&healthy, "chain_getHeader", json!([])).await["result"])
            >= stalled_at + 5
    })
    .await;
    let now = block_number(&http_call(&stalled, "chain_getHeader", json!([])).await["result"]);
    assert_eq!(now, stalled_at);
    stalled.clear_faults();
    assert!(
        block_number(&http_call(&stalled, "chain_getHeader", json!([])).await["result"])
            >= stalled_at + 5
    );
}

#[tokio::test]
async fn behind_fault_keeps_the_best_block_n_below_other_nodes() {
    let behind = start_node("behind", STEADY_BLOCK_TIME).await;
    let healthy = start_node("ahead", STEADY_BLOCK_TIME).await;
    behind.set_fault(Fault::Behind { blocks: 10 });
    let behind_best =
        block_number(&http_call(&behind, "chain_getHeader", json!([])).await["result"]);
    let healthy_best =
        block_number(&http_call(&healthy, "chain_getHeader", json!([])).await["result"]);
    assert_eq!(behind_best + 10, healthy_best);
    let finalized = http_call(&behind, "chain_getFinalizedHead", json!([])).await;
    assert_eq!(
        finalized["result"],
        json!(behind.block_hash(behind_best - 2))
    );
    let status = ControlClient::new(behind.control_addr().expect("control"))
        .status()
        .await
        .expect("status");
    assert_eq!(status.best + 10, status.chain_best);
}

#[tokio::test]
async fn close_connections_fault_drops_open_and_new_connections() {
    let node = start_node("closing", STEADY_BLOCK_TIME).await;
    let mut ws = WsClient::connect(&node.ws_url()).await;
    ws.call("system_health", json!([])).await;
    node.set_fault(Fault::CloseConnections);
    assert_eq!(ws.next_message().await, None, "open WebSocket is closed");
    let refused = reqwest::Client::new()
        .post(node.http_url())
        .json(&request("system_health", json!([])))
        .send()
        .await;
    assert!(
        refused.is_err_and(|error| error.is_connect() || error.is_request()),
        "new connection dropped"
    );
    node.clear_faults();
    assert_eq!(
        http_call(&node, "system_health", json!([])).await["result"]["peers"],
        8
    );
}

#[tokio::test]
async fn exit_fault_from_the_control_api_stops_the_server() {
    let mut node = start_node("exiting", STEADY_BLOCK_TIME).await;
    let rpc_addr = node.rpc_addr();
    let control = ControlClient::new(node.control_addr().expect("control"));
    control.set_fault(Fault::Exit).await.expect("exit accepted");
    tokio::time::timeout(PATIENCE, node.stopped())
        .await
        .expect("node stops");
    assert!(
        TcpStream::connect(rpc_addr).await.is_err(),
        "JSON-RPC port closed"
    );
}

#[tokio::test]
async fn control_api_reports_counts_and_validates_faults() {
    let node = start_node("counted", STEADY_BLOCK_TIME).await;
    let control_addr = node.control_addr().expect("control");
    let control = ControlClient::new(control_addr);
    let status = control.status().await.expect("status");
    assert_eq!(status.id, "counted");
    assert_eq!(status.total_requests(), 0, "nothing reached the node yet");
    http_call(&node, "chain_getHead", json!([])).await;
    http_call(&node, "chain_getHead", json!([])).await;
    let status = control
        .set_fault(Fault::Slow { delay_ms: 5 })
        .await
        .expect("fault");
    assert_eq!(status.requests.get("chain_getHead"), Some(&2));
    assert_eq!(status.faults, [Fault::Slow { delay_ms: 5 }]);
    let status = control.clear_faults().await.expect("clear");
    assert!(status.faults.is_empty());
    assert_eq!(
        control
            .reset_requests()
            .await
            .expect("reset")
            .total_requests(),
        0
    );
    let bad = reqwest::Client::new()
        .post(format!("http://{control_addr}/fault"))
        .header("content-type", "application/json")
        .body(r#"{"fault":"melt"}"#)
        .send()
        .await
        .expect("control reachable");
    assert!(bad.status().is_client_error(), "{}", bad.status());
}

/// A `sim-node` process and the addresses it printed.
struct NodeProcess {
    child: tokio::process::Child,
    rpc: SocketAddr,
    control: SocketAddr,
}

async fn spawn_binary() -> NodeProcess {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sim-node"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--control",
            "127.0.0.1:0",
            "--id",
            "bin",
            "--block-time-ms",
            "100",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("sim-node binary starts");
    let stdout = child.stdout.take().expect("stdout piped");
    let line = tokio::time::timeout(PATIENCE, BufReader::new(stdout).lines().next_line())
        .await
        .expect("listening line in time")
        .expect("stdout readable")
        .expect("a line");
    // "sim-node bin listening: rpc 127.0.0.1:P (http+ws), control 127.0.0.1:Q"
    let words: Vec<&str> = line.split_whitespace().collect();
    let rpc = words.get(4).and_then(|w| w.parse().ok()).expect(&line);
    let control = words.last().and_then(|w| w.parse().ok()).expect(&line);
    NodeProcess {
        child,
        rpc,
        control,
    }
}

#[tokio::test]
async fn binary_serves_and_exits_on_the_exit_fault_set_with_ctl() {
    let mut process = spawn_binary().await;
    let answer: Value = reqwest::Client::new()
        .post(format!("http://{}", process.rpc))
        .json(&request("system_localPeerId", json!([])))
        .send()
        .await
        .expect("RPC")
        .json()
        .await
        .expect("JSON");
    assert!(
        answer["result"]
            .as_str()
            .is_some_and(|id| id.starts_with("12D3KooW")),
        "{answer}"
    );
    let ctl = tokio::process::Command::new(env!("CARGO_BIN_EXE_sim-node"))
        .args([
            "ctl",
            "--control",
            &process.control.to_string(),
            "fault",
            "exit",
        ])
        .output()
        .await
        .expect("sim-node ctl runs");
    assert!(
        ctl.status.success(),
        "{}",
        String::from_utf8_lossy(&ctl.stderr)
    );
    let status = tokio::time::timeout(PATIENCE, process.child.wait())
        .await
        .expect("exits")
        .expect("status");
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn binary_exits_cleanly_on_sigterm() {
    let mut process = spawn_binary().await;
    let pid = process.child.id().expect("running");
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let status = tokio::time::timeout(PATIENCE, process.child.wait())
        .await
        .expect("exits")
        .expect("status");
    assert!(status.success(), "{status}");
}

// --- The new JSON-RPC spec: chainHead, chainSpec, transaction; Substrate's limits. ---

type Ws = WsClient<MaybeTlsStream<TcpStream>>;

async fn start_chain_head_node(
    id: &str,
    block_time: Duration,
    limits: ChainHeadLimits,
) -> SimNodeHandle {
    let mut config = SimNodeConfig::new(id);
    config.block_time = block_time;
    config.chain_head = limits;
    SimNode::start(config).await.expect("sim-node starts")
}

/// A `chainHead_v1_follow` subscription on its own WebSocket.
struct Follow {
    ws: Ws,
    id: Value,
}

impl Follow {
    async fn start(node: &SimNodeHandle, with_runtime: bool) -> Self {
        let mut ws = WsClient::connect(&node.ws_url()).await;
        let answer = ws.call("chainHead_v1_follow", json!([with_runtime])).await;
        assert!(answer["result"].is_string(), "{answer}");
        Follow {
            ws,
            id: answer["result"].clone(),
        }
    }

    /// The next event of this subscription.
    async fn event(&mut self) -> Value {
        let notification = self.ws.notification().await;
        assert_eq!(
            notification["method"], "chainHead_v1_followEvent",
            "{notification}"
        );
        assert_eq!(
            notification["params"]["subscription"], self.id,
            "{notification}"
        );
        notification["params"]["result"].clone()
    }

    /// Reads events up to and including the first `kind`.
    async fn skip_to(&mut self, kind: &str) -> Value {
        loop {
            let event = self.event().await;
            if event["event"] == kind {
                return event;
            }
        }
    }

    /// Calls a chainHead method with this subscription as its first parameter.
    async fn call(&mut self, method: &str, params: Value) -> Value {
        let mut all = vec![self.id.clone()];
        all.extend(params.as_array().expect("params array").iter().cloned());
        self.ws.call(method, Value::Array(all)).await
    }

    /// Starts an operation and returns its id, checking the `started` answer.
    async fn start_operation(&mut self, method: &str, params: Value) -> Value {
        let answer = self.call(method, params).await;
        assert_eq!(answer["result"]["result"], "started", "{method}: {answer}");
        answer["result"]["operationId"].clone()
    }
}

fn hashes_of(event: &Value, field: &str) -> Vec<Value> {
    event[field]
        .as_array()
        .unwrap_or_else(|| panic!("{field} in {event}"))
        .clone()
}

#[tokio::test]
async fn follow_announces_finalized_blocks_then_every_new_best_block_and_each_finalization() {
    let node = start_chain_head_node("follow", FAST_BLOCK_TIME, ChainHeadLimits::default()).await;
    let mut follow = Follow::start(&node, true).await;
    let initialized = follow.event().await;
    assert_eq!(initialized["event"], "initialized", "{initialized}");
    let runtime = &initialized["finalizedBlockRuntime"];
    assert_eq!(runtime["type"], "valid", "{initialized}");
    assert_eq!(runtime["spec"]["specName"], "node");
    assert_eq!(runtime["spec"]["specVersion"], 268);
    assert_eq!(
        runtime["spec"]["apis"]["0xdf6acb689907609b"], 5,
        "Core API by hex id"
    );

    // The 16 latest finalized blocks, oldest first, the last one the finalized block.
    let finalized_hashes = hashes_of(&initialized, "finalizedBlockHashes");
    assert_eq!(finalized_hashes.len(), 16, "{initialized}");
    let last_finalized = block_number(
        &http_call(&node, "chain_getHeader", json!([finalized_hashes[15]])).await["result"],
    );
    for (i, hash) in finalized_hashes.iter().enumerate() {
        assert_eq!(
            *hash,
            json!(node.block_hash(last_finalized - 15 + i as BlockNumber))
        );
    }

    let mut numbers: HashMap<Value, BlockNumber> = finalized_hashes
        .iter()
        .enumerate()
        .map(|(i, hash)| (hash.clone(), last_finalized - 15 + i as BlockNumber))
        .collect();
    let mut finalized = last_finalized;
    let mut best = None;
    let (mut new_blocks, mut finalizations) = (0, 0);
    // The two blocks above the finalized one, then at least four more, and three finalizations.
    while new_blocks < 6 || finalizations < 3 {
        let event = follow.event().await;
        match event["event"].as_str() {
            Some("newBlock") => {
                let parent = numbers
                    .get(&event["parentBlockHash"])
                    .copied()
                    .unwrap_or_else(|| panic!("parent never announced: {event}"));
                assert_eq!(
                    event["blockHash"],
                    json!(node.block_hash(parent + 1)),
                    "{event}"
                );
                assert_eq!(event["newRuntime"], Value::Null, "same runtime: {event}");
                assert!(event.get("newRuntime").is_some(), "withRuntime: {event}");
                numbers.insert(event["blockHash"].clone(), parent + 1);
                new_blocks += 1;
            }
            Some("bestBlockChanged") => {
                let number = numbers
                    .get(&event["bestBlockHash"])
                    .copied()
                    .unwrap_or_else(|| panic!("best never announced: {event}"));
                assert!(
                    best.is_none_or(|best| number > best),
                    "best moves up: {event}"
                );
                best = Some(number);
            }
            Some("finalized") => {
                assert_eq!(event["prunedBlockHashes"], json!([]), "no forks: {event}");
                for hash in hashes_of(&event, "finalizedBlockHashes") {
                    finalized += 1;
                    assert_eq!(
                        numbers.get(&hash),
                        Some(&finalized),
                        "in order, announced: {event}"
                    );
                }
                finalizations += 1;
            }
            _ => panic!("unexpected follow event {event}"),
        }
    }
    assert!(
        best.is_some_and(|best| best >= finalized),
        "finalized {finalized}, best {best:?}"
    );
}

#[tokio::test]
async fn follow_crosses_a_hash_segment_boundary_without_a_gap() {
    // Every 2048 blocks a header names a stand-in parent hash (see sim_node::chain); the follow
    // still links each new block to the block before it, and does not stop.
    let boundary: BlockNumber = 2048;
    let mut config = SimNodeConfig::new("segment-boundary");
    config.block_time = FAST_BLOCK_TIME;
    config.genesis = SystemTime::now() - FAST_BLOCK_TIME * (boundary - 6);
    let node = SimNode::start(config).await.expect("sim-node starts");
    let mut follow = Follow::start(&node, false).await;
    let initialized = follow.event().await;
    assert!(node.best_number() < boundary, "started before the boundary");
    assert_eq!(initialized["event"], "initialized");
    loop {
        let event = follow.event().await;
        assert_ne!(event["event"], "stop", "no gap at the boundary");
        if event["event"] == "finalized"
            && hashes_of(&event, "finalizedBlockHashes").contains(&json!(node.block_hash(boundary)))
        {
            break;
        }
        if event["event"] == "newBlock" && event["blockHash"] == json!(node.block_hash(boundary)) {
            assert_eq!(
                event["parentBlockHash"],
                json!(node.block_hash(boundary - 1)),
                "{event}"
            );
        }
    }
    // chain_getHeader, like the legacy API, shows the stand-in link, which resolves to the parent.
    let header = http_call(&node, "chain_getHeader", json!([node.block_hash(boundary)])).await;
    let parent = http_call(
        &node,
        "chain_getHeader",
        json!([header["result"]["parentHash"]]),
    )
    .await;
    assert_eq!(block_number(&parent["result"]), boundary - 1);
}

#[tokio::test]
async fn follow_without_runtime_reports_no_runtime_and_refuses_runtime_calls() {
    let node =
        start_chain_head_node("no-runtime", STEADY_BLOCK_TIME, ChainHeadLimits::default()).await;
    let mut follow = Follow::start(&node, false).await;
    let initialized = follow.event().await;
    assert_eq!(initialized["event"], "initialized");
    assert!(
        initialized.get("finalizedBlockRuntime").is_none(),
        "{initialized}"
    );
    let new_block = follow.event().await;
    assert_eq!(new_block["event"], "newBlock", "{new_block}");
    assert!(new_block.get("newRuntime").is_none(), "{new_block}");
    let finalized = hashes_of(&initialized, "finalizedBlockHashes")
        .pop()
        .expect("finalized");
    let refused = follow
        .call(
            "chainHead_v1_call",
            json!([finalized, "Core_version", "0x"]),
        )
        .await;
    assert_eq!(refused["error"]["code"], -32802, "{refused}");
}

#[tokio::test]
async fn operations_answer_started_then_an_event_with_their_operation_id() {
    let node =
        start_chain_head_node("operations", STEADY_BLOCK_TIME, ChainHeadLimits::default()).await;
    let mut follow = Follow::start(&node, true).await;
    let initialized = follow.event().await;
    follow.skip_to("bestBlockChanged").await;
    let hash = hashes_of(&initialized, "finalizedBlockHashes")
        .pop()
        .expect("finalized");
    assert_eq!(hash, json!(node.block_hash(node.finalized_number())));

    let body = follow
        .start_operation("chainHead_v1_body", json!([hash]))
        .await;
    let block = http_call(&node, "chain_getBlock", json!([hash])).await;
    assert_eq!(
        follow.event().await,
        json!({ "event": "operationBodyDone", "operationId": body, "value": block["result"]["block"]["extrinsics"] })
    );

    // Runtime calls run the same runtime as state_call.
    let version = follow
        .start_operation("chainHead_v1_call", json!([hash, "Core_version", ""]))
        .await;
    let event = follow.event().await;
    assert_eq!(
        (&event["event"], &event["operationId"]),
        (&json!("operationCallDone"), &version)
    );
    let legacy = http_call(&node, "state_call", json!(["Core_version", "0x", hash])).await;
    assert_eq!(event["output"], legacy["result"], "{event}");
    let metadata = follow
        .start_operation(
            "chainHead_v1_call",
            json!([hash, "Metadata_metadata_at_version", "0x0f000000"]),
        )
        .await;
    let event = follow.event().await;
    assert_eq!(event["operationId"], metadata);
    assert!(
        event["output"]
            .as_str()
            .is_some_and(|output| output.starts_with("0x01")),
        "Some(metadata v15)"
    );
    let missing = follow
        .start_operation("chainHead_v1_call", json!([hash, "Nope_nope", "0x"]))
        .await;
    let event = follow.event().await;
    assert_eq!(event["event"], "operationError", "{event}");
    assert_eq!(event["operationId"], missing);
    assert!(
        event["error"]
            .as_str()
            .is_some_and(|error| error.contains("Exported method Nope_nope is not found")),
        "{event}"
    );

    // Storage: one operationStorageItems per item found, then operationStorageDone.
    let items = json!([
        { "key": SYSTEM_NUMBER_KEY, "type": "value" },
        { "key": SYSTEM_NUMBER_KEY, "type": "hash" },
        { "key": UNSET_KEY, "type": "value" },
        { "key": SYSTEM_PREFIX, "type": "descendantsValues" },
        { "key": SYSTEM_PREFIX, "type": "closestDescendantMerkleValue" },
    ]);
    let storage = follow
        .start_operation("chainHead_v1_storage", json!([hash, items, null]))
        .await;
    let number = format!("0x{}", hex::encode(node.finalized_number().to_le_bytes()));
    let mut found = Vec::new();
    loop {
        let event = follow.event().await;
        assert_eq!(event["operationId"], storage, "{event}");
        match event["event"].as_str() {
            Some("operationStorageItems") => {
                let items = event["items"].as_array().expect("items");
                assert_eq!(items.len(), 1, "one item per event: {event}");
                found.push(items[0].clone());
            }
            Some("operationStorageDone") => break,
            _ => panic!("unexpected {event}"),
        }
    }
    assert_eq!(found.len(), 4, "nothing for the unset key: {found:?}");
    assert_eq!(
        found[0],
        json!({ "key": SYSTEM_NUMBER_KEY, "value": number })
    );
    assert!(is_hash(&found[1]["hash"]), "{found:?}");
    assert_eq!(
        found[2],
        json!({ "key": SYSTEM_NUMBER_KEY, "value": number }),
        "descendant"
    );
    assert_eq!(found[3]["key"], SYSTEM_PREFIX);
    assert!(
        is_hash(&found[3]["closestDescendantMerkleValue"]),
        "{found:?}"
    );

    // The header: SCALE, starting with the parent hash.
    let header = follow.call("chainHead_v1_header", json!([hash])).await;
    let legacy = http_call(&node, "chain_getHeader", json!([hash])).await;
    let parent = legacy["result"]["parentHash"].as_str().expect("parent");
    assert!(
        header["result"]
            .as_str()
            .is_some_and(|scale| scale.starts_with(parent)),
        "{header}"
    );
    assert_eq!(
        follow
            .call("chainHead_v1_stopOperation", json!([body]))
            .await["result"],
        Value::Null
    );
    assert_eq!(
        follow.call("chainHead_v1_continue", json!([body])).await["result"],
        Value::Null
    );
}

#[tokio::test]
async fn chain_head_methods_refuse_unknown_blocks_and_other_subscriptions() {
    let node = start_chain_head_node(
        "chain-head-errors",
        STEADY_BLOCK_TIME,
        ChainHeadLimits::default(),
    )
    .await;
    let mut follow = Follow::start(&node, true).await;
    let initialized = follow.event().await;
    let pinned = hashes_of(&initialized, "finalizedBlockHashes")
        .pop()
        .expect("finalized");
    let never_announced = json!(node.block_hash(node.finalized_number() - 50));
    for method in ["chainHead_v1_body", "chainHead_v1_header"] {
        let answer = follow.call(method, json!([never_announced])).await;
        assert_eq!(
            answer["error"],
            json!({ "code": -32801, "message": "Invalid block hash" }),
            "{method}"
        );
    }
    let malformed = follow.call("chainHead_v1_body", json!(["0x1234"])).await;
    assert_eq!(malformed["error"]["code"], -32602, "{malformed}");
    let bad_key = follow
        .call(
            "chainHead_v1_storage",
            json!([pinned, [{ "key": "0xzz", "type": "value" }], null]),
        )
        .await;
    assert_eq!(bad_key["error"]["code"], -32602, "{bad_key}");

    // A subscription id of another connection is as good as unknown: limitReached, null.
    let mut other = WsClient::connect(&node.ws_url()).await;
    let body = other
        .call("chainHead_v1_body", json!([follow.id, pinned]))
        .await;
    assert_eq!(
        body["result"],
        json!({ "result": "limitReached" }),
        "{body}"
    );
    let header = other
        .call("chainHead_v1_header", json!([follow.id, pinned]))
        .await;
    assert_eq!(header["result"], Value::Null, "{header}");
    let storage = other
        .call(
            "chainHead_v1_storage",
            json!([follow.id, pinned, [{ "key": SYSTEM_NUMBER_KEY, "type": "value" }], null]),
        )
        .await;
    assert_eq!(
        storage["result"],
        json!({ "result": "limitReached" }),
        "{storage}"
    );
    let unpin = other
        .call("chainHead_v1_unpin", json!([follow.id, pinned]))
        .await;
    assert_eq!(unpin["result"], Value::Null, "ignored: {unpin}");
    let header = follow.call("chainHead_v1_header", json!([pinned])).await;
    assert!(header["result"].is_string(), "still pinned: {header}");
}

#[tokio::test]
async fn unpinned_blocks_are_gone_and_unpin_refuses_unknown_and_duplicate_hashes() {
    let node = start_chain_head_node("unpin", STEADY_BLOCK_TIME, ChainHeadLimits::default()).await;
    let mut follow = Follow::start(&node, true).await;
    let initialized = follow.event().await;
    let finalized = hashes_of(&initialized, "finalizedBlockHashes");

    let unpinned = follow
        .call("chainHead_v1_unpin", json!([finalized[0]]))
        .await;
    assert_eq!(unpinned["result"], Value::Null, "{unpinned}");
    let header = follow
        .call("chainHead_v1_header", json!([finalized[0]]))
        .await;
    assert_eq!(header["error"]["code"], -32801, "unpinned: {header}");
    let again = follow
        .call("chainHead_v1_unpin", json!([finalized[0]]))
        .await;
    assert_eq!(again["error"]["code"], -32801, "{again}");

    let duplicate = follow
        .call("chainHead_v1_unpin", json!([[finalized[1], finalized[1]]]))
        .await;
    assert_eq!(
        duplicate["error"],
        json!({ "code": -32804, "message": "Received duplicate hashes for the `chainHead_unpin` method" })
    );
    let partly_unknown = follow
        .call("chainHead_v1_unpin", json!([[finalized[1], finalized[0]]]))
        .await;
    assert_eq!(partly_unknown["error"]["code"], -32801, "{partly_unknown}");
    let header = follow
        .call("chainHead_v1_header", json!([finalized[1]]))
        .await;
    assert!(
        header["result"].is_string(),
        "a failed unpin unpins nothing: {header}"
    );

    let several = follow
        .call("chainHead_v1_unpin", json!([[finalized[1], finalized[2]]]))
        .await;
    assert_eq!(several["result"], Value::Null, "{several}");
    let unknown_follow = follow
        .ws
        .call("chainHead_v1_unpin", json!(["nope", finalized[3]]))
        .await;
    assert_eq!(
        unknown_follow["result"],
        Value::Null,
        "ignored: {unknown_follow}"
    );
}

#[tokio::test]
async fn blocks_left_pinned_past_the_node_limit_stop_the_follow() {
    assert_eq!(
        SimNodeConfig::new("defaults").chain_head.max_pinned_blocks,
        512,
        "Substrate's MAX_PINNED_BLOCKS by default"
    );
    // The initial events pin 18 blocks (16 finalized, 2 above); 6 more fit.
    let limits = ChainHeadLimits {
        max_pinned_blocks: 24,
        ..ChainHeadLimits::default()
    };
    let node = start_chain_head_node("pin-limit", FAST_BLOCK_TIME, limits).await;
    let mut follow = Follow::start(&node, true).await;
    let initialized = follow.event().await;
    let finalized = hashes_of(&initialized, "finalizedBlockHashes")
        .pop()
        .expect("finalized");
    follow.skip_to("bestBlockChanged").await;
    let mut new_blocks = 0;
    loop {
        let event = follow.event().await;
        match event["event"].as_str() {
            Some("stop") => break,
            Some("newBlock") => new_blocks += 1,
            Some("bestBlockChanged" | "finalized") => {}
            _ => panic!("unexpected {event}"),
        }
    }
    assert_eq!(new_blocks, 6, "stopped at the 25th pinned block");
    let body = follow.call("chainHead_v1_body", json!([finalized])).await;
    assert_eq!(
        body["result"],
        json!({ "result": "limitReached" }),
        "stopped: {body}"
    );

    // A new subscription starts afresh: the stopped one's pins were released.
    let mut again = Follow::start(&node, true).await;
    assert_eq!(again.event().await["event"], "initialized");
}

#[tokio::test]
async fn a_connection_gets_four_follows_and_the_fifth_is_refused() {
    let node = start_chain_head_node(
        "follow-limit",
        STEADY_BLOCK_TIME,
        ChainHeadLimits::default(),
    )
    .await;
    let mut ws = WsClient::connect(&node.ws_url()).await;
    let mut ids = Vec::new();
    for _ in 0..4 {
        let answer = ws.call("chainHead_v1_follow", json!([false])).await;
        assert!(answer["result"].is_string(), "{answer}");
        ids.push(answer["result"].clone());
    }
    let refused = ws.call("chainHead_v1_follow", json!([false])).await;
    assert_eq!(
        refused["error"],
        json!({ "code": -32800, "message": "Maximum number of chainHead_follow has been reached" })
    );
    let mut other = WsClient::connect(&node.ws_url()).await;
    let answer = other.call("chainHead_v1_follow", json!([true])).await;
    assert!(answer["result"].is_string(), "per connection: {answer}");

    let unfollowed = ws.call("chainHead_v1_unfollow", json!([ids[0]])).await;
    assert_eq!(unfollowed["result"], true, "{unfollowed}");
    // The slot is free once the unfollowed subscription has wound down.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let answer = ws.call("chainHead_v1_follow", json!([false])).await;
        if answer["result"].is_string() {
            break;
        }
        assert_eq!(answer["error"]["code"], -32800, "{answer}");
        assert!(
            Instant::now() < deadline,
            "the unfollowed slot never came back"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_connection_gets_1024_subscriptions_and_the_next_is_refused_as_substrate_does() {
    let node = start_node("subscription-limit", STEADY_BLOCK_TIME).await;
    let mut ws = WsClient::connect(&node.ws_url()).await;
    let mut ids = Vec::new();
    for _ in 0..1024 {
        let answer = ws.call("state_subscribeRuntimeVersion", json!([])).await;
        assert!(answer["result"].is_string(), "{answer}");
        ids.push(answer["result"].clone());
    }
    // jsonrpsee's answer, as on a node with --rpc-max-subscriptions-per-connection 1024.
    let refused = json!({
        "code": -32006,
        "message": "Too many subscriptions on the connection",
        "data": "Exceeded max limit of 1024",
    });
    for method in ["state_subscribeRuntimeVersion", "chainHead_v1_follow"] {
        let answer = ws.call(method, json!([true])).await;
        assert_eq!(answer["error"], refused, "{method}: {answer}");
    }
    let mut other = WsClient::connect(&node.ws_url()).await;
    let answer = other.call("state_subscribeRuntimeVersion", json!([])).await;
    assert!(answer["result"].is_string(), "per connection: {answer}");

    let unsubscribed = ws
        .call("state_unsubscribeRuntimeVersion", json!([ids[0]]))
        .await;
    assert_eq!(unsubscribed["result"], true);
    let deadline = Instant::now() + PATIENCE;
    loop {
        let answer = ws.call("state_subscribeRuntimeVersion", json!([])).await;
        if answer["result"].is_string() {
            break;
        }
        assert_eq!(answer["error"], refused, "{answer}");
        assert!(
            Instant::now() < deadline,
            "the subscription's slot never came back"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn the_101st_connection_is_refused_as_substrate_does() {
    let node = start_node("connection-limit", STEADY_BLOCK_TIME).await;
    let mut held = Vec::new();
    for _ in 0..100 {
        held.push(WsClient::connect(&node.ws_url()).await);
    }
    // Open WebSockets count for as long as they are open, not just while upgrading.
    assert_eq!(node.connections(), 100);
    assert_eq!(node.peak_connections(), 100);
    assert_eq!(node.websockets(), 100);
    match tokio_tungstenite::connect_async(node.ws_url()).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 429, "too many connections");
        }
        other => panic!("the 101st WebSocket was not refused: {other:?}"),
    }
    let http = reqwest::Client::new()
        .post(node.http_url())
        .json(&request("system_health", json!([])))
        .send()
        .await
        .expect("HTTP answer");
    assert_eq!(http.status(), 429);

    drop(held.pop());
    poll::until("a closed connection frees its slot", || async {
        tokio_tungstenite::connect_async(node.ws_url())
            .await
            .is_ok()
    })
    .await;
    drop(held);
    poll::until("closed WebSockets no longer count", || async {
        node.connections() == 0 && node.websockets() == 0
    })
    .await;
}

#[tokio::test]
async fn open_connections_and_websockets_are_counted_until_they_close() {
    let node = start_node("connection-count", STEADY_BLOCK_TIME).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut ws = WsClient::connect(&node.ws_url()).await;
        // Answered: the connection is past its upgrade.
        let health = ws.call("system_health", json!([])).await;
        assert!(health["result"].is_object(), "{health}");
        held.push(ws);
    }
    assert_eq!(node.connections(), 3, "open WebSockets");
    assert_eq!(node.peak_connections(), 3);
    assert_eq!((node.websockets(), node.peak_websockets()), (3, 3));
    // A connection that has not upgraded is a connection, not a WebSocket.
    let control = ControlClient::new(node.control_addr().expect("control API"));
    let http = TcpStream::connect(node.rpc_addr()).await.expect("TCP");
    poll::until("the HTTP connection is counted", || async {
        node.connections() == 4
    })
    .await;
    let status = control.status().await.expect("GET /status");
    assert_eq!(
        (status.connections, status.peak_connections),
        (4, 4),
        "{status:?}"
    );
    assert_eq!(
        (status.websockets, status.peak_websockets),
        (3, 3),
        "{status:?}"
    );

    drop(http);
    held.truncate(1);
    poll::until("closed connections leave the count", || async {
        node.connections() == 1 && node.websockets() == 1
    })
    .await;
    assert_eq!(node.peak_connections(), 4, "the peak stays");
    assert_eq!(node.peak_websockets(), 3, "the peak stays");
}

#[tokio::test]
async fn transaction_broadcast_returns_an_operation_id_that_only_its_connection_stops() {
    let node = start_node("broadcast", STEADY_BLOCK_TIME).await;
    let mut ws = WsClient::connect(&node.ws_url()).await;
    let id = ws
        .call("transaction_v1_broadcast", json!([EXTRINSIC]))
        .await["result"]
        .clone();
    assert!(
        id.as_str()
            .is_some_and(|id| id.len() == 16 && id.chars().all(|c| c.is_ascii_alphanumeric())),
        "{id}"
    );
    let invalid_id = json!({ "code": -32602, "message": "Invalid operation id" });
    let mut other = WsClient::connect(&node.ws_url()).await;
    assert_eq!(
        other.call("transaction_v1_stop", json!([id])).await["error"],
        invalid_id
    );
    assert_eq!(
        ws.call("transaction_v1_stop", json!([id])).await["result"],
        Value::Null
    );
    assert_eq!(
        ws.call("transaction_v1_stop", json!([id])).await["error"],
        invalid_id,
        "stopped"
    );

    // Undecodable bytes get an id, but nothing is broadcast.
    let dropped = ws.call("transaction_v1_broadcast", json!(["0x1234"])).await["result"].clone();
    assert!(dropped.is_string(), "{dropped}");
    assert_eq!(
        ws.call("transaction_v1_stop", json!([dropped])).await["error"],
        invalid_id
    );

    // 16 at once per connection; the 17th is null.
    for _ in 0..16 {
        let answer = ws
            .call("transaction_v1_broadcast", json!([EXTRINSIC]))
            .await;
        assert!(answer["result"].is_string(), "{answer}");
    }
    assert_eq!(
        ws.call("transaction_v1_broadcast", json!([EXTRINSIC]))
            .await["result"],
        Value::Null
    );
    let not_hex = ws.call("transaction_v1_broadcast", json!(["zz"])).await;
    assert_eq!(not_hex["error"]["code"], -32602, "{not_hex}");
}

#[tokio::test]
async fn transaction_watch_reports_validated_or_invalid() {
    let node = start_node("watch", STEADY_BLOCK_TIME).await;
    let mut ws = WsClient::connect(&node.ws_url()).await;
    let watched = ws
        .call("transactionWatch_v1_submitAndWatch", json!([EXTRINSIC]))
        .await;
    let subscription = watched["result"].clone();
    assert!(subscription.is_string(), "{watched}");
    let event = ws.notification().await;
    assert_eq!(event["method"], "transactionWatch_v1_watchEvent");
    assert_eq!(event["params"]["subscription"], subscription);
    assert_eq!(event["params"]["result"], json!({ "event": "validated" }));
    let unwatched = ws
        .call("transactionWatch_v1_unwatch", json!([subscription]))
        .await;
    assert_eq!(unwatched["result"], true, "{unwatched}");

    ws.call("transactionWatch_v1_submitAndWatch", json!(["0x1234"]))
        .await;
    let event = ws.notification().await;
    assert_eq!(
        event["params"]["result"],
        json!({ "event": "invalid", "error": "Extrinsic bytes cannot be decoded" })
    );
}
