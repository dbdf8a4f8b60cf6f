//! The XDP program. This file holds the maps and the entry point; each pipeline step lives in
//! its own module and returns a verdict or lets the packet continue.
//!
//! Pipeline: parse → count → blocklist → NAT reply → tracked flow (this CPU's flow cache, whose
//! copy carries backend, mode and route; else `FLOWS`, its service checked by id)
//! → else service → fragments → flow (conntrack or Maglev) → NAT or DSR rewrite → next hop
//! (the flow-cache copy's route, else the route cache, else FIB) → XDP_TX / redirect.
//!
//! Rules the verifier and the code generator impose, learned the hard way:
//! - The established path is one function: every call of a subprogram costs a frame setup and
//!   a return through the kernel's return thunk. Only cold paths are calls of their own
//!   (`inline(never)`): new flows, NAT replies, FIB lookups, DSR, fragments.
//! - 512 bytes of stack across the deepest call chain, and subprograms take at most 5 args.
//! - The program is built allowing misaligned loads and stores (lb-ebpf/build.rs): an address
//!   in a packet is one load, not four or sixteen byte loads, shifts and ors, which also keeps
//!   the register pressure (and the spills that fill the stack) down. The verifier accepts
//!   misaligned access to packets and map values but not to the stack. So structures of bytes
//!   (keys, headers, route entries) are built in the per-CPU `SCRATCH` area, never on the
//!   stack; a verifier log saying "misaligned stack access" means one slipped onto it.
//! - Non-inlined functions return no `Option`/`Result` with a payload in padding (the kernel
//!   rejects the BTF for it): they fill in through `&mut` instead.
//! - Packet offsets are masked (`parse::OFFSET_MASK`) so the verifier can bound them, and a
//!   subprogram never does arithmetic on `data_end` (nor on a packet pointer the compiler
//!   passed it; keep packet accesses in the function that checked them).
#![no_std]
#![no_main]
#![allow(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys are passed by reference on purpose: by value they are copied onto the stack"
)]

mod csum;
mod dsr;
mod flow;
mod flow_cache;
mod forward;
mod lookup;
mod nat;
mod parse;
mod stats;

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC, xdp_action},
    macros::{map, xdp},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, lpm_trie::Key},
    programs::XdpContext,
};
use aya_log_ebpf::debug;
use lb_common::{
    flow::FlowKey,
    maps::{
        Backend, BackendStats, BlockV4, BlockV6, DEFAULT_MAX_FLOWS, DropReason,
        FLOW_CACHE_SLOTS_PER_CPU, Flow, LbConfig, MAX_BACKENDS, MAX_SERVICES, MODE_DSR, NatKey,
        NatValue, Service, ServiceKey, ServiceSlot, ServiceStats, VipKey,
    },
    stats::{Counters, ProtoSlot},
};

use crate::stats::{NO_SERVICE, Verdict};

/// Packets and bytes per protocol, indexed by `ProtoSlot`. Every map is pinned by name, so a
/// restarted lb-control finds the same flows, tables and counters.
#[map]
static PROTO_STATS: PerCpuArray<Counters> = PerCpuArray::pinned(ProtoSlot::COUNT, 0);

/// Program-wide settings (NAT source addresses, port range, Maglev size), one entry.
#[map]
static CONFIG: Array<LbConfig> = Array::pinned(1, 0);

/// Services by (VIP, port, protocol).
#[map]
static SERVICES: HashMap<ServiceKey, Service> = HashMap::pinned(MAX_SERVICES, 0);

/// Services by id: what the established-flow path checks a tracked flow's service against.
#[map]
static SERVICES_BY_ID: Array<ServiceSlot> = Array::pinned(MAX_SERVICES, 0);

/// Addresses that carry at least one service, for fragments that have no port to match.
#[map]
static VIPS: HashMap<VipKey, u32> = HashMap::pinned(MAX_SERVICES, 0);

/// Backends by id.
#[map]
static BACKENDS: Array<Backend> = Array::pinned(MAX_BACKENDS, 0);

/// Maglev tables: two per service (live and being written), each `LbConfig::maglev_size`
/// backend ids, at `(service_id * 2 + half) * maglev_size`. Userspace sizes it at load time.
#[map]
static MAGLEV: Array<u32> = Array::pinned(1, 0);

/// Connection tracking: client 5-tuple → backend (and NAT port).
///
/// One LRU list for all CPUs. Per-CPU lists (`BPF_F_NO_COMMON_LRU`) were measured slower here: on
/// this kernel each insert into them rotates the CPU's lists, which cost a new flow more
/// (`bench xdp`: 1.06-1.67 us against 0.95-1.12 us) than the shared list's lock saves.
#[map]
static FLOWS: LruHashMap<FlowKey, Flow> = LruHashMap::pinned(DEFAULT_MAX_FLOWS, 0);

/// Recently used flows, `FLOW_CACHE_SLOTS_PER_CPU` slots for each CPU (CPU c's from
/// c * FLOW_CACHE_SLOTS_PER_CPU), by a hash of their key: what an established flow's packets
/// look up first (see `flow_cache`). Userspace sizes it for the host's possible CPUs.
///
/// A plain array rather than a per-CPU one: a slot is then one offset from the map's start,
/// where a per-CPU array first loads the slot's per-CPU pointer (a second cache miss, in a
/// table of 8192). Mmapable, so its values start on a page boundary and each 128-byte slot
/// fills two cache lines. Not pinned: a new program starts with it empty.
#[map]
static FLOW_CACHE: Array<flow_cache::CachedFlow> =
    Array::with_max_entries(FLOW_CACHE_SLOTS_PER_CPU, BPF_F_MMAPABLE);

/// One counter userspace bumps after it deletes flows from `FLOWS`: cached copies of flows
/// filled under an older value are void.
#[map]
static FLOW_CACHE_EPOCH: Array<u64> = Array::pinned(1, 0);

/// NAT replies: (backend, NAT port) → the client's 5-tuple. Twice the flows, so a live flow's
/// reverse entry is not evicted before its forward entry.
#[map]
static NAT_REVERSE: LruHashMap<NatKey, NatValue> = LruHashMap::pinned(2 * DEFAULT_MAX_FLOWS, 0);

/// Per-service counters, by service id.
#[map]
static SERVICE_STATS: PerCpuArray<ServiceStats> = PerCpuArray::pinned(MAX_SERVICES, 0);

/// Per-backend counters, by backend id.
#[map]
static BACKEND_STATS: PerCpuArray<BackendStats> = PerCpuArray::pinned(MAX_BACKENDS, 0);

/// Drops that belong to no service (blocked sources, fragments), by `DropReason`.
#[map]
static DROP_STATS: PerCpuArray<u64> = PerCpuArray::pinned(DropReason::COUNT as u32, 0);

/// Routes to backends as the FIB last gave them, by backend id, per CPU: established flows skip
/// the FIB lookup for up to a second.
#[map]
static ROUTES: PerCpuArray<forward::CachedRoute> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// Routes to clients (NAT replies) as the FIB last gave them, per CPU, in slots by a hash of
/// the client's address: replies skip the FIB lookup for up to a second too.
#[map]
static CLIENT_ROUTES: PerCpuArray<forward::CachedRoute> =
    PerCpuArray::with_max_entries(forward::CLIENT_ROUTE_SLOTS, 0);

/// Scratch space for the packet being handled: one per CPU. It holds the parsed packet and
/// every structure of bytes the program builds, so they take no room in the 512-byte stack
/// and are never on it: the program is built allowing misaligned loads and stores (one load
/// for an address in a packet, not one per byte), which the verifier accepts in packets and map
/// values but not on the stack.
#[map]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// Blocked IPv4 source prefixes; userspace expires them.
#[map]
static BLOCKLIST_V4: LpmTrie<BlockV4, u32> = LpmTrie::pinned(65_536, BPF_F_NO_PREALLOC);

/// Blocked IPv6 source prefixes; userspace expires them.
#[map]
static BLOCKLIST_V6: LpmTrie<BlockV6, u32> = LpmTrie::pinned(65_536, BPF_F_NO_PREALLOC);

/// The blocklist's version (`BLOCKLIST_VERSION`; userspace keeps it current): while it is
/// zero the trie lookups, the costliest step of an unblocked packet, are skipped, and a tracked
/// flow checks its source once per version.
#[map]
static BLOCKLIST_ENTRIES: Array<u32> = Array::pinned(1, 0);

/// The per-CPU scratch area (see `SCRATCH`).
#[repr(C, align(8))]
pub struct Scratch {
    pub ip: parse::IpPacket,
    /// The blocklist version read for this packet (a new flow records it).
    pub blocklist_version: u32,
    pub selected: flow::Selected,
    /// A new flow's entry while it is built.
    pub flow: Flow,
    /// The flow whose NAT port a new flow took over (family 0: none).
    pub taken_over: FlowKey,
    pub hop: forward::NextHop,
    pub route: forward::CachedRoute,
    pub fib: forward::FibParams,
    pub service_key: ServiceKey,
    pub vip_key: VipKey,
    pub nat_key: NatKey,
    pub block_v4: Key<BlockV4>,
    pub block_v6: Key<BlockV6>,
    /// DSR's outer headers while they are built.
    pub outer_v4: [u8; dsr::IPV4_HEADER_LEN],
    pub outer_v6: [u8; dsr::IPV6_HEADER_LEN],
}

#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    match try_lb_xdp(&ctx) {
        Verdict::Action(action) => action,
        Verdict::Drop(reason, service_id) => {
            stats::count_drop(reason, service_id);
            xdp_action::XDP_DROP
        }
    }
}

#[inline(always)]
fn try_lb_xdp(ctx: &XdpContext) -> Verdict {
    let len = ctx.data_end() - ctx.data();
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return Verdict::pass();
    };
    // SAFETY: the per-CPU scratch slot is this program run's alone.
    let scratch = unsafe { &mut *scratch };
    let ip = &mut scratch.ip;
    *ip = parse::IpPacket::default();
    let slot = parse::parse_frame(ctx, ip);
    stats::count_frame(slot, len);
    match slot {
        ProtoSlot::Malformed => {
            debug!(
                ctx,
                "passing a malformed frame of {} bytes to the stack", len
            );
            return Verdict::pass();
        }
        ProtoSlot::NonIp => return Verdict::pass(),
        _ => {}
    }
    // Blocked sources are dropped before any other work. The check is left out while the
    // blocklist is empty, and for a tracked flow whose source passed it under the current
    // blocklist version; `check_blocklist` says whether this packet still needs it. Only TCP
    // segments other than connection attempts look for their flow first: a blocked source's
    // SYNs and datagrams are dropped without a flow lookup.
    let blocklist = lookup::blocklist_version();
    scratch.blocklist_version = blocklist;
    let mut check_blocklist = blocklist != 0;
    if check_blocklist && !scratch.ip.may_be_established() {
        if lookup::is_source_blocked(scratch) {
            return Verdict::Drop(DropReason::Blocked, NO_SERVICE);
        }
        check_blocklist = false;
    }
    let Some(config) = CONFIG.get(0) else {
        return Verdict::pass();
    };
    let ip = &scratch.ip;
    // A fragmented reply is not translated: its later fragments carry no ports to match.
    if ip.has_ports && !ip.is_fragment && ip.key.dst_addr == *config.nat_source(ip.key.family) {
        if check_blocklist && lookup::is_source_blocked(scratch) {
            return Verdict::Drop(DropReason::Blocked, NO_SERVICE);
        }
        check_blocklist = false;
        if let Some(verdict) = nat::reverse(ctx, scratch, config) {
            return verdict;
        }
    }
    // Established flows first: a tracked flow names its service, so its packets skip the
    // service lookup.
    let mut egress = None;
    let mode = match flow::established_fast(scratch, &mut check_blocklist, &mut egress) {
        Some(Ok(mode)) => mode,
        Some(Err(verdict)) => return verdict,
        None if check_blocklist && lookup::is_source_blocked(scratch) => {
            return Verdict::Drop(DropReason::Blocked, NO_SERVICE);
        }
        None => match choose_backend(scratch, config) {
            Ok(mode) => mode,
            Err(verdict) => return verdict,
        },
    };
    if scratch.selected.is_new {
        stats::count_new_flow(&scratch.selected);
    }
    let verdict = if mode == MODE_DSR {
        dsr::encapsulate(ctx, scratch, config, egress)
    } else {
        nat::forward(ctx, scratch, config, egress)
    };
    if let Verdict::Action(_) = verdict {
        let ip = &scratch.ip;
        stats::count_forward(&scratch.selected, ip.l3() + usize::from(ip.ip_len));
    }
    verdict
}

/// The packet's service, by key, and its backend (tracked or new) in `scratch.selected`: for
/// packets the established-flow path did not settle. Returns the service's mode, or what to do
/// with a packet that goes to no backend.
#[inline(always)]
fn choose_backend(scratch: &mut Scratch, config: &LbConfig) -> Result<u32, Verdict> {
    let Some(service) = lookup::service_of(scratch) else {
        if scratch.ip.is_fragment && lookup::is_vip(scratch) {
            return Err(flow::fragment_verdict(config, NO_SERVICE));
        }
        return Err(Verdict::pass());
    };
    let ip = &scratch.ip;
    if ip.is_fragment {
        return Err(flow::fragment_verdict(config, service.id));
    }
    // Before a backend is chosen, so a packet that cannot be forwarded claims no flow entry
    // or NAT port.
    if ip.ttl <= 1 {
        return Err(Verdict::Drop(DropReason::TtlExceeded, service.id));
    }
    flow::select_backend(scratch, service, config)
        .map_err(|reason| Verdict::Drop(reason, service.id))?;
    Ok(service.mode)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
