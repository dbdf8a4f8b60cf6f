//! Key check: where a client puts its API key, checking it against the live keys in memory
//! ([`KeySet`]), and last-used times written to the store in batches.
//!
//! A check never reaches the store: a secret not of the key's form (`lbk_` and 64 hex digits)
//! is refused before anything else, a well-formed one is hashed and looked up in the map of
//! live keys, which follows every change of the registry. So a flood of made-up keys costs
//! the store nothing, and a revoked key is refused from the moment its revocation commits.
//! An open WebSocket session does not check its key per message: it watches the set
//! ([`Authenticator::watch`]) and looks its key up again ([`Authenticator::current`]) when it
//! changes, which ends it at once on a revocation.
//!
//! Last-used times are gathered in memory and written once per [`TOUCH_INTERVAL`], in one
//! transaction: never a store write per request.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use hyper::{HeaderMap, Uri, header::AUTHORIZATION};
use thiserror::Error;
use tokio::sync::watch;
use tracing::warn;

use crate::{
    keys::{self, ApiKeys, KeySet, LiveKey},
    model::ApiKeyId,
    store::Store,
};

/// How often last-used times go to the store.
pub const TOUCH_INTERVAL: Duration = Duration::from_secs(1);

/// Why a request was not let in.
#[derive(Debug, Error)]
pub enum AuthError {
    #[error(
        "no API key: put it in the path (/<key>), ?apikey=, X-Api-Key or Authorization: Bearer"
    )]
    Missing,
    #[error(
        "not an API key: a key is {prefix} and 64 lowercase hex digits",
        prefix = keys::SECRET_PREFIX
    )]
    Malformed,
    #[error("unknown or revoked API key")]
    Unknown,
}

impl AuthError {
    /// The `reason` label of the auth-failure metric.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Malformed => "malformed",
            AuthError::Unknown => "unknown",
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

pub struct Authenticator {
    keys: KeySet,
    store: Store,
    used: Mutex<HashMap<ApiKeyId, SystemTime>>,
}

impl Authenticator {
    pub fn new(keys: &ApiKeys, store: Store) -> Authenticator {
        Authenticator {
            keys: keys.live().clone(),
            store,
            used: Mutex::default(),
        }
    }

    /// The key check of a request (an HTTP call, a WebSocket upgrade): the live key of
    /// `secret`, the key as [`find_key`] found it, and its digest (what a WebSocket session
    /// keeps to look its key up again; never the secret). Memory only.
    pub fn check(&self, secret: Option<&str>) -> Result<(Arc<LiveKey>, [u8; 32]), AuthError> {
        let secret = secret.ok_or(AuthError::Missing)?;
        if !keys::is_well_formed(secret) {
            return Err(AuthError::Malformed);
        }
        let digest = keys::digest(secret);
        let key = self.current(&digest).ok_or(AuthError::Unknown)?;
        self.record_use(key.id);
        Ok((key, digest))
    }

    /// The live key whose secret has `digest`, as it is now; None once revoked.
    pub fn current(&self, digest: &[u8; 32]) -> Option<Arc<LiveKey>> {
        self.keys.find(digest)
    }

    /// Moves on every change of the live keys: a session looks its key up again then.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.keys.watch()
    }

    /// Notes that key `id` is in use now; written with the next batch.
    pub fn record_use(&self, id: ApiKeyId) {
        lock(&self.used).insert(id, SystemTime::now());
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

/// The map holds no invariant a panicking holder could break.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::KeyCaps;

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

    struct TempStore(std::path::PathBuf);

    impl TempStore {
        fn new(name: &str) -> (TempStore, Store) {
            let dir = std::env::temp_dir().join(format!("lb-auth-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let store = Store::open(&dir.join("state.db")).unwrap();
            (TempStore(dir), store)
        }
    }

    impl Drop for TempStore {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[tokio::test]
    async fn made_up_and_malformed_keys_are_refused_without_a_store_query() {
        let (_dir, store) = TempStore::new("made-up");
        let keys = ApiKeys::open(store.clone()).unwrap();
        let created = keys.create("alice", None, KeyCaps::default()).unwrap();
        let auth = Authenticator::new(&keys, store.clone());
        let before = store.calls();
        let made_up = format!("{}{}", keys::SECRET_PREFIX, "0f".repeat(32));
        assert!(matches!(auth.check(None), Err(AuthError::Missing)));
        assert!(matches!(
            auth.check(Some("lbk_wrong")),
            Err(AuthError::Malformed)
        ));
        assert!(matches!(
            auth.check(Some(&made_up)),
            Err(AuthError::Unknown)
        ));
        let (key, _) = auth.check(Some(&created.secret)).unwrap();
        assert_eq!(key.id, created.record.id);
        assert_eq!(store.calls(), before);
        // Use is written in one batch, later.
        auth.flush_usage().await;
        assert_eq!(store.calls().writes, before.writes + 1);
        assert!(store.api_keys().unwrap()[0].last_used.is_some());
    }

    #[test]
    fn revocation_and_a_new_limit_reach_a_watcher_at_once() {
        let (_dir, store) = TempStore::new("watch");
        let keys = ApiKeys::open(store.clone()).unwrap();
        let created = keys.create("alice", None, KeyCaps::default()).unwrap();
        let auth = Authenticator::new(&keys, store);
        let (_, digest) = auth.check(Some(&created.secret)).unwrap();
        let mut watch = auth.watch();
        let limit = crate::model::RateLimit { rps: 2, burst: 2 };
        keys.set_limit(created.record.id, Some(limit)).unwrap();
        assert!(watch.has_changed().unwrap());
        watch.mark_unchanged();
        assert_eq!(auth.current(&digest).unwrap().rate_limit, Some(limit));
        keys.revoke(created.record.id).unwrap();
        assert!(watch.has_changed().unwrap());
        assert!(auth.current(&digest).is_none());
        assert!(matches!(
            auth.check(Some(&created.secret)),
            Err(AuthError::Unknown)
        ));
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
