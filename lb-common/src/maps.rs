//! Layouts of the load balancer's maps: keys, values and capacities.
//!
//! Addresses are 16-byte fields holding either an IPv6 address or an IPv4 address in the first
//! 4 bytes (rest zero), with a `family` field saying which. Fields ending in `_be` hold network
//! byte order, as on the wire.

use crate::flow::FlowKey;

/// Services the kernel can hold; service ids index `SERVICE_STATS` and the Maglev tables.
pub const MAX_SERVICES: u32 = 16;
const _: () = assert!(MAX_SERVICES <= u8::MAX as u32, "Flow::service_id is a u8");
/// Backends the kernel can hold; backend ids index `BACKENDS` and `BACKEND_STATS`.
pub const MAX_BACKENDS: u32 = 1024;
/// Default connection-tracking capacity (LRU: the least recently used flow is evicted first).
pub const DEFAULT_MAX_FLOWS: u32 = 262_144;
/// Slots of the XDP program's flow cache per CPU (a power of two); `FLOW_CACHE` holds this
/// many for each possible CPU, which userspace counts when it loads the program.
pub const FLOW_CACHE_SLOTS_PER_CPU: u32 = 8192;

/// `Service::mode` values.
pub const MODE_NAT: u32 = 0;
pub const MODE_DSR: u32 = 1;

/// Identifies a service: the destination a client connects to.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub vip: [u8; 16],
    pub port_be: u16,
    /// IANA protocol number (6 TCP, 17 UDP).
    pub proto: u8,
    pub family: u8,
}

const _: () = assert!(core::mem::size_of::<ServiceKey>() == 20);

/// A VIP with at least one service: fragments to it cannot be matched to a port, so they are
/// dropped (or passed, by setting) by address alone.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VipKey {
    pub vip: [u8; 16],
    pub family: u8,
    pub _pad: [u8; 3],
}

const _: () = assert!(core::mem::size_of::<VipKey>() == 20);

/// A service's forwarding settings.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Service {
    /// Index of the service's stats and Maglev table pair.
    pub id: u32,
    /// `MODE_NAT` or `MODE_DSR`.
    pub mode: u32,
    /// Which of the service's two Maglev tables is live (0 or 1): userspace writes the other
    /// and then flips this, so a packet never sees a half-written table.
    pub active_table: u32,
    pub _pad: u32,
}

const _: () = assert!(core::mem::size_of::<Service>() == 16);

/// A Maglev table entry that leads nowhere: the service has no live backend.
pub const NO_BACKEND: u32 = u32::MAX;

/// `Backend::state` values.
pub const BACKEND_UP: u32 = 0;
/// Keeps its established flows, gets no new ones (it is left out of the Maglev table).
pub const BACKEND_DRAINING: u32 = 1;
/// Its flows are dead: packets of a flow pinned to it are re-hashed to a live backend.
pub const BACKEND_DOWN: u32 = 2;

/// What a service id stands for, indexed by the id: the key of the service that holds it and
/// its mode; all zero while the id is free. A tracked flow records its service's id, and the
/// established-flow path checks the packet against this entry instead of looking the service
/// up by key. Userspace writes it with the service and clears it when the service goes.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceSlot {
    pub key: ServiceKey,
    /// `MODE_NAT` or `MODE_DSR`.
    pub mode: u32,
}

const _: () = assert!(core::mem::size_of::<ServiceSlot>() == 24);

/// Where a backend id leads.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub addr: [u8; 16],
    pub port_be: u16,
    pub family: u8,
    pub _pad: u8,
    /// `BACKEND_UP`, `BACKEND_DRAINING` or `BACKEND_DOWN`.
    pub state: u32,
}

const _: () = assert!(core::mem::size_of::<Backend>() == 24);

/// `Flow::flags` bits.
/// The flow saw a TCP FIN or RST: a later SYN on the same 5-tuple starts a new flow.
pub const FLOW_CLOSING: u8 = 1;

/// A tracked connection: the backend it is pinned to and, in NAT mode, the source port the LB
/// gave it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    pub backend_id: u32,
    /// The flow hash: DSR takes the low bits of its outer source address from it.
    pub hash: u32,
    /// NAT mode: the port the LB uses towards the backend (network byte order).
    pub nat_port_be: u16,
    /// The id of the service the flow was opened for (see `ServiceSlot`).
    pub service_id: u8,
    pub flags: u8,
    /// The blocklist version (see `map_names::BLOCKLIST_VERSION`) the flow's source was last found
    /// unblocked under: while it is current, the flow's packets skip the blocklist tries.
    pub blocklist_version: u32,
    /// `bpf_ktime_get_ns()` of the flow's first packet, then of its last packet once it is
    /// closing (the clock is not read for other packets).
    pub last_seen_ns: u64,
}

const _: () = assert!(core::mem::size_of::<Flow>() == 24);

/// How a backend's reply is matched to its flow in NAT mode: the reply's source (the backend)
/// and destination port (the LB's NAT port). The LB's own address is implied by the family.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NatKey {
    pub backend_addr: [u8; 16],
    pub backend_port_be: u16,
    pub nat_port_be: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

const _: () = assert!(core::mem::size_of::<NatKey>() == 24);

/// The original flow a NAT reply belongs to: the client's 5-tuple, as the forward path saw it.
pub type NatValue = FlowKey;

/// `LbConfig::flags` bits.
/// Pass fragments of service traffic to the kernel stack instead of dropping them.
pub const CONFIG_PASS_FRAGMENTS: u32 = 1;

/// Settings of the whole program, in a one-entry array.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbConfig {
    /// Source address of NAT-mode traffic towards IPv4 backends.
    pub snat_v4: [u8; 16],
    /// Source address of NAT-mode traffic towards IPv6 backends.
    pub snat_v6: [u8; 16],
    /// DSR outer source addresses are this prefix with the low bits taken from the flow hash
    /// (8 for IPv4, 16 for IPv6), so a backend's receive-side scaling spreads flows over its
    /// queues.
    pub dsr_src_v4: [u8; 16],
    pub dsr_src_v6: [u8; 16],
    /// Entries of each Maglev table (a prime from `maglev::TABLE_SIZES`).
    pub maglev_size: u32,
    /// NAT source ports are taken from `[nat_port_min, nat_port_max]` (host byte order).
    pub nat_port_min: u16,
    pub nat_port_max: u16,
    pub flags: u32,
    /// How long a closed TCP flow's NAT port stays out of other flows' reach (its own
    /// reopening takes it at once): longer than the backends' TIME_WAIT.
    pub nat_port_hold_ms: u32,
}

const _: () = assert!(core::mem::size_of::<LbConfig>() == 80);

impl LbConfig {
    /// The NAT source address towards backends of `family`.
    #[inline(always)]
    pub fn nat_source(&self, family: u8) -> &[u8; 16] {
        if family == crate::flow::FAMILY_IPV4 {
            &self.snat_v4
        } else {
            &self.snat_v6
        }
    }
}

/// Second chance (GitHub GLB's model): a TCP segment to the gateway (`addr`, `port_be`) that
/// this host has no socket for goes to `peer`, the other host of the pair, over the private
/// link; that host answers the client directly. One entry in each of two maps:
/// - `SECOND_CHANCE`, a planned handover's: the host that took the gateway's address over
///   sends the segments that open no connection (those of the connections the previous owner
///   still drains) until `until_ns`.
/// - `STANDING_SECOND_CHANCE`, armed by an lb-control in a pair for as long as it is in one:
///   only while this host's gateway has no listener (lb-control crashed or restarting), every
///   segment that finds no socket, SYNs included, so the peer takes the new connections this
///   host would refuse. `until_ns` is 0 (off) or `u64::MAX`: no deadline, since it must
///   outlive the lb-control that armed it.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SecondChance {
    /// The gateway's address; all zero for any address of `family` (a gateway listening on
    /// `0.0.0.0` or `[::]`).
    pub addr: [u8; 16],
    /// The other host's address on the private link.
    pub peer: [u8; 16],
    /// `bpf_ktime_get_ns()` until which packets go to `peer`; 0: off (see above for the
    /// standing entry).
    pub until_ns: u64,
    pub port_be: u16,
    pub family: u8,
    pub peer_family: u8,
    /// The admin API's port at the same address(es), when it listens there too: the standing
    /// entry's, so operators' tools at the floating address reach the other host while this
    /// lb-control is down. 0: none (a handover's entry, an entry of an older lb-control, whose
    /// padding this was).
    pub admin_port_be: u16,
    pub _pad: u16,
}

const _: () = assert!(core::mem::size_of::<SecondChance>() == 48);

/// Why a packet was dropped. Each reason has its own counter.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// The source address is on the blocklist.
    Blocked = 0,
    /// The service has no backend in its Maglev table.
    NoBackend = 1,
    /// A fragment of service traffic (ports unknown), with fragments set to drop.
    Fragment = 2,
    /// TTL or hop limit would reach zero.
    TtlExceeded = 3,
    /// No free NAT port after the bounded number of probes.
    NatPortsExhausted = 4,
    /// The next hop's MAC address is not known yet, or no route.
    NoRoute = 5,
    /// Service traffic with headers too short or lengths that do not add up.
    Malformed = 6,
    /// The frame could not be grown for DSR encapsulation.
    NoHeadroom = 7,
}

impl DropReason {
    pub const COUNT: usize = 8;

    pub const ALL: [DropReason; Self::COUNT] = [
        DropReason::Blocked,
        DropReason::NoBackend,
        DropReason::Fragment,
        DropReason::TtlExceeded,
        DropReason::NatPortsExhausted,
        DropReason::NoRoute,
        DropReason::Malformed,
        DropReason::NoHeadroom,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            DropReason::Blocked => "blocked",
            DropReason::NoBackend => "no_backend",
            DropReason::Fragment => "fragment",
            DropReason::TtlExceeded => "ttl_exceeded",
            DropReason::NatPortsExhausted => "nat_ports_exhausted",
            DropReason::NoRoute => "no_route",
            DropReason::Malformed => "malformed",
            DropReason::NoHeadroom => "no_headroom",
        }
    }
}

/// Per-service counters (per CPU, summed in userspace).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceStats {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub drops: [u64; DropReason::COUNT],
}

const _: () = assert!(core::mem::size_of::<ServiceStats>() == 24 + 8 * DropReason::COUNT);

/// Per-backend counters (per CPU, summed in userspace).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendStats {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

const _: () = assert!(core::mem::size_of::<BackendStats>() == 24);

/// Key of the IPv4 source blocklist (an LPM trie: the prefix length lives in the trie key).
pub type BlockV4 = [u8; 4];
/// Key of the IPv6 source blocklist.
pub type BlockV6 = [u8; 16];

#[cfg(feature = "user")]
mod pod {
    // SAFETY (all): `repr(C)` types made of integers and integer arrays, with every padding
    // byte an explicit field.
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::VipKey {}
    unsafe impl aya::Pod for super::Service {}
    unsafe impl aya::Pod for super::ServiceSlot {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::Flow {}
    unsafe impl aya::Pod for super::NatKey {}
    unsafe impl aya::Pod for super::LbConfig {}
    unsafe impl aya::Pod for super::ServiceStats {}
    unsafe impl aya::Pod for super::BackendStats {}
    unsafe impl aya::Pod for super::SecondChance {}
}
