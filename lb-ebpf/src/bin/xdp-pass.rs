//! A bare XDP_PASS program in an object of its own, with no maps.
//!
//! The lab attaches it to veth peers (a native-mode `XDP_TX` or redirect into a veth only
//! delivers when the peer has an XDP program), and benchmarks use it as the anchor.
#![no_std]
#![no_main]

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

#[xdp]
pub fn xdp_pass(_ctx: XdpContext) -> u32 {
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
