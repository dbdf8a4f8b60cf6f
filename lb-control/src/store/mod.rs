//! The persistent state store: services, backends, API keys and the event log, in one SQLite
//! file.
//!
//! Why SQLite: operators can inspect and repair the state with the `sqlite3` CLI; the schema is
//! versioned with `PRAGMA user_version`; WAL with `synchronous=FULL` makes a change durable once
//! its commit returns; and the constraints (UNIQUE, foreign keys with ON DELETE CASCADE) keep
//! the invariants even against a buggy caller or a hand edit.
//!
//! Every call blocks on disk I/O (a write waits for fsync): async callers run it on a blocking
//! thread. Times are kept to the millisecond. The store counts its calls ([`Store::calls`]), so
//! a test can show that a path never reaches it.

mod codec;
mod schema;
#[cfg(test)]
mod tests;
mod tx;

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use rusqlite::{Connection, TransactionBehavior, ffi, params};

use crate::model::{ApiKeyId, ApiKeyRecord, Backend, Event, Service};
use codec::{RowDecoder, unix_ms};
pub use tx::Tx;

/// How many events the log keeps; the oldest go first.
const EVENTS_KEPT: i64 = 100_000;

/// How long a write waits for another process holding the write lock (the `sqlite3` CLI, a
/// second lb-control) before it fails.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "state store {path}: cannot open or create it: {source}; check that its directory exists \
         and is writable by lb-control, and that the file is an lb-control state store"
    )]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "state store {path}: schema version {found} is newer than this lb-control supports \
         ({supported}); use a newer lb-control or restore a backup"
    )]
    NewerSchema {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    #[error("{what} already exists")]
    Conflict { what: String },
    #[error("state store {what}; repair it with the sqlite3 CLI or restore a backup")]
    Corrupt { what: String },
    #[error("state store: {0}")]
    Sql(#[from] rusqlite::Error),
}

/// How many calls a store served since it was opened: reads (queries) and writes
/// (transactions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StoreCalls {
    pub reads: u64,
    pub writes: u64,
}

#[derive(Default)]
struct CallCounters {
    reads: AtomicU64,
    writes: AtomicU64,
}

/// A handle on the state store; clones share one connection.
#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
    calls: Arc<CallCounters>,
    path: Arc<Path>,
    /// [`EVENTS_KEPT`], lowered by tests so the cap is reachable.
    events_kept: i64,
}

impl Store {
    /// Opens or creates the database at `path` (parent directory must exist), applies migrations.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let open_error = |source| StoreError::Open {
            path: path.to_owned(),
            source,
        };
        let mut conn = Connection::open(path).map_err(open_error)?;
        configure(&conn).map_err(open_error)?;
        schema::migrate(&mut conn, path)?;
        Ok(Store {
            conn: Arc::new(Mutex::new(conn)),
            calls: Arc::default(),
            path: path.into(),
            events_kept: EVENTS_KEPT,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The calls served so far, by every clone of this handle.
    pub fn calls(&self) -> StoreCalls {
        StoreCalls {
            reads: self.calls.reads.load(Ordering::Relaxed),
            writes: self.calls.writes.load(Ordering::Relaxed),
        }
    }

    /// Every service, ordered by id.
    pub fn services(&self) -> Result<Vec<Service>, StoreError> {
        let conn = self.lock_to_read();
        let mut stmt = conn.prepare(
            "SELECT id, vip, port, protocol, mode, health_check, origin FROM services ORDER BY id",
        )?;
        let mut rows = stmt.query([])?;
        let mut services = Vec::new();
        while let Some(row) = rows.next()? {
            services.push(self.decoder("services", row)?.service(row)?);
        }
        Ok(services)
    }

    /// Every backend of every service, ordered by id.
    pub fn backends(&self) -> Result<Vec<Backend>, StoreError> {
        let conn = self.lock_to_read();
        let mut stmt = conn.prepare(
            "SELECT id, service_id, address, rpc_port, weight, admin, origin FROM backends \
             ORDER BY id",
        )?;
        let mut rows = stmt.query([])?;
        let mut backends = Vec::new();
        while let Some(row) = rows.next()? {
            backends.push(self.decoder("backends", row)?.backend(row)?);
        }
        Ok(backends)
    }

    /// Runs `f` in one transaction (BEGIN IMMEDIATE) and commits; returns only after the commit is
    /// durable (fsync'd). On error, rolls back.
    pub fn write<T, E: From<StoreError>>(
        &self,
        f: impl FnOnce(&mut Tx<'_>) -> Result<T, E>,
    ) -> Result<T, E> {
        let mut conn = self.lock_to_write();
        // IMMEDIATE takes the write lock up front, so a transaction that reads before it writes
        // cannot fail half-way with SQLITE_BUSY when another process writes meanwhile.
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(StoreError::from)?;
        let mut tx = Tx::new(tx, self.events_kept);
        // On error the transaction is dropped, which rolls it back.
        let value = f(&mut tx)?;
        tx.commit().map_err(StoreError::from)?;
        Ok(value)
    }

    /// Every API key, revoked ones included, ordered by id.
    pub fn api_keys(&self) -> Result<Vec<ApiKeyRecord>, StoreError> {
        let conn = self.lock_to_read();
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
    pub fn api_key_by_hash(
        &self,
        secret_sha256: &[u8; 32],
    ) -> Result<Option<ApiKeyRecord>, StoreError> {
        let conn = self.lock_to_read();
        let mut stmt = conn.prepare(&format!("{API_KEY_COLUMNS} WHERE secret_sha256 = ?1"))?;
        let mut rows = stmt.query([&secret_sha256[..]])?;
        let Some(row) = rows.next()? else {
            return Ok(None);
        };
        Ok(Some(self.decoder("api_keys", row)?.api_key(row)?))
    }

    /// Records last-used times in one transaction (batched by the caller; not an event).
    pub fn touch_api_keys(&self, used: &[(ApiKeyId, SystemTime)]) -> Result<(), StoreError> {
        if used.is_empty() {
            return Ok(());
        }
        let mut conn = self.lock_to_write();
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
    pub fn events(&self, after: Option<i64>, limit: usize) -> Result<Vec<Event>, StoreError> {
        self.query_events(
            "SELECT id, at_ms, kind, subject, detail FROM events WHERE id > ?1 ORDER BY id \
             LIMIT ?2",
            params![after.unwrap_or(i64::MIN), sql_limit(limit)],
        )
    }

    /// The newest `limit` events, oldest first.
    pub fn recent_events(&self, limit: usize) -> Result<Vec<Event>, StoreError> {
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
        let conn = self.lock_to_read();
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
        Ok(RowDecoder {
            path: &self.path,
            table,
            id: row.get("id")?,
        })
    }

    fn lock_to_read(&self) -> MutexGuard<'_, Connection> {
        self.calls.reads.fetch_add(1, Ordering::Relaxed);
        self.lock()
    }

    fn lock_to_write(&self) -> MutexGuard<'_, Connection> {
        self.calls.writes.fetch_add(1, Ordering::Relaxed);
        self.lock()
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while the lock was held (in a `write` closure, say) dropped its transaction,
        // which rolled it back: the connection is still sound.
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

const API_KEY_COLUMNS: &str = "SELECT id, name, secret_sha256, rps, burst, created_ms, \
                               last_used_ms, revoked_ms FROM api_keys";

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
