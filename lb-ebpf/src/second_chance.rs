//! Second chance (GitHub GLB's model): a TCP segment to the gateway that no socket of this host
//! takes goes to the other host of the pair, over the private link, unchanged but for its MAC
//! addresses; the other host answers the client directly. Two entries arm it:
//!
//! - **A planned handover's** (`SECOND_CHANCE`): once the other host has handed the gateway's
//!   address over to this one, a segment that opens no connection and that this host has no
//!   socket for belongs to a connection the other host still drains. Userspace arms it for the
//!   drain; the entry's own deadline ends it, so a restarted lb-control cannot leave it on.
//! - **The standing one of a pair member** (`STANDING_SECOND_CHANCE`): while no gateway
//!   listens here (lb-control crashed or restarts), a TCP segment to the gateway that finds no
//!   socket at all, a SYN included, goes to the other host, whose gateway listens on the
//!   floating address ahead of time; the rest of that connection follows, having no socket
//!   here. So while this host still holds the address (keepalived has not moved it yet, or did
//!   not notice the crash), the other host serves the new connections this host would refuse.
//!   It has no deadline: it must outlive the lb-control that armed it, which disarms it when it
//!   stops cleanly or leaves the pair. Once a gateway listens here, a segment of no connection
//!   is the stack's, which resets it: it may be a connection of the other host's that died
//!   with it (this host took the address over from a crashed or cut-off master), and sent
//!   there it would vanish, its client hanging instead of reconnecting here. The entry can
//!   name the admin API's port too (it listens at the same address): its segments go the
//!   same way while no admin API listens here.
//!
//! A segment that came in from the other host's side is never sent back (no ping-pong). The
//! socket lookup, the cost, is paid only on a host where an entry is armed.

use aya_ebpf::{
    bindings::{BPF_F_CURRENT_NETNS, BPF_TCP_LISTEN, bpf_sock, bpf_sock_tuple},
    helpers::{bpf_ktime_get_ns, bpf_sk_release, bpf_skc_lookup_tcp, bpf_tcp_check_syncookie},
    programs::XdpContext,
};
use lb_common::{flow::FAMILY_IPV4, maps::SecondChance};

use crate::{
    forward,
    maps::{
        SECOND_CHANCE, SECOND_CHANCE_PACKETS, STANDING_SECOND_CHANCE,
        STANDING_SECOND_CHANCE_PACKETS,
    },
    parse::{IPPROTO_TCP, IPV4_HEADER_LEN, IPV6_HEADER_LEN, IpPacket, ptr_at},
    types::{NO_SERVICE, Scratch, Verdict},
};

/// The verdict on a packet to no service: to the other host of the pair when it is a gateway
/// segment no socket here takes and an armed entry covers it, else to the stack.
#[inline(always)]
pub fn verdict(ctx: &XdpContext, scratch: &mut Scratch) -> Verdict {
    let ip = &scratch.ip;
    if !ip.has_ports || ip.is_fragment || ip.key.proto != IPPROTO_TCP {
        return Verdict::pass();
    }
    if !ip.is_connection_attempt()
        && let Some(entry) = SECOND_CHANCE.get(0)
        && covers(entry, ip)
        // SAFETY: bpf_ktime_get_ns has no preconditions.
        && unsafe { bpf_ktime_get_ns() } < entry.until_ns
    {
        return to_peer(ctx, scratch, entry, false);
    }
    if let Some(entry) = STANDING_SECOND_CHANCE.get(0)
        && covers(entry, ip)
    {
        return to_peer(ctx, scratch, entry, true);
    }
    Verdict::pass()
}

/// Whether the armed `entry` is for the packet's gateway address and port (or admin port).
#[inline(always)]
fn covers(entry: &SecondChance, ip: &IpPacket) -> bool {
    let port = ip.key.dst_port_be;
    entry.until_ns != 0
        && (entry.port_be == port || (entry.admin_port_be != 0 && entry.admin_port_be == port))
        && entry.family == ip.key.family
        && (entry.addr == [0; 16] || entry.addr == ip.key.dst_addr)
}

// A call of its own: only the gateway's packets on a host where second chance is armed get
// here. `standing` names the entry: what it takes, and its counter.
#[inline(never)]
fn to_peer(
    ctx: &XdpContext,
    scratch: &mut Scratch,
    entry: &SecondChance,
    standing: bool,
) -> Verdict {
    match socket_for(ctx, scratch) {
        Socket::Connection => return Verdict::pass(),
        // A listener opens the connection here; it would only reset a segment of none, which
        // a handover's entry sends to the host that drains it, and the standing one leaves to
        // the reset (see the module's comment).
        Socket::Listener if standing || scratch.ip.is_connection_attempt() => {
            return Verdict::pass();
        }
        Socket::Listener | Socket::None => {}
    }
    let hop = &mut scratch.hop;
    hop.src = [0; 16];
    hop.dst = entry.peer;
    hop.family = entry.peer_family;
    hop.proto = IPPROTO_TCP;
    hop.ip_len = scratch.ip.ip_len;
    match forward::to_neighbour(ctx, scratch) {
        Ok(Some(verdict)) => {
            let counter = if standing {
                STANDING_SECOND_CHANCE_PACKETS.get_ptr_mut(0)
            } else {
                SECOND_CHANCE_PACKETS.get_ptr_mut(0)
            };
            if let Some(count) = counter {
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

/// What socket of this host's own the segment's 4-tuple finds.
enum Socket {
    None,
    /// Only a listener: it takes a SYN, and answers a segment of no connection with a reset.
    Listener,
    /// An established connection, one being opened, or one in TIME_WAIT; or the listener's
    /// own handshake answered with a syncookie (under a SYN flood), which this segment ends.
    Connection,
}

#[inline(always)]
fn socket_for(ctx: &XdpContext, scratch: &mut Scratch) -> Socket {
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
        return Socket::None;
    }
    // SAFETY: a socket the lookup returned, read before it is released.
    let found = if unsafe { (*socket).state } != BPF_TCP_LISTEN
        || is_syncookie_ack(ctx, &scratch.ip, socket)
    {
        Socket::Connection
    } else {
        Socket::Listener
    };
    // SAFETY: released once, as the lookup requires.
    unsafe { bpf_sk_release(socket.cast()) };
    found
}

/// Whether the segment is the ACK of a handshake `listener` answered with a syncookie: the
/// kernel keeps no socket for those, and the connection is this host's all the same. Cheap
/// unless the listener's SYN queue overflowed lately (the kernel checks that first).
#[inline(always)]
fn is_syncookie_ack(ctx: &XdpContext, ip: &IpPacket, listener: *mut bpf_sock) -> bool {
    const TCP_HEADER_LEN: usize = 20;
    if ip.is_connection_attempt() {
        return false;
    }
    let Some(tcp) = ptr_at::<[u8; TCP_HEADER_LEN]>(ctx, ip.l4()) else {
        return false;
    };
    let (header, header_len) = if ip.key.family == FAMILY_IPV4 {
        (
            ptr_at::<[u8; IPV4_HEADER_LEN]>(ctx, ip.l3()).map(|header| header.cast()),
            IPV4_HEADER_LEN,
        )
    } else {
        (
            ptr_at::<[u8; IPV6_HEADER_LEN]>(ctx, ip.l3()).map(|header| header.cast()),
            IPV6_HEADER_LEN,
        )
    };
    let Some(header) = header else {
        return false;
    };
    // SAFETY: a listener the lookup returned and not released yet; both headers lie inside
    // the frame for the lengths given.
    let checked = unsafe {
        bpf_tcp_check_syncookie(
            listener.cast(),
            header,
            header_len as u32,
            tcp.cast(),
            TCP_HEADER_LEN as u32,
        )
    };
    checked == 0
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
