//! Who may open a connection to the gateway: at most `max_connections` in all (every serving
//! thread's together) and at most `max_connections_per_ip` per client, where a client is an
//! IPv4 address or an IPv6 prefix ([`client_group`]). A refused connection is closed at once,
//! before its TLS handshake costs anything.
//!
//! A connection's place is held by its [`Admitted`] for the connection's life (a WebSocket
//! session keeps it after the HTTP exchange that opened it).
//!
//! At start, [`raise_open_files_limit`] makes room for `max_connections` under the process's
//! limit of open files, and [`descriptor_above_connections`] places the listening sockets at
//! the top of that room.

use std::{
    io,
    net::IpAddr,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use ipnet::{IpNet, Ipv6Net};
use tokio::time::Instant;

use super::{
    metrics::GatewayMetrics,
    slots::{Slot, Slots},
};

/// A full gateway is logged at most this often, with the count of connections refused since.
const FULL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Open files the daemon holds besides client and node connections: listeners, the store, BPF
/// maps and links, the health checker's and the chain follower's connections.
const OTHER_OPEN_FILES: u64 = 1024;

/// Descriptors kept free at the top of the open files budget for the listening sockets.
const LISTENER_DESCRIPTORS: u64 = 64;

/// What `max_connections` may need in open files: a descriptor per client connection, one per
/// node connection of WebSocket clients that have their own, and the daemon's others.
fn open_files_budget(max_connections: u32) -> u64 {
    2 * u64::from(max_connections) + OTHER_OPEN_FILES
}

fn open_files_limit() -> io::Result<libc::rlimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid rlimit for getrlimit to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(limit)
}

/// A new descriptor of `socket`, numbered above those the gateway's connections take: at the
/// top of the open files budget of `max_connections` (within the process's limit).
///
/// A process that dies (SIGKILL, a panic, the OOM killer) has its sockets released from the
/// highest descriptor down: the last `fput` of each is work the kernel defers and runs last
/// in, first out. With every descriptor of the listening sockets above the connections', the
/// listeners are gone before the connections are reset, so a client that reconnects at once
/// finds no listener here, and the standing second chance sends its SYN to the other host of
/// the pair; below them, the SYN landed in the dying accept queue, which reset it a
/// millisecond later. (Kernels that ran deferred work first in, first out, before 5.x, release
/// in the other order: there this placement changes nothing for the better.)
pub fn descriptor_above_connections(
    socket: &impl AsFd,
    max_connections: u32,
) -> io::Result<OwnedFd> {
    let limit = open_files_limit()?;
    let floor = open_files_budget(max_connections)
        .min(limit.rlim_cur)
        .saturating_sub(LISTENER_DESCRIPTORS);
    let floor = libc::c_int::try_from(floor).unwrap_or(libc::c_int::MAX);
    // SAFETY: fcntl on a descriptor `socket` holds open; a failure is an error, not undefined
    // behaviour.
    let fd = unsafe { libc::fcntl(socket.as_fd().as_raw_fd(), libc::F_DUPFD_CLOEXEC, floor) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fcntl just made `fd`, and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Raises the soft limit of open files, within the hard limit, to what `max_connections` need
/// (a descriptor per client connection, and one per node connection of WebSocket clients that
/// have their own), as Go programs raise theirs at start: a shell's or systemd's default soft
/// limit (1024) would otherwise stop the gateway at `accept` long before its cap. Warns, with
/// the fix, when the hard limit is lower.
pub fn raise_open_files_limit(max_connections: u32) {
    let wanted = open_files_budget(max_connections);
    let limit = match open_files_limit() {
        Ok(limit) => limit,
        Err(error) => {
            tracing::warn!("gateway: reading the open files limit: {error}");
            return;
        }
    };
    if limit.rlim_cur >= wanted {
        return;
    }
    let raised = libc::rlimit {
        rlim_cur: wanted.min(limit.rlim_max),
        rlim_max: limit.rlim_max,
    };
    // SAFETY: `raised` is a valid rlimit within the hard limit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        tracing::warn!(
            "gateway: raising the open files limit to {}: {}",
            raised.rlim_cur,
            std::io::Error::last_os_error()
        );
        return;
    }
    if raised.rlim_cur < wanted {
        tracing::warn!(
            "gateway: gateway.max_connections = {max_connections} needs up to {wanted} open \
             files and the process may open {}: connections beyond that fail at accept; raise \
             the hard limit (systemd: LimitNOFILE=; a shell: ulimit -Hn) or lower \
             gateway.max_connections",
            raised.rlim_cur
        );
    }
}

/// What one client is, for its connection limit and for the auth-failure blocker: its IPv4
/// address (IPv4-mapped IPv6 counts as IPv4), or the IPv6 prefix of `ipv6_prefix_len` bits its
/// address is in (a host given a /64 has 2^64 addresses to connect from).
pub fn client_group(address: IpAddr, ipv6_prefix_len: u8) -> IpNet {
    let address = address.to_canonical();
    match address {
        IpAddr::V4(_) => IpNet::from(address),
        // The config allows only valid lengths; the address alone otherwise.
        IpAddr::V6(v6) => Ipv6Net::new(v6, ipv6_prefix_len)
            .map_or(IpNet::from(address), |prefix| IpNet::V6(prefix.trunc())),
    }
}

#[derive(Debug, Clone, Copy)]
pub struct AdmissionLimits {
    pub max_connections: u32,
    pub max_connections_per_ip: u32,
    pub ipv6_prefix_len: u8,
}

/// Why a connection was closed at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("the gateway has gateway.max_connections open")]
    GatewayFull,
    #[error("client {0} has gateway.max_connections_per_ip open")]
    ClientFull(IpNet),
}

impl Refused {
    /// The `reason` label of `lb_gateway_rejected_total`.
    pub fn reason(self) -> &'static str {
        match self {
            Refused::GatewayFull => "total_connection_limit",
            Refused::ClientFull(_) => "connection_limit",
        }
    }
}

/// The open connections of the gateway, in all and per client.
pub struct Admission {
    limits: AdmissionLimits,
    open: AtomicU32,
    per_client: Arc<Slots<IpNet>>,
    metrics: Arc<GatewayMetrics>,
    full_log: ThrottledCount,
}

impl Admission {
    pub fn new(limits: AdmissionLimits, metrics: Arc<GatewayMetrics>) -> Admission {
        Admission {
            limits,
            open: AtomicU32::new(0),
            per_client: Arc::default(),
            metrics,
            full_log: ThrottledCount::new(FULL_LOG_INTERVAL),
        }
    }

    /// The connections open now, in all.
    pub fn open(&self) -> u32 {
        self.open.load(Ordering::Acquire)
    }

    /// A place for a connection from `peer`, or why there is none (counted under
    /// `lb_gateway_rejected_total`; a full gateway also logged, at most every
    /// [`FULL_LOG_INTERVAL`]).
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<Admitted, Refused> {
        let admitted = self.try_admit(peer);
        if let Err(refused) = admitted {
            self.metrics.rejected(refused.reason());
            if refused == Refused::GatewayFull
                && let Some(refused) = self.full_log.count()
            {
                tracing::warn!(
                    "gateway: {refused} connections closed at once in the last {:?}: \
                     gateway.max_connections ({}) are open; raise it if memory and file \
                     descriptors allow, or add gateways",
                    FULL_LOG_INTERVAL,
                    self.limits.max_connections
                );
            }
        }
        admitted
    }

    fn try_admit(self: &Arc<Self>, peer: IpAddr) -> Result<Admitted, Refused> {
        let max = self.limits.max_connections;
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < max).then_some(open + 1)
            })
            .map_err(|_| Refused::GatewayFull)?;
        // Taken: a refusal below gives it back as `total` drops.
        let total = TotalPlace {
            admission: self.clone(),
        };
        let group = client_group(peer, self.limits.ipv6_prefix_len);
        let client = self
            .per_client
            .claim(group, self.limits.max_connections_per_ip)
            .ok_or(Refused::ClientFull(group))?;
        self.metrics.connections.inc();
        Ok(Admitted {
            total,
            _client: client,
        })
    }
}

/// One connection's place in all.
struct TotalPlace {
    admission: Arc<Admission>,
}

impl Drop for TotalPlace {
    fn drop(&mut self) {
        self.admission.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One connection's places, in all and under its client's limit; given back when dropped.
pub struct Admitted {
    total: TotalPlace,
    _client: Slot<IpNet>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.total.admission.metrics.connections.dec();
    }
}

/// Counts events and says, at most once per interval, how many came since it last said.
struct ThrottledCount {
    start: Instant,
    /// Milliseconds after `start` before which nothing is said.
    quiet_until_ms: AtomicU64,
    count: AtomicU64,
    interval: Duration,
}

impl ThrottledCount {
    fn new(interval: Duration) -> ThrottledCount {
        ThrottledCount {
            start: Instant::now(),
            quiet_until_ms: AtomicU64::new(0),
            count: AtomicU64::new(0),
            interval,
        }
    }

    /// Counts one event; the events since the last time it said so, when it is time to say.
    fn count(&self) -> Option<u64> {
        self.count.fetch_add(1, Ordering::Relaxed);
        let now = self.start.elapsed().as_millis() as u64;
        let quiet_until = self.quiet_until_ms.load(Ordering::Relaxed);
        let next = now + self.interval.as_millis() as u64;
        // One thread wins the turn; the others keep counting.
        (now >= quiet_until
            && self
                .quiet_until_ms
                .compare_exchange(quiet_until, next, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok())
        .then(|| self.count.swap(0, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::registry::Registry;

    use super::*;

    fn group(address: &str, prefix_len: u8) -> String {
        client_group(address.parse().unwrap(), prefix_len).to_string()
    }

    #[test]
    fn ipv6_clients_are_grouped_by_prefix_and_ipv4_by_address() {
        assert_eq!(group("2001:db8:1:2:aaaa::1", 64), "2001:db8:1:2::/64");
        assert_eq!(group("2001:db8:1:2:bbbb::9", 64), "2001:db8:1:2::/64");
        assert_eq!(group("2001:db8:1:3::1", 64), "2001:db8:1:3::/64");
        assert_eq!(group("2001:db8:1:3::1", 48), "2001:db8:1::/48");
        assert_eq!(group("2001:db8:1:3::1", 128), "2001:db8:1:3::1/128");
        assert_eq!(group("192.0.2.7", 64), "192.0.2.7/32");
        assert_eq!(group("::ffff:192.0.2.7", 64), "192.0.2.7/32", "IPv4-mapped");
        assert_eq!(group("::1", 64), "::/64");
    }

    fn admission(max_connections: u32, max_connections_per_ip: u32) -> Arc<Admission> {
        let metrics = GatewayMetrics::register(&mut Registry::default());
        Arc::new(Admission::new(
            AdmissionLimits {
                max_connections,
                max_connections_per_ip,
                ipv6_prefix_len: 64,
            },
            Arc::new(metrics),
        ))
    }

    #[test]
    fn one_ipv6_prefix_is_one_client_under_the_per_client_limit() {
        let admission = admission(100, 2);
        let address = |text: &str| text.parse::<IpAddr>().unwrap();
        let _first = admission.admit(address("2001:db8:0:1::1")).expect("room");
        let _second = admission.admit(address("2001:db8:0:1::2")).expect("room");
        assert_eq!(
            admission.admit(address("2001:db8:0:1::3")).err(),
            Some(Refused::ClientFull("2001:db8:0:1::/64".parse().unwrap())),
            "a third address of the same /64"
        );
        assert!(
            admission.admit(address("2001:db8:0:2::1")).is_ok(),
            "another /64 is another client"
        );
    }

    #[test]
    fn the_total_limit_counts_every_client_and_places_are_given_back() {
        let admission = admission(2, 10);
        let address = |last: u8| IpAddr::from([192, 0, 2, last]);
        let first = admission.admit(address(1)).expect("room");
        let _second = admission.admit(address(2)).expect("room");
        assert_eq!(
            admission.admit(address(3)).err(),
            Some(Refused::GatewayFull)
        );
        assert_eq!(admission.metrics.connections.get(), 2);
        drop(first);
        assert_eq!(admission.metrics.connections.get(), 1);
        let _third = admission.admit(address(3)).expect("a place was given back");
        // A client refused for its own limit gives back its place in all.
        let admission = self::admission(2, 1);
        let _only = admission.admit(address(1)).expect("room");
        assert!(admission.admit(address(1)).is_err());
        assert!(
            admission.admit(address(2)).is_ok(),
            "the total is not taken"
        );
    }

    #[test]
    fn throttled_count_says_the_count_once_per_interval() {
        let throttled = ThrottledCount::new(Duration::from_secs(3600));
        assert_eq!(throttled.count(), Some(1), "the first is said at once");
        assert_eq!(throttled.count(), None);
        assert_eq!(throttled.count(), None);
        let throttled = ThrottledCount::new(Duration::ZERO);
        assert_eq!(throttled.count(), Some(1));
        assert_eq!(throttled.count(), Some(1));
    }
}
