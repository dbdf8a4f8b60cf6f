//! The XDP program. This file holds the maps and the entry points only; the pipeline steps
//! live in their own modules.
#![no_std]
#![no_main]

mod parse;
mod stats;

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::PerCpuArray,
    programs::XdpContext,
};
use aya_log_ebpf::debug;
use lb_common::stats::{Counters, ProtoSlot};

/// Packets and bytes per protocol, indexed by `ProtoSlot`; per CPU, summed in userspace.
/// Pinned by name, so counts survive a restart of lb-control.
#[map]
static PROTO_STATS: PerCpuArray<Counters> = PerCpuArray::pinned(ProtoSlot::COUNT, 0);

/// The load balancer's entry point. For now it parses and counts every frame and passes it on;
/// forwarding grows from here.
#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    let len = ctx.data_end() - ctx.data();
    let packet = parse::parse_frame(&ctx);
    if packet.slot == ProtoSlot::Malformed {
        debug!(
            &ctx,
            "passing a malformed frame of {} bytes to the stack", len
        );
    }
    stats::count_frame(packet.slot, len);
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
