//! Parse: a request body (an HTTP body, a WebSocket message) becomes JSON-RPC calls, within
//! the batch limit. A malformed call stays in the body as an invalid entry, answered in its
//! place with its id; parameters stay raw JSON text.

use std::collections::BTreeMap;

use serde_json::value::RawValue;

use crate::gateway::jsonrpc::{Body, Call, Entry, RpcError};

/// Parses a request body. Errors that concern the whole body (not JSON, an empty or too long
/// batch) come back as the error to answer with, to id `null`.
pub fn parse_body(bytes: &[u8], max_batch: usize) -> Result<Body, RpcError> {
    let text = std::str::from_utf8(bytes).map_err(RpcError::parse_error)?;
    let value: &RawValue = serde_json::from_str(text).map_err(RpcError::parse_error)?;
    if !value.get().starts_with('[') {
        return Ok(Body::Single(parse_entry(value)));
    }
    let items: Vec<&RawValue> = serde_json::from_str(value.get()).map_err(RpcError::parse_error)?;
    if items.is_empty() {
        return Err(RpcError::invalid_request("empty batch"));
    }
    if items.len() > max_batch {
        return Err(RpcError::batch_too_big(items.len(), max_batch));
    }
    Ok(Body::Batch(items.into_iter().map(parse_entry).collect()))
}

/// Checks one call object as JSON-RPC 2.0 defines it.
fn parse_entry(value: &RawValue) -> Entry {
    let Ok(members) = serde_json::from_str::<BTreeMap<String, &RawValue>>(value.get()) else {
        return invalid(None, "a call must be a JSON object");
    };
    let id = members.get("id").map(|id| (*id).to_owned());
    if let Some(id) = &id
        && !is_valid_id(id)
    {
        return invalid(None, "id must be a string, a number or null");
    }
    if members.get("jsonrpc").map(|version| version.get()) != Some("\"2.0\"") {
        return invalid(id, "jsonrpc must be \"2.0\"");
    }
    let Some(Ok(method)) = members
        .get("method")
        .map(|method| serde_json::from_str::<String>(method.get()))
    else {
        return invalid(id, "method must be a string");
    };
    let params = members.get("params").map(|params| (*params).to_owned());
    if let Some(params) = &params
        && !(params.get().starts_with('[') || params.get().starts_with('{'))
    {
        return invalid(id, "params must be an array or an object");
    }
    Entry::Call(Call { id, method, params })
}

fn invalid(id: Option<Box<RawValue>>, reason: &str) -> Entry {
    Entry::Invalid {
        id,
        error: RpcError::invalid_request(reason),
    }
}

fn is_valid_id(id: &RawValue) -> bool {
    let text = id.get();
    text == "null"
        || text.starts_with('"')
        || text.starts_with(['-', '0', '1', '2', '3', '4', '5', '6', '7', '8', '9'])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::jsonrpc::code;

    fn single(text: &str) -> Entry {
        match parse_body(text.as_bytes(), 10).expect("parses") {
            Body::Single(entry) => entry,
            Body::Batch(_) => panic!("a batch"),
        }
    }

    #[test]
    fn call_keeps_id_and_raw_params() {
        let Entry::Call(call) =
            single(r#"{"jsonrpc":"2.0","id":"a-1","method":"chain_getBlock","params":["0x01"]}"#)
        else {
            panic!("not a call")
        };
        assert_eq!(call.id.unwrap().get(), r#""a-1""#);
        assert_eq!(call.method, "chain_getBlock");
        assert_eq!(call.params.unwrap().get(), r#"["0x01"]"#);
    }

    #[test]
    fn malformed_calls_are_invalid_with_their_id() {
        for (text, reason) in [
            (r#"{"jsonrpc":"1.0","id":7,"method":"m"}"#, "jsonrpc"),
            (r#"{"jsonrpc":"2.0","id":7,"method":5}"#, "method"),
            (
                r#"{"jsonrpc":"2.0","id":7,"method":"m","params":3}"#,
                "params",
            ),
        ] {
            let Entry::Invalid { id, error } = single(text) else {
                panic!("{text} passed")
            };
            assert_eq!(id.unwrap().get(), "7");
            assert_eq!(error.code, code::INVALID_REQUEST);
            assert!(error.message.contains(reason), "{error:?}");
        }
        assert!(matches!(single("5"), Entry::Invalid { id: None, .. }));
        assert!(matches!(
            single(r#"{"jsonrpc":"2.0","id":{},"method":"m"}"#),
            Entry::Invalid { id: None, .. }
        ));
    }

    #[test]
    fn body_errors() {
        assert_eq!(parse_body(b"{", 10).unwrap_err().code, code::PARSE_ERROR);
        assert_eq!(
            parse_body(b"[]", 10).unwrap_err().code,
            code::INVALID_REQUEST
        );
        let batch = format!("[{}]", ["1"; 11].join(","));
        assert_eq!(
            parse_body(batch.as_bytes(), 10).unwrap_err().code,
            code::BATCH_TOO_BIG
        );
    }
}
