//! Map lookups that decide where a packet belongs: blocklist, NAT replies, services.

use lb_common::{
    flow::{FAMILY_IPV4, FlowKey},
    maps::{LbConfig, NatKey, Service, ServiceKey, VipKey},
};

use crate::{
    maps::{BLOCKLIST_V4, BLOCKLIST_V6, BLOCKLIST_VERSION, NAT_REVERSE, SERVICES, VIPS},
    types::Scratch,
};

/// The blocklist's version: 0 while it is empty (see `BLOCKLIST_VERSION`).
#[inline(always)]
pub fn blocklist_version() -> u32 {
    BLOCKLIST_VERSION.get(0).map_or(0, |version| *version)
}

/// Whether the packet's source is in the blocklist tries (look only while they hold any).
#[inline(always)]
pub fn is_source_blocked(scratch: &mut Scratch) -> bool {
    let src = &scratch.ip.key.src_addr;
    if scratch.ip.key.family == FAMILY_IPV4 {
        scratch.block_v4.prefix_len = 32;
        scratch.block_v4.data = [src[0], src[1], src[2], src[3]];
        BLOCKLIST_V4.get(&scratch.block_v4).is_some()
    } else {
        scratch.block_v6.prefix_len = 128;
        scratch.block_v6.data = *src;
        BLOCKLIST_V6.get(&scratch.block_v6).is_some()
    }
}

/// The client flow a backend's reply belongs to, when the packet is one: addressed to the
/// LB's NAT source address on a port the LB handed out.
#[inline(always)]
pub fn nat_reply_flow(scratch: &mut Scratch, config: &LbConfig) -> Option<&'static FlowKey> {
    let ip = &scratch.ip;
    if ip.key.dst_addr != *config.nat_source(ip.key.family) {
        return None;
    }
    scratch.nat_key = NatKey {
        backend_addr: ip.key.src_addr,
        backend_port_be: ip.key.src_port_be,
        nat_port_be: ip.key.dst_port_be,
        proto: ip.key.proto,
        family: ip.key.family,
        _pad: [0; 2],
    };
    // SAFETY: LRU entries may be evicted concurrently; their memory stays valid for this run.
    unsafe { NAT_REVERSE.get(&scratch.nat_key) }
}

#[inline(always)]
pub fn service_of(scratch: &mut Scratch) -> Option<&'static Service> {
    let ip = &scratch.ip;
    if !ip.has_ports {
        return None;
    }
    scratch.service_key = ServiceKey {
        vip: ip.key.dst_addr,
        port_be: ip.key.dst_port_be,
        proto: ip.key.proto,
        family: ip.key.family,
    };
    // SAFETY: userspace replaces entries whole (the map's update is atomic per entry).
    unsafe { SERVICES.get(&scratch.service_key) }
}

// A call of its own: fragments to a VIP are rare.
#[inline(never)]
pub fn is_vip(scratch: &mut Scratch) -> bool {
    let ip = &scratch.ip;
    scratch.vip_key = VipKey {
        vip: ip.key.dst_addr,
        family: ip.key.family,
        _pad: [0; 3],
    };
    // SAFETY: only presence is read.
    unsafe { VIPS.get(&scratch.vip_key) }.is_some()
}
