//! Direct server return: the packet is wrapped in an outer IP header (IPv4-in-IPv4 or
//! IPv6-in-IPv6, Katran style) addressed to the backend, which unwraps it, finds the VIP on its
//! own loopback, and answers the client directly.
//!
//! The outer source is the configured DSR prefix with its low bits taken from the flow hash (8
//! for IPv4, a /24; 16 for IPv6, a /112), so the backend's receive-side scaling spreads flows
//! over its queues while the prefix stays small enough to keep clear of real addresses.

use aya_ebpf::{helpers::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{
    flow::FAMILY_IPV4,
    maps::{DropReason, LbConfig},
};

use crate::{
    csum::ChecksumDelta,
    forward,
    parse::{IPPROTO_IPIP, IPPROTO_IPV6, IPV4_HEADER_LEN, IPV6_HEADER_LEN, IpPacket, ptr_at},
    types::{CopiedEgress, NextHop, Scratch, Verdict},
};

const ETH_HEADER_LEN: usize = 14;
const OUTER_TTL: u8 = 64;

// A call of its own keeps each branch's locals out of the caller's 512-byte stack frame.
#[inline(never)]
pub fn encapsulate(
    ctx: &XdpContext,
    scratch: &mut Scratch,
    config: &LbConfig,
    egress: CopiedEgress,
) -> Verdict {
    let service_id = scratch.selected.service_id;
    let result = if scratch.ip.key.family == FAMILY_IPV4 {
        encapsulate_ipv4(ctx, scratch, config)
    } else {
        encapsulate_ipv6(ctx, scratch, config)
    };
    result
        .and_then(|()| forward::to_next_hop(ctx, scratch, egress))
        .unwrap_or_else(|reason| Verdict::Drop(reason, service_id))
}

/// The outer source: the prefix with the flow hash in its last 8 (IPv4) or 16 (IPv6) bits.
#[inline(always)]
fn outer_source(prefix: &[u8; 16], family: u8, hash: u32) -> [u8; 16] {
    let mut src = *prefix;
    let low = ((hash ^ (hash >> 16)) as u16).to_be_bytes();
    if family == FAMILY_IPV4 {
        src[3] = low[0] ^ low[1];
    } else {
        src[14] = low[0];
        src[15] = low[1];
    }
    src
}

/// Makes room for `outer_len` bytes in front of the IP header and moves the Ethernet header
/// to the new front. Only untagged frames are encapsulated.
#[inline(always)]
fn make_room(ctx: &XdpContext, ip: &IpPacket, outer_len: usize) -> Result<(), DropReason> {
    if ip.l3() != ETH_HEADER_LEN {
        return Err(DropReason::Malformed);
    }
    // SAFETY: adjust_head only moves the frame start; every pointer is re-derived after it.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(outer_len as i32)) } != 0 {
        return Err(DropReason::NoHeadroom);
    }
    let old_eth = ptr_at::<[u8; ETH_HEADER_LEN]>(ctx, outer_len).ok_or(DropReason::Malformed)?;
    let new_eth = ptr_at::<[u8; ETH_HEADER_LEN]>(ctx, 0).ok_or(DropReason::Malformed)?;
    // SAFETY: both bounds-checked; the ranges do not overlap (outer_len >= 20 > 14).
    unsafe { *new_eth = *old_eth };
    Ok(())
}

/// Writes the outer IPv4 header and leaves the next hop in `scratch.hop`.
#[inline(always)]
fn encapsulate_ipv4(
    ctx: &XdpContext,
    scratch: &mut Scratch,
    config: &LbConfig,
) -> Result<(), DropReason> {
    let (ip, selected) = (&scratch.ip, &scratch.selected);
    let outer_len = ip
        .ip_len
        .checked_add(IPV4_HEADER_LEN as u16)
        .ok_or(DropReason::Malformed)?;
    make_room(ctx, ip, IPV4_HEADER_LEN)?;
    let src = outer_source(&config.dsr_src_v4, FAMILY_IPV4, selected.hash);
    let dst = selected.backend.addr;
    let cache_slot = selected.backend_id;
    // Built in the scratch area: a byte array on the stack may be written 8 bytes at a time at
    // any offset, which the verifier rejects.
    let header = &mut scratch.outer_v4;
    *header = [0u8; IPV4_HEADER_LEN];
    header[0] = 0x45;
    header[2..4].copy_from_slice(&outer_len.to_be_bytes());
    header[8] = OUTER_TTL;
    header[9] = IPPROTO_IPIP;
    header[12..16].copy_from_slice(&src[..4]);
    header[16..20].copy_from_slice(&dst[..4]);
    let mut sum = ChecksumDelta::default();
    sum.add_bytes(header);
    header[10..12].copy_from_slice(&sum.checksum().to_ne_bytes());
    let outer =
        ptr_at::<[u8; IPV4_HEADER_LEN]>(ctx, ETH_HEADER_LEN).ok_or(DropReason::Malformed)?;
    // SAFETY: bounds-checked by `ptr_at`.
    unsafe { *outer = *header };
    scratch.hop = NextHop {
        src,
        dst,
        cache_slot,
        ip_len: outer_len,
        family: FAMILY_IPV4,
        proto: IPPROTO_IPIP,
    };
    Ok(())
}

/// Writes the outer IPv6 header and leaves the next hop in `scratch.hop`.
#[inline(always)]
fn encapsulate_ipv6(
    ctx: &XdpContext,
    scratch: &mut Scratch,
    config: &LbConfig,
) -> Result<(), DropReason> {
    let (ip, selected) = (&scratch.ip, &scratch.selected);
    let family = ip.key.family;
    let payload_len = ip.ip_len;
    let outer_len = payload_len
        .checked_add(IPV6_HEADER_LEN as u16)
        .ok_or(DropReason::Malformed)?;
    make_room(ctx, ip, IPV6_HEADER_LEN)?;
    let src = outer_source(&config.dsr_src_v6, family, selected.hash);
    let dst = selected.backend.addr;
    let cache_slot = selected.backend_id;
    let header = &mut scratch.outer_v6;
    *header = [0u8; IPV6_HEADER_LEN];
    header[0] = 0x60;
    header[4..6].copy_from_slice(&payload_len.to_be_bytes());
    header[6] = IPPROTO_IPV6;
    header[7] = OUTER_TTL;
    header[8..24].copy_from_slice(&src);
    header[24..40].copy_from_slice(&dst);
    let outer =
        ptr_at::<[u8; IPV6_HEADER_LEN]>(ctx, ETH_HEADER_LEN).ok_or(DropReason::Malformed)?;
    // SAFETY: bounds-checked by `ptr_at`.
    unsafe { *outer = *header };
    scratch.hop = NextHop {
        src,
        dst,
        cache_slot,
        ip_len: outer_len,
        family,
        proto: IPPROTO_IPV6,
    };
    Ok(())
}
