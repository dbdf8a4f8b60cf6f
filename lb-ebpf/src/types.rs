//! The types the pipeline's steps pass each other, and the values of the maps only the program
//! uses (`lb-common` holds the ones userspace shares). They depend on no step and no map, so
//! the maps (`maps`) and every step can depend on them without a cycle; each type's behaviour
//! stays with the step it belongs to (`impl` blocks in `flow`, `forward`, `flow_cache`).

use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibLookup, bpf_sock_tuple, xdp_action},
    maps::lpm_trie::Key,
};
use lb_common::{
    flow::FlowKey,
    maps::{Backend, BlockV4, BlockV6, DropReason, Flow, NatKey, ServiceKey, VipKey},
};

use crate::parse::{IPV4_HEADER_LEN, IPV6_HEADER_LEN, IpPacket};

/// The service id of a drop that belongs to no service. (An `Option` would leave its payload
/// uninitialised when `None`, and the verifier rejects copying uninitialised registers.)
pub const NO_SERVICE: u32 = u32::MAX;

/// What to do with a packet: an XDP action, or a drop counted under its reason and service
/// (`NO_SERVICE` for none).
pub enum Verdict {
    Action(u32),
    Drop(DropReason, u32),
}

impl Verdict {
    #[inline(always)]
    pub fn pass() -> Verdict {
        Verdict::Action(xdp_action::XDP_PASS)
    }
}

/// The backend a packet goes to (see `flow`).
///
/// Non-inlined functions fill one in through `&mut` rather than return it in an `Option` or
/// `Result`: the compiler would put the enum's tag inside the struct's padding, and the kernel
/// rejects BTF that describes such a layout.
#[derive(Default)]
#[repr(C, align(8))]
pub struct Selected {
    pub service_id: u32,
    pub backend_id: u32,
    pub backend: Backend,
    /// NAT mode: the LB's source port towards the backend (network byte order).
    pub nat_port_be: u16,
    /// The flow hash: DSR derives its outer source address from it.
    pub hash: u32,
    pub is_new: bool,
}

/// Where a rewritten packet goes: its outermost IP header's fields that the FIB lookup needs
/// (see `forward`).
#[repr(C, align(8))]
pub struct NextHop {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// The backend id whose route is cached in `ROUTES`, or `CLIENT` (replies to clients,
    /// cached in `CLIENT_ROUTES`).
    pub cache_slot: u32,
    pub ip_len: u16,
    pub family: u8,
    pub proto: u8,
}

/// `NextHop::cache_slot` of a reply to a client: its route is cached in `CLIENT_ROUTES`.
pub const CLIENT: u32 = u32::MAX;

/// A route as the FIB last gave it, per CPU (so no CPU ever reads a half-written entry): the
/// value of `ROUTES` and `CLIENT_ROUTES`, read and written by `forward` alone.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
pub struct CachedRoute {
    /// The destination the entry is for: a backend id reused for another address, or another
    /// client in the same slot, misses.
    pub dst: [u8; 16],
    /// The source the FIB was asked for (routes may depend on it): a client's entry is used
    /// for replies from the same VIP only.
    pub src: [u8; 16],
    pub refreshed_jiffies: u64,
    pub egress: Egress,
}

/// How a frame leaves towards its next hop: the device and the Ethernet addresses.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct Egress {
    /// Destination then source MAC, as they go into the Ethernet header.
    pub macs: [u8; 12],
    /// 0 in a flow-cache copy that holds no route.
    pub ifindex: u32,
}

impl Egress {
    pub const NONE: Egress = Egress {
        macs: [0; 12],
        ifindex: 0,
    };
}

/// The route to the backend in the packet's flow-cache copy (see `flow_cache`), when the packet
/// has one: used when it holds a route, given one when it does not.
pub type CopiedEgress = Option<&'static mut Egress>;

/// The FIB lookup's parameter block.
pub type FibParams = FibLookup;

/// A flow as `FLOWS` held it when its `FLOW_CACHE` slot was filled: written by `flow_cache`
/// alone; the established-flow path reads `backend` and `mode` of a hit.
#[repr(C, align(8))]
pub struct CachedFlow {
    /// An empty or forgotten slot has family 0, which no packet's key has.
    pub key: FlowKey,
    pub flow: Flow,
    /// The flow's backend and its service's mode (see `flow_cache`'s notes).
    pub backend: Backend,
    pub mode: u32,
    pub egress: Egress,
    /// `FLOW_CACHE_EPOCH` as read before `FLOWS` was.
    pub epoch: u64,
    pub filled_jiffies: u64,
}

// Two cache lines (`FLOW_CACHE`'s values start on a page boundary).
const _: () = assert!(core::mem::size_of::<CachedFlow>() == 128);

/// The per-CPU scratch area (see `SCRATCH`).
#[repr(C, align(8))]
pub struct Scratch {
    pub ip: IpPacket,
    /// The blocklist version read for this packet (a new flow records it).
    pub blocklist_version: u32,
    pub selected: Selected,
    /// A new flow's entry while it is built.
    pub flow: Flow,
    /// The flow whose NAT port a new flow took over (family 0: none).
    pub taken_over: FlowKey,
    pub hop: NextHop,
    pub route: CachedRoute,
    pub fib: FibParams,
    pub service_key: ServiceKey,
    pub vip_key: VipKey,
    pub nat_key: NatKey,
    pub block_v4: Key<BlockV4>,
    pub block_v6: Key<BlockV6>,
    /// DSR's outer headers while they are built.
    pub outer_v4: [u8; IPV4_HEADER_LEN],
    pub outer_v6: [u8; IPV6_HEADER_LEN],
    /// The socket lookup's key (second chance).
    pub sock_tuple: bpf_sock_tuple,
}
