//! The XDP benchmark's reference, "a bare parse-and-XDP_PASS program": the load balancer's own
//! header parser, run as the load balancer runs it (the parsed packet in a per-CPU scratch
//! slot, see `SCRATCH` in maps.rs), then XDP_PASS.
#![no_std]
#![no_main]

#[path = "../parse.rs"]
#[allow(
    dead_code,
    reason = "the reference uses the parser alone, not the helpers the load balancer adds"
)]
mod parse;

use aya_ebpf::{
    bindings::xdp_action, macros::map, macros::xdp, maps::PerCpuArray, programs::XdpContext,
};
use lb_common::stats::ProtoSlot;

/// Where the parsed packet goes. On the stack LLVM would see that the IP length check already
/// covers the transport header and drop the bounds check the verifier needs.
#[map]
static SCRATCH: PerCpuArray<parse::IpPacket> = PerCpuArray::with_max_entries(1, 0);

/// Parses Ethernet, IP and the transport ports, then passes the packet. Malformed and "land"
/// packets (source = destination) are dropped: a decision that reads the whole 5-tuple, so the
/// compiler cannot leave the parse out.
#[xdp]
pub fn xdp_parse_pass(ctx: XdpContext) -> u32 {
    let Some(ip) = SCRATCH.get_ptr_mut(0) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: the per-CPU scratch slot is this program run's alone.
    let ip = unsafe { &mut *ip };
    *ip = parse::IpPacket::default();
    let slot = parse::parse_frame(&ctx, ip);
    let key = &ip.key;
    let is_land = key.src_addr == key.dst_addr && key.src_port_be == key.dst_port_be;
    if slot == ProtoSlot::Malformed || is_land {
        xdp_action::XDP_DROP
    } else {
        xdp_action::XDP_PASS
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
