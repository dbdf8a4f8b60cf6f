//! Per-protocol traffic counters, kept by the XDP program in a per-CPU array.
//!
//! The array is indexed by [`ProtoSlot`]; userspace sums each slot over all CPUs.

/// Packets and bytes seen for one slot on one CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub packets: u64,
    /// Frame bytes as the XDP program sees them, from the Ethernet header to the end of the
    /// frame (a veth's `rx_bytes` counts the same frames less their 14-byte Ethernet header).
    pub bytes: u64,
}

const _: () = assert!(core::mem::size_of::<Counters>() == 16);

#[cfg(feature = "user")]
// SAFETY: `Counters` is `repr(C)`, made only of `u64`s, and has no padding.
unsafe impl aya::Pod for Counters {}

impl Counters {
    pub fn add(&mut self, other: &Counters) {
        self.packets += other.packets;
        self.bytes += other.bytes;
    }
}

/// Index of a slot in the per-protocol stats array.
///
/// A frame is counted in exactly one slot: the most specific protocol the parser recognised.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProtoSlot {
    /// Ethernet frames that carry neither IPv4 nor IPv6 (ARP, LLDP, …).
    NonIp = 0,
    Ipv4Tcp = 1,
    Ipv4Udp = 2,
    /// IPv4 with another transport (ICMP, …) or a non-first fragment.
    Ipv4Other = 3,
    Ipv6Tcp = 4,
    Ipv6Udp = 5,
    /// IPv6 with another next header (ICMPv6, extension headers, …).
    Ipv6Other = 6,
    /// Frames too short for the headers they announce, or with bogus lengths.
    Malformed = 7,
}

impl ProtoSlot {
    /// Number of slots; the size of the stats array.
    pub const COUNT: u32 = 8;

    pub const ALL: [ProtoSlot; Self::COUNT as usize] = [
        ProtoSlot::NonIp,
        ProtoSlot::Ipv4Tcp,
        ProtoSlot::Ipv4Udp,
        ProtoSlot::Ipv4Other,
        ProtoSlot::Ipv6Tcp,
        ProtoSlot::Ipv6Udp,
        ProtoSlot::Ipv6Other,
        ProtoSlot::Malformed,
    ];

    /// Stable name used in metrics and tables.
    pub const fn name(self) -> &'static str {
        match self {
            ProtoSlot::NonIp => "non_ip",
            ProtoSlot::Ipv4Tcp => "ipv4_tcp",
            ProtoSlot::Ipv4Udp => "ipv4_udp",
            ProtoSlot::Ipv4Other => "ipv4_other",
            ProtoSlot::Ipv6Tcp => "ipv6_tcp",
            ProtoSlot::Ipv6Udp => "ipv6_udp",
            ProtoSlot::Ipv6Other => "ipv6_other",
            ProtoSlot::Malformed => "malformed",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_dense_and_in_order() {
        for (i, slot) in ProtoSlot::ALL.iter().enumerate() {
            assert_eq!(*slot as u32, i as u32, "{} is out of place", slot.name());
        }
    }

    #[test]
    fn counters_add_sums_both_fields() {
        let mut total = Counters {
            packets: 1,
            bytes: 60,
        };
        total.add(&Counters {
            packets: 2,
            bytes: 1500,
        });
        assert_eq!(
            total,
            Counters {
                packets: 3,
                bytes: 1560
            }
        );
    }
}
