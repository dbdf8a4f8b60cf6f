//! The source blocklist: prefixes the XDP program drops before any other work. Entries carry
//! their expiry (Unix seconds, 0 for never) as the trie value; userspace removes expired ones.
//!
//! It works on the pinned maps, so the daemon and the CLI share it.

use std::{
    net::IpAddr,
    path::Path,
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

use super::{DataplaneError, map_error, open_pinned};

/// A blocked prefix and when it stops being blocked (`None`: never).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockEntry {
    pub prefix: IpNet,
    pub expires: Option<SystemTime>,
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
        let version = if self.list()?.is_empty() {
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

    /// Blocks `prefix` until `expires` (forever with `None`); blocking it again replaces the
    /// expiry.
    pub fn block(
        &mut self,
        prefix: IpNet,
        expires: Option<SystemTime>,
    ) -> Result<(), DataplaneError> {
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
        self.update_version()
    }

    /// Unblocks exactly `prefix`; returns whether it was blocked.
    pub fn unblock(&mut self, prefix: IpNet) -> Result<bool, DataplaneError> {
        let prefix = prefix.trunc();
        let result = match prefix.addr() {
            IpAddr::V4(addr) => self
                .v4
                .remove(&Key::new(prefix.prefix_len().into(), addr.octets())),
            IpAddr::V6(addr) => self
                .v6
                .remove(&Key::new(prefix.prefix_len().into(), addr.octets())),
        };
        match result {
            Ok(()) => {
                self.update_version()?;
                Ok(true)
            }
            Err(MapError::KeyNotFound) => Ok(false),
            Err(source) => Err(DataplaneError::Map {
                name: map_names::BLOCKLIST_V4,
                source,
            }),
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

    /// Removes the entries whose expiry has passed at `now`; returns them.
    pub fn expire(&mut self, now: SystemTime) -> Result<Vec<IpNet>, DataplaneError> {
        let expired: Vec<IpNet> = self
            .list()?
            .into_iter()
            .filter(|entry| entry.expires.is_some_and(|expires| expires <= now))
            .map(|entry| entry.prefix)
            .collect();
        for prefix in &expired {
            self.unblock(*prefix)?;
        }
        Ok(expired)
    }
}

/// A blocklist version after `current`: nonzero, different from it, and unlikely to be the one
/// another process (the daemon and the CLI both change the blocklist) writes at the same time,
/// or any recent one: a flow that recorded it would skip the tries once too often.
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

fn unix_seconds(time: SystemTime) -> u32 {
    let seconds = time
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs());
    // Rounded up, so an entry never expires early; saturating far in the future.
    u32::try_from(seconds + 1).unwrap_or(u32::MAX)
}
