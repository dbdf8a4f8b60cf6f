//! Per-CPU counters. These are the only per-packet map writes besides the flow map.

use lb_common::stats::ProtoSlot;

use crate::PROTO_STATS;

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
