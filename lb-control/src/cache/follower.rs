//! Follows the chain on the nodes and feeds the cache its epochs.
//!
//! One WebSocket per node with `chain_subscribeNewHeads`, `chain_subscribeFinalizedHeads` and
//! `state_subscribeRuntimeVersion`. Every node is followed, not one, so the cache keeps its
//! epochs when any node dies; the cluster's view is the highest head, finality and runtime
//! any node reports (a lagging node's older heads must not age fresh answers).
//!
//! The same subscriptions feed [`NodeFeeds`]: each node's latest new head and finalized head
//! as raw JSON, which the gateway's WebSocket clients share instead of each holding their own
//! subscription at the node.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use jsonrpsee_core::client::{Subscription, SubscriptionClientT};
use jsonrpsee_core::rpc_params;
use jsonrpsee_ws_client::{PingConfig, WsClient, WsClientBuilder};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::header::{Header, HeaderError};
use super::store::{ResponseCache, RuntimeVersion};
use crate::methods::FeedKind;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection that answers no ping for this long is dropped and made again.
const PING_INTERVAL: Duration = Duration::from_secs(10);
const INACTIVE_LIMIT: Duration = Duration::from_secs(30);
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Follows the chain until dropped.
pub struct ChainFollower {
    feeds: NodeFeeds,
    _task: AbortOnDrop,
}

impl ChainFollower {
    /// Every followed node's latest heads.
    pub fn feeds(&self) -> NodeFeeds {
        self.feeds.clone()
    }
}

/// Starts following the nodes whose RPC endpoints `nodes` lists (and will list): the cache
/// learns new heads, finality and runtime upgrades from them. Dropping the result stops it.
pub fn follow(nodes: watch::Receiver<Vec<SocketAddr>>, cache: ResponseCache) -> ChainFollower {
    let feeds = NodeFeeds::default();
    let cluster = Arc::new(Cluster {
        cache,
        feeds: feeds.clone(),
        best: Mutex::new(None),
        runtime: Mutex::new(None),
    });
    ChainFollower {
        feeds,
        _task: AbortOnDrop(tokio::spawn(supervise(nodes, cluster))),
    }
}

/// A node's latest notification of one kind; None until one came.
pub type Feed = watch::Receiver<Option<FeedItem>>;

type FeedSender = watch::Sender<Option<FeedItem>>;

/// A notification on a feed.
#[derive(Debug, Clone)]
pub struct FeedItem {
    /// As the node sent it (raw JSON).
    pub value: Arc<RawValue>,
    /// When the follower received it: what the gateway's delivery delay is counted from.
    pub received: Instant,
}

/// Each followed node's latest best and finalized headers and runtime version. A watch per node
/// and kind: a subscriber that falls behind skips to the latest one instead of queueing old
/// ones.
#[derive(Clone, Default)]
pub struct NodeFeeds {
    nodes: Arc<Mutex<HashMap<(SocketAddr, FeedKind), FeedSender>>>,
    /// Each node's best block number, from its latest new head.
    best: Arc<Mutex<HashMap<SocketAddr, u64>>>,
}

impl NodeFeeds {
    /// `node`'s notifications of `kind`, from the latest one on. The feed ends when the node
    /// stops being followed.
    pub fn watch(&self, node: SocketAddr, kind: FeedKind) -> Feed {
        lock(&self.nodes)
            .entry((node, kind))
            .or_insert_with(|| watch::channel(None).0)
            .subscribe()
    }

    /// `node`'s best block number as it last reported it; None before its first head.
    pub fn best_number(&self, node: SocketAddr) -> Option<u64> {
        lock(&self.best).get(&node).copied()
    }

    fn publish(&self, node: SocketAddr, kind: FeedKind, value: &RawValue) {
        let item = FeedItem {
            value: Arc::from(value.to_owned()),
            received: Instant::now(),
        };
        lock(&self.nodes)
            .entry((node, kind))
            .or_insert_with(|| watch::channel(None).0)
            .send_replace(Some(item));
    }

    /// Ends the feeds of nodes no longer followed.
    fn retain(&self, followed: &HashSet<SocketAddr>) {
        lock(&self.nodes).retain(|(node, _), _| followed.contains(node));
        lock(&self.best).retain(|node, _| followed.contains(node));
    }
}

/// Keeps one follower task per listed node.
async fn supervise(mut nodes: watch::Receiver<Vec<SocketAddr>>, cluster: Arc<Cluster>) {
    // Dropping a task handle (node removed, or this task aborted) stops that node's task.
    let mut followed: HashMap<SocketAddr, AbortOnDrop> = HashMap::new();
    loop {
        let wanted: HashSet<SocketAddr> = nodes.borrow_and_update().iter().copied().collect();
        followed.retain(|node, _| wanted.contains(node));
        cluster.feeds.retain(&wanted);
        for node in wanted {
            followed.entry(node).or_insert_with(|| {
                AbortOnDrop(tokio::spawn(follow_node(node, Arc::clone(&cluster))))
            });
        }
        if nodes.changed().await.is_err() {
            // The list's owner is gone: the list is final, keep following it.
            std::future::pending::<()>().await;
        }
    }
}

/// Follows one node for as long as it is listed, reconnecting with backoff.
async fn follow_node(node: SocketAddr, cluster: Arc<Cluster>) {
    let mut backoff = MIN_BACKOFF;
    let mut failing = false;
    loop {
        let mut heard = false;
        let error = follow_connection(node, &cluster, &mut heard).await;
        // A connection that delivered something was good: retry soon. One that failed at
        // once (node down) is retried ever more slowly, and logged once, not at every retry.
        if heard {
            backoff = MIN_BACKOFF;
            failing = false;
        } else {
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        if failing {
            tracing::debug!(%node, %error, retry_in = ?backoff, "chain follower: node still failing");
        } else {
            tracing::warn!(%node, %error, retry_in = ?backoff, "chain follower lost the node");
        }
        failing = true;
        tokio::time::sleep(backoff).await;
    }
}

#[derive(Debug, thiserror::Error)]
enum FollowError {
    #[error("connecting: {0}")]
    Connect(#[source] jsonrpsee_core::ClientError),
    #[error("subscribing to {method}: {source}")]
    Subscribe {
        method: &'static str,
        #[source]
        source: jsonrpsee_core::ClientError,
    },
    #[error("{0} subscription ended")]
    Ended(&'static str),
    #[error("{method} notification: {source}")]
    BadNotification {
        method: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("{method} header: {source}")]
    BadHeader {
        method: &'static str,
        #[source]
        source: HeaderError,
    },
}

/// A subscription's notifications as the node sent them.
type Notifications = Subscription<Box<RawValue>>;

const NEW_HEADS: &str = "chain_subscribeNewHeads";
const FINALIZED_HEADS: &str = "chain_subscribeFinalizedHeads";
const RUNTIME_VERSION: &str = "state_subscribeRuntimeVersion";

/// One connection's life: subscribes, then feeds the cluster until something fails.
/// Sets `heard` once a notification arrived.
async fn follow_connection(node: SocketAddr, cluster: &Cluster, heard: &mut bool) -> FollowError {
    let client = match WsClientBuilder::default()
        .connection_timeout(CONNECT_TIMEOUT)
        .request_timeout(REQUEST_TIMEOUT)
        .enable_ws_ping(
            PingConfig::new()
                .ping_interval(PING_INTERVAL)
                .inactive_limit(INACTIVE_LIMIT),
        )
        .build(format!("ws://{node}"))
        .await
    {
        Ok(client) => client,
        Err(error) => return FollowError::Connect(error),
    };
    let subscriptions = async {
        Ok::<_, FollowError>((
            subscribe(&client, NEW_HEADS, "chain_unsubscribeNewHeads").await?,
            subscribe(&client, FINALIZED_HEADS, "chain_unsubscribeFinalizedHeads").await?,
            subscribe(&client, RUNTIME_VERSION, "state_unsubscribeRuntimeVersion").await?,
        ))
    };
    let (mut heads, mut finalized, mut runtime): (Notifications, Notifications, Notifications) =
        match subscriptions.await {
            Ok(subscriptions) => subscriptions,
            Err(error) => return error,
        };
    loop {
        let fed = tokio::select! {
            header = heads.next() => notification(NEW_HEADS, header)
                .and_then(|header| cluster.on_head(node, &header)),
            header = finalized.next() => notification(FINALIZED_HEADS, header)
                .and_then(|header| cluster.on_finalized(node, &header)),
            version = runtime.next() => notification(RUNTIME_VERSION, version)
                .and_then(|version| cluster.on_runtime(node, &version)),
        };
        if let Err(error) = fed {
            return error;
        }
        *heard = true;
    }
}

async fn subscribe<T: serde::de::DeserializeOwned>(
    client: &WsClient,
    method: &'static str,
    unsubscribe: &'static str,
) -> Result<Subscription<T>, FollowError> {
    client
        .subscribe(method, rpc_params![], unsubscribe)
        .await
        .map_err(|source| FollowError::Subscribe { method, source })
}

fn notification<T>(
    method: &'static str,
    next: Option<Result<T, serde_json::Error>>,
) -> Result<T, FollowError> {
    match next {
        None => Err(FollowError::Ended(method)),
        Some(Err(source)) => Err(FollowError::BadNotification { method, source }),
        Some(Ok(value)) => Ok(value),
    }
}

/// `state_subscribeRuntimeVersion`'s notification (the fields that change with an upgrade).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RuntimeVersionJson {
    spec_version: u32,
    transaction_version: u32,
}

impl From<RuntimeVersionJson> for RuntimeVersion {
    fn from(json: RuntimeVersionJson) -> Self {
        RuntimeVersion {
            spec_version: json.spec_version,
            transaction_version: json.transaction_version,
        }
    }
}

/// The cluster's view, merged from every node's notifications.
struct Cluster {
    cache: ResponseCache,
    feeds: NodeFeeds,
    /// The highest head seen and the node that sent it.
    best: Mutex<Option<(u64, SocketAddr)>>,
    /// The highest runtime version seen.
    runtime: Mutex<Option<RuntimeVersion>>,
}

impl Cluster {
    /// A head counts when it is higher than any seen, or when the node that sent the best
    /// head replaces it at the same height (a re-org). Heads of lagging nodes are ignored.
    fn on_head(&self, node: SocketAddr, raw: &RawValue) -> Result<(), FollowError> {
        let header = parse_header(NEW_HEADS, raw)?;
        let bad = |source| FollowError::BadHeader {
            method: NEW_HEADS,
            source,
        };
        let number = header.number().map_err(bad)?;
        self.feeds.publish(node, FeedKind::BestHead, raw);
        lock(&self.feeds.best).insert(node, number);
        let mut best = lock(&self.best);
        let counts = match *best {
            None => true,
            Some((best_number, best_node)) => {
                number > best_number || (number == best_number && node == best_node)
            }
        };
        if counts {
            self.cache.new_head(number, &header.hash().map_err(bad)?);
            *best = Some((number, node));
        }
        Ok(())
    }

    fn on_finalized(&self, node: SocketAddr, raw: &RawValue) -> Result<(), FollowError> {
        let header = parse_header(FINALIZED_HEADS, raw)?;
        self.feeds.publish(node, FeedKind::FinalizedHead, raw);
        let number = header.number().map_err(|source| FollowError::BadHeader {
            method: FINALIZED_HEADS,
            source,
        })?;
        // The cache keeps the highest.
        self.cache.set_finalized(number);
        Ok(())
    }

    /// Versions only grow; a node still on the old runtime must not undo an upgrade (but is
    /// what its own clients see).
    fn on_runtime(&self, node: SocketAddr, raw: &RawValue) -> Result<(), FollowError> {
        let version: RuntimeVersionJson =
            serde_json::from_str(raw.get()).map_err(|source| FollowError::BadNotification {
                method: RUNTIME_VERSION,
                source,
            })?;
        self.feeds.publish(node, FeedKind::RuntimeVersion, raw);
        let version = RuntimeVersion::from(version);
        let mut highest = lock(&self.runtime);
        if highest.is_none_or(|known| version > known) {
            self.cache
                .runtime_version(version.spec_version, version.transaction_version);
            *highest = Some(version);
        }
        Ok(())
    }
}

fn parse_header(method: &'static str, raw: &RawValue) -> Result<Header, FollowError> {
    serde_json::from_str(raw.get())
        .map_err(|source| FollowError::BadNotification { method, source })
}

/// The guarded values are plain data, valid even if a holder panicked.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Aborts its task when dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt;
    use serde_json::json;

    use super::*;

    fn cluster() -> Cluster {
        Cluster {
            cache: ResponseCache::new(crate::cache::DEFAULT_MAX_BYTES),
            feeds: NodeFeeds::default(),
            best: Mutex::new(None),
            runtime: Mutex::new(None),
        }
    }

    /// A header of block `number`; `fork` tells apart blocks of one height.
    fn header(number: u64, fork: u8) -> Box<RawValue> {
        let root = format!("0x{}", hex::encode([fork; 32]));
        serde_json::value::to_raw_value(&json!({
            "parentHash": root,
            "number": format!("0x{number:x}"),
            "stateRoot": root,
            "extrinsicsRoot": root,
            "digest": { "logs": [] },
        }))
        .expect("a header")
    }

    fn head_of(cluster: &Cluster) -> (u64, String) {
        let head = cluster.cache.head().expect("a head");
        (head.number, head.hash)
    }

    #[test]
    fn head_is_the_highest_any_node_reports() {
        let [a, b] = ["10.0.0.1:9944", "10.0.0.2:9944"].map(|addr| addr.parse().unwrap());
        let cluster = cluster();
        let hash = |number, fork| {
            parse_header(NEW_HEADS, &header(number, fork))
                .unwrap()
                .hash()
                .unwrap()
        };
        cluster.on_head(a, &header(10, 0)).unwrap();
        assert_eq!(head_of(&cluster), (10, hash(10, 0)));
        // A lagging node, and another node's fork at the same height: ignored.
        cluster.on_head(b, &header(9, 0)).unwrap();
        cluster.on_head(b, &header(10, 1)).unwrap();
        assert_eq!(head_of(&cluster), (10, hash(10, 0)));
        // The node that gave the head re-orgs at the same height: followed.
        cluster.on_head(a, &header(10, 2)).unwrap();
        assert_eq!(head_of(&cluster), (10, hash(10, 2)));
        // Any node going higher: followed.
        cluster.on_head(b, &header(11, 0)).unwrap();
        assert_eq!(head_of(&cluster), (11, hash(11, 0)));
    }

    #[test]
    fn each_node_feeds_its_own_latest_headers() {
        let [a, b] = ["10.0.0.1:9944", "10.0.0.2:9944"].map(|addr| addr.parse().unwrap());
        let cluster = cluster();
        let mut best_a = cluster.feeds.watch(a, FeedKind::BestHead);
        let finalized_b = cluster.feeds.watch(b, FeedKind::FinalizedHead);
        assert!(best_a.borrow().is_none());
        cluster.on_head(a, &header(10, 0)).unwrap();
        // A lagging node's head does not move the cache, but is what its own clients see.
        cluster.on_head(b, &header(9, 0)).unwrap();
        cluster.on_finalized(b, &header(8, 0)).unwrap();
        assert!(best_a.has_changed().unwrap());
        let text = |feed: &Feed| {
            feed.borrow()
                .as_ref()
                .map(|item| item.value.get().to_owned())
        };
        assert_eq!(text(&best_a), Some(header(10, 0).get().to_owned()));
        best_a.mark_unchanged();
        assert_eq!(
            text(&cluster.feeds.watch(b, FeedKind::BestHead)),
            Some(header(9, 0).get().to_owned())
        );
        assert_eq!(text(&finalized_b), Some(header(8, 0).get().to_owned()));
        // A node no longer followed: its feeds end.
        cluster.feeds.retain(&HashSet::from([b]));
        assert!(best_a.changed().now_or_never().unwrap().is_err());
    }

    #[test]
    fn runtime_version_only_moves_up_and_each_node_feeds_its_own() {
        let [a, b] = ["10.0.0.1:9944", "10.0.0.2:9944"].map(|addr| addr.parse().unwrap());
        let cluster = cluster();
        let version = |spec_version| RuntimeVersion {
            spec_version,
            transaction_version: 2,
        };
        let notification = |spec_version: u32| {
            serde_json::value::to_raw_value(&json!({
                "specName": "node",
                "specVersion": spec_version,
                "transactionVersion": 2,
            }))
            .unwrap()
        };
        cluster.on_runtime(a, &notification(269)).unwrap();
        // A node still on the old runtime.
        cluster.on_runtime(b, &notification(268)).unwrap();
        assert_eq!(cluster.cache.runtime(), Some(version(269)));
        let feed_b = cluster.feeds.watch(b, FeedKind::RuntimeVersion);
        assert_eq!(
            feed_b
                .borrow()
                .as_ref()
                .map(|item| item.value.get().to_owned()),
            Some(notification(268).get().to_owned())
        );
        cluster.on_runtime(b, &notification(270)).unwrap();
        assert_eq!(cluster.cache.runtime(), Some(version(270)));
        assert!(cluster.on_runtime(a, &notification(0)).is_ok());
        let garbage = serde_json::value::to_raw_value(&json!({ "specVersion": "x" })).unwrap();
        assert!(cluster.on_runtime(a, &garbage).is_err());
    }
}
