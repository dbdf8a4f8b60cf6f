//! The response cache: answers by key in a moka cache bounded by bytes, identical in-flight
//! requests coalesced into one upstream call, and the chain's epochs that age answers.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use moka::Expiry;
use moka::future::Cache;
use serde_json::Value;
use serde_json::value::RawValue;

use super::key::{Epoch, Key};
use super::policy::CachePolicy;

/// The gateway's default budget.
pub const DEFAULT_MAX_BYTES: u64 = 256 * 1024 * 1024;

/// Memory an entry takes beyond its key and answer text (moka's bookkeeping, allocations),
/// counted so the budget bounds memory: measured ~490 bytes of RSS per entry of 93 bytes of
/// text with moka 0.12 (500k entries, release build).
const ENTRY_OVERHEAD: usize = 400;

/// Limits of a [`ResponseCache`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheSettings {
    /// Bytes of keys, answers and per-entry overhead held at most.
    pub max_bytes: u64,
    /// Longest a head-dependent answer is kept even without a new head: bounds how stale it
    /// can get when the follower has lost every node (default two Polkadot slots).
    pub head_max_age: Duration,
    /// Likewise for answers that change with the runtime, in case an upgrade happened while
    /// the follower was away; long enough that a start-up flood of clients shares one
    /// metadata fetch.
    pub runtime_max_age: Duration,
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings {
            max_bytes: DEFAULT_MAX_BYTES,
            head_max_age: Duration::from_secs(12),
            runtime_max_age: Duration::from_secs(600),
        }
    }
}

/// What a call came to, independent of the client's id: a node's result or error, or one of
/// the gateway's errors (the gateway's framing, `gateway::jsonrpc`, makes those and the
/// answer). A node's result is what the cache stores.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// The `result` member.
    Result(Box<RawValue>),
    /// The JSON-RPC `error` object.
    Error(Box<RawValue>),
}

impl Outcome {
    pub fn is_error(&self) -> bool {
        matches!(self, Outcome::Error(_))
    }
}

/// Why [`ResponseCache::get_or_fetch`] has no result for the client.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    #[error("upstream unreachable: {0}")]
    Unreachable(String),
    #[error("upstream timed out: {0}")]
    Timeout(String),
    /// The node had as many calls in flight as the gateway gives it, for as long as a call
    /// waits: nothing is wrong, the client should try again shortly.
    #[error("node {node} has {in_flight} calls in flight")]
    Busy { node: SocketAddr, in_flight: u32 },
    /// The node answered with a JSON-RPC error object: pass it on to the client as it is.
    #[error("node answered with error {0}")]
    Rpc(Arc<RawValue>),
}

/// Where an answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// From the cache, no upstream call.
    Hit,
    /// This caller's fetch ran.
    Miss,
    /// Another caller's fetch of the same request, in flight when this one came, answered it.
    Coalesced,
}

/// Counters since the cache was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub coalesced: u64,
}

/// The chain's head as the cache knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub number: u64,
    pub hash: String,
}

/// A runtime's version, the pair that changes with an upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct RuntimeVersion {
    pub spec_version: u32,
    pub transaction_version: u32,
}

/// The Substrate-aware response cache. Cheap to clone: all clones share one cache.
#[derive(Clone)]
pub struct ResponseCache {
    inner: Arc<Inner>,
}

struct Inner {
    answers: Cache<Key, Arc<RawValue>>,
    head: Mutex<Option<Head>>,
    head_epoch: AtomicU64,
    runtime: Mutex<Option<RuntimeVersion>>,
    runtime_epoch: AtomicU64,
    /// Highest finalized block number + 1; 0 while none is known.
    finalized_plus_one: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    coalesced: AtomicU64,
}

impl ResponseCache {
    /// A cache holding at most `max_bytes`, with the default maximum ages.
    pub fn new(max_bytes: u64) -> Self {
        Self::with_settings(CacheSettings {
            max_bytes,
            ..CacheSettings::default()
        })
    }

    pub fn with_settings(settings: CacheSettings) -> Self {
        let answers = Cache::builder()
            .max_capacity(settings.max_bytes)
            .weigher(|key: &Key, answer: &Arc<RawValue>| {
                let bytes = key.request.len() + answer.get().len() + ENTRY_OVERHEAD;
                u32::try_from(bytes).unwrap_or(u32::MAX)
            })
            .expire_after(MaxAge {
                head: settings.head_max_age,
                runtime: settings.runtime_max_age,
            })
            .build();
        ResponseCache {
            inner: Arc::new(Inner {
                answers,
                head: Mutex::new(None),
                head_epoch: AtomicU64::new(0),
                runtime: Mutex::new(None),
                runtime_epoch: AtomicU64::new(0),
                finalized_plus_one: AtomicU64::new(0),
                hits: AtomicU64::new(0),
                misses: AtomicU64::new(0),
                coalesced: AtomicU64::new(0),
            }),
        }
    }

    /// Answers from the cache, or runs `fetch` once for all identical concurrent callers.
    /// Errors and null results reach every coalesced caller but are not kept. The key is the
    /// method, the canonical params and, for [`CachePolicy::UntilNewHead`] and
    /// [`CachePolicy::UntilRuntimeUpgrade`], the current epoch; the client's `id` is not part
    /// of it (answers are shared between clients; the gateway puts each client's own `id` on).
    pub async fn get_or_fetch<F, Fut>(
        &self,
        method: &str,
        params: &Value,
        policy: CachePolicy,
        fetch: F,
    ) -> Result<(Arc<RawValue>, Lookup), FetchError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Outcome, FetchError>>,
    {
        let epoch = match policy {
            CachePolicy::Never => {
                self.count(&self.inner.misses);
                return fetch().await.and_then(result_of).map(|r| (r, Lookup::Miss));
            }
            CachePolicy::Pinned => Epoch::Pinned,
            CachePolicy::UntilNewHead => Epoch::Head(self.inner.head_epoch.load(Ordering::Acquire)),
            CachePolicy::UntilRuntimeUpgrade => {
                Epoch::Runtime(self.inner.runtime_epoch.load(Ordering::Acquire))
            }
        };
        let key = Key::new(method, params, epoch);
        if let Some(answer) = self.inner.answers.get(&key).await {
            self.count(&self.inner.hits);
            return Ok((answer, Lookup::Hit));
        }
        // try_get_with runs at most one init per key at a time; the others wait for its
        // outcome. Whether ours ran tells a miss from a coalesced wait.
        let fetched = AtomicBool::new(false);
        let answer = self
            .inner
            .answers
            .try_get_with(key, async {
                fetched.store(true, Ordering::Relaxed);
                let result = fetch().await.and_then(result_of)?;
                if result.get().trim() == "null" {
                    // Not kept: a block or key the node does not have yet may exist soon.
                    Err(NotKept::Null(result))
                } else {
                    Ok(result)
                }
            })
            .await;
        let lookup = if fetched.load(Ordering::Relaxed) {
            self.count(&self.inner.misses);
            Lookup::Miss
        } else {
            self.count(&self.inner.coalesced);
            Lookup::Coalesced
        };
        match answer {
            Ok(result) => Ok((result, lookup)),
            Err(not_kept) => match &*not_kept {
                NotKept::Null(result) => Ok((result.clone(), lookup)),
                NotKept::Failed(error) => Err(error.clone()),
            },
        }
    }

    /// Records the chain's head; a head other than the current one starts a new head epoch.
    pub fn new_head(&self, number: u64, hash: &str) {
        let mut head = lock(&self.inner.head);
        if head.as_ref().is_some_and(|head| head.hash == hash) {
            return;
        }
        *head = Some(Head {
            number,
            hash: hash.to_owned(),
        });
        self.inner.head_epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// Records the runtime's version; a change starts a new runtime epoch.
    pub fn runtime_version(&self, spec_version: u32, transaction_version: u32) {
        let version = RuntimeVersion {
            spec_version,
            transaction_version,
        };
        let mut runtime = lock(&self.inner.runtime);
        if *runtime == Some(version) {
            return;
        }
        // The first version learned starts no new epoch: a gateway starting up keeps the
        // metadata it fetched meanwhile (an upgrade in that window is bounded by
        // `runtime_max_age`).
        if runtime.replace(version).is_some() {
            self.inner.runtime_epoch.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// The highest finalized block number known.
    pub fn finalized(&self) -> Option<u64> {
        self.inner
            .finalized_plus_one
            .load(Ordering::Acquire)
            .checked_sub(1)
    }

    /// Records a finalized block; finality only moves forward, so a lower number is ignored.
    pub fn set_finalized(&self, number: u64) {
        self.inner
            .finalized_plus_one
            .fetch_max(number.saturating_add(1), Ordering::AcqRel);
    }

    /// The head recorded last.
    pub fn head(&self) -> Option<Head> {
        lock(&self.inner.head).clone()
    }

    /// The number of the head recorded last.
    pub fn head_number(&self) -> Option<u64> {
        lock(&self.inner.head).as_ref().map(|head| head.number)
    }

    /// The runtime version recorded last.
    pub fn runtime(&self) -> Option<RuntimeVersion> {
        *lock(&self.inner.runtime)
    }

    /// Bytes of keys and answers held (after moka's pending housekeeping).
    pub fn weighted_size(&self) -> u64 {
        self.inner.answers.weighted_size()
    }

    pub fn entry_count(&self) -> u64 {
        self.inner.answers.entry_count()
    }

    /// Runs moka's pending housekeeping (evictions, expirations) now, so the sizes above are
    /// current; moka otherwise does it on later calls.
    pub async fn run_pending_tasks(&self) {
        self.inner.answers.run_pending_tasks().await;
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.inner.hits.load(Ordering::Relaxed),
            misses: self.inner.misses.load(Ordering::Relaxed),
            coalesced: self.inner.coalesced.load(Ordering::Relaxed),
        }
    }

    fn count(&self, counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Expires epoch-bound answers after a maximum age; pinned ones only leave by eviction.
///
/// This is also what frees a past epoch's answers, which no lookup reaches any more. Dropping
/// them at each new head instead (`invalidate_entries_if`) would scan the whole cache, pinned
/// entries included, every block.
struct MaxAge {
    head: Duration,
    runtime: Duration,
}

impl Expiry<Key, Arc<RawValue>> for MaxAge {
    fn expire_after_create(&self, key: &Key, _: &Arc<RawValue>, _: Instant) -> Option<Duration> {
        match key.epoch {
            Epoch::Pinned => None,
            Epoch::Head(_) => Some(self.head),
            Epoch::Runtime(_) => Some(self.runtime),
        }
    }
}

/// An answer that reaches the callers but is not kept.
enum NotKept {
    Null(Arc<RawValue>),
    Failed(FetchError),
}

impl From<FetchError> for NotKept {
    fn from(error: FetchError) -> Self {
        NotKept::Failed(error)
    }
}

fn result_of(answer: Outcome) -> Result<Arc<RawValue>, FetchError> {
    match answer {
        Outcome::Result(result) => Ok(Arc::from(result)),
        Outcome::Error(error) => Err(FetchError::Rpc(Arc::from(error))),
    }
}

/// The guarded values are plain data, valid even if a holder panicked.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn raw(json: &str) -> Box<RawValue> {
        RawValue::from_string(json.to_owned()).unwrap()
    }

    /// A fetch that counts its calls and answers `answer`.
    fn counted(
        calls: &AtomicU64,
        answer: Outcome,
    ) -> impl FnOnce() -> std::future::Ready<Result<Outcome, FetchError>> + '_ {
        move || {
            calls.fetch_add(1, Ordering::SeqCst);
            std::future::ready(Ok(answer))
        }
    }

    async fn get(
        cache: &ResponseCache,
        method: &str,
        params: &Value,
        policy: CachePolicy,
        calls: &AtomicU64,
        answer: &str,
    ) -> (String, Lookup) {
        let (result, lookup) = cache
            .get_or_fetch(
                method,
                params,
                policy,
                counted(calls, Outcome::Result(raw(answer))),
            )
            .await
            .expect("an answer");
        (result.get().to_owned(), lookup)
    }

    #[tokio::test]
    async fn pinned_answer_is_reused_across_heads() {
        let cache = ResponseCache::new(DEFAULT_MAX_BYTES);
        let calls = AtomicU64::new(0);
        let params = json!(["0xabcd"]);
        let first = get(
            &cache,
            "chain_getHeader",
            &params,
            CachePolicy::Pinned,
            &calls,
            r#"{"n":1}"#,
        )
        .await;
        assert_eq!(first, (r#"{"n":1}"#.to_owned(), Lookup::Miss));
        cache.new_head(2, "0x02");
        let second = get(
            &cache,
            "chain_getHeader",
            &params,
            CachePolicy::Pinned,
            &calls,
            r#"{"n":2}"#,
        )
        .await;
        assert_eq!(second, (r#"{"n":1}"#.to_owned(), Lookup::Hit));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(
            cache.stats(),
            CacheStats {
                hits: 1,
                misses: 1,
                coalesced: 0
            }
        );
    }

    #[tokio::test]
    async fn the_same_params_in_another_key_order_hit() {
        let cache = ResponseCache::new(DEFAULT_MAX_BYTES);
        let calls = AtomicU64::new(0);
        let a: Value = serde_json::from_str(r#"{"key":"0x00","hash":"0x01"}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"hash":"0x01","key":"0x00"}"#).unwrap();
        get(
            &cache,
            "state_getStorage",
            &a,
            CachePolicy::Pinned,
            &calls,
            "\"0x05\"",
        )
        .await;
        let (_, lookup) = get(
            &cache,
            "state_getStorage",
            &b,
            CachePolicy::Pinned,
            &calls,
            "\"0x06\"",
        )
        .await;
        assert_eq!(lookup, Lookup::Hit);
    }

    #[tokio::test]
    async fn head_answer_is_reused_until_a_new_head() {
        let cache = ResponseCache::new(DEFAULT_MAX_BYTES);
        let calls = AtomicU64::new(0);
        let params = json!([]);
        let policy = CachePolicy::UntilNewHead;
        cache.new_head(1, "0x01");
        assert_eq!(
            get(&cache, "system_health", &params, policy, &calls, "1")
                .await
                .1,
            Lookup::Miss
        );
        assert_eq!(
            get(&cache, "system_health", &params, policy, &calls, "2").await,
            ("1".to_owned(), Lookup::Hit)
        );
        // The same head again (another node reporting it) changes nothing.
        cache.new_head(1, "0x01");
        assert_eq!(
            get(&cache, "system_health", &params, policy, &calls, "2").await,
            ("1".to_owned(), Lookup::Hit)
        );
        cache.new_head(2, "0x02");
        assert_eq!(
            get(&cache, "system_health", &params, policy, &calls, "2").await,
            ("2".to_owned(), Lookup::Miss)
        );
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(
            cache.head(),
            Some(Head {
                number: 2,
                hash: "0x02".to_owned()
            })
        );
    }

    #[tokio::test]
    async fn runtime_answer_is_reused_until_the_runtime_changes() {
        let cache = ResponseCache::new(DEFAULT_MAX_BYTES);
        let calls = AtomicU64::new(0);
        let params = json!([]);
        let policy = CachePolicy::UntilRuntimeUpgrade;
        assert_eq!(
            get(
                &cache,
                "state_getMetadata",
                &params,
                policy,
                &calls,
                "\"0xv1\""
            )
            .await
            .1,
            Lookup::Miss
        );
        // Learning the first version keeps what was fetched before it.
        cache.runtime_version(268, 2);
        cache.new_head(5, "0x05");
        cache.runtime_version(268, 2);
        assert_eq!(
            get(
                &cache,
                "state_getMetadata",
                &params,
                policy,
                &calls,
                "\"0xv2\""
            )
            .await,
            ("\"0xv1\"".to_owned(), Lookup::Hit)
        );
        cache.runtime_version(269, 2);
        assert_eq!(
            get(
                &cache,
                "state_getMetadata",
                &params,
                policy,
                &calls,
                "\"0xv2\""
            )
            .await,
            ("\"0xv2\"".to_owned(), Lookup::Miss)
        );
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(
            cache.runtime(),
            Some(RuntimeVersion {
                spec_version: 269,
                transaction_version: 2
            })
        );
    }

    #[tokio::test]
    async fn errors_and_nulls_are_returned_but_not_cached() {
        let cache = ResponseCache::new(DEFAULT_MAX_BYTES);
        let calls = AtomicU64::new(0);
        let params = json!(["0xabcd"]);
        for _ in 0..2 {
            let error = cache
                .get_or_fetch(
                    "chain_getBlock",
                    &params,
                    CachePolicy::Pinned,
                    counted(
                        &calls,
                        Outcome::Error(raw(r#"{"code":4003,"message":"unknown block"}"#)),
                    ),
                )
                .await
                .expect_err("the node's error");
            let FetchError::Rpc(object) = error else {
                panic!("not the node's error: {error}")
            };
            assert_eq!(object.get(), r#"{"code":4003,"message":"unknown block"}"#);
        }
        for _ in 0..2 {
            let (result, lookup) = get(
                &cache,
                "chain_getBlockHash",
                &json!([99]),
                CachePolicy::Pinned,
                &calls,
                "null",
            )
            .await;
            assert_eq!((result.as_str(), lookup), ("null", Lookup::Miss));
        }
        for _ in 0..2 {
            let error = cache
                .get_or_fetch("chain_getHeader", &params, CachePolicy::Pinned, || async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Err(FetchError::Timeout(
                        "node 10.0.0.1:9944 after 2s".to_owned(),
                    ))
                })
                .await
                .expect_err("the timeout");
            assert!(matches!(error, FetchError::Timeout(_)));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 6);
        cache.run_pending_tasks().await;
        assert_eq!(cache.entry_count(), 0);
    }

    #[tokio::test]
    async fn never_policy_always_fetches() {
        let cache = ResponseCache::new(DEFAULT_MAX_BYTES);
        let calls = AtomicU64::new(0);
        for _ in 0..3 {
            let (_, lookup) = get(
                &cache,
                "system_accountNextIndex",
                &json!(["5G"]),
                CachePolicy::Never,
                &calls,
                "7",
            )
            .await;
            assert_eq!(lookup, Lookup::Miss);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    /// `callers` identical calls of `method` at once, whose fetch takes 200 ms and gives
    /// `answer`: how many fetches were made, and what each caller got.
    async fn call_at_once(
        cache: &ResponseCache,
        callers: usize,
        method: &'static str,
        policy: CachePolicy,
        answer: fn() -> Result<Outcome, FetchError>,
    ) -> (u64, Vec<Result<(Arc<RawValue>, Lookup), FetchError>>) {
        let calls = Arc::new(AtomicU64::new(0));
        let callers: Vec<_> = (0..callers)
            .map(|_| {
                let cache = cache.clone();
                let calls = Arc::clone(&calls);
                tokio::spawn(async move {
                    cache
                        .get_or_fetch(method, &json!([]), policy, || async move {
                            calls.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            answer()
                        })
                        .await
                })
            })
            .collect();
        let mut outcomes = Vec::new();
        for caller in callers {
            outcomes.push(caller.await.unwrap());
        }
        (calls.load(Ordering::SeqCst), outcomes)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_identical_requests_share_one_fetch() {
        let cache = ResponseCache::new(DEFAULT_MAX_BYTES);
        let (calls, outcomes) = call_at_once(
            &cache,
            100,
            "state_getMetadata",
            CachePolicy::UntilRuntimeUpgrade,
            || Ok(Outcome::Result(raw("\"0xmeta\""))),
        )
        .await;
        let mut lookups = Vec::new();
        for outcome in outcomes {
            let (result, lookup) = outcome.expect("an answer");
            assert_eq!(result.get(), "\"0xmeta\"");
            lookups.push(lookup);
        }
        assert_eq!(calls, 1);
        let count = |kind| lookups.iter().filter(|lookup| **lookup == kind).count();
        assert_eq!((count(Lookup::Miss), count(Lookup::Coalesced)), (1, 99));
        assert_eq!(
            cache.stats(),
            CacheStats {
                hits: 0,
                misses: 1,
                coalesced: 99
            }
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn coalesced_callers_share_an_error_which_is_not_cached() {
        let cache = ResponseCache::new(DEFAULT_MAX_BYTES);
        let (calls, outcomes) = call_at_once(
            &cache,
            10,
            "chain_getHeader",
            CachePolicy::UntilNewHead,
            || {
                Err(FetchError::Unreachable(
                    "node 10.0.0.1:9944: connection refused".to_owned(),
                ))
            },
        )
        .await;
        for outcome in outcomes {
            assert!(matches!(outcome, Err(FetchError::Unreachable(_))));
        }
        assert_eq!(calls, 1);
        let (_, lookup) = cache
            .get_or_fetch(
                "chain_getHeader",
                &json!([]),
                CachePolicy::UntilNewHead,
                || async { Ok(Outcome::Result(raw("{}"))) },
            )
            .await
            .unwrap();
        assert_eq!(lookup, Lookup::Miss);
    }

    #[tokio::test]
    async fn a_flood_of_distinct_requests_stays_within_the_budget() {
        const BUDGET: u64 = 1024 * 1024;
        let cache = ResponseCache::new(BUDGET);
        let answer = format!("\"0x{}\"", "ab".repeat(2048));
        for n in 0..2_000u32 {
            cache
                .get_or_fetch(
                    "chain_getBlock",
                    &json!([format!("0x{n:064x}")]),
                    CachePolicy::Pinned,
                    || async { Ok(Outcome::Result(raw(&answer))) },
                )
                .await
                .unwrap();
        }
        cache.run_pending_tasks().await;
        // About 8 MiB were offered.
        assert!(
            cache.weighted_size() <= BUDGET,
            "{} bytes held",
            cache.weighted_size()
        );
        assert!(
            cache.weighted_size() > BUDGET / 2,
            "the budget is used: {} bytes",
            cache.weighted_size()
        );
        assert!(cache.entry_count() < 2_000);
    }

    #[tokio::test]
    async fn head_answer_expires_without_a_new_head_after_its_max_age() {
        let cache = ResponseCache::with_settings(CacheSettings {
            head_max_age: Duration::from_millis(100),
            ..CacheSettings::default()
        });
        let calls = AtomicU64::new(0);
        let params = json!([]);
        cache.new_head(1, "0x01");
        let policy = CachePolicy::UntilNewHead;
        get(&cache, "chain_getHeader", &params, policy, &calls, "{}").await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while get(&cache, "chain_getHeader", &params, policy, &calls, "{}")
            .await
            .1
            == Lookup::Hit
        {
            assert!(Instant::now() < deadline, "the answer never expired");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        // Pinned answers have no maximum age.
        get(
            &cache,
            "chain_getHeader",
            &json!(["0x01"]),
            CachePolicy::Pinned,
            &calls,
            "{}",
        )
        .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (_, lookup) = get(
            &cache,
            "chain_getHeader",
            &json!(["0x01"]),
            CachePolicy::Pinned,
            &calls,
            "{}",
        )
        .await;
        assert_eq!(lookup, Lookup::Hit);
    }
}
