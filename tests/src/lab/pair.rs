//! The HA lab's hosts and segments: two LBs that share the client's segment and the nodes'
//! segment, each a bridge, so VRRP adverts and gratuitous ARP really move the floating
//! addresses; a private segment joins the LBs and the fallback site, where the three etcd
//! members talk.
//!
//! ```text
//!  segment (bridge in <prefix>-switch)  hosts
//!  client   10.200.1.0/24    client eth0 .2, lb-a client0 .11, lb-b client0 .12
//!                            floating: .1 (gateway, the client's router), .10 (L4 VIP, NAT),
//!                            .30 (L4 VIP, DSR)
//!  nodes    10.200.10.0/24   lb-a nodes0 .11, lb-b nodes0 .12, node i eth0 .(20+i)
//!                            floating: .1 (NAT source, the nodes' router: DSR answers
//!                            reach the client through it)
//!  private  10.200.2.0/24    lb-a private0 .1, lb-b private0 .2, fallback eth0 .3
//! ```
//! IPv4 only: keepalived moves one address family per VRRP instance, and the single-LB lab
//! covers IPv6.

use std::net::Ipv4Addr;

use super::{
    LabError,
    netns::{self, run_ip},
    topology::{
        PeerProgram, add_addresses_v4, disable_tx_offload, enable_forwarding, queues_per_link,
    },
};

/// The LBs' interfaces, the same on both: towards the client, the nodes, the other LB.
pub const CLIENT_IFACE: &str = "client0";
pub const NODE_IFACE: &str = "nodes0";
pub const PRIVATE_IFACE: &str = "private0";
/// Every client, node and fallback namespace's one interface.
const HOST_IFACE: &str = "eth0";

/// The floating addresses keepalived moves to the master.
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 1);
pub const VIP_V4: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 10);
/// The DSR service's VIP: the nodes hold it too and answer the client from it.
pub const DSR_VIP_V4: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 30);
pub const NAT_SOURCE_V4: Ipv4Addr = Ipv4Addr::new(10, 200, 10, 1);

const CLIENT_SUBNET: u8 = 1;
const PRIVATE_SUBNET: u8 = 2;
const NODE_SUBNET: u8 = 10;
const FIRST_NODE_HOST: u8 = 20;
/// Nodes take host numbers `FIRST_NODE_HOST..=254` of the node segment.
pub const MAX_PAIR_NODES: usize = (254 - FIRST_NODE_HOST) as usize + 1;

/// A client, node or fallback namespace: one interface on one segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Station {
    pub netns: String,
    pub iface: String,
    pub addr_v4: Ipv4Addr,
}

/// Which LB of the pair: `a` starts as master (the higher VRRP priority).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Member {
    A,
    B,
}

impl Member {
    pub fn name(self) -> &'static str {
        match self {
            Member::A => "a",
            Member::B => "b",
        }
    }

    pub fn other(self) -> Member {
        match self {
            Member::A => Member::B,
            Member::B => Member::A,
        }
    }

    fn host_number(self) -> u8 {
        match self {
            Member::A => 11,
            Member::B => 12,
        }
    }
}

/// One LB of the pair and its own (not floating) addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairLb {
    pub member: Member,
    pub netns: String,
    pub client_v4: Ipv4Addr,
    pub node_v4: Ipv4Addr,
    pub private_v4: Ipv4Addr,
}

/// Every name and address of one HA lab run.
#[derive(Debug, Clone)]
pub(crate) struct PairTopology {
    /// Holds the three bridges and the switch ends of every link.
    pub switch: String,
    pub client: Station,
    pub lbs: [PairLb; 2],
    pub nodes: Vec<Station>,
    pub fallback: Station,
}

/// A bridge and the hosts on it.
struct Segment {
    bridge: &'static str,
    /// First letter of its switch ports' names (`c-lbt…`), which must stay within 15 bytes.
    port_tag: char,
}

const CLIENT_SEGMENT: Segment = Segment {
    bridge: "br-client",
    port_tag: 'c',
};
const NODE_SEGMENT: Segment = Segment {
    bridge: "br-nodes",
    port_tag: 'n',
};
const PRIVATE_SEGMENT: Segment = Segment {
    bridge: "br-private",
    port_tag: 'p',
};

impl PairTopology {
    pub fn plan(prefix: &str, nodes: usize) -> Result<PairTopology, LabError> {
        if nodes == 0 || nodes > MAX_PAIR_NODES {
            return Err(LabError::Config(format!(
                "nodes = {nodes}: the HA lab holds 1 to {MAX_PAIR_NODES} nodes on its node segment"
            )));
        }
        let station = |netns: String, subnet: u8, host: u8| Station {
            netns,
            iface: HOST_IFACE.to_owned(),
            addr_v4: Ipv4Addr::new(10, 200, subnet, host),
        };
        let lb = |member: Member| PairLb {
            member,
            netns: format!("{prefix}-lb{}", member.name()),
            client_v4: Ipv4Addr::new(10, 200, CLIENT_SUBNET, member.host_number()),
            node_v4: Ipv4Addr::new(10, 200, NODE_SUBNET, member.host_number()),
            private_v4: Ipv4Addr::new(10, 200, PRIVATE_SUBNET, member.host_number() - 10),
        };
        Ok(PairTopology {
            switch: format!("{prefix}-switch"),
            client: station(format!("{prefix}-client"), CLIENT_SUBNET, 2),
            lbs: [lb(Member::A), lb(Member::B)],
            nodes: (0..nodes)
                .map(|index| {
                    station(
                        format!("{prefix}-node{index}"),
                        NODE_SUBNET,
                        FIRST_NODE_HOST + index as u8,
                    )
                })
                .collect(),
            fallback: station(format!("{prefix}-fallback"), PRIVATE_SUBNET, 3),
        })
    }

    pub fn lb(&self, member: Member) -> &PairLb {
        &self.lbs[member as usize]
    }

    /// Every namespace, the switch first.
    pub fn namespaces(&self) -> impl Iterator<Item = &str> {
        [self.switch.as_str(), self.client.netns.as_str()]
            .into_iter()
            .chain(self.lbs.iter().map(|lb| lb.netns.as_str()))
            .chain(self.nodes.iter().map(|node| node.netns.as_str()))
            .chain(std::iter::once(self.fallback.netns.as_str()))
    }

    /// Creates the namespaces, bridges, links, addresses and routes; each namespace is
    /// recorded in `created` as soon as it exists. The switch ends towards the LBs get an
    /// XDP_PASS program (recorded in `attached`): native-mode redirects and `XDP_TX` into an
    /// LB's veth deliver only when its peer has one (on the private segment: second chance's
    /// redirects towards the other LB).
    pub fn build(
        &self,
        created: &mut Vec<String>,
        attached: &mut Vec<PeerProgram>,
    ) -> Result<(), LabError> {
        for netns in self.namespaces() {
            netns::add_netns(netns)?;
            created.push(netns.to_owned());
            run_ip(&["-n", netns, "link", "set", "lo", "up"])?;
        }
        for segment in [&CLIENT_SEGMENT, &NODE_SEGMENT, &PRIVATE_SEGMENT] {
            run_ip(&[
                "-n",
                &self.switch,
                "link",
                "add",
                segment.bridge,
                "type",
                "bridge",
            ])?;
            run_ip(&["-n", &self.switch, "link", "set", segment.bridge, "up"])?;
        }
        let client = &self.client;
        self.join(
            &CLIENT_SEGMENT,
            &client.netns,
            &client.iface,
            client.addr_v4,
        )?;
        route_default(&client.netns, GATEWAY_V4)?;
        for lb in &self.lbs {
            enable_forwarding(&lb.netns)?;
            for (segment, iface, addr) in [
                (&CLIENT_SEGMENT, CLIENT_IFACE, lb.client_v4),
                (&NODE_SEGMENT, NODE_IFACE, lb.node_v4),
                (&PRIVATE_SEGMENT, PRIVATE_IFACE, lb.private_v4),
            ] {
                let port = self.join(segment, &lb.netns, iface, addr)?;
                disable_tx_offload(&self.switch, &port, &["gro", "on"])?;
                attached.push(PeerProgram::attach(&self.switch, &port)?);
            }
            // The DSR nodes answer the client from the VIP, which the master holds too:
            // without this it would take their answers for spoofed (martian) and drop them.
            let accept_local = format!("ipv4/conf/{NODE_IFACE}/accept_local");
            netns::write_sysctls(&lb.netns, &[(&accept_local, "1")])?;
        }
        for node in &self.nodes {
            self.join(&NODE_SEGMENT, &node.netns, &node.iface, node.addr_v4)?;
            route_default(&node.netns, NAT_SOURCE_V4)?;
        }
        let fallback = &self.fallback;
        self.join(
            &PRIVATE_SEGMENT,
            &fallback.netns,
            &fallback.iface,
            fallback.addr_v4,
        )
        .map(drop)
    }

    /// Joins `iface` in `netns` to `segment`'s bridge with a veth pair; returns the switch
    /// end's name (the segment's tag and the host's namespace suffix, e.g. `c-lba`).
    fn join(
        &self,
        segment: &Segment,
        netns: &str,
        iface: &str,
        addr: Ipv4Addr,
    ) -> Result<String, LabError> {
        let port = switch_port(segment, netns);
        let queues = queues_per_link().to_string();
        run_ip(&[
            "-n",
            netns,
            "link",
            "add",
            iface,
            "numtxqueues",
            &queues,
            "numrxqueues",
            &queues,
            "type",
            "veth",
            "peer",
            "name",
            &port,
            "numtxqueues",
            &queues,
            "numrxqueues",
            &queues,
            "netns",
            &self.switch,
        ])?;
        run_ip(&[
            "-n",
            &self.switch,
            "link",
            "set",
            &port,
            "master",
            segment.bridge,
        ])?;
        add_addresses_v4(netns, iface, addr)?;
        // A partially computed TCP checksum is lost when a packet becomes an XDP frame.
        disable_tx_offload(netns, iface, &[])?;
        run_ip(&["-n", &self.switch, "link", "set", &port, "up"])?;
        run_ip(&["-n", netns, "link", "set", iface, "up"])?;
        Ok(port)
    }
}

impl PairTopology {
    /// Sets the switch ends of `member`'s links to the client segment and the private segment
    /// down, as if their cables were pulled: the LB's own ends lose their carrier too, so it
    /// neither hears nor reaches the clients, the other LB or the etcd members elsewhere. Its
    /// link to the nodes stays up.
    pub fn cut_client_and_private_links(&self, member: Member) -> Result<(), LabError> {
        let netns = &self.lb(member).netns;
        for segment in [&CLIENT_SEGMENT, &PRIVATE_SEGMENT] {
            let port = switch_port(segment, netns);
            run_ip(&["-n", &self.switch, "link", "set", &port, "down"])?;
        }
        Ok(())
    }
}

/// The switch end of `netns`'s link to `segment`: the segment's tag and the namespace's suffix,
/// e.g. `c-lba`.
fn switch_port(segment: &Segment, netns: &str) -> String {
    let suffix = netns.rsplit('-').next().unwrap_or(netns);
    format!("{}-{suffix}", segment.port_tag)
}

fn route_default(netns: &str, via: Ipv4Addr) -> Result<(), LabError> {
    run_ip(&[
        "-n",
        netns,
        "route",
        "add",
        "default",
        "via",
        &via.to_string(),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_keeps_switch_port_names_within_linux_limit() {
        let topology = PairTopology::plan("lbt-4194304-4294967295", MAX_PAIR_NODES).unwrap();
        for netns in topology.namespaces() {
            let suffix = netns.rsplit('-').next().unwrap();
            assert!(format!("c-{suffix}").len() <= 15, "{netns}");
        }
        assert_eq!(
            topology.lb(Member::B).client_v4,
            Ipv4Addr::new(10, 200, 1, 12)
        );
        assert_eq!(
            topology.lb(Member::B).private_v4,
            Ipv4Addr::new(10, 200, 2, 2)
        );
        assert_eq!(topology.nodes[2].addr_v4, Ipv4Addr::new(10, 200, 10, 22));
    }
}
