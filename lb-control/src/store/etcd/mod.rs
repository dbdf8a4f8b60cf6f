//! The etcd engine: the state shared by every lb-control of a cluster.
//!
//! Keys under the configured prefix `P` (ids zero-padded, so key order is id order):
//!
//! ```text
//! P/services/<id>   a service (JSON)        P/keys/<id>       an API key, without last use
//! P/backends/<id>   a backend (JSON)        P/key-used/<id>   its last use (ms), apart
//! P/events/<id>     an event (JSON)         P/ids             the last id of each kind
//! P/join-tokens/<id>  a join token (JSON)   P/blocklist/<prefix>  a blocked prefix (JSON),
//!                                             e.g. P/blocklist/203.0.113.0/24
//! ```
//!
//! A write is optimistic and serializable: its transaction reads at one revision, and commits
//! in one etcd Txn only if `P/ids` was not modified since (every write rewrites `P/ids`, which
//! also hands out the ids, so two lb-controls never issue the same one). If another
//! lb-control wrote meanwhile, the write runs again on the new state, a few times at most.
//! Within one process writes take turns, so only another process can make one run again.
//!
//! Requests go with etcd's "require leader" flag: a member cut off from the quorum refuses at
//! once instead of hanging, and the error says so ([`EtcdError::is_unavailable`]). Reads then
//! fall back to the member's own copy (a serializable read): the last state it has.
//!
//! When one of the endpoints is a member on this host (its address is one of the host's), the
//! leader-requiring requests go to it first, and to the others only while it is down. The
//! balanced client spreads requests over every member, and one it sends to a member that was
//! cut off (an HA pair's other host, its links down) hangs until the request timeout, as do the
//! next ones until keep-alive gives that connection up: writes came back ~4 s after a cut.
//! This host's member answers as soon as the majority has a leader again (an election).
//!
//! The client is async (tonic); the store's interface blocks like SQLite's. The store runs
//! its own small runtime, so a call can block from any thread, async worker or not.

mod tx;
mod watch;

use std::{
    collections::BTreeMap,
    future::Future,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime},
};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, Identity,
    KeyValue, SortOrder, SortTarget, TlsOptions, Txn, TxnOp,
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio::sync::watch as tokio_watch;

use super::{
    StoreChanges, StoreError, Tx, TxEngine,
    record::{BlocklistEntry, EventEntry, KeyEntry, TokenEntry, unix_ms},
    settings::{EtcdSettings, UnreadableFile},
    snapshot::Snapshot,
};
use crate::model::{ApiKeyId, ApiKeyRecord, Backend, BlockRecord, Event, JoinTokenRecord, Service};
pub(super) use tx::EtcdTx;

/// How long one request may take. A member without a leader refuses at once; this bounds a
/// member that does not answer at all.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a write runs again after losing a race with another lb-control.
const WRITE_ATTEMPTS: usize = 16;
/// Records per Txn when importing: below etcd's default `--max-txn-ops` (128).
const IMPORT_BATCH: usize = 100;

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error(
        "etcd ({endpoints}) is unavailable: {detail}; no majority of its members answers, so \
         nothing can be written: lb-control keeps serving its last state, and writes work \
         again once a majority is back"
    )]
    Unavailable { endpoints: String, detail: String },
    #[error("etcd ({endpoints}): {detail}")]
    Refused { endpoints: String, detail: String },
    #[error(transparent)]
    File(#[from] UnreadableFile),
    #[error("etcd client: cannot start its runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error(
        "etcd ({endpoints}): {WRITE_ATTEMPTS} attempts of a write each raced another \
         lb-control's; try again"
    )]
    Contended { endpoints: String },
}

impl EtcdError {
    pub fn is_unavailable(&self) -> bool {
        matches!(self, EtcdError::Unavailable { .. })
    }
}

/// The kinds of record, each under its own directory of the prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    Services,
    Backends,
    Keys,
    KeyUsed,
    JoinTokens,
    Blocklist,
    Events,
}

impl Dir {
    fn name(self) -> &'static str {
        match self {
            Dir::Services => "services",
            Dir::Backends => "backends",
            Dir::Keys => "keys",
            Dir::KeyUsed => "key-used",
            Dir::JoinTokens => "join-tokens",
            Dir::Blocklist => "blocklist",
            Dir::Events => "events",
        }
    }
}

/// Where each record lives under the prefix.
#[derive(Debug, Clone)]
struct Layout {
    /// Ends with `/`.
    prefix: String,
}

impl Layout {
    fn dir(&self, dir: Dir) -> String {
        format!("{}{}/", self.prefix, dir.name())
    }

    fn key(&self, dir: Dir, id: i64) -> String {
        format!("{}{}/{id:020}", self.prefix, dir.name())
    }

    /// A record keyed by name rather than id (a blocked prefix).
    fn named_key(&self, dir: Dir, name: &str) -> String {
        format!("{}{}/{name}", self.prefix, dir.name())
    }

    fn ids(&self) -> String {
        format!("{}ids", self.prefix)
    }

    /// The directory a key of this layout is in.
    fn dir_of(&self, key: &[u8]) -> Option<Dir> {
        let rest = key.strip_prefix(self.prefix.as_bytes())?;
        [
            Dir::Services,
            Dir::Backends,
            Dir::Keys,
            Dir::KeyUsed,
            Dir::JoinTokens,
            Dir::Blocklist,
            Dir::Events,
        ]
        .into_iter()
        .find(|dir| {
            rest.strip_prefix(dir.name().as_bytes())
                .is_some_and(|tail| tail.starts_with(b"/"))
        })
    }
}

/// The last id issued of each kind; the value of `P/ids`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct Ids {
    services: i64,
    backends: i64,
    api_keys: i64,
    /// Absent before join tokens existed.
    #[serde(default)]
    join_tokens: i64,
    events: i64,
}

/// A handle on the etcd store; clones share the connection and the watch.
#[derive(Clone)]
pub(super) struct EtcdStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// Dropped (in the background) with the last handle; the watch task goes with it.
    runtime: Option<tokio::runtime::Runtime>,
    /// Requires a leader: writes and linearizable reads.
    client: Client,
    /// The same through this host's own member, when it is one of the endpoints: tried first.
    own: Option<Client>,
    /// Does not: reads of a member's own copy when no quorum answers, and the watch, which
    /// stays open through a quorum loss and goes on once the majority is back.
    local: Client,
    layout: Layout,
    /// The endpoints, comma-separated, for messages.
    endpoints: String,
    /// How many endpoints there are.
    members: usize,
    changes: Arc<tokio_watch::Sender<StoreChanges>>,
    /// One write at a time from this process: its writes never race each other.
    writing: Mutex<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            // A plain drop would block, and panic when the last handle goes on an async worker.
            runtime.shutdown_background();
        }
    }
}

impl EtcdStore {
    pub(super) fn open(settings: &EtcdSettings) -> Result<EtcdStore, StoreError> {
        let endpoints = settings.endpoints.join(",");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("etcd-client")
            .enable_all()
            .build()
            .map_err(EtcdError::Runtime)?;
        let options = connect_options(settings).map_err(EtcdError::from)?;
        let layout = Layout {
            prefix: settings.normalized_prefix(),
        };
        let own_url = settings
            .endpoints
            .iter()
            .find(|url| is_on_this_host(url))
            .cloned();
        if let Some(url) = &own_url {
            tracing::info!("etcd: requests go to this host's member {url} first");
        }
        let (client, own, local, revision) = wait_for(&runtime, {
            let endpoints = endpoints.clone();
            let urls = settings.endpoints.clone();
            let ids = layout.ids();
            let own_url = own_url.clone();
            async move {
                let unreachable = |error| classify(&endpoints, error);
                let mut client = Client::connect(&urls, Some(options.clone()))
                    .await
                    .map_err(unreachable)?;
                let own = match own_url {
                    Some(url) => Some(
                        Client::connect([url], Some(options.clone()))
                            .await
                            .map_err(unreachable)?,
                    ),
                    None => None,
                };
                let local = Client::connect(&urls, Some(options.with_require_leader(false)))
                    .await
                    .map_err(unreachable)?;
                // Connecting is lazy: this read is what proves a quorum answers.
                let response = client.get(ids, None).await.map_err(unreachable)?;
                Ok::<_, EtcdError>((client, own, local, header_revision(response.header())))
            }
        })
        .unwrap_or_else(|| {
            Err(EtcdError::Unavailable {
                endpoints: endpoints.clone(),
                detail: "the client's runtime stopped".to_owned(),
            })
        })?;
        let changes = Arc::new(tokio_watch::Sender::new(StoreChanges::default()));
        runtime.spawn(watch::follow(
            local.clone(),
            layout.clone(),
            endpoints.clone(),
            revision,
            changes.clone(),
        ));
        Ok(EtcdStore {
            inner: Arc::new(Inner {
                runtime: Some(runtime),
                client,
                own,
                local,
                layout,
                endpoints,
                members: settings.endpoints.len(),
                changes,
                writing: Mutex::new(()),
            }),
        })
    }

    pub(super) fn location(&self) -> String {
        format!(
            "etcd {} prefix {}",
            self.inner.endpoints, self.inner.layout.prefix
        )
    }

    pub(super) fn changes(&self) -> tokio_watch::Receiver<StoreChanges> {
        self.inner.changes.subscribe()
    }

    /// Runs `request`, which needs a leader: on this host's member, or while that is down on
    /// the others ([`EtcdStore::run_on`]).
    fn run<T: Send + 'static, F>(&self, request: impl Fn(Client) -> F) -> Result<T, EtcdError>
    where
        F: Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
    {
        if let Some(own) = &self.inner.own {
            match self.send(own, &request)? {
                // It never left, so the others may take it.
                Err(error) if never_sent(&error) => {}
                result => return result.map_err(|error| classify(&self.inner.endpoints, error)),
            }
        }
        self.run_on(&self.inner.client, request)
    }

    /// Runs `request` with `client` on the store's runtime and waits for it, from any thread.
    /// A request that could not reach a member (the balancer picked one that is down) is made
    /// again, each member getting a turn: it never left, so sending it again is safe.
    fn run_on<T: Send + 'static, F>(
        &self,
        client: &Client,
        request: impl Fn(Client) -> F,
    ) -> Result<T, EtcdError>
    where
        F: Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
    {
        let mut turns = 2 * self.inner.members;
        loop {
            match self.send(client, &request)? {
                Err(error) if never_sent(&error) && turns > 1 => turns -= 1,
                result => return result.map_err(|error| classify(&self.inner.endpoints, error)),
            }
        }
    }

    /// One try of `request` with `client`, waited for.
    fn send<T: Send + 'static, F>(
        &self,
        client: &Client,
        request: &impl Fn(Client) -> F,
    ) -> Result<Result<T, etcd_client::Error>, EtcdError>
    where
        F: Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
    {
        let runtime = self.inner.runtime.as_ref().expect("held until the drop");
        wait_for(runtime, request(client.clone())).ok_or_else(|| EtcdError::Unavailable {
            endpoints: self.inner.endpoints.clone(),
            detail: "the client's runtime stopped".to_owned(),
        })
    }

    /// A range of keys: linearizable, or when no quorum answers, this member's own copy.
    fn range(&self, key: String, options: GetOptions) -> Result<(Vec<KeyValue>, i64), EtcdError> {
        let linearizable = self.run(|mut client| {
            let (key, options) = (key.clone(), options.clone());
            async move {
                let mut response = client.get(key, Some(options)).await?;
                Ok((header_revision(response.header()), response.take_kvs()))
            }
        });
        match linearizable {
            Ok((revision, kvs)) => Ok((kvs, revision)),
            Err(error) if error.is_unavailable() => {
                // The balancer may first pick a member that is down: each member gets a turn.
                for _ in 0..2 * self.inner.members {
                    let local = self.run_on(&self.inner.local, |mut client| {
                        let key = key.clone();
                        let options = options.clone().with_serializable();
                        async move {
                            let mut response = client.get(key, Some(options)).await?;
                            Ok((header_revision(response.header()), response.take_kvs()))
                        }
                    });
                    if let Ok((revision, kvs)) = local {
                        return Ok((kvs, revision));
                    }
                }
                // No member answers at all: the first error says more.
                Err(error)
            }
            Err(error) => Err(error),
        }
    }

    fn list<T: DeserializeOwned>(&self, dir: Dir) -> Result<Vec<T>, StoreError> {
        let (kvs, _) = self.range(self.inner.layout.dir(dir), GetOptions::new().with_prefix())?;
        kvs.iter().map(|kv| self.decode(kv)).collect()
    }

    fn decode<T: DeserializeOwned>(&self, kv: &KeyValue) -> Result<T, StoreError> {
        decode(&self.inner.endpoints, kv)
    }

    pub(super) fn services(&self) -> Result<Vec<Service>, StoreError> {
        self.list(Dir::Services)
    }

    pub(super) fn backends(&self) -> Result<Vec<Backend>, StoreError> {
        self.list(Dir::Backends)
    }

    pub(super) fn api_keys(&self) -> Result<Vec<ApiKeyRecord>, StoreError> {
        let layout = &self.inner.layout;
        let (kvs, revision) = self.range(layout.dir(Dir::Keys), GetOptions::new().with_prefix())?;
        // Last use at the same revision, so the two reads are one state.
        let (used, _) = self.range(
            layout.dir(Dir::KeyUsed),
            GetOptions::new().with_prefix().with_revision(revision),
        )?;
        let used: BTreeMap<ApiKeyId, i64> = used
            .iter()
            .map(|kv| Ok((id_of(&self.inner.endpoints, kv)?, self.decode(kv)?)))
            .collect::<Result<_, StoreError>>()?;
        kvs.iter()
            .map(|kv| {
                let mut entry: KeyEntry = self.decode(kv)?;
                entry.last_used_ms = used.get(&entry.id).copied();
                entry
                    .to_record()
                    .map_err(|problem| corrupt(&self.inner.endpoints, kv, &problem))
            })
            .collect()
    }

    pub(super) fn join_tokens(&self) -> Result<Vec<JoinTokenRecord>, StoreError> {
        let (kvs, _) = self.range(
            self.inner.layout.dir(Dir::JoinTokens),
            GetOptions::new().with_prefix(),
        )?;
        kvs.iter()
            .map(|kv| {
                let entry: TokenEntry = self.decode(kv)?;
                entry
                    .to_record()
                    .map_err(|problem| corrupt(&self.inner.endpoints, kv, &problem))
            })
            .collect()
    }

    pub(super) fn blocklist(&self) -> Result<Vec<BlockRecord>, StoreError> {
        let (kvs, _) = self.range(
            self.inner.layout.dir(Dir::Blocklist),
            GetOptions::new().with_prefix(),
        )?;
        decode_blocklist(&self.inner.endpoints, &kvs)
    }

    pub(super) fn api_key_by_hash(
        &self,
        secret_sha256: &[u8; 32],
    ) -> Result<Option<ApiKeyRecord>, StoreError> {
        Ok(self
            .api_keys()?
            .into_iter()
            .find(|key| key.secret_sha256 == *secret_sha256))
    }

    /// One Txn for the whole batch: each key's last use is compared on its revision and
    /// rewritten only if the batch moves it forward; a race with another lb-control's batch
    /// reads again.
    pub(super) fn touch_api_keys(&self, used: &[(ApiKeyId, SystemTime)]) -> Result<(), StoreError> {
        let layout = &self.inner.layout;
        for attempt in 0..WRITE_ATTEMPTS {
            let (kvs, _) = self.range(layout.dir(Dir::KeyUsed), GetOptions::new().with_prefix())?;
            let mut stored: BTreeMap<ApiKeyId, (i64, i64)> = BTreeMap::new();
            for kv in &kvs {
                let id = id_of(&self.inner.endpoints, kv)?;
                stored.insert(id, (self.decode(kv)?, kv.mod_revision()));
            }
            let mut latest: BTreeMap<ApiKeyId, i64> = BTreeMap::new();
            for &(id, at) in used {
                let at = unix_ms(at);
                let slot = latest.entry(id).or_insert(at);
                *slot = (*slot).max(at);
            }
            let mut compares = Vec::new();
            let mut puts = Vec::new();
            for (id, at) in latest {
                let (before, revision) = stored.get(&id).copied().unwrap_or((i64::MIN, 0));
                if at > before {
                    let key = layout.key(Dir::KeyUsed, id);
                    compares.push(Compare::mod_revision(
                        key.clone(),
                        CompareOp::Equal,
                        revision,
                    ));
                    puts.push(TxnOp::put(key, at.to_string(), None));
                }
            }
            if puts.is_empty() {
                return Ok(());
            }
            if self
                .commit(Txn::new().when(compares).and_then(puts))?
                .is_some()
            {
                return Ok(());
            }
            back_off(attempt);
        }
        Err(self.contended().into())
    }

    pub(super) fn events(
        &self,
        after: Option<i64>,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        let layout = &self.inner.layout;
        let from = layout.key(
            Dir::Events,
            after.map_or(0, |id| id.saturating_add(1)).max(0),
        );
        let options = GetOptions::new()
            .with_range(range_end(&layout.dir(Dir::Events)))
            .with_limit(etcd_limit(limit));
        let (kvs, _) = self.range(from, options)?;
        self.decode_events(&kvs)
    }

    pub(super) fn recent_events(&self, limit: usize) -> Result<Vec<Event>, StoreError> {
        let options = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Key, SortOrder::Descend)
            .with_limit(etcd_limit(limit));
        let (mut kvs, _) = self.range(self.inner.layout.dir(Dir::Events), options)?;
        kvs.reverse();
        self.decode_events(&kvs)
    }

    fn decode_events(&self, kvs: &[KeyValue]) -> Result<Vec<Event>, StoreError> {
        kvs.iter()
            .map(|kv| {
                let entry: EventEntry = self.decode(kv)?;
                entry
                    .to_event()
                    .map_err(|problem| corrupt(&self.inner.endpoints, kv, &problem))
            })
            .collect()
    }

    /// Runs `f` in an [`EtcdTx`] until it commits without a race, [`WRITE_ATTEMPTS`] at most.
    pub(super) fn write<T, E: From<StoreError>>(
        &self,
        events_kept: i64,
        mut f: impl FnMut(&mut Tx<'_>) -> Result<T, E>,
    ) -> Result<T, E> {
        let _writing = self
            .inner
            .writing
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for attempt in 0..WRITE_ATTEMPTS {
            let mut etcd_tx = EtcdTx::begin(self.clone(), events_kept)?;
            let value = f(&mut Tx(TxEngine::Etcd(&mut etcd_tx)))?;
            if etcd_tx.commit()? {
                return Ok(value);
            }
            back_off(attempt);
        }
        Err(StoreError::from(self.contended()).into())
    }

    /// Replaces everything under the prefix with `snapshot`, ids included: the old state and
    /// `P/ids` first, in one Txn, then the records in batches.
    pub(super) fn restore(&self, snapshot: &Snapshot) -> Result<(), StoreError> {
        let layout = &self.inner.layout;
        let last = |ids: &mut dyn Iterator<Item = i64>| ids.max().unwrap_or(0);
        let ids = Ids {
            services: last(&mut snapshot.services.iter().map(|s| s.id)),
            backends: last(&mut snapshot.backends.iter().map(|b| b.id)),
            api_keys: last(&mut snapshot.api_keys.iter().map(|k| k.id)),
            join_tokens: last(&mut snapshot.join_tokens.iter().map(|t| t.id)),
            events: last(&mut snapshot.events.iter().map(|e| e.id)),
        };
        let wipe = [TxnOp::delete(
            layout.prefix.clone(),
            Some(DeleteOptions::new().with_prefix()),
        )];
        self.commit(Txn::new().and_then(wipe))?;
        let mut puts = vec![TxnOp::put(layout.ids(), encode(&ids), None)];
        for service in &snapshot.services {
            puts.push(TxnOp::put(
                layout.key(Dir::Services, service.id),
                encode(service),
                None,
            ));
        }
        for backend in &snapshot.backends {
            puts.push(TxnOp::put(
                layout.key(Dir::Backends, backend.id),
                encode(backend),
                None,
            ));
        }
        for key in &snapshot.api_keys {
            let mut entry = key.clone();
            if let Some(at) = entry.last_used_ms.take() {
                puts.push(TxnOp::put(
                    layout.key(Dir::KeyUsed, key.id),
                    at.to_string(),
                    None,
                ));
            }
            puts.push(TxnOp::put(
                layout.key(Dir::Keys, key.id),
                encode(&entry),
                None,
            ));
        }
        for token in &snapshot.join_tokens {
            puts.push(TxnOp::put(
                layout.key(Dir::JoinTokens, token.id),
                encode(token),
                None,
            ));
        }
        for entry in &snapshot.blocklist {
            puts.push(TxnOp::put(
                layout.named_key(Dir::Blocklist, &entry.prefix.to_string()),
                encode(entry),
                None,
            ));
        }
        for event in &snapshot.events {
            puts.push(TxnOp::put(
                layout.key(Dir::Events, event.id),
                encode(event),
                None,
            ));
        }
        let mut puts = puts.into_iter().peekable();
        while puts.peek().is_some() {
            let batch: Vec<TxnOp> = puts.by_ref().take(IMPORT_BATCH).collect();
            self.commit(Txn::new().and_then(batch))?;
        }
        Ok(())
    }

    /// Sends `txn`; Some(revision) if it committed, None if a compare failed (a race).
    fn commit(&self, txn: Txn) -> Result<Option<i64>, EtcdError> {
        self.run(|mut client| {
            let txn = txn.clone();
            async move {
                let response = client.txn(txn).await?;
                Ok(response
                    .succeeded()
                    .then(|| header_revision(response.header())))
            }
        })
    }

    fn contended(&self) -> EtcdError {
        EtcdError::Contended {
            endpoints: self.inner.endpoints.clone(),
        }
    }
}

/// After a lost race: a random pause growing with the attempt, so two lb-controls that keep
/// colliding fall out of step.
fn back_off(attempt: usize) {
    let most = 5 * (attempt as u64 + 1);
    std::thread::sleep(Duration::from_millis(rand::random_range(0..=most)));
}

/// Runs `future` on `runtime` and blocks this thread until it is done; None if the runtime
/// dropped it. Unlike `Runtime::block_on`, this works from any thread, an async worker of
/// another runtime included (the daemon opens the store from one).
fn wait_for<T: Send + 'static>(
    runtime: &tokio::runtime::Runtime,
    future: impl Future<Output = T> + Send + 'static,
) -> Option<T> {
    let (done, result) = std::sync::mpsc::sync_channel(1);
    runtime.spawn(async move {
        let _ = done.send(future.await);
    });
    result.recv().ok()
}

/// Whether the member at `url` (`http://10.0.0.1:2379`, `https://[fd00::1]:2379`,
/// `http://localhost:2379`) listens on an address of this host: one a socket can bind. A name
/// other than `localhost` is not looked up.
fn is_on_this_host(url: &str) -> bool {
    let Ok(uri) = url.parse::<hyper::Uri>() else {
        return false;
    };
    // An IPv6 host comes in its brackets.
    let host = uri.host().unwrap_or_default();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let address = if host.eq_ignore_ascii_case("localhost") {
        std::net::IpAddr::from(std::net::Ipv4Addr::LOCALHOST)
    } else {
        match host.parse() {
            Ok(address) => address,
            Err(_) => return false,
        }
    };
    std::net::UdpSocket::bind((address, 0)).is_ok()
}

fn connect_options(settings: &EtcdSettings) -> Result<ConnectOptions, UnreadableFile> {
    let secrets = settings.read_files()?;
    let mut options = ConnectOptions::new()
        .with_timeout(REQUEST_TIMEOUT)
        .with_connect_timeout(CONNECT_TIMEOUT)
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
        .with_require_leader(true);
    if let Some(ca) = secrets.ca {
        let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(ca));
        if let Some((cert, key)) = secrets.identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        options = options.with_tls(tls);
    }
    if let (Some(user), Some(password)) = (&settings.user, secrets.password) {
        options = options.with_user(user, password);
    }
    Ok(options)
}

/// Whether `error` says the request found no connection to a member (tonic's "tcp connect
/// error" when the balancer picked a member that is down), so it reached no member.
fn never_sent(error: &etcd_client::Error) -> bool {
    match error {
        etcd_client::Error::TransportError(_) => true,
        etcd_client::Error::GRpcStatus(status) => {
            status.code() == tonic::Code::Unavailable && status.message().contains("connect")
        }
        _ => false,
    }
}

/// Unavailable (no quorum, no member reachable, too slow) or refused (anything else, e.g. a
/// wrong password or a Txn above the cluster's `--max-txn-ops`).
fn classify(endpoints: &str, error: etcd_client::Error) -> EtcdError {
    use tonic::Code;
    let endpoints = endpoints.to_owned();
    match error {
        etcd_client::Error::GRpcStatus(status)
            if matches!(
                status.code(),
                Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
            ) =>
        {
            EtcdError::Unavailable {
                endpoints,
                detail: status.message().to_owned(),
            }
        }
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => {
            EtcdError::Unavailable {
                endpoints,
                detail: error.to_string(),
            }
        }
        etcd_client::Error::GRpcStatus(status) => {
            let mut detail = status.message().to_owned();
            if detail.contains("too many operations in txn request") {
                detail.push_str(
                    "; start the members with a larger --max-txn-ops (e.g. 4096): a change of \
                     many backends, or a last-used batch of many keys, is one Txn",
                );
            }
            EtcdError::Refused { endpoints, detail }
        }
        other => EtcdError::Refused {
            endpoints,
            detail: other.to_string(),
        },
    }
}

fn header_revision(header: Option<&etcd_client::ResponseHeader>) -> i64 {
    header.map_or(0, etcd_client::ResponseHeader::revision)
}

fn encode(value: &impl Serialize) -> Vec<u8> {
    serde_json::to_vec(value).expect("records serialize")
}

fn decode<T: DeserializeOwned>(endpoints: &str, kv: &KeyValue) -> Result<T, StoreError> {
    serde_json::from_slice(kv.value()).map_err(|error| corrupt(endpoints, kv, &error.to_string()))
}

/// Blocklist records as stored under `P/blocklist/`, in prefix order.
fn decode_blocklist(endpoints: &str, kvs: &[KeyValue]) -> Result<Vec<BlockRecord>, StoreError> {
    let mut records = kvs
        .iter()
        .map(|kv| {
            let entry: BlocklistEntry = decode(endpoints, kv)?;
            entry
                .to_record()
                .map_err(|problem| corrupt(endpoints, kv, &problem))
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    records.sort_by_key(|record| record.prefix);
    Ok(records)
}

fn id_of(endpoints: &str, kv: &KeyValue) -> Result<i64, StoreError> {
    let key = String::from_utf8_lossy(kv.key());
    key.rsplit('/')
        .next()
        .and_then(|id| id.parse().ok())
        .ok_or_else(|| corrupt(endpoints, kv, "the key does not end in an id"))
}

fn corrupt(endpoints: &str, kv: &KeyValue, problem: &str) -> StoreError {
    StoreError::Corrupt {
        what: format!(
            "etcd ({endpoints}): key {}: {problem}; repair it with etcdctl or import a backup",
            String::from_utf8_lossy(kv.key())
        ),
    }
}

/// The first key after every key starting with `prefix`.
fn range_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    // Prefixes here end with '/', never 0xff, so incrementing the last byte is enough.
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    end
}

/// etcd's limit is an i64, 0 meaning no limit.
fn etcd_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::is_on_this_host;

    #[test]
    fn a_member_is_on_this_host_when_its_address_is_one_of_the_hosts() {
        assert!(is_on_this_host("http://127.0.0.1:2379"));
        assert!(is_on_this_host("https://localhost:2379"));
        assert!(is_on_this_host("http://127.0.0.1"));
        assert!(is_on_this_host("http://[::1]:2379"));
        // TEST-NET-1: on no host.
        assert!(!is_on_this_host("http://192.0.2.1:2379"));
        assert!(!is_on_this_host("https://[2001:db8::1]:2379"));
        // Names are not looked up.
        assert!(!is_on_this_host("http://etcd.example:2379"));
    }
}
