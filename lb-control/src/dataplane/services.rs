//! Services and their backends in the kernel maps: the desired set is applied whole, and each
//! service's Maglev table is written into its inactive half before one write flips it live.
//!
//! Service and backend ids are recovered from the pinned maps at start, so the flows a previous
//! lb-control tracked keep pointing at the right backends.
//!
//! Userspace keeps a copy of every table half it wrote, so a change writes only the entries that
//! differ (a backend joining or leaving moves ~1.6% of a 65537-entry table) and a service whose
//! table and mode are unchanged is not written at all: each entry is a system call, and a
//! health change rewrote every service's whole table before.

use std::{
    borrow::BorrowMut,
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    ops::RangeInclusive,
    sync::{Mutex, PoisonError},
    time::Duration,
};

use std::os::fd::AsRawFd as _;

use aya::maps::{Array, HashMap, MapData};
use lb_common::{
    flow::{FAMILY_IPV4, FAMILY_IPV6, FlowKey},
    maglev::{self, MaglevBackend},
    map_names,
    maps::{
        BACKEND_DOWN, BACKEND_DRAINING, BACKEND_UP, Backend, CONFIG_PASS_FRAGMENTS, Flow, LbConfig,
        MAX_BACKENDS, MAX_SERVICES, MODE_DSR, MODE_NAT, Service, ServiceKey, ServiceSlot, VipKey,
    },
};
use tracing::{debug, warn};

use super::{DataplaneError, batch, map_error};
use crate::model::{BackendState, ForwardingMode, Protocol};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSpec {
    pub addr: SocketAddr,
    pub weight: u32,
    pub state: BackendState,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub mode: ForwardingMode,
    pub backends: Vec<BackendSpec>,
}

impl ServiceSpec {
    pub fn key(&self) -> ServiceKey {
        ServiceKey {
            vip: addr_bytes(self.vip),
            port_be: self.port.to_be(),
            proto: self.protocol.number(),
            family: family(self.vip),
        }
    }
}

/// Program-wide forwarding settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LbSettings {
    /// Source address of NAT-mode traffic towards IPv4 backends (backends route it back here).
    pub nat_source_v4: Option<Ipv4Addr>,
    pub nat_source_v6: Option<Ipv6Addr>,
    /// Source ports of NAT-mode traffic; reserved from the kernel's own port choices.
    pub nat_ports: RangeInclusive<u16>,
    /// How long a closed TCP flow's NAT port is kept from other flows.
    pub nat_port_hold: Duration,
    /// DSR outer source prefixes (the low 16 bits vary per flow).
    pub dsr_source_v4: Ipv4Addr,
    pub dsr_source_v6: Ipv6Addr,
    pub maglev_table_size: u32,
    pub pass_fragments: bool,
}

/// What an apply changed, for the log.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    pub services: usize,
    pub backends: usize,
    pub services_removed: usize,
    pub backends_removed: usize,
    pub flows_purged: usize,
    /// Services whose table or mode changed (their entry rewritten).
    pub services_changed: usize,
    /// Maglev entries written (one system call each).
    pub table_entries_written: usize,
}

/// The kernel map's encoding of a backend state.
fn kernel_state(state: BackendState) -> u32 {
    match state {
        BackendState::Up => BACKEND_UP,
        BackendState::Draining => BACKEND_DRAINING,
        BackendState::Down => BACKEND_DOWN,
    }
}

pub fn family(addr: IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => FAMILY_IPV4,
        IpAddr::V6(_) => FAMILY_IPV6,
    }
}

pub fn addr_bytes(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(v4) => {
            let mut bytes = [0; 16];
            bytes[..4].copy_from_slice(&v4.octets());
            bytes
        }
        IpAddr::V6(v6) => v6.octets(),
    }
}

pub fn addr_from_bytes(bytes: &[u8; 16], family: u8) -> IpAddr {
    if family == FAMILY_IPV4 {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(*bytes))
    }
}

/// What a problem with a desired state is about, so a caller can name its own field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemSubject {
    /// A program-wide setting: the [`LbSettings`] field of this name.
    Setting(&'static str),
    /// The service at this index of the list given.
    Service(usize),
    /// The services together (the kernel's capacity).
    Services,
}

/// One reason the kernel would refuse a desired state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecProblem {
    pub subject: ProblemSubject,
    pub reason: String,
}

impl fmt::Display for SpecProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

/// Every problem with a desired state, at once.
pub fn validate(settings: &LbSettings, services: &[ServiceSpec]) -> Vec<SpecProblem> {
    let mut problems = Vec::new();
    let mut report = |subject: ProblemSubject, reason: String| {
        problems.push(SpecProblem { subject, reason });
    };
    if let Err(error) = maglev::validate_table_size(settings.maglev_table_size) {
        report(
            ProblemSubject::Setting("maglev_table_size"),
            format!("maglev table size: {error}"),
        );
    }
    if settings.nat_ports.is_empty() || *settings.nat_ports.start() < 1024 {
        report(
            ProblemSubject::Setting("nat_ports"),
            format!(
                "NAT port range {}-{} must be non-empty and above 1023",
                settings.nat_ports.start(),
                settings.nat_ports.end()
            ),
        );
    }
    if services.len() > MAX_SERVICES as usize {
        report(
            ProblemSubject::Services,
            format!(
                "{} services, the kernel holds at most {MAX_SERVICES}",
                services.len()
            ),
        );
    }
    let mut keys = BTreeSet::new();
    let mut backends = BTreeSet::new();
    for (index, service) in services.iter().enumerate() {
        let name = format!("service {}:{}", service.vip, service.port);
        let subject = ProblemSubject::Service(index);
        if !keys.insert((service.vip, service.port, service.protocol)) {
            report(subject, format!("{name}: defined twice"));
        }
        if service.port == 0 {
            report(subject, format!("{name}: port 0"));
        }
        if service.mode == ForwardingMode::Nat {
            let has_source = match service.vip {
                IpAddr::V4(_) => settings.nat_source_v4.is_some(),
                IpAddr::V6(_) => settings.nat_source_v6.is_some(),
            };
            if !has_source {
                report(
                    subject,
                    format!(
                        "{name}: NAT mode needs a NAT source address of its family \
                         (nat_source_v4 / nat_source_v6)"
                    ),
                );
            }
        }
        for backend in &service.backends {
            backends.insert(backend.addr);
            if family(backend.addr.ip()) != family(service.vip) {
                report(
                    subject,
                    format!(
                        "{name}: backend {} is of another address family than the VIP",
                        backend.addr
                    ),
                );
            }
            if backend.addr.port() == 0 {
                report(subject, format!("{name}: backend {}: port 0", backend.addr));
            }
        }
    }
    if backends.len() > MAX_BACKENDS as usize {
        report(
            ProblemSubject::Services,
            format!(
                "{} backends, the kernel holds at most {MAX_BACKENDS}",
                backends.len()
            ),
        );
    }
    problems
}

/// What userspace knows of the service maps: stable small ids, recovered from the pinned maps,
/// and the Maglev table halves this process wrote.
#[derive(Debug, Default)]
pub struct KernelState {
    services: BTreeMap<ServiceKey, u32>,
    backends: BTreeMap<SocketAddr, u32>,
    /// By service id: the entries of its two halves as last written, `None` where unknown (not
    /// written by this process, or a write that failed halfway).
    tables: BTreeMap<u32, [Option<Vec<u32>>; 2]>,
}

impl KernelState {
    pub(super) fn recover(maps: &Maps<'_>) -> Result<KernelState, DataplaneError> {
        let mut known = KernelState::default();
        for entry in maps.services.iter() {
            let (key, service) = entry.map_err(map_error(map_names::SERVICES))?;
            known.services.insert(key, service.id);
        }
        for id in 0..MAX_BACKENDS {
            let backend = maps
                .backends
                .get(&id, 0)
                .map_err(map_error(map_names::BACKENDS))?;
            if backend.family != 0 {
                let addr = SocketAddr::new(
                    addr_from_bytes(&backend.addr, backend.family),
                    u16::from_be(backend.port_be),
                );
                known.backends.insert(addr, id);
            }
        }
        Ok(known)
    }

    fn service_id(&mut self, key: ServiceKey) -> u32 {
        let next = first_free(self.services.values());
        *self.services.entry(key).or_insert(next)
    }

    fn backend_id(&mut self, addr: SocketAddr) -> u32 {
        let next = first_free(self.backends.values());
        *self.backends.entry(addr).or_insert(next)
    }
}

fn first_free<'a>(used: impl Iterator<Item = &'a u32>) -> u32 {
    let used: BTreeSet<u32> = used.copied().collect();
    (0..).find(|id| !used.contains(id)).unwrap_or(0)
}

/// The maps `apply` writes, borrowed from the loaded object.
pub(super) struct Maps<'a> {
    pub config: Array<&'a mut MapData, LbConfig>,
    pub services: HashMap<&'a mut MapData, ServiceKey, Service>,
    pub services_by_id: Array<&'a mut MapData, ServiceSlot>,
    pub vips: HashMap<&'a mut MapData, VipKey, u32>,
    pub backends: Array<&'a mut MapData, Backend>,
    pub maglev: Array<&'a mut MapData, u32>,
    pub flows: HashMap<&'a mut MapData, FlowKey, Flow>,
    pub flow_cache_epoch: Array<&'a mut MapData, u64>,
}

/// Writes the desired state into the maps.
pub(super) fn apply(
    maps: &mut Maps<'_>,
    known: &mut KernelState,
    settings: &LbSettings,
    services: &[ServiceSpec],
) -> Result<ApplyReport, DataplaneError> {
    let problems = validate(settings, services);
    if !problems.is_empty() {
        return Err(DataplaneError::InvalidState { problems });
    }
    let size = settings.maglev_table_size;
    let current = maps
        .config
        .get(&0, 0)
        .map_err(map_error(map_names::CONFIG))?;
    if current.maglev_size != 0 && current.maglev_size != size {
        return Err(DataplaneError::MaglevSizeChanged {
            pinned: current.maglev_size,
            wanted: size,
        });
    }
    maps.config
        .set(0, kernel_config(settings), 0)
        .map_err(map_error(map_names::CONFIG))?;

    let mut report = ApplyReport::default();
    let wanted_backends: BTreeMap<SocketAddr, BackendState> = services
        .iter()
        .flat_map(|service| service.backends.iter())
        .map(|backend| (backend.addr, backend.state))
        .collect();
    // A backend entering the rotation must exist before a Maglev table names it; one leaving
    // it is marked only once the tables stop naming it, or new flows would still reach it
    // while its state already reads draining or down.
    let (entering, leaving): (Vec<_>, Vec<_>) = wanted_backends
        .iter()
        .partition(|(_, state)| **state == BackendState::Up);
    for (&addr, &state) in entering {
        write_backend(maps, known, addr, state)?;
    }
    for service in services {
        let written = write_service(maps, known, service, size)?;
        if let Some(entries) = written {
            report.services_changed += 1;
            report.table_entries_written += entries;
        }
        report.services += 1;
    }
    let mut down = Vec::new();
    for (&addr, &state) in leaving {
        let id = write_backend(maps, known, addr, state)?;
        if state == BackendState::Down {
            down.push(id);
        }
    }
    if !down.is_empty() {
        report.flows_purged += purge_flows(maps, &down)?;
    }
    report.backends = wanted_backends.len();

    let wanted_keys: BTreeSet<ServiceKey> = services.iter().map(ServiceSpec::key).collect();
    let stale_services: Vec<ServiceKey> = known
        .services
        .keys()
        .filter(|key| !wanted_keys.contains(key))
        .copied()
        .collect();
    for key in stale_services {
        match maps.services.remove(&key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(source) => return Err(map_error(map_names::SERVICES)(source)),
        }
        // After the service entry: from here its tracked flows no longer pass the
        // established-flow check, and a packet of theirs finds no service.
        if let Some(id) = known.services.remove(&key) {
            maps.services_by_id
                .set(id, ServiceSlot::default(), 0)
                .map_err(map_error(map_names::SERVICES_BY_ID))?;
            // The id may go to another service, whose halves hold this one's tables.
            known.tables.remove(&id);
        }
        report.services_removed += 1;
    }
    if report.services_removed > 0 {
        // Cached copies of their flows carry the service's mode: they go too.
        bump_flow_cache_epoch(&mut maps.flow_cache_epoch)?;
    }
    sync_vips(&mut maps.vips, services)?;

    let stale_backends: Vec<(SocketAddr, u32)> = known
        .backends
        .iter()
        .filter(|(addr, _)| !wanted_backends.contains_key(addr))
        .map(|(addr, id)| (*addr, *id))
        .collect();
    if !stale_backends.is_empty() {
        let stale_ids: Vec<u32> = stale_backends.iter().map(|(_, id)| *id).collect();
        // Mark them down first so the kernel stops using them, then drop their flows; only
        // then may an id be handed to another backend.
        for &id in &stale_ids {
            maps.backends
                .set(id, Backend::default(), 0)
                .map_err(map_error(map_names::BACKENDS))?;
        }
        report.flows_purged += purge_flows(maps, &stale_ids)?;
        for (addr, _) in stale_backends {
            known.backends.remove(&addr);
            report.backends_removed += 1;
        }
    }
    warm_neighbours(wanted_backends.keys().map(SocketAddr::ip));
    Ok(report)
}

/// Writes `addr`'s entry in the backend table in `state`; returns its id.
fn write_backend(
    maps: &mut Maps<'_>,
    known: &mut KernelState,
    addr: SocketAddr,
    state: BackendState,
) -> Result<u32, DataplaneError> {
    let id = known.backend_id(addr);
    let backend = Backend {
        addr: addr_bytes(addr.ip()),
        port_be: addr.port().to_be(),
        family: family(addr.ip()),
        _pad: 0,
        state: kernel_state(state),
    };
    maps.backends
        .set(id, backend, 0)
        .map_err(map_error(map_names::BACKENDS))?;
    Ok(id)
}

fn kernel_config(settings: &LbSettings) -> LbConfig {
    let source = |addr: Option<IpAddr>| addr.map(addr_bytes).unwrap_or([0; 16]);
    LbConfig {
        snat_v4: source(settings.nat_source_v4.map(IpAddr::V4)),
        snat_v6: source(settings.nat_source_v6.map(IpAddr::V6)),
        dsr_src_v4: addr_bytes(IpAddr::V4(settings.dsr_source_v4)),
        dsr_src_v6: addr_bytes(IpAddr::V6(settings.dsr_source_v6)),
        maglev_size: settings.maglev_table_size,
        nat_port_min: *settings.nat_ports.start(),
        nat_port_max: *settings.nat_ports.end(),
        flags: if settings.pass_fragments {
            CONFIG_PASS_FRAGMENTS
        } else {
            0
        },
        nat_port_hold_ms: settings
            .nat_port_hold
            .as_millis()
            .try_into()
            .unwrap_or(u32::MAX),
    }
}

/// Builds the service's Maglev table from its `up` backends, writes it into the half the kernel
/// is not reading (only the entries that differ from what that half holds, when this process
/// knows it), then flips the service to it in one map update. Returns the entries written, or
/// `None` when neither the table nor the mode changed (nothing is written).
fn write_service(
    maps: &mut Maps<'_>,
    known: &mut KernelState,
    service: &ServiceSpec,
    size: u32,
) -> Result<Option<usize>, DataplaneError> {
    let key = service.key();
    let id = known.service_id(key);
    let live: Vec<MaglevBackend> = service
        .backends
        .iter()
        .filter(|backend| backend.state == BackendState::Up && backend.weight > 0)
        .map(|backend| MaglevBackend {
            id: known.backend_id(backend.addr),
            key: MaglevBackend::socket_addr_key(backend.addr),
            weight: backend.weight,
        })
        .collect();
    if live.is_empty() {
        warn!(
            service = %format!("{}:{}", service.vip, service.port),
            "no backend is up: the service drops new flows"
        );
    }
    let table = maglev::build_table(&live, size).map_err(|source| DataplaneError::Maglev {
        service: format!("{}:{}", service.vip, service.port),
        source,
    })?;
    let mode = match service.mode {
        ForwardingMode::Nat => MODE_NAT,
        ForwardingMode::Dsr => MODE_DSR,
    };
    // A new service has no flows yet; a removed one's copies were voided when it went.
    let (active, mode_changed, in_kernel) = match maps.services.get(&key, 0) {
        Ok(current) => (current.active_table & 1, current.mode != mode, true),
        Err(aya::maps::MapError::KeyNotFound) => (1, false, false),
        Err(source) => return Err(map_error(map_names::SERVICES)(source)),
    };
    let halves = known.tables.entry(id).or_default();
    let table_is_live = in_kernel && halves[active as usize].as_deref() == Some(&table[..]);
    if table_is_live && !mode_changed {
        return Ok(None);
    }
    let (half, written) = if table_is_live {
        // Only the mode changes: the service entry is rewritten around the same half.
        (active, 0)
    } else {
        let next = 1 - active;
        // Taken out while the half is written: a write that fails halfway leaves it unknown.
        let previous = halves[next as usize].take();
        let base = (id * 2 + next) * size;
        let mut written = 0;
        for (offset, backend_id) in table.iter().enumerate() {
            if previous
                .as_ref()
                .is_some_and(|previous| previous.get(offset) == Some(backend_id))
            {
                continue;
            }
            maps.maglev
                .set(base + offset as u32, *backend_id, 0)
                .map_err(map_error(map_names::MAGLEV))?;
            written += 1;
        }
        (next, written)
    };
    // Before the service entry, so every flow the kernel opens for it finds its slot.
    maps.services_by_id
        .set(id, ServiceSlot { key, mode }, 0)
        .map_err(map_error(map_names::SERVICES_BY_ID))?;
    if mode_changed {
        // Cached copies of the service's flows carry its mode.
        bump_flow_cache_epoch(&mut maps.flow_cache_epoch)?;
    }
    let entry = Service {
        id,
        mode,
        active_table: half,
        _pad: 0,
    };
    maps.services
        .insert(key, entry, 0)
        .map_err(map_error(map_names::SERVICES))?;
    debug!(
        service = %format!("{}:{}", service.vip, service.port),
        id,
        table = half,
        written,
        "Maglev table live"
    );
    halves[half as usize] = Some(table);
    Ok(Some(written))
}

fn sync_vips(
    vips: &mut HashMap<&mut MapData, VipKey, u32>,
    services: &[ServiceSpec],
) -> Result<(), DataplaneError> {
    let wanted: BTreeSet<VipKey> = services
        .iter()
        .map(|service| VipKey {
            vip: addr_bytes(service.vip),
            family: family(service.vip),
            _pad: [0; 3],
        })
        .collect();
    let present: Vec<VipKey> = vips
        .keys()
        .collect::<Result<_, _>>()
        .map_err(map_error(map_names::VIPS))?;
    for key in present.iter().filter(|key| !wanted.contains(key)) {
        vips.remove(key).map_err(map_error(map_names::VIPS))?;
    }
    for key in wanted {
        vips.insert(key, 0, 0).map_err(map_error(map_names::VIPS))?;
    }
    Ok(())
}

/// Deletes the tracked flows of the given backends (already marked down or removed in
/// `BACKENDS`), voiding the kernel's cached copies of flows before and after (its per-CPU flow
/// cache, which userspace cannot reach, holds them until it sees a new epoch): before, so no
/// packet follows a copy to such a backend while the walk goes on; after, for copies filled
/// from entries the walk deleted. Returns how many were deleted.
fn purge_flows(maps: &mut Maps<'_>, backend_ids: &[u32]) -> Result<usize, DataplaneError> {
    bump_flow_cache_epoch(&mut maps.flow_cache_epoch)?;
    let flows_error = |source| DataplaneError::MapBatch {
        name: map_names::FLOWS,
        source,
    };
    let mut doomed = Vec::new();
    batch::for_each(&maps.flows, |key, flow: &Flow| {
        if backend_ids.contains(&flow.backend_id) {
            doomed.push(*key);
        }
    })
    .map_err(flows_error)?;
    let purged = batch::delete(&mut maps.flows, &doomed).map_err(flows_error)?;
    bump_flow_cache_epoch(&mut maps.flow_cache_epoch)?;
    Ok(purged)
}

/// Voids every copy in the kernel's flow cache. Userspace is the counter's only writer (the
/// kernel reads it before it copies a flow), but within lb-control both `apply` and the HA flow
/// sync's installs bump it: the lock keeps their reads and writes back from interleaving, where
/// two bumps could write one value and the second leave copies filled under the first valid.
pub(super) fn bump_flow_cache_epoch<T: BorrowMut<MapData>>(
    epoch: &mut Array<T, u64>,
) -> Result<(), DataplaneError> {
    static WRITER: Mutex<()> = Mutex::new(());
    let _writing = WRITER.lock().unwrap_or_else(PoisonError::into_inner);
    let error = map_error(map_names::FLOW_CACHE_EPOCH);
    let current = epoch.get(&0, 0).map_err(&error)?;
    epoch.set(0, current.wrapping_add(1), 0).map_err(error)
}

/// Sends one empty datagram towards each address's discard port, so the kernel resolves the
/// neighbour entry of its next hop: the XDP program's FIB lookup needs the next hop's MAC address
/// and drops until it is known. With a hop limit of 1 the datagram goes no further than that
/// next hop (the address itself when it is on the link, else the router towards it).
pub(super) fn warm_neighbours(addresses: impl Iterator<Item = IpAddr>) {
    for address in addresses {
        if let Err(error) = send_to_next_hop(address) {
            debug!(%address, %error, "could not prompt neighbour resolution");
        }
    }
}

fn send_to_next_hop(address: IpAddr) -> std::io::Result<()> {
    let socket = match address {
        IpAddr::V4(_) => {
            let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
            socket.set_ttl(1)?;
            socket
        }
        IpAddr::V6(_) => {
            let socket = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0))?;
            let hops: libc::c_int = 1;
            // SAFETY: a valid socket, and an option value of the size given.
            let rc = unsafe {
                libc::setsockopt(
                    socket.as_raw_fd(),
                    libc::IPPROTO_IPV6,
                    libc::IPV6_UNICAST_HOPS,
                    std::ptr::from_ref(&hops).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
            socket
        }
    };
    socket.send_to(&[], SocketAddr::new(address, 9)).map(drop)
}
