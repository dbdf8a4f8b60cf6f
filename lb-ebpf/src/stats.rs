//! Counters. Per-CPU counters are the only per-packet map writes besides the flow maps; every
//! policy drop is counted under its reason.

use lb_common::{maps::DropReason, stats::ProtoSlot};

use crate::{
    maps::{BACKEND_STATS, DROP_STATS, PROTO_STATS, SERVICE_STATS},
    types::{NO_SERVICE, Selected},
};

#[inline(always)]
pub fn count_frame(slot: ProtoSlot, len: usize) {
    if let Some(counters) = PROTO_STATS.get_ptr_mut(slot as u32) {
        // SAFETY: the pointer comes from the map and this CPU's slot is ours alone.
        unsafe {
            (*counters).packets += 1;
            (*counters).bytes += len as u64;
        }
    }
}

/// Counts a new flow for its service and backend, whether or not its first packet makes it out.
#[inline(always)]
pub fn count_new_flow(selected: &Selected) {
    if let Some(stats) = SERVICE_STATS.get_ptr_mut(selected.service_id) {
        // SAFETY: per-CPU slot from the map.
        unsafe { (*stats).new_flows += 1 };
    }
    if let Some(stats) = BACKEND_STATS.get_ptr_mut(selected.backend_id) {
        // SAFETY: per-CPU slot from the map.
        unsafe { (*stats).new_flows += 1 };
    }
}

/// Counts a packet sent on to its backend, for the service and the backend.
#[inline(always)]
pub fn count_forward(selected: &Selected, len: usize) {
    if let Some(stats) = SERVICE_STATS.get_ptr_mut(selected.service_id) {
        // SAFETY: per-CPU slot from the map.
        unsafe {
            (*stats).packets += 1;
            (*stats).bytes += len as u64;
        }
    }
    if let Some(stats) = BACKEND_STATS.get_ptr_mut(selected.backend_id) {
        // SAFETY: per-CPU slot from the map.
        unsafe {
            (*stats).packets += 1;
            (*stats).bytes += len as u64;
        }
    }
}

/// Counts a drop under its reason: in the service's counters when it belongs to one, else in
/// the program-wide ones.
#[inline(always)]
pub fn count_drop(reason: DropReason, service_id: u32) {
    // The compiler knows a `DropReason` is in range and would drop the bounds check; the
    // verifier sees a scalar reloaded from the stack and wants it. A volatile read keeps it.
    // SAFETY: reading a local.
    let index = unsafe { core::ptr::read_volatile(&(reason as usize)) };
    if service_id != NO_SERVICE {
        if let Some(stats) = SERVICE_STATS.get_ptr_mut(service_id)
            && index < DropReason::COUNT
        {
            // SAFETY: per-CPU slot from the map; the index is checked above.
            unsafe { (*stats).drops[index] += 1 };
        }
        return;
    }
    if let Some(drops) = DROP_STATS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot from the map.
        unsafe { *drops += 1 };
    }
}
