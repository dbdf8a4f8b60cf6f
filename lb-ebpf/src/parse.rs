//! Header parsing: Ethernet (with at most one 802.1Q tag), IPv4, IPv6, TCP and UDP.
//!
//! Every read goes through [`ptr_at`], the one bounds check the verifier needs.

use core::mem;

use aya_ebpf::programs::XdpContext;
use lb_common::stats::ProtoSlot;
use network_types::{
    eth::{EthHdr, EtherType},
    ip::{IpProto, Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
    vlan::VlanHdr,
};

/// What the parser learned about a frame.
pub struct Packet {
    /// The stats slot the frame belongs to.
    pub slot: ProtoSlot,
}

/// Returns a pointer to a `T` at `offset` bytes into the frame, or `None` when the frame is too
/// short to hold it.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

/// Reads a header by value; `None` when the frame is too short.
#[inline(always)]
fn read_at<T: Copy>(ctx: &XdpContext, offset: usize) -> Option<T> {
    // SAFETY: `ptr_at` checked that the whole `T` lies inside the frame; the headers are
    // byte arrays, so any alignment is fine for an unaligned read.
    ptr_at::<T>(ctx, offset).map(|ptr| unsafe { ptr.read_unaligned() })
}

#[inline(always)]
pub fn parse_frame(ctx: &XdpContext) -> Packet {
    let slot = match parse_l3(ctx) {
        Some(slot) => slot,
        None => ProtoSlot::Malformed,
    };
    Packet { slot }
}

/// Parses Ethernet and one optional 802.1Q tag, then dispatches on the EtherType.
#[inline(always)]
fn parse_l3(ctx: &XdpContext) -> Option<ProtoSlot> {
    let eth: EthHdr = read_at(ctx, 0)?;
    let mut offset = EthHdr::LEN;
    let mut ether_type = eth.ether_type;
    if ether_type == EtherType::Ieee8021q as u16 {
        let vlan: VlanHdr = read_at(ctx, offset)?;
        offset += VlanHdr::LEN;
        ether_type = vlan.ether_type;
    }
    if ether_type == EtherType::Ipv4 as u16 {
        parse_ipv4(ctx, offset)
    } else if ether_type == EtherType::Ipv6 as u16 {
        parse_ipv6(ctx, offset)
    } else {
        Some(ProtoSlot::NonIp)
    }
}

const IPPROTO_TCP: u8 = IpProto::Tcp as u8;
const IPPROTO_UDP: u8 = IpProto::Udp as u8;
/// Bits of an IPv4 fragment field that hold the fragment offset.
const IPV4_FRAG_OFFSET_MASK: u16 = 0x1fff;

#[inline(always)]
fn parse_ipv4(ctx: &XdpContext, offset: usize) -> Option<ProtoSlot> {
    let ip: Ipv4Hdr = read_at(ctx, offset)?;
    let header_len = usize::from(ip.ihl());
    let total_len = usize::from(ip.tot_len());
    if ip.version() != 4 || header_len < Ipv4Hdr::LEN || total_len < header_len {
        return None;
    }
    if offset + total_len > ctx.data_end() - ctx.data() {
        return None;
    }
    // A non-first fragment carries no transport header.
    if u16::from_be_bytes(ip.frags) & IPV4_FRAG_OFFSET_MASK != 0 {
        return Some(ProtoSlot::Ipv4Other);
    }
    let l4 = offset + header_len;
    Some(match ip.proto {
        IPPROTO_TCP => transport_slot::<TcpHdr>(ctx, l4, ProtoSlot::Ipv4Tcp)?,
        IPPROTO_UDP => transport_slot::<UdpHdr>(ctx, l4, ProtoSlot::Ipv4Udp)?,
        _ => ProtoSlot::Ipv4Other,
    })
}

#[inline(always)]
fn parse_ipv6(ctx: &XdpContext, offset: usize) -> Option<ProtoSlot> {
    let ip: Ipv6Hdr = read_at(ctx, offset)?;
    if ip.version() != 6 {
        return None;
    }
    if offset + Ipv6Hdr::LEN + usize::from(ip.payload_len()) > ctx.data_end() - ctx.data() {
        return None;
    }
    let l4 = offset + Ipv6Hdr::LEN;
    Some(match ip.next_hdr {
        IPPROTO_TCP => transport_slot::<TcpHdr>(ctx, l4, ProtoSlot::Ipv6Tcp)?,
        IPPROTO_UDP => transport_slot::<UdpHdr>(ctx, l4, ProtoSlot::Ipv6Udp)?,
        _ => ProtoSlot::Ipv6Other,
    })
}

/// `slot` when a whole transport header `H` fits at `offset`, `None` when it is truncated.
#[inline(always)]
fn transport_slot<H>(ctx: &XdpContext, offset: usize, slot: ProtoSlot) -> Option<ProtoSlot> {
    ptr_at::<H>(ctx, offset).map(|_| slot)
}
