//! Second chance: the `SECOND_CHANCE` map of a planned handover and the
//! `STANDING_SECOND_CHANCE` map of a pair member, which send the gateway's segments that no
//! socket here takes to the other host of the pair (see `lb-ebpf/src/second_chance.rs`), and
//! their packet counters.

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

/// Which second chance: a handover's or the standing one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecondChanceMode {
    Handover,
    Standing,
}

impl SecondChanceMode {
    pub const ALL: [SecondChanceMode; 2] = [SecondChanceMode::Handover, SecondChanceMode::Standing];

    pub fn name(self) -> &'static str {
        match self {
            SecondChanceMode::Handover => "handover",
            SecondChanceMode::Standing => "standing",
        }
    }

    fn map_name(self) -> &'static str {
        match self {
            SecondChanceMode::Handover => map_names::SECOND_CHANCE,
            SecondChanceMode::Standing => map_names::STANDING_SECOND_CHANCE,
        }
    }

    fn packets_map_name(self) -> &'static str {
        match self {
            SecondChanceMode::Handover => map_names::SECOND_CHANCE_PACKETS,
            SecondChanceMode::Standing => map_names::STANDING_SECOND_CHANCE_PACKETS,
        }
    }
}

/// The pinned entry of one second chance of this host's instance.
pub struct SecondChanceMap {
    mode: SecondChanceMode,
    entry: Array<MapData, SecondChance>,
}

impl SecondChanceMap {
    pub fn open(pin_dir: &Path, mode: SecondChanceMode) -> Result<SecondChanceMap, DataplaneError> {
        Ok(SecondChanceMap {
            mode,
            entry: open_pinned(pin_dir, mode.map_name())?,
        })
    }

    /// For `window` from now, segments to `gateway` (its address unspecified: any address of
    /// its family) that this host has no socket for go to `peer`: a handover's, for the drain
    /// (the entry's deadline ends it, whatever becomes of this process).
    pub fn arm_for(
        &mut self,
        gateway: SocketAddr,
        peer: IpAddr,
        window: Duration,
    ) -> Result<(), DataplaneError> {
        let window_ns = u64::try_from(window.as_nanos()).unwrap_or(u64::MAX);
        let until_ns = monotonic_clock_ns().saturating_add(window_ns).max(1);
        self.set(entry(gateway, peer, until_ns, None))
    }

    /// Until [`disarm`](Self::disarm), whatever becomes of this process: the standing one's,
    /// which sends segments (SYNs included) only while nothing listens here; those to
    /// `admin_port` at the gateway's address(es) too, when the admin API listens there.
    pub fn arm(
        &mut self,
        gateway: SocketAddr,
        admin_port: Option<u16>,
        peer: IpAddr,
    ) -> Result<(), DataplaneError> {
        self.set(entry(gateway, peer, u64::MAX, admin_port))
    }

    pub fn disarm(&mut self) -> Result<(), DataplaneError> {
        self.set(SecondChance::default())
    }

    fn set(&mut self, entry: SecondChance) -> Result<(), DataplaneError> {
        self.entry
            .set(0, entry, 0)
            .map_err(map_error(self.mode.map_name()))
    }
}

/// An entry for `gateway` (its address unspecified: all zero, any address of its family), and
/// `admin_port` at the same address(es), and `peer`, in force until `until_ns`.
fn entry(
    gateway: SocketAddr,
    peer: IpAddr,
    until_ns: u64,
    admin_port: Option<u16>,
) -> SecondChance {
    let addr = if gateway.ip().is_unspecified() {
        [0; 16]
    } else {
        addr_bytes(gateway.ip())
    };
    SecondChance {
        addr,
        peer: addr_bytes(peer),
        until_ns,
        port_be: gateway.port().to_be(),
        family: family(gateway.ip()),
        peer_family: family(peer),
        admin_port_be: admin_port.unwrap_or(0).to_be(),
        _pad: 0,
    }
}

/// Packets the `mode` second chance has sent to the other host since the instance's maps were
/// made.
pub fn read_second_chance_packets(
    pin_dir: &Path,
    mode: SecondChanceMode,
) -> Result<u64, DataplaneError> {
    let name = mode.packets_map_name();
    let counter: PerCpuArray<MapData, u64> = open_pinned(pin_dir, name)?;
    let per_cpu = counter.get(&0, 0).map_err(map_error(name))?;
    Ok(per_cpu.iter().sum())
}
