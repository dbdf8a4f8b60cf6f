//! Map lookups that decide where a packet belongs: blocklist, NAT replies, services.
//!
//! Each is a call of its own (`inline(never)`), so its key lives in its own stack frame rather
//! than in the entry point's, which must leave room for the forwarding path below it.

use aya_ebpf::maps::lpm_trie::Key;
use lb_common::{
    flow::{FAMILY_IPV4, FlowKey},
    maps::{BLOCKLIST_COUNT, LbConfig, NatKey, Service, ServiceKey, VipKey},
};

use crate::{
    BLOCKLIST_ENTRIES, BLOCKLIST_V4, BLOCKLIST_V6, NAT_REVERSE, SERVICES, VIPS, parse::IpPacket,
};

#[inline(never)]
pub fn is_source_blocked(ip: &IpPacket) -> bool {
    if BLOCKLIST_ENTRIES
        .get(BLOCKLIST_COUNT)
        .is_none_or(|entries| *entries == 0)
    {
        return false;
    }
    if ip.family == FAMILY_IPV4 {
        let addr = [ip.src[0], ip.src[1], ip.src[2], ip.src[3]];
        BLOCKLIST_V4.get(Key::new(32, addr)).is_some()
    } else {
        BLOCKLIST_V6.get(Key::new(128, ip.src)).is_some()
    }
}

/// The client flow a backend's reply belongs to, when `ip` is one: addressed to the LB's NAT
/// source address on a port the LB handed out.
#[inline(always)]
pub fn nat_reply_flow(ip: &IpPacket, config: &LbConfig) -> Option<FlowKey> {
    if ip.dst != *config.nat_source(ip.family) {
        return None;
    }
    let key = NatKey {
        backend_addr: ip.src,
        backend_port_be: ip.src_port_be,
        nat_port_be: ip.dst_port_be,
        proto: ip.proto,
        family: ip.family,
        _pad: [0; 2],
    };
    // SAFETY: the value is copied out at once; LRU entries may be evicted concurrently.
    unsafe { NAT_REVERSE.get(&key) }.copied()
}

#[inline(never)]
pub fn service_of(ip: &IpPacket) -> Option<Service> {
    if !ip.has_ports {
        return None;
    }
    let key = ServiceKey {
        vip: ip.dst,
        port_be: ip.dst_port_be,
        proto: ip.proto,
        family: ip.family,
    };
    // SAFETY: the value is copied out at once.
    unsafe { SERVICES.get(&key) }.copied()
}

#[inline(never)]
pub fn is_vip(ip: &IpPacket) -> bool {
    let key = VipKey {
        vip: ip.dst,
        family: ip.family,
        _pad: [0; 3],
    };
    // SAFETY: only presence is read.
    unsafe { VIPS.get(&key) }.is_some()
}
