//! The stages a JSON-RPC request passes in the gateway, whatever its transport (an HTTP
//! request or a WebSocket message), in this order:
//!
//! 1. [`auth`]: the API key: where a client puts it, the cached check, last-used times.
//! 2. [`parse`]: the body becomes JSON-RPC calls, within the batch limit.
//! 3. [`rate_limit`]: the key's allowance; a batch takes one per call.
//! 4. [`policy`]: per call, which methods never reach a node.
//!
//! A stage says what it lets through or why not; it counts no metric and writes no answer.
//! [`Pipeline`](super::pipeline::Pipeline) runs them for both transports and turns a refusal
//! into the client's JSON-RPC error and its metric, in one place.

pub mod auth;
pub mod parse;
pub mod policy;
pub mod rate_limit;
