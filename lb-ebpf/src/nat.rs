//! Full NAT. Forward: the destination becomes the backend, the source the LB's NAT address and
//! port. Reply: the reverse, so the client sees the VIP answer. Checksums are patched
//! incrementally; a UDP checksum of zero (none, IPv4) stays zero.

use lb_common::{
    flow::FAMILY_IPV4,
    maps::{DropReason, LbConfig},
};

use crate::{
    csum::ChecksumDelta,
    forward, lookup,
    parse::{IPPROTO_TCP, IPV4_HEADER_LEN, IpPacket, ptr_at},
    types::{CLIENT, CopiedEgress, NO_SERVICE, NextHop, Scratch, Verdict},
};

/// Offsets of fields inside the IP and transport headers.
const IPV4_TTL: usize = 8;
const IPV4_CHECK: usize = 10;
const IPV4_SRC: usize = 12;
const IPV4_DST: usize = 16;
const IPV6_HOP_LIMIT: usize = 7;
const IPV6_SRC: usize = 8;
const IPV6_DST: usize = 24;
const TCP_CHECK: usize = 16;
const UDP_CHECK: usize = 6;

/// Rewrites a client's packet to its backend and sends it there.
#[inline(always)]
pub fn forward(
    ctx: &aya_ebpf::programs::XdpContext,
    scratch: &mut Scratch,
    config: &LbConfig,
    egress: CopiedEgress,
) -> Verdict {
    let (ip, selected) = (&scratch.ip, &scratch.selected);
    scratch.hop = NextHop {
        src: *config.nat_source(ip.key.family),
        dst: selected.backend.addr,
        cache_slot: selected.backend_id,
        ip_len: ip.ip_len,
        family: ip.key.family,
        proto: ip.key.proto,
    };
    let ports = [selected.nat_port_be, selected.backend.port_be];
    let service_id = selected.service_id;
    rewrite_and_route(ctx, scratch, ports, service_id, egress)
}

/// A backend's reply, when `ip` is one: back to the client, from the VIP. `None` when the
/// packet is no NAT reply.
// A call of its own keeps the reply path's locals out of the entry point's stack frame.
#[inline(never)]
pub fn reverse(
    ctx: &aya_ebpf::programs::XdpContext,
    scratch: &mut Scratch,
    config: &LbConfig,
) -> Option<Verdict> {
    let client = lookup::nat_reply_flow(scratch, config)?;
    let ip = &scratch.ip;
    scratch.hop = NextHop {
        src: client.dst_addr,
        dst: client.src_addr,
        cache_slot: CLIENT,
        ip_len: ip.ip_len,
        family: ip.key.family,
        proto: ip.key.proto,
    };
    let ports = [client.dst_port_be, client.src_port_be];
    Some(rewrite_and_route(ctx, scratch, ports, NO_SERVICE, None))
}

/// Rewrites the addresses to `scratch.hop`'s and the ports to `ports` (source, destination;
/// network byte order), then sends the packet on.
#[inline(always)]
fn rewrite_and_route(
    ctx: &aya_ebpf::programs::XdpContext,
    scratch: &mut Scratch,
    ports: [u16; 2],
    service_id: u32,
    egress: CopiedEgress,
) -> Verdict {
    let (ip, hop) = (&scratch.ip, &scratch.hop);
    let rewritten = if ip.key.family == FAMILY_IPV4 {
        rewrite_ipv4(ctx, ip, hop, ports)
    } else {
        rewrite_ipv6(ctx, ip, hop, ports)
    };
    if let Err(reason) = rewritten {
        return Verdict::Drop(reason, service_id);
    }
    forward::to_next_hop(ctx, scratch, egress)
        .unwrap_or_else(|reason| Verdict::Drop(reason, service_id))
}

#[inline(always)]
fn rewrite_ipv4(
    ctx: &aya_ebpf::programs::XdpContext,
    ip: &IpPacket,
    hop: &NextHop,
    ports: [u16; 2],
) -> Result<(), DropReason> {
    // One bounds check for the fixed header, whose fields are then at constant offsets.
    let header = ptr_at::<[u8; IPV4_HEADER_LEN]>(ctx, ip.l3()).ok_or(DropReason::Malformed)?;
    let ttl = field::<[u8; 2]>(header, IPV4_TTL);
    let check = field::<u16>(header, IPV4_CHECK);
    let src = field::<u32>(header, IPV4_SRC);
    let dst = field::<u32>(header, IPV4_DST);
    let new_src = ipv4_word(&hop.src);
    let new_dst = ipv4_word(&hop.dst);
    let mut addresses = ChecksumDelta::default();
    // SAFETY: every pointer was bounds-checked by `ptr_at`; the program is built for targets
    // that allow misaligned loads and stores (see `SCRATCH`).
    unsafe {
        let ttl_proto = *ttl;
        if ttl_proto[0] <= 1 {
            return Err(DropReason::TtlExceeded);
        }
        addresses.replace_u32(src.read_unaligned(), new_src);
        addresses.replace_u32(dst.read_unaligned(), new_dst);
        let new_ttl_proto = [ttl_proto[0] - 1, ttl_proto[1]];
        let mut header = addresses;
        header.replace_u16(
            u16::from_ne_bytes(ttl_proto),
            u16::from_ne_bytes(new_ttl_proto),
        );
        check.write_unaligned(header.apply(check.read_unaligned()));
        *ttl = new_ttl_proto;
        src.write_unaligned(new_src);
        dst.write_unaligned(new_dst);
    }
    // The pseudo-header changes by the same addresses.
    rewrite_ports(ctx, ip, ports, addresses)
}

/// A pointer to the `T` at `offset` bytes into a header the caller bounds-checked whole.
#[inline(always)]
fn field<T>(header: *mut impl Sized, offset: usize) -> *mut T {
    header.cast::<u8>().wrapping_add(offset).cast()
}

/// An IPv4 address (the first 4 bytes of a 16-byte field) as the word it is in memory.
#[inline(always)]
fn ipv4_word(addr: &[u8; 16]) -> u32 {
    u32::from_ne_bytes([addr[0], addr[1], addr[2], addr[3]])
}

#[inline(always)]
fn rewrite_ipv6(
    ctx: &aya_ebpf::programs::XdpContext,
    ip: &IpPacket,
    hop: &NextHop,
    ports: [u16; 2],
) -> Result<(), DropReason> {
    let l3 = ip.l3();
    let hop_limit = ptr_at::<u8>(ctx, l3 + IPV6_HOP_LIMIT).ok_or(DropReason::Malformed)?;
    let src = ptr_at::<[u8; 16]>(ctx, l3 + IPV6_SRC).ok_or(DropReason::Malformed)?;
    let dst = ptr_at::<[u8; 16]>(ctx, l3 + IPV6_DST).ok_or(DropReason::Malformed)?;
    // SAFETY: every pointer was bounds-checked by `ptr_at`.
    unsafe {
        if *hop_limit <= 1 {
            return Err(DropReason::TtlExceeded);
        }
        *hop_limit -= 1;
        *src = hop.src;
        *dst = hop.dst;
    }
    let mut pseudo = ChecksumDelta::default();
    pseudo.replace_bytes(&ip.key.src_addr, &hop.src);
    pseudo.replace_bytes(&ip.key.dst_addr, &hop.dst);
    rewrite_ports(ctx, ip, ports, pseudo)
}

/// Rewrites the ports to `new_ports` (source, destination, as they go on the wire) and
/// patches the transport checksum with the port and pseudo-header changes.
#[inline(always)]
fn rewrite_ports(
    ctx: &aya_ebpf::programs::XdpContext,
    ip: &IpPacket,
    new_ports: [u16; 2],
    pseudo: ChecksumDelta,
) -> Result<(), DropReason> {
    let l4 = ip.l4();
    let is_tcp = ip.key.proto == IPPROTO_TCP;
    // One bounds check up to the checksum field; the ports lead the header.
    let (ports, check) = if is_tcp {
        let header = ptr_at::<[u8; TCP_CHECK + 2]>(ctx, l4).ok_or(DropReason::Malformed)?;
        (field::<u32>(header, 0), field::<u16>(header, TCP_CHECK))
    } else {
        let header = ptr_at::<[u8; UDP_CHECK + 2]>(ctx, l4).ok_or(DropReason::Malformed)?;
        (field::<u32>(header, 0), field::<u16>(header, UDP_CHECK))
    };
    let [src_port, dst_port] = [new_ports[0].to_ne_bytes(), new_ports[1].to_ne_bytes()];
    let new_ports = u32::from_ne_bytes([src_port[0], src_port[1], dst_port[0], dst_port[1]]);
    // SAFETY: both pointers were bounds-checked by `ptr_at`.
    unsafe {
        let old_check = check.read_unaligned();
        let skip_checksum = !is_tcp && old_check == 0 && ip.key.family == FAMILY_IPV4;
        if !skip_checksum {
            let mut delta = pseudo;
            delta.replace_u32(ports.read_unaligned(), new_ports);
            let mut new_check = delta.apply(old_check);
            // In UDP a computed zero is sent as all ones: zero means "no checksum".
            if !is_tcp && new_check == 0 {
                new_check = 0xffff;
            }
            check.write_unaligned(new_check);
        }
        ports.write_unaligned(new_ports);
    }
    Ok(())
}
