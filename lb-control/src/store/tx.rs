//! Writes, inside the one transaction of [`Store::write`](super::Store::write).

use std::time::SystemTime;

use rusqlite::{OptionalExtension as _, Transaction, ffi, params};

use super::{
    StoreError,
    codec::{SerdeText, unix_ms},
};
use crate::model::{ApiKeyId, BackendDef, BackendId, Origin, RateLimit, ServiceDef, ServiceId};

/// One open write transaction; see [`Store::write`](super::Store::write).
pub struct Tx<'a> {
    tx: Transaction<'a>,
    events_kept: i64,
}

impl<'a> Tx<'a> {
    pub(super) fn new(tx: Transaction<'a>, events_kept: i64) -> Self {
        Tx { tx, events_kept }
    }

    pub(super) fn commit(self) -> rusqlite::Result<()> {
        self.tx.commit()
    }

    pub fn insert_service(
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
    pub fn update_service(&mut self, id: ServiceId, def: &ServiceDef) -> Result<bool, StoreError> {
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
    pub fn delete_service(&mut self, id: ServiceId) -> Result<bool, StoreError> {
        Ok(self
            .tx
            .execute("DELETE FROM services WHERE id = ?1", [id])?
            > 0)
    }

    /// Adds a backend to `service`, which must exist (else a foreign key error).
    pub fn insert_backend(
        &mut self,
        service: ServiceId,
        def: &BackendDef,
        origin: Origin,
    ) -> Result<BackendId, StoreError> {
        self.tx
            .execute(
                "INSERT INTO backends (service_id, address, rpc_port, weight, admin, origin) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    service,
                    def.address.to_string(),
                    def.rpc_port,
                    def.weight,
                    SerdeText(&def.admin),
                    SerdeText(&origin),
                ],
            )
            .map_err(|error| unique_conflict(error, || backend_what(service, def)))?;
        Ok(self.tx.last_insert_rowid())
    }

    /// Replaces the definition of backend `id`; false if there is none. Its service and origin
    /// stay.
    pub fn update_backend(&mut self, id: BackendId, def: &BackendDef) -> Result<bool, StoreError> {
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
                "UPDATE backends SET address = ?2, rpc_port = ?3, weight = ?4, admin = ?5 \
                 WHERE id = ?1",
                params![
                    id,
                    def.address.to_string(),
                    def.rpc_port,
                    def.weight,
                    SerdeText(&def.admin),
                ],
            )
            .map_err(|error| unique_conflict(error, || backend_what(service, def)))?;
        Ok(true)
    }

    pub fn delete_backend(&mut self, id: BackendId) -> Result<bool, StoreError> {
        Ok(self
            .tx
            .execute("DELETE FROM backends WHERE id = ?1", [id])?
            > 0)
    }

    /// Adds a key; its name and its secret must both be new.
    pub fn insert_api_key(
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
    pub fn revoke_api_key(&mut self, id: ApiKeyId, at: SystemTime) -> Result<bool, StoreError> {
        let changed = self.tx.execute(
            "UPDATE api_keys SET revoked_ms = ?2 WHERE id = ?1 AND revoked_ms IS NULL",
            params![id, unix_ms(at)],
        )?;
        Ok(changed > 0)
    }

    /// Sets key `id`'s rate limit (None: unlimited); false if there is no such key.
    pub fn set_api_key_limit(
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

    /// Appends an event stamped now and returns its id; the oldest events beyond the cap go.
    pub fn record_event(
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
