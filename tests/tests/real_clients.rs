//! Real Polkadot clients through the gateway's `wss://` endpoint in the lab: polkadot.js
//! (`@polkadot/api` 16.5.6, tests/js) runs in the client namespace with an API key made with the
//! CLI and trusts the lab's throwaway CA (`NODE_EXTRA_CA_CERTS`), so every connection makes a
//! real TLS handshake with lb-control's gateway. Behind it: sim-nodes, or chopsticks (a real
//! runtime) where a signed transfer must really execute, sent with polkadot.js and with
//! polkadot-api (`polkadot-api` 2.2.2: the new JSON-RPC spec, `transaction_v1_broadcast` and a
//! `chainHead_v1` follow).
//!
//! These tests need root: run them as root or via `cargo xtask test`. They run the binaries
//! (`cargo build --bins` first) and Node.js 20 with tests/js installed (`cargo xtask setup`).

mod common;

use std::{collections::BTreeMap, path::Path, time::Duration};

use anyhow::{Context, ensure};
use blake2::{Blake2b, Digest, digest::consts::U32};
use common::{GatewayLab, ServiceConf, VIP_V4, node_status, start_lab, up};
use lb_tests::js_client::is_expected_polkadot_js_warning;
use lb_tests::lab::{Lab, SIM_NODE_RPC_PORT, command_in_netns, run_checked};
use serde_json::{Value, json};

/// The well-known development account `//Alice` (sr25519, generic SS58 prefix): the sender of
/// the transfers, funded before each.
const ALICE: &str = "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY";
/// 1000 ROC (12 decimals) for Alice; 1 ROC transferred.
const ALICE_FUNDS: u128 = 1_000_000_000_000_000;
const TRANSFER_AMOUNT: u128 = 1_000_000_000_000;

/// lb-control with its gateway in front of `nodes`. Not health-checked, so up at once: the
/// chain-aware check does take chopsticks (it answers the probe's batch, with 0 peers but
/// `shouldHavePeers` false), but its best block stands still between transactions, which that
/// check calls a stall after `stall_after`.
fn start_gateway(lab: &mut Lab, nodes: &[usize]) -> anyhow::Result<GatewayLab> {
    let service = ServiceConf::tcp(VIP_V4, nodes.iter().copied().map(up).collect());
    GatewayLab::start(lab, &[service], "")
}

/// Runs `node SCRIPT ARGS…` (a script in tests/js) in the client namespace, trusting the lab CA
/// in `ca`; returns the JSON summary it prints last, failing with the error it reports. The
/// scripts bound their own run time.
fn run_js(lab: &Lab, ca: &Path, script: &str, args: &[&str]) -> anyhow::Result<Value> {
    run_node(lab, ca, &[], script, args)
}

/// [`run_js`] for a polkadot-api script: papi's WebSocket provider uses the global WebSocket,
/// which Node.js 20 has only behind a flag.
fn run_papi_js(lab: &Lab, ca: &Path, script: &str, args: &[&str]) -> anyhow::Result<Value> {
    run_node(lab, ca, &["--experimental-websocket"], script, args)
}

fn run_node(
    lab: &Lab,
    ca: &Path,
    node_flags: &[&str],
    script: &str,
    args: &[&str],
) -> anyhow::Result<Value> {
    let output =
        common::spawn_js(&lab.client().netns, ca, node_flags, script, args)?.wait_with_output()?;
    common::js_summary(script, args, &output)
}

/// Posts one JSON-RPC call straight to node `index` with curl (chopsticks answers chunked),
/// from the LB namespace, which routes to every node; returns its result.
fn node_rpc(lab: &Lab, index: usize, method: &str, params: Value) -> anyhow::Result<Value> {
    let url = format!("http://{}:{SIM_NODE_RPC_PORT}", lab.node(index).addr_v4);
    let body = json!({ "jsonrpc": "2.0", "id": 1, "method": method, "params": params });
    let output = run_checked(
        command_in_netns(&lab.lb().netns, "curl")?
            .args([
                "-sS",
                "--max-time",
                "5",
                "-H",
                "content-type: application/json",
                "-d",
            ])
            .arg(body.to_string())
            .arg(&url),
    )?;
    let answer: Value = serde_json::from_slice(&output.stdout)
        .with_context(|| format!("{method} at node{index}: not JSON"))?;
    answer
        .get("result")
        .cloned()
        .with_context(|| format!("{method} at node{index}: {answer}"))
}

fn warnings(summary: &Value) -> Vec<&str> {
    summary["warnings"]
        .as_array()
        .map(|warnings| warnings.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

fn number(value: &Value) -> anyhow::Result<u64> {
    value
        .as_u64()
        .with_context(|| format!("not a number: {value}"))
}

#[test]
fn polkadot_js_starts_reads_and_follows_heads_through_wss() -> anyhow::Result<()> {
    let mut lab = start_lab(3, true, Duration::from_millis(500));
    let gateway = start_gateway(&mut lab, &[0, 1, 2])?;

    let summary = run_js(
        &lab,
        &gateway.ca,
        "check-sim-node.mjs",
        &[&gateway.url("wss")],
    )?;

    ensure!(summary["specName"] == "node", "{summary}");
    ensure!(summary["specVersion"] == 268, "{summary}");
    ensure!(
        summary["metadataVersion"] == 16,
        "picked the newest metadata via the runtime API: {summary}"
    );
    ensure!(summary["chain"] == "Development", "{summary}");
    ensure!(
        summary["genesisHash"] == node_rpc(&lab, 0, "chain_getBlockHash", json!([0]))?,
        "the client's genesis is the nodes' genesis: {summary}"
    );
    // polkadot.js hashes the header itself: the hash must be the one the nodes serve.
    let header_number = number(&summary["header"]["number"])?;
    ensure!(
        summary["header"]["hash"]
            == node_rpc(&lab, 0, "chain_getBlockHash", json!([header_number]))?,
        "{summary}"
    );
    ensure!(
        number(&summary["systemNumber"])? >= header_number,
        "{summary}"
    );
    let heads = summary["heads"]
        .as_array()
        .context("heads")?
        .iter()
        .map(number)
        .collect::<anyhow::Result<Vec<u64>>>()?;
    ensure!(heads.len() >= 3, "{summary}");
    ensure!(
        heads.windows(2).all(|pair| pair[0] < pair[1]),
        "followed heads advance: {heads:?}"
    );
    ensure!(
        warnings(&summary)
            .iter()
            .all(|warning| is_expected_polkadot_js_warning(warning)),
        "polkadot.js complained: {summary}"
    );
    Ok(())
}

/// A lab with chopsticks as its one node, //Alice funded with `dev_setStorage` straight at the
/// node (the chain starts from a live network's genesis, where Alice holds nothing).
fn start_chopsticks_lab() -> anyhow::Result<Lab> {
    let mut lab = start_lab(1, false, Duration::from_secs(6));
    lab.start_chopsticks(0)?;
    let funds = json!([{ "System": { "Account": [[
        [ALICE],
        { "providers": 1, "data": { "free": ALICE_FUNDS.to_string() } }
    ]] } }]);
    if let Err(error) = node_rpc(&lab, 0, "dev_setStorage", funds) {
        // If chopsticks has died, say so with its log.
        lab.check_processes()?;
        return Err(error);
    }
    Ok(lab)
}

/// What a user checks after a transfer (polkadot.js's): it reached a block, that block holds
/// it, Bob got the amount and Alice paid it plus a fee.
fn check_transfer(summary: &Value) -> anyhow::Result<()> {
    // The script stops following at InBlock; a Finalized that came in the same breath (a
    // chopsticks block is final at once) may be in the list after it, nothing else.
    ensure!(
        summary["statuses"].as_array().is_some_and(|statuses| {
            statuses
                .iter()
                .position(|status| status == "InBlock")
                .is_some_and(|at| {
                    statuses[at + 1..]
                        .iter()
                        .all(|status| status == "Finalized")
                })
        }),
        "{summary}"
    );
    ensure!(
        summary["blockExtrinsics"]
            .as_array()
            .is_some_and(|calls| calls.contains(&json!("balances.transferKeepAlive"))),
        "the block holds the transfer: {summary}"
    );
    ensure!(
        summary["events"]
            .as_array()
            .is_some_and(|events| events.contains(&json!("system.ExtrinsicSuccess"))),
        "{summary}"
    );
    check_balances(summary)
}

/// Bob got the amount and Alice paid it plus a fee, by the balances a transfer script read
/// before and at the block that holds the transfer.
fn check_balances(summary: &Value) -> anyhow::Result<()> {
    let balance = |who: &str, when: &str| -> anyhow::Result<u128> {
        summary[when][who]
            .as_str()
            .and_then(|text| text.parse().ok())
            .with_context(|| format!("{who}'s balance {when}: {summary}"))
    };
    ensure!(
        balance("bob", "after")? == balance("bob", "before")? + TRANSFER_AMOUNT,
        "Bob got the amount: {summary}"
    );
    ensure!(
        balance("alice", "after")? < balance("alice", "before")? - TRANSFER_AMOUNT,
        "Alice paid the amount and a fee: {summary}"
    );
    Ok(())
}

/// What a user checks after a transfer with papi (papi-transfer.mjs): papi found it in a best
/// block and saw it succeed; that block is on node 0's chain and holds the transaction (asked of
/// the node itself); the balances moved; and papi submitted it with the new JSON-RPC spec.
fn check_papi_transfer(lab: &Lab, summary: &Value) -> anyhow::Result<()> {
    println!(
        "papi's transfer: {}; methods papi sent: {}",
        summary["statuses"], summary["methods"]
    );
    ensure!(summary["ok"] == true, "papi saw it succeed: {summary}");
    let events = summary["events"].as_array().context("events")?;
    for event in ["Balances.Transfer", "System.ExtrinsicSuccess"] {
        ensure!(events.contains(&json!(event)), "{event}: {summary}");
    }
    let block = &summary["block"]["hash"];
    let number = number(&summary["block"]["number"])?;
    ensure!(
        node_rpc(lab, 0, "chain_getBlockHash", json!([number]))? == *block,
        "the block is the node's block {number}: {summary}"
    );
    let extrinsics = node_rpc(lab, 0, "chain_getBlock", json!([block]))?["block"]["extrinsics"]
        .as_array()
        .context("the block's extrinsics")?
        .iter()
        .map(|extrinsic| extrinsic.as_str().and_then(extrinsic_hash))
        .collect::<Option<Vec<String>>>()
        .context("extrinsics as hex")?;
    ensure!(
        summary["txHash"]
            .as_str()
            .is_some_and(|hash| extrinsics.iter().any(|other| other == hash)),
        "the node's block holds the transaction: {summary}; hashes in the block: {extrinsics:?}"
    );
    check_balances(summary)?;
    let methods = summary["methods"].as_array().context("methods")?;
    ensure!(
        [
            "transaction_v1_broadcast",
            "transactionWatch_v1_submitAndWatch"
        ]
        .iter()
        .any(|method| methods.contains(&json!(method)))
            && methods.contains(&json!("chainHead_v1_follow")),
        "papi took the new spec: {summary}"
    );
    Ok(())
}

/// A transaction's hash as clients give it: blake2-256 of its bytes (`0x…` hex in and out).
fn extrinsic_hash(extrinsic: &str) -> Option<String> {
    let bytes = hex::decode(extrinsic.strip_prefix("0x")?).ok()?;
    Some(format!("0x{}", hex::encode(Blake2b::<U32>::digest(bytes))))
}

#[test]
fn signed_transfer_straight_to_chopsticks_reaches_in_block() -> anyhow::Result<()> {
    let lab = start_chopsticks_lab()?;
    let url = format!("ws://{}:{SIM_NODE_RPC_PORT}", lab.node(0).addr_v4);
    // No TLS here: the CA path only has to exist.
    let summary = run_js(
        &lab,
        Path::new("/dev/null"),
        "transfer.mjs",
        &[&url, &TRANSFER_AMOUNT.to_string()],
    )?;
    check_transfer(&summary)
}

#[test]
fn signed_transfer_through_wss_to_chopsticks_reaches_in_block() -> anyhow::Result<()> {
    let mut lab = start_chopsticks_lab()?;
    let gateway = start_gateway(&mut lab, &[0])?;
    let summary = run_js(
        &lab,
        &gateway.ca,
        "transfer.mjs",
        &[&gateway.url("wss"), &TRANSFER_AMOUNT.to_string()],
    )?;
    check_transfer(&summary)
}

#[test]
fn papi_transfer_straight_to_chopsticks_reaches_a_block() -> anyhow::Result<()> {
    let lab = start_chopsticks_lab()?;
    let url = format!("ws://{}:{SIM_NODE_RPC_PORT}", lab.node(0).addr_v4);
    // No TLS here: the CA path only has to exist.
    let summary = run_papi_js(
        &lab,
        Path::new("/dev/null"),
        "papi-transfer.mjs",
        &[&url, &TRANSFER_AMOUNT.to_string()],
    )?;
    check_papi_transfer(&lab, &summary)
}

#[test]
fn papi_transfer_through_wss_to_chopsticks_reaches_a_block() -> anyhow::Result<()> {
    let mut lab = start_chopsticks_lab()?;
    let gateway = start_gateway(&mut lab, &[0])?;
    let summary = run_papi_js(
        &lab,
        &gateway.ca,
        "papi-transfer.mjs",
        &[&gateway.url("wss"), &TRANSFER_AMOUNT.to_string()],
    )?;
    check_papi_transfer(&lab, &summary)
}

/// What every node has answered so far, per method, summed over the nodes.
fn node_requests(lab: &Lab) -> anyhow::Result<BTreeMap<String, u64>> {
    let mut total = BTreeMap::new();
    for index in 0..lab.nodes().len() {
        for (method, count) in node_status(lab, index)?.requests {
            *total.entry(method).or_default() += count;
        }
    }
    Ok(total)
}

#[test]
fn thousand_polkadot_js_start_ups_fetch_metadata_at_most_five_times() -> anyhow::Result<()> {
    const CONNECTIONS: usize = 50;
    const PER_CONNECTION: usize = 20;
    const SPREAD: Duration = Duration::from_secs(60);
    const MAX_METADATA_FETCHES: u64 = 5;
    let mut lab = start_lab(3, true, Duration::from_secs(6));
    let gateway = start_gateway(&mut lab, &[0, 1, 2])?;
    let before = node_requests(&lab)?;

    let summary = run_js(
        &lab,
        &gateway.ca,
        "start-ups.mjs",
        &[
            &gateway.url("wss"),
            &CONNECTIONS.to_string(),
            &PER_CONNECTION.to_string(),
            &SPREAD.as_millis().to_string(),
        ],
    )?;

    let after = node_requests(&lab)?;
    let reached: BTreeMap<&str, u64> = after
        .iter()
        .map(|(method, count)| {
            let earlier = before.get(method).copied().unwrap_or(0);
            (method.as_str(), count - earlier)
        })
        .filter(|(_, count)| *count > 0)
        .collect();
    println!(
        "{} start-ups ({} ApiPromise.create, {} replays of its requests) over {} connections \
         in {} ms; calls that reached the nodes, per method:",
        summary["startUps"],
        summary["real"],
        summary["replayed"],
        CONNECTIONS,
        summary["elapsedMs"]
    );
    for (method, count) in &reached {
        println!("  {method:32} {count}");
    }

    ensure!(
        summary["startUps"] == CONNECTIONS * PER_CONNECTION,
        "{summary}"
    );
    ensure!(
        summary["learnt"]
            == json!([{
                "genesisHash": node_rpc(&lab, 0, "chain_getBlockHash", json!([0]))?,
                "specName": "node",
                "specVersion": 268,
                "metadataVersion": 16,
            }]),
        "every start-up learnt the same chain and runtime: {summary}"
    );
    ensure!(
        warnings(&summary)
            .iter()
            .all(|warning| is_expected_polkadot_js_warning(warning)),
        "polkadot.js complained: {summary}"
    );
    // polkadot.js fetches metadata with state_call (Metadata_metadata_versions, then
    // Metadata_metadata_at_version) or state_getMetadata, and makes no other state_call while
    // it starts.
    let metadata_fetches = ["state_call", "state_getMetadata"]
        .iter()
        .map(|method| reached.get(method).copied().unwrap_or(0))
        .sum::<u64>();
    ensure!(
        metadata_fetches <= MAX_METADATA_FETCHES,
        "{metadata_fetches} metadata fetches reached the nodes: {reached:?}"
    );
    Ok(())
}
