//! Node namespaces as direct-server-return (DSR) backends.
//!
//! The load balancer wraps each packet for a DSR service in an outer IP header addressed to the
//! node (IPv4-in-IPv4, IPv6-in-IPv6). The node unwraps it, finds the VIP on its own loopback
//! and answers the client directly, from the VIP.
//!
//! A production node would unwrap with an `ipip` / `ip6tnl` device, but the lab's kernel may be
//! built without them (`CONFIG_NET_IPIP`, `CONFIG_IPV6_TUNNEL`), so the lab unwraps in user
//! space instead: raw sockets for protocols 4 (IPv4-in-IP) and 41 (IPv6-in-IP) receive every
//! encapsulated packet addressed to the node, and the inner packet is written to a TUN device,
//! where the node's kernel receives it as if it had arrived unwrapped. It also records the
//! outer source addresses, so a test can check what the load balancer put on the wire.

use std::{
    collections::BTreeSet,
    fs::{File, OpenOptions},
    io::{self, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    os::unix::fs::OpenOptionsExt,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use super::{Lab, LabError, netns};

/// The TUN device inner packets are delivered through, in each DSR node namespace.
pub const DSR_TUN_IFACE: &str = "dsr0";
/// How often the decapsulating threads look at their stop flag.
const STOP_POLL: Duration = Duration::from_millis(100);
/// IP protocol numbers of the outer header's payload.
const IPPROTO_IPIP: libc::c_int = 4;
const IPPROTO_IPV6_IN_IP: libc::c_int = 41;

/// What the decapsulator of one node has seen; shared with its threads.
#[derive(Debug, Default)]
struct Seen {
    packets: AtomicU64,
    /// Outer source addresses.
    outer_sources: Mutex<BTreeSet<IpAddr>>,
}

/// A node namespace prepared for DSR: the VIPs on its loopback, rp_filter off, the VIPs kept
/// out of its ARP, and a decapsulator running until this is dropped.
#[derive(Debug)]
pub struct DsrNode {
    netns: String,
    stop: Arc<AtomicBool>,
    seen: Arc<Seen>,
    threads: Vec<JoinHandle<()>>,
}

impl DsrNode {
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// Encapsulated packets unwrapped so far (both families).
    pub fn packets(&self) -> u64 {
        self.seen.packets.load(Ordering::Relaxed)
    }

    /// The distinct outer source addresses seen so far.
    pub fn outer_sources(&self) -> BTreeSet<IpAddr> {
        self.seen
            .outer_sources
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

impl Drop for DsrNode {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl Lab {
    /// Makes node `index` a DSR backend for `vips` (see [`DsrNode::prepare`]); its answers
    /// leave by its default route, the LB namespace, which routes them to the client.
    pub fn prepare_dsr_node(&self, index: usize, vips: &[IpAddr]) -> Result<DsrNode, LabError> {
        DsrNode::prepare(&self.node(index).netns, index, vips)
    }
}

impl DsrNode {
    /// Makes the node namespace `netns` (node `index` of its lab) a DSR backend for `vips`:
    /// puts each VIP on its loopback (a /32 or /128), turns rp_filter off (the unwrapped
    /// packets come from the client's address on a device that is not the route back to it),
    /// keeps the VIP out of its ARP (`arp_ignore` 1, `arp_announce` 2), and starts unwrapping IPv4-in-IPv4 and IPv6-in-IPv6 packets into the TUN device
    /// [`DSR_TUN_IFACE`]. The node answers from the VIP by its own routes.
    ///
    /// Unwrapping stops when the returned [`DsrNode`] is dropped.
    pub(crate) fn prepare(netns: &str, index: usize, vips: &[IpAddr]) -> Result<DsrNode, LabError> {
        let netns = netns.to_owned();
        let (tun, raw_v4, raw_v6) = netns::in_netns(&netns, || {
            Ok::<_, LabError>((
                open_tun(DSR_TUN_IFACE)?,
                raw_socket(libc::AF_INET, IPPROTO_IPIP)?,
                raw_socket(libc::AF_INET6, IPPROTO_IPV6_IN_IP)?,
            ))
        })??;
        netns::run_ip(&["-n", &netns, "link", "set", DSR_TUN_IFACE, "up"])?;
        for vip in vips {
            let prefix = match vip {
                IpAddr::V4(vip) => format!("{vip}/32"),
                IpAddr::V6(vip) => format!("{vip}/128"),
            };
            let mut args = vec!["-n", &netns, "addr", "add", &prefix, "dev", "lo"];
            if vip.is_ipv6() {
                args.push("nodad");
            }
            netns::run_ip(&args)?;
        }
        let tun_rp_filter = format!("ipv4/conf/{DSR_TUN_IFACE}/rp_filter");
        netns::write_sysctls(
            &netns,
            &[
                // The effective value is the larger of `all` and the device's: both 0.
                ("ipv4/conf/all/rp_filter", "0"),
                ("ipv4/conf/default/rp_filter", "0"),
                (&tun_rp_filter, "0"),
                // LVS direct routing's real-server ARP settings (the larger of `all` and the
                // device's counts): the node never answers ARP for a VIP, nor names one as
                // its address in its own requests. A router that holds the VIP itself, as the
                // HA lab's LBs do, ignores requests from one of its own addresses, and the
                // node's answers from the VIP would find no next hop.
                ("ipv4/conf/all/arp_ignore", "1"),
                ("ipv4/conf/all/arp_announce", "2"),
            ],
        )?;

        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Seen::default());
        let tun = Arc::new(tun);
        let mut threads = Vec::new();
        for (socket, family) in [(raw_v4, libc::AF_INET), (raw_v6, libc::AF_INET6)] {
            let (stop, seen, tun) = (stop.clone(), seen.clone(), tun.clone());
            let thread = std::thread::Builder::new()
                .name(format!("dsr-decap-node{index}"))
                .spawn(move || decapsulate(&socket, family, &tun, &stop, &seen))
                .map_err(LabError::io("starting a DSR decapsulating thread"))?;
            threads.push(thread);
        }
        Ok(DsrNode {
            netns,
            stop,
            seen,
            threads,
        })
    }
}

/// Creates TUN device `name` (no packet-information prefix) in the calling thread's namespace;
/// it exists as long as the returned file is open.
fn open_tun(name: &str) -> Result<File, LabError> {
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(LabError::io(
            "opening /dev/net/tun (the kernel needs CONFIG_TUN)",
        ))?;
    // SAFETY: an all-zero ifreq is valid; the name is copied below with room for its NUL.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(name.bytes().take(15)) {
        *slot = byte as libc::c_char;
    }
    request.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads an ifreq from a valid pointer.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &request) } != 0 {
        return Err(LabError::io(format!("creating TUN device {name}"))(
            io::Error::last_os_error(),
        ));
    }
    Ok(tun)
}

/// A raw socket receiving every packet of IP protocol `protocol` addressed to this namespace,
/// with a receive timeout so its reader can notice a stop request.
fn raw_socket(family: libc::c_int, protocol: libc::c_int) -> Result<OwnedFd, LabError> {
    // SAFETY: plain socket(2); the descriptor is owned right away.
    let fd = unsafe { libc::socket(family, libc::SOCK_RAW | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(LabError::io(format!(
            "opening a raw socket for IP protocol {protocol}"
        ))(io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: STOP_POLL.as_micros() as libc::suseconds_t,
    };
    // SAFETY: SO_RCVTIMEO takes a timeval of the size passed.
    let result = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const timeout).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if result != 0 {
        return Err(LabError::io("setting a raw socket's receive timeout")(
            io::Error::last_os_error(),
        ));
    }
    Ok(socket)
}

/// Unwraps packets from `socket` into `tun` until `stop` is set.
///
/// An IPv4 raw socket hands over the outer header too; an IPv6 one only its payload, so there
/// the outer source comes from the sender address and the inner packet is all that was read.
fn decapsulate(socket: &OwnedFd, family: libc::c_int, tun: &File, stop: &AtomicBool, seen: &Seen) {
    let mut buffer = vec![0u8; 65_536];
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: an all-zero sockaddr_storage is valid; recvfrom fills at most its size.
        let mut from: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut from_len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: the buffer and address are valid for the lengths passed.
        let read = unsafe {
            libc::recvfrom(
                socket.as_raw_fd(),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                0,
                (&raw mut from).cast(),
                &mut from_len,
            )
        };
        let Ok(read) = usize::try_from(read) else {
            // A timeout (to look at `stop` again) or an interrupted call.
            continue;
        };
        let packet = &buffer[..read];
        let (outer_source, inner) = if family == libc::AF_INET {
            let header_len = usize::from(packet.first().copied().unwrap_or(0) & 0x0f) * 4;
            if header_len < 20 || packet.len() <= header_len {
                continue;
            }
            let src = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
            (IpAddr::V4(src), &packet[header_len..])
        } else {
            // SAFETY: an AF_INET6 raw socket fills a sockaddr_in6.
            let from = unsafe { *(&raw const from).cast::<libc::sockaddr_in6>() };
            (IpAddr::V6(Ipv6Addr::from(from.sin6_addr.s6_addr)), packet)
        };
        seen.packets.fetch_add(1, Ordering::Relaxed);
        seen.outer_sources
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(outer_source);
        // A failed write loses one packet, which TCP retransmits.
        let _ = (&*tun).write(inner);
    }
}
