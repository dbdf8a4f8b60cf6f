//! How long a JSON-RPC answer may be reused, decided per call from its method's cache rule in
//! the method table ([`crate::methods`]) and the call's params.
//!
//! Only the methods whose answers are safe to reuse have a rule; everything else (`author_*`,
//! subscriptions, `chainHead_v1_*`, `transaction*`, nonces, peers, fees, unknown methods) is
//! [`CachePolicy::Never`]. A call by position (`[key, hash]`) and by name
//! (`{"key": …, "hash": …}`) classify alike.

use serde_json::Value;

use crate::methods::{self, CacheRule, Reuse};

/// How long an answer may be reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CachePolicy {
    /// Fixed by an explicit block hash (or a finalized block number): kept until evicted.
    Pinned,
    /// Depends on the chain head: valid until the next new head.
    UntilNewHead,
    /// Changes only with the runtime (metadata, runtime version, `rpc_methods`): valid until
    /// the runtime version changes.
    UntilRuntimeUpgrade,
    /// Never cached.
    Never,
}

use CachePolicy::{Pinned, UntilNewHead, UntilRuntimeUpgrade};

impl From<Reuse> for CachePolicy {
    fn from(reuse: Reuse) -> CachePolicy {
        match reuse {
            Reuse::UntilNewHead => UntilNewHead,
            Reuse::UntilRuntimeUpgrade => UntilRuntimeUpgrade,
        }
    }
}

/// Runtime calls whose answer changes only with the runtime (`state_call` without a hash).
const RUNTIME_CONSTANT_CALLS: &[&str] = &["Core_version"];
const RUNTIME_CONSTANT_CALL_PREFIXES: &[&str] = &["Metadata_"];

/// Classifies one JSON-RPC call. `finalized` is the highest finalized block number known:
/// `chain_getBlockHash(n)` with n ≤ finalized (or n = 0, the genesis, always final) is
/// [`CachePolicy::Pinned`]; above it, or with nothing known, [`CachePolicy::UntilNewHead`].
pub fn classify(method: &str, params: &Value, finalized: Option<u64>) -> CachePolicy {
    classify_by_rule(methods::lookup(method).cache, params, finalized)
}

/// [`classify`] for a call whose method was looked up already.
pub fn classify_by_rule(rule: CacheRule, params: &Value, finalized: Option<u64>) -> CachePolicy {
    match rule {
        CacheRule::Never => CachePolicy::Never,
        CacheRule::Always(reuse) => reuse.into(),
        CacheRule::AtBlock {
            at,
            name,
            otherwise,
        } => at_hash(params, at, name).unwrap_or(otherwise.into()),
        CacheRule::RuntimeCall => at_hash(params, 2, "hash").unwrap_or_else(|| {
            match param(params, 0, "name").and_then(Value::as_str) {
                Some(call) if is_runtime_constant_call(call) => UntilRuntimeUpgrade,
                _ => UntilNewHead,
            }
        }),
        CacheRule::BlockHash => match param(params, 0, "hash") {
            None => UntilNewHead,
            Some(Value::Array(numbers)) => numbers
                .iter()
                .map(|number| block_number_policy(number, finalized))
                .max_by_key(|policy| policy_rank(*policy))
                .unwrap_or(Pinned),
            Some(number) => block_number_policy(number, finalized),
        },
    }
}

/// `Some(Pinned)` when the call names a block hash; `Some(Never)` when the parameter is not
/// a hash at all (the node rejects the call, nothing worth keeping); `None` when absent.
fn at_hash(params: &Value, at: usize, name: &str) -> Option<CachePolicy> {
    param(params, at, name).map(|hash| match hash {
        Value::String(_) => Pinned,
        _ => CachePolicy::Never,
    })
}

fn is_runtime_constant_call(call: &str) -> bool {
    RUNTIME_CONSTANT_CALLS.contains(&call)
        || RUNTIME_CONSTANT_CALL_PREFIXES
            .iter()
            .any(|prefix| call.starts_with(prefix))
}

/// One `chain_getBlockHash` argument: a number, a `0x` hex string, or null (the best block).
fn block_number_policy(number: &Value, finalized: Option<u64>) -> CachePolicy {
    let number = match number {
        Value::Null => return UntilNewHead,
        Value::Number(number) => number.as_u64(),
        Value::String(hex) => hex
            .strip_prefix("0x")
            .and_then(|digits| u64::from_str_radix(digits, 16).ok()),
        _ => None,
    };
    match number {
        // Not a block number: the node answers with an error, which is never cached anyway.
        None => CachePolicy::Never,
        Some(0) => Pinned,
        Some(n) if finalized.is_some_and(|finalized| n <= finalized) => Pinned,
        Some(_) => UntilNewHead,
    }
}

/// Orders policies from longest-lived to never, so a list is only as cacheable as its least
/// cacheable entry.
fn policy_rank(policy: CachePolicy) -> u8 {
    match policy {
        Pinned => 0,
        UntilRuntimeUpgrade => 1,
        UntilNewHead => 2,
        CachePolicy::Never => 3,
    }
}

/// Parameter `index` of a positional call or `name` of a by-name call; a JSON null counts as
/// absent, as it does for the node's `Option` parameters.
fn param<'a>(params: &'a Value, index: usize, name: &str) -> Option<&'a Value> {
    match params {
        Value::Array(list) => list.get(index),
        Value::Object(map) => map.get(name),
        _ => None,
    }
    .filter(|value| !value.is_null())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use CachePolicy::Never;

    const HASH: &str = "0x9c1f6fd3e2b0d1f8c4a3e1b5d7c9a0b2e4f6a8c0e2d4f6a8b0c2e4f6a8b0c2d4";

    /// `(method, params, finalized, expected)`: the specification of the policy.
    #[rustfmt::skip] // One row a line: the table is read as a table.
    fn rows() -> Vec<(&'static str, Value, Option<u64>, CachePolicy)> {
        vec![
            // Pinned by an explicit hash, head-dependent without one.
            ("chain_getBlock", json!([HASH]), None, Pinned),
            ("chain_getBlock", json!([]), None, UntilNewHead),
            ("chain_getBlock", Value::Null, None, UntilNewHead),
            ("chain_getHeader", json!([HASH]), None, Pinned),
            ("chain_getHeader", json!([null]), None, UntilNewHead),
            ("chain_getHeader", json!({ "hash": HASH }), None, Pinned),
            ("state_getStorage", json!(["0x3a636f6465", HASH]), None, Pinned),
            ("state_getStorage", json!(["0x3a636f6465"]), None, UntilNewHead),
            ("state_getStorageAt", json!(["0x3a636f6465", HASH]), None, Pinned),
            ("state_getStorage", json!({ "key": "0x00", "hash": HASH }), None, Pinned),
            ("state_getStorageHash", json!(["0x00", HASH]), None, Pinned),
            ("state_getStorageSize", json!(["0x00", HASH]), None, Pinned),
            ("state_getKeysPaged", json!(["0x00", 10, null, HASH]), None, Pinned),
            ("state_getKeysPaged", json!(["0x00", 10, "0x01"]), None, UntilNewHead),
            ("state_getReadProof", json!([["0x00"], HASH]), None, Pinned),
            ("state_queryStorageAt", json!([["0x00"], HASH]), None, Pinned),
            ("state_queryStorageAt", json!([["0x00"]]), None, UntilNewHead),
            ("state_queryStorageAt", json!({ "keys": ["0x00"], "at": HASH }), None, Pinned),
            ("childstate_getKeysPaged", json!(["0x01", "0x", 5, null, HASH]), None, Pinned),
            ("state_getMetadata", json!([HASH]), None, Pinned),
            ("state_getRuntimeVersion", json!([HASH]), None, Pinned),
            // A hash parameter that is not a string: the node refuses the call.
            ("chain_getHeader", json!([42]), None, Never),
            // state_call: pinned at a hash; runtime constants until an upgrade; the rest per head.
            ("state_call", json!(["AccountNonceApi_account_nonce", "0x00", HASH]), None, Pinned),
            ("state_call", json!(["Metadata_metadata_at_version", "0x0f000000", HASH]), None, Pinned),
            ("state_call", json!(["Metadata_metadata_at_version", "0x0f000000"]), None, UntilRuntimeUpgrade),
            ("state_call", json!(["Metadata_metadata_versions", "0x"]), None, UntilRuntimeUpgrade),
            ("state_call", json!(["Core_version", "0x"]), None, UntilRuntimeUpgrade),
            ("state_call", json!(["AccountNonceApi_account_nonce", "0x00"]), None, UntilNewHead),
            ("state_call", json!({ "name": "Core_version", "bytes": "0x" }), None, UntilRuntimeUpgrade),
            // Head-dependent.
            ("chain_getFinalizedHead", json!([]), None, UntilNewHead),
            ("chain_getFinalisedHead", json!([]), None, UntilNewHead),
            ("system_health", json!([]), None, UntilNewHead),
            // Until a runtime upgrade.
            ("state_getMetadata", json!([]), None, UntilRuntimeUpgrade),
            ("state_getRuntimeVersion", json!([]), None, UntilRuntimeUpgrade),
            ("chain_getRuntimeVersion", Value::Null, None, UntilRuntimeUpgrade),
            ("rpc_methods", json!([]), None, UntilRuntimeUpgrade),
            ("system_chain", json!([]), None, UntilRuntimeUpgrade),
            ("system_properties", json!([]), None, UntilRuntimeUpgrade),
            ("system_name", json!([]), None, UntilRuntimeUpgrade),
            ("system_version", json!([]), None, UntilRuntimeUpgrade),
            // chain_getBlockHash: the best block moves, finalized ones and the genesis do not.
            ("chain_getBlockHash", json!([]), Some(100), UntilNewHead),
            ("chain_getHead", json!([]), Some(100), UntilNewHead),
            ("chain_getBlockHash", json!([null]), Some(100), UntilNewHead),
            ("chain_getBlockHash", json!([0]), None, Pinned),
            ("chain_getBlockHash", json!(["0x0"]), None, Pinned),
            ("chain_getBlockHash", json!([100]), Some(100), Pinned),
            ("chain_getBlockHash", json!([101]), Some(100), UntilNewHead),
            ("chain_getBlockHash", json!([50]), None, UntilNewHead),
            ("chain_getBlockHash", json!(["0x64"]), Some(100), Pinned),
            ("chain_getBlockHash", json!(["0x65"]), Some(100), UntilNewHead),
            ("chain_getBlockHash", json!({ "hash": 7 }), Some(100), Pinned),
            ("chain_getBlockHash", json!([[0, 7, "0x10"]]), Some(100), Pinned),
            ("chain_getBlockHash", json!([[0, 101]]), Some(100), UntilNewHead),
            ("chain_getBlockHash", json!([[0, null]]), Some(100), UntilNewHead),
            ("chain_getBlockHash", json!(["latest"]), Some(100), Never),
            ("chain_getBlockHash", json!([-1]), Some(100), Never),
            // Never: writes, subscriptions, per-connection state, nonces, peers, fees, unknown.
            ("author_submitExtrinsic", json!(["0x00"]), None, Never),
            ("author_submitAndWatchExtrinsic", json!(["0x00"]), None, Never),
            ("author_pendingExtrinsics", json!([]), None, Never),
            ("chain_subscribeNewHeads", json!([]), None, Never),
            ("chain_unsubscribeNewHeads", json!(["abc"]), None, Never),
            ("state_subscribeRuntimeVersion", json!([]), None, Never),
            ("state_subscribeStorage", json!([["0x00"]]), None, Never),
            ("chainHead_v1_follow", json!([true]), None, Never),
            ("transaction_v1_broadcast", json!(["0x00"]), None, Never),
            ("transactionWatch_v1_submitAndWatch", json!(["0x00"]), None, Never),
            ("system_accountNextIndex", json!(["5Grw"]), None, Never),
            ("account_nextIndex", json!(["5Grw"]), None, Never),
            ("system_peers", json!([]), None, Never),
            ("system_networkState", json!([]), None, Never),
            ("payment_queryInfo", json!(["0x00", HASH]), None, Never),
            ("no_such_method", json!([HASH]), None, Never),
        ]
    }

    #[test]
    fn classification_follows_the_table() {
        for (method, params, finalized, expected) in rows() {
            assert_eq!(
                classify(method, &params, finalized),
                expected,
                "{method}({params}) with finalized {finalized:?}"
            );
        }
    }
}
