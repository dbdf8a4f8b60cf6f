//! Second chance of a planned handover: the `SECOND_CHANCE` map, which sends the segments of
//! the gateway's connections this host has no socket for to the host that held the gateway's
//! address before (see `lb-ebpf/src/second_chance.rs`), and its packet counter.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    time::Duration,
};

use aya::maps::{Array, MapData, PerCpuArray};
use lb_common::{map_names, maps::SecondChance};

use super::{
    DataplaneError,
    flow_table::monotonic_clock_ns,
    map_error, open_pinned,
    services::{addr_bytes, family},
};

/// The pinned `SECOND_CHANCE` entry of this host's instance.
pub struct SecondChanceMap {
    entry: Array<MapData, SecondChance>,
}

impl SecondChanceMap {
    pub fn open(pin_dir: &Path) -> Result<SecondChanceMap, DataplaneError> {
        Ok(SecondChanceMap {
            entry: open_pinned(pin_dir, map_names::SECOND_CHANCE)?,
        })
    }

    /// For `window` from now, segments to `gateway` (its address unspecified: any address of
    /// its family) that open no connection and that this host has no socket for go to `peer`.
    pub fn arm(
        &mut self,
        gateway: SocketAddr,
        peer: IpAddr,
        window: Duration,
    ) -> Result<(), DataplaneError> {
        let addr = if gateway.ip().is_unspecified() {
            [0; 16]
        } else {
            addr_bytes(gateway.ip())
        };
        let window_ns = u64::try_from(window.as_nanos()).unwrap_or(u64::MAX);
        let entry = SecondChance {
            addr,
            peer: addr_bytes(peer),
            until_ns: monotonic_clock_ns().saturating_add(window_ns).max(1),
            port_be: gateway.port().to_be(),
            family: family(gateway.ip()),
            peer_family: family(peer),
            _pad: 0,
        };
        self.entry
            .set(0, entry, 0)
            .map_err(map_error(map_names::SECOND_CHANCE))
    }
}

/// Packets second chance has sent to the previous owner since the instance's maps were made.
pub fn read_second_chance_packets(pin_dir: &Path) -> Result<u64, DataplaneError> {
    let counter: PerCpuArray<MapData, u64> =
        open_pinned(pin_dir, map_names::SECOND_CHANCE_PACKETS)?;
    let per_cpu = counter
        .get(&0, 0)
        .map_err(map_error(map_names::SECOND_CHANCE_PACKETS))?;
    Ok(per_cpu.iter().sum())
}
