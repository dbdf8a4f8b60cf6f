//! The JSON-RPC methods sim-node serves, registered on one jsonrpsee module.
//!
//! Names, aliases, parameters and result shapes follow polkadot-sdk's `sc-rpc-api` for the legacy
//! methods (here) and `sc-rpc-spec-v2` for the new spec (`chainSpec_v1_*` here, `chainHead_v1_*`
//! in `chain_head`, `transaction_v1_*` and `transactionWatch_v1_*` in `transaction`).
//! `rpc_methods` is computed from what is registered, so it lists exactly what is served:
//! clients pick their protocol from it.

use std::sync::Arc;

use jsonrpsee::core::SubscriptionResult;
use jsonrpsee::types::{ErrorObjectOwned, Params};
use jsonrpsee::{PendingSubscriptionSink, RpcModule, SubscriptionMessage};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};

use super::chain::{Header, SignedBlock};
use super::chain_head::{self, ChainHeadLimits};
use super::clock::BlockNumber;
use super::primitives::{Hash32, HexBytes, blake2_256, prefixed_hex};
use super::rpc_errors;
use super::state::{Heads, NodeState};
use super::transaction;

type RpcResult<T> = Result<T, ErrorObjectOwned>;

/// `system_chain` and `system_chainType` of the `node` runtime's development chain.
const CHAIN_NAME: &str = "Development";
const CHAIN_TYPE: &str = "Development";

/// Methods a node refuses on a `--rpc-methods safe` port (the callers of `check_if_safe` in
/// `sc-rpc` and the RPC crates beside it) with the bare `UnsafeRpcError` (-32601). Those a real
/// node's `rpc_methods` lists; `state_subscribeStorage` refuses only without keys (below).
const UNSAFE_METHODS: &[&str] = &[
    "author_hasKey",
    "author_hasSessionKeys",
    "author_insertKey",
    "author_removeExtrinsic",
    "author_rotateKeys",
    "babe_epochAuthorship",
    "dev_getBlockStats",
    "offchain_localStorageClear",
    "offchain_localStorageGet",
    "offchain_localStorageSet",
    "state_trieMigrationStatus",
    "statement_dump",
    "system_addLogFilter",
    "system_addReservedPeer",
    "system_dryRun",
    "system_dryRunAt",
    "system_peers",
    "system_removeReservedPeer",
    "system_resetLogFilter",
    "system_unstable_networkState",
];

/// The unsafe methods of `sc-rpc`'s state API, refused inside its error type (4003).
const UNSAFE_STATE_METHODS: &[&str] = &["state_getPairs", "state_queryStorage", "state_traceBlock"];

#[derive(Debug, thiserror::Error)]
#[error("registering a JSON-RPC method")]
pub struct RegisterError(#[from] jsonrpsee::core::RegisterMethodError);

/// Builds the module with every method, subscription and alias.
pub fn build_module(
    state: Arc<NodeState>,
    chain_head_limits: ChainHeadLimits,
) -> Result<RpcModule<Arc<NodeState>>, RegisterError> {
    let mut module = RpcModule::new(state);
    register_system(&mut module)?;
    register_chain(&mut module)?;
    register_state(&mut module)?;
    register_author(&mut module)?;
    register_subscriptions(&mut module)?;
    register_chain_spec(&mut module)?;
    chain_head::register(&mut module, chain_head_limits)?;
    transaction::register(&mut module)?;
    for method in UNSAFE_METHODS {
        module.register_method(method, |_, _, _| -> RpcResult<()> {
            Err(rpc_errors::unsafe_method())
        })?;
    }
    for method in UNSAFE_STATE_METHODS {
        module.register_method(method, |_, _, _| -> RpcResult<()> {
            Err(rpc_errors::unsafe_state_method())
        })?;
    }
    let mut methods: Vec<&str> = module.method_names().chain(["rpc_methods"]).collect();
    methods.sort_unstable();
    let listing = json!({ "methods": methods });
    module.register_method("rpc_methods", move |_, _, _| listing.clone())?;
    Ok(module)
}

fn register_system(module: &mut RpcModule<Arc<NodeState>>) -> Result<(), RegisterError> {
    module.register_method("system_health", |_, node, _| -> RpcResult<_> {
        Ok(node.health())
    })?;
    module.register_method("system_chain", |_, _, _| CHAIN_NAME)?;
    module.register_method("system_chainType", |_, _, _| CHAIN_TYPE)?;
    module.register_method("system_name", |_, _, _| "sim-node")?;
    module.register_method("system_version", |_, _, _| env!("CARGO_PKG_VERSION"))?;
    module.register_method("system_properties", |_, _, _| chain_properties())?;
    module.register_method("system_localPeerId", |_, node, _| node.peer_id.clone())?;
    module.register_method("system_nodeRoles", |_, _, _| ["Full"])?;
    module.register_method("system_reservedPeers", |_, _, _| Vec::<String>::new())?;
    module.register_method("system_syncState", |_, node, _| {
        json!({
            "startingBlock": 0,
            "currentBlock": node.heads().best,
            "highestBlock": node.chain.clock().best_now(),
        })
    })?;
    Ok(())
}

/// The chain spec's `properties` of the `node` runtime's development chain.
fn chain_properties() -> Value {
    json!({ "ss58Format": 42, "tokenDecimals": 12, "tokenSymbol": "DEV" })
}

/// `chainSpec_v1_*`: the chain spec's name, the genesis hash and the chain spec's properties
/// (`sc-rpc-spec-v2` `chain_spec`), the same facts `system_chain`, `chain_getBlockHash [0]` and
/// `system_properties` report.
fn register_chain_spec(module: &mut RpcModule<Arc<NodeState>>) -> Result<(), RegisterError> {
    module.register_method("chainSpec_v1_chainName", |_, _, _| CHAIN_NAME)?;
    module.register_method("chainSpec_v1_genesisHash", |_, node, _| -> RpcResult<_> {
        Ok(node.chain.block_hash(0))
    })?;
    module.register_method("chainSpec_v1_properties", |_, _, _| chain_properties())?;
    Ok(())
}

fn register_chain(module: &mut RpcModule<Arc<NodeState>>) -> Result<(), RegisterError> {
    module.register_method(
        "chain_getHeader",
        |params, node, _| -> RpcResult<Option<Header>> {
            let hash = params.sequence().optional_next::<Hash32>()?;
            Ok(node
                .resolve_block(hash)
                .map(|number| node.chain.header(number)))
        },
    )?;
    module.register_method(
        "chain_getBlock",
        |params, node, _| -> RpcResult<Option<SignedBlock>> {
            let hash = params.sequence().optional_next::<Hash32>()?;
            Ok(node
                .resolve_block(hash)
                .map(|number| node.chain.signed_block(number)))
        },
    )?;
    module.register_method("chain_getBlockHash", |params, node, _| {
        get_block_hash(&params, node)
    })?;
    module.register_alias("chain_getHead", "chain_getBlockHash")?;
    module.register_method("chain_getFinalizedHead", |_, node, _| -> RpcResult<_> {
        Ok(node.chain.block_hash(node.heads().finalized))
    })?;
    module.register_alias("chain_getFinalisedHead", "chain_getFinalizedHead")?;
    Ok(())
}

/// `sp_rpc::list::ListOrValue`: `chain_getBlockHash`'s argument (of `NumberOrHex`) and
/// `chainHead_v1_unpin`'s (of hashes).
#[derive(Deserialize)]
#[serde(untagged)]
pub enum ListOrValue<T> {
    List(Vec<T>),
    Value(T),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum NumberOrHex {
    Number(u64),
    Hex(String),
}

fn get_block_hash(params: &Params, node: &NodeState) -> RpcResult<Value> {
    let best = node.heads().best;
    let hash_of = |number: &NumberOrHex| -> RpcResult<Value> {
        let number = block_number_from(number)?;
        Ok(if number <= best {
            json!(node.chain.block_hash(number))
        } else {
            Value::Null
        })
    };
    match params
        .sequence()
        .optional_next::<ListOrValue<Option<NumberOrHex>>>()?
    {
        None | Some(ListOrValue::Value(None)) => Ok(json!(node.chain.block_hash(best))),
        Some(ListOrValue::Value(Some(number))) => hash_of(&number),
        Some(ListOrValue::List(numbers)) => numbers
            .iter()
            .map(|number| {
                number
                    .as_ref()
                    .map_or(Ok(json!(node.chain.block_hash(best))), hash_of)
            })
            .collect::<RpcResult<Vec<_>>>()
            .map(Value::Array),
    }
}

fn block_number_from(number: &NumberOrHex) -> RpcResult<BlockNumber> {
    match number {
        NumberOrHex::Number(n) => BlockNumber::try_from(*n)
            .map_err(|_| rpc_errors::block_number_too_large(&n.to_string())),
        NumberOrHex::Hex(text) => {
            let digits = text
                .strip_prefix("0x")
                .ok_or_else(|| invalid_params(text))?;
            let value = u128::from_str_radix(digits, 16).map_err(|_| invalid_params(text))?;
            BlockNumber::try_from(value).map_err(|_| rpc_errors::block_number_too_large(text))
        }
    }
}

/// jsonrpsee's own "Invalid params" error, as a real node's parameter parsing produces it.
fn invalid_params(detail: &str) -> ErrorObjectOwned {
    ErrorObjectOwned::owned(
        jsonrpsee::types::error::INVALID_PARAMS_CODE,
        jsonrpsee::types::error::INVALID_PARAMS_MSG,
        Some(format!("invalid block number {detail:?}")),
    )
}

/// Resolves a state method's optional `[hash]`: the state methods answer an error (not null)
/// for a block the node does not have.
fn state_block(node: &NodeState, hash: Option<Hash32>) -> RpcResult<BlockNumber> {
    match hash {
        None => Ok(node.heads().best),
        Some(hash) => node
            .resolve_block(Some(hash))
            .ok_or_else(|| rpc_errors::unknown_block(&hash)),
    }
}

fn register_state(module: &mut RpcModule<Arc<NodeState>>) -> Result<(), RegisterError> {
    module.register_method(
        "state_getRuntimeVersion",
        |params, node, _| -> RpcResult<Box<RawValue>> {
            state_block(node, params.sequence().optional_next::<Hash32>()?)?;
            Ok(node.runtime.version_json().to_owned())
        },
    )?;
    module.register_alias("chain_getRuntimeVersion", "state_getRuntimeVersion")?;
    module.register_method(
        "state_getMetadata",
        |params, node, _| -> RpcResult<Arc<str>> {
            state_block(node, params.sequence().optional_next::<Hash32>()?)?;
            Ok(node.runtime.metadata_v14_hex())
        },
    )?;
    module.register_method("state_call", |params, node, _| -> RpcResult<String> {
        let mut args = params.sequence();
        let function: String = args.next()?;
        let input: HexBytes = args.next()?;
        state_block(node, args.optional_next::<Hash32>()?)?;
        node.runtime
            .call(&function, &input.0)
            .map(|output| prefixed_hex(&output))
            .map_err(|error| rpc_errors::runtime_call_failed(&error))
    })?;
    module.register_alias("state_callAt", "state_call")?;
    module.register_method(
        "state_getStorage",
        |params, node, _| -> RpcResult<Option<HexBytes>> {
            let mut args = params.sequence();
            let key: HexBytes = args.next()?;
            let number = state_block(node, args.optional_next::<Hash32>()?)?;
            Ok(node.storage.read(&key.0, number).map(HexBytes))
        },
    )?;
    module.register_alias("state_getStorageAt", "state_getStorage")?;
    module.register_method(
        "state_queryStorageAt",
        |params, node, _| -> RpcResult<Value> {
            let mut args = params.sequence();
            let keys: Vec<HexBytes> = args.next()?;
            let number = state_block(node, args.optional_next::<Hash32>()?)?;
            Ok(json!([storage_change_set(node, number, &keys)]))
        },
    )?;
    Ok(())
}

/// `StorageChangeSet` JSON: `{"block": hash, "changes": [[key, value | null], ...]}`.
fn storage_change_set(node: &NodeState, number: BlockNumber, keys: &[HexBytes]) -> Value {
    let changes: Vec<(&HexBytes, Option<HexBytes>)> = keys
        .iter()
        .map(|key| (key, node.storage.read(&key.0, number).map(HexBytes)))
        .collect();
    json!({ "block": node.chain.block_hash(number), "changes": changes })
}

fn register_author(module: &mut RpcModule<Arc<NodeState>>) -> Result<(), RegisterError> {
    module.register_method(
        "author_submitExtrinsic",
        |params, _, _| -> RpcResult<Hash32> {
            let extrinsic: HexBytes = params.one()?;
            // A transaction's hash is the plain blake2-256 of its encoding, as on a real chain.
            Ok(Hash32(blake2_256(b"", &extrinsic.0)))
        },
    )?;
    module.register_method("author_pendingExtrinsics", |_, _, _| Vec::<HexBytes>::new())?;
    Ok(())
}

fn register_subscriptions(module: &mut RpcModule<Arc<NodeState>>) -> Result<(), RegisterError> {
    module.register_subscription(
        "chain_subscribeNewHeads",
        "chain_newHead",
        "chain_unsubscribeNewHeads",
        |_, pending, node, _| follow_heads(pending, (*node).clone(), HeadKind::Best),
    )?;
    module.register_alias("chain_subscribeNewHead", "chain_subscribeNewHeads")?;
    module.register_alias("subscribe_newHead", "chain_subscribeNewHeads")?;
    module.register_alias("chain_unsubscribeNewHead", "chain_unsubscribeNewHeads")?;
    module.register_alias("unsubscribe_newHead", "chain_unsubscribeNewHeads")?;

    module.register_subscription(
        "chain_subscribeFinalizedHeads",
        "chain_finalizedHead",
        "chain_unsubscribeFinalizedHeads",
        |_, pending, node, _| follow_heads(pending, (*node).clone(), HeadKind::Finalized),
    )?;
    module.register_alias(
        "chain_subscribeFinalisedHeads",
        "chain_subscribeFinalizedHeads",
    )?;
    module.register_alias(
        "chain_unsubscribeFinalisedHeads",
        "chain_unsubscribeFinalizedHeads",
    )?;

    module.register_subscription(
        "chain_subscribeAllHeads",
        "chain_allHead",
        "chain_unsubscribeAllHeads",
        |_, pending, node, _| follow_heads(pending, (*node).clone(), HeadKind::All),
    )?;

    module.register_subscription(
        "state_subscribeRuntimeVersion",
        "state_runtimeVersion",
        "state_unsubscribeRuntimeVersion",
        |_, pending, node, _| async move {
            // The runtime never upgrades: one notification, then the subscription stays open.
            let sink = pending.accept().await?;
            sink.send(SubscriptionMessage::from(
                node.runtime.version_json().to_owned(),
            ))
            .await?;
            sink.closed().await;
            Ok(())
        },
    )?;
    module.register_alias(
        "chain_subscribeRuntimeVersion",
        "state_subscribeRuntimeVersion",
    )?;
    module.register_alias(
        "chain_unsubscribeRuntimeVersion",
        "state_unsubscribeRuntimeVersion",
    )?;

    module.register_subscription(
        "state_subscribeStorage",
        "state_storage",
        "state_unsubscribeStorage",
        |params, pending, node, _| async move {
            let keys = match params.sequence().optional_next::<Vec<HexBytes>>() {
                Ok(Some(keys)) => keys,
                // Every storage change: unsafe, as `sc-rpc`'s `subscribe_storage` has it
                // (`state/state_full.rs:431-433`).
                Ok(None) => {
                    pending.reject(rpc_errors::unsafe_method()).await;
                    return Ok(());
                }
                Err(error) => {
                    pending.reject(error).await;
                    return Ok(());
                }
            };
            follow_storage(pending, (*node).clone(), keys).await
        },
    )?;
    Ok(())
}

/// Which head a heads subscription follows.
#[derive(Clone, Copy)]
enum HeadKind {
    /// New best blocks; starts with the current best, as `sc-rpc` does.
    Best,
    /// Newly finalized blocks; starts with the current finalized block.
    Finalized,
    /// Every imported block; no initial notification.
    All,
}

impl HeadKind {
    fn pick(self, heads: Heads) -> BlockNumber {
        match self {
            HeadKind::Best | HeadKind::All => heads.best,
            HeadKind::Finalized => heads.finalized,
        }
    }
}

/// Sends a header each time the followed head moves forward. Nothing is sent while the node
/// is unresponsive; a head that moves back (the `behind` fault) is not announced.
async fn follow_heads(
    pending: PendingSubscriptionSink,
    node: Arc<NodeState>,
    kind: HeadKind,
) -> SubscriptionResult {
    let mut heads = node.subscribe_heads();
    let sink = pending.accept().await?;
    let mut last_sent = kind.pick(*heads.borrow_and_update());
    if !matches!(kind, HeadKind::All) {
        sink.send(to_message(&node.chain.header(last_sent))?)
            .await?;
    }
    loop {
        tokio::select! {
            changed = heads.changed() => if changed.is_err() { return Ok(()) },
            () = sink.closed() => return Ok(()),
        }
        let number = kind.pick(*heads.borrow_and_update());
        if number <= last_sent || node.faults().unresponsive {
            continue;
        }
        sink.send(to_message(&node.chain.header(number))?).await?;
        last_sent = number;
    }
}

/// Sends the keys' values now, then the keys whose value changed with each new best block.
async fn follow_storage(
    pending: PendingSubscriptionSink,
    node: Arc<NodeState>,
    keys: Vec<HexBytes>,
) -> SubscriptionResult {
    let mut heads = node.subscribe_heads();
    let sink = pending.accept().await?;
    let mut last_best = heads.borrow_and_update().best;
    let mut last_values: Vec<Option<Vec<u8>>> = keys
        .iter()
        .map(|key| node.storage.read(&key.0, last_best))
        .collect();
    sink.send(to_message(&storage_change_set(&node, last_best, &keys))?)
        .await?;
    loop {
        tokio::select! {
            changed = heads.changed() => if changed.is_err() { return Ok(()) },
            () = sink.closed() => return Ok(()),
        }
        let best = heads.borrow_and_update().best;
        if best <= last_best || node.faults().unresponsive {
            continue;
        }
        last_best = best;
        let mut changed_keys = Vec::new();
        for (key, last_value) in keys.iter().zip(last_values.iter_mut()) {
            let value = node.storage.read(&key.0, best);
            if value != *last_value {
                *last_value = value;
                changed_keys.push(key.clone());
            }
        }
        if !changed_keys.is_empty() {
            sink.send(to_message(&storage_change_set(&node, best, &changed_keys))?)
                .await?;
        }
    }
}

fn to_message<T: serde::Serialize + ?Sized>(
    value: &T,
) -> Result<SubscriptionMessage, serde_json::Error> {
    serde_json::value::to_raw_value(value).map(SubscriptionMessage::from)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::time::{Duration, UNIX_EPOCH};

    use super::super::chain::Chain;
    use super::super::clock::ChainClock;
    use super::super::runtime::Runtime;
    use super::*;

    /// A real node's `rpc_methods` (fixture from `@polkadot/types-support`).
    const REAL_NODE_METHODS: &str =
        include_str!("../../fixtures/metadata/substrate-rpc-methods.json");

    #[test]
    fn every_served_method_exists_on_a_real_node() {
        let real: Value = serde_json::from_str(REAL_NODE_METHODS).expect("fixture is JSON");
        let real: BTreeSet<&str> = real["methods"]
            .as_array()
            .expect("methods array")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        let chain = Chain::new(ChainClock::new(UNIX_EPOCH, Duration::from_secs(6)));
        let runtime = Runtime::load().expect("runtime fixture");
        let node = Arc::new(NodeState::new("test".into(), chain, runtime, 2, 8));
        let module = build_module(node, ChainHeadLimits::default()).expect("module builds");
        let served: Vec<&str> = module.method_names().collect();
        assert!(served.len() > 50, "{served:?}");
        for method in served {
            assert!(real.contains(method), "{method} is not a real node method");
        }
    }

    #[test]
    fn block_numbers_beyond_u32_are_refused_with_the_chain_error() {
        let error = block_number_from(&NumberOrHex::Hex("0x100000000".into())).unwrap_err();
        assert_eq!(error.code(), 3001);
        assert_eq!(
            block_number_from(&NumberOrHex::Hex("0x1a".into())).ok(),
            Some(26)
        );
        assert_eq!(block_number_from(&NumberOrHex::Number(26)).ok(), Some(26));
        assert_eq!(
            block_number_from(&NumberOrHex::Hex("26".into()))
                .unwrap_err()
                .code(),
            -32602
        );
    }
}
