//! Every JSON-RPC error sim-node returns, with the code and message a Substrate node uses
//! (`sc-rpc-api` error modules for the legacy methods, `sc-rpc-spec-v2`'s for the new spec), so
//! clients and the gateway see what production sends.

use jsonrpsee::types::ErrorObjectOwned;

use super::primitives::Hash32;
use super::runtime::RuntimeCallError;

/// `sc-rpc-api` error bases per API family.
const CHAIN_BASE: i32 = 3000;
const STATE_BASE: i32 = 4000;

/// `sc_rpc_api::UnsafeRpcError`'s text (polkadot-sdk `substrate/client/rpc-api/src/policy.rs:61`).
const UNSAFE_RPC_MESSAGE: &str = "RPC call is unsafe to be called externally";

/// `sc_rpc_api::UnsafeRpcError` as is (`rpc-api/src/policy.rs:67-70`, jsonrpsee's "method not
/// found" code): what a node started with `--rpc-methods safe` (the default for an externally
/// reachable RPC port) answers to an unsafe author, system, offchain, dev, statement or babe
/// method, `system_dryRun`, `state_trieMigrationStatus`, and `state_subscribeStorage` without
/// keys.
pub fn unsafe_method() -> ErrorObjectOwned {
    ErrorObjectOwned::owned(-32601, UNSAFE_RPC_MESSAGE, None::<()>)
}

/// The same error inside `sc_rpc_api::state::Error::UnsafeRpcCalled` (code 4003,
/// `rpc-api/src/state/error.rs:52,67`): what the unsafe `state_*` methods of `sc-rpc`
/// (`state_getPairs`, `state_queryStorage`, `state_traceBlock`) answer.
pub fn unsafe_state_method() -> ErrorObjectOwned {
    ErrorObjectOwned::owned(STATE_BASE + 3, UNSAFE_RPC_MESSAGE, None::<()>)
}

/// `sc_rpc_api::chain::Error::Other` (code 3001), as for a block number beyond `u32`.
pub fn block_number_too_large(number: &str) -> ErrorObjectOwned {
    ErrorObjectOwned::owned(
        CHAIN_BASE + 1,
        format!("`{number}` > u32::MAX, the max block number is u32."),
        None::<()>,
    )
}

/// `sc_rpc_api::state::Error::Client` (code 4003) for a block the node does not have.
pub fn unknown_block(hash: &Hash32) -> ErrorObjectOwned {
    ErrorObjectOwned::owned(
        STATE_BASE + 3,
        format!("Client error: UnknownBlock: Header was not found in the database: {hash}"),
        None::<()>,
    )
}

/// `sc_rpc_api::state::Error::Client` (code 4003) for a failed runtime call.
pub fn runtime_call_failed(error: &RuntimeCallError) -> ErrorObjectOwned {
    ErrorObjectOwned::owned(
        STATE_BASE + 3,
        format!("Client error: {}", execution_failed(error)),
        None::<()>,
    )
}

/// `sp_blockchain::Error::Execution` as text: the `error` of a chainHead `operationError` and the
/// inner part of `state_call`'s error.
pub fn execution_failed(error: &RuntimeCallError) -> String {
    let detail = match error {
        RuntimeCallError::UnknownFunction(_) => format!("Other: {error}"),
        RuntimeCallError::BadInput { .. } => format!("Runtime panicked: {error}"),
    };
    format!("Execution failed: {detail}")
}

/// `sc-rpc-spec-v2` chainHead error codes (`chain_head/error.rs`, `rpc_spec_v2` module).
const CHAIN_HEAD_REACHED_LIMITS: i32 = -32800;
const CHAIN_HEAD_INVALID_BLOCK: i32 = -32801;
const CHAIN_HEAD_INVALID_RUNTIME_CALL: i32 = -32802;
const CHAIN_HEAD_INVALID_CONTINUE: i32 = -32803;
const CHAIN_HEAD_INVALID_DUPLICATE_HASHES: i32 = -32804;

/// `chainHead_v1_follow` beyond the connection's follow subscriptions.
pub fn follow_limit_reached() -> ErrorObjectOwned {
    ErrorObjectOwned::owned(
        CHAIN_HEAD_REACHED_LIMITS,
        "Maximum number of chainHead_follow has been reached",
        None::<()>,
    )
}

/// A block hash the follow subscription has not announced, or has unpinned.
pub fn invalid_block() -> ErrorObjectOwned {
    ErrorObjectOwned::owned(CHAIN_HEAD_INVALID_BLOCK, "Invalid block hash", None::<()>)
}

/// `chainHead_v1_call` on a follow subscription made with `withRuntime: false`.
pub fn follow_without_runtime() -> ErrorObjectOwned {
    ErrorObjectOwned::owned(
        CHAIN_HEAD_INVALID_RUNTIME_CALL,
        "The `chainHead_follow` subscription was started with `withRuntime` set to `false`",
        None::<()>,
    )
}

/// `chainHead_v1_continue` for an operation that is not waiting for it.
pub fn invalid_continue() -> ErrorObjectOwned {
    ErrorObjectOwned::owned(
        CHAIN_HEAD_INVALID_CONTINUE,
        "Wait for continue event was not generated for the subscription",
        None::<()>,
    )
}

/// `chainHead_v1_unpin` with a hash twice in its list.
pub fn duplicate_hashes() -> ErrorObjectOwned {
    ErrorObjectOwned::owned(
        CHAIN_HEAD_INVALID_DUPLICATE_HASHES,
        "Received duplicate hashes for the `chainHead_unpin` method",
        None::<()>,
    )
}

/// A chainHead hex parameter that is not hex (`Error::InvalidParam`).
pub fn invalid_hex_param(param: &str) -> ErrorObjectOwned {
    ErrorObjectOwned::owned(
        jsonrpsee::types::error::INVALID_PARAMS_CODE,
        format!("Invalid parameter: {param}"),
        None::<()>,
    )
}

/// `transaction_v1_stop` for an operation id the connection is not broadcasting
/// (`ErrorBroadcast::InvalidOperationID`).
pub fn invalid_operation_id() -> ErrorObjectOwned {
    ErrorObjectOwned::owned(
        jsonrpsee::types::error::INVALID_PARAMS_CODE,
        "Invalid operation id",
        None::<()>,
    )
}
