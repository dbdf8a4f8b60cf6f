//! The lab's hosts and links: who gets which namespace, interface and address, and the `ip`,
//! `ethtool` and sysctl steps that build them.
//!
//! ```text
//!  <prefix>-client          <prefix>-lb                 <prefix>-node<i>
//!  eth0 10.200.1.2 ─── client0 10.200.1.1
//!                          node<i> 10.200.(10+i).1 ─── eth0 10.200.(10+i).2
//! ```
//! IPv6 mirrors it: `fd00:200:1::/64` and `fd00:200:<10+i>::/64`, where `<10+i>` is written
//! with the same digits as the IPv4 octet (node 0 is `fd00:200:10::2`), so the two read alike.

use std::{
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
};

use lb_control::dataplane::PassProgram;

use super::{
    LabError,
    netns::{self, command_in_netns, run_checked, run_ip},
};

/// The interface every client and node namespace uses towards the LB.
const HOST_IFACE: &str = "eth0";
/// The LB's interface towards the client namespace.
const LB_CLIENT_IFACE: &str = "client0";
/// Third octet of the client link; node links start at [`FIRST_NODE_SUBNET`].
const CLIENT_SUBNET: u8 = 1;
const FIRST_NODE_SUBNET: u8 = 10;
/// Node links use third octets `FIRST_NODE_SUBNET..=255`.
pub const MAX_NODES: usize = (u8::MAX - FIRST_NODE_SUBNET) as usize + 1;
/// Extra client addresses (many clients from several sources) take the host part from here
/// up in the client's /24, clear of the client (.2) and the LB (.1).
const FIRST_EXTRA_CLIENT_HOST: u8 = 10;
/// How many extra client addresses the client's /24 has room for.
pub const MAX_EXTRA_CLIENT_ADDRESSES: usize = (u8::MAX - FIRST_EXTRA_CLIENT_HOST) as usize;

/// A client or node namespace and its link to the LB.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    /// Name of the network namespace (`ip netns exec <netns> …`).
    pub netns: String,
    /// Its interface towards the LB.
    pub iface: String,
    pub addr_v4: Ipv4Addr,
    pub addr_v6: Ipv6Addr,
    /// The LB's end of the link (in the LB namespace), e.g. `client0` or `node2`.
    pub gateway_iface_in_lb: String,
    /// The LB's addresses on this link: the host's default gateways.
    pub gateway_v4: Ipv4Addr,
    pub gateway_v6: Ipv6Addr,
}

/// The LB namespace: one interface towards the client, one per node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LbHost {
    pub netns: String,
    /// Where client traffic arrives (and where lb-control attaches): `client0`.
    pub client_iface: String,
    /// The LB's client-facing addresses.
    pub addr_v4: Ipv4Addr,
    pub addr_v6: Ipv6Addr,
    /// The LB's interface towards node `i` is `node_ifaces[i]`.
    pub node_ifaces: Vec<String>,
}

/// Every name and address of one lab run, decided before anything is created.
#[derive(Debug, Clone)]
pub(crate) struct Topology {
    pub client: Host,
    pub lb: LbHost,
    pub nodes: Vec<Host>,
}

impl Topology {
    pub fn plan(prefix: &str, nodes: usize) -> Result<Topology, LabError> {
        if nodes == 0 || nodes > MAX_NODES {
            return Err(LabError::Config(format!(
                "nodes = {nodes}: the lab holds 1 to {MAX_NODES} nodes (one /24 of 10.200.0.0/16 each)"
            )));
        }
        let lb_netns = format!("{prefix}-lb");
        let client = host(
            format!("{prefix}-client"),
            LB_CLIENT_IFACE.to_owned(),
            CLIENT_SUBNET,
        );
        let nodes: Vec<Host> = (0..nodes)
            .map(|index| {
                let subnet = FIRST_NODE_SUBNET + index as u8;
                host(
                    format!("{prefix}-node{index}"),
                    format!("node{index}"),
                    subnet,
                )
            })
            .collect();
        let lb = LbHost {
            netns: lb_netns,
            client_iface: client.gateway_iface_in_lb.clone(),
            addr_v4: client.gateway_v4,
            addr_v6: client.gateway_v6,
            node_ifaces: nodes
                .iter()
                .map(|node| node.gateway_iface_in_lb.clone())
                .collect(),
        };
        Ok(Topology { client, lb, nodes })
    }

    /// Every namespace of the lab, LB first.
    pub fn namespaces(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.lb.netns.as_str())
            .chain(std::iter::once(self.client.netns.as_str()))
            .chain(self.nodes.iter().map(|node| node.netns.as_str()))
    }

    /// Creates the namespaces, links, addresses and routes. Each namespace is recorded in
    /// `created` as soon as it exists, so the caller's guard removes it whatever fails later.
    pub fn build(&self, created: &mut Vec<String>) -> Result<(), LabError> {
        for netns in self.namespaces() {
            netns::add_netns(netns)?;
            created.push(netns.to_owned());
            run_ip(&["-n", netns, "link", "set", "lo", "up"])?;
        }
        enable_forwarding(&self.lb.netns)?;
        for host in std::iter::once(&self.client).chain(&self.nodes) {
            self.connect(host)?;
        }
        Ok(())
    }

    /// Adds `count` more IPv4 addresses to the client's interface, in its /24 (so the LB
    /// reaches them on-link, with no route to add): clients bound to them come from several
    /// sources, as a crowd does. Returns them in order.
    pub fn add_client_addresses(&self, count: usize) -> Result<Vec<Ipv4Addr>, LabError> {
        if count > MAX_EXTRA_CLIENT_ADDRESSES {
            return Err(LabError::Config(format!(
                "{count} extra client addresses: the client's /24 holds at most \
                 {MAX_EXTRA_CLIENT_ADDRESSES}"
            )));
        }
        let [a, b, c, _] = self.client.addr_v4.octets();
        let addresses: Vec<Ipv4Addr> = (0..count)
            .map(|index| Ipv4Addr::new(a, b, c, FIRST_EXTRA_CLIENT_HOST + index as u8))
            .collect();
        for address in &addresses {
            run_ip(&[
                "-n",
                &self.client.netns,
                "addr",
                "add",
                &format!("{address}/24"),
                "dev",
                &self.client.iface,
            ])?;
        }
        Ok(addresses)
    }

    /// Attaches an XDP_PASS program to the client's and every node's end of its link: in
    /// native mode, `XDP_TX` on the LB's veth and redirects into it deliver only when the peer
    /// has an XDP program. Each is recorded in `attached` as soon as it exists.
    pub fn attach_peer_programs(&self, attached: &mut Vec<PeerProgram>) -> Result<(), LabError> {
        for host in std::iter::once(&self.client).chain(&self.nodes) {
            attached.push(PeerProgram::attach(&host.netns, &host.iface)?);
        }
        Ok(())
    }

    /// Joins `host` to the LB with a veth pair, made inside the namespaces so its names never
    /// meet the root namespace's (or another run's).
    fn connect(&self, host: &Host) -> Result<(), LabError> {
        let lb = self.lb.netns.as_str();
        let lb_iface = host.gateway_iface_in_lb.as_str();
        let queues = queues_per_link().to_string();
        run_ip(&[
            "-n",
            &host.netns,
            "link",
            "add",
            &host.iface,
            "numtxqueues",
            &queues,
            "numrxqueues",
            &queues,
            "type",
            "veth",
            "peer",
            "name",
            lb_iface,
            "numtxqueues",
            &queues,
            "numrxqueues",
            &queues,
            "netns",
            lb,
        ])?;
        add_addresses(lb, lb_iface, host.gateway_v4, host.gateway_v6)?;
        add_addresses(&host.netns, &host.iface, host.addr_v4, host.addr_v6)?;
        // A partially computed TCP checksum is lost when a packet becomes an XDP frame.
        disable_tx_offload(lb, lb_iface, &[])?;
        // Native-mode redirects from the LB into this veth deliver with GRO on or an XDP
        // program attached; the lab does both (the program, attached later, also makes XDP_TX
        // deliver), so neither is a single point of failure for redirect tests.
        disable_tx_offload(&host.netns, &host.iface, &["gro", "on"])?;
        run_ip(&["-n", lb, "link", "set", lb_iface, "up"])?;
        run_ip(&["-n", &host.netns, "link", "set", &host.iface, "up"])?;
        run_ip(&[
            "-n",
            &host.netns,
            "route",
            "add",
            "default",
            "via",
            &host.gateway_v4.to_string(),
        ])?;
        run_ip(&[
            "-n",
            &host.netns,
            "-6",
            "route",
            "add",
            "default",
            "via",
            &host.gateway_v6.to_string(),
        ])
    }
}

/// An XDP_PASS program attached to a client or node veth for as long as the lab runs.
pub(crate) struct PeerProgram {
    netns: String,
    iface: String,
    program: PassProgram,
}

impl PeerProgram {
    /// Attaches an XDP_PASS program to `iface` in `netns`.
    pub fn attach(netns: &str, iface: &str) -> Result<PeerProgram, LabError> {
        let program = netns::in_netns(netns, || PassProgram::attach(iface))?.map_err(|source| {
            LabError::PassProgram {
                netns: netns.to_owned(),
                iface: iface.to_owned(),
                source: Box::new(source),
            }
        })?;
        Ok(PeerProgram {
            netns: netns.to_owned(),
            iface: iface.to_owned(),
            program,
        })
    }

    pub fn is_on(&self, netns: &str, iface: &str) -> bool {
        self.netns == netns && self.iface == iface
    }

    /// Detaches it from inside its namespace, where its interface index means its interface.
    pub fn detach(self) -> Result<(), LabError> {
        let PeerProgram { netns, program, .. } = self;
        netns::in_netns(&netns, move || drop(program))
    }
}

impl fmt::Debug for PeerProgram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "XDP_PASS on {} in {}", self.iface, self.netns)
    }
}

fn host(netns: String, gateway_iface_in_lb: String, subnet: u8) -> Host {
    Host {
        netns,
        iface: HOST_IFACE.to_owned(),
        addr_v4: Ipv4Addr::new(10, 200, subnet, 2),
        addr_v6: ipv6_in_subnet(subnet, 2),
        gateway_iface_in_lb,
        gateway_v4: Ipv4Addr::new(10, 200, subnet, 1),
        gateway_v6: ipv6_in_subnet(subnet, 1),
    }
}

/// `fd00:200:<subnet>::<host>`, the subnet written with the digits of its IPv4 octet.
fn ipv6_in_subnet(subnet: u8, host: u16) -> Ipv6Addr {
    let segment = subnet
        .to_string()
        .chars()
        .filter_map(|digit| digit.to_digit(10))
        .fold(0u16, |segment, digit| segment * 16 + digit as u16);
    Ipv6Addr::new(0xfd00, 0x200, segment, 0, 0, 0, 0, host)
}

fn add_addresses(netns: &str, iface: &str, v4: Ipv4Addr, v6: Ipv6Addr) -> Result<(), LabError> {
    add_addresses_v4(netns, iface, v4)?;
    // nodad: the address is usable at once instead of after duplicate address detection.
    run_ip(&[
        "-n",
        netns,
        "-6",
        "addr",
        "add",
        &format!("{v6}/64"),
        "dev",
        iface,
        "nodad",
    ])
}

/// `v4/24` on `iface`.
pub(crate) fn add_addresses_v4(netns: &str, iface: &str, v4: Ipv4Addr) -> Result<(), LabError> {
    run_ip(&[
        "-n",
        netns,
        "addr",
        "add",
        &format!("{v4}/24"),
        "dev",
        iface,
    ])
}

/// A queue per CPU on each end of every link, as on a multi-queue NIC: a single-queue veth
/// with XDP receives through one NAPI instance, so one CPU at a time serves all of its traffic.
pub(crate) fn queues_per_link() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

pub(crate) fn disable_tx_offload(netns: &str, iface: &str, also: &[&str]) -> Result<(), LabError> {
    let mut ethtool = command_in_netns(netns, "ethtool")?;
    ethtool.args(["-K", iface, "tx", "off"]).args(also);
    run_checked(&mut ethtool).map(drop)
}

/// Makes the LB namespace a router for both address families.
pub(crate) fn enable_forwarding(netns: &str) -> Result<(), LabError> {
    netns::write_sysctls(
        netns,
        &[("ipv4/ip_forward", "1"), ("ipv6/conf/all/forwarding", "1")],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_subnet_reads_like_ipv4_octet() {
        assert_eq!(
            ipv6_in_subnet(1, 2),
            "fd00:200:1::2".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(
            ipv6_in_subnet(12, 1),
            "fd00:200:12::1".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(
            ipv6_in_subnet(255, 2),
            "fd00:200:255::2".parse::<Ipv6Addr>().unwrap()
        );
    }

    #[test]
    fn plan_names_interfaces_within_linux_limit() {
        let topology = Topology::plan("lbt-4194304-4294967295", MAX_NODES).unwrap();
        assert!(
            topology
                .lb
                .node_ifaces
                .iter()
                .all(|iface| iface.len() <= 15)
        );
        assert_eq!(topology.nodes[3].addr_v4, Ipv4Addr::new(10, 200, 13, 2));
        assert_eq!(topology.nodes[3].gateway_iface_in_lb, "node3");
        assert_eq!(topology.client.gateway_v4, topology.lb.addr_v4);
    }

    #[test]
    fn plan_rejects_node_counts_outside_address_plan() {
        assert!(Topology::plan("lbt-1-0", 0).is_err());
        assert!(Topology::plan("lbt-1-0", MAX_NODES + 1).is_err());
    }
}
