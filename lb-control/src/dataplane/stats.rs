//! Counters of an instance, read from its pinned maps and summed over CPUs: per protocol, per
//! service (with drops by reason), per backend, and drops that belong to no service.

use std::{collections::BTreeMap, net::SocketAddr, path::Path};

use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use lb_common::{
    flow::FlowKey,
    map_names,
    maps::{
        Backend, BackendStats, DropReason, FLOW_CLOSING, Flow, MAX_BACKENDS, Service, ServiceKey,
        ServiceStats,
    },
};

use crate::model::Protocol;

use super::{
    DataplaneError, ProtoStats, SecondChanceMode, map_error, open_pinned, read_pinned_proto_stats,
    read_second_chance_packets, services::addr_from_bytes,
};

/// Everything `lb-control stats` shows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub protocols: ProtoStats,
    /// Drops outside any service (blocked sources, fragments to a VIP), by reason name.
    pub drops: BTreeMap<&'static str, u64>,
    pub services: Vec<ServiceCounters>,
    pub backends: Vec<BackendCounters>,
    /// Gateway segments second chance sent to the other host of the pair, by mode.
    pub second_chance_packets: Vec<(SecondChanceMode, u64)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceCounters {
    /// `vip:port/proto`.
    pub service: String,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub drops: BTreeMap<&'static str, u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendCounters {
    pub backend: SocketAddr,
    pub state: &'static str,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

pub fn read_pinned_stats(pin_dir: &Path) -> Result<Stats, DataplaneError> {
    let protocols = read_pinned_proto_stats(pin_dir)?;

    let drop_stats: PerCpuArray<MapData, u64> = open_pinned(pin_dir, map_names::DROP_STATS)?;
    let mut drops = BTreeMap::new();
    for reason in DropReason::ALL {
        let per_cpu = drop_stats
            .get(&(reason as u32), 0)
            .map_err(map_error(map_names::DROP_STATS))?;
        drops.insert(reason.name(), per_cpu.iter().sum());
    }

    let services: HashMap<MapData, ServiceKey, Service> =
        open_pinned(pin_dir, map_names::SERVICES)?;
    let service_stats: PerCpuArray<MapData, ServiceStats> =
        open_pinned(pin_dir, map_names::SERVICE_STATS)?;
    let mut service_rows = Vec::new();
    for entry in services.iter() {
        let (key, service) = entry.map_err(map_error(map_names::SERVICES))?;
        let per_cpu = service_stats
            .get(&service.id, 0)
            .map_err(map_error(map_names::SERVICE_STATS))?;
        let mut row = ServiceCounters {
            service: describe_service(&key),
            packets: 0,
            bytes: 0,
            new_flows: 0,
            drops: DropReason::ALL
                .iter()
                .map(|reason| (reason.name(), 0))
                .collect(),
        };
        for counters in per_cpu.iter() {
            row.packets += counters.packets;
            row.bytes += counters.bytes;
            row.new_flows += counters.new_flows;
            for reason in DropReason::ALL {
                *row.drops.entry(reason.name()).or_default() += counters.drops[reason as usize];
            }
        }
        service_rows.push(row);
    }
    service_rows.sort_by(|a, b| a.service.cmp(&b.service));

    let backends: Array<MapData, Backend> = open_pinned(pin_dir, map_names::BACKENDS)?;
    let backend_stats: PerCpuArray<MapData, BackendStats> =
        open_pinned(pin_dir, map_names::BACKEND_STATS)?;
    let mut backend_rows = Vec::new();
    for id in 0..MAX_BACKENDS {
        let backend = backends
            .get(&id, 0)
            .map_err(map_error(map_names::BACKENDS))?;
        if backend.family == 0 {
            continue;
        }
        let per_cpu = backend_stats
            .get(&id, 0)
            .map_err(map_error(map_names::BACKEND_STATS))?;
        let mut row = BackendCounters {
            backend: SocketAddr::new(
                addr_from_bytes(&backend.addr, backend.family),
                u16::from_be(backend.port_be),
            ),
            state: match backend.state {
                lb_common::maps::BACKEND_UP => "up",
                lb_common::maps::BACKEND_DRAINING => "draining",
                _ => "down",
            },
            packets: 0,
            bytes: 0,
            new_flows: 0,
        };
        for counters in per_cpu.iter() {
            row.packets += counters.packets;
            row.bytes += counters.bytes;
            row.new_flows += counters.new_flows;
        }
        backend_rows.push(row);
    }
    backend_rows.sort_by_key(|row| row.backend);

    Ok(Stats {
        protocols,
        drops,
        services: service_rows,
        backends: backend_rows,
        second_chance_packets: SecondChanceMode::ALL
            .into_iter()
            .map(|mode| Ok((mode, read_second_chance_packets(pin_dir, mode)?)))
            .collect::<Result<_, DataplaneError>>()?,
    })
}

/// Open flows to `backend` (a node's address and port) over every service: tracked flows
/// that saw no FIN or RST yet. What a drain waits for.
pub fn open_flows_to(pin_dir: &Path, backend: SocketAddr) -> Result<u64, DataplaneError> {
    let backends: Array<MapData, Backend> = open_pinned(pin_dir, map_names::BACKENDS)?;
    let mut ids = Vec::new();
    for id in 0..MAX_BACKENDS {
        let entry = backends
            .get(&id, 0)
            .map_err(map_error(map_names::BACKENDS))?;
        if entry.family != 0
            && SocketAddr::new(
                addr_from_bytes(&entry.addr, entry.family),
                u16::from_be(entry.port_be),
            ) == backend
        {
            ids.push(id);
        }
    }
    if ids.is_empty() {
        return Ok(0);
    }
    let flows: HashMap<MapData, FlowKey, Flow> = open_pinned(pin_dir, map_names::FLOWS)?;
    let mut open = 0;
    super::batch::for_each(&flows, |_, flow: &Flow| {
        if ids.contains(&flow.backend_id) && flow.flags & FLOW_CLOSING == 0 {
            open += 1;
        }
    })
    .map_err(|source| DataplaneError::MapBatch {
        name: map_names::FLOWS,
        source,
    })?;
    Ok(open)
}

fn describe_service(key: &ServiceKey) -> String {
    let vip = addr_from_bytes(&key.vip, key.family);
    let port = u16::from_be(key.port_be);
    let protocol = if key.proto == Protocol::Udp.number() {
        "udp"
    } else {
        "tcp"
    };
    SocketAddr::new(vip, port).to_string() + "/" + protocol
}
