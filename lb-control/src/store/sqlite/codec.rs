//! How values are written to and read back from SQLite columns.
//!
//! Enums are kept as their serde names, the same text the config file and the admin API use,
//! so `sqlite3` output reads like the rest of the system. Addresses are kept in Rust's
//! canonical text form, so the UNIQUE constraints compare what Rust compares.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    path::Path,
    str::FromStr,
    time::SystemTime,
};

use rusqlite::{
    Row,
    types::{ToSql, ToSqlOutput},
};
use serde::{Serialize, de::DeserializeOwned};

use ipnet::IpNet;

use crate::model::{
    ApiKeyRecord, Backend, BackendDef, BlockRecord, Event, JoinTokenRecord, KeyCaps, RateLimit,
    Service, ServiceDef,
};
use crate::store::{
    StoreError,
    record::{from_unix_ms, parse_services},
};

/// An enum bound as its serde name.
pub(super) struct SerdeText<'a, T>(pub(super) &'a T);

impl<T: Serialize> ToSql for SerdeText<'_, T> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        match serde_json::to_value(self.0) {
            Ok(serde_json::Value::String(text)) => Ok(ToSqlOutput::from(text)),
            Ok(other) => Err(rusqlite::Error::ToSqlConversionFailure(
                format!("{other} is not a unit enum variant").into(),
            )),
            Err(error) => Err(rusqlite::Error::ToSqlConversionFailure(Box::new(error))),
        }
    }
}

/// Decodes one row of `table`; a value that does not decode names the file, table, row and
/// column, so an operator can find it with `sqlite3`.
pub(super) struct RowDecoder<'a> {
    pub(super) path: &'a Path,
    pub(super) table: &'static str,
    pub(super) id: i64,
}

impl<'a> RowDecoder<'a> {
    pub(super) fn of(
        path: &'a Path,
        table: &'static str,
        row: &Row<'_>,
    ) -> Result<RowDecoder<'a>, StoreError> {
        Ok(RowDecoder {
            path,
            table,
            id: row.get("id")?,
        })
    }

    pub(super) fn service(&self, row: &Row<'_>) -> Result<Service, StoreError> {
        Ok(Service {
            id: self.id,
            def: ServiceDef {
                vip: self.parse::<IpAddr>(row, "vip", "an IP address")?,
                port: self.int(row, "port")?,
                protocol: self.serde_enum(row, "protocol")?,
                mode: self.serde_enum(row, "mode")?,
                check: self.serde_enum(row, "health_check")?,
            },
            origin: self.serde_enum(row, "origin")?,
        })
    }

    pub(super) fn backend(&self, row: &Row<'_>) -> Result<Backend, StoreError> {
        Ok(Backend {
            id: self.id,
            service: row.get("service_id")?,
            def: BackendDef {
                address: self.parse::<SocketAddr>(row, "address", "an address with a port")?,
                rpc_port: self.int(row, "rpc_port")?,
                weight: self.int(row, "weight")?,
                admin: self.serde_enum(row, "admin")?,
                tier: self.int(row, "tier")?,
            },
            origin: self.serde_enum(row, "origin")?,
        })
    }

    pub(super) fn api_key(&self, row: &Row<'_>) -> Result<ApiKeyRecord, StoreError> {
        let secret: Vec<u8> = row.get("secret_sha256")?;
        let secret_sha256 = secret.as_slice().try_into().map_err(|_| {
            self.corrupt(
                "secret_sha256",
                format_args!("{} bytes, not a 32-byte SHA-256", secret.len()),
            )
        })?;
        let rps: Option<i64> = row.get("rps")?;
        let rate_limit = match rps {
            Some(_) => Some(RateLimit {
                rps: self.int(row, "rps")?,
                burst: self.int(row, "burst")?,
            }),
            None => None,
        };
        Ok(ApiKeyRecord {
            id: self.id,
            name: row.get("name")?,
            secret_sha256,
            rate_limit,
            caps: KeyCaps {
                max_connections: self.optional_int(row, "max_connections")?,
                max_subscriptions: self.optional_int(row, "max_subscriptions")?,
            },
            created: self.time(row, "created_ms")?,
            last_used: self.optional_time(row, "last_used_ms")?,
            revoked: self.optional_time(row, "revoked_ms")?,
        })
    }

    pub(super) fn join_token(&self, row: &Row<'_>) -> Result<JoinTokenRecord, StoreError> {
        let secret: Vec<u8> = row.get("secret_sha256")?;
        let secret_sha256 = secret.as_slice().try_into().map_err(|_| {
            self.corrupt(
                "secret_sha256",
                format_args!("{} bytes, not a 32-byte SHA-256", secret.len()),
            )
        })?;
        let services: String = row.get("services")?;
        let services = serde_json::from_str::<Vec<String>>(&services)
            .map_err(|error| error.to_string())
            .and_then(|services| parse_services(&services))
            .map_err(|problem| self.corrupt("services", format_args!("{problem}")))?;
        Ok(JoinTokenRecord {
            id: self.id,
            name: row.get("name")?,
            secret_sha256,
            services,
            created: self.time(row, "created_ms")?,
            revoked: self.optional_time(row, "revoked_ms")?,
        })
    }

    pub(super) fn block(&self, row: &Row<'_>) -> Result<BlockRecord, StoreError> {
        let prefix = self.parse::<IpNet>(row, "prefix", "an IP prefix")?;
        if prefix != prefix.trunc() {
            return Err(self.corrupt("prefix", format_args!("{prefix} has host bits set")));
        }
        Ok(BlockRecord {
            prefix,
            until: self.optional_time(row, "until_ms")?,
            source: self.serde_enum(row, "source")?,
            created: self.time(row, "created_ms")?,
        })
    }

    pub(super) fn event(&self, row: &Row<'_>) -> Result<Event, StoreError> {
        Ok(Event {
            id: self.id,
            at: self.time(row, "at_ms")?,
            kind: row.get("kind")?,
            subject: row.get("subject")?,
            detail: row.get("detail")?,
        })
    }

    fn parse<T: FromStr>(
        &self,
        row: &Row<'_>,
        column: &str,
        expected: &str,
    ) -> Result<T, StoreError> {
        let text: String = row.get(column)?;
        text.parse()
            .map_err(|_| self.corrupt(column, format_args!("{text:?} is not {expected}")))
    }

    fn serde_enum<T: DeserializeOwned>(
        &self,
        row: &Row<'_>,
        column: &str,
    ) -> Result<T, StoreError> {
        let text: String = row.get(column)?;
        serde_json::from_value(serde_json::Value::String(text.clone()))
            .map_err(|_| self.corrupt(column, format_args!("{text:?} is not a known value")))
    }

    fn int<T: TryFrom<i64>>(&self, row: &Row<'_>, column: &str) -> Result<T, StoreError> {
        let value: i64 = row.get(column)?;
        T::try_from(value)
            .map_err(|_| self.corrupt(column, format_args!("{value} is out of range")))
    }

    fn optional_int<T: TryFrom<i64>>(
        &self,
        row: &Row<'_>,
        column: &str,
    ) -> Result<Option<T>, StoreError> {
        let value: Option<i64> = row.get(column)?;
        value
            .map(|value| {
                T::try_from(value)
                    .map_err(|_| self.corrupt(column, format_args!("{value} is out of range")))
            })
            .transpose()
    }

    fn time(&self, row: &Row<'_>, column: &str) -> Result<SystemTime, StoreError> {
        let ms: i64 = row.get(column)?;
        from_unix_ms(ms).ok_or_else(|| {
            self.corrupt(
                column,
                format_args!("{ms} ms is not a time this system can hold"),
            )
        })
    }

    fn optional_time(&self, row: &Row<'_>, column: &str) -> Result<Option<SystemTime>, StoreError> {
        let ms: Option<i64> = row.get(column)?;
        match ms {
            Some(_) => self.time(row, column).map(Some),
            None => Ok(None),
        }
    }

    fn corrupt(&self, column: &str, problem: fmt::Arguments<'_>) -> StoreError {
        StoreError::Corrupt {
            what: format!(
                "{}: table {}, row {}, column {column}: {problem}; repair it with the sqlite3 \
                 CLI or restore a backup",
                self.path.display(),
                self.table,
                self.id
            ),
        }
    }
}
