//! The API key registry: the gateway's clients authenticate with these keys.
//!
//! A key's secret is 32 random bytes shown once, at creation, as `lbk_` and 64 lowercase hex
//! digits (URL-safe: it can stand in the gateway's URL path). Only its SHA-256 is stored, so a
//! copy of the state store gives no usable key. Each change records an event in the same
//! transaction as the change itself.
//!
//! Every method blocks on the store (a write waits for fsync): async callers run them on a
//! blocking thread.

use std::time::SystemTime;

use rand::RngCore;
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::{
    model::{ApiKeyId, ApiKeyRecord, RateLimit},
    store::{Store, StoreError},
};

/// What every secret starts with: tells a leaked string for what it is (secret scanners).
pub const SECRET_PREFIX: &str = "lbk_";
const SECRET_BYTES: usize = 32;
pub const MAX_NAME_LEN: usize = 64;
/// Far above what one node cluster serves; a typo (an extra digit) still fails.
pub const MAX_RPS: u32 = 1_000_000;

#[derive(Debug, Error)]
pub enum KeyError {
    #[error("API key {id} does not exist")]
    NotFound { id: ApiKeyId },
    #[error("API key {id} is revoked (for good)")]
    Revoked { id: ApiKeyId },
    #[error("{what} already exists")]
    Conflict { what: String },
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("state store: {0}")]
    Store(StoreError),
}

impl From<StoreError> for KeyError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Conflict { what } => KeyError::Conflict { what },
            other => KeyError::Store(other),
        }
    }
}

/// A key just created: the only time its secret exists outside the client's hands.
#[derive(Debug, Clone)]
pub struct CreatedKey {
    pub record: ApiKeyRecord,
    pub secret: String,
}

/// The registry of API keys, over the state store.
#[derive(Clone)]
pub struct ApiKeys {
    store: Store,
}

impl ApiKeys {
    pub fn new(store: Store) -> Self {
        ApiKeys { store }
    }

    pub fn create(
        &self,
        name: &str,
        rate_limit: Option<RateLimit>,
    ) -> Result<CreatedKey, KeyError> {
        validate_name(name)?;
        if let Some(limit) = rate_limit {
            validate_limit(limit)?;
        }
        let mut bytes = [0u8; SECRET_BYTES];
        // ThreadRng is a CSPRNG seeded from the OS.
        rand::rng().fill_bytes(&mut bytes);
        let secret = format!("{SECRET_PREFIX}{}", to_hex(&bytes));
        let secret_sha256 = digest(&secret);
        let created = SystemTime::now();
        let id = self.store.write(|tx| {
            let id = tx.insert_api_key(name, &secret_sha256, rate_limit, created)?;
            tx.record_event(
                "key.created",
                &describe(id, name),
                &describe_limit(rate_limit),
            )?;
            Ok::<_, KeyError>(id)
        })?;
        Ok(CreatedKey {
            record: ApiKeyRecord {
                id,
                name: name.to_owned(),
                secret_sha256,
                rate_limit,
                created,
                last_used: None,
                revoked: None,
            },
            secret,
        })
    }

    /// Every key, revoked ones included (their names stay taken), ordered by id.
    pub fn list(&self) -> Result<Vec<ApiKeyRecord>, KeyError> {
        Ok(self.store.api_keys()?)
    }

    /// Revokes a key for good. A key revoked already is a conflict, not a silent success, so
    /// an operator who typed the wrong id learns it.
    pub fn revoke(&self, id: ApiKeyId) -> Result<ApiKeyRecord, KeyError> {
        let mut key = self.active(id)?;
        let at = SystemTime::now();
        self.store.write(|tx| {
            // False only if another request revoked it since `active` looked.
            if !tx.revoke_api_key(id, at)? {
                return Err(KeyError::Revoked { id });
            }
            tx.record_event("key.revoked", &describe(id, &key.name), "api")?;
            Ok(())
        })?;
        key.revoked = Some(at);
        Ok(key)
    }

    /// Sets a key's rate limit; None makes it unlimited.
    pub fn set_limit(
        &self,
        id: ApiKeyId,
        rate_limit: Option<RateLimit>,
    ) -> Result<ApiKeyRecord, KeyError> {
        if let Some(limit) = rate_limit {
            validate_limit(limit)?;
        }
        let mut key = self.active(id)?;
        self.store.write(|tx| {
            if !tx.set_api_key_limit(id, rate_limit)? {
                return Err(KeyError::NotFound { id });
            }
            tx.record_event(
                "key.limit",
                &describe(id, &key.name),
                &format!(
                    "{} -> {}",
                    describe_limit(key.rate_limit),
                    describe_limit(rate_limit)
                ),
            )?;
            Ok(())
        })?;
        key.rate_limit = rate_limit;
        Ok(key)
    }

    /// The live key a client's secret belongs to; None for an unknown or revoked secret.
    ///
    /// The lookup is by the secret's SHA-256, so its timing tells an attacker about hashes of
    /// their guesses, never about a stored secret.
    pub fn verify(&self, secret: &str) -> Result<Option<ApiKeyRecord>, KeyError> {
        let key = self.store.api_key_by_hash(&digest(secret))?;
        Ok(key.filter(|key| key.revoked.is_none()))
    }

    /// Key `id`, unless it does not exist or is revoked.
    fn active(&self, id: ApiKeyId) -> Result<ApiKeyRecord, KeyError> {
        let key = self
            .list()?
            .into_iter()
            .find(|key| key.id == id)
            .ok_or(KeyError::NotFound { id })?;
        if key.revoked.is_some() {
            return Err(KeyError::Revoked { id });
        }
        Ok(key)
    }
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

/// Names show in logs, metrics labels and tables: a short, plain alphabet.
pub fn validate_name(name: &str) -> Result<(), KeyError> {
    let valid = (1..=MAX_NAME_LEN).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if valid {
        Ok(())
    } else {
        Err(KeyError::Invalid {
            field: "name",
            reason: format!(
                "\"{name}\" is not a key name: use 1 to {MAX_NAME_LEN} letters, digits, '_', '.' \
                 or '-'"
            ),
        })
    }
}

pub fn validate_limit(limit: RateLimit) -> Result<(), KeyError> {
    if !(1..=MAX_RPS).contains(&limit.rps) {
        return Err(KeyError::Invalid {
            field: "rps",
            reason: format!(
                "{} is not a rate: use 1 to {MAX_RPS} requests per second, or no limit",
                limit.rps
            ),
        });
    }
    if limit.burst > MAX_RPS {
        return Err(KeyError::Invalid {
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
                keys: ApiKeys::new(store.clone()),
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
        let created = t.keys.create("alice", None).expect("created");
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
        let other = t.keys.create("bob", None).expect("created");
        assert_ne!(other.secret, created.secret);
    }

    #[test]
    fn verify_accepts_live_keys_only() {
        let t = TempStore::new("verify");
        let limit = RateLimit { rps: 5, burst: 10 };
        let created = t.keys.create("alice", Some(limit)).expect("created");
        let found = t
            .keys
            .verify(&created.secret)
            .expect("verify")
            .expect("live");
        assert_eq!(found.id, created.record.id);
        assert_eq!(found.rate_limit, Some(limit));
        assert!(t.keys.verify("lbk_00").expect("verify").is_none());
        t.keys.revoke(created.record.id).expect("revoked");
        assert!(t.keys.verify(&created.secret).expect("verify").is_none());
    }

    #[test]
    fn revoking_twice_or_an_unknown_key_is_refused() {
        let t = TempStore::new("revoke");
        let id = t.keys.create("alice", None).expect("created").record.id;
        let revoked = t.keys.revoke(id).expect("revoked");
        assert!(revoked.revoked.is_some());
        assert!(matches!(t.keys.revoke(id), Err(KeyError::Revoked { .. })));
        assert!(matches!(
            t.keys.revoke(id + 100),
            Err(KeyError::NotFound { .. })
        ));
        assert!(matches!(
            t.keys.set_limit(id, None),
            Err(KeyError::Revoked { .. })
        ));
        // A revoked key's name stays taken: names identify keys in logs and metrics.
        assert!(matches!(
            t.keys.create("alice", None),
            Err(KeyError::Conflict { .. })
        ));
    }

    #[test]
    fn every_change_records_an_event() {
        let t = TempStore::new("events");
        let id = t.keys.create("alice", None).expect("created").record.id;
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
                    t.keys.create(name, None),
                    Err(KeyError::Invalid { field: "name", .. })
                ),
                "{name:?}"
            );
        }
        assert!(matches!(
            t.keys.create("a", Some(RateLimit { rps: 0, burst: 1 })),
            Err(KeyError::Invalid { field: "rps", .. })
        ));
        assert!(t.keys.list().expect("list").is_empty());
    }
}
