//! Second chance (GitHub GLB's model) for the gateway's open connections during a planned
//! handover: once the other host of the pair has handed the gateway's address over to this
//! one, a TCP segment to the gateway that opens no connection and that this host has no socket
//! for belongs to a connection the other host still serves. It goes there, over the private
//! link, unchanged but for its MAC addresses; the other host answers the client directly.
//!
//! Userspace arms `SECOND_CHANCE` for the handover's drain time; the entry's own deadline ends
//! it, so a restarted lb-control cannot leave it on.

use aya_ebpf::{
    bindings::{BPF_F_CURRENT_NETNS, BPF_TCP_LISTEN, bpf_sock_tuple},
    helpers::{bpf_ktime_get_ns, bpf_sk_release, bpf_skc_lookup_tcp},
    programs::XdpContext,
};
use lb_common::{flow::FAMILY_IPV4, maps::SecondChance};

use crate::{
    forward,
    maps::{SECOND_CHANCE, SECOND_CHANCE_PACKETS},
    parse::IPPROTO_TCP,
    types::{NO_SERVICE, Scratch, Verdict},
};

/// The verdict on a packet to no service: to the previous owner when it is a segment of one
/// of its connections to the gateway, else to the stack.
#[inline(always)]
pub fn verdict(ctx: &XdpContext, scratch: &mut Scratch) -> Verdict {
    let ip = &scratch.ip;
    if !ip.may_be_established() {
        return Verdict::pass();
    }
    let Some(entry) = SECOND_CHANCE.get(0) else {
        return Verdict::pass();
    };
    if entry.until_ns == 0
        || entry.port_be != ip.key.dst_port_be
        || entry.family != ip.key.family
        || (entry.addr != [0; 16] && entry.addr != ip.key.dst_addr)
    {
        return Verdict::pass();
    }
    to_previous_owner(ctx, scratch, entry)
}

// A call of its own: only the gateway's packets during a handover's drain get here.
#[inline(never)]
fn to_previous_owner(ctx: &XdpContext, scratch: &mut Scratch, entry: &SecondChance) -> Verdict {
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    if unsafe { bpf_ktime_get_ns() } >= entry.until_ns || has_socket(ctx, scratch) {
        return Verdict::pass();
    }
    let hop = &mut scratch.hop;
    hop.src = [0; 16];
    hop.dst = entry.peer;
    hop.family = entry.peer_family;
    hop.proto = IPPROTO_TCP;
    hop.ip_len = scratch.ip.ip_len;
    match forward::to_neighbour(ctx, scratch) {
        Ok(Some(verdict)) => {
            if let Some(count) = SECOND_CHANCE_PACKETS.get_ptr_mut(0) {
                // SAFETY: this CPU's own slot of a per-CPU map.
                unsafe { *count += 1 };
            }
            verdict
        }
        // Come in from the peer's side: it is the stack's (no ping-pong between the two).
        Ok(None) => Verdict::pass(),
        Err(reason) => Verdict::Drop(reason, NO_SERVICE),
    }
}

/// Whether a socket of this host's own takes the segment: an established connection, one
/// being opened, or one in TIME_WAIT. The gateway's listener alone does not count: a listener
/// answers a segment of no connection with a reset.
#[inline(always)]
fn has_socket(ctx: &XdpContext, scratch: &mut Scratch) -> bool {
    let key = &scratch.ip.key;
    let tuple = &mut scratch.sock_tuple;
    let size = if key.family == FAMILY_IPV4 {
        // SAFETY: writing the union's IPv4 member whole.
        let v4 = unsafe { &mut tuple.__bindgen_anon_1.ipv4 };
        v4.saddr = u32::from_ne_bytes([
            key.src_addr[0],
            key.src_addr[1],
            key.src_addr[2],
            key.src_addr[3],
        ]);
        v4.daddr = u32::from_ne_bytes([
            key.dst_addr[0],
            key.dst_addr[1],
            key.dst_addr[2],
            key.dst_addr[3],
        ]);
        v4.sport = key.src_port_be;
        v4.dport = key.dst_port_be;
        core::mem::size_of_val(v4)
    } else {
        // SAFETY: writing the union's IPv6 member whole.
        let v6 = unsafe { &mut tuple.__bindgen_anon_1.ipv6 };
        v6.saddr = words(&key.src_addr);
        v6.daddr = words(&key.dst_addr);
        v6.sport = key.src_port_be;
        v6.dport = key.dst_port_be;
        core::mem::size_of_val(v6)
    };
    // SAFETY: the tuple is valid for `size` bytes; the socket found is released below.
    let socket = unsafe {
        bpf_skc_lookup_tcp(
            ctx.ctx.cast(),
            tuple as *mut bpf_sock_tuple,
            size as u32,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    };
    if socket.is_null() {
        return false;
    }
    // SAFETY: a socket the lookup returned, read before it is released.
    let state = unsafe { (*socket).state };
    // SAFETY: released once, as the lookup requires.
    unsafe { bpf_sk_release(socket.cast()) };
    state != BPF_TCP_LISTEN
}

#[inline(always)]
fn words(addr: &[u8; 16]) -> [u32; 4] {
    core::array::from_fn(|i| {
        u32::from_ne_bytes([
            addr[4 * i],
            addr[4 * i + 1],
            addr[4 * i + 2],
            addr[4 * i + 3],
        ])
    })
}
