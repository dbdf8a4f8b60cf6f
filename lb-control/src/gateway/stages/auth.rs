//! Key check: where a client puts its API key, checking it against the store behind a
//! short-lived cache, and last-used times written to the store in batches. A request's key is
//! checked once ([`Authenticator::check`]); an open WebSocket session's key is checked again
//! on every message ([`Authenticator::recheck`]), so a revoked key stops working there too.
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
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use hyper::{HeaderMap, Uri, header::AUTHORIZATION};
use thiserror::Error;
use tracing::warn;

use crate::{
    keys::{self, ApiKeys, KeyError},
    model::{ApiKeyId, ApiKeyRecord},
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

struct Verdict {
    at: Instant,
    key: Option<ApiKeyRecord>,
    /// A background lookup of this secret is under way.
    refreshing: bool,
}

pub struct Authenticator {
    keys: ApiKeys,
    store: Store,
    verdicts: Arc<Mutex<HashMap<[u8; 32], Verdict>>>,
    used: Mutex<HashMap<ApiKeyId, SystemTime>>,
}

impl Authenticator {
    pub fn new(keys: ApiKeys, store: Store) -> Authenticator {
        Authenticator {
            keys,
            store,
            verdicts: Arc::default(),
            used: Mutex::default(),
        }
    }

    /// The key check of a request (an HTTP call, a WebSocket upgrade): the live key of
    /// `secret`, the key as [`find_key`] found it.
    pub async fn check(&self, secret: Option<&str>) -> Result<ApiKeyRecord, AuthError> {
        match secret {
            Some(secret) => self.authenticate(secret).await,
            None => Err(AuthError::Missing),
        }
    }

    /// The key check of a message on an open WebSocket session, whose key was `current`: the
    /// key as it is now. The store being unreadable is not the client's fault: the session
    /// keeps `current`.
    pub async fn recheck(
        &self,
        secret: &str,
        current: &ApiKeyRecord,
    ) -> Result<ApiKeyRecord, AuthError> {
        match self.authenticate(secret).await {
            Err(AuthError::Store(error)) => {
                warn!("checking the API key of a WebSocket client: {error}");
                Ok(current.clone())
            }
            checked => checked,
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
