//! The live keys in memory: what the gateway checks a request's key against, so no request
//! waits for the store, whether its key is good, made up or malformed.
//!
//! The set is keyed by each secret's SHA-256 and holds only live keys (a revoked key is
//! dropped from it). It is loaded from the store at start and follows the store's changes
//! through one entry point: [`KeySet::apply`] for one change, [`KeySet::replace`] for the
//! whole set. Today [`ApiKeys`](super::ApiKeys) feeds it after each commit; a shared store
//! (another process writing, a watch on etcd) feeds the same two calls.
//!
//! Readers take a snapshot without a lock ([`ArcSwap`]); a change copies the map, which is
//! fine at the rate an operator changes keys. Every change bumps a generation that open
//! connections watch ([`KeySet::watch`]): a WebSocket session looks its key up again when it
//! moves, so a revocation or a new limit reaches it without waiting for a client message.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::model::{ApiKeyId, ApiKeyRecord, KeyCaps, RateLimit};

/// What the gateway knows of a live key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveKey {
    pub id: ApiKeyId,
    pub name: String,
    /// None: unlimited.
    pub rate_limit: Option<RateLimit>,
    /// Its own WebSocket caps; each None takes the gateway's default.
    pub caps: KeyCaps,
}

/// One change of the key registry, as the store committed it.
#[derive(Debug, Clone)]
pub enum KeyChange {
    /// A key as it is now: created, its limit changed, or revoked (`revoked` set).
    Put(ApiKeyRecord),
    /// A key that is gone from the store altogether.
    Delete(ApiKeyId),
}

type Digests = HashMap<[u8; 32], Arc<LiveKey>>;

/// The live keys by the SHA-256 of their secret; clones share one set.
#[derive(Clone)]
pub struct KeySet {
    inner: Arc<Inner>,
}

struct Inner {
    keys: ArcSwap<Digests>,
    /// Serializes changes: each copies the map it replaces.
    changing: Mutex<()>,
    /// Moves on every change.
    generation: watch::Sender<u64>,
}

impl KeySet {
    /// A set holding the live ones of `records`.
    pub fn new(records: impl IntoIterator<Item = ApiKeyRecord>) -> KeySet {
        KeySet {
            inner: Arc::new(Inner {
                keys: ArcSwap::from_pointee(live_keys(records)),
                changing: Mutex::new(()),
                generation: watch::Sender::new(0),
            }),
        }
    }

    /// The live key whose secret hashes to `digest`.
    ///
    /// A hash-map read: its timing tells an attacker about the hashes of their guesses, never
    /// about a stored secret.
    pub fn find(&self, digest: &[u8; 32]) -> Option<Arc<LiveKey>> {
        self.inner.keys.load().get(digest).cloned()
    }

    /// How many live keys there are.
    pub fn len(&self) -> usize {
        self.inner.keys.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes one change the store committed.
    pub fn apply(&self, change: KeyChange) {
        self.change(|keys| match change {
            KeyChange::Put(record) => {
                keys.retain(|_, key| key.id != record.id);
                if record.revoked.is_none() {
                    keys.insert(record.secret_sha256, Arc::new(live_key(record)));
                }
            }
            KeyChange::Delete(id) => keys.retain(|_, key| key.id != id),
        });
    }

    /// Takes the whole registry as the store holds it now (a reload, a resynced watch).
    pub fn replace(&self, records: impl IntoIterator<Item = ApiKeyRecord>) {
        let fresh = live_keys(records);
        self.change(|keys| *keys = fresh);
    }

    /// A receiver that sees every change from now on (its value is a generation number).
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.inner.generation.subscribe()
    }

    fn change(&self, edit: impl FnOnce(&mut Digests)) {
        // The lock guards no data of its own: a panicking holder leaves nothing half done.
        let _changing = self
            .inner
            .changing
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut keys = Digests::clone(&self.inner.keys.load());
        edit(&mut keys);
        self.inner.keys.store(Arc::new(keys));
        self.inner
            .generation
            .send_modify(|generation| *generation += 1);
    }
}

fn live_keys(records: impl IntoIterator<Item = ApiKeyRecord>) -> Digests {
    records
        .into_iter()
        .filter(|record| record.revoked.is_none())
        .map(|record| (record.secret_sha256, Arc::new(live_key(record))))
        .collect()
}

fn live_key(record: ApiKeyRecord) -> LiveKey {
    LiveKey {
        id: record.id,
        name: record.name,
        rate_limit: record.rate_limit,
        caps: record.caps,
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;

    fn record(id: ApiKeyId, digest: u8, rps: Option<u32>) -> ApiKeyRecord {
        ApiKeyRecord {
            id,
            name: format!("key{id}"),
            secret_sha256: [digest; 32],
            rate_limit: rps.map(|rps| RateLimit { rps, burst: rps }),
            caps: KeyCaps::default(),
            created: SystemTime::UNIX_EPOCH,
            last_used: None,
            revoked: None,
        }
    }

    #[test]
    fn revoked_keys_are_not_loaded_and_a_revocation_drops_the_key() {
        let mut revoked = record(2, 2, None);
        revoked.revoked = Some(SystemTime::now());
        let set = KeySet::new([record(1, 1, None), revoked]);
        assert_eq!(set.find(&[1; 32]).map(|key| key.id), Some(1));
        assert!(set.find(&[2; 32]).is_none());

        let mut first = record(1, 1, None);
        first.revoked = Some(SystemTime::now());
        set.apply(KeyChange::Put(first));
        assert!(set.find(&[1; 32]).is_none());
        assert!(set.is_empty());
    }

    #[test]
    fn every_change_moves_the_generation_watchers_see() {
        let set = KeySet::new([]);
        let mut watch = set.watch();
        assert!(!watch.has_changed().expect("sender alive"));
        set.apply(KeyChange::Put(record(1, 1, Some(5))));
        assert!(watch.has_changed().expect("sender alive"));
        watch.mark_unchanged();
        set.apply(KeyChange::Put(record(1, 1, Some(7))));
        assert!(watch.has_changed().expect("sender alive"));
        let limit = set.find(&[1; 32]).expect("live").rate_limit;
        assert_eq!(limit, Some(RateLimit { rps: 7, burst: 7 }));
    }

    #[test]
    fn replace_and_delete_follow_the_store() {
        let set = KeySet::new([record(1, 1, None)]);
        set.replace([record(2, 2, None), record(3, 3, None)]);
        assert!(set.find(&[1; 32]).is_none());
        assert_eq!(set.len(), 2);
        set.apply(KeyChange::Delete(2));
        assert!(set.find(&[2; 32]).is_none());
        assert_eq!(set.find(&[3; 32]).map(|key| key.id), Some(3));
    }
}
