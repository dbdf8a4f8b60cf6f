//! The schema and its migrations.
//!
//! `MIGRATIONS[n]` takes a database from version `n` to `n + 1`; `PRAGMA user_version` records
//! the version a file is at (0 for a new file). A released step is never edited: a change is a
//! new step, so every existing file reaches the same schema.

use std::path::Path;

use rusqlite::{Connection, TransactionBehavior};

use super::StoreError;

/// STRICT: a hand edit cannot put text in an integer column. AUTOINCREMENT: ids are never
/// reused, so an id in a log line or an event always means one record.
pub(in crate::store) const MIGRATIONS: &[&str] = &[
    "
    CREATE TABLE services (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        vip TEXT NOT NULL,
        port INTEGER NOT NULL,
        protocol TEXT NOT NULL,
        mode TEXT NOT NULL,
        health_check TEXT NOT NULL,
        origin TEXT NOT NULL,
        UNIQUE (vip, port, protocol)
    ) STRICT;

    -- UNIQUE (service_id, address) also indexes service_id, which the cascade looks up.
    CREATE TABLE backends (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        service_id INTEGER NOT NULL REFERENCES services (id) ON DELETE CASCADE,
        address TEXT NOT NULL,
        rpc_port INTEGER NOT NULL,
        weight INTEGER NOT NULL,
        admin TEXT NOT NULL,
        origin TEXT NOT NULL,
        UNIQUE (service_id, address)
    ) STRICT;

    -- rps and burst NULL: unlimited.
    CREATE TABLE api_keys (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL UNIQUE,
        secret_sha256 BLOB NOT NULL UNIQUE CHECK (length(secret_sha256) = 32),
        rps INTEGER,
        burst INTEGER,
        created_ms INTEGER NOT NULL,
        last_used_ms INTEGER,
        revoked_ms INTEGER,
        CHECK ((rps IS NULL) = (burst IS NULL))
    ) STRICT;

    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at_ms INTEGER NOT NULL,
        kind TEXT NOT NULL,
        subject TEXT NOT NULL,
        detail TEXT NOT NULL
    ) STRICT;
",
    "
    -- services: a JSON array of service keys (\"192.0.2.10:9944/tcp\").
    CREATE TABLE join_tokens (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL UNIQUE,
        secret_sha256 BLOB NOT NULL UNIQUE CHECK (length(secret_sha256) = 32),
        services TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        revoked_ms INTEGER
    ) STRICT;
",
    "
    -- Backend tiers: every backend stored before them is a primary.
    ALTER TABLE backends ADD COLUMN tier INTEGER NOT NULL DEFAULT 0;
",
    "
    -- The source blocklist: prefix in canonical CIDR text without host bits; until_ms NULL:
    -- blocked until removed; source: admin, auth-failure or adopted.
    CREATE TABLE blocklist (
        prefix TEXT PRIMARY KEY,
        until_ms INTEGER,
        source TEXT NOT NULL,
        created_ms INTEGER NOT NULL
    ) STRICT;
",
    "
    -- A key's own WebSocket caps; NULL: the gateway's default.
    ALTER TABLE api_keys ADD COLUMN max_connections INTEGER;
    ALTER TABLE api_keys ADD COLUMN max_subscriptions INTEGER;
",
];

/// The schema version this build writes.
pub(in crate::store) const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Brings the file at `path` to [`SCHEMA_VERSION`], all steps in one transaction: a crash
/// mid-way leaves the file at its old version, never between two.
pub(super) fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let open_error = |source| StoreError::Open {
        path: path.to_owned(),
        source,
    };
    // IMMEDIATE: two processes opening a new file at once migrate it one after the other; the
    // second then finds it current.
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(open_error)?;
    let found: i64 = tx
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(open_error)?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::NewerSchema {
            path: path.to_owned(),
            found,
            supported: SCHEMA_VERSION,
        });
    }
    let Ok(start) = usize::try_from(found) else {
        return Err(StoreError::Corrupt {
            what: format!(
                "{}: schema version {found} is not one lb-control ever wrote",
                path.display()
            ),
        });
    };
    if start == MIGRATIONS.len() {
        return Ok(());
    }
    for step in &MIGRATIONS[start..] {
        tx.execute_batch(step).map_err(open_error)?;
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)
        .map_err(open_error)?;
    tx.commit().map_err(open_error)?;
    tracing::info!(
        path = %path.display(),
        from = found,
        to = SCHEMA_VERSION,
        "state store schema migrated"
    );
    Ok(())
}
