//! The gateway's Substrate-aware response cache and the chain follower that ages it.
//!
//! - [`policy`]: how long an answer may be reused, from its method's cache rule in the method
//!   table ([`crate::methods`]).
//! - `key`: the cache key (method, canonical params, epoch).
//! - [`store`]: the cache itself, bounded by bytes, coalescing identical in-flight requests.
//! - [`follower`]: follows heads, finality and the runtime version on every node and feeds
//!   them to the cache, which starts a new epoch when the head or the runtime changes.
//!
//! Answers that depend on the head or the runtime carry their epoch in the key, so a new
//! epoch makes them unreachable at once (no scan, no race with a fetch in flight across the
//! change). They also have a maximum age (12 s for the head, 10 min for the runtime by
//! default), which frees a past epoch's entries and bounds staleness should the follower lose
//! every node.
//!
//! Use from the gateway, per call:
//! `cache.get_or_fetch(method, params, classify(method, params, cache.finalized()), fetch)`,
//! with `fetch` making the upstream call.

pub mod follower;
mod header;
mod key;
pub mod policy;
pub mod store;

pub use follower::{ChainFollower, Feed, FeedItem, NodeFeeds, follow};
pub use policy::{CachePolicy, classify, classify_by_rule};
pub use store::{
    CacheSettings, CacheStats, DEFAULT_MAX_BYTES, FetchError, Head, Lookup, Outcome, ResponseCache,
    RuntimeVersion,
};
