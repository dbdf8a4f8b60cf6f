//! The source blocklist: prefixes the XDP program drops before any other work. Entries carry
//! their expiry (Unix seconds, 0 for never) as the trie value; userspace removes expired ones.
//!
//! [`Blocklist`] works on the pinned maps. In a running daemon it has one owner,
//! [`BlocklistHandle`], held by the stored blocklist ([`crate::blocklist`]): the gateway's
//! auth-failure blocks, the admin API (and through it `lb-control block`), the expiry of old
//! entries and the state store's blocklist, which the maps follow, all go through it, so the
//! version's read-modify-write has one writer. Tests and harnesses without a daemon open
//! [`Blocklist`] themselves.

use std::{
    net::IpAddr,
    path::Path,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use aya::maps::{
    Array, MapData, MapError,
    lpm_trie::{Key, LpmTrie},
};
use ipnet::IpNet;
use lb_common::{
    map_names,
    maps::{BlockV4, BlockV6},
};
use prometheus_client::metrics::gauge::Gauge;
use tracing::warn;

use super::{DataplaneError, map_error, open_pinned};

/// The latest expiry an entry can have: the trie stores Unix seconds in a `u32` (early 2106).
pub fn latest_block_expiry() -> SystemTime {
    // One second short: stored expiries are rounded up.
    UNIX_EPOCH + Duration::from_secs(u64::from(u32::MAX - 1))
}

/// A blocked prefix and when it stops being blocked (`None`: never).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockEntry {
    pub prefix: IpNet,
    pub expires: Option<SystemTime>,
}

/// What [`Blocklist::replace`] changed: prefixes blocked or given a new expiry, and prefixes
/// unblocked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlocklistChanges {
    pub written: Vec<IpNet>,
    pub removed: Vec<IpNet>,
}

impl BlocklistChanges {
    pub fn is_empty(&self) -> bool {
        self.written.is_empty() && self.removed.is_empty()
    }
}

pub struct Blocklist {
    v4: LpmTrie<MapData, BlockV4, u32>,
    v6: LpmTrie<MapData, BlockV6, u32>,
    /// The blocklist's version: 0 while the tries are empty (the program skips them), else a
    /// new value after every change (tracked flows recheck their source once per version).
    version: Array<MapData, u32>,
}

impl Blocklist {
    pub fn open(pin_dir: &Path) -> Result<Self, DataplaneError> {
        Ok(Blocklist {
            v4: open_pinned(pin_dir, map_names::BLOCKLIST_V4)?,
            v6: open_pinned(pin_dir, map_names::BLOCKLIST_V6)?,
            version: open_pinned(pin_dir, map_names::BLOCKLIST_VERSION)?,
        })
    }

    /// Stores a new version after a change of the tries (after it: a packet that reads the new
    /// version sees the change): 0 when they are empty.
    fn update_version(&mut self) -> Result<(), DataplaneError> {
        let version = if self.is_empty()? {
            0
        } else {
            let current = self
                .version
                .get(&0, 0)
                .map_err(map_error(map_names::BLOCKLIST_VERSION))?;
            next_version(current)
        };
        self.version
            .set(0, version, 0)
            .map_err(map_error(map_names::BLOCKLIST_VERSION))
    }

    /// Whether both tries are empty: one key lookup each, however many entries there are.
    pub fn is_empty(&self) -> Result<bool, DataplaneError> {
        let v4 = self.v4.keys().next().transpose();
        let v6 = self.v6.keys().next().transpose();
        Ok(v4.map_err(map_error(map_names::BLOCKLIST_V4))?.is_none()
            && v6.map_err(map_error(map_names::BLOCKLIST_V6))?.is_none())
    }

    /// How many prefixes are blocked (a walk of the tries' keys).
    pub fn len(&self) -> Result<usize, DataplaneError> {
        let mut count = 0;
        for key in self.v4.keys() {
            key.map_err(map_error(map_names::BLOCKLIST_V4))?;
            count += 1;
        }
        for key in self.v6.keys() {
            key.map_err(map_error(map_names::BLOCKLIST_V6))?;
            count += 1;
        }
        Ok(count)
    }

    /// Blocks `prefix` until `expires` (forever with `None`); blocking it again replaces the
    /// expiry. Returns the entry as stored: the prefix without host bits, the expiry rounded up
    /// to a second.
    pub fn block(
        &mut self,
        prefix: IpNet,
        expires: Option<SystemTime>,
    ) -> Result<BlockEntry, DataplaneError> {
        let entry = self.insert(prefix, expires)?;
        self.update_version()?;
        Ok(entry)
    }

    /// Puts `prefix` in its trie, leaving the version alone; returns the entry as stored.
    fn insert(
        &mut self,
        prefix: IpNet,
        expires: Option<SystemTime>,
    ) -> Result<BlockEntry, DataplaneError> {
        let value = expires.map_or(0, unix_seconds);
        let prefix = prefix.trunc();
        match prefix.addr() {
            IpAddr::V4(addr) => self
                .v4
                .insert(
                    &Key::new(prefix.prefix_len().into(), addr.octets()),
                    value,
                    0,
                )
                .map_err(map_error(map_names::BLOCKLIST_V4))?,
            IpAddr::V6(addr) => self
                .v6
                .insert(
                    &Key::new(prefix.prefix_len().into(), addr.octets()),
                    value,
                    0,
                )
                .map_err(map_error(map_names::BLOCKLIST_V6))?,
        }
        Ok(block_entry(
            prefix.addr(),
            prefix.prefix_len().into(),
            value,
        ))
    }

    /// Makes the tries hold exactly `wanted` (the expiry of each rounded up to a second), with
    /// one new version if anything changed; returns what changed.
    pub fn replace(&mut self, wanted: &[BlockEntry]) -> Result<BlocklistChanges, DataplaneError> {
        let current = self.list()?;
        let wanted: Vec<BlockEntry> = wanted
            .iter()
            .map(|entry| BlockEntry {
                prefix: entry.prefix.trunc(),
                expires: entry.expires.map(round_up_to_second),
            })
            .collect();
        let mut changes = BlocklistChanges::default();
        for entry in &current {
            if !wanted.iter().any(|want| want.prefix == entry.prefix) {
                self.remove(entry.prefix)?;
                changes.removed.push(entry.prefix);
            }
        }
        for entry in &wanted {
            if !current.contains(entry) {
                self.insert(entry.prefix, entry.expires)?;
                changes.written.push(entry.prefix);
            }
        }
        if !changes.is_empty() {
            self.update_version()?;
        }
        Ok(changes)
    }

    /// Unblocks exactly `prefix`; returns whether it was blocked.
    pub fn unblock(&mut self, prefix: IpNet) -> Result<bool, DataplaneError> {
        let removed = self.remove(prefix)?;
        if removed {
            self.update_version()?;
        }
        Ok(removed)
    }

    /// Removes exactly `prefix` from its trie, leaving the version alone.
    fn remove(&mut self, prefix: IpNet) -> Result<bool, DataplaneError> {
        let prefix = prefix.trunc();
        let (name, result) = match prefix.addr() {
            IpAddr::V4(addr) => (
                map_names::BLOCKLIST_V4,
                self.v4
                    .remove(&Key::new(prefix.prefix_len().into(), addr.octets())),
            ),
            IpAddr::V6(addr) => (
                map_names::BLOCKLIST_V6,
                self.v6
                    .remove(&Key::new(prefix.prefix_len().into(), addr.octets())),
            ),
        };
        match result {
            Ok(()) => Ok(true),
            Err(MapError::KeyNotFound) => Ok(false),
            Err(source) => Err(DataplaneError::Map { name, source }),
        }
    }

    pub fn list(&self) -> Result<Vec<BlockEntry>, DataplaneError> {
        let mut entries = Vec::new();
        for entry in self.v4.iter() {
            let (key, value) = entry.map_err(map_error(map_names::BLOCKLIST_V4))?;
            entries.push(block_entry(
                IpAddr::from(key.data()),
                key.prefix_len(),
                value,
            ));
        }
        for entry in self.v6.iter() {
            let (key, value) = entry.map_err(map_error(map_names::BLOCKLIST_V6))?;
            entries.push(block_entry(
                IpAddr::from(key.data()),
                key.prefix_len(),
                value,
            ));
        }
        entries.sort_by_key(|entry| entry.prefix);
        Ok(entries)
    }

    /// Removes the entries whose expiry has passed at `now` (one new version for all of them);
    /// returns them.
    pub fn expire(&mut self, now: SystemTime) -> Result<Vec<IpNet>, DataplaneError> {
        let expired: Vec<IpNet> = self
            .list()?
            .into_iter()
            .filter(|entry| entry.expires.is_some_and(|expires| expires <= now))
            .map(|entry| entry.prefix)
            .collect();
        let mut removed = false;
        for prefix in &expired {
            removed |= self.remove(*prefix)?;
        }
        if removed {
            self.update_version()?;
        }
        Ok(expired)
    }
}

/// The one owner of a running daemon's kernel blocklist; clones share it. The stored blocklist
/// writes through it: the gateway's auth-failure blocks, the admin API, the expiry sweep and
/// the store's changes.
///
/// A mutex, not a task fed by a channel: every caller is async and awaits the outcome (the admin
/// API answers after the kernel write, the gateway's applier logs it), changes are rare (operator
/// actions, a key guesser now and then, the expiry sweep once a second), and a mutex serializes
/// the version's read-modify-write as an owning task would, without a command type and reply
/// channels. The kernel calls run on the blocking pool (a listing walks both tries), never on an
/// async worker.
#[derive(Clone)]
pub struct BlocklistHandle {
    owned: Arc<Owned>,
}

struct Owned {
    blocklist: Mutex<Blocklist>,
    /// How many prefixes are blocked (`lb_blocklist_entries`), recounted after each change.
    entries: Gauge,
}

impl BlocklistHandle {
    /// Opens the instance's pinned blocklist; `entries` is set to its size now and after every
    /// change.
    pub fn open(pin_dir: &Path, entries: Gauge) -> Result<Self, DataplaneError> {
        let blocklist = Blocklist::open(pin_dir)?;
        recount(&blocklist, &entries);
        Ok(BlocklistHandle {
            owned: Arc::new(Owned {
                blocklist: Mutex::new(blocklist),
                entries,
            }),
        })
    }

    /// Blocks `prefix` until `expires` (forever with `None`), replacing the expiry of a prefix
    /// blocked already; returns the entry as stored.
    pub async fn block(
        &self,
        prefix: IpNet,
        expires: Option<SystemTime>,
    ) -> Result<BlockEntry, DataplaneError> {
        self.with(move |blocklist, entries| {
            let entry = blocklist.block(prefix, expires)?;
            recount(blocklist, entries);
            Ok(entry)
        })
        .await
    }

    /// Every blocked prefix with its expiry, in prefix order.
    pub async fn list(&self) -> Result<Vec<BlockEntry>, DataplaneError> {
        self.with(|blocklist, _| blocklist.list()).await
    }

    /// Makes the kernel blocklist hold exactly `wanted`; returns what changed.
    pub async fn replace(
        &self,
        wanted: Vec<BlockEntry>,
    ) -> Result<BlocklistChanges, DataplaneError> {
        self.with(move |blocklist, entries| {
            let changes = blocklist.replace(&wanted)?;
            if !changes.is_empty() {
                recount(blocklist, entries);
            }
            Ok(changes)
        })
        .await
    }

    /// Removes the entries whose expiry has passed at `now`; returns them.
    pub async fn expire(&self, now: SystemTime) -> Result<Vec<IpNet>, DataplaneError> {
        self.with(move |blocklist, entries| {
            let expired = blocklist.expire(now)?;
            if !expired.is_empty() {
                recount(blocklist, entries);
            }
            Ok(expired)
        })
        .await
    }

    /// Runs `call` on the blocklist, alone, on the blocking pool.
    async fn with<T: Send + 'static>(
        &self,
        call: impl FnOnce(&mut Blocklist, &Gauge) -> Result<T, DataplaneError> + Send + 'static,
    ) -> Result<T, DataplaneError> {
        let owned = self.owned.clone();
        tokio::task::spawn_blocking(move || {
            let mut blocklist = owned
                .blocklist
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            call(&mut blocklist, &owned.entries)
        })
        .await
        .map_err(|source| DataplaneError::BlocklistCall { source })?
    }
}

/// Sets the entries gauge to the blocklist's size; a failed count leaves it (the change it
/// follows succeeded).
fn recount(blocklist: &Blocklist, entries: &Gauge) {
    match blocklist.len() {
        Ok(count) => {
            entries.set(i64::try_from(count).unwrap_or(i64::MAX));
        }
        Err(error) => warn!("counting the blocklist's entries for lb_blocklist_entries: {error}"),
    }
}

/// A blocklist version after `current`: nonzero, different from it, and unlikely to be any
/// recent one (the version goes back to 0 whenever the blocklist empties, and restarts from
/// there): a flow that recorded it would skip the tries once too often. Writers outside the
/// daemon (a test harness, an older CLI) may write at the same time, hence the time and process
/// id in the mix.
fn next_version(current: u32) -> u32 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.subsec_nanos());
    let mixed = current
        .wrapping_add(1)
        .wrapping_add(nanos.wrapping_mul(0x9e37_79b9))
        .wrapping_add(std::process::id().rotate_left(16));
    match mixed {
        0 => 1,
        version if version == current => version.wrapping_add(1).max(1),
        version => version,
    }
}

fn block_entry(addr: IpAddr, prefix_len: u32, value: u32) -> BlockEntry {
    let prefix = IpNet::new(addr, prefix_len as u8).unwrap_or_else(|_| IpNet::from(addr));
    let expires = (value != 0).then(|| UNIX_EPOCH + Duration::from_secs(value.into()));
    BlockEntry { prefix, expires }
}

/// Rounded up, so an entry never expires early (a whole second stays as it is, so a time read
/// back from the trie is stored again unchanged); saturating far in the future.
fn unix_seconds(time: SystemTime) -> u32 {
    let elapsed = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let seconds = elapsed.as_secs() + u64::from(elapsed.subsec_nanos() > 0);
    u32::try_from(seconds).unwrap_or(u32::MAX)
}

/// `time` as the trie keeps it: rounded up to a whole second.
pub fn round_up_to_second(time: SystemTime) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(unix_seconds(time).into())
}
