//! Backend selection: an established flow keeps its backend (connection tracking); a new flow
//! gets one from the service's live Maglev table, and in NAT mode a source port.

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_ns};
use lb_common::{
    flow::{FlowKey, flow_hash},
    maps::{
        BACKEND_DOWN, Backend, CONFIG_PASS_FRAGMENTS, DropReason, FLOW_CLOSING, Flow, LbConfig,
        MODE_NAT, NO_BACKEND, NatKey, Service,
    },
};

use crate::{
    flow_cache, lookup,
    maps::{BACKENDS, FLOWS, MAGLEV, NAT_REVERSE, SCRATCH, SERVICES_BY_ID},
    parse::{IPPROTO_TCP, IpPacket, TCP_FIN, TCP_RST},
    types::{CopiedEgress, NO_SERVICE, Scratch, Selected, Verdict},
};

/// NAT source ports tried for a new flow before giving up.
const NAT_PORT_PROBES: u32 = 8;

impl Selected {
    /// A tracked flow's backend.
    #[inline(always)]
    fn tracked(service_id: u32, flow: &Flow, backend: &Backend) -> Selected {
        Selected {
            service_id,
            backend_id: flow.backend_id,
            backend: *backend,
            nat_port_be: flow.nat_port_be,
            hash: flow.hash,
            is_new: false,
        }
    }
}

#[inline(always)]
pub fn fragment_verdict(config: &LbConfig, service_id: u32) -> Verdict {
    if config.flags & CONFIG_PASS_FRAGMENTS != 0 {
        Verdict::pass()
    } else {
        Verdict::Drop(DropReason::Fragment, service_id)
    }
}

/// The established-flow path: when the packet belongs to a tracked flow whose service (by the
/// id the flow recorded) still has the packet's destination, fills in its backend and returns
/// the service's mode; or the verdict of a packet that cannot go on. `None` leaves the packet
/// to the full path (service by key, then tracked or new flow): no tracked flow, its service
/// gone or changed, its backend down, or a connection attempt (SYN). A flow this CPU's flow
/// cache holds a current copy of comes with its backend and mode, checked when the copy was
/// filled, and `egress` is set to the copy's route to it (see `forward::to_next_hop`).
///
/// `check_blocklist`: the packet's source still needs the blocklist check. A flow whose source
/// passed it under the current blocklist version skips it; else it is done here (a blocked
/// source's packet is dropped before it touches its flow) and recorded in the flow.
#[inline(always)]
pub fn established_fast(
    scratch: &mut Scratch,
    check_blocklist: &mut bool,
    egress: &mut CopiedEgress,
) -> Option<Result<u32, Verdict>> {
    let ip = &scratch.ip;
    // A connection attempt is mostly a new flow: one `FLOWS` lookup, in `select_backend`, serves
    // it and the rarer retransmitted or reopening SYN.
    if !ip.has_ports || ip.is_fragment || ip.is_connection_attempt() {
        return None;
    }
    let lookup = flow_cache::find(ip)?;
    let flow = lookup.flow;
    // SAFETY: the pointer comes from the map (or this CPU's cache slot); the fields written in
    // place (`flags`, `last_seen_ns`, `blocklist_version`, `service_id`) are advisory or
    // rechecked.
    let service_id = u32::from(unsafe { (*flow).service_id });
    let mode = match lookup.hit() {
        Some(cached) => cached.mode,
        None => {
            let service = SERVICES_BY_ID.get(service_id)?;
            let key = &service.key;
            if key.vip != ip.key.dst_addr
                || key.port_be != ip.key.dst_port_be
                || key.proto != ip.key.proto
                || key.family != ip.key.family
            {
                return None;
            }
            service.mode
        }
    };
    if *check_blocklist {
        let version = scratch.blocklist_version;
        // SAFETY: as above.
        if unsafe { (*flow).blocklist_version } != version {
            if lookup::is_source_blocked(scratch) {
                return Some(Err(Verdict::Drop(DropReason::Blocked, NO_SERVICE)));
            }
            // SAFETY: as above.
            unsafe { (*flow).blocklist_version = version };
        }
        *check_blocklist = false;
    }
    let ip = &scratch.ip;
    // As on the full path: a packet that cannot be forwarded does not touch its flow.
    if ip.ttl <= 1 {
        return Some(Err(Verdict::Drop(DropReason::TtlExceeded, service_id)));
    }
    if let Some(cached) = lookup.hit() {
        // SAFETY: as above.
        scratch.selected = Selected::tracked(service_id, unsafe { &*flow }, &cached.backend);
    } else {
        if !follow_flow(ip, flow, service_id, &mut scratch.selected) {
            return None;
        }
        flow_cache::fill(&lookup, &ip.key, &scratch.selected.backend, mode);
    }
    *egress = Some(lookup.egress());
    Some(Ok(mode))
}

#[inline(always)]
pub fn select_backend(
    scratch: &mut Scratch,
    service: &Service,
    config: &LbConfig,
) -> Result<(), DropReason> {
    let ip = &scratch.ip;
    let Some(flow) = FLOWS.get_ptr_mut(&ip.key) else {
        return new_flow(scratch, service, config);
    };
    if follow_flow(ip, flow, service.id, &mut scratch.selected) {
        // The flow's service is back under another id: record it, so the flow's next packets
        // take the established-flow path again.
        // SAFETY: as in `follow_flow`; an advisory field of the entry.
        unsafe {
            if u32::from((*flow).service_id) != service.id {
                (*flow).service_id = service.id as u8;
            }
        }
        return Ok(());
    }
    // The flow starts over (a SYN reopening it, or its backend down): no CPU may keep using
    // its old entry. A reconnecting client usually gets its own NAT port back, and then
    // `new_flow` has cleared the flow's copies already.
    let chosen = new_flow(scratch, service, config);
    if !flow_cache::same_key(&scratch.taken_over, &scratch.ip.key) {
        flow_cache::forget_everywhere(&scratch.ip.key);
    }
    chosen
}

/// A flow's first packet: its backend from the Maglev table, its NAT port, its flow entry.
// A call of its own keeps each branch's locals out of the caller's 512-byte stack frame.
#[inline(never)]
fn new_flow(scratch: &mut Scratch, service: &Service, config: &LbConfig) -> Result<(), DropReason> {
    let ip = &scratch.ip;
    let key = &ip.key;
    let hash = hash_flow(key);
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    scratch.taken_over.family = 0;
    let backend_id = maglev_lookup(service, config, hash).ok_or(DropReason::NoBackend)?;
    let backend = *BACKENDS.get(backend_id).ok_or(DropReason::NoBackend)?;
    let nat_port_be = if service.mode == MODE_NAT {
        let port = allocate_nat_port(ip, key, &backend, config, hash)?;
        if scratch.taken_over.family != 0 {
            flow_cache::forget_everywhere(&scratch.taken_over);
        }
        port
    } else {
        0
    };
    scratch.flow = Flow {
        backend_id,
        hash,
        nat_port_be,
        // Service ids are below MAX_SERVICES, which fits.
        service_id: service.id as u8,
        flags: closing_flags(ip, 0),
        // The source was checked on the way here.
        blocklist_version: scratch.blocklist_version,
        last_seen_ns: now,
    };
    // A full LRU map evicts its least recently used flow, so an insert only fails on memory
    // pressure; the packet still goes out and the next one tries again.
    let _ = FLOWS.insert(&scratch.ip.key, &scratch.flow, 0);
    scratch.selected = Selected {
        service_id: service.id,
        backend_id,
        backend,
        nat_port_be,
        hash,
        is_new: true,
    };
    Ok(())
}

/// `flow_hash` as a call of its own: its temporaries never share a frame with the deeper path.
#[inline(never)]
fn hash_flow(key: &FlowKey) -> u32 {
    flow_hash(key)
}

/// Fills in the tracked flow's backend and returns true, unless its backend is down or a SYN
/// reopens a closed flow.
#[inline(always)]
fn follow_flow(ip: &IpPacket, flow: *mut Flow, service_id: u32, selected: &mut Selected) -> bool {
    // SAFETY: the pointer comes from the map; a concurrent update of the same entry can only
    // race on `flags` and `last_seen_ns`, both advisory.
    let current = unsafe { &*flow };
    let reopened = ip.is_connection_attempt() && current.flags & FLOW_CLOSING != 0;
    let backend_id = current.backend_id;
    let Some(backend) = BACKENDS.get(backend_id) else {
        return false;
    };
    if reopened || backend.state == BACKEND_DOWN {
        return false;
    }
    let flags = closing_flags(ip, current.flags);
    // Only a closing flow's age matters (it decides when its NAT port is free again), so the
    // clock is read for those alone, not on every packet of every flow.
    if flags & FLOW_CLOSING != 0 {
        // SAFETY: as above; bpf_ktime_get_ns has no preconditions.
        unsafe {
            (*flow).last_seen_ns = bpf_ktime_get_ns();
            (*flow).flags = flags;
        }
    }
    *selected = Selected::tracked(service_id, current, backend);
    true
}

/// `flags` with `FLOW_CLOSING` added when the packet is a TCP FIN or RST.
#[inline(always)]
fn closing_flags(ip: &IpPacket, flags: u8) -> u8 {
    if ip.key.proto == IPPROTO_TCP && ip.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        flags | FLOW_CLOSING
    } else {
        flags
    }
}

#[inline(always)]
fn maglev_lookup(service: &Service, config: &LbConfig, hash: u32) -> Option<u32> {
    let size = config.maglev_size;
    let table = service.id * 2 + (service.active_table & 1);
    // checked_rem: a zero size (no table yet) finds nothing, with no panic path for the verifier.
    let index = table * size + hash.checked_rem(size)?;
    let backend_id = *MAGLEV.get(index)?;
    (backend_id != NO_BACKEND).then_some(backend_id)
}

/// Finds a free NAT source port: first the client's port folded into the range (the port
/// itself when it lies there), then hashed probes. The reverse entry is inserted with
/// BPF_NOEXIST, so two live flows never share a port; a port whose flow is gone, or closed
/// long enough ago, is taken over (see [`may_take_over`]), so closed connections give their
/// ports back.
///
/// The first choice depends on the client's port alone, so a client that reconnects from the
/// same port gets the same NAT 4-tuple at the backend, and the backend's TIME_WAIT for it
/// accepts the new SYN (its timestamps continue the old connection's). One client's ports,
/// fewer than the range holds, never fold onto each other.
// A call of its own: its probe key stays out of `select_backend`'s stack frame.
#[inline(never)]
fn allocate_nat_port(
    ip: &IpPacket,
    key: &FlowKey,
    backend: &Backend,
    config: &LbConfig,
    hash: u32,
) -> Result<u16, DropReason> {
    let min = u32::from(config.nat_port_min);
    let max = u32::from(config.nat_port_max);
    if min == 0 || max < min {
        return Err(DropReason::NatPortsExhausted);
    }
    let range = max - min + 1;
    let client_port = u32::from(u16::from_be(ip.key.src_port_be));
    let mut nat_key = NatKey {
        backend_addr: backend.addr,
        backend_port_be: backend.port_be,
        nat_port_be: 0,
        proto: ip.key.proto,
        family: ip.key.family,
        _pad: [0; 2],
    };
    // Every probe under the full hold first; only when all of them meet live or held ports
    // does one closed for the short hold go to another client: a SYN the backend may turn
    // away (a 1 s retransmission for that client) beats a certain drop.
    let full_hold_ns = u64::from(config.nat_port_hold_ms) * 1_000_000;
    for hold_ns in [full_hold_ns, full_hold_ns.min(CLOSED_FLOW_KEEPS_PORT_NS)] {
        for probe in 0..NAT_PORT_PROBES {
            let port = if probe == 0 {
                // Ports below the range count on from 65536, so they fold after the others.
                let past_min = if client_port >= min {
                    client_port - min
                } else {
                    client_port + 0x1_0000 - min
                };
                min + past_min.checked_rem(range).unwrap_or(0)
            } else {
                // A different odd multiplier per probe walks the range in a flow-specific order.
                let offset = hash.wrapping_add(probe.wrapping_mul(0x9e37_79b9));
                min + offset.checked_rem(range).unwrap_or(0)
            };
            nat_key.nat_port_be = (port as u16).to_be();
            // Looked up before any insert: an LRU map takes a free node for every insert, even
            // one that fails, and most ports asked for are the reconnecting owner's own.
            // SAFETY: the value is copied out at once; LRU entries may be evicted concurrently.
            let taken = match unsafe { NAT_REVERSE.get(&nat_key) }.copied() {
                // Another CPU may claim it first; BPF_NOEXIST makes that this probe's loss.
                None => NAT_REVERSE
                    .insert(&nat_key, key, u64::from(BPF_NOEXIST))
                    .is_ok(),
                Some(owner) if owner == *key => {
                    // The reverse entry already names this flow: a connection reopened on its
                    // 5-tuple. Cached copies of the old flow go all the same.
                    record_taken_over(&owner);
                    true
                }
                Some(owner) => {
                    may_take_over(&owner, hold_ns) && NAT_REVERSE.insert(&nat_key, key, 0).is_ok()
                }
            };
            if taken {
                return Ok(nat_key.nat_port_be);
            }
        }
    }
    Err(DropReason::NatPortsExhausted)
}

/// The shortest a closed flow keeps its NAT port from other flows, even when every port is
/// held: time for the last ACKs and a retransmitted FIN.
const CLOSED_FLOW_KEEPS_PORT_NS: u64 = 500_000_000;

/// Whether another flow may take the NAT port of `owner`: its flow is gone (evicted or
/// purged), or it closed more than `hold_ns` ago. A taken-over owner's flow entry is deleted,
/// so a late packet of it cannot use the port's new mapping.
///
/// The full hold (`LbConfig::nat_port_hold_ms`, 61 s by default) outlasts the backend's
/// TIME_WAIT for the old NAT 4-tuple. Another client's SYN on that 4-tuple would carry
/// timestamps from an unrelated clock (Linux offsets them per 4-tuple), and the backend's PAWS
/// check turns away about half of such SYNs: the client waits a second for its retransmission.
// A call of its own: the owner's flow stays out of the allocator's stack frame.
#[inline(never)]
fn may_take_over(owner: &FlowKey, hold_ns: u64) -> bool {
    // SAFETY: the entry is read at once; LRU entries may be evicted concurrently.
    let Some(flow) = (unsafe { FLOWS.get(owner) }) else {
        // Its entry was evicted or purged, but a CPU may still hold a copy with this port.
        record_taken_over(owner);
        return true;
    };
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let closed_long_ago =
        flow.flags & FLOW_CLOSING != 0 && now.saturating_sub(flow.last_seen_ns) > hold_ns;
    if closed_long_ago {
        let _ = FLOWS.remove(owner);
        record_taken_over(owner);
    }
    closed_long_ago
}

/// Notes the flow whose NAT port the new flow takes, for [`new_flow`] to clear from every
/// CPU's flow cache once (a walk over the CPUs inside the probe loop is more than the verifier
/// can follow).
#[inline(always)]
fn record_taken_over(owner: &FlowKey) {
    if let Some(scratch) = SCRATCH.get_ptr_mut(0) {
        // SAFETY: the per-CPU scratch slot is this program run's alone.
        unsafe { (*scratch).taken_over = *owner };
    }
}
