//! The source blocklist: prefixes whose packets XDP drops before any other work, kept in the
//! state store, with this host's kernel map following the store.
//!
//! Stored, a block holds across a restart that lost the pinned maps (a reboot) and, on etcd,
//! on both hosts of an HA pair: each host's kernel map follows the store
//! ([`StoredBlocklist::follow_store`]) at start, after every change made here, and on every
//! change the etcd watch reports (the daemon's `follow_shared_blocklist`).
//!
//! - **An operator's block or unblock** (admin API, `lb-control block`) is written to the store
//!   first, with its event, and answered once committed and in this host's kernel. A store
//!   that takes no writes (etcd without quorum) refuses it, naming etcd.
//! - **A block after repeated gateway auth failures** goes into this host's kernel at once
//!   (serving never waits for the store), then to the store: the blocks queued meanwhile go in
//!   one transaction. That is bounded without more: a block takes `after` failures of one
//!   client within `within`, and a blocked client's packets no longer reach the gateway, so a
//!   crowd of guessers costs at most one write per guessing client, batched; the failures
//!   themselves are never written. A block the store refuses stays *unrecorded*, in memory and
//!   in this host's kernel, and is written again once a second until the store takes it or it
//!   expires; meanwhile the other host of a pair does not have it, and a restart of lb-control
//!   forgets it (the store, which it follows at start, does not have it).
//! - **Expiry**: each host removes expired entries from its own kernel every second (a block
//!   never outlives its `until` for want of a store); only a master, or a standalone
//!   lb-control, deletes them from the store: a backup writes nothing its master writes.
//! - **The first start that stores the blocklist** adopts what the pinned maps hold from an
//!   lb-control that kept its blocklist in the kernel only (an upgrade hands the maps over):
//!   entries the store lacks are stored (source `adopted`) rather than removed. A file in the
//!   state directory ([`ADOPTED_MARKER`]) says this host did it; from then on the kernel holds
//!   what the store holds, and entries the store lacks are removed.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::{Instant, SystemTime},
};

use ipnet::IpNet;
use tracing::{error, info, warn};

use crate::{
    dataplane::{
        BlockEntry, BlocklistChanges, BlocklistHandle, DataplaneError, round_up_to_second,
    },
    model::{BlockRecord, BlockSource},
    store::{Store, StoreError, Tx},
};

/// In the state directory: present once this host's kernel blocklist was adopted into the store.
pub const ADOPTED_MARKER: &str = "blocklist-in-store";

#[derive(Debug, thiserror::Error)]
pub enum BlocklistError {
    #[error("state store: {0}")]
    Store(#[from] StoreError),
    #[error("this host's kernel blocklist: {0}")]
    Kernel(#[from] DataplaneError),
    #[error("a blocklist task ended: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error(
        "{}: {source}; lb-control marks there that this host's blocklist is in the state store: \
         check that the state directory is writable",
        path.display()
    )]
    Marker {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl BlocklistError {
    /// The store refused: the caller names it (e.g. a 503 naming etcd).
    pub fn store(&self) -> Option<&StoreError> {
        match self {
            BlocklistError::Store(error) => Some(error),
            _ => None,
        }
    }
}

/// A kernel entry with what the store (or this host, for an unrecorded block) says of it; a
/// prefix someone else wrote into the pinned maps has neither source nor creation time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedBlock {
    pub entry: BlockEntry,
    pub source: Option<BlockSource>,
    pub created: Option<SystemTime>,
}

/// The blocklist over the store and this host's kernel map; clones share it.
#[derive(Clone)]
pub struct StoredBlocklist {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    kernel: BlocklistHandle,
    /// Held for a whole pass of following the store, its read included, so that a pass never
    /// writes an older read over a newer one.
    following: tokio::sync::Mutex<()>,
    /// This host's automatic blocks that a store read may not show yet; held across every
    /// kernel write of one, so that it and a pass of following reach the kernel in turn.
    local: tokio::sync::Mutex<BTreeMap<IpNet, LocalBlock>>,
    /// The records as last read: the source of each kernel entry in a listing, and which may
    /// have expired (never held across an await).
    stored: Mutex<Vec<BlockRecord>>,
    /// Whether this lb-control deletes expired records: a master or a standalone one.
    deletes_expired: AtomicBool,
}

struct LocalBlock {
    record: BlockRecord,
    /// When the store committed it; None while the store does not have it.
    recorded: Option<Instant>,
}

impl StoredBlocklist {
    /// The blocklist of the store, with the kernel made to follow it. The first start on a host
    /// adopts the kernel's entries into the store (see the module's doc).
    pub async fn start(
        store: Store,
        kernel: BlocklistHandle,
        state_dir: &Path,
    ) -> Result<StoredBlocklist, BlocklistError> {
        let blocklist = StoredBlocklist {
            inner: Arc::new(Inner {
                store,
                kernel,
                following: tokio::sync::Mutex::default(),
                local: tokio::sync::Mutex::default(),
                stored: Mutex::default(),
                deletes_expired: AtomicBool::new(true),
            }),
        };
        let marker = state_dir.join(ADOPTED_MARKER);
        if !marker.exists() {
            let adopted = blocklist.adopt_kernel_entries().await?;
            if adopted > 0 {
                info!(
                    adopted,
                    "blocklist: stored the kernel's entries that the store lacked"
                );
            }
            fs::write(
                &marker,
                "this host's kernel blocklist was adopted into the state store; lb-control's \
                 kernel blocklist follows the store\n",
            )
            .map_err(|source| BlocklistError::Marker {
                path: marker.clone(),
                source,
            })?;
        }
        blocklist.follow_store().await?;
        Ok(blocklist)
    }

    /// Whether this lb-control deletes expired records from the store: as with health
    /// transitions, a backup leaves that to its master.
    pub fn set_deletes_expired(&self, deletes: bool) {
        self.inner.deletes_expired.store(deletes, Ordering::Relaxed);
    }

    /// What this host's kernel drops, in prefix order, with each entry's record.
    pub async fn list(&self) -> Result<Vec<ListedBlock>, BlocklistError> {
        let entries = self.inner.kernel.list().await?;
        let mut known: BTreeMap<IpNet, BlockRecord> = self
            .stored()
            .into_iter()
            .map(|record| (record.prefix, record))
            .collect();
        for block in self.inner.local.lock().await.values() {
            known
                .entry(block.record.prefix)
                .or_insert_with(|| block.record.clone());
        }
        Ok(entries
            .into_iter()
            .map(|entry| {
                let record = known.get(&entry.prefix);
                ListedBlock {
                    source: record.map(|record| record.source),
                    created: record.map(|record| record.created),
                    entry,
                }
            })
            .collect())
    }

    /// An operator's block of `prefix` until `until` (None: until removed), replacing the
    /// record of a blocked prefix; in the store with its event, then in this host's kernel.
    pub async fn add(
        &self,
        prefix: IpNet,
        until: Option<SystemTime>,
    ) -> Result<BlockRecord, BlocklistError> {
        let record = BlockRecord {
            prefix: prefix.trunc(),
            until: until.map(round_up_to_second),
            source: BlockSource::Admin,
            created: SystemTime::now(),
        };
        let detail = match record.until {
            Some(until) => format!("api: until {}", humantime::format_rfc3339_seconds(until)),
            None => "api: until removed".to_owned(),
        };
        let put = record.clone();
        self.write(move |tx| {
            tx.put_block(&put)?;
            tx.record_event("blocklist.added", &subject(put.prefix), &detail)
                .map(drop)
        })
        .await?;
        self.follow_store().await?;
        Ok(record)
    }

    /// An operator's unblock of exactly `prefix` (host bits ignored): out of the store with its
    /// event, then out of this host's kernel. The record as it was; None when it was not
    /// blocked.
    pub async fn remove(&self, prefix: IpNet) -> Result<Option<BlockRecord>, BlocklistError> {
        let prefix = prefix.trunc();
        // An automatic block the store does not have yet is removed here, and the removal is
        // recorded like any other.
        let unrecorded = self
            .inner
            .local
            .lock()
            .await
            .get(&prefix)
            .filter(|block| block.recorded.is_none())
            .map(|block| block.record.clone());
        let removed = self
            .write(move |tx| {
                let removed = tx.delete_block(prefix)?.or_else(|| unrecorded.clone());
                if removed.is_some() {
                    tx.record_event("blocklist.removed", &subject(prefix), "api")?;
                }
                Ok(removed)
            })
            .await?;
        if removed.is_some() {
            self.inner.local.lock().await.remove(&prefix);
        }
        self.follow_store().await?;
        Ok(removed)
    }

    /// The gateway's blocks of key guessers, each `(prefix, until)`: into this host's kernel at
    /// once, then into the store in one transaction (see the module's doc).
    pub async fn add_auth_failure_blocks(&self, blocks: Vec<(IpNet, SystemTime)>) {
        let created = SystemTime::now();
        {
            let mut local = self.inner.local.lock().await;
            for (prefix, until) in blocks {
                let record = BlockRecord {
                    prefix: prefix.trunc(),
                    until: Some(round_up_to_second(until)),
                    source: BlockSource::AuthFailure,
                    created,
                };
                match self.inner.kernel.block(record.prefix, record.until).await {
                    Ok(_) => warn!(
                        prefix = %record.prefix,
                        until = %humantime::format_rfc3339_seconds(until),
                        "blocked after repeated gateway auth failures"
                    ),
                    Err(error) => {
                        error!("blocking {prefix} after repeated gateway auth failures: {error}");
                        continue;
                    }
                }
                local.insert(
                    record.prefix,
                    LocalBlock {
                        record,
                        recorded: None,
                    },
                );
            }
        }
        self.record_unrecorded().await;
    }

    /// Makes this host's kernel hold what the store holds, with this host's automatic blocks
    /// that a store read may not show yet; expired entries are left out. Returns what changed.
    pub async fn follow_store(&self) -> Result<BlocklistChanges, BlocklistError> {
        let _pass = self.inner.following.lock().await;
        let read_at = Instant::now();
        let store = self.inner.store.clone();
        let stored = tokio::task::spawn_blocking(move || store.blocklist()).await??;
        let now = SystemTime::now();
        let mut wanted: BTreeMap<IpNet, Option<SystemTime>> = stored
            .iter()
            .filter(|record| !record.is_expired(now))
            .map(|record| (record.prefix, record.until))
            .collect();
        *self
            .inner
            .stored
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = stored;
        let mut local = self.inner.local.lock().await;
        // Committed before this read: the store's word is the one that counts now (it may
        // have been removed since, through the other host).
        local.retain(|_, block| block.recorded.is_none_or(|at| at >= read_at));
        for block in local.values() {
            if !block.record.is_expired(now) {
                let until = wanted
                    .entry(block.record.prefix)
                    .or_insert(block.record.until);
                *until = later(*until, block.record.until);
            }
        }
        let wanted = wanted
            .into_iter()
            .map(|(prefix, expires)| BlockEntry { prefix, expires })
            .collect();
        let changes = self.inner.kernel.replace(wanted).await?;
        if !changes.is_empty() {
            info!(
                written = ?changes.written,
                removed = ?changes.removed,
                "blocklist: this host's kernel follows the store"
            );
        }
        Ok(changes)
    }

    /// Once a second: expired entries leave this host's kernel (and, on a master, the store),
    /// and unrecorded automatic blocks are offered to the store again.
    pub async fn housekeeping(&self, now: SystemTime) {
        match self.inner.kernel.expire(now).await {
            Ok(expired) => {
                for prefix in expired {
                    info!(%prefix, "blocklist entry expired");
                }
            }
            Err(error) => error!("expiring blocklist entries: {error}"),
        }
        self.inner
            .local
            .lock()
            .await
            .retain(|_, block| !block.record.is_expired(now));
        self.record_unrecorded().await;
        if self.inner.deletes_expired.load(Ordering::Relaxed) {
            self.delete_expired(now).await;
        }
    }

    /// Stores the entries of this host's kernel that the store lacks, as `adopted`, each with
    /// its event; returns how many.
    async fn adopt_kernel_entries(&self) -> Result<usize, BlocklistError> {
        let entries = self.inner.kernel.list().await?;
        if entries.is_empty() {
            return Ok(0);
        }
        let now = SystemTime::now();
        self.write(move |tx| {
            let stored: Vec<IpNet> = tx.blocklist()?.iter().map(|r| r.prefix).collect();
            let mut adopted = 0;
            for entry in &entries {
                if stored.contains(&entry.prefix) || entry.expires.is_some_and(|at| at <= now) {
                    continue;
                }
                tx.put_block(&BlockRecord {
                    prefix: entry.prefix,
                    until: entry.expires,
                    source: BlockSource::Adopted,
                    created: now,
                })?;
                tx.record_event(
                    "blocklist.added",
                    &subject(entry.prefix),
                    "adopted from this host's kernel (blocked before lb-control stored its \
                     blocklist)",
                )?;
                adopted += 1;
            }
            Ok(adopted)
        })
        .await
    }

    /// Writes the automatic blocks the store does not have yet, in one transaction. A prefix
    /// the store holds for longer keeps its record.
    async fn record_unrecorded(&self) {
        let unrecorded: Vec<BlockRecord> = self
            .inner
            .local
            .lock()
            .await
            .values()
            .filter(|block| block.recorded.is_none())
            .map(|block| block.record.clone())
            .collect();
        if unrecorded.is_empty() {
            return;
        }
        let records = unrecorded.clone();
        let written = self
            .write(move |tx| {
                let stored: BTreeMap<IpNet, Option<SystemTime>> = tx
                    .blocklist()?
                    .into_iter()
                    .map(|record| (record.prefix, record.until))
                    .collect();
                let mut put = Vec::new();
                for record in &records {
                    let longer = stored
                        .get(&record.prefix)
                        .is_some_and(|&until| later(until, record.until) == until);
                    if !longer {
                        tx.put_block(record)?;
                        put.push(record);
                    }
                }
                if let Some((subject, detail)) = auth_failure_event(&put) {
                    tx.record_event("blocklist.added", &subject, &detail)?;
                }
                Ok(())
            })
            .await;
        match written {
            Ok(()) => {
                let at = Instant::now();
                let mut local = self.inner.local.lock().await;
                for record in unrecorded {
                    if let Some(block) = local.get_mut(&record.prefix)
                        && block.record == record
                    {
                        block.recorded = Some(at);
                    }
                }
            }
            Err(error) => warn!(
                "blocklist: {} automatic blocks are in this host's kernel but not in the store: \
                 {error}; offered again every second",
                unrecorded.len()
            ),
        }
    }

    /// Deletes the records that expired at `now` from the store, when the last read had any.
    async fn delete_expired(&self, now: SystemTime) {
        let expired = self
            .stored()
            .iter()
            .filter(|record| record.is_expired(now))
            .count();
        if expired == 0 {
            return;
        }
        let deleted = self
            .write(move |tx| {
                for record in tx.blocklist()? {
                    if record.is_expired(now) {
                        tx.delete_block(record.prefix)?;
                    }
                }
                Ok(())
            })
            .await;
        let followed = match deleted {
            Ok(()) => self.follow_store().await.map(drop),
            Err(error) => Err(error),
        };
        if let Err(error) = followed {
            warn!(
                "blocklist: deleting {expired} expired entries from the store: {error}; tried \
                 again in a second"
            );
        }
    }

    fn stored(&self) -> Vec<BlockRecord> {
        self.inner
            .stored
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Runs `change` in one store transaction on the blocking pool.
    async fn write<T: Send + 'static>(
        &self,
        mut change: impl FnMut(&mut Tx<'_>) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, BlocklistError> {
        let store = self.inner.store.clone();
        Ok(tokio::task::spawn_blocking(move || store.write(|tx| change(tx))).await??)
    }
}

/// The later of two expiries, None (never) being the latest.
fn later(a: Option<SystemTime>, b: Option<SystemTime>) -> Option<SystemTime> {
    a.zip(b).map(|(a, b)| a.max(b))
}

/// The subject of a blocklist event: `prefix 203.0.113.0/24`.
fn subject(prefix: IpNet) -> String {
    format!("prefix {prefix}")
}

/// Automatic blocks named in one event.
const EVENT_PREFIXES: usize = 10;

/// The one event of a batch of automatic blocks written together (subject, detail): one per
/// batch, not per prefix, so a flood of guessers cannot flush the event log. None for none.
fn auth_failure_event(records: &[&BlockRecord]) -> Option<(String, String)> {
    let subject = match records {
        [] => return None,
        [record] => subject(record.prefix),
        _ => format!("{} prefixes", records.len()),
    };
    let mut named: Vec<String> = records
        .iter()
        .take(EVENT_PREFIXES)
        .map(|record| match record.until {
            Some(until) => format!(
                "{} until {}",
                record.prefix,
                humantime::format_rfc3339_seconds(until)
            ),
            None => record.prefix.to_string(),
        })
        .collect();
    if records.len() > EVENT_PREFIXES {
        named.push(format!("and {} more", records.len() - EVENT_PREFIXES));
    }
    Some((
        subject,
        format!("auth failures (gateway): {}", named.join(", ")),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auto(prefix: &str) -> BlockRecord {
        BlockRecord {
            prefix: prefix.parse().unwrap(),
            until: Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000)),
            source: BlockSource::AuthFailure,
            created: SystemTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn a_batch_of_automatic_blocks_is_one_event_naming_at_most_ten() {
        assert_eq!(auth_failure_event(&[]), None);
        let one = auto("203.0.113.7/32");
        assert_eq!(
            auth_failure_event(&[&one]),
            Some((
                "prefix 203.0.113.7/32".to_owned(),
                "auth failures (gateway): 203.0.113.7/32 until 2027-01-15T08:00:00Z".to_owned()
            ))
        );
        let many: Vec<BlockRecord> = (1..=12)
            .map(|n| auto(&format!("198.51.100.{n}/32")))
            .collect();
        let many: Vec<&BlockRecord> = many.iter().collect();
        let (subject, detail) = auth_failure_event(&many).expect("an event");
        assert_eq!(subject, "12 prefixes");
        assert!(
            detail.starts_with("auth failures (gateway): 198.51.100.1/32 until "),
            "{detail}"
        );
        assert!(detail.contains("198.51.100.10/32"), "{detail}");
        assert!(!detail.contains("198.51.100.11/32"), "{detail}");
        assert!(detail.ends_with(", and 2 more"), "{detail}");
    }
}
