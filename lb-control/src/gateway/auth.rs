//! API keys: where a client puts its key, checking it against the store behind a short-lived
//! cache, each key's rate limit (GCRA), and last-used times written to the store in batches.
//!
//! Verdicts are cached for [`VERDICT_TTL`]: a flood of requests costs one store lookup per key
//! per second, and a key revoked through the admin API stops working within that time.
//! Unknown secrets are cached too, so guessing does not hammer the store either. A verdict in
//! use is looked up again in the background once it is [`VERDICT_REFRESH`] old, so a busy key's
//! requests never wait for the store: when every request waited at expiry, the store's
//! once-a-second write (last-used times, fsync) stalled all of them at once, and each sent its
//! own lookup (seen as tens of ms of p99 and a blocking thread per open connection).

use std::{
    collections::HashMap,
    num::NonZeroU32,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use governor::{
    Quota, RateLimiter,
    clock::{Clock, DefaultClock},
    state::{InMemoryState, NotKeyed},
};
use hyper::{HeaderMap, Uri, header::AUTHORIZATION};
use thiserror::Error;
use tracing::warn;

use crate::{
    keys::{self, ApiKeys, KeyError},
    model::{ApiKeyId, ApiKeyRecord, RateLimit},
    store::Store,
};

/// How long a key's verdict is trusted before the store is asked again.
pub const VERDICT_TTL: Duration = Duration::from_secs(1);
/// Age at which a verdict still in use is looked up again, in the background.
const VERDICT_REFRESH: Duration = Duration::from_millis(500);
/// Beyond this many cached verdicts the cache starts over (a flood of random secrets).
const MAX_CACHED_VERDICTS: usize = 100_000;
/// How often last-used times go to the store.
pub const TOUCH_INTERVAL: Duration = Duration::from_secs(1);

/// Why a request was not let in.
#[derive(Debug, Error)]
pub enum AuthError {
    #[error(
        "no API key: put it in the path (/<key>), ?apikey=, X-Api-Key or Authorization: Bearer"
    )]
    Missing,
    #[error("unknown or revoked API key")]
    Unknown,
    #[error("checking the API key: {0}")]
    Store(#[source] KeyError),
}

impl AuthError {
    /// The `reason` label of the auth-failure metric.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Unknown => "unknown",
            AuthError::Store(_) => "store",
        }
    }
}

/// The key of a request: the path's first segment (`/<key>`), `?apikey=`, `X-Api-Key`, or
/// `Authorization: Bearer`, in that order.
pub fn find_key<'a>(uri: &'a Uri, headers: &'a HeaderMap) -> Option<&'a str> {
    let in_path = uri
        .path()
        .trim_start_matches('/')
        .split('/')
        .next()
        .filter(|segment| !segment.is_empty());
    let in_query = || {
        uri.query()?
            .split('&')
            .find_map(|pair| pair.strip_prefix("apikey="))
            .filter(|key| !key.is_empty())
    };
    let in_header = || {
        headers
            .get("x-api-key")?
            .to_str()
            .ok()
            .filter(|key| !key.is_empty())
    };
    let in_bearer = || {
        let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
        let (scheme, token) = value.split_once(' ')?;
        scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim())
            .filter(|token| !token.is_empty())
    };
    in_path
        .or_else(in_query)
        .or_else(in_header)
        .or_else(in_bearer)
}

type DirectLimiter = RateLimiter<NotKeyed, InMemoryState, DefaultClock>;

struct Verdict {
    at: Instant,
    key: Option<ApiKeyRecord>,
    /// A background lookup of this secret is under way.
    refreshing: bool,
}

/// A request over its key's rate.
#[derive(Debug)]
pub struct RateLimited {
    pub retry_after: Duration,
}

impl RateLimited {
    /// Whole seconds to wait, at least one (`Retry-After` takes whole seconds).
    pub fn retry_after_secs(&self) -> u64 {
        self.retry_after.as_secs_f64().ceil().max(1.0) as u64
    }
}

pub struct Authenticator {
    keys: ApiKeys,
    store: Store,
    verdicts: Arc<Mutex<HashMap<[u8; 32], Verdict>>>,
    limiters: Mutex<HashMap<ApiKeyId, (RateLimit, Arc<DirectLimiter>)>>,
    used: Mutex<HashMap<ApiKeyId, SystemTime>>,
}

impl Authenticator {
    pub fn new(keys: ApiKeys, store: Store) -> Authenticator {
        Authenticator {
            keys,
            store,
            verdicts: Arc::default(),
            limiters: Mutex::default(),
            used: Mutex::default(),
        }
    }

    /// The live key `secret` belongs to.
    pub async fn authenticate(&self, secret: &str) -> Result<ApiKeyRecord, AuthError> {
        let digest = keys::digest(secret);
        let (cached, refresh) = {
            let mut verdicts = lock(&self.verdicts);
            match verdicts
                .get_mut(&digest)
                .filter(|verdict| verdict.at.elapsed() < VERDICT_TTL)
            {
                Some(verdict) => {
                    let refresh = !verdict.refreshing && verdict.at.elapsed() >= VERDICT_REFRESH;
                    verdict.refreshing |= refresh;
                    (Some(verdict.key.clone()), refresh)
                }
                None => (None, false),
            }
        };
        if refresh {
            let (keys, verdicts, secret) =
                (self.keys.clone(), self.verdicts.clone(), secret.to_owned());
            tokio::spawn(async move {
                let looked_up = tokio::task::spawn_blocking(move || keys.verify(&secret)).await;
                // On failure the verdict expires as usual, and the next request looks the key up
                // itself (and reports the store's error).
                match looked_up {
                    Ok(Ok(key)) => record_verdict(&verdicts, digest, key),
                    Ok(Err(error)) => warn!("checking an API key again: {error}"),
                    Err(error) => warn!("checking an API key again: {error}"),
                }
            });
        }
        let key = match cached {
            Some(key) => key,
            None => {
                let keys = self.keys.clone();
                let secret = secret.to_owned();
                let key = tokio::task::spawn_blocking(move || keys.verify(&secret))
                    .await
                    .expect("the key lookup does not panic")
                    .map_err(AuthError::Store)?;
                record_verdict(&self.verdicts, digest, key.clone());
                key
            }
        };
        let key = key.ok_or(AuthError::Unknown)?;
        lock(&self.used).insert(key.id, SystemTime::now());
        Ok(key)
    }

    /// Takes `calls` requests from the key's allowance (a batch counts each call).
    pub fn admit(&self, key: &ApiKeyRecord, calls: u32) -> Result<(), RateLimited> {
        let Some(limit) = key.rate_limit else {
            return Ok(());
        };
        let limiter = {
            let mut limiters = lock(&self.limiters);
            let entry = limiters
                .entry(key.id)
                .or_insert_with(|| (limit, Arc::new(limiter(limit))));
            // A changed limit starts a fresh allowance.
            if entry.0 != limit {
                *entry = (limit, Arc::new(limiter(limit)));
            }
            entry.1.clone()
        };
        let calls = NonZeroU32::new(calls).unwrap_or(NonZeroU32::MIN);
        match limiter.check_n(calls) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(RateLimited {
                retry_after: not_until.wait_time_from(DefaultClock::default().now()),
            }),
            // A batch larger than the burst can never pass: wait a full period and retry smaller.
            Err(_) => Err(RateLimited {
                retry_after: Duration::from_secs(1),
            }),
        }
    }

    /// Writes the last-used times gathered since the last call.
    pub async fn flush_usage(&self) {
        let used: Vec<(ApiKeyId, SystemTime)> = lock(&self.used).drain().collect();
        if used.is_empty() {
            return;
        }
        let store = self.store.clone();
        let written = tokio::task::spawn_blocking(move || store.touch_api_keys(&used)).await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(error)) => warn!("recording API key use: {error}"),
            Err(error) => warn!("recording API key use: {error}"),
        }
    }
}

/// Caches `key` as the verdict on the secret with this digest, from now.
fn record_verdict(
    verdicts: &Mutex<HashMap<[u8; 32], Verdict>>,
    digest: [u8; 32],
    key: Option<ApiKeyRecord>,
) {
    let mut verdicts = lock(verdicts);
    if verdicts.len() >= MAX_CACHED_VERDICTS {
        verdicts.clear();
    }
    verdicts.insert(
        digest,
        Verdict {
            at: Instant::now(),
            key,
            refreshing: false,
        },
    );
}

/// GCRA at `rps` per second; `burst` calls at once (at least one).
fn limiter(limit: RateLimit) -> DirectLimiter {
    let rps = NonZeroU32::new(limit.rps).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(limit.burst).unwrap_or(NonZeroU32::MIN);
    RateLimiter::direct(Quota::per_second(rps).allow_burst(burst))
}

/// The maps here hold no invariant a panicking holder could break.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(uri: &str, headers: &[(&str, &str)]) -> Option<String> {
        let uri: Uri = uri.parse().unwrap();
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.insert(
                hyper::header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        find_key(&uri, &map).map(str::to_owned)
    }

    #[tokio::test]
    async fn verdict_in_use_is_refreshed_before_it_expires() {
        let dir = std::env::temp_dir().join(format!("lb-auth-{}-refresh", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let store = Store::open(&dir.join("state.db")).unwrap();
        let keys = ApiKeys::new(store.clone());
        let created = keys.create("refresh", None).unwrap();
        let auth = Authenticator::new(keys.clone(), store);
        let first = Instant::now();
        auth.authenticate(&created.secret).await.unwrap();
        keys.revoke(created.record.id).unwrap();
        tokio::time::sleep(VERDICT_REFRESH).await;
        // The verdict is still fresh enough to answer, and a lookup starts behind it.
        auth.authenticate(&created.secret).await.unwrap();
        // That lookup lands before the verdict would have expired: the revocation shows early.
        while auth.authenticate(&created.secret).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(first.elapsed() < VERDICT_TTL, "{:?}", first.elapsed());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn key_is_found_in_each_position() {
        assert_eq!(key("/k1", &[]).as_deref(), Some("k1"));
        assert_eq!(key("/?x=1&apikey=k2", &[]).as_deref(), Some("k2"));
        assert_eq!(key("/", &[("x-api-key", "k3")]).as_deref(), Some("k3"));
        assert_eq!(
            key("/", &[("authorization", "Bearer k4")]).as_deref(),
            Some("k4")
        );
        assert_eq!(key("/", &[("authorization", "Basic abc")]), None);
        assert_eq!(key("/?apikey=", &[]), None);
    }
}
