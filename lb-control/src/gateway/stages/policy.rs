//! Policy, per call: which methods never reach a node, and what a client is told.
//!
//! The base is the node's own unsafe list (the methods the method table marks
//! [`Safety::Unsafe`], and [`Safety::UnsafeWithout`] when the call leaves the parameter out),
//! refused with the code and message the table records for each, so a client sees what a node
//! started with `--rpc-methods safe` would answer. The config adds `deny` entries (refused with
//! the gateway's own error) and can `allow` methods back (an operator whose nodes expose an
//! unsafe method on purpose). Unknown methods pass: the node is the judge of what it serves.

use serde_json::value::RawValue;

use crate::{
    gateway::jsonrpc::{Call, RpcError},
    methods::{self, Method, Safety},
};

/// A pattern of the config's lists: an exact name, or a prefix ending in `*` (`offchain_*`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pattern(String);

impl Pattern {
    fn matches(&self, method: &str) -> bool {
        match self.0.strip_suffix('*') {
            Some(prefix) => method.starts_with(prefix),
            None => self.0 == method,
        }
    }
}

/// The policy in force.
#[derive(Debug, Clone)]
pub struct MethodPolicy {
    deny: Vec<Pattern>,
    allow: Vec<Pattern>,
}

impl MethodPolicy {
    /// The node's unsafe list, plus `deny`, minus `allow` (allow wins).
    pub fn new(deny: &[String], allow: &[String]) -> MethodPolicy {
        MethodPolicy {
            deny: deny.iter().cloned().map(Pattern).collect(),
            allow: allow.iter().cloned().map(Pattern).collect(),
        }
    }

    /// None when a call of `method` with `params` may go to a node; else the error the client
    /// gets.
    pub fn refusal(&self, method: &str, params: Option<&RawValue>) -> Option<RpcError> {
        self.refusal_by_name(method, params, methods::lookup(method))
    }

    /// [`MethodPolicy::refusal`] of a call whose method was already looked up in the method
    /// table.
    pub fn refusal_of(&self, call: &Call, method: &Method) -> Option<RpcError> {
        self.refusal_by_name(&call.method, call.params.as_deref(), method)
    }

    fn refusal_by_name(
        &self,
        name: &str,
        params: Option<&RawValue>,
        method: &Method,
    ) -> Option<RpcError> {
        if self.allow.iter().any(|pattern| pattern.matches(name)) {
            return None;
        }
        match method.safety {
            Safety::Safe => {}
            Safety::Unsafe(refusal) => return Some(RpcError::node_refusal(refusal)),
            Safety::UnsafeWithout { at, name, refusal } => {
                if lacks_param(params, at, name) {
                    return Some(RpcError::node_refusal(refusal));
                }
            }
        }
        self.deny
            .iter()
            .any(|pattern| pattern.matches(name))
            .then(|| RpcError::not_served(name))
    }
}

/// Does a call leave out its optional parameter at position `at` (or `name`, by name), as the
/// node reads an `Option` parameter: absent or `null`. Params that are not an array or an
/// object (the parse stage lets none through) count as present: the node rejects them itself.
fn lacks_param(params: Option<&RawValue>, at: usize, name: &str) -> bool {
    let Some(params) = params else {
        return true;
    };
    match serde_json::from_str::<serde_json::Value>(params.get()) {
        Ok(serde_json::Value::Array(items)) => items.get(at).is_none_or(serde_json::Value::is_null),
        Ok(serde_json::Value::Object(members)) => {
            members.get(name).is_none_or(serde_json::Value::is_null)
        }
        _ => false,
    }
}

/// Checks the config's lists: a pattern is a method name, optionally ending in `*`.
pub fn validate_pattern(pattern: &str) -> Result<(), String> {
    let name = pattern.strip_suffix('*').unwrap_or(pattern);
    let valid = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "\"{pattern}\" is not a method name or a prefix ending in '*' (e.g. \"offchain_*\")"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|item| (*item).to_owned()).collect()
    }

    /// A refusal of `method` called without params.
    fn refusal(policy: &MethodPolicy, method: &str) -> Option<RpcError> {
        policy.refusal(method, None)
    }

    fn params(text: &str) -> Box<RawValue> {
        RawValue::from_string(text.to_owned()).unwrap()
    }

    #[test]
    fn node_unsafe_methods_get_the_node_error_and_unknown_methods_pass() {
        let policy = MethodPolicy::new(&[], &[]);
        let error = refusal(&policy, "author_rotateKeys").expect("refused");
        assert_eq!(error.code, -32601);
        assert_eq!(error.message, "RPC call is unsafe to be called externally");
        let error = refusal(&policy, "state_getPairs").expect("refused");
        assert_eq!(error.code, 4003);
        assert_eq!(error.message, "RPC call is unsafe to be called externally");
        assert_eq!(refusal(&policy, "chain_getHeader"), None);
        assert_eq!(refusal(&policy, "some_newMethod"), None);
    }

    #[test]
    fn storage_subscription_is_refused_only_without_keys() {
        let policy = MethodPolicy::new(&[], &[]);
        for without_keys in [
            None,
            Some("[]"),
            Some("[null]"),
            Some("{}"),
            Some(r#"{"keys":null}"#),
        ] {
            let params = without_keys.map(params);
            let error = policy
                .refusal("state_subscribeStorage", params.as_deref())
                .unwrap_or_else(|| panic!("{without_keys:?} is refused"));
            assert_eq!(error.code, -32601, "{without_keys:?}");
        }
        for with_keys in [r#"[["0x26aa"]]"#, "[[]]", r#"{"keys":["0x26aa"]}"#] {
            let params = params(with_keys);
            assert_eq!(
                policy.refusal("state_subscribeStorage", Some(&params)),
                None,
                "{with_keys}"
            );
        }
    }

    #[test]
    fn deny_adds_and_allow_wins() {
        let policy = MethodPolicy::new(
            &strings(&["state_getKeys", "debug_*"]),
            &strings(&["author_hasKey", "debug_ok"]),
        );
        assert_eq!(
            refusal(&policy, "state_getKeys").map(|error| error.code),
            Some(-32601)
        );
        assert!(refusal(&policy, "debug_trace").is_some());
        assert_eq!(refusal(&policy, "debug_ok"), None);
        assert_eq!(refusal(&policy, "author_hasKey"), None);
        assert!(refusal(&policy, "author_insertKey").is_some());
    }

    #[test]
    fn patterns_are_checked() {
        assert!(validate_pattern("offchain_*").is_ok());
        assert!(validate_pattern("*").is_err());
        assert!(validate_pattern("a b").is_err());
    }
}
