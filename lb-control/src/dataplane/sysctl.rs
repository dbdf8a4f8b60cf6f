//! Kernel settings the data plane depends on.

use std::ops::RangeInclusive;

use super::DataplaneError;

const RESERVED_PORTS: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// Keeps the kernel from picking NAT ports as source ports of its own connections (health
/// checks, the gateway's upstream calls), which could collide with a NAT flow's 4-tuple. The
/// setting is per network namespace and covers IPv6 too; existing reservations are kept.
pub fn reserve_local_ports(ports: &RangeInclusive<u16>) -> Result<(), DataplaneError> {
    let error = |source| DataplaneError::ReservePorts {
        path: RESERVED_PORTS,
        source,
    };
    let current = std::fs::read_to_string(RESERVED_PORTS).map_err(error)?;
    let range = format!("{}-{}", ports.start(), ports.end());
    let current = current.trim();
    if current.split(',').any(|part| part == range) {
        return Ok(());
    }
    let wanted = if current.is_empty() {
        range
    } else {
        format!("{current},{range}")
    };
    std::fs::write(RESERVED_PORTS, wanted).map_err(error)
}
