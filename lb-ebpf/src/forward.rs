//! The next hop: a FIB lookup gives the egress device and MAC addresses; the frame goes out by
//! `XDP_TX` when that is the device it came in on, else by redirect.

use core::mem;

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup as FibLookup, xdp_action},
    helpers::{bpf_fib_lookup, bpf_jiffies64, bpf_redirect},
    programs::XdpContext,
};
use lb_common::{flow::FAMILY_IPV4, maps::DropReason};

use crate::{
    flow_cache::FLOW_CACHE_TICKS,
    maps::{CLIENT_ROUTE_SLOTS, CLIENT_ROUTES, ROUTES},
    parse::ptr_at,
    types::{CLIENT, CopiedEgress, Egress, Scratch, Verdict},
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// How long, in clock ticks (jiffies), a cached route to a backend or client is used before the FIB is
/// asked again, so route and neighbour changes take effect within this time: at most a second,
/// as no kernel ticks slower than 100 Hz (0.4 s at the usual 250 Hz, 0.1 s at 1000 Hz, where
/// the extra FIB lookups are still a handful per second per backend). The tick count is one
/// load (the verifier inlines `bpf_jiffies64`); a clock read was a helper call, 5% of an
/// established flow's time. A flow-cache copy takes its route from here while the route has
/// at least a copy's life left, so a copied route is no older than this either.
const ROUTE_CACHE_TICKS: u64 = 100;

/// Sends the (already rewritten) packet towards `scratch.hop.dst`: by the route in its
/// flow-cache copy, else by the cached route when it is fresh, else by a FIB lookup that
/// refreshes it.
#[inline(always)]
pub fn to_next_hop(
    ctx: &XdpContext,
    scratch: &mut Scratch,
    copied: CopiedEgress,
) -> Result<Verdict, DropReason> {
    let ingress = ctx.ingress_ifindex() as u32;
    if let Some(copied) = &copied
        && copied.ifindex != 0
    {
        return send(ctx, ingress, copied);
    }
    let hop = &scratch.hop;
    let to_client = hop.cache_slot == CLIENT;
    let cached = if to_client {
        CLIENT_ROUTES.get_ptr_mut(client_slot(&hop.dst))
    } else {
        ROUTES.get_ptr_mut(hop.cache_slot)
    };
    let Some(cached) = cached else {
        if !fib_lookup(ctx, scratch, ingress) {
            return Err(DropReason::NoRoute);
        }
        return send(ctx, ingress, &scratch.route.egress);
    };
    // SAFETY: this CPU's own slot of a per-CPU map.
    let cached = unsafe { &mut *cached };
    // SAFETY: bpf_jiffies64 has no preconditions.
    let now = unsafe { bpf_jiffies64() };
    // A route going into a flow-cache copy must stay fresh for as long as the copy may be used.
    let max_age = if copied.is_some() {
        ROUTE_CACHE_TICKS - FLOW_CACHE_TICKS
    } else {
        ROUTE_CACHE_TICKS
    };
    let fresh = cached.dst == hop.dst
        && (!to_client || cached.src == hop.src)
        && now.wrapping_sub(cached.refreshed_jiffies) < max_age;
    if !fresh {
        if !fib_lookup(ctx, scratch, ingress) {
            return Err(DropReason::NoRoute);
        }
        *cached = scratch.route;
        cached.refreshed_jiffies = now;
    }
    if let Some(copied) = copied {
        *copied = cached.egress;
    }
    send(ctx, ingress, &cached.egress)
}

/// Sends the frame, unchanged but for its MAC addresses, towards `scratch.hop.dst` by a FIB
/// lookup of its own (no route cache: second chance's packets are few and last seconds).
/// `Ok(None)` when that route leads back out of the device the frame came in on: the frame is
/// not bounced back where it came from.
#[inline(always)]
pub fn to_neighbour(
    ctx: &XdpContext,
    scratch: &mut Scratch,
) -> Result<Option<Verdict>, DropReason> {
    let ingress = ctx.ingress_ifindex() as u32;
    if !fib_lookup(ctx, scratch, ingress) {
        return Err(DropReason::NoRoute);
    }
    if scratch.route.egress.ifindex == ingress {
        return Ok(None);
    }
    send(ctx, ingress, &scratch.route.egress).map(Some)
}

/// A client address's slot in `CLIENT_ROUTES`: its words mixed (Fibonacci hashing).
#[inline(always)]
fn client_slot(addr: &[u8; 16]) -> u32 {
    let word = |i: usize| u32::from_ne_bytes([addr[i], addr[i + 1], addr[i + 2], addr[i + 3]]);
    let mixed = (word(0) ^ word(4) ^ word(8) ^ word(12)).wrapping_mul(0x9e37_79b9);
    mixed >> (32 - CLIENT_ROUTE_SLOTS.trailing_zeros())
}

/// Rewrites the MAC addresses and sends the frame out of the egress device.
#[inline(always)]
fn send(ctx: &XdpContext, ingress: u32, egress: &Egress) -> Result<Verdict, DropReason> {
    let eth = ptr_at::<[u8; 12]>(ctx, 0).ok_or(DropReason::Malformed)?;
    // SAFETY: bounds-checked by `ptr_at`.
    unsafe { *eth = egress.macs };
    let ifindex = egress.ifindex;
    if ifindex == ingress {
        return Ok(Verdict::Action(xdp_action::XDP_TX));
    }
    // SAFETY: bpf_redirect only records the target device.
    let action = unsafe { bpf_redirect(ifindex, 0) };
    Ok(Verdict::Action(action as u32))
}

/// Asks the kernel's FIB for the egress device and MAC addresses towards `scratch.hop.dst`
/// and leaves them in `scratch.route`; false when there is no usable route (no route, or the
/// neighbour is not resolved yet: the client retransmits, and lb-control keeps the backends'
/// neighbours resolved).
// A call of its own: only cache misses and replies take it.
#[inline(never)]
fn fib_lookup(ctx: &XdpContext, scratch: &mut Scratch, ingress: u32) -> bool {
    let hop = &scratch.hop;
    let (src, dst) = (&hop.src, &hop.dst);
    // SAFETY: an all-zero bpf_fib_lookup is a valid (empty) request.
    scratch.fib = unsafe { mem::zeroed() };
    let params = &mut scratch.fib;
    params.l4_protocol = hop.proto;
    params.__bindgen_anon_1.tot_len = hop.ip_len;
    params.ifindex = ingress;
    if hop.family == FAMILY_IPV4 {
        params.family = AF_INET;
        params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes([src[0], src[1], src[2], src[3]]);
        params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes([dst[0], dst[1], dst[2], dst[3]]);
    } else {
        params.family = AF_INET6;
        params.__bindgen_anon_3.ipv6_src = words(src);
        params.__bindgen_anon_4.ipv6_dst = words(dst);
    }
    // SAFETY: `params` is a valid bpf_fib_lookup of the size passed.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx.cast(),
            params,
            mem::size_of::<FibLookup>() as i32,
            0,
        )
    };
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        return false;
    }
    let route = &mut scratch.route;
    route.dst = scratch.hop.dst;
    route.src = scratch.hop.src;
    route.egress.ifindex = params.ifindex;
    route.egress.macs[..6].copy_from_slice(&params.dmac);
    route.egress.macs[6..].copy_from_slice(&params.smac);
    true
}

#[inline(always)]
fn words(addr: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([addr[0], addr[1], addr[2], addr[3]]),
        u32::from_ne_bytes([addr[4], addr[5], addr[6], addr[7]]),
        u32::from_ne_bytes([addr[8], addr[9], addr[10], addr[11]]),
        u32::from_ne_bytes([addr[12], addr[13], addr[14], addr[15]]),
    ]
}
