//! Header parsing: Ethernet (with at most one 802.1Q tag), IPv4, IPv6, TCP and UDP.
//!
//! Every read goes through [`ptr_at`], the one bounds check the verifier needs.

use core::mem;

use aya_ebpf::programs::XdpContext;
use lb_common::{
    flow::{FAMILY_IPV4, FAMILY_IPV6, FlowKey},
    stats::ProtoSlot,
};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::{IpProto, Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
    vlan::VlanHdr,
};

pub const IPPROTO_TCP: u8 = IpProto::Tcp as u8;
pub const IPPROTO_UDP: u8 = IpProto::Udp as u8;
pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_IPV6: u8 = 41;
/// An IPv4 header without options, and the IPv6 header.
pub const IPV4_HEADER_LEN: usize = 20;
pub const IPV6_HEADER_LEN: usize = 40;
/// Bits of an IPv4 fragment field that hold the fragment offset, and the more-fragments flag.
const IPV4_FRAG_OFFSET_MASK: u16 = 0x1fff;
const IPV4_MORE_FRAGMENTS: u16 = 0x2000;
/// IPv6 fragment extension header.
const IPPROTO_FRAGMENT: u8 = 44;

/// TCP flag bits in byte 13 of the TCP header.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// An IP packet's addresses and transport, with the offsets needed to rewrite it.
#[derive(Clone, Copy, Default)]
#[repr(C, align(8))]
pub struct IpPacket {
    /// The 5-tuple, filled in place: it is the key of the flow lookups, with no copy. Ports
    /// are zero when `has_ports` is false.
    pub key: FlowKey,
    /// Offset of the IP header from the start of the frame.
    pub l3_offset: u16,
    /// Offset of the transport header (meaningful when `has_ports`).
    pub l4_offset: u16,
    /// Length of the IP packet (header and payload) as its header states.
    pub ip_len: u16,
    /// A whole TCP or UDP header is present (not a fragment, not truncated).
    pub has_ports: bool,
    /// Part of a fragmented packet (first or later).
    pub is_fragment: bool,
    /// IPv4 TTL or IPv6 hop limit.
    pub ttl: u8,
    pub tcp_flags: u8,
}

/// Header offsets never exceed 18 (Ethernet, one VLAN tag) + 60 (IPv4 with options). The mask
/// tells the verifier so: a packet pointer whose offset may reach 64 KiB gets no checked range.
const OFFSET_MASK: u16 = 0xff;

impl IpPacket {
    #[inline(always)]
    pub fn l3(&self) -> usize {
        usize::from(self.l3_offset & OFFSET_MASK)
    }

    #[inline(always)]
    pub fn l4(&self) -> usize {
        usize::from(self.l4_offset & OFFSET_MASK)
    }

    /// A TCP segment that is no connection attempt (SYN without ACK): it may belong to an
    /// established flow.
    #[inline(always)]
    pub fn may_be_established(&self) -> bool {
        self.has_ports
            && !self.is_fragment
            && self.key.proto == IPPROTO_TCP
            && !self.is_connection_attempt()
    }

    /// A TCP SYN without ACK: a client opening (or reopening) a connection.
    #[inline(always)]
    pub fn is_connection_attempt(&self) -> bool {
        self.key.proto == IPPROTO_TCP && self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }
}

/// Returns a pointer to a `T` at `offset` bytes into the frame, or `None` when the frame is too
/// short to hold it.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// True when `len` bytes starting at `offset` lie inside the frame. Compared as packet
/// pointers: the verifier rejects arithmetic on the end pointer.
#[inline(always)]
fn fits(ctx: &XdpContext, offset: usize, len: usize) -> bool {
    ctx.data() + offset + len <= ctx.data_end()
}

/// A header in place, without copying it to the stack; `None` when the frame is too short.
#[inline(always)]
fn header_at<T>(ctx: &XdpContext, offset: usize) -> Option<&T> {
    // SAFETY: `ptr_at` checked that the whole `T` lies inside the frame, which stays valid and
    // unmoved while the parser runs; the header types are byte arrays (Ethernet and VLAN have
    // one u16, at an even offset of a frame that starts 2-byte aligned).
    ptr_at::<T>(ctx, offset).map(|ptr| unsafe { &*ptr })
}

/// Parses a frame into `ip` and returns its stats slot; `ip` is meaningful when the slot is an
/// IPv4 or IPv6 one. One `IpPacket` filled in place keeps the entry point's stack small.
#[inline(always)]
pub fn parse_frame(ctx: &XdpContext, ip: &mut IpPacket) -> ProtoSlot {
    parse_l3(ctx, ip).unwrap_or(ProtoSlot::Malformed)
}

/// Parses Ethernet and one optional 802.1Q tag, then dispatches on the EtherType.
#[inline(always)]
fn parse_l3(ctx: &XdpContext, ip: &mut IpPacket) -> Option<ProtoSlot> {
    let eth: &EthHdr = header_at(ctx, 0)?;
    let mut offset = EthHdr::LEN;
    let mut ether_type = eth.ether_type;
    if ether_type == EtherType::Ieee8021q as u16 {
        let vlan: &VlanHdr = header_at(ctx, offset)?;
        offset += VlanHdr::LEN;
        ether_type = vlan.ether_type;
    }
    if ether_type == EtherType::Ipv4 as u16 {
        parse_ipv4(ctx, offset, ip)
    } else if ether_type == EtherType::Ipv6 as u16 {
        parse_ipv6(ctx, offset, ip)
    } else {
        Some(ProtoSlot::NonIp)
    }
}

#[inline(always)]
fn parse_ipv4(ctx: &XdpContext, offset: usize, packet: &mut IpPacket) -> Option<ProtoSlot> {
    let ip: &Ipv4Hdr = header_at(ctx, offset)?;
    let header_len = usize::from(ip.ihl());
    let total_len = ip.tot_len();
    if ip.version() != 4 || header_len < Ipv4Hdr::LEN || usize::from(total_len) < header_len {
        return None;
    }
    if !fits(ctx, offset, usize::from(total_len)) {
        return None;
    }
    let frags = u16::from_be_bytes(ip.frags);
    let is_later_fragment = frags & IPV4_FRAG_OFFSET_MASK != 0;
    packet.key.family = FAMILY_IPV4;
    packet.l3_offset = offset as u16;
    packet.l4_offset = (offset + header_len) as u16;
    packet.ip_len = total_len;
    packet.key.proto = ip.proto;
    packet.key.src_addr[..4].copy_from_slice(&ip.src_addr);
    packet.key.dst_addr[..4].copy_from_slice(&ip.dst_addr);
    packet.is_fragment = is_later_fragment || frags & IPV4_MORE_FRAGMENTS != 0;
    packet.ttl = ip.ttl;
    Some(match ip.proto {
        IPPROTO_TCP if !is_later_fragment => {
            read_ports(ctx, packet)?;
            ProtoSlot::Ipv4Tcp
        }
        IPPROTO_UDP if !is_later_fragment => {
            read_ports(ctx, packet)?;
            ProtoSlot::Ipv4Udp
        }
        _ => ProtoSlot::Ipv4Other,
    })
}

#[inline(always)]
fn parse_ipv6(ctx: &XdpContext, offset: usize, packet: &mut IpPacket) -> Option<ProtoSlot> {
    let ip: &Ipv6Hdr = header_at(ctx, offset)?;
    if ip.version() != 6 {
        return None;
    }
    let payload_len = ip.payload_len();
    if !fits(ctx, offset + Ipv6Hdr::LEN, usize::from(payload_len)) {
        return None;
    }
    packet.key.family = FAMILY_IPV6;
    packet.l3_offset = offset as u16;
    packet.l4_offset = (offset + Ipv6Hdr::LEN) as u16;
    packet.ip_len = payload_len.saturating_add(Ipv6Hdr::LEN as u16);
    packet.key.proto = ip.next_hdr;
    packet.key.src_addr = ip.src_addr;
    packet.key.dst_addr = ip.dst_addr;
    packet.is_fragment = ip.next_hdr == IPPROTO_FRAGMENT;
    packet.ttl = ip.hop_limit;
    // Extension headers are not followed: such packets never match a service.
    Some(match ip.next_hdr {
        IPPROTO_TCP => {
            read_ports(ctx, packet)?;
            ProtoSlot::Ipv6Tcp
        }
        IPPROTO_UDP => {
            read_ports(ctx, packet)?;
            ProtoSlot::Ipv6Udp
        }
        _ => ProtoSlot::Ipv6Other,
    })
}

/// Reads the ports (and TCP flags) of a TCP or UDP header; `None` when it is truncated, in the
/// frame or within the IP packet's own stated length.
#[inline(always)]
fn read_ports(ctx: &XdpContext, packet: &mut IpPacket) -> Option<()> {
    let header_len = if packet.key.proto == IPPROTO_TCP {
        TcpHdr::LEN
    } else {
        UdpHdr::LEN
    };
    if packet.l4() + header_len > packet.l3() + usize::from(packet.ip_len) {
        return None;
    }
    if packet.key.proto == IPPROTO_TCP {
        let tcp: &TcpHdr = header_at(ctx, packet.l4())?;
        packet.key.src_port_be = u16::from_ne_bytes(tcp.source);
        packet.key.dst_port_be = u16::from_ne_bytes(tcp.dest);
        packet.tcp_flags = header_at::<[u8; 14]>(ctx, packet.l4())?[13];
    } else {
        let udp: &UdpHdr = header_at(ctx, packet.l4())?;
        packet.key.src_port_be = u16::from_ne_bytes(udp.src);
        packet.key.dst_port_be = u16::from_ne_bytes(udp.dst);
    }
    packet.has_ports = true;
    Some(())
}
