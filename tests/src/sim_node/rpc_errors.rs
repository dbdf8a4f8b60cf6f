//! Every JSON-RPC error sim-node returns, with the code and message a Substrate node uses
//! (`sc-rpc-api` error modules), so clients and the gateway see what production sends.

use jsonrpsee::types::ErrorObjectOwned;

use super::primitives::Hash32;
use super::runtime::RuntimeCallError;

/// `sc-rpc-api` error bases per API family.
const CHAIN_BASE: i32 = 3000;
const STATE_BASE: i32 = 4000;

/// `sc_rpc_api::UnsafeRpcError`: what a node started with `--rpc-methods safe` (the default
/// for an externally reachable RPC port) answers to an unsafe method.
pub fn unsafe_method() -> ErrorObjectOwned {
    ErrorObjectOwned::owned(
        -32601,
        "RPC call is unsafe to be called externally",
        None::<()>,
    )
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
    let detail = match error {
        RuntimeCallError::UnknownFunction(_) => format!("Other: {error}"),
        RuntimeCallError::BadInput { .. } => format!("Runtime panicked: {error}"),
    };
    ErrorObjectOwned::owned(
        STATE_BASE + 3,
        format!("Client error: Execution failed: {detail}"),
        None::<()>,
    )
}
