//! The addresses this host (its network namespace) holds now: which floating addresses
//! keepalived has put here, and which interface is the private link; and the socket options
//! that let a socket use a floating address this host does not hold (yet, or any more).

use std::{
    collections::BTreeSet,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

/// Every address configured on an interface of this network namespace (`getifaddrs(3)`).
pub fn local_addresses() -> io::Result<BTreeSet<IpAddr>> {
    Ok(interface_addresses()?
        .into_iter()
        .map(|(_, address)| address)
        .collect())
}

/// The interface `address` is configured on, if any.
pub fn interface_of(address: IpAddr) -> io::Result<Option<String>> {
    Ok(interface_addresses()?
        .into_iter()
        .find_map(|(interface, held)| (held == address).then_some(interface)))
}

/// Every (interface, address) pair of this network namespace.
fn interface_addresses() -> io::Result<Vec<(String, IpAddr)>> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a linked list we free below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut addresses = Vec::new();
    let mut entry = list;
    while !entry.is_null() {
        // SAFETY: `entry` is a node of the list getifaddrs returned, not yet freed.
        let (name, address, next) =
            unsafe { ((*entry).ifa_name, (*entry).ifa_addr, (*entry).ifa_next) };
        // SAFETY: a non-null `ifa_addr` points to a sockaddr of the family it names.
        if let Some(address) = unsafe { address.as_ref() }.and_then(|_| unsafe { ip_of(address) }) {
            // SAFETY: `ifa_name` is a NUL-terminated string of the same node.
            let name = unsafe { std::ffi::CStr::from_ptr(name) };
            addresses.push((name.to_string_lossy().into_owned(), address));
        }
        entry = next;
    }
    // SAFETY: `list` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(list) };
    Ok(addresses)
}

/// The IP address in a `sockaddr` of family AF_INET or AF_INET6.
///
/// # Safety
/// `address` points to a valid sockaddr, as long as its family says.
unsafe fn ip_of(address: *const libc::sockaddr) -> Option<IpAddr> {
    // SAFETY: the caller's promise; the casts follow the family.
    unsafe {
        match i32::from((*address).sa_family) {
            libc::AF_INET => {
                let v4 = &*address.cast::<libc::sockaddr_in>();
                Some(Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr)).into())
            }
            libc::AF_INET6 => {
                let v6 = &*address.cast::<libc::sockaddr_in6>();
                Some(Ipv6Addr::from(v6.sin6_addr.s6_addr).into())
            }
            _ => None,
        }
    }
}

/// Turns on the `SOL_IP` option `option` (`IP_FREEBIND`, `IP_TRANSPARENT`); at `SOL_IP` they
/// cover IPv6 sockets too. The connections a listener accepts inherit them.
pub fn set_ip_option(
    socket: &impl std::os::fd::AsRawFd,
    option: libc::c_int,
) -> std::io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: a valid socket and an int option of the size given.
    let result = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_IP,
            option,
            (&raw const on).cast(),
            std::mem::size_of_val(&on) as libc::socklen_t,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_held_on_lo() {
        let addresses = local_addresses().expect("getifaddrs");
        assert!(
            addresses.contains(&IpAddr::from(Ipv4Addr::LOCALHOST)),
            "{addresses:?}"
        );
        assert_eq!(
            interface_of(Ipv4Addr::LOCALHOST.into()).expect("getifaddrs"),
            Some("lo".to_owned())
        );
        assert_eq!(
            interface_of(Ipv4Addr::new(192, 0, 2, 77).into()).expect("getifaddrs"),
            None
        );
    }
}
