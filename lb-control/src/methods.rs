//! What the gateway knows of each JSON-RPC method, as data: one row per method, with its
//! safety (the gateway's method policy), its cache rule (the response cache), the
//! subscription it opens or ends and what serves it (the WebSocket sessions), and its class,
//! which says whether a failed call may go to a second node (the upstream) and labels its
//! metrics.
//!
//! A method the table does not list is safe, never cached, not a subscription the gateway
//! knows, and may be sent again unless it is an `author_*` method: the node is the judge of
//! what it serves.
//!
//! Names follow polkadot-sdk's `sc-rpc-api` (aliases included, each a row of its own); the
//! unsafe ones are the callers of `check_if_safe` in `sc-rpc` and the RPC crates beside it
//! (`substrate-frame-rpc-system`, `substrate-state-trie-migration-rpc`, `sc-consensus-babe-rpc`),
//! each with the error its family answers. Cache parameter positions and
//! names follow the same traits (e.g. `fn storage(&self, key: StorageKey, hash: Option<Hash>)`),
//! so a call by position (`[key, hash]`) and by name (`{"key": …, "hash": …}`) classify alike.
//!
//! This module imports nothing of the crate: `gateway` and `cache` both read it without
//! depending on each other.

use std::{collections::HashMap, sync::LazyLock};

/// Whether a node serves the method on an externally reachable (`--rpc-methods safe`) port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Safety {
    Safe,
    /// Refused by such a node with this answer, and by the gateway unless its config allows it.
    Unsafe(Refusal),
    /// Refused so only when the call leaves out an optional parameter (position `at`, or
    /// `name` in a by-name call) or gives it as `null`; served otherwise.
    /// `state_subscribeStorage` without keys follows every storage change.
    UnsafeWithout {
        at: usize,
        name: &'static str,
        refusal: Refusal,
    },
}

/// The JSON-RPC error a `--rpc-methods safe` node answers to an unsafe call, as it sends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub code: i32,
    pub message: &'static str,
}

/// `sc_rpc_api::UnsafeRpcError`'s text (polkadot-sdk `substrate/client/rpc-api/src/policy.rs:61`).
const UNSAFE_RPC_MESSAGE: &str = "RPC call is unsafe to be called externally";

/// `UnsafeRpcError` made a JSON-RPC error as it is: jsonrpsee's "method not found" code
/// (`rpc-api/src/policy.rs:67-70`). Each family whose error type passes it through
/// (`Error::UnsafeRpcCalled(e) => e.into()`: author, system, offchain, dev, statement, babe)
/// or that returns it as an `RpcResult` (`system_dryRun`, `state_trieMigrationStatus`,
/// `statement_dump`), and `state_subscribeStorage`'s rejection, answer this.
pub const UNSAFE_RPC: Refusal = Refusal {
    code: -32601,
    message: UNSAFE_RPC_MESSAGE,
};

/// The same error inside `sc_rpc_api::state::Error::UnsafeRpcCalled` (transparent, so the same
/// text), which the state family maps to its catch-all code 4003 (`rpc-api/src/state/error.rs:52,67`):
/// what the `state_*` methods of `sc-rpc` that call `check_if_safe` answer.
pub const UNSAFE_IN_STATE: Refusal = Refusal {
    code: 4003,
    message: UNSAFE_RPC_MESSAGE,
};

/// What a call is, for metrics and for the retry rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MethodClass {
    /// Reads: safe to send again to another node.
    Read,
    /// `author_*`: submissions and pool changes, never sent twice.
    Author,
}

impl MethodClass {
    pub fn name(self) -> &'static str {
        match self {
            MethodClass::Read => "read",
            MethodClass::Author => "author",
        }
    }

    /// May this call be sent to a second node when the first failed?
    pub fn is_retryable(self) -> bool {
        self == MethodClass::Read
    }
}

/// How long an answer not pinned to a block may be reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reuse {
    /// Depends on the chain head: until the next new head.
    UntilNewHead,
    /// Changes only with the runtime: until the runtime version changes.
    UntilRuntimeUpgrade,
}

/// A method's cache rule: how the response cache decides, from a call's params, how long its
/// answer may be reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheRule {
    /// Never cached: writes, subscriptions, per-connection state, nonces, peers, fees.
    Never,
    /// The same answer for every call, for as long as `Reuse` says.
    Always(Reuse),
    /// Takes an optional block hash as parameter `at` (position) or `name` (by-name call):
    /// with a hash the answer is pinned to that block, without one it follows `otherwise`.
    AtBlock {
        at: usize,
        name: &'static str,
        otherwise: Reuse,
    },
    /// `state_call(name, bytes, hash?)`: pinned at a hash; without one, the metadata and
    /// version calls change only with the runtime and the rest with the head.
    RuntimeCall,
    /// `chain_getBlockHash(number?)`: a finalized number's hash never changes; the best
    /// block's (no number) and a number above finalized can.
    BlockHash,
}

/// The head subscriptions the gateway serves itself, from the chain follower's one
/// subscription of each per node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FeedKind {
    /// `chain_subscribeNewHeads`: each new best block's header.
    BestHead,
    /// `chain_subscribeFinalizedHeads`: each newly finalized block's header.
    FinalizedHead,
    /// `state_subscribeRuntimeVersion`: the runtime version, at start and on each upgrade.
    RuntimeVersion,
}

/// A method that opens or ends a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subscription {
    /// Opens one: the node's notifications come as `notification`, and `unsubscribe` ends
    /// it. With a `feed`, the gateway serves it from its node's shared feed of that kind.
    Subscribe {
        feed: Option<FeedKind>,
        unsubscribe: &'static str,
        notification: &'static str,
    },
    /// Ends one (of a shared `feed`, when the gateway serves those).
    Unsubscribe { feed: Option<FeedKind> },
    /// Starts an operation with no notifications that lives on the node's connection until
    /// `stop` ends it (`transaction_v1_broadcast`): held like a subscription.
    Operation { stop: &'static str },
    /// A call on a subscription of the connection, named by the call's first parameter
    /// (`chainHead_v1_*` operations on their `followSubscription`): the node knows that
    /// subscription on the connection that holds it only.
    OnSubscription,
}

/// Everything the gateway knows of one method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Method {
    pub safety: Safety,
    pub class: MethodClass,
    pub cache: CacheRule,
    pub subscription: Option<Subscription>,
}

use CacheRule::{Always, BlockHash, Never, RuntimeCall};
use FeedKind::{BestHead, FinalizedHead, RuntimeVersion};
use MethodClass::{Author, Read};
use Reuse::{UntilNewHead, UntilRuntimeUpgrade};
use Safety::Safe;

/// The table's safety column: refused as a node refuses, with [`UNSAFE_RPC`] …
const UNSAFE: Safety = Safety::Unsafe(UNSAFE_RPC);
/// … or, for the state family, with [`UNSAFE_IN_STATE`] …
const UNSAFE_STATE: Safety = Safety::Unsafe(UNSAFE_IN_STATE);
/// … or only without keys: `sc-rpc`'s `subscribe_storage` checks `keys.is_none()` and rejects
/// the subscription with the bare `UnsafeRpcError` (`state/state_full.rs:431-433`).
const UNSAFE_WITHOUT_KEYS: Safety = Safety::UnsafeWithout {
    at: 0,
    name: "keys",
    refusal: UNSAFE_RPC,
};

const fn row(
    name: &'static str,
    safety: Safety,
    class: MethodClass,
    cache: CacheRule,
    subscription: Option<Subscription>,
) -> (&'static str, Method) {
    (
        name,
        Method {
            safety,
            class,
            cache,
            subscription,
        },
    )
}

const fn at_block(at: usize, name: &'static str, otherwise: Reuse) -> CacheRule {
    CacheRule::AtBlock {
        at,
        name,
        otherwise,
    }
}

const fn subscribe(
    feed: Option<FeedKind>,
    unsubscribe: &'static str,
    notification: &'static str,
) -> Option<Subscription> {
    Some(Subscription::Subscribe {
        feed,
        unsubscribe,
        notification,
    })
}

const fn unsubscribe(feed: Option<FeedKind>) -> Option<Subscription> {
    Some(Subscription::Unsubscribe { feed })
}

const ON_FOLLOW: Option<Subscription> = Some(Subscription::OnSubscription);

/// Every method the gateway knows something of; anything else gets [`UNLISTED`].
#[rustfmt::skip] // One row a line: the table is read as a table.
pub const METHODS: &[(&str, Method)] = &[
    //   name                                  safety               class   cache                                    subscription
    // chain
    row("chain_getBlock",                      Safe,                Read,   at_block(0, "hash", UntilNewHead),       None),
    row("chain_getHeader",                     Safe,                Read,   at_block(0, "hash", UntilNewHead),       None),
    row("chain_getBlockHash",                  Safe,                Read,   BlockHash,                               None),
    row("chain_getHead",                       Safe,                Read,   BlockHash,                               None),
    row("chain_getFinalizedHead",              Safe,                Read,   Always(UntilNewHead),                    None),
    row("chain_getFinalisedHead",              Safe,                Read,   Always(UntilNewHead),                    None),
    row("chain_getRuntimeVersion",             Safe,                Read,   at_block(0, "hash", UntilRuntimeUpgrade), None),
    row("chain_subscribeNewHeads",             Safe,                Read,   Never,  subscribe(Some(BestHead), "chain_unsubscribeNewHeads", "chain_newHead")),
    row("chain_subscribeNewHead",              Safe,                Read,   Never,  subscribe(Some(BestHead), "chain_unsubscribeNewHead", "chain_newHead")),
    row("subscribe_newHead",                   Safe,                Read,   Never,  subscribe(Some(BestHead), "unsubscribe_newHead", "chain_newHead")),
    row("chain_unsubscribeNewHeads",           Safe,                Read,   Never,  unsubscribe(Some(BestHead))),
    row("chain_unsubscribeNewHead",            Safe,                Read,   Never,  unsubscribe(Some(BestHead))),
    row("unsubscribe_newHead",                 Safe,                Read,   Never,  unsubscribe(Some(BestHead))),
    row("chain_subscribeFinalizedHeads",       Safe,                Read,   Never,  subscribe(Some(FinalizedHead), "chain_unsubscribeFinalizedHeads", "chain_finalizedHead")),
    row("chain_subscribeFinalisedHeads",       Safe,                Read,   Never,  subscribe(Some(FinalizedHead), "chain_unsubscribeFinalisedHeads", "chain_finalizedHead")),
    row("chain_unsubscribeFinalizedHeads",     Safe,                Read,   Never,  unsubscribe(Some(FinalizedHead))),
    row("chain_unsubscribeFinalisedHeads",     Safe,                Read,   Never,  unsubscribe(Some(FinalizedHead))),
    row("chain_subscribeAllHeads",             Safe,                Read,   Never,  subscribe(None, "chain_unsubscribeAllHeads", "chain_allHead")),
    row("chain_unsubscribeAllHeads",           Safe,                Read,   Never,  unsubscribe(None)),
    row("chain_subscribeRuntimeVersion",       Safe,                Read,   Never,  subscribe(Some(RuntimeVersion), "chain_unsubscribeRuntimeVersion", "state_runtimeVersion")),
    row("chain_unsubscribeRuntimeVersion",     Safe,                Read,   Never,  unsubscribe(Some(RuntimeVersion))),
    // state
    row("state_call",                          Safe,                Read,   RuntimeCall,                             None),
    row("state_callAt",                        Safe,                Read,   RuntimeCall,                             None),
    row("state_getStorage",                    Safe,                Read,   at_block(1, "hash", UntilNewHead),       None),
    row("state_getStorageAt",                  Safe,                Read,   at_block(1, "hash", UntilNewHead),       None),
    row("state_getStorageHash",                Safe,                Read,   at_block(1, "hash", UntilNewHead),       None),
    row("state_getStorageHashAt",              Safe,                Read,   at_block(1, "hash", UntilNewHead),       None),
    row("state_getStorageSize",                Safe,                Read,   at_block(1, "hash", UntilNewHead),       None),
    row("state_getStorageSizeAt",              Safe,                Read,   at_block(1, "hash", UntilNewHead),       None),
    row("state_getKeys",                       Safe,                Read,   at_block(1, "hash", UntilNewHead),       None),
    // (prefix, count, start_key, hash)
    row("state_getKeysPaged",                  Safe,                Read,   at_block(3, "hash", UntilNewHead),       None),
    row("state_getKeysPagedAt",                Safe,                Read,   at_block(3, "hash", UntilNewHead),       None),
    row("state_getReadProof",                  Safe,                Read,   at_block(1, "hash", UntilNewHead),       None),
    row("state_queryStorageAt",                Safe,                Read,   at_block(1, "at", UntilNewHead),         None),
    row("state_getMetadata",                   Safe,                Read,   at_block(0, "hash", UntilRuntimeUpgrade), None),
    row("state_getRuntimeVersion",             Safe,                Read,   at_block(0, "hash", UntilRuntimeUpgrade), None),
    // (child_storage_key, …, hash)
    row("state_getChildReadProof",             Safe,                Read,   at_block(2, "hash", UntilNewHead),       None),
    row("state_queryStorage",                  UNSAFE_STATE,        Read,   Never,                                   None),
    row("state_getPairs",                      UNSAFE_STATE,        Read,   Never,                                   None),
    row("state_traceBlock",                    UNSAFE_STATE,        Read,   Never,                                   None),
    row("state_trieMigrationStatus",           UNSAFE,              Read,   Never,                                   None),
    row("state_subscribeRuntimeVersion",       Safe,                Read,   Never,  subscribe(Some(RuntimeVersion), "state_unsubscribeRuntimeVersion", "state_runtimeVersion")),
    row("state_unsubscribeRuntimeVersion",     Safe,                Read,   Never,  unsubscribe(Some(RuntimeVersion))),
    row("state_subscribeStorage",              UNSAFE_WITHOUT_KEYS, Read,   Never,  subscribe(None, "state_unsubscribeStorage", "state_storage")),
    row("state_unsubscribeStorage",            Safe,                Read,   Never,  unsubscribe(None)),
    // childstate: (child_storage_key, …, hash)
    row("childstate_getStorage",               Safe,                Read,   at_block(2, "hash", UntilNewHead),       None),
    row("childstate_getStorageHash",           Safe,                Read,   at_block(2, "hash", UntilNewHead),       None),
    row("childstate_getStorageSize",           Safe,                Read,   at_block(2, "hash", UntilNewHead),       None),
    row("childstate_getStorageEntries",        Safe,                Read,   at_block(2, "hash", UntilNewHead),       None),
    row("childstate_getKeys",                  Safe,                Read,   at_block(2, "hash", UntilNewHead),       None),
    row("childstate_getKeysPaged",             Safe,                Read,   at_block(4, "hash", UntilNewHead),       None),
    // system
    row("system_health",                       Safe,                Read,   Always(UntilNewHead),                    None),
    row("system_chain",                        Safe,                Read,   Always(UntilRuntimeUpgrade),             None),
    row("system_chainType",                    Safe,                Read,   Always(UntilRuntimeUpgrade),             None),
    row("system_properties",                   Safe,                Read,   Always(UntilRuntimeUpgrade),             None),
    row("system_name",                         Safe,                Read,   Always(UntilRuntimeUpgrade),             None),
    row("system_version",                      Safe,                Read,   Always(UntilRuntimeUpgrade),             None),
    row("system_addLogFilter",                 UNSAFE,              Read,   Never,                                   None),
    row("system_addReservedPeer",              UNSAFE,              Read,   Never,                                   None),
    row("system_dryRun",                       UNSAFE,              Read,   Never,                                   None),
    row("system_dryRunAt",                     UNSAFE,              Read,   Never,                                   None),
    row("system_peers",                        UNSAFE,              Read,   Never,                                   None),
    row("system_removeReservedPeer",           UNSAFE,              Read,   Never,                                   None),
    row("system_resetLogFilter",               UNSAFE,              Read,   Never,                                   None),
    row("system_unstable_networkState",        UNSAFE,              Read,   Never,                                   None),
    row("rpc_methods",                         Safe,                Read,   Always(UntilRuntimeUpgrade),             None),
    // author
    row("author_hasKey",                       UNSAFE,              Author, Never,                                   None),
    row("author_hasSessionKeys",               UNSAFE,              Author, Never,                                   None),
    row("author_insertKey",                    UNSAFE,              Author, Never,                                   None),
    row("author_removeExtrinsic",              UNSAFE,              Author, Never,                                   None),
    row("author_rotateKeys",                   UNSAFE,              Author, Never,                                   None),
    row("author_rotateKeysWithOwner",          UNSAFE,              Author, Never,                                   None),
    row("author_submitAndWatchExtrinsic",      Safe,                Author, Never,  subscribe(None, "author_unwatchExtrinsic", "author_extrinsicUpdate")),
    row("author_unwatchExtrinsic",             Safe,                Author, Never,  unsubscribe(None)),
    // dev, offchain
    row("dev_getBlockStats",                   UNSAFE,              Read,   Never,                                   None),
    row("offchain_localStorageClear",          UNSAFE,              Read,   Never,                                   None),
    row("offchain_localStorageGet",            UNSAFE,              Read,   Never,                                   None),
    row("offchain_localStorageSet",            UNSAFE,              Read,   Never,                                   None),
    // babe (sc-consensus-babe-rpc), statement store (sc-rpc before 51)
    row("babe_epochAuthorship",                UNSAFE,              Read,   Never,                                   None),
    row("statement_dump",                      UNSAFE,              Read,   Never,                                   None),
    // the new JSON-RPC API (json-rpc-interface-spec)
    row("chainHead_v1_follow",                 Safe,                Read,   Never,  subscribe(None, "chainHead_v1_unfollow", "chainHead_v1_followEvent")),
    row("chainHead_v1_unfollow",               Safe,                Read,   Never,  unsubscribe(None)),
    row("chainHead_v1_header",                 Safe,                Read,   Never,  ON_FOLLOW),
    row("chainHead_v1_body",                   Safe,                Read,   Never,  ON_FOLLOW),
    row("chainHead_v1_storage",                Safe,                Read,   Never,  ON_FOLLOW),
    row("chainHead_v1_call",                   Safe,                Read,   Never,  ON_FOLLOW),
    row("chainHead_v1_unpin",                  Safe,                Read,   Never,  ON_FOLLOW),
    row("chainHead_v1_continue",               Safe,                Read,   Never,  ON_FOLLOW),
    row("chainHead_v1_stopOperation",          Safe,                Read,   Never,  ON_FOLLOW),
    row("transaction_v1_broadcast",            Safe,                Author, Never,  Some(Subscription::Operation { stop: "transaction_v1_stop" })),
    row("transaction_v1_stop",                 Safe,                Author, Never,  unsubscribe(None)),
    row("transactionWatch_v1_submitAndWatch",  Safe,                Read,   Never,  subscribe(None, "transactionWatch_v1_unwatch", "transactionWatch_v1_watchEvent")),
    row("transactionWatch_v1_unwatch",         Safe,                Read,   Never,  unsubscribe(None)),
    // finality gadgets
    row("grandpa_subscribeJustifications",     Safe,                Read,   Never,  subscribe(None, "grandpa_unsubscribeJustifications", "grandpa_justifications")),
    row("grandpa_unsubscribeJustifications",   Safe,                Read,   Never,  unsubscribe(None)),
    row("beefy_subscribeJustifications",       Safe,                Read,   Never,  subscribe(None, "beefy_unsubscribeJustifications", "beefy_justifications")),
    row("beefy_unsubscribeJustifications",     Safe,                Read,   Never,  unsubscribe(None)),
];

/// Whether `result`, a notification of `method`, is the last of its subscription: the node
/// ends the subscription after it (a chainHead_v1 `stop`, a transaction's final status), and
/// the client will not unsubscribe.
pub fn is_last_notification(method: &str, result: &str) -> bool {
    /// A new-spec event: `{"event": "…", …}`.
    #[derive(serde::Deserialize)]
    struct Event<'a> {
        #[serde(borrow)]
        event: &'a str,
    }
    let event = || {
        serde_json::from_str::<Event>(result)
            .ok()
            .map(|event| event.event)
    };
    match method {
        "chainHead_v1_followEvent" => event() == Some("stop"),
        "transactionWatch_v1_watchEvent" => {
            matches!(event(), Some("finalized" | "error" | "invalid" | "dropped"))
        }
        // Substrate's `TransactionStatus` (sc-transaction-pool-api): a string for the unit
        // variants, an object named by the variant otherwise.
        "author_extrinsicUpdate" => {
            let status = match serde_json::from_str::<serde_json::Value>(result) {
                Ok(serde_json::Value::String(status)) => status,
                Ok(serde_json::Value::Object(object)) => {
                    object.keys().next().cloned().unwrap_or_default()
                }
                _ => return false,
            };
            matches!(
                status.as_str(),
                "finalized" | "finalityTimeout" | "usurped" | "dropped" | "invalid"
            )
        }
        _ => false,
    }
}

/// What a method the table does not list gets.
pub const UNLISTED: Method = Method {
    safety: Safe,
    class: Read,
    cache: Never,
    subscription: None,
};

/// [`UNLISTED`] for an `author_*` method: never sent twice.
const UNLISTED_AUTHOR: Method = Method {
    class: Author,
    ..UNLISTED
};

/// The table by name, built on first use: a lookup is one hash, not a scan of the table.
static INDEX: LazyLock<HashMap<&'static str, &'static Method>> = LazyLock::new(|| {
    METHODS
        .iter()
        .map(|(name, method)| (*name, method))
        .collect()
});

/// What the gateway knows of `name`: its row, else what an unlisted method gets.
pub fn lookup(name: &str) -> &'static Method {
    match INDEX.get(name) {
        Some(method) => method,
        None if name.starts_with("author_") => &UNLISTED_AUTHOR,
        None => &UNLISTED,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_table_method_is_listed_once() {
        let mut names: Vec<&str> = METHODS.iter().map(|(name, _)| *name).collect();
        names.sort_unstable();
        let count = names.len();
        names.dedup();
        assert_eq!(names.len(), count, "a method has two rules");
    }

    #[test]
    fn unlisted_methods_are_safe_uncached_and_retried_unless_author() {
        assert_eq!(*lookup("some_newMethod"), UNLISTED);
        assert_eq!(lookup("author_submitExtrinsic").class, MethodClass::Author);
        assert_eq!(lookup("author_submitExtrinsic").cache, CacheRule::Never);
        assert_eq!(lookup("chain_getHeader").class, MethodClass::Read);
        assert_eq!(
            lookup("author_rotateKeys").safety,
            Safety::Unsafe(UNSAFE_RPC)
        );
    }

    #[test]
    fn author_methods_are_never_sent_twice() {
        for (name, method) in METHODS {
            if name.starts_with("author_") {
                assert_eq!(method.class, MethodClass::Author, "{name}");
            }
        }
    }

    #[test]
    fn final_notifications_end_their_subscription() {
        assert!(is_last_notification(
            "chainHead_v1_followEvent",
            r#"{"event":"stop"}"#
        ));
        assert!(!is_last_notification(
            "chainHead_v1_followEvent",
            r#"{"event":"newBlock","blockHash":"0x00"}"#
        ));
        assert!(is_last_notification(
            "transactionWatch_v1_watchEvent",
            r#"{"event":"finalized","block":{"hash":"0x00","index":0}}"#
        ));
        assert!(is_last_notification(
            "author_extrinsicUpdate",
            r#"{"finalized":"0x00"}"#
        ));
        assert!(is_last_notification(
            "author_extrinsicUpdate",
            r#""dropped""#
        ));
        assert!(!is_last_notification(
            "author_extrinsicUpdate",
            r#"{"inBlock":"0x00"}"#
        ));
        assert!(!is_last_notification(
            "chain_newHead",
            r#"{"event":"stop"}"#
        ));
    }

    #[test]
    fn every_subscription_is_ended_by_a_listed_unsubscribe_of_the_same_feed() {
        for (name, method) in METHODS {
            let (feed, unsubscribe) = match method.subscription {
                Some(Subscription::Subscribe {
                    feed, unsubscribe, ..
                }) => (feed, unsubscribe),
                Some(Subscription::Operation { stop }) => (None, stop),
                _ => continue,
            };
            assert_eq!(
                lookup(unsubscribe).subscription,
                Some(Subscription::Unsubscribe { feed }),
                "{name} is ended by {unsubscribe}"
            );
        }
    }
}
