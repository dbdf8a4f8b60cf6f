//! Full NAT. Forward: the destination becomes the backend, the source the LB's NAT address and
//! port. Reply: the reverse, so the client sees the VIP answer. Checksums are patched
//! incrementally; a UDP checksum of zero (none, IPv4) stays zero.

use lb_common::{
    flow::{FAMILY_IPV4, FlowKey},
    maps::{DropReason, LbConfig},
};

use crate::{
    csum::ChecksumDelta,
    flow::Selected,
    forward::{self, NO_CACHE, NextHop},
    lookup,
    parse::{IPPROTO_TCP, IpPacket, ptr_at},
    stats::{NO_SERVICE, Verdict},
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

/// The addresses and ports a packet leaves with.
#[repr(C, align(8))]
struct Rewrite {
    hop: NextHop,
    src_port_be: u16,
    dst_port_be: u16,
}

// A call of its own keeps each branch's locals out of the caller's 512-byte stack frame.
#[inline(never)]
pub fn forward(
    ctx: &aya_ebpf::programs::XdpContext,
    ip: &IpPacket,
    selected: &Selected,
    config: &LbConfig,
) -> Verdict {
    let rewrite = Rewrite {
        hop: NextHop {
            family: ip.family,
            proto: ip.proto,
            ip_len: ip.ip_len,
            src: *config.nat_source(ip.family),
            dst: selected.backend.addr,
            cache_slot: selected.backend_id,
        },
        src_port_be: selected.nat_port_be,
        dst_port_be: selected.backend.port_be,
    };
    rewrite_and_route(ctx, ip, &rewrite, selected.service_id)
}

/// A backend's reply, when `ip` is one: back to the client, from the VIP. `None` when the
/// packet is no NAT reply.
// A call of its own keeps each branch's locals out of the caller's 512-byte stack frame.
#[inline(never)]
pub fn reverse(
    ctx: &aya_ebpf::programs::XdpContext,
    ip: &IpPacket,
    config: &LbConfig,
) -> Option<Verdict> {
    let client: FlowKey = lookup::nat_reply_flow(ip, config)?;
    let rewrite = Rewrite {
        hop: NextHop {
            family: ip.family,
            proto: ip.proto,
            ip_len: ip.ip_len,
            src: client.dst_addr,
            dst: client.src_addr,
            cache_slot: NO_CACHE,
        },
        src_port_be: client.dst_port_be,
        dst_port_be: client.src_port_be,
    };
    Some(rewrite_and_route(ctx, ip, &rewrite, NO_SERVICE))
}

#[inline(always)]
fn rewrite_and_route(
    ctx: &aya_ebpf::programs::XdpContext,
    ip: &IpPacket,
    rewrite: &Rewrite,
    service_id: u32,
) -> Verdict {
    let rewritten = if ip.family == FAMILY_IPV4 {
        rewrite_ipv4(ctx, ip, rewrite)
    } else {
        rewrite_ipv6(ctx, ip, rewrite)
    };
    if let Err(reason) = rewritten {
        return Verdict::Drop(reason, service_id);
    }
    forward::to_next_hop(ctx, &rewrite.hop)
        .unwrap_or_else(|reason| Verdict::Drop(reason, service_id))
}

#[inline(never)]
fn rewrite_ipv4(
    ctx: &aya_ebpf::programs::XdpContext,
    ip: &IpPacket,
    rewrite: &Rewrite,
) -> Result<(), DropReason> {
    let l3 = ip.l3();
    let ttl = ptr_at::<[u8; 2]>(ctx, l3 + IPV4_TTL).ok_or(DropReason::Malformed)?;
    let check = ptr_at::<[u8; 2]>(ctx, l3 + IPV4_CHECK).ok_or(DropReason::Malformed)?;
    let src = ptr_at::<[u8; 4]>(ctx, l3 + IPV4_SRC).ok_or(DropReason::Malformed)?;
    let dst = ptr_at::<[u8; 4]>(ctx, l3 + IPV4_DST).ok_or(DropReason::Malformed)?;
    // SAFETY: every pointer was bounds-checked by `ptr_at`; the fields are byte arrays.
    unsafe {
        let ttl_proto = *ttl;
        if ttl_proto[0] <= 1 {
            return Err(DropReason::TtlExceeded);
        }
        let new_src = [
            rewrite.hop.src[0],
            rewrite.hop.src[1],
            rewrite.hop.src[2],
            rewrite.hop.src[3],
        ];
        let new_dst = [
            rewrite.hop.dst[0],
            rewrite.hop.dst[1],
            rewrite.hop.dst[2],
            rewrite.hop.dst[3],
        ];
        let mut addresses = ChecksumDelta::default();
        addresses.replace_bytes(&*src, &new_src);
        addresses.replace_bytes(&*dst, &new_dst);

        let new_ttl_proto = [ttl_proto[0] - 1, ttl_proto[1]];
        let mut header = addresses;
        header.replace_bytes(&ttl_proto, &new_ttl_proto);
        *check = header.apply(u16::from_be_bytes(*check)).to_be_bytes();
        *ttl = new_ttl_proto;
        *src = new_src;
        *dst = new_dst;
    }
    let mut pseudo = ChecksumDelta::default();
    pseudo.replace_bytes(&ipv4_bytes(&ip.src), &ipv4_bytes(&rewrite.hop.src));
    pseudo.replace_bytes(&ipv4_bytes(&ip.dst), &ipv4_bytes(&rewrite.hop.dst));
    rewrite_ports(ctx, ip, rewrite, pseudo)
}

#[inline(always)]
fn ipv4_bytes(addr: &[u8; 16]) -> [u8; 4] {
    [addr[0], addr[1], addr[2], addr[3]]
}

#[inline(never)]
fn rewrite_ipv6(
    ctx: &aya_ebpf::programs::XdpContext,
    ip: &IpPacket,
    rewrite: &Rewrite,
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
        *src = rewrite.hop.src;
        *dst = rewrite.hop.dst;
    }
    let mut pseudo = ChecksumDelta::default();
    pseudo.replace_bytes(&ip.src, &rewrite.hop.src);
    pseudo.replace_bytes(&ip.dst, &rewrite.hop.dst);
    rewrite_ports(ctx, ip, rewrite, pseudo)
}

/// Rewrites the ports and patches the transport checksum with the port and pseudo-header
/// changes.
#[inline(never)]
fn rewrite_ports(
    ctx: &aya_ebpf::programs::XdpContext,
    ip: &IpPacket,
    rewrite: &Rewrite,
    pseudo: ChecksumDelta,
) -> Result<(), DropReason> {
    let l4 = ip.l4();
    let ports = ptr_at::<[u16; 2]>(ctx, l4).ok_or(DropReason::Malformed)?;
    let check_offset = if ip.proto == IPPROTO_TCP {
        TCP_CHECK
    } else {
        UDP_CHECK
    };
    let check = ptr_at::<[u8; 2]>(ctx, l4 + check_offset).ok_or(DropReason::Malformed)?;
    let new_ports = [rewrite.src_port_be, rewrite.dst_port_be];
    // SAFETY: both pointers were bounds-checked by `ptr_at`.
    unsafe {
        let old_ports = ports.read_unaligned();
        let old_check = u16::from_be_bytes(*check);
        let skip_checksum = ip.proto != IPPROTO_TCP && old_check == 0 && ip.family == FAMILY_IPV4;
        if !skip_checksum {
            let mut delta = pseudo;
            delta.replace_u16(u16::from_be(old_ports[0]), u16::from_be(new_ports[0]));
            delta.replace_u16(u16::from_be(old_ports[1]), u16::from_be(new_ports[1]));
            let mut new_check = delta.apply(old_check);
            // In UDP a computed zero is sent as all ones: zero means "no checksum".
            if ip.proto != IPPROTO_TCP && new_check == 0 {
                new_check = 0xffff;
            }
            *check = new_check.to_be_bytes();
        }
        ports.write_unaligned(new_ports);
    }
    Ok(())
}
