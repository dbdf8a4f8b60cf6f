//! Join tokens: admin API credentials of narrow scope, for nodes that register themselves.
//!
//! A join token lets its holder add its own address (the address its request comes from) as a
//! backend of the services the token names, see, drain and remove that backend, and nothing
//! else; the admin API enforces the scope (`api::auth`). Its secret is `lbj_` and 64 hex
//! digits, shown once at creation; only its SHA-256 is stored, as for API keys. A revoked token
//! stays listed, its name taken, so an event naming it always means one token.
//!
//! Unlike API keys, tokens are looked up in the store at each use: joins are rare, and a token
//! revoked through one lb-control of a pair is refused by the other at once. A string not of a
//! token's form never reaches the store.
//!
//! The methods block on the store: async callers run them on a blocking thread.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::{
    keys::{CredentialError, check_name, digest, has_secret_form, new_secret},
    model::{JoinTokenId, JoinTokenRecord, ServiceKey},
    store::Store,
};

/// What every join token's secret starts with (`lbk_` is an API key's).
pub const SECRET_PREFIX: &str = "lbj_";

/// How errors name join token `id`.
fn join_token(id: JoinTokenId) -> String {
    format!("join token {id}")
}

/// A token just created: the only time its secret exists outside its holder's hands.
#[derive(Debug, Clone)]
pub struct CreatedToken {
    pub record: JoinTokenRecord,
    pub secret: String,
}

/// The registry of join tokens, over the state store; clones share it.
#[derive(Clone)]
pub struct JoinTokens {
    store: Store,
}

impl JoinTokens {
    pub fn new(store: Store) -> Self {
        JoinTokens { store }
    }

    /// A token that may join `services` (at least one, each named once).
    pub fn create(
        &self,
        name: &str,
        services: &[ServiceKey],
    ) -> Result<CreatedToken, CredentialError> {
        check_name("join token", name).map_err(|reason| CredentialError::Invalid {
            field: "name",
            reason,
        })?;
        if services.is_empty() {
            return Err(CredentialError::Invalid {
                field: "services",
                reason: "name at least one service the token may join".to_owned(),
            });
        }
        if let Some(twice) = services
            .iter()
            .enumerate()
            .find_map(|(i, service)| services[..i].contains(service).then_some(service))
        {
            return Err(CredentialError::Invalid {
                field: "services",
                reason: format!("{twice} is named twice"),
            });
        }
        let secret = new_secret(SECRET_PREFIX);
        let secret_sha256 = digest(&secret);
        let created = now_in_millis();
        let id = self.store.write(|tx| {
            let id = tx.insert_join_token(name, &secret_sha256, services, created)?;
            tx.record_event(
                "token.created",
                &describe(id, name),
                &format!("join {}", list(services)),
            )?;
            Ok::<_, CredentialError>(id)
        })?;
        Ok(CreatedToken {
            record: JoinTokenRecord {
                id,
                name: name.to_owned(),
                secret_sha256,
                services: services.to_vec(),
                created,
                revoked: None,
            },
            secret,
        })
    }

    /// Every token, revoked ones included, ordered by id.
    pub fn list(&self) -> Result<Vec<JoinTokenRecord>, CredentialError> {
        Ok(self.store.join_tokens()?)
    }

    /// Revokes a token for good: its holder's next request is refused. Revoking a revoked
    /// token is a conflict, so an operator who typed the wrong id learns it.
    pub fn revoke(&self, id: JoinTokenId) -> Result<JoinTokenRecord, CredentialError> {
        let mut token = self
            .list()?
            .into_iter()
            .find(|token| token.id == id)
            .ok_or(CredentialError::NotFound {
                what: join_token(id),
            })?;
        let at = now_in_millis();
        self.store.write(|tx| {
            if !tx.revoke_join_token(id, at)? {
                return Err(CredentialError::Revoked {
                    what: join_token(id),
                });
            }
            tx.record_event("token.revoked", &describe(id, &token.name), "api")?;
            Ok(())
        })?;
        token.revoked = Some(at);
        Ok(token)
    }

    /// The token `secret` belongs to, revoked or not (the caller says which it was); None for
    /// a string that is no token's.
    pub fn find(&self, secret: &str) -> Result<Option<JoinTokenRecord>, CredentialError> {
        if !has_secret_form(SECRET_PREFIX, secret) {
            return Ok(None);
        }
        let wanted = digest(secret);
        Ok(self
            .list()?
            .into_iter()
            .find(|token| crate::keys::digests_equal(&token.secret_sha256, &wanted)))
    }
}

/// Now, to the millisecond as the store keeps times: a record answered is the one stored.
fn now_in_millis() -> SystemTime {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    UNIX_EPOCH + Duration::from_millis(since_epoch.as_millis() as u64)
}

/// A token as logs and the event log name it: `join token 3 (eu-west)`.
pub fn describe(id: JoinTokenId, name: &str) -> String {
    format!("join token {id} ({name})")
}

/// `192.0.2.10:9944/tcp, 192.0.2.11:9944/tcp`
pub fn list(services: &[ServiceKey]) -> String {
    services
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TempStore {
        dir: std::path::PathBuf,
        tokens: JoinTokens,
        store: Store,
    }

    impl TempStore {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("lb-tokens-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("temp dir");
            let store = Store::open(&dir.join("state.db")).expect("store opens");
            TempStore {
                dir,
                tokens: JoinTokens::new(store.clone()),
                store,
            }
        }
    }

    impl Drop for TempStore {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn services() -> Vec<ServiceKey> {
        vec!["192.0.2.10:9944".parse().expect("service key")]
    }

    #[test]
    fn a_token_is_found_by_its_secret_only_and_stays_found_revoked() {
        let t = TempStore::new("find");
        let created = t.tokens.create("eu", &services()).expect("created");
        assert!(
            created.secret.starts_with(SECRET_PREFIX),
            "{}",
            created.secret
        );
        assert!(has_secret_form(SECRET_PREFIX, &created.secret));
        let found = t
            .tokens
            .find(&created.secret)
            .expect("lookup")
            .expect("found");
        assert_eq!(found, created.record);
        assert_eq!(found.secret_sha256, digest(&created.secret));

        let reads = t.store.calls().reads;
        let api_key = new_secret(crate::keys::SECRET_PREFIX);
        for not_a_token in ["", "lbj_00", api_key.as_str(), "Bearer lbj_"] {
            assert_eq!(t.tokens.find(not_a_token).expect("lookup"), None);
        }
        assert_eq!(
            t.store.calls().reads,
            reads,
            "malformed secrets skip the store"
        );
        let unknown = new_secret(SECRET_PREFIX);
        assert_eq!(t.tokens.find(&unknown).expect("lookup"), None);

        let revoked = t.tokens.revoke(created.record.id).expect("revoked");
        assert!(revoked.revoked.is_some());
        let found = t
            .tokens
            .find(&created.secret)
            .expect("lookup")
            .expect("found");
        assert_eq!(found.revoked, revoked.revoked);
        assert!(matches!(
            t.tokens.revoke(created.record.id),
            Err(CredentialError::Revoked { .. })
        ));
        assert!(matches!(
            t.tokens.revoke(created.record.id + 1),
            Err(CredentialError::NotFound { .. })
        ));
        let kinds: Vec<(String, String)> = t
            .store
            .events(None, 10)
            .expect("events")
            .into_iter()
            .map(|event| (event.kind, event.subject))
            .collect();
        let subject = describe(created.record.id, "eu");
        assert_eq!(
            kinds,
            [
                ("token.created".to_owned(), subject.clone()),
                ("token.revoked".to_owned(), subject)
            ]
        );
    }

    #[test]
    fn bad_names_and_service_lists_name_the_field() {
        let t = TempStore::new("invalid");
        let service = services();
        for (name, services, field) in [
            ("has space", service.clone(), "name"),
            ("eu", Vec::new(), "services"),
            (
                "eu",
                [service.clone(), service.clone()].concat(),
                "services",
            ),
        ] {
            let error = t.tokens.create(name, &services).expect_err("refused");
            assert!(
                matches!(&error, CredentialError::Invalid { field: f, .. } if *f == field),
                "{error}"
            );
        }
        t.tokens.create("eu", &service).expect("created");
        assert!(matches!(
            t.tokens.create("eu", &service),
            Err(CredentialError::Conflict { .. })
        ));
        assert_eq!(t.tokens.list().expect("list").len(), 1);
    }
}
