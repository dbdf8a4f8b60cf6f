//! The chain follower against live sim-nodes on 127.0.0.1: the cache's head epoch moves with
//! the chain, finality and the runtime version are learned, and losing a node does not stop
//! the following. And the cache in front of a node, fed by the follower: head-dependent
//! answers change with the chain and not before, pinned ones never reach the node again.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use lb_control::cache::{
    self, CachePolicy, FetchError, Head, Lookup, Outcome, ResponseCache, RuntimeVersion,
};
use lb_tests::poll::{self, PATIENCE};
use lb_tests::sim_node::{BlockNumber, Fault, SimNode, SimNodeConfig, SimNodeHandle};
use serde_json::{Value, json, value::RawValue};
use tokio::sync::watch;

/// Fast blocks, so the head moves several times a second.
const BLOCK_TIME: Duration = Duration::from_millis(150);

async fn start_node(id: &str) -> SimNodeHandle {
    let mut config = SimNodeConfig::new(id);
    config.block_time = BLOCK_TIME;
    SimNode::start(config).await.expect("sim-node starts")
}

/// The hash of block `number` as the node has it.
fn hash_on(node: &SimNodeHandle, number: u64) -> String {
    let number = BlockNumber::try_from(number).expect("a block number the chain can have");
    node.block_hash(number).to_string()
}

/// Waits until the cache's head is above `number`, then returns it.
async fn head_above(cache: &ResponseCache, number: u64) -> u64 {
    poll::until(&format!("the head passes block {number}"), || async {
        cache.head().is_some_and(|head| head.number > number)
    })
    .await;
    cache.head().expect("a head").number
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_feeds_heads_finality_and_runtime_to_the_cache() {
    let nodes = [start_node("node0").await, start_node("node1").await];
    let addrs: Vec<SocketAddr> = nodes.iter().map(SimNodeHandle::rpc_addr).collect();
    let (_list, watched) = watch::channel(addrs);
    let cache = ResponseCache::new(cache::DEFAULT_MAX_BYTES);
    let _follower = cache::follow(watched, cache.clone());

    let first = head_above(&cache, 0).await;
    let later = head_above(&cache, first + 2).await;
    assert!(later > first);
    // The hash is the chain's own (blake2-256 of the SCALE header), not a stand-in.
    let head = cache.head().expect("a head");
    assert_eq!(head.hash, hash_on(&nodes[0], head.number));

    poll::until("a finalized block is known", || async {
        cache.finalized().is_some()
    })
    .await;
    assert!(cache.finalized() <= Some(cache.head().expect("a head").number));
    let finalized = cache.finalized().expect("finalized");
    poll::until("finality moves on", || async {
        cache.finalized() > Some(finalized)
    })
    .await;

    poll::until("the runtime version is known", || async {
        cache.runtime().is_some()
    })
    .await;
    // The sim-node runtime is polkadot-js's `substrate` fixture: spec 268, transaction 2.
    assert_eq!(
        cache.runtime(),
        Some(RuntimeVersion {
            spec_version: 268,
            transaction_version: 2
        })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_keeps_following_when_a_node_stops() {
    let [stopping, staying] = [start_node("node0").await, start_node("node1").await];
    let addrs = vec![stopping.rpc_addr(), staying.rpc_addr()];
    let (_list, watched) = watch::channel(addrs);
    let cache = ResponseCache::new(cache::DEFAULT_MAX_BYTES);
    let _follower = cache::follow(watched, cache.clone());

    let before = head_above(&cache, 0).await;
    stopping.stop().await;
    let after = head_above(&cache, before + 3).await;
    let head = cache.head().expect("a head");
    assert_eq!(head.hash, hash_on(&staying, head.number));
    assert!(after > before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_picks_up_a_node_added_to_the_list() {
    let node = start_node("node0").await;
    let (list, watched) = watch::channel(Vec::new());
    let cache = ResponseCache::new(cache::DEFAULT_MAX_BYTES);
    let _follower = cache::follow(watched, cache.clone());

    // With no node listed nothing is learned; once one is, the head follows it.
    tokio::task::yield_now().await;
    assert_eq!(cache.head(), None);
    list.send_replace(vec![node.rpc_addr()]);
    head_above(&cache, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_reconnects_after_the_node_drops_its_connections() {
    let node = start_node("node0").await;
    let (_list, watched) = watch::channel(vec![node.rpc_addr()]);
    let cache = ResponseCache::new(cache::DEFAULT_MAX_BYTES);
    let _follower = cache::follow(watched, cache.clone());
    let before = head_above(&cache, 0).await;

    node.set_fault(Fault::CloseConnections);
    // A head or two may still arrive while the node closes its connections.
    let cut_off = u64::from(node.chain_best_number());
    poll::until("the chain moves on without the follower", || async {
        u64::from(node.chain_best_number()) > cut_off + 8
    })
    .await;
    let head = cache.head().expect("a head").number;
    assert!(
        head <= cut_off + 2,
        "head {head} learned while the node dropped every connection (cut off at {cut_off})"
    );

    node.clear_faults();
    let now = u64::from(node.chain_best_number());
    let after = head_above(&cache, now).await;
    assert!(after > before);
}

/// A miss's call to the node (over HTTP here; the gateway's ride its WebSocket links).
async fn fetch_from(
    node: &SimNodeHandle,
    method: &str,
    params: &Value,
) -> Result<Outcome, FetchError> {
    let body = json!({ "jsonrpc": "2.0", "id": 1, "method": method, "params": params });
    let response = reqwest::Client::new()
        .post(node.http_url())
        .json(&body)
        .send()
        .await
        .map_err(|error| FetchError::Unreachable(error.to_string()))?;
    let answer: Value = response
        .json()
        .await
        .map_err(|error| FetchError::Unreachable(error.to_string()))?;
    let raw = |value: &Value| RawValue::from_string(value.to_string()).expect("JSON");
    match (answer.get("result"), answer.get("error")) {
        (Some(result), None) => Ok(Outcome::Result(raw(result))),
        (None, Some(error)) => Ok(Outcome::Error(raw(error))),
        _ => Err(FetchError::Unreachable(format!("not an answer: {answer}"))),
    }
}

/// One call through the cache, classified as the gateway classifies it.
async fn call(
    cache: &ResponseCache,
    node: &SimNodeHandle,
    method: &str,
    params: Value,
) -> (Value, Lookup) {
    let policy = cache::classify(method, &params, cache.finalized());
    let (result, lookup) = cache
        .get_or_fetch(method, &params, policy, || {
            fetch_from(node, method, &params)
        })
        .await
        .expect("an answer");
    (serde_json::from_str(result.get()).expect("JSON"), lookup)
}

fn header_number(header: &Value) -> u64 {
    let hex = header["number"].as_str().expect("a header number");
    u64::from_str_radix(hex.trim_start_matches("0x"), 16).expect("hex")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_dependent_answer_changes_with_the_chain_and_not_before() {
    let node = start_node("node0").await;
    let (_list, watched) = watch::channel(vec![node.rpc_addr()]);
    let cache = ResponseCache::new(cache::DEFAULT_MAX_BYTES);
    let _follower = cache::follow(watched, cache.clone());
    head_above(&cache, 0).await;

    // Several new heads: each time, the first call after it reaches the node and the
    // following ones within the same head do not.
    let mut previous: Option<Head> = None;
    let mut last_number = 0;
    let mut heads_seen = 0;
    let deadline = Instant::now() + PATIENCE;
    while heads_seen < 3 {
        assert!(Instant::now() < deadline, "timed out watching three heads");
        let head = cache.head().expect("a head");
        let (header, first) = call(&cache, &node, "chain_getHeader", json!([])).await;
        let asked = node.request_count("chain_getHeader");
        let (again, second) = call(&cache, &node, "chain_getHeader", json!([])).await;
        if cache.head().expect("a head") != head {
            // A new head came in between: which call saw which head is unknown.
            previous = None;
            continue;
        }
        if let Some(previous) = &previous {
            let expected = if *previous == head {
                Lookup::Hit
            } else {
                Lookup::Miss
            };
            assert_eq!(
                first, expected,
                "first call at head {} after {}",
                head.number, previous.number
            );
        }
        assert_eq!(
            second,
            Lookup::Hit,
            "a second call within head {}",
            head.number
        );
        assert_eq!(again, header);
        assert_eq!(node.request_count("chain_getHeader"), asked);
        let number = header_number(&header);
        // The node may be a block ahead of the follower, never behind the head it announced.
        assert!(
            number >= head.number,
            "header {number} under head {}",
            head.number
        );
        if number > last_number {
            last_number = number;
            heads_seen += 1;
        }
        previous = Some(head);
        tokio::time::sleep(BLOCK_TIME / 3).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_answers_never_reach_the_node_again() {
    let node = start_node("node0").await;
    let (_list, watched) = watch::channel(vec![node.rpc_addr()]);
    let cache = ResponseCache::new(cache::DEFAULT_MAX_BYTES);
    let _follower = cache::follow(watched, cache.clone());
    poll::until("a finalized block is known", || async {
        cache.finalized().is_some()
    })
    .await;
    let finalized = cache.finalized().expect("finalized");

    let (hash, lookup) = call(&cache, &node, "chain_getBlockHash", json!([finalized])).await;
    assert_eq!(lookup, Lookup::Miss);
    assert_eq!(
        cache::classify("chain_getHeader", &json!([hash]), cache.finalized()),
        CachePolicy::Pinned
    );
    let (header, lookup) = call(&cache, &node, "chain_getHeader", json!([hash])).await;
    assert_eq!(lookup, Lookup::Miss);
    assert_eq!(header_number(&header), finalized);
    let asked = node.total_requests();

    head_above(&cache, cache.head().expect("a head").number + 2).await;
    assert_eq!(
        call(&cache, &node, "chain_getBlockHash", json!([finalized])).await,
        (hash.clone(), Lookup::Hit)
    );
    assert_eq!(
        call(&cache, &node, "chain_getHeader", json!([hash])).await,
        (header, Lookup::Hit)
    );
    assert_eq!(
        node.total_requests(),
        asked,
        "a pinned answer reached the node"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_nodes_heads_do_not_move_the_head_back() {
    let [leading, lagging] = [start_node("node0").await, start_node("node1").await];
    lagging.set_fault(Fault::Behind { blocks: 20 });
    let (_list, watched) = watch::channel(vec![leading.rpc_addr(), lagging.rpc_addr()]);
    let cache = ResponseCache::new(cache::DEFAULT_MAX_BYTES);
    let _follower = cache::follow(watched, cache.clone());

    // Sampled all along: a head taken from the lagging node would show as a step back.
    let first = head_above(&cache, 0).await;
    let mut highest = first;
    let deadline = Instant::now() + PATIENCE;
    while highest < first + 5 {
        assert!(Instant::now() < deadline, "timed out watching five heads");
        let number = cache.head().expect("a head").number;
        assert!(
            number >= highest,
            "the head went back from {highest} to {number}"
        );
        highest = number;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(highest > u64::from(lagging.best_number()) + 10);
}
