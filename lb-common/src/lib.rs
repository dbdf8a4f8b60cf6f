//! Types and constants shared by the XDP program (`lb-ebpf`) and userspace (`lb-control`).
//!
//! Everything that crosses the kernel/user boundary is defined here once, so the two sides
//! cannot disagree on a layout. Types are `#[repr(C)]` with fixed-width fields and no implicit
//! padding; each has a compile-time size assertion.
#![cfg_attr(not(feature = "std"), no_std)]

pub mod flow;
#[cfg(feature = "std")]
pub mod maglev;
pub mod maps;
pub mod stats;

/// Names of the maps the XDP program defines; userspace opens and pins them by these names.
pub mod map_names {
    pub const PROTO_STATS: &str = "PROTO_STATS";
    pub const CONFIG: &str = "CONFIG";
    pub const SERVICES: &str = "SERVICES";
    pub const SERVICES_BY_ID: &str = "SERVICES_BY_ID";
    pub const VIPS: &str = "VIPS";
    pub const BACKENDS: &str = "BACKENDS";
    pub const MAGLEV: &str = "MAGLEV";
    pub const FLOWS: &str = "FLOWS";
    pub const FLOW_CACHE: &str = "FLOW_CACHE";
    pub const FLOW_CACHE_EPOCH: &str = "FLOW_CACHE_EPOCH";
    pub const NAT_REVERSE: &str = "NAT_REVERSE";
    pub const SERVICE_STATS: &str = "SERVICE_STATS";
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    pub const DROP_STATS: &str = "DROP_STATS";
    pub const BLOCKLIST_V4: &str = "BLOCKLIST_V4";
    pub const BLOCKLIST_V6: &str = "BLOCKLIST_V6";
    /// The blocklist's version, its one entry: 0 while the blocklist is empty, otherwise a value
    /// that changes with every change of it (userspace writes it after changing the tries). The
    /// program skips the tries while it is 0, and for a tracked flow whose source was found
    /// unblocked under the current version.
    pub const BLOCKLIST_VERSION: &str = "BLOCKLIST_VERSION";
    /// The second chance of a planned handover, one entry (see `maps::SecondChance`).
    pub const SECOND_CHANCE: &str = "SECOND_CHANCE";
    /// Packets the handover's second chance sent to the previous owner, one per-CPU counter.
    pub const SECOND_CHANCE_PACKETS: &str = "SECOND_CHANCE_PACKETS";
    /// The standing second chance of a pair member, one entry (see `maps::SecondChance`).
    pub const STANDING_SECOND_CHANCE: &str = "STANDING_SECOND_CHANCE";
    /// Packets the standing second chance sent to the other host, one per-CPU counter.
    pub const STANDING_SECOND_CHANCE_PACKETS: &str = "STANDING_SECOND_CHANCE_PACKETS";
}

/// Names of the XDP programs.
pub mod program_names {
    /// The load balancer's entry point, in the `lb-ebpf` object.
    pub const LB: &str = "lb_xdp";
    /// A bare XDP_PASS, alone in the `xdp-pass` object: the lab attaches it to veth peers so
    /// that `XDP_TX` and redirects into those veths deliver in native mode.
    pub const PASS: &str = "xdp_pass";
    /// The load balancer's header parser then XDP_PASS, alone in the `xdp-parse-pass` object:
    /// the XDP benchmark's reference.
    pub const PARSE_PASS: &str = "xdp_parse_pass";
}
