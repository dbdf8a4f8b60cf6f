//! A direct-mapped cache of tracked flows in front of `FLOWS`, with slots of its own for each
//! CPU: an established flow's packets find their flow with a few inlined loads instead of the
//! LRU hash map's lookup (hashing the 40-byte key, walking the bucket, comparing the key: calls
//! that each return through the kernel's return thunk, a third of an established packet's time).
//!
//! `FLOWS` stays the one authority; a cached copy is used only while it is provably the same:
//! - Packets that change a flow (SYN, FIN, RST) and closing flows never use the cache.
//! - A copy is used for `FLOW_CACHE_TICKS` at most, then looked up in `FLOWS` again, which
//!   also keeps the LRU's reference bit of a busy flow set.
//! - Userspace bumps `FLOW_CACHE_EPOCH` after it deletes flows (a backend going down or
//!   away): every copy filled before that is void.
//! - The program itself, when it replaces a flow's entry or takes its NAT port over, clears
//!   that flow's slot on every CPU ([`forget_everywhere`]).
//!
//! A copy also holds what the flow's packets need besides the flow: its backend's entry and its
//! service's mode as they were when the copy was filled, and the route to the backend (taken
//! from `ROUTES` by the first packet that finds there a route fresh for the copy's whole life:
//! see `forward::to_next_hop`). A hit looks none of them up. Userspace
//! bumps the epoch after every change to them that established flows must see (a backend
//! marked down or removed, a service removed or its mode changed); a change written behind its
//! back (`BACKENDS` alone) reaches a copy's packets within `FLOW_CACHE_TICKS`, as the copy
//! expires.

use aya_ebpf::helpers::{bpf_get_smp_processor_id, bpf_jiffies64};
use lb_common::{
    flow::FlowKey,
    maps::{Backend, FLOW_CACHE_SLOTS_PER_CPU, FLOW_CLOSING, Flow},
};

use crate::{
    maps::{FLOW_CACHE, FLOW_CACHE_EPOCH, FLOWS},
    parse::{IpPacket, TCP_FIN, TCP_RST, TCP_SYN},
    types::{CachedFlow, Egress},
};

/// How long, in clock ticks (jiffies), a cached flow is used before `FLOWS` is asked again:
/// 100 ms at the usual 250 Hz (25 ms at 1000 Hz, 250 ms at 100 Hz).
pub const FLOW_CACHE_TICKS: u64 = 25;

/// CPUs whose slots [`forget_everywhere`] clears, at most (the map ends after the last
/// possible CPU, which ends the walk sooner).
const MAX_CPUS: u32 = 256;

/// Where a packet's flow was found: the slot it belongs in, and whether the slot held it.
pub struct Lookup {
    slot: *mut CachedFlow,
    epoch: u64,
    now: u64,
    /// The flow, in the slot (a hit) or in `FLOWS`.
    pub flow: *mut Flow,
    hit: bool,
}

impl Lookup {
    /// The slot, when it held a current copy of the flow.
    #[inline(always)]
    pub fn hit(&self) -> Option<&CachedFlow> {
        // SAFETY: this CPU's own slot of `FLOW_CACHE`.
        self.hit.then(|| unsafe { &*self.slot })
    }

    /// The copy's route to the backend, for the packet's next hop (after a hit or a fill).
    #[inline(always)]
    pub fn egress(&self) -> &'static mut Egress {
        // SAFETY: this CPU's own slot of `FLOW_CACHE`, valid for the program run; the packet
        // is this run's only user of it.
        unsafe { &mut (*self.slot).egress }
    }
}

/// The packet's tracked flow: from this CPU's cache when it holds a current copy, else from
/// `FLOWS`. `None` when the flow is not tracked.
#[inline(always)]
pub fn find(ip: &IpPacket) -> Option<Lookup> {
    // SAFETY: bpf_get_smp_processor_id has no preconditions (the verifier inlines it).
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let slot = FLOW_CACHE.get_ptr_mut(cpu * FLOW_CACHE_SLOTS_PER_CPU + slot_of(&ip.key))?;
    // Read before `FLOWS`: a copy filled from an entry userspace deleted afterwards carries
    // the epoch from before its bump.
    let epoch = FLOW_CACHE_EPOCH.get(0).map_or(0, |epoch| *epoch);
    // SAFETY: bpf_jiffies64 has no preconditions (the verifier inlines it as one load).
    let now = unsafe { bpf_jiffies64() };
    // SAFETY: this CPU's own slot of `FLOW_CACHE`.
    let cached = unsafe { &mut *slot };
    let hit = ip.tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) == 0
        && same_key(&cached.key, &ip.key)
        && cached.epoch == epoch
        && now.wrapping_sub(cached.filled_jiffies) < FLOW_CACHE_TICKS
        && cached.flow.flags & FLOW_CLOSING == 0;
    let flow = if hit {
        &mut cached.flow as *mut Flow
    } else {
        FLOWS.get_ptr_mut(&ip.key)?
    };
    Some(Lookup {
        slot,
        epoch,
        now,
        flow,
        hit,
    })
}

/// After a `FLOWS` entry was followed to `backend` for a service in `mode`: keeps a copy of it
/// (with whatever the packet changed) in the packet's slot.
#[inline(always)]
pub fn fill(lookup: &Lookup, key: &FlowKey, backend: &Backend, mode: u32) {
    // SAFETY: this CPU's own slot; `flow` points into `FLOWS`, whose entries stay valid for
    // the program run.
    unsafe {
        let cached = &mut *lookup.slot;
        cached.key = *key;
        cached.flow = *lookup.flow;
        cached.backend = *backend;
        cached.mode = mode;
        cached.egress = Egress::NONE;
        cached.epoch = lookup.epoch;
        cached.filled_jiffies = lookup.now;
    }
}

/// Clears `key`'s slot on every CPU that holds it: for a flow whose `FLOWS` entry is being
/// replaced or whose NAT port is taken over. (A CPU copying the old entry at this very moment
/// may still fill its slot after the walk; the copy then lasts `FLOW_CACHE_TICKS` at most, and
/// a replaced entry's copy is void anyway: it is closing, or its backend is down.)
// A call of its own: only new flows take it, and its loop stays out of the established path.
#[inline(never)]
pub fn forget_everywhere(key: &FlowKey) {
    let slot = slot_of(key);
    for cpu in 0..MAX_CPUS {
        // The walk ends at the first CPU past the map's end.
        let Some(cached) = FLOW_CACHE.get_ptr_mut(cpu * FLOW_CACHE_SLOTS_PER_CPU + slot) else {
            break;
        };
        // SAFETY: a slot of the map; a torn read of another CPU's slot only risks a needless
        // clear.
        unsafe {
            if same_key(&(*cached).key, key) {
                (*cached).key.family = 0;
            }
        }
    }
}

/// The key's slot among a CPU's: its five words mixed (rotations keep swapped addresses apart),
/// then Fibonacci hashing.
#[inline(always)]
fn slot_of(key: &FlowKey) -> u32 {
    let [a, b, c, d, e] = words(key);
    let mixed = a ^ b.rotate_left(13) ^ c.rotate_left(29) ^ d.rotate_left(41) ^ e.rotate_left(53);
    let folded = mixed ^ (mixed >> 32);
    (folded.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - FLOW_CACHE_SLOTS_PER_CPU.trailing_zeros()))
        as u32
}

#[inline(always)]
pub fn same_key(a: &FlowKey, b: &FlowKey) -> bool {
    let (a, b) = (words(a), words(b));
    (a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3]) | (a[4] ^ b[4]) == 0
}

/// A key as the five words it is (`FlowKey` is 40 bytes, 8-aligned, with no padding bytes
/// left uninitialised: `_pad` is a field).
#[inline(always)]
fn words(key: &FlowKey) -> [u64; 5] {
    // SAFETY: same size, and FlowKey's alignment is 8.
    unsafe { *core::ptr::from_ref(key).cast::<[u64; 5]>() }
}
