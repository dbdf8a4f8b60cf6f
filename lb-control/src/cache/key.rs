//! The cache key: method, canonical parameters and the epoch the answer belongs to.
//!
//! Two requests that mean the same thing must share one key whatever their spelling: object
//! keys are sorted, whitespace dropped, and an absent `params` equals `[]` (subxt omits it,
//! polkadot.js sends `[]`). The client's `id` is not part of the request text given here.

use std::fmt::Write as _;

use serde_json::Value;

/// Which generation of the chain an answer belongs to. A new head (or runtime) starts a new
/// epoch, so answers of the old one are no longer found, with no scan of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Epoch {
    Pinned,
    Head(u64),
    Runtime(u64),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct Key {
    pub(super) epoch: Epoch,
    /// `method` + canonical params, e.g. `state_getStorage["0x3a636f6465"]`.
    pub(super) request: Box<str>,
}

impl Key {
    pub(super) fn new(method: &str, params: &Value, epoch: Epoch) -> Self {
        let mut request = String::with_capacity(method.len() + 64);
        request.push_str(method);
        match params {
            Value::Null => request.push_str("[]"),
            params => write_canonical(params, &mut request),
        }
        Key {
            epoch,
            request: request.into_boxed_str(),
        }
    }
}

/// Writes `value` as compact JSON with every object's keys in sorted order (independent of
/// whether serde_json preserves insertion order in this build).
fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Array(items) => {
            out.push('[');
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by_key(|(key, _)| *key);
            out.push('{');
            for (index, (key, item)) in entries.into_iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                write_canonical(&Value::String(key.clone()), out);
                out.push(':');
                write_canonical(item, out);
            }
            out.push('}');
        }
        // Scalars: serde_json's own compact form (strings escaped).
        scalar => {
            let _ = write!(out, "{scalar}");
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn object_key_order_does_not_change_the_key() {
        let a: Value = serde_json::from_str(
            r#"{"key":"0x00","hash":"0x01","x":{"b":1,"a":[2,{"d":3,"c":4}]}}"#,
        )
        .unwrap();
        let b: Value = serde_json::from_str(
            r#"{ "x": {"a": [2, {"c": 4, "d": 3}], "b": 1}, "hash": "0x01", "key": "0x00" }"#,
        )
        .unwrap();
        assert_eq!(
            Key::new("state_getStorage", &a, Epoch::Pinned),
            Key::new("state_getStorage", &b, Epoch::Pinned)
        );
        assert_eq!(
            &*Key::new("m", &a, Epoch::Pinned).request,
            r#"m{"hash":"0x01","key":"0x00","x":{"a":[2,{"c":4,"d":3}],"b":1}}"#
        );
    }

    #[test]
    fn absent_params_equal_an_empty_list() {
        assert_eq!(
            Key::new("chain_getHeader", &Value::Null, Epoch::Head(1)),
            Key::new("chain_getHeader", &json!([]), Epoch::Head(1))
        );
    }

    #[test]
    fn method_params_and_epoch_each_tell_keys_apart() {
        let key = Key::new("chain_getHeader", &json!([]), Epoch::Head(1));
        assert_ne!(key, Key::new("chain_getBlock", &json!([]), Epoch::Head(1)));
        assert_ne!(
            key,
            Key::new("chain_getHeader", &json!(["0x01"]), Epoch::Head(1))
        );
        assert_ne!(key, Key::new("chain_getHeader", &json!([]), Epoch::Head(2)));
        assert_ne!(
            key,
            Key::new("chain_getHeader", &json!([]), Epoch::Runtime(1))
        );
    }

    #[test]
    fn strings_are_escaped() {
        let key = Key::new("m", &json!(["a\"b", "c\\"]), Epoch::Pinned);
        assert_eq!(&*key.request, r#"m["a\"b","c\\"]"#);
    }
}
