//! The program's maps, each with what it holds. Every map userspace shares is pinned by the
//! name `lb_common::map_names` gives it, so a restarted lb-control finds the same flows, tables
//! and counters.

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC},
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use lb_common::{
    flow::FlowKey,
    maps::{
        Backend, BackendStats, BlockV4, BlockV6, DEFAULT_MAX_FLOWS, DropReason,
        FLOW_CACHE_SLOTS_PER_CPU, Flow, LbConfig, MAX_BACKENDS, MAX_SERVICES, NatKey, NatValue,
        SecondChance, Service, ServiceKey, ServiceSlot, ServiceStats, VipKey,
    },
    stats::{Counters, ProtoSlot},
};

use crate::types::{CachedFlow, CachedRoute, Scratch};

/// Entries of `CLIENT_ROUTES` (a power of two): routes to this many clients per CPU stay
/// cached, fewer where their addresses collide.
pub const CLIENT_ROUTE_SLOTS: u32 = 4096;

/// Packets and bytes per protocol, indexed by `ProtoSlot`.
#[map]
pub static PROTO_STATS: PerCpuArray<Counters> = PerCpuArray::pinned(ProtoSlot::COUNT, 0);

/// Program-wide settings (NAT source addresses, port range, Maglev size), one entry.
#[map]
pub static CONFIG: Array<LbConfig> = Array::pinned(1, 0);

/// Services by (VIP, port, protocol).
#[map]
pub static SERVICES: HashMap<ServiceKey, Service> = HashMap::pinned(MAX_SERVICES, 0);

/// Services by id: what the established-flow path checks a tracked flow's service against.
#[map]
pub static SERVICES_BY_ID: Array<ServiceSlot> = Array::pinned(MAX_SERVICES, 0);

/// Addresses that carry at least one service, for fragments that have no port to match.
#[map]
pub static VIPS: HashMap<VipKey, u32> = HashMap::pinned(MAX_SERVICES, 0);

/// Backends by id.
#[map]
pub static BACKENDS: Array<Backend> = Array::pinned(MAX_BACKENDS, 0);

/// Maglev tables: two per service (live and being written), each `LbConfig::maglev_size`
/// backend ids, at `(service_id * 2 + half) * maglev_size`. Userspace sizes it at load time.
#[map]
pub static MAGLEV: Array<u32> = Array::pinned(1, 0);

/// Connection tracking: client 5-tuple → backend (and NAT port).
///
/// One LRU list for all CPUs. Per-CPU lists (`BPF_F_NO_COMMON_LRU`) were measured slower here: on
/// this kernel each insert into them rotates the CPU's lists, which cost a new flow more
/// (`bench xdp`: 1.06-1.67 us against 0.95-1.12 us) than the shared list's lock saves.
#[map]
pub static FLOWS: LruHashMap<FlowKey, Flow> = LruHashMap::pinned(DEFAULT_MAX_FLOWS, 0);

/// Recently used flows, `FLOW_CACHE_SLOTS_PER_CPU` slots for each CPU (CPU c's from
/// c * FLOW_CACHE_SLOTS_PER_CPU), by a hash of their key: what an established flow's packets
/// look up first (see `flow_cache`). Userspace sizes it for the host's possible CPUs.
///
/// A plain array rather than a per-CPU one: a slot is then one offset from the map's start,
/// where a per-CPU array first loads the slot's per-CPU pointer (a second cache miss, in a
/// table of 8192). Mmapable, so its values start on a page boundary and each 128-byte slot
/// fills two cache lines. Not pinned: a new program starts with it empty.
#[map]
pub static FLOW_CACHE: Array<CachedFlow> =
    Array::with_max_entries(FLOW_CACHE_SLOTS_PER_CPU, BPF_F_MMAPABLE);

/// One counter userspace bumps after it deletes flows from `FLOWS`: cached copies of flows
/// filled under an older value are void.
#[map]
pub static FLOW_CACHE_EPOCH: Array<u64> = Array::pinned(1, 0);

/// NAT replies: (backend, NAT port) → the client's 5-tuple. Twice the flows, so a live flow's
/// reverse entry is not evicted before its forward entry.
#[map]
pub static NAT_REVERSE: LruHashMap<NatKey, NatValue> = LruHashMap::pinned(2 * DEFAULT_MAX_FLOWS, 0);

/// Per-service counters, by service id.
#[map]
pub static SERVICE_STATS: PerCpuArray<ServiceStats> = PerCpuArray::pinned(MAX_SERVICES, 0);

/// Per-backend counters, by backend id.
#[map]
pub static BACKEND_STATS: PerCpuArray<BackendStats> = PerCpuArray::pinned(MAX_BACKENDS, 0);

/// Drops that belong to no service (blocked sources, fragments), by `DropReason`.
#[map]
pub static DROP_STATS: PerCpuArray<u64> = PerCpuArray::pinned(DropReason::COUNT as u32, 0);

/// Routes to backends as the FIB last gave them, by backend id, per CPU: established flows skip
/// the FIB lookup for up to a second.
#[map]
pub static ROUTES: PerCpuArray<CachedRoute> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// Routes to clients (NAT replies) as the FIB last gave them, per CPU, in slots by a hash of
/// the client's address: replies skip the FIB lookup for up to a second too.
#[map]
pub static CLIENT_ROUTES: PerCpuArray<CachedRoute> =
    PerCpuArray::with_max_entries(CLIENT_ROUTE_SLOTS, 0);

/// Scratch space for the packet being handled: one per CPU. It holds the parsed packet and
/// every structure of bytes the program builds, so they take no room in the 512-byte stack
/// and are never on it: the program is built allowing misaligned loads and stores (one load
/// for an address in a packet, not one per byte), which the verifier accepts in packets and map
/// values but not on the stack.
#[map]
pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// Blocked IPv4 source prefixes; userspace expires them.
#[map]
pub static BLOCKLIST_V4: LpmTrie<BlockV4, u32> = LpmTrie::pinned(65_536, BPF_F_NO_PREALLOC);

/// Blocked IPv6 source prefixes; userspace expires them.
#[map]
pub static BLOCKLIST_V6: LpmTrie<BlockV6, u32> = LpmTrie::pinned(65_536, BPF_F_NO_PREALLOC);

/// The blocklist's version, one entry (userspace keeps it current): while it is zero the trie
/// lookups, the costliest step of an unblocked packet, are skipped, and a tracked flow checks
/// its source once per version.
#[map]
pub static BLOCKLIST_VERSION: Array<u32> = Array::pinned(1, 0);

/// The second chance of a planned handover (see `second_chance`), one entry: userspace arms it
/// when the other host of the pair hands its gateway address over to this one. Pinned, so a
/// restarted lb-control leaves it in force until its `until_ns`.
#[map]
pub static SECOND_CHANCE: Array<SecondChance> = Array::pinned(1, 0);

/// Packets second chance sent to the previous owner, one counter per CPU.
#[map]
pub static SECOND_CHANCE_PACKETS: PerCpuArray<u64> = PerCpuArray::pinned(1, 0);

/// The standing second chance of a pair member (see `second_chance`), one entry: armed by
/// lb-control while it is in a pair, with no deadline. Pinned, so it stays armed when
/// lb-control dies: that is when it matters.
#[map]
pub static STANDING_SECOND_CHANCE: Array<SecondChance> = Array::pinned(1, 0);

/// Packets the standing second chance sent to the other host, one counter per CPU.
#[map]
pub static STANDING_SECOND_CHANCE_PACKETS: PerCpuArray<u64> = PerCpuArray::pinned(1, 0);
