//! The API key registry: the gateway's clients authenticate with these keys.
//!
//! A key's secret is 32 random bytes shown once, at creation, as `lbk_` and 64 lowercase hex
//! digits (URL-safe: it can stand in the gateway's URL path). Only its SHA-256 is stored, so a
//! copy of the state store gives no usable key. Each change records an event in the same
//! transaction as the change itself.
//!
//! The live keys are also held in memory ([`KeySet`], in [`live`]): loaded at start, updated by
//! every change made here right after its commit, and what [`ApiKeys::verify`] (the gateway's
//! key check) reads. A check never touches the store: a made-up key costs a hash and a map
//! read, a malformed one not even that.
//!
//! Changes another lb-control makes to a shared store reach the live keys through
//! [`ApiKeys::reload`], which the daemon calls when the store's watch says the keys changed.
//!
//! The changing methods block on the store (a write waits for fsync): async callers run them
//! on a blocking thread.

mod live;

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::SystemTime,
};

use rand::RngCore;
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::{
    model::{ApiKeyId, ApiKeyRecord, KeyCaps, RateLimit},
    store::{Store, StoreError, Tx},
};
pub use live::{KeyChange, KeySet, LiveKey};

/// What every secret starts with: tells a leaked string for what it is (secret scanners).
pub const SECRET_PREFIX: &str = "lbk_";
const SECRET_BYTES: usize = 32;
/// A secret's length: the prefix and two hex digits per byte.
pub const SECRET_LEN: usize = SECRET_PREFIX.len() + 2 * SECRET_BYTES;
pub const MAX_NAME_LEN: usize = 64;
/// Far above what one node cluster serves; a typo (an extra digit) still fails.
pub const MAX_RPS: u32 = 1_000_000;

/// Why a change to a registry of secrets (API keys here, join tokens in
/// [`tokens`](crate::tokens)) was not made. `what` names the record: "API key 7".
#[derive(Debug, Error)]
pub enum CredentialError {
    #[error("{what} does not exist")]
    NotFound { what: String },
    #[error("{what} is revoked (for good)")]
    Revoked { what: String },
    #[error("{what} already exists")]
    Conflict { what: String },
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("state store: {0}")]
    Store(StoreError),
}

impl From<StoreError> for CredentialError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Conflict { what } => CredentialError::Conflict { what },
            other => CredentialError::Store(other),
        }
    }
}

/// How errors name API key `id`.
fn api_key(id: ApiKeyId) -> String {
    format!("API key {id}")
}

/// A key just created: the only time its secret exists outside the client's hands.
#[derive(Debug, Clone)]
pub struct CreatedKey {
    pub record: ApiKeyRecord,
    pub secret: String,
}

/// The registry of API keys, over the state store and its live keys in memory; clones share
/// both.
#[derive(Clone)]
pub struct ApiKeys {
    store: Store,
    live: KeySet,
    /// Held from a change's first read of the store until the live set has it, so the set
    /// takes changes in the order the store committed them.
    changing: Arc<Mutex<()>>,
}

impl ApiKeys {
    /// The registry over `store`, with its live keys loaded.
    pub fn open(store: Store) -> Result<Self, CredentialError> {
        let live = KeySet::new(store.api_keys()?);
        Ok(ApiKeys {
            store,
            live,
            changing: Arc::default(),
        })
    }

    /// Takes the keys as the store holds them now (another lb-control changed them): new keys
    /// are accepted, revoked ones refused and their connections closed, new limits applied.
    pub fn reload(&self) -> Result<(), CredentialError> {
        let _changing = self.lock_changes();
        self.live.replace(self.store.api_keys()?);
        Ok(())
    }

    /// The live keys in memory: what the gateway checks keys against and watches for changes.
    pub fn live(&self) -> &KeySet {
        &self.live
    }

    pub fn create(
        &self,
        name: &str,
        rate_limit: Option<RateLimit>,
        caps: KeyCaps,
    ) -> Result<CreatedKey, CredentialError> {
        validate_name(name)?;
        if let Some(limit) = rate_limit {
            validate_limit(limit)?;
        }
        validate_caps(caps)?;
        let secret = new_secret(SECRET_PREFIX);
        let secret_sha256 = digest(&secret);
        let created = SystemTime::now();
        let _changing = self.lock_changes();
        let id = self.store.write(|tx| {
            let id = tx.insert_api_key(name, &secret_sha256, rate_limit, created)?;
            if caps != KeyCaps::default() {
                tx.set_api_key_caps(id, caps)?;
            }
            tx.record_event(
                "key.created",
                &describe(id, name),
                &format!("{}; {}", describe_limit(rate_limit), describe_caps(caps)),
            )?;
            Ok::<_, CredentialError>(id)
        })?;
        let record = ApiKeyRecord {
            id,
            name: name.to_owned(),
            secret_sha256,
            rate_limit,
            caps,
            created,
            last_used: None,
            revoked: None,
        };
        self.live.apply(KeyChange::Put(record.clone()));
        Ok(CreatedKey { record, secret })
    }

    /// Every key, revoked ones included (their names stay taken), ordered by id.
    pub fn list(&self) -> Result<Vec<ApiKeyRecord>, CredentialError> {
        Ok(self.store.api_keys()?)
    }

    /// Revokes a key for good. A key revoked already is a conflict, not a silent success, so
    /// an operator who typed the wrong id learns it.
    pub fn revoke(&self, id: ApiKeyId) -> Result<ApiKeyRecord, CredentialError> {
        let _changing = self.lock_changes();
        let mut key = self.active(id)?;
        let at = SystemTime::now();
        self.store.write(|tx| {
            // False only if another request revoked it since `active` looked.
            if !tx.revoke_api_key(id, at)? {
                return Err(CredentialError::Revoked { what: api_key(id) });
            }
            tx.record_event("key.revoked", &describe(id, &key.name), "api")?;
            Ok(())
        })?;
        key.revoked = Some(at);
        self.live.apply(KeyChange::Put(key.clone()));
        Ok(key)
    }

    /// Sets a key's rate limit; None makes it unlimited.
    pub fn set_limit(
        &self,
        id: ApiKeyId,
        rate_limit: Option<RateLimit>,
    ) -> Result<ApiKeyRecord, CredentialError> {
        if let Some(limit) = rate_limit {
            validate_limit(limit)?;
        }
        self.change_active(
            id,
            "key.limit",
            |tx| tx.set_api_key_limit(id, rate_limit),
            |key| {
                let was = describe_limit(key.rate_limit);
                key.rate_limit = rate_limit;
                format!("{was} -> {}", describe_limit(rate_limit))
            },
        )
    }

    /// Sets a key's WebSocket caps, each None back to the gateway's default. Connections and
    /// subscriptions a lowered cap finds open stay; new ones are held to it.
    pub fn set_caps(&self, id: ApiKeyId, caps: KeyCaps) -> Result<ApiKeyRecord, CredentialError> {
        validate_caps(caps)?;
        self.change_active(
            id,
            "key.caps",
            |tx| tx.set_api_key_caps(id, caps),
            |key| {
                let was = describe_caps(key.caps);
                key.caps = caps;
                format!("{was} -> {}", describe_caps(caps))
            },
        )
    }

    /// One change of active key `id`: `write` in the store (false: the key is gone) with an
    /// event of `kind`, then in the live keys. `change` makes it on the key as it was and says
    /// what changed, for the event.
    fn change_active(
        &self,
        id: ApiKeyId,
        kind: &'static str,
        write: impl Fn(&mut Tx<'_>) -> Result<bool, StoreError>,
        change: impl FnOnce(&mut ApiKeyRecord) -> String,
    ) -> Result<ApiKeyRecord, CredentialError> {
        let _changing = self.lock_changes();
        let mut key = self.active(id)?;
        let subject = describe(id, &key.name);
        let detail = change(&mut key);
        self.store.write(|tx| {
            if !write(tx)? {
                return Err(CredentialError::NotFound { what: api_key(id) });
            }
            tx.record_event(kind, &subject, &detail)?;
            Ok(())
        })?;
        self.live.apply(KeyChange::Put(key.clone()));
        Ok(key)
    }

    /// The live key a client's secret belongs to; None for an unknown, revoked or malformed
    /// secret. Memory only, never the store (see [`KeySet::find`]).
    pub fn verify(&self, secret: &str) -> Option<Arc<LiveKey>> {
        is_well_formed(secret)
            .then(|| self.live.find(&digest(secret)))
            .flatten()
    }

    fn lock_changes(&self) -> std::sync::MutexGuard<'_, ()> {
        // It guards no data: a panicking holder leaves nothing half done.
        self.changing.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Key `id`, unless it does not exist or is revoked.
    fn active(&self, id: ApiKeyId) -> Result<ApiKeyRecord, CredentialError> {
        let key = self
            .list()?
            .into_iter()
            .find(|key| key.id == id)
            .ok_or(CredentialError::NotFound { what: api_key(id) })?;
        if key.revoked.is_some() {
            return Err(CredentialError::Revoked { what: api_key(id) });
        }
        Ok(key)
    }
}

/// Whether `secret` has the form of a key: [`SECRET_PREFIX`] and 64 lowercase hex digits.
/// Anything else cannot be a key, and is refused before any lookup.
pub fn is_well_formed(secret: &str) -> bool {
    has_secret_form(SECRET_PREFIX, secret)
}

/// A new secret: `prefix` and 32 random bytes in lowercase hex. Join tokens are made the same
/// way, under their own prefix.
pub fn new_secret(prefix: &str) -> String {
    let mut bytes = [0u8; SECRET_BYTES];
    // ThreadRng is a CSPRNG seeded from the OS.
    rand::rng().fill_bytes(&mut bytes);
    format!("{prefix}{}", to_hex(&bytes))
}

/// Whether `secret` is `prefix` and 64 lowercase hex digits, the form [`new_secret`] makes.
pub fn has_secret_form(prefix: &str, secret: &str) -> bool {
    secret.len() == prefix.len() + 2 * SECRET_BYTES
        && secret.strip_prefix(prefix).is_some_and(|hex| {
            hex.bytes()
                .all(|byte| matches!(byte, b'0'..=b'9' | b'a'..=b'f'))
        })
}

/// SHA-256 of a secret: what is stored and compared.
pub fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Compares two digests in time independent of where they differ.
pub fn digests_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn describe(id: ApiKeyId, name: &str) -> String {
    format!("key {id} ({name})")
}

fn describe_limit(limit: Option<RateLimit>) -> String {
    limit.map_or_else(
        || "unlimited".to_owned(),
        |limit| format!("{} rps, burst {}", limit.rps, limit.burst),
    )
}

fn describe_caps(caps: KeyCaps) -> String {
    let cap =
        |cap: Option<u32>| cap.map_or_else(|| "the default".to_owned(), |cap| cap.to_string());
    format!(
        "WebSocket connections {}, subscriptions {}",
        cap(caps.max_connections),
        cap(caps.max_subscriptions)
    )
}

/// A cap of 0 would shut the key out of WebSockets altogether: revoking says that plainly.
pub fn validate_caps(caps: KeyCaps) -> Result<(), CredentialError> {
    for (field, cap) in [
        ("max_connections", caps.max_connections),
        ("max_subscriptions", caps.max_subscriptions),
    ] {
        if cap == Some(0) {
            return Err(CredentialError::Invalid {
                field,
                reason: "0 would shut the key out: give 1 or more, or none for the gateway's \
                         default"
                    .to_owned(),
            });
        }
    }
    Ok(())
}

/// Names show in logs, metrics labels and tables: a short, plain alphabet.
pub fn validate_name(name: &str) -> Result<(), CredentialError> {
    check_name("key", name).map_err(|reason| CredentialError::Invalid {
        field: "name",
        reason,
    })
}

/// Whether `name` is a name of a `what` (key, join token): 1 to [`MAX_NAME_LEN`] letters,
/// digits, '_', '.' or '-'; else why not.
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    let valid = (1..=MAX_NAME_LEN).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "\"{name}\" is not a {what} name: use 1 to {MAX_NAME_LEN} letters, digits, '_', '.' \
             or '-'"
        ))
    }
}

pub fn validate_limit(limit: RateLimit) -> Result<(), CredentialError> {
    if !(1..=MAX_RPS).contains(&limit.rps) {
        return Err(CredentialError::Invalid {
            field: "rps",
            reason: format!(
                "{} is not a rate: use 1 to {MAX_RPS} requests per second, or no limit",
                limit.rps
            ),
        });
    }
    if limit.burst > MAX_RPS {
        return Err(CredentialError::Invalid {
            field: "burst",
            reason: format!("{} is too large: use 0 to {MAX_RPS}", limit.burst),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TempStore {
        dir: std::path::PathBuf,
        keys: ApiKeys,
        store: Store,
    }

    impl TempStore {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("lb-keys-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("temp dir");
            let store = Store::open(&dir.join("state.db")).expect("store opens");
            TempStore {
                dir,
                keys: ApiKeys::open(store.clone()).expect("keys load"),
                store,
            }
        }
    }

    impl Drop for TempStore {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn secret_is_shown_once_and_only_its_hash_is_stored() {
        let t = TempStore::new("secret");
        let created = t
            .keys
            .create("alice", None, KeyCaps::default())
            .expect("created");
        let secret = &created.secret;
        assert!(secret.starts_with(SECRET_PREFIX), "{secret}");
        assert_eq!(secret.len(), SECRET_PREFIX.len() + 2 * SECRET_BYTES);
        assert!(
            secret[SECRET_PREFIX.len()..]
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        let stored = t.keys.list().expect("list");
        assert_eq!(stored.len(), 1);
        assert!(digests_equal(&stored[0].secret_sha256, &digest(secret)));
        let other = t
            .keys
            .create("bob", None, KeyCaps::default())
            .expect("created");
        assert_ne!(other.secret, created.secret);
    }

    #[test]
    fn verify_accepts_live_keys_only() {
        let t = TempStore::new("verify");
        let limit = RateLimit { rps: 5, burst: 10 };
        let created = t
            .keys
            .create("alice", Some(limit), KeyCaps::default())
            .expect("created");
        let found = t.keys.verify(&created.secret).expect("live");
        assert_eq!(found.id, created.record.id);
        assert_eq!(found.rate_limit, Some(limit));
        assert!(t.keys.verify("lbk_00").is_none());
        t.keys.revoke(created.record.id).expect("revoked");
        assert!(t.keys.verify(&created.secret).is_none());
    }

    #[test]
    fn only_the_key_format_is_well_formed() {
        let good = format!("{SECRET_PREFIX}{}", "0123456789abcdef".repeat(4));
        assert!(is_well_formed(&good));
        let bad = [
            String::new(),
            "lbk_".to_owned(),
            "lbk_00".to_owned(),
            good[..good.len() - 1].to_owned(),
            format!("{good}0"),
            good.to_uppercase(),
            good.replacen("lbk_", "lbx_", 1),
            good.replacen('a', "g", 1),
            good.replacen('a', "A", 1),
            format!("{SECRET_PREFIX}{}", "\u{e9}".repeat(SECRET_BYTES)),
        ];
        for bad in &bad {
            assert!(!is_well_formed(bad), "{bad:?}");
        }
    }

    #[test]
    fn checks_never_touch_the_store_and_a_change_is_seen_at_once() {
        let t = TempStore::new("memory");
        let created = t
            .keys
            .create("alice", None, KeyCaps::default())
            .expect("created");
        let reads = t.store.calls().reads;
        let made_up = format!("{SECRET_PREFIX}{}", "ab".repeat(SECRET_BYTES));
        for _ in 0..1000 {
            assert!(t.keys.verify(&created.secret).is_some());
            assert!(t.keys.verify(&made_up).is_none());
            assert!(t.keys.verify("lbk_short").is_none());
        }
        assert_eq!(t.store.calls().reads, reads);
        let limit = RateLimit { rps: 3, burst: 1 };
        t.keys
            .set_limit(created.record.id, Some(limit))
            .expect("limited");
        let found = t.keys.verify(&created.secret).expect("live");
        assert_eq!(found.rate_limit, Some(limit));
        // Another registry over the same store (the next start) loads the same live keys.
        let reopened = ApiKeys::open(t.store.clone()).expect("keys load");
        assert_eq!(
            reopened.verify(&created.secret).map(|key| key.rate_limit),
            Some(Some(limit))
        );
        t.keys.revoke(created.record.id).expect("revoked");
        assert!(t.keys.verify(&created.secret).is_none());
        assert!(
            ApiKeys::open(t.store.clone())
                .expect("keys load")
                .live()
                .is_empty()
        );
    }

    #[test]
    fn revoking_twice_or_an_unknown_key_is_refused() {
        let t = TempStore::new("revoke");
        let id = t
            .keys
            .create("alice", None, KeyCaps::default())
            .expect("created")
            .record
            .id;
        let revoked = t.keys.revoke(id).expect("revoked");
        assert!(revoked.revoked.is_some());
        assert!(matches!(
            t.keys.revoke(id),
            Err(CredentialError::Revoked { .. })
        ));
        assert!(matches!(
            t.keys.revoke(id + 100),
            Err(CredentialError::NotFound { .. })
        ));
        assert!(matches!(
            t.keys.set_limit(id, None),
            Err(CredentialError::Revoked { .. })
        ));
        // A revoked key's name stays taken: names identify keys in logs and metrics.
        assert!(matches!(
            t.keys.create("alice", None, KeyCaps::default()),
            Err(CredentialError::Conflict { .. })
        ));
    }

    #[test]
    fn every_change_records_an_event() {
        let t = TempStore::new("events");
        let id = t
            .keys
            .create("alice", None, KeyCaps::default())
            .expect("created")
            .record
            .id;
        t.keys
            .set_limit(id, Some(RateLimit { rps: 1, burst: 0 }))
            .expect("limited");
        t.keys.revoke(id).expect("revoked");
        let kinds: Vec<String> = t
            .store
            .events(None, 10)
            .expect("events")
            .into_iter()
            .map(|event| event.kind)
            .collect();
        assert_eq!(kinds, ["key.created", "key.limit", "key.revoked"]);
    }

    #[test]
    fn bad_names_and_limits_name_the_field() {
        let t = TempStore::new("invalid");
        for name in ["", "has space", "slash/", &"x".repeat(65)] {
            assert!(
                matches!(
                    t.keys.create(name, None, KeyCaps::default()),
                    Err(CredentialError::Invalid { field: "name", .. })
                ),
                "{name:?}"
            );
        }
        assert!(matches!(
            t.keys.create(
                "a",
                Some(RateLimit { rps: 0, burst: 1 }),
                KeyCaps::default()
            ),
            Err(CredentialError::Invalid { field: "rps", .. })
        ));
        let no_connections = KeyCaps {
            max_connections: Some(0),
            max_subscriptions: None,
        };
        assert!(matches!(
            t.keys.create("a", None, no_connections),
            Err(CredentialError::Invalid {
                field: "max_connections",
                ..
            })
        ));
        assert!(t.keys.list().expect("list").is_empty());
    }

    #[test]
    fn a_key_s_caps_are_stored_live_at_once_and_go_back_to_the_default() {
        let t = TempStore::new("caps");
        let plan = KeyCaps {
            max_connections: Some(5000),
            max_subscriptions: Some(20_000),
        };
        let created = t.keys.create("site-eu", None, plan).expect("created");
        assert_eq!(t.keys.verify(&created.secret).expect("live").caps, plan);
        assert_eq!(t.keys.list().expect("list")[0].caps, plan);

        let fewer = KeyCaps {
            max_connections: Some(10),
            max_subscriptions: None,
        };
        let changed = t.keys.set_caps(created.record.id, fewer).expect("set");
        assert_eq!(changed.caps, fewer);
        assert_eq!(t.keys.verify(&created.secret).expect("live").caps, fewer);
        let zero = KeyCaps {
            max_subscriptions: Some(0),
            ..fewer
        };
        assert!(matches!(
            t.keys.set_caps(created.record.id, zero),
            Err(CredentialError::Invalid {
                field: "max_subscriptions",
                ..
            })
        ));
        t.keys
            .set_caps(created.record.id, KeyCaps::default())
            .expect("reset");
        assert_eq!(t.keys.list().expect("list")[0].caps, KeyCaps::default());
        let reopened = ApiKeys::open(t.store.clone()).expect("reopened");
        assert_eq!(
            reopened.verify(&created.secret).expect("live").caps,
            KeyCaps::default()
        );
        let events: Vec<String> = t
            .store
            .events(None, 10)
            .expect("events")
            .into_iter()
            .filter(|event| event.kind == "key.caps")
            .map(|event| event.detail)
            .collect();
        assert_eq!(
            events,
            [
                "WebSocket connections 5000, subscriptions 20000 -> WebSocket connections 10, \
                 subscriptions the default",
                "WebSocket connections 10, subscriptions the default -> WebSocket connections \
                 the default, subscriptions the default",
            ]
        );
        assert!(matches!(
            t.keys.set_caps(99, plan),
            Err(CredentialError::NotFound { .. })
        ));
    }
}
