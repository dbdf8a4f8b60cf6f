//! The XDP program. This file holds the entry point; the maps are in `maps`, the types the
//! steps share in `types`, and each pipeline step lives in its own module and returns a verdict
//! or lets the packet continue. No module depends on one that depends on it back.
//!
//! Pipeline: parse → count → blocklist → NAT reply → tracked flow (this CPU's flow cache, whose
//! copy carries backend, mode and route; else `FLOWS`, its service checked by id)
//! → else service → fragments → flow (conntrack or Maglev) → NAT or DSR rewrite → next hop
//! (the flow-cache copy's route, else the route cache, else FIB) → XDP_TX / redirect.
//!
//! Rules the verifier and the code generator impose, learned the hard way:
//! - The established path is one function: every call of a subprogram costs a frame setup and
//!   a return through the kernel's return thunk. Only cold paths are calls of their own
//!   (`inline(never)`): new flows, NAT replies, FIB lookups, DSR, fragments.
//! - 512 bytes of stack across the deepest call chain, and subprograms take at most 5 args.
//! - The program is built allowing misaligned loads and stores (lb-ebpf/build.rs): an address
//!   in a packet is one load, not four or sixteen byte loads, shifts and ors, which also keeps
//!   the register pressure (and the spills that fill the stack) down. The verifier accepts
//!   misaligned access to packets and map values but not to the stack. So structures of bytes
//!   (keys, headers, route entries) are built in the per-CPU `SCRATCH` area, never on the
//!   stack; a verifier log saying "misaligned stack access" means one slipped onto it.
//! - Non-inlined functions return no `Option`/`Result` with a payload in padding (the kernel
//!   rejects the BTF for it): they fill in through `&mut` instead.
//! - Packet offsets are masked (`parse::OFFSET_MASK`) so the verifier can bound them, and a
//!   subprogram never does arithmetic on `data_end` (nor on a packet pointer the compiler
//!   passed it; keep packet accesses in the function that checked them).
#![no_std]
#![no_main]
#![allow(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys are passed by reference on purpose: by value they are copied onto the stack"
)]

mod csum;
mod dsr;
mod flow;
mod flow_cache;
mod forward;
mod lookup;
mod maps;
mod nat;
mod parse;
mod stats;
mod types;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use aya_log_ebpf::debug;
use lb_common::{
    maps::{DropReason, LbConfig, MODE_DSR},
    stats::ProtoSlot,
};

use crate::{
    maps::{CONFIG, SCRATCH},
    types::{NO_SERVICE, Scratch, Verdict},
};

#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    match try_lb_xdp(&ctx) {
        Verdict::Action(action) => action,
        Verdict::Drop(reason, service_id) => {
            stats::count_drop(reason, service_id);
            xdp_action::XDP_DROP
        }
    }
}

#[inline(always)]
fn try_lb_xdp(ctx: &XdpContext) -> Verdict {
    let len = ctx.data_end() - ctx.data();
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return Verdict::pass();
    };
    // SAFETY: the per-CPU scratch slot is this program run's alone.
    let scratch = unsafe { &mut *scratch };
    let ip = &mut scratch.ip;
    *ip = parse::IpPacket::default();
    let slot = parse::parse_frame(ctx, ip);
    stats::count_frame(slot, len);
    match slot {
        ProtoSlot::Malformed => {
            debug!(
                ctx,
                "passing a malformed frame of {} bytes to the stack", len
            );
            return Verdict::pass();
        }
        ProtoSlot::NonIp => return Verdict::pass(),
        _ => {}
    }
    // Blocked sources are dropped before any other work. The check is left out while the
    // blocklist is empty, and for a tracked flow whose source passed it under the current
    // blocklist version; `check_blocklist` says whether this packet still needs it. Only TCP
    // segments other than connection attempts look for their flow first: a blocked source's
    // SYNs and datagrams are dropped without a flow lookup.
    let blocklist = lookup::blocklist_version();
    scratch.blocklist_version = blocklist;
    let mut check_blocklist = blocklist != 0;
    if check_blocklist && !scratch.ip.may_be_established() {
        if lookup::is_source_blocked(scratch) {
            return Verdict::Drop(DropReason::Blocked, NO_SERVICE);
        }
        check_blocklist = false;
    }
    let Some(config) = CONFIG.get(0) else {
        return Verdict::pass();
    };
    let ip = &scratch.ip;
    // A fragmented reply is not translated: its later fragments carry no ports to match.
    if ip.has_ports && !ip.is_fragment && ip.key.dst_addr == *config.nat_source(ip.key.family) {
        if check_blocklist && lookup::is_source_blocked(scratch) {
            return Verdict::Drop(DropReason::Blocked, NO_SERVICE);
        }
        check_blocklist = false;
        if let Some(verdict) = nat::reverse(ctx, scratch, config) {
            return verdict;
        }
    }
    // Established flows first: a tracked flow names its service, so its packets skip the
    // service lookup.
    let mut egress = None;
    let mode = match flow::established_fast(scratch, &mut check_blocklist, &mut egress) {
        Some(Ok(mode)) => mode,
        Some(Err(verdict)) => return verdict,
        None if check_blocklist && lookup::is_source_blocked(scratch) => {
            return Verdict::Drop(DropReason::Blocked, NO_SERVICE);
        }
        None => match choose_backend(scratch, config) {
            Ok(mode) => mode,
            Err(verdict) => return verdict,
        },
    };
    if scratch.selected.is_new {
        stats::count_new_flow(&scratch.selected);
    }
    let verdict = if mode == MODE_DSR {
        dsr::encapsulate(ctx, scratch, config, egress)
    } else {
        nat::forward(ctx, scratch, config, egress)
    };
    if let Verdict::Action(_) = verdict {
        let ip = &scratch.ip;
        stats::count_forward(&scratch.selected, ip.l3() + usize::from(ip.ip_len));
    }
    verdict
}

/// The packet's service, by key, and its backend (tracked or new) in `scratch.selected`: for
/// packets the established-flow path did not settle. Returns the service's mode, or what to do
/// with a packet that goes to no backend.
#[inline(always)]
fn choose_backend(scratch: &mut Scratch, config: &LbConfig) -> Result<u32, Verdict> {
    let Some(service) = lookup::service_of(scratch) else {
        if scratch.ip.is_fragment && lookup::is_vip(scratch) {
            return Err(flow::fragment_verdict(config, NO_SERVICE));
        }
        return Err(Verdict::pass());
    };
    let ip = &scratch.ip;
    if ip.is_fragment {
        return Err(flow::fragment_verdict(config, service.id));
    }
    // Before a backend is chosen, so a packet that cannot be forwarded claims no flow entry
    // or NAT port.
    if ip.ttl <= 1 {
        return Err(Verdict::Drop(DropReason::TtlExceeded, service.id));
    }
    flow::select_backend(scratch, service, config)
        .map_err(|reason| Verdict::Drop(reason, service.id))?;
    Ok(service.mode)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
