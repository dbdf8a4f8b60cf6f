//! JSON-RPC 2.0 framing: the calls of a request body (parsed by
//! [`stages::parse`](super::stages::parse)), outcomes become the answer body. Every JSON-RPC
//! error the gateway itself produces is made here, so clients see one set of codes.
//!
//! Parameters and results stay raw JSON text: the gateway never needs their values, and a
//! metadata blob (megabytes of hex) is copied, not parsed into a tree.

use std::net::SocketAddr;

use serde::Serialize;
use serde_json::value::RawValue;

pub use crate::cache::Outcome;
use crate::methods::Refusal;

/// Codes of the JSON-RPC 2.0 specification and, for the gateway's own limits, the codes
/// jsonrpsee (the node's server) uses for the same conditions.
pub mod code {
    pub const PARSE_ERROR: i32 = -32700;
    pub const INVALID_REQUEST: i32 = -32600;
    pub const METHOD_NOT_FOUND: i32 = -32601;
    /// The gateway could not get an answer from any node, or the node was busy.
    pub const UPSTREAM_UNAVAILABLE: i32 = -32000;
    /// Missing, unknown or revoked API key.
    pub const UNAUTHORIZED: i32 = -32001;
    /// The key's rate limit (EIP-1474's "limit exceeded").
    pub const RATE_LIMITED: i32 = -32005;
    /// jsonrpsee's `OVERSIZED_REQUEST_CODE`.
    pub const REQUEST_TOO_BIG: i32 = -32007;
    /// jsonrpsee's `TOO_BIG_BATCH_REQUEST_CODE`.
    pub const BATCH_TOO_BIG: i32 = -32010;
    /// jsonrpsee's `TOO_MANY_SUBSCRIPTIONS_CODE`.
    pub const TOO_MANY_SUBSCRIPTIONS: i32 = -32006;
}

/// A JSON-RPC error object made by the gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RpcError {
    pub code: i32,
    pub message: String,
}

impl RpcError {
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        RpcError {
            code,
            message: message.into(),
        }
    }

    pub fn parse_error(detail: impl std::fmt::Display) -> Self {
        RpcError::new(code::PARSE_ERROR, format!("Parse error: {detail}"))
    }

    pub fn invalid_request(reason: &str) -> Self {
        RpcError::new(code::INVALID_REQUEST, format!("Invalid request: {reason}"))
    }

    pub fn batch_too_big(len: usize, max: usize) -> Self {
        RpcError::new(
            code::BATCH_TOO_BIG,
            format!(
                "The batch request was too large: {len} calls, this gateway takes at most {max}"
            ),
        )
    }

    pub fn request_too_big(max: usize) -> Self {
        RpcError::new(
            code::REQUEST_TOO_BIG,
            format!("Request is too big: this gateway takes bodies of at most {max} bytes"),
        )
    }

    pub fn unauthorized(reason: &str) -> Self {
        RpcError::new(code::UNAUTHORIZED, format!("Unauthorized: {reason}"))
    }

    pub fn rate_limited(retry_after_secs: u64) -> Self {
        RpcError::new(
            code::RATE_LIMITED,
            format!("Rate limit exceeded for this API key: retry after {retry_after_secs} s"),
        )
    }

    pub fn too_many_connections(max: u32) -> Self {
        RpcError::new(
            code::RATE_LIMITED,
            format!("Too many WebSocket connections for this API key: at most {max}"),
        )
    }

    pub fn too_many_subscriptions(max: u32) -> Self {
        RpcError::new(
            code::TOO_MANY_SUBSCRIPTIONS,
            format!("Too many subscriptions on this connection: at most {max}"),
        )
    }

    pub fn too_many_key_subscriptions(max: u32) -> Self {
        RpcError::new(
            code::TOO_MANY_SUBSCRIPTIONS,
            format!("Too many subscriptions for this API key: at most {max} on the nodes"),
        )
    }

    /// No connection to `node` may take another subscription.
    pub fn node_full(node: std::net::SocketAddr) -> Self {
        RpcError::new(
            code::UPSTREAM_UNAVAILABLE,
            format!(
                "Node {node} holds as many subscriptions as the gateway gives it: try again later"
            ),
        )
    }

    /// A method of the node's unsafe list: the node's own answer on a `--rpc-methods safe`
    /// port, as the method table records it.
    pub fn node_refusal(refusal: Refusal) -> Self {
        RpcError::new(refusal.code, refusal.message)
    }

    /// A method the config's `deny` list refuses.
    pub fn not_served(method: &str) -> Self {
        RpcError::new(
            code::METHOD_NOT_FOUND,
            format!("Method {method} is not served by this gateway"),
        )
    }

    pub fn upstream_unavailable(detail: impl std::fmt::Display) -> Self {
        RpcError::new(
            code::UPSTREAM_UNAVAILABLE,
            format!("No node could answer: {detail}"),
        )
    }

    /// The node had the gateway's budget of calls in flight for as long as a call waits.
    pub fn upstream_busy(node: SocketAddr, in_flight: u32) -> Self {
        RpcError::new(
            code::UPSTREAM_UNAVAILABLE,
            format!("Upstream busy: node {node} has {in_flight} calls in flight; try again"),
        )
    }

    pub fn to_raw(&self) -> Box<RawValue> {
        raw(self)
    }
}

/// One well-formed call of a request body.
#[derive(Debug, Clone)]
pub struct Call {
    /// None for a notification (no `id` member): it gets no answer.
    pub id: Option<Box<RawValue>>,
    pub method: String,
    /// An array or an object; None when absent.
    pub params: Option<Box<RawValue>>,
}

/// One entry of a request body: a call, or what is wrong with it.
#[derive(Debug)]
pub enum Entry {
    Call(Call),
    /// The id is kept when it could be read, so the error answers the right call.
    Invalid {
        id: Option<Box<RawValue>>,
        error: RpcError,
    },
}

/// A parsed request body.
#[derive(Debug)]
pub enum Body {
    Single(Entry),
    Batch(Vec<Entry>),
}

impl Body {
    pub fn entries(&self) -> &[Entry] {
        match self {
            Body::Single(entry) => std::slice::from_ref(entry),
            Body::Batch(entries) => entries,
        }
    }

    pub fn is_batch(&self) -> bool {
        matches!(self, Body::Batch(_))
    }
}

impl From<RpcError> for Outcome {
    fn from(error: RpcError) -> Self {
        Outcome::Error(error.to_raw())
    }
}

/// The request a node gets for `method` and `params` under the gateway's own `id` (over HTTP
/// one fixed id: identical calls of different clients look alike upstream); the client's id is
/// put back into the answer.
pub fn upstream_request(id: u64, method: &str, params: Option<&RawValue>) -> String {
    #[derive(Serialize)]
    struct Request<'a> {
        jsonrpc: &'static str,
        id: u64,
        method: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        params: Option<&'a RawValue>,
    }
    serde_json::to_string(&Request {
        jsonrpc: "2.0",
        id,
        method,
        params,
    })
    .expect("a request of raw JSON values serializes")
}

/// One answer object, with the client's id, as text (JSON by construction from raw JSON
/// values: not parsed again, which for a metadata answer is megabytes).
pub fn answer(id: Option<&RawValue>, outcome: &Outcome) -> String {
    match outcome {
        Outcome::Result(result) => answer_text(id, Ok(result)),
        Outcome::Error(error) => answer_text(id, Err(error)),
    }
}

/// An answer to `id` with a result (`Ok`) or an error (`Err`), both raw JSON, as text.
pub fn answer_text(id: Option<&RawValue>, outcome: Result<&RawValue, &RawValue>) -> String {
    #[derive(Serialize)]
    struct Answer<'a> {
        jsonrpc: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        result: Option<&'a RawValue>,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<&'a RawValue>,
        id: &'a RawValue,
    }
    let (result, error) = match outcome {
        Ok(result) => (Some(result), None),
        Err(error) => (None, Some(error)),
    };
    serde_json::to_string(&Answer {
        jsonrpc: "2.0",
        result,
        error,
        id: id.unwrap_or(RawValue::NULL),
    })
    .expect("an answer of raw JSON values serializes")
}

/// A subscription notification, as a node sends it.
pub fn notification(method: &str, subscription: &str, result: &RawValue) -> String {
    #[derive(Serialize)]
    struct Params<'a> {
        subscription: &'a str,
        result: &'a RawValue,
    }
    #[derive(Serialize)]
    struct Notification<'a> {
        jsonrpc: &'static str,
        method: &'a str,
        params: Params<'a>,
    }
    serde_json::to_string(&Notification {
        jsonrpc: "2.0",
        method,
        params: Params {
            subscription,
            result,
        },
    })
    .expect("a notification of raw JSON serializes")
}

/// `text` as a JSON string.
pub fn string_value(text: &str) -> Box<RawValue> {
    raw(&text)
}

/// The answer to a body that could not be taken apart into calls.
pub fn error_body(error: &RpcError) -> Vec<u8> {
    answer(None, &Outcome::from(error.clone())).into_bytes()
}

/// The body answering a batch: the answers in the order of the calls, notifications left out.
pub fn batch_body(answers: &[String]) -> String {
    format!("[{}]", answers.join(","))
}

fn raw(value: &impl Serialize) -> Box<RawValue> {
    serde_json::value::to_raw_value(value).expect("gateway answers serialize")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notification_is_what_a_node_sends() {
        let header = RawValue::from_string(r#"{"number":"0x1"}"#.to_owned()).unwrap();
        assert_eq!(
            notification("chain_newHead", "abc", &header),
            r#"{"jsonrpc":"2.0","method":"chain_newHead","params":{"subscription":"abc","result":{"number":"0x1"}}}"#
        );
        assert_eq!(string_value("a\"b").get(), r#""a\"b""#);
    }

    #[test]
    fn answer_carries_the_client_id() {
        let outcome = Outcome::Result(RawValue::from_string(r#"{"a":1}"#.to_owned()).unwrap());
        let id = RawValue::from_string("\"x\"".to_owned()).unwrap();
        assert_eq!(
            answer(Some(&id), &outcome),
            r#"{"jsonrpc":"2.0","result":{"a":1},"id":"x"}"#
        );
        assert_eq!(
            String::from_utf8(error_body(&RpcError::new(-1, "m"))).unwrap(),
            r#"{"jsonrpc":"2.0","error":{"code":-1,"message":"m"},"id":null}"#
        );
    }
}
