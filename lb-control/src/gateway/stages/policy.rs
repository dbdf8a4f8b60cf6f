//! Policy, per call: which methods never reach a node, and what a client is told.
//!
//! The base is the node's own unsafe list (the methods the method table marks
//! [`Safety::Unsafe`]), refused with the node's own error, so a client sees what a node
//! started with `--rpc-methods safe` would answer. The config adds `deny` entries and can
//! `allow` methods back (an operator whose nodes expose an unsafe method on purpose). Unknown
//! methods pass: the node is the judge of what it serves.

use crate::{
    gateway::jsonrpc::RpcError,
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

    /// None when `method` may go to a node; else the error the client gets.
    pub fn refusal(&self, method: &str) -> Option<RpcError> {
        self.refusal_of(method, methods::lookup(method))
    }

    /// [`MethodPolicy::refusal`] of a method already looked up in the method table.
    pub fn refusal_of(&self, name: &str, method: &Method) -> Option<RpcError> {
        if self.allow.iter().any(|pattern| pattern.matches(name)) {
            return None;
        }
        if method.safety == Safety::Unsafe {
            return Some(RpcError::node_unsafe());
        }
        self.deny
            .iter()
            .any(|pattern| pattern.matches(name))
            .then(|| RpcError::not_served(name))
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

    #[test]
    fn node_unsafe_methods_get_the_node_error_and_unknown_methods_pass() {
        let policy = MethodPolicy::new(&[], &[]);
        let error = policy.refusal("author_rotateKeys").expect("refused");
        assert_eq!(error.code, -32601);
        assert_eq!(error.message, "RPC call is unsafe to be called externally");
        assert_eq!(policy.refusal("chain_getHeader"), None);
        assert_eq!(policy.refusal("some_newMethod"), None);
    }

    #[test]
    fn deny_adds_and_allow_wins() {
        let policy = MethodPolicy::new(
            &strings(&["state_getKeys", "debug_*"]),
            &strings(&["author_hasKey", "debug_ok"]),
        );
        assert!(policy.refusal("state_getKeys").is_some());
        assert!(policy.refusal("debug_trace").is_some());
        assert_eq!(policy.refusal("debug_ok"), None);
        assert_eq!(policy.refusal("author_hasKey"), None);
        assert!(policy.refusal("author_insertKey").is_some());
    }

    #[test]
    fn patterns_are_checked() {
        assert!(validate_pattern("offchain_*").is_ok());
        assert!(validate_pattern("*").is_err());
        assert!(validate_pattern("a b").is_err());
    }
}
