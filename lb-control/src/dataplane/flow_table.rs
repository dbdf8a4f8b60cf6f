//! The kernel's connection tracking as one host of a pair hands it to the other: flows read
//! from and written into the pinned `FLOWS` and `NAT_REVERSE` maps, in terms both hosts
//! understand.
//!
//! A flow names its backend by this host's id and its last packet by this host's monotonic
//! clock; neither means anything on the other host (backend ids are handed out per host, in
//! the order it met the backends; each kernel's clock starts at its boot). So a
//! [`PortableFlow`] names the backend by address and carries the sender's clock reading beside
//! it, and [`FlowTable::install`] turns both into local ones. The service id is not carried
//! either: the flow's key holds its service's VIP, port and protocol, which the receiver looks
//! up in its own `SERVICES`.
//!
//! A NAT flow also owns its source port: `NAT_REVERSE` maps (backend, NAT port) back to the
//! client's 5-tuple, and that entry is also what keeps another flow off the port. It is made
//! from the flow itself, so it needs no message of its own.

use std::{
    collections::{HashMap as StdHashMap, HashSet},
    net::SocketAddr,
    path::Path,
};

use aya::maps::{Array, HashMap, MapData, MapError};
use lb_common::{
    flow::FlowKey,
    map_names,
    maps::{Backend, Flow, MAX_BACKENDS, NatKey, NatValue, Service, ServiceKey},
};

use super::{
    DataplaneError, batch, map_error, open_pinned,
    services::{addr_bytes, addr_from_bytes, bump_flow_cache_epoch, warm_neighbours},
};

/// A tracked flow as the other host of a pair can install it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortableFlow {
    /// The client's 5-tuple (its destination is the service).
    pub key: FlowKey,
    pub backend: SocketAddr,
    /// NAT mode: the LB's source port towards the backend (network byte order); 0 in DSR mode.
    pub nat_port_be: u16,
    /// The flow hash: DSR derives the outer source address from it.
    pub hash: u32,
    /// `Flow::flags` (`FLOW_CLOSING`).
    pub flags: u8,
    /// `Flow::last_seen_ns` on the sender's monotonic clock: read against the sender's clock
    /// at the same walk (see [`FlowTable::install`]).
    pub last_seen_ns: u64,
}

/// What [`FlowTable::install`] did with the flows it was given.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InstallReport {
    pub installed: usize,
    /// Flows of a service or backend this host does not have (yet: the shared store may not
    /// have reached it); a later full resync brings them.
    pub skipped: usize,
}

/// The pinned flow maps of this host's instance.
pub struct FlowTable {
    flows: HashMap<MapData, FlowKey, Flow>,
    nat_reverse: HashMap<MapData, NatKey, NatValue>,
    services: HashMap<MapData, ServiceKey, Service>,
    backends: Array<MapData, Backend>,
    flow_cache_epoch: Array<MapData, u64>,
}

impl FlowTable {
    pub fn open(pin_dir: &Path) -> Result<FlowTable, DataplaneError> {
        Ok(FlowTable {
            flows: open_pinned(pin_dir, map_names::FLOWS)?,
            nat_reverse: open_pinned(pin_dir, map_names::NAT_REVERSE)?,
            services: open_pinned(pin_dir, map_names::SERVICES)?,
            backends: open_pinned(pin_dir, map_names::BACKENDS)?,
            flow_cache_epoch: open_pinned(pin_dir, map_names::FLOW_CACHE_EPOCH)?,
        })
    }

    /// Every tracked flow whose backend is still in `BACKENDS`, read with the batch API, and
    /// the monotonic clock when the walk began.
    pub fn read_all(&self) -> Result<(Vec<PortableFlow>, u64), DataplaneError> {
        let now = monotonic_clock_ns();
        let addresses = self.backend_addresses()?;
        let mut portable = Vec::new();
        batch::for_each(&self.flows, |key, flow: &Flow| {
            if let Some(&backend) = addresses.get(&flow.backend_id) {
                portable.push(PortableFlow {
                    key: *key,
                    backend,
                    nat_port_be: flow.nat_port_be,
                    hash: flow.hash,
                    flags: flow.flags,
                    last_seen_ns: flow.last_seen_ns,
                });
            }
        })
        .map_err(batch_error(map_names::FLOWS))?;
        Ok((portable, now))
    }

    /// Writes `flows` (read at `sender_clock_ns` on the sender) into the flow maps: each flow
    /// gets this host's backend and service ids, its last packet this host's clock at the same
    /// age, and in NAT mode its port's reverse entry. Cached copies of replaced flows go (a new
    /// flow-cache epoch), and the neighbour entries of the flows' clients are resolved.
    pub fn install(
        &mut self,
        flows: &[PortableFlow],
        sender_clock_ns: u64,
    ) -> Result<InstallReport, DataplaneError> {
        let mut report = InstallReport::default();
        if flows.is_empty() {
            return Ok(report);
        }
        let now = monotonic_clock_ns();
        let ids: StdHashMap<SocketAddr, u32> = self
            .backend_addresses()?
            .into_iter()
            .map(|(id, addr)| (addr, id))
            .collect();
        let mut service_ids: StdHashMap<ServiceKey, Option<u8>> = StdHashMap::new();
        let mut clients = HashSet::new();
        for flow in flows {
            let service_key = service_key_of(&flow.key);
            let service_id = match service_ids.get(&service_key) {
                Some(id) => *id,
                None => {
                    let id = self.service_id(&service_key)?;
                    service_ids.insert(service_key, id);
                    id
                }
            };
            let (Some(service_id), Some(&backend_id)) = (service_id, ids.get(&flow.backend)) else {
                report.skipped += 1;
                continue;
            };
            let age = sender_clock_ns.saturating_sub(flow.last_seen_ns);
            let local = Flow {
                backend_id,
                hash: flow.hash,
                nat_port_be: flow.nat_port_be,
                service_id,
                flags: flow.flags,
                // No version is 0 once the blocklist has entries: the flow's source is checked
                // against this host's blocklist on its first packet here.
                blocklist_version: 0,
                last_seen_ns: now.saturating_sub(age),
            };
            self.flows
                .insert(flow.key, local, 0)
                .map_err(map_error(map_names::FLOWS))?;
            if flow.nat_port_be != 0 {
                self.nat_reverse
                    .insert(nat_key_of(flow), flow.key, 0)
                    .map_err(map_error(map_names::NAT_REVERSE))?;
            }
            report.installed += 1;
            clients.insert(addr_from_bytes(&flow.key.src_addr, flow.key.family));
        }
        bump_flow_cache_epoch(&mut self.flow_cache_epoch)?;
        // The replies of NAT flows go back to their clients from here after a takeover: a
        // client this host never exchanged a packet with has no neighbour entry, and the
        // program would drop its replies (no route) until the kernel happens to learn it.
        warm_neighbours(clients.into_iter());
        Ok(report)
    }

    /// Deletes the flows of `keys` that are here. Their NAT ports' reverse entries stay, as
    /// when the kernel evicts a flow: a port whose flow is gone is free for the next flow.
    pub fn remove(&mut self, keys: &[FlowKey]) -> Result<usize, DataplaneError> {
        if keys.is_empty() {
            return Ok(0);
        }
        bump_flow_cache_epoch(&mut self.flow_cache_epoch)?;
        let removed =
            batch::delete(&mut self.flows, keys).map_err(batch_error(map_names::FLOWS))?;
        bump_flow_cache_epoch(&mut self.flow_cache_epoch)?;
        Ok(removed)
    }

    /// Deletes every flow not in `keep`: what a full resync leaves behind of flows the other
    /// host no longer has.
    pub fn retain(&mut self, keep: &HashSet<FlowKey>) -> Result<usize, DataplaneError> {
        let mut stale = Vec::new();
        batch::for_each(&self.flows, |key, _: &Flow| {
            if !keep.contains(key) {
                stale.push(*key);
            }
        })
        .map_err(batch_error(map_names::FLOWS))?;
        self.remove(&stale)
    }

    /// The address of every backend id in use.
    fn backend_addresses(&self) -> Result<StdHashMap<u32, SocketAddr>, DataplaneError> {
        let mut addresses = StdHashMap::new();
        for id in 0..MAX_BACKENDS {
            let backend = self
                .backends
                .get(&id, 0)
                .map_err(map_error(map_names::BACKENDS))?;
            if backend.family != 0 {
                let ip = addr_from_bytes(&backend.addr, backend.family);
                addresses.insert(id, SocketAddr::new(ip, u16::from_be(backend.port_be)));
            }
        }
        Ok(addresses)
    }

    fn service_id(&self, key: &ServiceKey) -> Result<Option<u8>, DataplaneError> {
        match self.services.get(key, 0) {
            // Service ids are below MAX_SERVICES, which fits (see `Flow::service_id`).
            Ok(service) => Ok(Some(service.id as u8)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(map_error(map_names::SERVICES)(source)),
        }
    }
}

/// The service a flow was opened for: its destination.
fn service_key_of(key: &FlowKey) -> ServiceKey {
    ServiceKey {
        vip: key.dst_addr,
        port_be: key.dst_port_be,
        proto: key.proto,
        family: key.family,
    }
}

/// The reverse entry of a NAT flow: how the backend's replies find it.
fn nat_key_of(flow: &PortableFlow) -> NatKey {
    NatKey {
        backend_addr: addr_bytes(flow.backend.ip()),
        backend_port_be: flow.backend.port().to_be(),
        nat_port_be: flow.nat_port_be,
        proto: flow.key.proto,
        family: flow.key.family,
        _pad: [0; 2],
    }
}

/// `CLOCK_MONOTONIC`, the clock of `bpf_ktime_get_ns()`, in nanoseconds.
pub(super) fn monotonic_clock_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec to write; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    (now.tv_sec as u64) * 1_000_000_000 + now.tv_nsec as u64
}

fn batch_error(name: &'static str) -> impl Fn(std::io::Error) -> DataplaneError {
    move |source| DataplaneError::MapBatch { name, source }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn nat_reverse_key_matches_what_a_backend_reply_carries() {
        let flow = PortableFlow {
            key: FlowKey::from_v4([10, 0, 0, 2], [10, 0, 1, 10], 40_000, 9944, 6),
            backend: SocketAddr::from((Ipv4Addr::new(10, 0, 10, 21), 9944)),
            nat_port_be: 25_000u16.to_be(),
            hash: 7,
            flags: 0,
            last_seen_ns: 0,
        };
        let key = nat_key_of(&flow);
        assert_eq!(key.backend_addr[..4], [10, 0, 10, 21]);
        assert_eq!(key.backend_addr[4..], [0; 12]);
        assert_eq!(u16::from_be(key.backend_port_be), 9944);
        assert_eq!(u16::from_be(key.nat_port_be), 25_000);
        assert_eq!((key.proto, key.family), (6, flow.key.family));
        let service = service_key_of(&flow.key);
        assert_eq!(service.vip, flow.key.dst_addr);
        assert_eq!(u16::from_be(service.port_be), 9944);
    }
}
