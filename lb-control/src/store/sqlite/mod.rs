//! The SQLite engine: services, backends, API keys, join tokens, the blocklist and the event log
//! in one file.
//!
//! Why SQLite: operators can inspect and repair the state with the `sqlite3` CLI; the schema is
//! versioned with `PRAGMA user_version`; WAL with `synchronous=FULL` makes a change durable once
//! its commit returns; and the constraints (UNIQUE, foreign keys with ON DELETE CASCADE) keep
//! the invariants even against a buggy caller or a hand edit.

mod codec;
pub(super) mod schema;
mod tx;

use std::{
    path::Path,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, SystemTime},
};

use rusqlite::{Connection, TransactionBehavior, ffi, params};

use super::{StoreError, Tx, TxEngine, record::unix_ms, snapshot::Snapshot};
use crate::model::{ApiKeyId, ApiKeyRecord, Backend, BlockRecord, Event, JoinTokenRecord, Service};
use codec::RowDecoder;
pub(super) use tx::SqliteTx;

/// How long a write waits for another process holding the write lock (the `sqlite3` CLI, a
/// second lb-control) before it fails.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// A handle on one SQLite file; clones share one connection.
#[derive(Clone)]
pub(super) struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    path: Arc<Path>,
}

impl SqliteStore {
    /// Opens or creates the database at `path` (parent directory must exist), applies migrations.
    pub(super) fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let open_error = |source| StoreError::Open {
            path: path.to_owned(),
            source,
        };
        let mut conn = Connection::open(path).map_err(open_error)?;
        configure(&conn).map_err(open_error)?;
        schema::migrate(&mut conn, path)?;
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
            path: path.into(),
        })
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Every service, ordered by id.
    pub(super) fn services(&self) -> Result<Vec<Service>, StoreError> {
        services(&self.lock(), &self.path)
    }

    /// Every backend of every service, ordered by id.
    pub(super) fn backends(&self) -> Result<Vec<Backend>, StoreError> {
        backends(&self.lock(), &self.path)
    }

    /// Runs `f` once in one transaction (BEGIN IMMEDIATE) and commits; returns only after the
    /// commit is durable (fsync'd). On error, rolls back.
    pub(super) fn write<T, E: From<StoreError>>(
        &self,
        events_kept: i64,
        mut f: impl FnMut(&mut Tx<'_>) -> Result<T, E>,
    ) -> Result<T, E> {
        let mut conn = self.lock();
        // IMMEDIATE takes the write lock up front, so a transaction that reads before it writes
        // cannot fail half-way with SQLITE_BUSY when another process writes meanwhile.
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(StoreError::from)?;
        let mut tx = Tx(TxEngine::Sqlite(SqliteTx::new(tx, &self.path, events_kept)));
        // On error the transaction is dropped, which rolls it back.
        let value = f(&mut tx)?;
        let TxEngine::Sqlite(tx) = tx.0 else {
            unreachable!("an SQLite write holds an SQLite transaction")
        };
        tx.commit().map_err(StoreError::from)?;
        Ok(value)
    }

    /// Replaces everything with `snapshot`, ids included, in one transaction.
    pub(super) fn restore(&self, snapshot: &Snapshot) -> Result<(), StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        // Backends go with their services (ON DELETE CASCADE).
        tx.execute_batch(
            "DELETE FROM services; DELETE FROM api_keys; DELETE FROM join_tokens; \
             DELETE FROM blocklist; DELETE FROM events;",
        )?;
        let mut tx = SqliteTx::new(tx, &self.path, i64::MAX);
        for service in &snapshot.services {
            tx.restore_service(service)?;
        }
        for backend in &snapshot.backends {
            tx.restore_backend(backend)?;
        }
        for key in &snapshot.api_keys {
            tx.restore_api_key(key)?;
        }
        for token in &snapshot.join_tokens {
            tx.restore_join_token(token)?;
        }
        for entry in &snapshot.blocklist {
            tx.restore_block(entry)?;
        }
        for event in &snapshot.events {
            tx.restore_event(event)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Every API key, revoked ones included, ordered by id.
    pub(super) fn api_keys(&self) -> Result<Vec<ApiKeyRecord>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare(&format!("{API_KEY_COLUMNS} ORDER BY id"))?;
        let mut rows = stmt.query([])?;
        let mut keys = Vec::new();
        while let Some(row) = rows.next()? {
            keys.push(self.decoder("api_keys", row)?.api_key(row)?);
        }
        Ok(keys)
    }

    /// The key whose secret hashes to `secret_sha256`, revoked or not: the caller decides what a
    /// revoked key gets.
    pub(super) fn api_key_by_hash(
        &self,
        secret_sha256: &[u8; 32],
    ) -> Result<Option<ApiKeyRecord>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare(&format!("{API_KEY_COLUMNS} WHERE secret_sha256 = ?1"))?;
        let mut rows = stmt.query([&secret_sha256[..]])?;
        let Some(row) = rows.next()? else {
            return Ok(None);
        };
        Ok(Some(self.decoder("api_keys", row)?.api_key(row)?))
    }

    /// Every join token, revoked ones included, ordered by id.
    pub(super) fn join_tokens(&self) -> Result<Vec<JoinTokenRecord>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare(
            "SELECT id, name, secret_sha256, services, created_ms, revoked_ms FROM join_tokens \
             ORDER BY id",
        )?;
        let mut rows = stmt.query([])?;
        let mut tokens = Vec::new();
        while let Some(row) = rows.next()? {
            tokens.push(self.decoder("join_tokens", row)?.join_token(row)?);
        }
        Ok(tokens)
    }

    /// Every blocked prefix, in prefix order.
    pub(super) fn blocklist(&self) -> Result<Vec<BlockRecord>, StoreError> {
        blocklist(&self.lock(), &self.path)
    }

    /// Records last-used times in one transaction.
    pub(super) fn touch_api_keys(&self, used: &[(ApiKeyId, SystemTime)]) -> Result<(), StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            // MAX: batches from different tasks may land out of order; last use never goes back.
            let mut stmt = tx.prepare(
                "UPDATE api_keys SET last_used_ms = MAX(COALESCE(last_used_ms, ?2), ?2) \
                 WHERE id = ?1",
            )?;
            for &(id, at) in used {
                stmt.execute(params![id, unix_ms(at)])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Events with id > `after` (all when None), oldest first, at most `limit`.
    pub(super) fn events(
        &self,
        after: Option<i64>,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        self.query_events(
            "SELECT id, at_ms, kind, subject, detail FROM events WHERE id > ?1 ORDER BY id \
             LIMIT ?2",
            params![after.unwrap_or(i64::MIN), sql_limit(limit)],
        )
    }

    /// The newest `limit` events, oldest first.
    pub(super) fn recent_events(&self, limit: usize) -> Result<Vec<Event>, StoreError> {
        self.query_events(
            "SELECT id, at_ms, kind, subject, detail FROM \
             (SELECT * FROM events ORDER BY id DESC LIMIT ?1) ORDER BY id",
            params![sql_limit(limit)],
        )
    }

    fn query_events(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
    ) -> Result<Vec<Event>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare(sql)?;
        let mut rows = stmt.query(params)?;
        let mut events = Vec::new();
        while let Some(row) = rows.next()? {
            events.push(self.decoder("events", row)?.event(row)?);
        }
        Ok(events)
    }

    fn decoder<'a>(
        &'a self,
        table: &'static str,
        row: &rusqlite::Row<'_>,
    ) -> Result<RowDecoder<'a>, StoreError> {
        RowDecoder::of(&self.path, table, row)
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while the lock was held (in a `write` closure, say) dropped its transaction,
        // which rolled it back: the connection is still sound.
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Every service, read through `conn` (a connection or an open transaction).
fn services(conn: &Connection, path: &Path) -> Result<Vec<Service>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT id, vip, port, protocol, mode, health_check, origin FROM services ORDER BY id",
    )?;
    let mut rows = stmt.query([])?;
    let mut services = Vec::new();
    while let Some(row) = rows.next()? {
        services.push(RowDecoder::of(path, "services", row)?.service(row)?);
    }
    Ok(services)
}

/// Every backend, read through `conn` (a connection or an open transaction).
fn backends(conn: &Connection, path: &Path) -> Result<Vec<Backend>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT id, service_id, address, rpc_port, weight, admin, origin, tier FROM backends \
         ORDER BY id",
    )?;
    let mut rows = stmt.query([])?;
    let mut backends = Vec::new();
    while let Some(row) = rows.next()? {
        backends.push(RowDecoder::of(path, "backends", row)?.backend(row)?);
    }
    Ok(backends)
}

/// Every blocked prefix, read through `conn` (a connection or an open transaction), in prefix
/// order. Rows go by rowid in messages: the table's key is the prefix.
fn blocklist(conn: &Connection, path: &Path) -> Result<Vec<BlockRecord>, StoreError> {
    let mut stmt =
        conn.prepare("SELECT rowid AS id, prefix, until_ms, source, created_ms FROM blocklist")?;
    let mut rows = stmt.query([])?;
    let mut records = Vec::new();
    while let Some(row) = rows.next()? {
        records.push(RowDecoder::of(path, "blocklist", row)?.block(row)?);
    }
    // In prefix order as IpNet orders them (text order would put 10.0.0.0/8 after 1.0.0.0/8
    // and 9.0.0.0/8 after both).
    records.sort_by_key(|record| record.prefix);
    Ok(records)
}

const API_KEY_COLUMNS: &str = "SELECT id, name, secret_sha256, rps, burst, max_connections, \
                               max_subscriptions, created_ms, last_used_ms, revoked_ms \
                               FROM api_keys";

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    // Checked, not assumed: SQLite keeps the old journal mode when it cannot switch (e.g. on a
    // file system without shared memory), and rollback mode would change the durability story.
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(rusqlite::Error::SqliteFailure(
            ffi::Error::new(ffi::SQLITE_CANTOPEN),
            Some(format!("journal mode stays {mode}, WAL is required")),
        ));
    }
    // FULL: in WAL mode, NORMAL may lose the last commits on power loss; FULL fsyncs the WAL
    // at every commit.
    conn.pragma_update(None, "synchronous", "FULL")?;
    // Off by default in SQLite, per connection: without it the CASCADE and REFERENCES clauses
    // are ignored.
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.busy_timeout(BUSY_TIMEOUT)
}

/// SQLite's LIMIT takes an i64; a larger usize means "all of them" anyway.
fn sql_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}
