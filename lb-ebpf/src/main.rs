//! The XDP program. This file holds the entry point and the pipeline: a few lines of named
//! steps, each returning a verdict or letting the packet go on, whose work lives in the modules.
//! The maps are in `maps`, the types the steps pass each other in `types`; no module depends on
//! one that depends on it back.
//!
//! Pipeline: parse → count → blocklist → NAT reply → tracked flow (this CPU's flow cache, whose
//! copy carries backend, mode and route; else `FLOWS`, its service checked by id)
//! → else service (none: second chance, else the stack) → fragments → flow (conntrack or
//! Maglev) → NAT or DSR rewrite → next hop (the flow-cache copy's route, else the route cache,
//! else FIB) → XDP_TX / redirect.
//!
//! Rules the verifier and the code generator impose, learned the hard way:
//! - The established path is one function: every call of a subprogram costs a frame setup and
//!   a return through the kernel's return thunk. The pipeline's steps are `inline(always)`;
//!   only cold paths are calls of their own (`inline(never)`): new flows, NAT replies, FIB
//!   lookups, DSR, fragments, the malformed-frame log.
//! - A `#[cold]` function must stay in `.text` (`link_section`): in `.text.unlikely` aya links
//!   calls by their offset in the wrong section, and the program calls the wrong function.
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
mod second_chance;
mod stats;
mod types;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use aya_log_ebpf::debug;
use lb_common::{
    maps::{DropReason, LbConfig, MODE_DSR, Service},
    stats::ProtoSlot,
};

use crate::{
    maps::{CONFIG, SCRATCH},
    types::{CopiedEgress, NO_SERVICE, Scratch, Verdict},
};

/// What a pipeline step says: `Ok` lets the packet go on to the next step (with what this one
/// found), `Err` settles it with its verdict.
type Step<T = ()> = Result<T, Verdict>;

#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    let (Ok(verdict) | Err(verdict)) = try_lb_xdp(&ctx);
    match verdict {
        Verdict::Action(action) => action,
        Verdict::Drop(reason, service_id) => {
            stats::count_drop(reason, service_id);
            xdp_action::XDP_DROP
        }
    }
}

/// The pipeline (see the module's notes): each step settles the packet or lets it go on.
#[inline(always)]
fn try_lb_xdp(ctx: &XdpContext) -> Step<Verdict> {
    let scratch = parse_packet(ctx)?;
    // Blocked sources are dropped before any other work. The check is left out while the
    // blocklist is empty, and for a tracked flow whose source passed it under the current
    // blocklist version; `check_blocklist` says whether this packet still needs it.
    let mut check_blocklist = screen_source(scratch)?;
    let config = CONFIG.get(0).ok_or_else(Verdict::pass)?;
    reverse_nat_reply(ctx, scratch, config, &mut check_blocklist)?;
    // Established flows first: a tracked flow names its service, so its packets skip the
    // service lookup.
    let mut egress = None;
    let established = flow::established_fast(scratch, &mut check_blocklist, &mut egress);
    let mode = match established.transpose()? {
        Some(mode) => mode,
        None => {
            drop_blocked_source(scratch, check_blocklist)?;
            let service = lookup_service(ctx, scratch, config)?;
            flow::select_backend(scratch, service, config)
                .map_err(|reason| Verdict::Drop(reason, service.id))?;
            service.mode
        }
    };
    if scratch.selected.is_new {
        stats::count_new_flow(&scratch.selected);
    }
    Ok(forward_to_backend(ctx, scratch, config, mode, egress))
}

/// Parses the frame into this CPU's scratch area and counts it under its protocol; frames that
/// are not IP, and malformed ones, go to the stack.
#[inline(always)]
fn parse_packet(ctx: &XdpContext) -> Step<&'static mut Scratch> {
    let len = ctx.data_end() - ctx.data();
    let scratch = SCRATCH.get_ptr_mut(0).ok_or_else(Verdict::pass)?;
    // SAFETY: the per-CPU scratch slot is this program run's alone.
    let scratch = unsafe { &mut *scratch };
    let ip = &mut scratch.ip;
    *ip = parse::IpPacket::default();
    let slot = parse::parse_frame(ctx, ip);
    stats::count_frame(slot, len);
    match slot {
        ProtoSlot::Malformed => {
            log_malformed(ctx, len);
            Err(Verdict::pass())
        }
        ProtoSlot::NonIp => Err(Verdict::pass()),
        _ => Ok(scratch),
    }
}

// A cold call of its own: the log record, written field by field, stays out of the pipeline's
// registers, and the established path spills less (13 instructions less for a tracked flow's
// packet than with the log inline). In `.text`: see the module's notes.
#[cold]
#[inline(never)]
#[unsafe(link_section = ".text")]
fn log_malformed(ctx: &XdpContext, len: usize) {
    debug!(
        ctx,
        "passing a malformed frame of {} bytes to the stack", len
    );
}

/// Reads the blocklist's version and, unless the packet may belong to a tracked flow, checks
/// its source: a blocked source's SYNs and datagrams are dropped without a flow lookup. Returns
/// whether the source still needs the check.
#[inline(always)]
fn screen_source(scratch: &mut Scratch) -> Step<bool> {
    let version = lookup::blocklist_version();
    scratch.blocklist_version = version;
    let check_blocklist = version != 0;
    if check_blocklist && !scratch.ip.may_be_established() {
        drop_blocked_source(scratch, true)?;
        return Ok(false);
    }
    Ok(check_blocklist)
}

/// Drops the packet when its source still needs the blocklist check (`check_blocklist`) and
/// is blocked.
#[inline(always)]
fn drop_blocked_source(scratch: &mut Scratch, check_blocklist: bool) -> Step {
    if check_blocklist && lookup::is_source_blocked(scratch) {
        return Err(Verdict::Drop(DropReason::Blocked, NO_SERVICE));
    }
    Ok(())
}

/// A backend's reply to a NAT flow (addressed to the LB's NAT source address) goes back to
/// its client, from the VIP; other packets go on.
#[inline(always)]
fn reverse_nat_reply(
    ctx: &XdpContext,
    scratch: &mut Scratch,
    config: &LbConfig,
    check_blocklist: &mut bool,
) -> Step {
    let ip = &scratch.ip;
    // A fragmented reply is not translated: its later fragments carry no ports to match.
    if !ip.has_ports || ip.is_fragment || ip.key.dst_addr != *config.nat_source(ip.key.family) {
        return Ok(());
    }
    drop_blocked_source(scratch, *check_blocklist)?;
    *check_blocklist = false;
    match nat::reverse(ctx, scratch, config) {
        Some(verdict) => Err(verdict),
        None => Ok(()),
    }
}

/// The packet's service, by key: for packets the established-flow path did not settle.
/// Fragments, packets to no service, and packets that cannot be forwarded go no further; a
/// packet to no service goes to the stack, or to the previous owner of the gateway's address
/// during a handover (second chance).
#[inline(always)]
fn lookup_service(
    ctx: &XdpContext,
    scratch: &mut Scratch,
    config: &LbConfig,
) -> Step<&'static Service> {
    let Some(service) = lookup::service_of(scratch) else {
        if scratch.ip.is_fragment && lookup::is_vip(scratch) {
            return Err(flow::fragment_verdict(config, NO_SERVICE));
        }
        return Err(second_chance::verdict(ctx, scratch));
    };
    let ip = &scratch.ip;
    if ip.is_fragment {
        return Err(flow::fragment_verdict(config, service.id));
    }
    // Before a backend is selected, so a packet that cannot be forwarded claims no flow entry
    // or NAT port.
    if ip.ttl <= 1 {
        return Err(Verdict::Drop(DropReason::TtlExceeded, service.id));
    }
    Ok(service)
}

/// Rewrites the packet for its backend as the service's mode says (DSR or NAT) and sends it
/// on; counts it for its service and backend when it leaves.
#[inline(always)]
fn forward_to_backend(
    ctx: &XdpContext,
    scratch: &mut Scratch,
    config: &LbConfig,
    mode: u32,
    egress: CopiedEgress,
) -> Verdict {
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
