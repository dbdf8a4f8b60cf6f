//! Writes, inside the one transaction of [`Store::write`](crate::store::Store::write).

use std::{path::Path, time::SystemTime};

use rusqlite::{OptionalExtension as _, Transaction, ffi, params};

use super::codec::SerdeText;
use ipnet::IpNet;

use crate::{
    model::{
        ApiKeyId, Backend, BackendDef, BackendId, BlockRecord, JoinTokenId, KeyCaps, Origin,
        RateLimit, Service, ServiceDef, ServiceId, ServiceKey,
    },
    store::{
        StoreError,
        record::{BlocklistEntry, EventEntry, KeyEntry, TokenEntry, unix_ms},
    },
};

/// One open SQLite write transaction.
pub(in crate::store) struct SqliteTx<'a> {
    tx: Transaction<'a>,
    path: &'a Path,
    events_kept: i64,
}

impl<'a> SqliteTx<'a> {
    pub(super) fn new(tx: Transaction<'a>, path: &'a Path, events_kept: i64) -> Self {
        SqliteTx {
            tx,
            path,
            events_kept,
        }
    }

    pub(super) fn commit(self) -> rusqlite::Result<()> {
        self.tx.commit()
    }

    pub(in crate::store) fn services(&mut self) -> Result<Vec<Service>, StoreError> {
        super::services(&self.tx, self.path)
    }

    pub(in crate::store) fn backends(&mut self) -> Result<Vec<Backend>, StoreError> {
        super::backends(&self.tx, self.path)
    }

    pub(in crate::store) fn insert_service(
        &mut self,
        def: &ServiceDef,
        origin: Origin,
    ) -> Result<ServiceId, StoreError> {
        self.tx
            .execute(
                "INSERT INTO services (vip, port, protocol, mode, health_check, origin) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    def.vip.to_string(),
                    def.port,
                    SerdeText(&def.protocol),
                    SerdeText(&def.mode),
                    SerdeText(&def.check),
                    SerdeText(&origin),
                ],
            )
            .map_err(|error| unique_conflict(error, || service_what(def)))?;
        Ok(self.tx.last_insert_rowid())
    }

    /// Replaces the definition of service `id`; false if there is none. The origin stays.
    pub(in crate::store) fn update_service(
        &mut self,
        id: ServiceId,
        def: &ServiceDef,
    ) -> Result<bool, StoreError> {
        let changed = self
            .tx
            .execute(
                "UPDATE services SET vip = ?2, port = ?3, protocol = ?4, mode = ?5, \
                 health_check = ?6 WHERE id = ?1",
                params![
                    id,
                    def.vip.to_string(),
                    def.port,
                    SerdeText(&def.protocol),
                    SerdeText(&def.mode),
                    SerdeText(&def.check),
                ],
            )
            .map_err(|error| unique_conflict(error, || service_what(def)))?;
        Ok(changed > 0)
    }

    /// Deletes service `id` and, by the foreign key's cascade, its backends; false if there is
    /// none.
    pub(in crate::store) fn delete_service(&mut self, id: ServiceId) -> Result<bool, StoreError> {
        Ok(self
            .tx
            .execute("DELETE FROM services WHERE id = ?1", [id])?
            > 0)
    }

    /// Adds a backend to `service`, which must exist (else a foreign key error).
    pub(in crate::store) fn insert_backend(
        &mut self,
        service: ServiceId,
        def: &BackendDef,
        origin: Origin,
    ) -> Result<BackendId, StoreError> {
        self.tx
            .execute(
                "INSERT INTO backends (service_id, address, rpc_port, weight, admin, origin, \
                 tier) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    service,
                    def.address.to_string(),
                    def.rpc_port,
                    def.weight,
                    SerdeText(&def.admin),
                    SerdeText(&origin),
                    def.tier,
                ],
            )
            .map_err(|error| match error.sqlite_error_code() {
                Some(rusqlite::ErrorCode::ConstraintViolation)
                    if error.to_string().contains("FOREIGN KEY") =>
                {
                    StoreError::NotFound {
                        what: format!("service {service}"),
                    }
                }
                _ => unique_conflict(error, || backend_what(service, def)),
            })?;
        Ok(self.tx.last_insert_rowid())
    }

    /// Replaces the definition of backend `id`; false if there is none. Its service and origin
    /// stay.
    pub(in crate::store) fn update_backend(
        &mut self,
        id: BackendId,
        def: &BackendDef,
    ) -> Result<bool, StoreError> {
        let service: Option<ServiceId> = self
            .tx
            .query_row(
                "SELECT service_id FROM backends WHERE id = ?1",
                [id],
                |row| row.get(0),
            )
            .optional()?;
        let Some(service) = service else {
            return Ok(false);
        };
        self.tx
            .execute(
                "UPDATE backends SET address = ?2, rpc_port = ?3, weight = ?4, admin = ?5, \
                 tier = ?6 WHERE id = ?1",
                params![
                    id,
                    def.address.to_string(),
                    def.rpc_port,
                    def.weight,
                    SerdeText(&def.admin),
                    def.tier,
                ],
            )
            .map_err(|error| unique_conflict(error, || backend_what(service, def)))?;
        Ok(true)
    }

    pub(in crate::store) fn delete_backend(&mut self, id: BackendId) -> Result<bool, StoreError> {
        Ok(self
            .tx
            .execute("DELETE FROM backends WHERE id = ?1", [id])?
            > 0)
    }

    /// Adds a key; its name and its secret must both be new.
    pub(in crate::store) fn insert_api_key(
        &mut self,
        name: &str,
        secret_sha256: &[u8; 32],
        rate_limit: Option<RateLimit>,
        created: SystemTime,
    ) -> Result<ApiKeyId, StoreError> {
        self.tx
            .execute(
                "INSERT INTO api_keys (name, secret_sha256, rps, burst, created_ms) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    name,
                    &secret_sha256[..],
                    rate_limit.map(|limit| limit.rps),
                    rate_limit.map(|limit| limit.burst),
                    unix_ms(created),
                ],
            )
            .map_err(|error| {
                // Which of the two UNIQUE columns failed is only in SQLite's message.
                let on_secret = error.to_string().contains("api_keys.secret_sha256");
                unique_conflict(error, || {
                    if on_secret {
                        "an API key with this secret".to_owned()
                    } else {
                        format!("an API key named {name}")
                    }
                })
            })?;
        Ok(self.tx.last_insert_rowid())
    }

    /// Revokes key `id` as of `at`; false if there is no such key or it is already revoked (the
    /// first revocation time stays).
    pub(in crate::store) fn revoke_api_key(
        &mut self,
        id: ApiKeyId,
        at: SystemTime,
    ) -> Result<bool, StoreError> {
        let changed = self.tx.execute(
            "UPDATE api_keys SET revoked_ms = ?2 WHERE id = ?1 AND revoked_ms IS NULL",
            params![id, unix_ms(at)],
        )?;
        Ok(changed > 0)
    }

    /// Sets key `id`'s rate limit (None: unlimited); false if there is no such key.
    pub(in crate::store) fn set_api_key_limit(
        &mut self,
        id: ApiKeyId,
        rate_limit: Option<RateLimit>,
    ) -> Result<bool, StoreError> {
        let changed = self.tx.execute(
            "UPDATE api_keys SET rps = ?2, burst = ?3 WHERE id = ?1",
            params![
                id,
                rate_limit.map(|limit| limit.rps),
                rate_limit.map(|limit| limit.burst),
            ],
        )?;
        Ok(changed > 0)
    }

    /// Sets key `id`'s WebSocket caps; false if there is no such key.
    pub(in crate::store) fn set_api_key_caps(
        &mut self,
        id: ApiKeyId,
        caps: KeyCaps,
    ) -> Result<bool, StoreError> {
        let changed = self.tx.execute(
            "UPDATE api_keys SET max_connections = ?2, max_subscriptions = ?3 WHERE id = ?1",
            params![id, caps.max_connections, caps.max_subscriptions],
        )?;
        Ok(changed > 0)
    }

    /// Adds a join token; its name and its secret must both be new.
    pub(in crate::store) fn insert_join_token(
        &mut self,
        name: &str,
        secret_sha256: &[u8; 32],
        services: &[ServiceKey],
        created: SystemTime,
    ) -> Result<JoinTokenId, StoreError> {
        self.tx
            .execute(
                "INSERT INTO join_tokens (name, secret_sha256, services, created_ms) \
                 VALUES (?1, ?2, ?3, ?4)",
                params![
                    name,
                    &secret_sha256[..],
                    services_json(services),
                    unix_ms(created),
                ],
            )
            .map_err(|error| {
                let on_secret = error.to_string().contains("join_tokens.secret_sha256");
                unique_conflict(error, || {
                    if on_secret {
                        "a join token with this secret".to_owned()
                    } else {
                        format!("a join token named {name}")
                    }
                })
            })?;
        Ok(self.tx.last_insert_rowid())
    }

    /// Revokes join token `id` as of `at`; false if there is no such token or it is already
    /// revoked.
    pub(in crate::store) fn revoke_join_token(
        &mut self,
        id: JoinTokenId,
        at: SystemTime,
    ) -> Result<bool, StoreError> {
        let changed = self.tx.execute(
            "UPDATE join_tokens SET revoked_ms = ?2 WHERE id = ?1 AND revoked_ms IS NULL",
            params![id, unix_ms(at)],
        )?;
        Ok(changed > 0)
    }

    pub(in crate::store) fn blocklist(&mut self) -> Result<Vec<BlockRecord>, StoreError> {
        super::blocklist(&self.tx, self.path)
    }

    /// Inserts or replaces the record of `record.prefix` (which has no host bits).
    pub(in crate::store) fn put_block(&mut self, record: &BlockRecord) -> Result<(), StoreError> {
        self.tx.execute(
            "INSERT OR REPLACE INTO blocklist (prefix, until_ms, source, created_ms) \
             VALUES (?1, ?2, ?3, ?4)",
            params![
                record.prefix.to_string(),
                record.until.map(unix_ms),
                SerdeText(&record.source),
                unix_ms(record.created),
            ],
        )?;
        Ok(())
    }

    /// Deletes the record of `prefix` (which has no host bits); returns it as it was.
    pub(in crate::store) fn delete_block(
        &mut self,
        prefix: IpNet,
    ) -> Result<Option<BlockRecord>, StoreError> {
        let record = self
            .blocklist()?
            .into_iter()
            .find(|record| record.prefix == prefix);
        if record.is_some() {
            self.tx.execute(
                "DELETE FROM blocklist WHERE prefix = ?1",
                [prefix.to_string()],
            )?;
        }
        Ok(record)
    }

    /// Appends an event stamped now and returns its id; the oldest events beyond the cap go.
    pub(in crate::store) fn record_event(
        &mut self,
        kind: &str,
        subject: &str,
        detail: &str,
    ) -> Result<i64, StoreError> {
        self.tx.execute(
            "INSERT INTO events (at_ms, kind, subject, detail) VALUES (?1, ?2, ?3, ?4)",
            params![unix_ms(SystemTime::now()), kind, subject, detail],
        )?;
        let id = self.tx.last_insert_rowid();
        // Event ids are consecutive (AUTOINCREMENT, only this trims, a rollback also rolls
        // back the counter), so the cut is an id range: a primary-key range delete, not a
        // count over 100 000 rows.
        self.tx
            .execute("DELETE FROM events WHERE id <= ?1", [id - self.events_kept])?;
        Ok(id)
    }
}

/// `lb-control store import`: records with the ids they had. AUTOINCREMENT's counters follow
/// the largest id inserted, so ids stay never reused.
impl SqliteTx<'_> {
    pub(super) fn restore_service(&mut self, service: &Service) -> Result<(), StoreError> {
        let def = &service.def;
        self.tx.execute(
            "INSERT INTO services (id, vip, port, protocol, mode, health_check, origin) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                service.id,
                def.vip.to_string(),
                def.port,
                SerdeText(&def.protocol),
                SerdeText(&def.mode),
                SerdeText(&def.check),
                SerdeText(&service.origin),
            ],
        )?;
        Ok(())
    }

    pub(super) fn restore_backend(&mut self, backend: &Backend) -> Result<(), StoreError> {
        let def = &backend.def;
        self.tx.execute(
            "INSERT INTO backends (id, service_id, address, rpc_port, weight, admin, origin, \
             tier) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                backend.id,
                backend.service,
                def.address.to_string(),
                def.rpc_port,
                def.weight,
                SerdeText(&def.admin),
                SerdeText(&backend.origin),
                def.tier,
            ],
        )?;
        Ok(())
    }

    pub(super) fn restore_api_key(&mut self, key: &KeyEntry) -> Result<(), StoreError> {
        let record = key.to_record().map_err(|problem| StoreError::Corrupt {
            what: format!("import: API key {}: {problem}", key.id),
        })?;
        self.tx.execute(
            "INSERT INTO api_keys (id, name, secret_sha256, rps, burst, max_connections, \
             max_subscriptions, created_ms, last_used_ms, revoked_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                record.id,
                record.name,
                &record.secret_sha256[..],
                record.rate_limit.map(|limit| limit.rps),
                record.rate_limit.map(|limit| limit.burst),
                record.caps.max_connections,
                record.caps.max_subscriptions,
                key.created_ms,
                key.last_used_ms,
                key.revoked_ms,
            ],
        )?;
        Ok(())
    }

    pub(super) fn restore_join_token(&mut self, token: &TokenEntry) -> Result<(), StoreError> {
        let record = token.to_record().map_err(|problem| StoreError::Corrupt {
            what: format!("import: join token {}: {problem}", token.id),
        })?;
        self.tx.execute(
            "INSERT INTO join_tokens (id, name, secret_sha256, services, created_ms, revoked_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                record.id,
                record.name,
                &record.secret_sha256[..],
                services_json(&record.services),
                token.created_ms,
                token.revoked_ms,
            ],
        )?;
        Ok(())
    }

    pub(super) fn restore_block(&mut self, entry: &BlocklistEntry) -> Result<(), StoreError> {
        let record = entry.to_record().map_err(|problem| StoreError::Corrupt {
            what: format!("import: blocklist entry {}: {problem}", entry.prefix),
        })?;
        self.put_block(&record)
    }

    pub(super) fn restore_event(&mut self, event: &EventEntry) -> Result<(), StoreError> {
        self.tx.execute(
            "INSERT INTO events (id, at_ms, kind, subject, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                event.id,
                event.at_ms,
                event.kind,
                event.subject,
                event.detail
            ],
        )?;
        Ok(())
    }
}

/// A join token's services as its column holds them: a JSON array of service keys.
fn services_json(services: &[ServiceKey]) -> String {
    let keys: Vec<String> = services.iter().map(ToString::to_string).collect();
    serde_json::to_string(&keys).expect("strings serialize")
}

fn service_what(def: &ServiceDef) -> String {
    format!("a service {}", def.key())
}

fn backend_what(service: ServiceId, def: &BackendDef) -> String {
    format!("a backend {} in service {service}", def.address)
}

/// A UNIQUE violation becomes a [`StoreError::Conflict`] described by `what`; any other error
/// stays an SQL error.
fn unique_conflict(error: rusqlite::Error, what: impl FnOnce() -> String) -> StoreError {
    match error.sqlite_error() {
        Some(ffi::Error {
            extended_code: ffi::SQLITE_CONSTRAINT_UNIQUE,
            ..
        }) => StoreError::Conflict { what: what() },
        _ => StoreError::Sql(error),
    }
}
