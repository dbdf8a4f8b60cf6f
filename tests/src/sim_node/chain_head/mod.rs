//! The `chainHead_v1_*` methods of the new JSON-RPC spec, as polkadot-sdk's `sc-rpc-spec-v2`
//! serves them (`chain_head/chain_head.rs`): a follow subscription per client view of the chain,
//! blocks pinned per subscription, and body, call and storage operations whose results arrive
//! as follow events, after the `{"result":"started","operationId":…}` answer.
//!
//! Limits are Substrate's (`ChainHeadConfig::default()`), see [`ChainHeadLimits`]. The
//! operations reuse what the legacy methods answer: `chain_getBlock`'s extrinsics,
//! `state_call`'s runtime, `state_getStorage`'s storage.
//!
//! Modules: `events` (what is sent), `subscriptions` (pins, operations, per-connection
//! follows), `follow` (the follow subscription's events).

mod events;
mod follow;
mod subscriptions;

use std::sync::Arc;
use std::time::Duration;

use jsonrpsee::server::ResponsePayload;
use jsonrpsee::types::{ErrorObjectOwned, Params};
use jsonrpsee::{ConnectionId, Extensions, RpcModule};

use super::clock::BlockNumber;
use super::primitives::{Hash32, prefixed_hex};
use super::rpc::{ListOrValue, RegisterError};
use super::rpc_errors;
use super::state::NodeState;
use super::storage::{QueryType, StorageItem};
use events::{FollowEvent, MethodResponse, StorageQuery, StorageResult, StorageResultType};
use subscriptions::{BlockLock, LockError, Subscriptions, UnpinError};

/// chainHead limits; the defaults are Substrate's (`ChainHeadConfig::default()` in
/// `chain_head.rs`, which `sc-service` uses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainHeadLimits {
    /// Blocks pinned across every follow subscription of the node (`MAX_PINNED_BLOCKS`, 512).
    /// A block that would exceed it stops each subscription that has held a block longer than
    /// `max_pinned_duration`, and, if that frees nothing, every subscription, with `stop`.
    pub max_pinned_blocks: usize,
    /// `MAX_PINNED_DURATION`, 60 s.
    pub max_pinned_duration: Duration,
    /// Body, call and storage operations running at once per subscription
    /// (`MAX_ONGOING_OPERATIONS`, 16, the spec's minimum).
    pub max_ongoing_operations: usize,
    /// `chainHead_v1_follow` subscriptions per connection
    /// (`MAX_FOLLOW_SUBSCRIPTIONS_PER_CONNECTION`, 4); one more is refused with -32800.
    pub max_follow_subscriptions_per_connection: usize,
    /// Best and finalized further apart than this stop every subscription
    /// (`MAX_LAGGING_DISTANCE`, 128).
    pub max_lagging_distance: BlockNumber,
}

impl Default for ChainHeadLimits {
    fn default() -> Self {
        Self {
            max_pinned_blocks: 512,
            max_pinned_duration: Duration::from_secs(60),
            max_ongoing_operations: 16,
            max_follow_subscriptions_per_connection: 4,
            max_lagging_distance: 128,
        }
    }
}

type RpcResult<T> = Result<T, ErrorObjectOwned>;

/// Registers every `chainHead_v1_*` method.
pub fn register(
    module: &mut RpcModule<Arc<NodeState>>,
    limits: ChainHeadLimits,
) -> Result<(), RegisterError> {
    let subscriptions = Arc::new(Subscriptions::new(limits));

    let follows = subscriptions.clone();
    module.register_subscription_raw(
        "chainHead_v1_follow",
        "chainHead_v1_followEvent",
        "chainHead_v1_unfollow",
        move |params, pending, node, _| {
            let with_runtime = params.sequence().next::<bool>();
            let subscriptions = follows.clone();
            tokio::spawn(async move {
                match with_runtime {
                    Ok(with_runtime) => {
                        follow::follow(pending, (*node).clone(), subscriptions, with_runtime).await;
                    }
                    Err(error) => pending.reject(error).await,
                }
            });
        },
    )?;

    let bodies = subscriptions.clone();
    module.register_method("chainHead_v1_body", move |params, node, extensions| {
        operation_answer(body(&params, node, &bodies, extensions))
    })?;
    let headers = subscriptions.clone();
    module.register_method("chainHead_v1_header", move |params, node, extensions| {
        header(&params, node, &headers, extensions)
    })?;
    let storages = subscriptions.clone();
    module.register_method("chainHead_v1_storage", move |params, node, extensions| {
        operation_answer(storage(&params, node, &storages, extensions))
    })?;
    let calls = subscriptions.clone();
    module.register_method("chainHead_v1_call", move |params, node, extensions| {
        operation_answer(call(&params, node, &calls, extensions))
    })?;
    let unpins = subscriptions.clone();
    module.register_method("chainHead_v1_unpin", move |params, _, extensions| {
        unpin(&params, &unpins, extensions)
    })?;
    let continues = subscriptions.clone();
    module.register_method("chainHead_v1_continue", move |params, _, extensions| {
        continue_operation(&params, &continues, extensions)
    })?;
    module.register_method(
        "chainHead_v1_stopOperation",
        move |params, _, extensions| stop_operation(&params, &subscriptions, extensions),
    )?;
    Ok(())
}

/// The caller's connection (every jsonrpsee call carries it).
fn connection(extensions: &Extensions) -> Option<ConnectionId> {
    extensions.get::<ConnectionId>().copied()
}

/// Whether `follow` is one of the caller's own follow subscriptions: a subscription id from
/// another connection is as unknown as a made-up one.
fn is_own_follow(subscriptions: &Subscriptions, extensions: &Extensions, follow: &str) -> bool {
    connection(extensions)
        .is_some_and(|connection| subscriptions.contains_follow(connection, follow))
}

/// An operation's answer: `started` is sent first, and the operation's events only once it is
/// out (so a client never sees an event for an operation id it does not know yet).
enum OperationAnswer {
    Started(Box<StartedOperation>),
    LimitReached,
}

struct StartedOperation {
    lock: BlockLock,
    events: OperationEvents,
}

impl OperationAnswer {
    fn started(lock: BlockLock, events: OperationEvents) -> Self {
        OperationAnswer::Started(Box::new(StartedOperation { lock, events }))
    }
}

/// What an operation sends once `started` is out.
enum OperationEvents {
    One(FollowEvent),
    Storage(Vec<StorageItem>),
}

fn operation_answer(
    answer: RpcResult<OperationAnswer>,
) -> ResponsePayload<'static, MethodResponse> {
    let (lock, events) = match answer {
        Err(error) => return ResponsePayload::error(error),
        Ok(OperationAnswer::LimitReached) => {
            return ResponsePayload::success(MethodResponse::LimitReached);
        }
        Ok(OperationAnswer::Started(started)) => (started.lock, started.events),
    };
    let started = MethodResponse::Started {
        operation_id: lock.operation.id.clone(),
    };
    let (payload, answered) = ResponsePayload::success(started).notify_on_completion();
    tokio::spawn(async move {
        if answered.await.is_err() {
            return;
        }
        match events {
            OperationEvents::One(event) => {
                let _ = lock.responses.send(event).await;
            }
            OperationEvents::Storage(items) => send_storage_items(&lock, items).await,
        }
    });
    payload
}

/// One `operationStorageItems` per item, as Substrate sends them, then `operationStorageDone`
/// (also after `chainHead_v1_stopOperation`).
async fn send_storage_items(lock: &BlockLock, items: Vec<StorageItem>) {
    let operation_id = &lock.operation.id;
    for item in items {
        if lock.operation.cancel.is_cancelled() {
            break;
        }
        let event = FollowEvent::OperationStorageItems {
            operation_id: operation_id.clone(),
            items: vec![item.into()],
        };
        if lock.responses.send(event).await.is_err() {
            return;
        }
    }
    let done = FollowEvent::OperationStorageDone {
        operation_id: operation_id.clone(),
    };
    let _ = lock.responses.send(done).await;
}

impl From<StorageItem> for StorageResult {
    fn from(item: StorageItem) -> Self {
        let (key, result) = match item {
            StorageItem::Value { key, value } => {
                (key, StorageResultType::Value(prefixed_hex(&value)))
            }
            StorageItem::Hash { key, hash } => (key, StorageResultType::Hash(prefixed_hex(&hash))),
            StorageItem::ClosestDescendantMerkleValue { key, merkle_value } => (
                key,
                StorageResultType::ClosestDescendantMerkleValue(prefixed_hex(&merkle_value)),
            ),
        };
        StorageResult {
            key: prefixed_hex(&key),
            result,
            child_trie_key: None,
        }
    }
}

/// Locks `hash` for an operation of `wanted` items; a missing or stopped subscription or no free
/// operation slot is `limitReached`, a block the subscription does not pin is -32801.
fn lock_for_operation(
    subscriptions: &Subscriptions,
    extensions: &Extensions,
    follow: &str,
    hash: &Hash32,
    wanted: usize,
) -> RpcResult<Option<BlockLock>> {
    if !is_own_follow(subscriptions, extensions, follow) {
        return Ok(None);
    }
    match subscriptions.lock_block(follow, hash, wanted) {
        Ok(lock) => Ok(Some(lock)),
        Err(LockError::SubscriptionAbsent | LockError::ExceededLimits) => Ok(None),
        Err(LockError::BlockHashAbsent) => Err(rpc_errors::invalid_block()),
    }
}

fn body(
    params: &Params,
    node: &NodeState,
    subscriptions: &Subscriptions,
    extensions: &Extensions,
) -> RpcResult<OperationAnswer> {
    let mut args = params.sequence();
    let follow: String = args.next()?;
    let hash: Hash32 = args.next()?;
    let Some(lock) = lock_for_operation(subscriptions, extensions, &follow, &hash, 1)? else {
        return Ok(OperationAnswer::LimitReached);
    };
    let event = FollowEvent::OperationBodyDone {
        operation_id: lock.operation.id.clone(),
        value: node.chain.signed_block(lock.number).block.extrinsics,
    };
    Ok(OperationAnswer::started(lock, OperationEvents::One(event)))
}

/// The SCALE-encoded header as hex; `null` for a subscription that is not (or no longer) the
/// caller's.
fn header(
    params: &Params,
    node: &NodeState,
    subscriptions: &Subscriptions,
    extensions: &Extensions,
) -> RpcResult<Option<String>> {
    let mut args = params.sequence();
    let follow: String = args.next()?;
    let hash: Hash32 = args.next()?;
    let Some(lock) = lock_for_operation(subscriptions, extensions, &follow, &hash, 1)? else {
        return Ok(None);
    };
    Ok(Some(prefixed_hex(&node.chain.scale_header(lock.number))))
}

fn call(
    params: &Params,
    node: &NodeState,
    subscriptions: &Subscriptions,
    extensions: &Extensions,
) -> RpcResult<OperationAnswer> {
    let mut args = params.sequence();
    let follow: String = args.next()?;
    let hash: Hash32 = args.next()?;
    let function: String = args.next()?;
    let call_parameters = parse_hex_param(&args.next::<String>()?)?;
    let Some(lock) = lock_for_operation(subscriptions, extensions, &follow, &hash, 1)? else {
        return Ok(OperationAnswer::LimitReached);
    };
    if !lock.with_runtime {
        return Err(rpc_errors::follow_without_runtime());
    }
    let operation_id = lock.operation.id.clone();
    let event = match node.runtime.call(&function, &call_parameters) {
        Ok(output) => FollowEvent::OperationCallDone {
            operation_id,
            output: prefixed_hex(&output),
        },
        Err(error) => FollowEvent::OperationError {
            operation_id,
            error: rpc_errors::execution_failed(&error),
        },
    };
    Ok(OperationAnswer::started(lock, OperationEvents::One(event)))
}

fn storage(
    params: &Params,
    node: &NodeState,
    subscriptions: &Subscriptions,
    extensions: &Extensions,
) -> RpcResult<OperationAnswer> {
    let mut args = params.sequence();
    let follow: String = args.next()?;
    let hash: Hash32 = args.next()?;
    let queries: Vec<StorageQuery> = args.next()?;
    let child_trie: Option<String> = args.optional_next()?;
    if !is_own_follow(subscriptions, extensions, &follow) {
        return Ok(OperationAnswer::LimitReached);
    }
    let keys = queries
        .iter()
        .map(|query| parse_hex_param(&query.key))
        .collect::<RpcResult<Vec<_>>>()?;
    let child_trie = child_trie.map(|key| parse_hex_param(&key)).transpose()?;
    let Some(lock) = lock_for_operation(subscriptions, extensions, &follow, &hash, queries.len())?
    else {
        return Ok(OperationAnswer::LimitReached);
    };
    // sim-node has no child tries: a child-trie query finds nothing.
    let items = if child_trie.is_some() {
        Vec::new()
    } else {
        queries
            .iter()
            .zip(&keys)
            .flat_map(|(query, key)| {
                node.storage
                    .query(lock.number, key, query.query_type.into())
            })
            .collect()
    };
    Ok(OperationAnswer::started(
        lock,
        OperationEvents::Storage(items),
    ))
}

fn unpin(params: &Params, subscriptions: &Subscriptions, extensions: &Extensions) -> RpcResult<()> {
    let mut args = params.sequence();
    let follow: String = args.next()?;
    let hashes = match args.next::<ListOrValue<Hash32>>()? {
        ListOrValue::Value(hash) => vec![hash],
        ListOrValue::List(hashes) => hashes,
    };
    if !is_own_follow(subscriptions, extensions, &follow) {
        return Ok(());
    }
    match subscriptions.unpin_blocks(&follow, &hashes) {
        Ok(()) | Err(UnpinError::SubscriptionAbsent) => Ok(()),
        Err(UnpinError::BlockHashAbsent) => Err(rpc_errors::invalid_block()),
        Err(UnpinError::DuplicateHashes) => Err(rpc_errors::duplicate_hashes()),
    }
}

/// sim-node never pauses a storage operation (`operationWaitingForContinue`), so a running
/// operation is -32803 and anything else is ignored, as in Substrate.
fn continue_operation(
    params: &Params,
    subscriptions: &Subscriptions,
    extensions: &Extensions,
) -> RpcResult<()> {
    let mut args = params.sequence();
    let follow: String = args.next()?;
    let operation: String = args.next()?;
    if is_own_follow(subscriptions, extensions, &follow)
        && subscriptions.has_operation(&follow, &operation)
    {
        return Err(rpc_errors::invalid_continue());
    }
    Ok(())
}

fn stop_operation(
    params: &Params,
    subscriptions: &Subscriptions,
    extensions: &Extensions,
) -> RpcResult<()> {
    let mut args = params.sequence();
    let follow: String = args.next()?;
    let operation: String = args.next()?;
    if is_own_follow(subscriptions, extensions, &follow) {
        subscriptions.stop_operation(&follow, &operation);
    }
    Ok(())
}

/// Hex as `sc-rpc-spec-v2`'s `parse_hex_param` reads it: empty is no bytes, `0x` is optional,
/// anything else is -32602 "Invalid parameter".
fn parse_hex_param(param: &str) -> RpcResult<Vec<u8>> {
    if param.is_empty() {
        return Ok(Vec::new());
    }
    hex::decode(param.strip_prefix("0x").unwrap_or(param))
        .map_err(|_| rpc_errors::invalid_hex_param(param))
}

impl From<events::StorageQueryType> for QueryType {
    fn from(query: events::StorageQueryType) -> Self {
        match query {
            events::StorageQueryType::Value => QueryType::Value,
            events::StorageQueryType::Hash => QueryType::Hash,
            events::StorageQueryType::ClosestDescendantMerkleValue => {
                QueryType::ClosestDescendantMerkleValue
            }
            events::StorageQueryType::DescendantsValues => QueryType::DescendantsValues,
            events::StorageQueryType::DescendantsHashes => QueryType::DescendantsHashes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_params_take_an_optional_prefix_and_empty_is_no_bytes() {
        assert_eq!(parse_hex_param(""), Ok(Vec::new()));
        assert_eq!(parse_hex_param("0x"), Ok(Vec::new()));
        assert_eq!(parse_hex_param("0x0f00"), Ok(vec![15, 0]));
        assert_eq!(parse_hex_param("0f00"), Ok(vec![15, 0]));
        let error = parse_hex_param("0xzz").unwrap_err();
        assert_eq!(error.code(), -32602);
        assert_eq!(error.message(), "Invalid parameter: 0xzz");
    }

    #[test]
    fn defaults_are_substrates() {
        let limits = ChainHeadLimits::default();
        assert_eq!(limits.max_pinned_blocks, 512);
        assert_eq!(limits.max_follow_subscriptions_per_connection, 4);
        assert_eq!(limits.max_ongoing_operations, 16);
    }
}
