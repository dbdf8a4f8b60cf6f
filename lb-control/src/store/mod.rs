//! The persistent state store: services, backends, API keys, join tokens, the source blocklist
//! and the event log.
//!
//! One interface, two engines: SQLite ([`sqlite`], one file, the embedded default for one
//! host) and etcd ([`etcd`], shared by every lb-control of a cluster, chosen by
//! `[store] etcd = { … }`). Nothing outside this module knows which is behind a [`Store`].
//!
//! Why an enum of two engines rather than a trait object: [`Store::write`] is generic over its
//! closure and [`Tx`] borrows the engine's transaction, neither of which a `dyn` trait can
//! express without boxing every call; and the set of engines is closed.
//!
//! Every call blocks (a write waits for fsync, or for etcd's quorum): async callers run it on
//! a blocking thread. Times are kept to the millisecond. The store counts its calls
//! ([`Store::calls`]), so a test can show that a path never reaches it.
//!
//! A write is acknowledged only once its engine committed it. Its closure may run more than
//! once: on etcd, a write that raced another lb-control's is run again on the new state (see
//! [`etcd`]), so the closure must not act outside the transaction it is given.

mod etcd;
mod record;
pub mod settings;
pub mod snapshot;
mod sqlite;
#[cfg(any(test, feature = "test-harness"))]
pub mod test_etcd;
#[cfg(test)]
mod tests;

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use tokio::sync::watch;

use ipnet::IpNet;

use crate::model::{
    ApiKeyId, ApiKeyRecord, Backend, BackendDef, BackendId, BlockRecord, Event, JoinTokenId,
    JoinTokenRecord, KeyCaps, Origin, RateLimit, Service, ServiceDef, ServiceId, ServiceKey,
};
pub use etcd::EtcdError;
use etcd::{EtcdStore, EtcdTx};
pub use settings::{EtcdSettings, StoreSection};
use snapshot::Snapshot;
use sqlite::{SqliteStore, SqliteTx};

/// How many events the log keeps; the oldest go first.
const EVENTS_KEPT: i64 = 100_000;

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
    #[error("{what} does not exist")]
    NotFound { what: String },
    /// `what` ends with how to repair it, which depends on the engine.
    #[error("state store {what}")]
    Corrupt { what: String },
    #[error(
        "state store {location} is not empty; import only into an empty store, or pass \
         --replace to drop what it holds"
    )]
    NotEmpty { location: String },
    #[error("state store: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error(transparent)]
    Etcd(#[from] EtcdError),
}

impl StoreError {
    /// The store cannot take writes now (etcd without quorum or unreachable): the caller may
    /// try again later, and everything already committed keeps being served.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Etcd(error) if error.is_unavailable())
    }
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

/// Moves whenever another process changed the shared store: each field is a generation that
/// moves with a change of its part. The backend set re-reads services and backends when
/// `backends` moves, the key registry its keys when `keys` moves, the blocklist its entries
/// when `blocklist` moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StoreChanges {
    pub backends: u64,
    pub keys: u64,
    pub blocklist: u64,
}

/// A handle on the state store; clones share one connection.
#[derive(Clone)]
pub struct Store {
    engine: Engine,
    calls: Arc<CallCounters>,
    /// [`EVENTS_KEPT`], lowered by tests so the cap is reachable.
    events_kept: i64,
}

#[derive(Clone)]
enum Engine {
    Sqlite(SqliteStore),
    Etcd(EtcdStore),
}

impl Store {
    /// Opens or creates the SQLite store at `path` (parent directory must exist), applies
    /// migrations.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Ok(Store::over(Engine::Sqlite(SqliteStore::open(path)?)))
    }

    /// Connects to the etcd cluster `settings` name and starts watching its prefix. Fails if
    /// no member answers: lb-control keeps no local copy to start from.
    pub fn open_etcd(settings: &EtcdSettings) -> Result<Store, StoreError> {
        Ok(Store::over(Engine::Etcd(EtcdStore::open(settings)?)))
    }

    /// The store the config's `[store]` section chooses: etcd when set, else SQLite in
    /// `state_dir`.
    pub fn open_configured(section: &StoreSection, state_dir: &Path) -> Result<Store, StoreError> {
        match &section.etcd {
            Some(etcd) => Store::open_etcd(etcd),
            None => Store::open(&sqlite_path(state_dir)),
        }
    }

    fn over(engine: Engine) -> Store {
        Store {
            engine,
            calls: Arc::default(),
            events_kept: EVENTS_KEPT,
        }
    }

    /// Where the state is, for logs and messages: a file, or etcd's endpoints and prefix.
    pub fn location(&self) -> String {
        match &self.engine {
            Engine::Sqlite(sqlite) => sqlite.path().display().to_string(),
            Engine::Etcd(etcd) => etcd.location(),
        }
    }

    /// The calls served so far, by every clone of this handle.
    pub fn calls(&self) -> StoreCalls {
        StoreCalls {
            reads: self.calls.reads.load(Ordering::Relaxed),
            writes: self.calls.writes.load(Ordering::Relaxed),
        }
    }

    /// Changes other processes make, for a store that others write (etcd); None for one only
    /// this process writes (SQLite).
    pub fn changes(&self) -> Option<watch::Receiver<StoreChanges>> {
        match &self.engine {
            Engine::Sqlite(_) => None,
            Engine::Etcd(etcd) => Some(etcd.changes()),
        }
    }

    /// Every service, ordered by id.
    pub fn services(&self) -> Result<Vec<Service>, StoreError> {
        self.count_read();
        match &self.engine {
            Engine::Sqlite(sqlite) => sqlite.services(),
            Engine::Etcd(etcd) => etcd.services(),
        }
    }

    /// Every backend of every service, ordered by id.
    pub fn backends(&self) -> Result<Vec<Backend>, StoreError> {
        self.count_read();
        match &self.engine {
            Engine::Sqlite(sqlite) => sqlite.backends(),
            Engine::Etcd(etcd) => etcd.backends(),
        }
    }

    /// Runs `f` in one transaction and commits; returns only after the commit is durable. On
    /// error nothing is written. `f` may run more than once (see the module's doc).
    pub fn write<T, E: From<StoreError>>(
        &self,
        f: impl FnMut(&mut Tx<'_>) -> Result<T, E>,
    ) -> Result<T, E> {
        self.calls.writes.fetch_add(1, Ordering::Relaxed);
        match &self.engine {
            Engine::Sqlite(sqlite) => sqlite.write(self.events_kept, f),
            Engine::Etcd(etcd) => etcd.write(self.events_kept, f),
        }
    }

    /// Every API key, revoked ones included, ordered by id.
    pub fn api_keys(&self) -> Result<Vec<ApiKeyRecord>, StoreError> {
        self.count_read();
        match &self.engine {
            Engine::Sqlite(sqlite) => sqlite.api_keys(),
            Engine::Etcd(etcd) => etcd.api_keys(),
        }
    }

    /// The key whose secret hashes to `secret_sha256`, revoked or not: the caller decides what a
    /// revoked key gets.
    pub fn api_key_by_hash(
        &self,
        secret_sha256: &[u8; 32],
    ) -> Result<Option<ApiKeyRecord>, StoreError> {
        self.count_read();
        match &self.engine {
            Engine::Sqlite(sqlite) => sqlite.api_key_by_hash(secret_sha256),
            Engine::Etcd(etcd) => etcd.api_key_by_hash(secret_sha256),
        }
    }

    /// Every join token, revoked ones included, ordered by id.
    pub fn join_tokens(&self) -> Result<Vec<JoinTokenRecord>, StoreError> {
        self.count_read();
        match &self.engine {
            Engine::Sqlite(sqlite) => sqlite.join_tokens(),
            Engine::Etcd(etcd) => etcd.join_tokens(),
        }
    }

    /// Every blocked prefix, expired ones included until they are deleted, in prefix order.
    pub fn blocklist(&self) -> Result<Vec<BlockRecord>, StoreError> {
        self.count_read();
        match &self.engine {
            Engine::Sqlite(sqlite) => sqlite.blocklist(),
            Engine::Etcd(etcd) => etcd.blocklist(),
        }
    }

    /// Records last-used times in one transaction (batched by the caller; not an event).
    /// Last use never goes back: an older time than the stored one is ignored.
    pub fn touch_api_keys(&self, used: &[(ApiKeyId, SystemTime)]) -> Result<(), StoreError> {
        if used.is_empty() {
            return Ok(());
        }
        self.calls.writes.fetch_add(1, Ordering::Relaxed);
        match &self.engine {
            Engine::Sqlite(sqlite) => sqlite.touch_api_keys(used),
            Engine::Etcd(etcd) => etcd.touch_api_keys(used),
        }
    }

    /// Events with id > `after` (all when None), oldest first, at most `limit`.
    pub fn events(&self, after: Option<i64>, limit: usize) -> Result<Vec<Event>, StoreError> {
        self.count_read();
        match &self.engine {
            Engine::Sqlite(sqlite) => sqlite.events(after, limit),
            Engine::Etcd(etcd) => etcd.events(after, limit),
        }
    }

    /// The newest `limit` events, oldest first.
    pub fn recent_events(&self, limit: usize) -> Result<Vec<Event>, StoreError> {
        self.count_read();
        match &self.engine {
            Engine::Sqlite(sqlite) => sqlite.recent_events(limit),
            Engine::Etcd(etcd) => etcd.recent_events(limit),
        }
    }

    /// The whole state, for `lb-control store export`.
    pub fn export(&self) -> Result<Snapshot, StoreError> {
        Ok(Snapshot::new(
            self.services()?,
            self.backends()?,
            self.api_keys()?,
            self.join_tokens()?,
            self.blocklist()?,
            self.events(None, usize::MAX)?,
        ))
    }

    /// Loads `snapshot` with its ids, for `lb-control store import`. Refused unless the store is
    /// empty or `replace` is set, in which case what the store held goes first.
    pub fn import(&self, snapshot: &Snapshot, replace: bool) -> Result<(), StoreError> {
        if !replace && !self.is_empty()? {
            return Err(StoreError::NotEmpty {
                location: self.location(),
            });
        }
        self.calls.writes.fetch_add(1, Ordering::Relaxed);
        match &self.engine {
            Engine::Sqlite(sqlite) => sqlite.restore(snapshot),
            Engine::Etcd(etcd) => etcd.restore(snapshot),
        }
    }

    fn is_empty(&self) -> Result<bool, StoreError> {
        Ok(self.services()?.is_empty()
            && self.backends()?.is_empty()
            && self.api_keys()?.is_empty()
            && self.join_tokens()?.is_empty()
            && self.blocklist()?.is_empty()
            && self.events(None, 1)?.is_empty())
    }

    fn count_read(&self) {
        self.calls.reads.fetch_add(1, Ordering::Relaxed);
    }
}

/// The SQLite store's file in the state directory.
pub fn sqlite_path(state_dir: &Path) -> PathBuf {
    state_dir.join("state.db")
}

/// One open write transaction; see [`Store::write`].
pub struct Tx<'a>(TxEngine<'a>);

enum TxEngine<'a> {
    Sqlite(SqliteTx<'a>),
    Etcd(&'a mut EtcdTx),
}

impl Tx<'_> {
    /// Every service as this transaction sees it, ordered by id.
    pub fn services(&mut self) -> Result<Vec<Service>, StoreError> {
        match &mut self.0 {
            TxEngine::Sqlite(tx) => tx.services(),
            TxEngine::Etcd(tx) => tx.services(),
        }
    }

    /// Every backend as this transaction sees it, ordered by id.
    pub fn backends(&mut self) -> Result<Vec<Backend>, StoreError> {
        match &mut self.0 {
            TxEngine::Sqlite(tx) => tx.backends(),
            TxEngine::Etcd(tx) => tx.backends(),
        }
    }

    pub fn insert_service(
        &mut self,
        def: &ServiceDef,
        origin: Origin,
    ) -> Result<ServiceId, StoreError> {
        match &mut self.0 {
            TxEngine::Sqlite(tx) => tx.insert_service(def, origin),
            TxEngine::Etcd(tx) => tx.insert_service(def, origin),
        }
    }

    /// Replaces the definition of service `id`; false if there is none. The origin stays.
    pub fn update_service(&mut self, id: ServiceId, def: &ServiceDef) -> Result<bool, StoreError> {
        match &mut self.0 {
            TxEngine::Sqlite(tx) => tx.update_service(id, def),
            TxEngine::Etcd(tx) => tx.update_service(id, def),
        }
    }

    /// Deletes service `id` and its backends; false if there is none.
    pub fn delete_service(&mut self, id: ServiceId) -> Result<bool, StoreError> {
        match &mut self.0 {
            TxEngine::Sqlite(tx) => tx.delete_service(id),
            TxEngine::Etcd(tx) => tx.delete_service(id),
        }
    }

    /// Adds a backend to `service`, which must exist (else [`StoreError::NotFound`]).
    pub fn insert_backend(
        &mut self,
        service: ServiceId,
        def: &BackendDef,
        origin: Origin,
    ) -> Result<BackendId, StoreError> {
        match &mut self.0 {
            TxEngine::Sqlite(tx) => tx.insert_backend(service, def, origin),
            TxEngine::Etcd(tx) => tx.insert_backend(service, def, origin),
        }
    }

    /// Replaces the definition of backend `id`; false if there is none. Its service and origin
    /// stay.
    pub fn update_backend(&mut self, id: BackendId, def: &BackendDef) -> Result<bool, StoreError> {
        match &mut self.0 {
            TxEngine::Sqlite(tx) => tx.update_backend(id, def),
            TxEngine::Etcd(tx) => tx.update_backend(id, def),
        }
    }

    pub fn delete_backend(&mut self, id: BackendId) -> Result<bool, StoreError> {
        match &mut self.0 {
            TxEngine::Sqlite(tx) => tx.delete_backend(id),
            TxEngine::Etcd(tx) => tx.delete_backend(id),
        }
    }

    /// Adds a key; its name and its secret must both be new.
    pub fn insert_api_key(
        &mut self,
        name: &str,
        secret_sha256: &[u8; 32],
        rate_limit: Option<RateLimit>,
        created: SystemTime,
    ) -> Result<ApiKeyId, StoreError> {
        match &mut self.0 {
            TxEngine::Sqlite(tx) => tx.insert_api_key(name, secret_sha256, rate_limit, created),
            TxEngine::Etcd(tx) => tx.insert_api_key(name, secret_sha256, rate_limit, created),
        }
    }

    /// Revokes key `id` as of `at`; false if there is no such key or it is already revoked (the
    /// first revocation time stays).
    pub fn revoke_api_key(&mut self, id: ApiKeyId, at: SystemTime) -> Result<bool, StoreError> {
        match &mut self.0 {
            TxEngine::Sqlite(tx) => tx.revoke_api_key(id, at),
            TxEngine::Etcd(tx) => tx.revoke_api_key(id, at),
        }
    }

    /// Sets key `id`'s rate limit (None: unlimited); false if there is no such key.
    pub fn set_api_key_limit(
        &mut self,
        id: ApiKeyId,
        rate_limit: Option<RateLimit>,
    ) -> Result<bool, StoreError> {
        match &mut self.0 {
            TxEngine::Sqlite(tx) => tx.set_api_key_limit(id, rate_limit),
            TxEngine::Etcd(tx) => tx.set_api_key_limit(id, rate_limit),
        }
    }

    /// Sets key `id`'s WebSocket caps; false if there is no such key.
    pub fn set_api_key_caps(&mut self, id: ApiKeyId, caps: KeyCaps) -> Result<bool, StoreError> {
        match &mut self.0 {
            TxEngine::Sqlite(tx) => tx.set_api_key_caps(id, caps),
            TxEngine::Etcd(tx) => tx.set_api_key_caps(id, caps),
        }
    }

    /// Adds a join token; its name and its secret must both be new among join tokens.
    pub fn insert_join_token(
        &mut self,
        name: &str,
        secret_sha256: &[u8; 32],
        services: &[ServiceKey],
        created: SystemTime,
    ) -> Result<JoinTokenId, StoreError> {
        match &mut self.0 {
            TxEngine::Sqlite(tx) => tx.insert_join_token(name, secret_sha256, services, created),
            TxEngine::Etcd(tx) => tx.insert_join_token(name, secret_sha256, services, created),
        }
    }

    /// Revokes join token `id` as of `at`; false if there is no such token or it is already
    /// revoked (the first revocation time stays).
    pub fn revoke_join_token(
        &mut self,
        id: JoinTokenId,
        at: SystemTime,
    ) -> Result<bool, StoreError> {
        match &mut self.0 {
            TxEngine::Sqlite(tx) => tx.revoke_join_token(id, at),
            TxEngine::Etcd(tx) => tx.revoke_join_token(id, at),
        }
    }

    /// Every blocked prefix as this transaction sees it, in prefix order.
    pub fn blocklist(&mut self) -> Result<Vec<BlockRecord>, StoreError> {
        match &mut self.0 {
            TxEngine::Sqlite(tx) => tx.blocklist(),
            TxEngine::Etcd(tx) => tx.blocklist(),
        }
    }

    /// Blocks `record.prefix` (without host bits), replacing what a record of that prefix held.
    pub fn put_block(&mut self, record: &BlockRecord) -> Result<(), StoreError> {
        let record = BlockRecord {
            prefix: record.prefix.trunc(),
            ..record.clone()
        };
        match &mut self.0 {
            TxEngine::Sqlite(tx) => tx.put_block(&record),
            TxEngine::Etcd(tx) => tx.put_block(&record),
        }
    }

    /// Deletes the record of exactly `prefix` (host bits ignored): the record as it was, None
    /// when there was none.
    pub fn delete_block(&mut self, prefix: IpNet) -> Result<Option<BlockRecord>, StoreError> {
        match &mut self.0 {
            TxEngine::Sqlite(tx) => tx.delete_block(prefix.trunc()),
            TxEngine::Etcd(tx) => tx.delete_block(prefix.trunc()),
        }
    }

    /// Appends an event stamped now and returns its id; the oldest events beyond the cap go.
    pub fn record_event(
        &mut self,
        kind: &str,
        subject: &str,
        detail: &str,
    ) -> Result<i64, StoreError> {
        match &mut self.0 {
            TxEngine::Sqlite(tx) => tx.record_event(kind, subject, detail),
            TxEngine::Etcd(tx) => tx.record_event(kind, subject, detail),
        }
    }
}
