//! The load balancer's packet fixtures: the specification of the XDP program, Katran style.
//!
//! Each row is a description, an input frame and the link it arrives on, the expected XDP
//! action, the expected output frame (exact bytes, built independently from the fields a load
//! balancer must rewrite) and the counters it must move. Forwarded frames also have every
//! checksum recomputed from scratch with etherparse. Rows run through BPF_PROG_TEST_RUN in a
//! network namespace of their own whose neighbours are static, so the FIB lookups (and with
//! them the MAC addresses and the TX/redirect choice) are known in advance.
//!
//! A test runs all its rows, then fails listing every row that did not behave.
//!
//! Behaviours these rows define (beyond the obvious):
//! - malformed frames (too short for their headers, lengths that do not add up) are never
//!   forwarded: they go to the kernel stack untouched, which discards them;
//! - ICMP errors, also those about a tracked flow, are passed to the stack untranslated;
//! - IPv6 extension headers are not followed: such packets go to the stack;
//! - fragments to a VIP are dropped (counted `fragment`) or passed by setting, never forwarded,
//!   and neither is the first fragment of a backend's reply;
//! - TTL/hop limit 1 is dropped (`ttl_exceeded`), never forwarded with 0;
//! - during a handover's second chance, a gateway segment that opens no connection and has no
//!   socket here (the listener does not count) goes to the previous owner with only its MACs
//!   changed, unless it came from that side.

mod fixtures;

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    ops::RangeInclusive,
    time::Duration,
};

use etherparse::{
    IpNumber, Ipv4Header, Ipv6FlowLabel, Ipv6Header, PacketBuilder, PacketHeaders,
    icmpv4::DestUnreachableHeader,
};
use lb_common::{
    flow::{FlowKey, flow_hash},
    maglev::{MaglevBackend, build_table},
    maps::{BACKEND_DOWN, BACKEND_UP, DropReason, Flow, MAX_SERVICES, ServiceKey},
};
use lb_control::{
    dataplane::{
        ApplyReport, BackendSpec, Blocklist, DEFAULT_BPFFS, LbSettings, ProgramHarness,
        SecondChanceMap, SecondChanceMode, ServiceSpec, TestVerdict, XdpAction,
        read_second_chance_packets,
    },
    model::{BackendState, ForwardingMode, Protocol},
};

use self::fixtures::*;

// ---------------------------------------------------------------------------------------------
// Rows and their runner.

/// What the program must do with a row's frame.
enum Expect {
    /// Sent on with this action, as exactly these bytes.
    Forward(XdpAction, Vec<u8>),
    /// Passed to the kernel stack untouched.
    Pass,
    /// Dropped.
    Drop,
    /// Not forwarded: passed untouched or dropped are both acceptable.
    NotForwarded,
}

/// The counters a row moves (summed over every service and CPU); every other counter stays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Counted {
    /// A forwarded packet of the service, a new flow or not.
    Forwarded { new_flow: bool },
    /// Dropped under this reason in the service's counters; no forwarded packet counted.
    ServiceDrop(DropReason),
    /// Dropped under this reason in the program-wide counters (no service).
    Drop(DropReason),
    /// No service or drop counter moves (passed packets, NAT replies).
    Nothing,
    /// Not checked.
    Unchecked,
}

struct Row {
    description: String,
    /// The link the frame arrives on.
    link: &'static str,
    input: Vec<u8>,
    expect: Expect,
    counted: Counted,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Counts {
    packets: u64,
    new_flows: u64,
    service_drops: [u64; DropReason::COUNT],
    drops: [u64; DropReason::COUNT],
}

impl Counts {
    fn since(&self, before: &Counts) -> Counts {
        Counts {
            packets: self.packets - before.packets,
            new_flows: self.new_flows - before.new_flows,
            service_drops: std::array::from_fn(|i| self.service_drops[i] - before.service_drops[i]),
            drops: std::array::from_fn(|i| self.drops[i] - before.drops[i]),
        }
    }

    fn expected(counted: Counted, actual: &Counts) -> Counts {
        let mut counts = Counts::default();
        match counted {
            Counted::Forwarded { new_flow } => {
                counts.packets = 1;
                counts.new_flows = u64::from(new_flow);
            }
            Counted::ServiceDrop(reason) => {
                counts.service_drops[reason as usize] = 1;
                // Whether a dropped packet's flow was recorded is not part of the row.
                counts.new_flows = actual.new_flows;
            }
            Counted::Drop(reason) => counts.drops[reason as usize] = 1,
            Counted::Nothing => {}
            Counted::Unchecked => return *actual,
        }
        counts
    }
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "packets {} new_flows {}", self.packets, self.new_flows)?;
        for reason in DropReason::ALL {
            let (service, global) = (
                self.service_drops[reason as usize],
                self.drops[reason as usize],
            );
            if service != 0 {
                write!(f, " service drops {} {service}", reason.name())?;
            }
            if global != 0 {
                write!(f, " drops {} {global}", reason.name())?;
            }
        }
        Ok(())
    }
}

/// NAT source ports as the program must hand them out: the client's own port when it lies in
/// the range and is free towards that backend, else hashed probes (`flow_hash`, stepped by the
/// golden ratio), at most 8 tries. Reverse entries are never freed here (the kernel's are LRU).
struct NatPorts {
    range: RangeInclusive<u16>,
    used: HashSet<(SocketAddr, u8, u16)>,
}

const NAT_PORT_PROBES: u32 = 8;

impl NatPorts {
    fn allocate(&mut self, packet: &Packet, backend: SocketAddr) -> Option<u16> {
        let hash = flow_hash(&packet.flow_key());
        let min = u32::from(*self.range.start());
        let size = u32::from(*self.range.end()) - min + 1;
        let client_port = packet.src.port();
        (0..NAT_PORT_PROBES).find_map(|probe| {
            // First the client's port folded into the range, so a reconnect from the same
            // port meets the backend on the same NAT 4-tuple.
            let port = if probe == 0 {
                let port = u32::from(client_port);
                let past_min = if port >= min {
                    port - min
                } else {
                    port + 0x1_0000 - min
                };
                (min + past_min % size) as u16
            } else {
                (min + hash.wrapping_add(probe.wrapping_mul(0x9e37_79b9)) % size) as u16
            };
            self.used
                .insert((backend, packet.proto(), port))
                .then_some(port)
        })
    }
}

struct Lab<'n> {
    net: &'n FixtureNet,
    harness: ProgramHarness,
    maps: PinnedMaps,
    settings: LbSettings,
    nat: NatPorts,
    failures: Vec<String>,
    rows: usize,
}

fn settings() -> LbSettings {
    LbSettings {
        nat_source_v4: Some(NAT_SOURCE_V4),
        nat_source_v6: Some(NAT_SOURCE_V6),
        nat_ports: 20000..=29999,
        nat_port_hold: std::time::Duration::from_secs(61),
        dsr_source_v4: DSR_SOURCE_V4,
        dsr_source_v6: DSR_SOURCE_V6,
        maglev_table_size: lb_common::maglev::DEFAULT_TABLE_SIZE,
        pass_fragments: false,
    }
}

/// Runs `body` with the program loaded in a fixture namespace of its own, then fails listing
/// every row that did not behave.
fn lab(tag: &str, settings: LbSettings, body: impl FnOnce(&mut Lab<'_>) + Send) {
    in_fixture_net(tag, |net| {
        let harness = load_harness(tag);
        let mut lab = Lab {
            net,
            harness,
            maps: PinnedMaps::new(tag),
            nat: NatPorts {
                range: settings.nat_ports.clone(),
                used: HashSet::new(),
            },
            settings,
            failures: Vec::new(),
            rows: 0,
        };
        body(&mut lab);
        assert!(
            lab.failures.is_empty(),
            "{} of {} rows failed:\n\n{}",
            lab.failures.len(),
            lab.rows,
            lab.failures.join("\n\n")
        );
    });
}

impl Lab<'_> {
    fn apply(&mut self, services: &[ServiceSpec]) -> ApplyReport {
        self.harness
            .apply(&self.settings, services)
            .unwrap_or_else(|error| panic!("applying services: {error}"))
    }

    /// Runs the program once on `frame` arriving on interface `ingress` (in the fixture
    /// namespace).
    fn run_from(&self, ingress: u32, frame: &[u8]) -> TestVerdict {
        self.harness
            .run_from(ingress, frame)
            .unwrap_or_else(|error| panic!("BPF_PROG_TEST_RUN: {error}"))
    }

    fn counts(&self) -> Counts {
        let mut counts = Counts {
            drops: self.maps.drop_stats(),
            ..Counts::default()
        };
        for id in 0..MAX_SERVICES {
            let stats = self.maps.service_stats(id);
            counts.packets += stats.packets;
            counts.new_flows += stats.new_flows;
            for (total, drops) in counts.service_drops.iter_mut().zip(stats.drops) {
                *total += drops;
            }
        }
        counts
    }

    /// Runs one row; records a failure (and goes on) when it misbehaves.
    fn row(&mut self, row: Row) {
        self.rows += 1;
        let ingress = self.net.ifindex(row.link);
        let before = self.counts();
        let verdict = self.run_from(ingress, &row.input);
        let moved = self.counts().since(&before);
        let mut problems = Vec::new();
        let forwarded = matches!(verdict.action, XdpAction::Tx | XdpAction::Redirect);
        match &row.expect {
            Expect::Forward(action, output) => {
                if verdict.action != *action {
                    problems.push(format!("action {:?}, expected {action:?}", verdict.action));
                }
                if verdict.output != *output {
                    problems.push(format!(
                        "output frame differs{}\n      got:  {}\n      want: {}",
                        first_difference(&verdict.output, output),
                        describe(&verdict.output),
                        describe(output)
                    ));
                }
                if let Err(error) = verify_checksums(&verdict.output) {
                    problems.push(format!("checksum: {error}"));
                }
            }
            Expect::Pass => {
                if forwarded {
                    problems.push(format!(
                        "action {:?}, expected Pass (to the kernel stack); sent as {}",
                        verdict.action,
                        describe(&verdict.output)
                    ));
                } else if verdict.action != XdpAction::Pass {
                    problems.push(format!(
                        "action {:?}, expected Pass (to the kernel stack)",
                        verdict.action
                    ));
                } else if verdict.output != row.input {
                    problems.push(format!(
                        "passed frame was modified{}",
                        first_difference(&verdict.output, &row.input)
                    ));
                }
            }
            Expect::Drop => {
                if verdict.action != XdpAction::Drop {
                    problems.push(format!("action {:?}, expected Drop", verdict.action));
                }
            }
            Expect::NotForwarded => {
                if forwarded {
                    problems.push(format!(
                        "forwarded ({:?}) as {}; expected Pass (untouched) or Drop",
                        verdict.action,
                        describe(&verdict.output)
                    ));
                } else if verdict.action == XdpAction::Pass && verdict.output != row.input {
                    problems.push("passed frame was modified".to_owned());
                }
            }
        }
        let expected = Counts::expected(row.counted, &moved);
        if moved != expected {
            problems.push(format!("counters moved [{moved}], expected [{expected}]"));
        }
        if problems.is_empty() {
            println!("ok    {}", row.description);
        } else {
            println!("FAIL  {}", row.description);
            self.failures.push(format!(
                "row {}: {}\n    {}",
                self.rows,
                row.description,
                problems.join("\n    ")
            ));
        }
    }

    /// A row for a client packet that must start a new NAT flow to `backend`; returns the NAT
    /// port the model expects (and the row checks).
    fn new_nat_flow(&mut self, description: String, packet: &Packet, backend: SocketAddr) -> u16 {
        let port = self
            .nat
            .allocate(packet, backend)
            .expect("the model has a free NAT port");
        let (action, output) = nat_forwarded(packet, port, backend);
        self.row(Row {
            description,
            link: CLIENT_LINK,
            input: packet.bytes(),
            expect: Expect::Forward(action, output),
            counted: Counted::Forwarded { new_flow: true },
        });
        port
    }

    /// A row for a packet of an established NAT flow: same backend, same NAT port.
    fn established_nat_flow(
        &mut self,
        description: String,
        packet: &Packet,
        backend: SocketAddr,
        port: u16,
    ) {
        let (action, output) = nat_forwarded(packet, port, backend);
        self.row(Row {
            description,
            link: CLIENT_LINK,
            input: packet.bytes(),
            expect: Expect::Forward(action, output),
            counted: Counted::Forwarded { new_flow: false },
        });
    }

    /// Two rows for packets of an established NAT flow, on the CPU the thread runs on: the
    /// first copies its entry into that CPU's flow cache, the second is served from the copy.
    fn cached_nat_flow(&mut self, what: &str, packet: &Packet, backend: SocketAddr, port: u16) {
        for copy in ["copied into this CPU's flow cache", "served from it"] {
            self.established_nat_flow(format!("{what}: {copy}"), packet, backend, port);
        }
    }

    fn passed(&mut self, description: &str, link: &'static str, input: Vec<u8>) {
        self.row(Row {
            description: description.to_owned(),
            link,
            input,
            expect: Expect::Pass,
            counted: Counted::Nothing,
        });
    }

    fn dropped(&mut self, description: &str, input: Vec<u8>, counted: Counted) {
        self.row(Row {
            description: description.to_owned(),
            link: CLIENT_LINK,
            input,
            expect: Expect::Drop,
            counted,
        });
    }

    /// Client ports from `from` on whose flows (`packet` with that source port) the live
    /// Maglev table sends to `backend`.
    fn ports_choosing(
        &self,
        service: &ServiceSpec,
        packet: &Packet,
        backend: SocketAddr,
        from: u16,
    ) -> impl Iterator<Item = u16> {
        (from..u16::MAX).filter(move |&port| {
            let probe = packet
                .clone()
                .addresses(with_port(packet.src, port), packet.dst);
            self.maps.maglev_choice(&service.key(), &probe.flow_key()) == Some(backend)
        })
    }
}

/// The packet as the LB sends it on to `backend` in NAT mode, and the action that sends it.
fn nat_forwarded(packet: &Packet, nat_port: u16, backend: SocketAddr) -> (XdpAction, Vec<u8>) {
    let nat_source = match backend {
        SocketAddr::V4(_) => IpAddr::V4(NAT_SOURCE_V4),
        SocketAddr::V6(_) => IpAddr::V6(NAT_SOURCE_V6),
    };
    let (action, lb_mac, mac) = next_hop(backend.ip());
    let output = packet
        .clone()
        .addresses(SocketAddr::new(nat_source, nat_port), backend)
        .macs(lb_mac, mac)
        .ttl(packet.ttl - 1);
    (action, output.bytes())
}

/// A backend's reply to the NAT address, as the LB sends it on to the client of `flow`.
fn nat_reply(reply: &Packet, flow: &Packet) -> Vec<u8> {
    reply
        .clone()
        .addresses(flow.dst, flow.src)
        .macs(LB_CLIENT_MAC, CLIENT_MAC)
        .ttl(reply.ttl - 1)
        .bytes()
}

/// How a frame for `addr` leaves the LB: the action when it arrives on the client link, the
/// LB's MAC on the egress link, and the next hop's MAC.
fn next_hop(addr: IpAddr) -> (XdpAction, [u8; 6], [u8; 6]) {
    if addr == IpAddr::V4(LOCAL_BACKEND_V4) {
        return (XdpAction::Tx, LB_CLIENT_MAC, LOCAL_BACKEND_MAC);
    }
    let n = match addr {
        IpAddr::V4(v4) => v4.octets()[3],
        IpAddr::V6(v6) => v6.octets()[15],
    };
    (XdpAction::Redirect, LB_BACKEND_MAC, backend_mac(n))
}

fn with_port(addr: SocketAddr, port: u16) -> SocketAddr {
    SocketAddr::new(addr.ip(), port)
}

fn first_difference(got: &[u8], want: &[u8]) -> String {
    match got.iter().zip(want).position(|(a, b)| a != b) {
        Some(at) => format!(
            " from byte {at} ({:#04x}, expected {:#04x}); {} bytes, expected {}",
            got[at],
            want[at],
            got.len(),
            want.len()
        ),
        None if got.len() != want.len() => {
            format!(": {} bytes, expected {}", got.len(), want.len())
        }
        None => String::new(),
    }
}

fn describe(frame: &[u8]) -> String {
    match PacketHeaders::from_ethernet_slice(frame) {
        Ok(headers) => format!(
            "{:?} {:?} {:?}",
            headers.link, headers.net, headers.transport
        ),
        Err(error) => format!("{} unparsable bytes ({error})", frame.len()),
    }
}

// ---------------------------------------------------------------------------------------------
// Services.

fn backend(addr: SocketAddr, state: BackendState) -> BackendSpec {
    BackendSpec {
        addr,
        weight: 1,
        state,
    }
}

fn up(addr: SocketAddr) -> BackendSpec {
    backend(addr, BackendState::Up)
}

fn service(
    vip: SocketAddr,
    protocol: Protocol,
    mode: ForwardingMode,
    backends: Vec<BackendSpec>,
) -> ServiceSpec {
    ServiceSpec {
        vip: vip.ip(),
        port: vip.port(),
        protocol,
        mode,
        backends,
    }
}

fn nat_tcp(vip: SocketAddr, backends: Vec<BackendSpec>) -> ServiceSpec {
    service(vip, Protocol::Tcp, ForwardingMode::Nat, backends)
}

fn b4(n: u8) -> SocketAddr {
    v4(backend_v4(n), RPC_PORT)
}

fn b6(n: u8) -> SocketAddr {
    v6(backend_v6(n), RPC_PORT)
}

fn client(port: u16) -> SocketAddr {
    v4(CLIENT_V4, port)
}

fn client6(port: u16) -> SocketAddr {
    v6(CLIENT_V6, port)
}

fn vip() -> SocketAddr {
    v4(VIP_V4, RPC_PORT)
}

fn vip6() -> SocketAddr {
    v6(VIP_V6, RPC_PORT)
}

fn nat4(port: u16) -> SocketAddr {
    v4(NAT_SOURCE_V4, port)
}

fn nat6(port: u16) -> SocketAddr {
    v6(NAT_SOURCE_V6, port)
}

// ---------------------------------------------------------------------------------------------
// Frames the `Packet` builder does not make.

/// Recomputes the IPv4 header checksum of an untagged frame (after editing the header).
fn fix_ipv4_checksum(mut frame: Vec<u8>) -> Vec<u8> {
    let ihl = usize::from(frame[L3] & 0x0f) * 4;
    frame[L3 + 10..L3 + 12].copy_from_slice(&[0, 0]);
    let header = &frame[L3..L3 + ihl];
    let mut sum: u32 = header
        .chunks(2)
        .map(|word| u32::from(u16::from_be_bytes([word[0], word[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let check = !(sum as u16);
    frame[L3 + 10..L3 + 12].copy_from_slice(&check.to_be_bytes());
    frame
}

/// An IPv4 frame whose total length field says `total_len`, header checksum fixed.
fn with_ipv4_total_len(frame: Vec<u8>, total_len: u16) -> Vec<u8> {
    fix_ipv4_checksum(with_bytes(frame, L3 + 2, &total_len.to_be_bytes()))
}

/// Inserts an 8-byte IPv6 extension header (`next_header` value `kind`) right after the IPv6
/// header of an untagged frame.
fn with_ipv6_extension(frame: Vec<u8>, kind: u8, body: [u8; 6]) -> Vec<u8> {
    let inner_next = frame[L3 + 6];
    let payload_len = u16::from_be_bytes([frame[L3 + 4], frame[L3 + 5]]) + 8;
    let mut out = frame[..L3 + 40].to_vec();
    out[L3 + 4..L3 + 6].copy_from_slice(&payload_len.to_be_bytes());
    out[L3 + 6] = kind;
    out.push(inner_next);
    out.push(0);
    out.extend_from_slice(&body);
    out.extend_from_slice(&frame[L3 + 40..]);
    out
}

const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_FRAGMENT: u8 = 44;

/// Frame IPv4-in-IPv4 encapsulated as DSR must send it to backend `n`.
fn ipip_v4(inner: &[u8], src: Ipv4Addr, n: u8) -> Vec<u8> {
    let inner = &inner[L3..];
    let mut outer = Ipv4Header::new(
        inner.len() as u16,
        64,
        IpNumber::IPV4,
        src.octets(),
        backend_v4(n).octets(),
    )
    .expect("outer header");
    outer.dont_fragment = false;
    outer.header_checksum = outer.calc_header_checksum();
    let mut frame = ethernet(backend_mac(n), LB_BACKEND_MAC, 0x0800);
    frame.extend_from_slice(&outer.to_bytes());
    frame.extend_from_slice(inner);
    frame
}

/// Frame IPv6-in-IPv6 encapsulated as DSR must send it to backend `n`.
fn ip6ip6(inner: &[u8], src: Ipv6Addr, n: u8) -> Vec<u8> {
    let inner = &inner[L3..];
    let outer = Ipv6Header {
        traffic_class: 0,
        flow_label: Ipv6FlowLabel::ZERO,
        payload_length: inner.len() as u16,
        next_header: IpNumber::IPV6,
        hop_limit: 64,
        source: src.octets(),
        destination: backend_v6(n).octets(),
    };
    let mut frame = ethernet(backend_mac(n), LB_BACKEND_MAC, 0x86dd);
    frame.extend_from_slice(&outer.to_bytes());
    frame.extend_from_slice(inner);
    frame
}

fn ethernet(dst: [u8; 6], src: [u8; 6], ether_type: u16) -> Vec<u8> {
    let mut frame = dst.to_vec();
    frame.extend_from_slice(&src);
    frame.extend_from_slice(&ether_type.to_be_bytes());
    frame
}

/// The DSR outer source for a flow: a /24 prefix with its last byte from the flow hash.
fn dsr_source_v4(packet: &Packet) -> Ipv4Addr {
    let low = dsr_low_bits(packet);
    let mut octets = DSR_SOURCE_V4.octets();
    octets[3] = low[0] ^ low[1];
    Ipv4Addr::from(octets)
}

fn dsr_source_v6(packet: &Packet) -> Ipv6Addr {
    let low = dsr_low_bits(packet);
    let mut octets = DSR_SOURCE_V6.octets();
    octets[14..].copy_from_slice(&low);
    Ipv6Addr::from(octets)
}

fn dsr_low_bits(packet: &Packet) -> [u8; 2] {
    let hash = flow_hash(&packet.flow_key());
    ((hash ^ (hash >> 16)) as u16).to_be_bytes()
}

fn arp_request() -> Vec<u8> {
    let mut frame = ethernet([0xff; 6], CLIENT_MAC, 0x0806);
    frame.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    frame.extend_from_slice(&CLIENT_MAC);
    frame.extend_from_slice(&CLIENT_V4.octets());
    frame.extend_from_slice(&[0; 6]);
    frame.extend_from_slice(&LB_CLIENT_V4.octets());
    frame
}

// ---------------------------------------------------------------------------------------------
// The fixtures.

#[test]
fn nat_v4_tcp_new_flow_established_flow_and_reply() {
    lab("nat4", settings(), |lab| {
        let local_vip = v4(VIP_V4, RPC_PORT + 1);
        let local_backend = v4(LOCAL_BACKEND_V4, RPC_PORT);
        lab.apply(&[
            nat_tcp(vip(), vec![up(b4(2))]),
            nat_tcp(local_vip, vec![up(local_backend)]),
        ]);

        let syn = Packet::syn(client(40000), vip());
        let port = lab.new_nat_flow(
            "new TCP flow (SYN, client port outside the NAT range): dst -> backend, src -> NAT \
             source and the client's port folded into the range, TTL-1, redirected to the \
             backend link"
                .into(),
            &syn,
            b4(2),
        );
        assert_eq!(
            port, 20000,
            "client port 40000 folds onto 20000 of the range 20000-29999"
        );
        let data = Packet::tcp(client(40000), vip());
        lab.established_nat_flow(
            "established flow: the next segment goes to the same backend from the same NAT port"
                .into(),
            &data,
            b4(2),
            port,
        );
        let reply = Packet::tcp(b4(2), nat4(port))
            .flags(TCP_SYN | TCP_ACK)
            .sent_by_backend(2);
        lab.row(Row {
            description: "reply path: backend -> NAT source:port becomes VIP:port -> \
                          client:port, TTL-1, redirected to the client link"
                .into(),
            link: BACKEND_LINK,
            input: reply.bytes(),
            expect: Expect::Forward(XdpAction::Redirect, nat_reply(&reply, &syn)),
            counted: Counted::Nothing,
        });
        let unused = if port == 29999 { 29998 } else { 29999 };
        lab.passed(
            "a backend's segment to a NAT port no flow holds (the LB's own connection) goes \
             to the stack",
            BACKEND_LINK,
            Packet::tcp(b4(2), nat4(unused)).sent_by_backend(2).bytes(),
        );
        lab.passed(
            "a backend's segment to the NAT address from another port than the flow's goes \
             to the stack",
            BACKEND_LINK,
            Packet::tcp(v4(backend_v4(2), 22), nat4(port))
                .sent_by_backend(2)
                .bytes(),
        );

        let in_range = Packet::syn(client(25000), vip());
        lab.new_nat_flow(
            "new flow whose client port lies in the NAT range keeps its port".into(),
            &in_range,
            b4(2),
        );
        let same_port = Packet::syn(v4(CLIENT2_V4, 25000), vip());
        let second = lab.new_nat_flow(
            "a second client with the same port gets a hashed port (the reverse entry for \
             25000 is taken)"
                .into(),
            &same_port,
            b4(2),
        );
        assert_ne!(second, 25000);

        let local = Packet::syn(client(40001), local_vip);
        let local_port = lab.new_nat_flow(
            "backend on the ingress link: the frame leaves by XDP_TX with the backend's MAC".into(),
            &local,
            local_backend,
        );
        let local_reply =
            Packet::tcp(local_backend, nat4(local_port)).macs(LOCAL_BACKEND_MAC, LB_CLIENT_MAC);
        lab.row(Row {
            description: "its reply, arriving on the client link, leaves by XDP_TX towards the \
                          client"
                .into(),
            link: CLIENT_LINK,
            input: local_reply.bytes(),
            expect: Expect::Forward(XdpAction::Tx, nat_reply(&local_reply, &local)),
            counted: Counted::Nothing,
        });
    });
}

#[test]
fn nat_v6_tcp_new_flow_established_flow_and_reply() {
    lab("nat6", settings(), |lab| {
        lab.apply(&[nat_tcp(vip6(), vec![up(b6(2))])]);
        let syn = Packet::syn(client6(40000), vip6());
        let port = lab.new_nat_flow(
            "IPv6 new flow: dst -> backend, src -> NAT source and port, hop limit-1".into(),
            &syn,
            b6(2),
        );
        lab.established_nat_flow(
            "IPv6 established flow keeps backend and NAT port".into(),
            &Packet::tcp(client6(40000), vip6()),
            b6(2),
            port,
        );
        let reply = Packet::tcp(b6(2), nat6(port)).sent_by_backend(2);
        lab.row(Row {
            description: "IPv6 reply path: backend -> NAT becomes VIP -> client".into(),
            link: BACKEND_LINK,
            input: reply.bytes(),
            expect: Expect::Forward(XdpAction::Redirect, nat_reply(&reply, &syn)),
            counted: Counted::Nothing,
        });
    });
}

#[test]
fn nat_udp_with_and_without_checksum() {
    lab("udp", settings(), |lab| {
        let vip = v4(VIP_V4, P2P_PORT);
        let vip6 = v6(VIP_V6, P2P_PORT);
        let backend = v4(backend_v4(2), P2P_PORT);
        let backend6 = v6(backend_v6(2), P2P_PORT);
        lab.apply(&[
            service(vip, Protocol::Udp, ForwardingMode::Nat, vec![up(backend)]),
            service(vip6, Protocol::Udp, ForwardingMode::Nat, vec![up(backend6)]),
        ]);

        let datagram = Packet::udp(client(40000), vip);
        let port = lab.new_nat_flow(
            "UDP new flow: addresses, ports and checksum rewritten".into(),
            &datagram,
            backend,
        );
        let reply = Packet::udp(backend, nat4(port)).sent_by_backend(2);
        lab.row(Row {
            description: "UDP reply path".into(),
            link: BACKEND_LINK,
            input: reply.bytes(),
            expect: Expect::Forward(XdpAction::Redirect, nat_reply(&reply, &datagram)),
            counted: Counted::Nothing,
        });

        let bare = Packet::udp(client(40001), vip).zero_udp_checksum();
        let bare_port = lab.new_nat_flow(
            "UDP without checksum (zero): the checksum stays zero".into(),
            &bare,
            backend,
        );
        let bare_reply = Packet::udp(backend, nat4(bare_port))
            .zero_udp_checksum()
            .sent_by_backend(2);
        lab.row(Row {
            description: "UDP reply without checksum: stays zero".into(),
            link: BACKEND_LINK,
            input: bare_reply.bytes(),
            expect: Expect::Forward(XdpAction::Redirect, nat_reply(&bare_reply, &bare)),
            counted: Counted::Nothing,
        });

        let datagram6 = Packet::udp(client6(40000), vip6);
        let port6 = lab.new_nat_flow("IPv6 UDP new flow".into(), &datagram6, backend6);
        let reply6 = Packet::udp(backend6, nat6(port6)).sent_by_backend(2);
        lab.row(Row {
            description: "IPv6 UDP reply path".into(),
            link: BACKEND_LINK,
            input: reply6.bytes(),
            expect: Expect::Forward(XdpAction::Redirect, nat_reply(&reply6, &datagram6)),
            counted: Counted::Nothing,
        });
    });
}

#[test]
fn dsr_encapsulates_ipip_and_ip6ip6_to_the_backend() {
    lab("dsr", settings(), |lab| {
        lab.apply(&[
            service(vip(), Protocol::Tcp, ForwardingMode::Dsr, vec![up(b4(3))]),
            service(vip6(), Protocol::Tcp, ForwardingMode::Dsr, vec![up(b6(3))]),
        ]);
        for (description, packet, new_flow) in [
            (
                "DSR v4 new flow: 20-byte outer IPv4 header, protocol 4, outer dst = backend, \
                 outer src = DSR prefix + flow hash bits, inner packet unchanged",
                Packet::syn(client(40000), vip()),
                true,
            ),
            (
                "DSR v4 established flow: same backend, same outer source",
                Packet::tcp(client(40000), vip()),
                false,
            ),
        ] {
            let input = packet.bytes();
            let output = ipip_v4(&input, dsr_source_v4(&packet), 3);
            lab.row(Row {
                description: description.into(),
                link: CLIENT_LINK,
                input,
                expect: Expect::Forward(XdpAction::Redirect, output),
                counted: Counted::Forwarded { new_flow },
            });
        }
        let packet = Packet::syn(client6(40000), vip6());
        let input = packet.bytes();
        let output = ip6ip6(&input, dsr_source_v6(&packet), 3);
        lab.row(Row {
            description: "DSR v6: outer IPv6 header, next header 41, outer dst = backend, inner \
                          packet unchanged"
                .into(),
            link: CLIENT_LINK,
            input,
            expect: Expect::Forward(XdpAction::Redirect, output),
            counted: Counted::Forwarded { new_flow: true },
        });
    });
}

#[test]
fn non_service_traffic_is_passed_unchanged() {
    lab("pass", settings(), |lab| {
        lab.apply(&[
            nat_tcp(vip(), vec![up(b4(2))]),
            nat_tcp(vip6(), vec![up(b6(2))]),
        ]);
        lab.passed(
            "TCP to the VIP on a port without a service",
            CLIENT_LINK,
            Packet::syn(client(40000), v4(VIP_V4, 22)).bytes(),
        );
        lab.passed(
            "UDP to the VIP's TCP service port",
            CLIENT_LINK,
            Packet::udp(client(40000), vip()).bytes(),
        );
        lab.passed(
            "TCP to the LB's own address (SSH)",
            CLIENT_LINK,
            Packet::syn(client(40000), v4(LB_CLIENT_V4, 22)).bytes(),
        );
        lab.passed(
            "IPv6 TCP to the VIP on a port without a service",
            CLIENT_LINK,
            Packet::syn(client6(40000), v6(VIP_V6, 22)).bytes(),
        );
        let mut echo = Vec::new();
        PacketBuilder::ethernet2(CLIENT_MAC, LB_CLIENT_MAC)
            .ipv4(CLIENT_V4.octets(), VIP_V4.octets(), 64)
            .icmpv4_echo_request(1, 1)
            .write(&mut echo, b"ping")
            .expect("ICMP echo frame");
        lab.passed("ICMP echo request to the VIP", CLIENT_LINK, echo);
        lab.passed("ARP request", CLIENT_LINK, arp_request());
        lab.passed(
            "IPv6 TCP to the service behind a hop-by-hop options header (extension headers \
             are not followed)",
            CLIENT_LINK,
            with_ipv6_extension(
                Packet::syn(client6(40000), vip6()).bytes(),
                IPV6_HOP_BY_HOP,
                [1, 4, 0, 0, 0, 0],
            ),
        );
        lab.passed(
            "a backend's segment to the NAT address from outside the NAT port range (the LB's \
             own connections, e.g. health checks)",
            BACKEND_LINK,
            Packet::tcp(b4(2), nat4(45000)).sent_by_backend(2).bytes(),
        );
    });
}

#[test]
fn blocked_sources_are_dropped_and_counted() {
    lab("block", settings(), |lab| {
        lab.apply(&[
            nat_tcp(vip(), vec![up(b4(2))]),
            nat_tcp(vip6(), vec![up(b6(2))]),
        ]);
        lab.maps.block("10.200.66.0/24");
        lab.maps.block("fd00:200:66::/64");
        let blocked = v4(Ipv4Addr::new(10, 200, 66, 7), 40000);
        let blocked6 = v6(Ipv6Addr::new(0xfd00, 0x200, 0x66, 0, 0, 0, 0, 7), 40000);
        lab.dropped(
            "source in a blocked /24, to the service",
            Packet::syn(blocked, vip()).bytes(),
            Counted::Drop(DropReason::Blocked),
        );
        lab.dropped(
            "source in a blocked /24, a segment of no flow (looked up first, then dropped)",
            Packet::tcp(blocked, vip()).bytes(),
            Counted::Drop(DropReason::Blocked),
        );
        lab.dropped(
            "source in a blocked /24, UDP to the service",
            Packet::udp(blocked, vip()).bytes(),
            Counted::Drop(DropReason::Blocked),
        );
        lab.dropped(
            "source in a blocked /24, to the LB itself (dropped before anything else)",
            Packet::syn(blocked, v4(LB_CLIENT_V4, 22)).bytes(),
            Counted::Drop(DropReason::Blocked),
        );
        lab.dropped(
            "source in a blocked /64, to the service",
            Packet::syn(blocked6, vip6()).bytes(),
            Counted::Drop(DropReason::Blocked),
        );
        lab.new_nat_flow(
            "source just outside the blocked /24 is served".into(),
            &Packet::syn(v4(Ipv4Addr::new(10, 200, 67, 7), 40000), vip()),
            b4(2),
        );
        lab.new_nat_flow(
            "source just outside the blocked /64 is served".into(),
            &Packet::syn(
                v6(Ipv6Addr::new(0xfd00, 0x200, 0x66, 1, 0, 0, 0, 7), 40000),
                vip6(),
            ),
            b6(2),
        );

        // Tracked flows skip the tries while the blocklist is unchanged: a change reaches them.
        let source = v4(Ipv4Addr::new(10, 200, 68, 7), 40000);
        let port = lab.new_nat_flow(
            "a flow from 10.200.68.7 is established".into(),
            &Packet::syn(source, vip()),
            b4(2),
        );
        let data = Packet::tcp(source, vip());
        lab.established_nat_flow("its next segment".into(), &data, b4(2), port);
        let prefix: ipnet::IpNet = "10.200.68.0/24".parse().expect("a prefix");
        let mut blocklist = Blocklist::open(&pin_dir("block")).expect("the blocklist");
        blocklist.block(prefix, None).expect("blocking");
        lab.dropped(
            "its source is blocked: the established flow's segment is dropped",
            data.bytes(),
            Counted::Drop(DropReason::Blocked),
        );
        lab.dropped(
            "and its segment with TTL 1 is counted as blocked, not as TTL exceeded",
            data.clone().ttl(1).bytes(),
            Counted::Drop(DropReason::Blocked),
        );
        assert!(blocklist.unblock(prefix).expect("unblocking"));
        lab.established_nat_flow(
            "unblocked: the flow carries on, same backend, same NAT port".into(),
            &data,
            b4(2),
            port,
        );
        blocklist
            .unblock("10.200.66.0/24".parse().expect("a prefix"))
            .expect("unblocking");
        blocklist
            .unblock("fd00:200:66::/64".parse().expect("a prefix"))
            .expect("unblocking");
        lab.established_nat_flow(
            "the blocklist is empty: the flow carries on".into(),
            &data,
            b4(2),
            port,
        );
        blocklist.block(prefix, None).expect("blocking");
        lab.dropped(
            "blocked again, from an empty blocklist: dropped",
            data.bytes(),
            Counted::Drop(DropReason::Blocked),
        );
    });
}

/// The pin directory of the fixture instance `tag`.
fn pin_dir(tag: &str) -> std::path::PathBuf {
    std::path::Path::new(DEFAULT_BPFFS).join(instance(tag))
}

#[test]
fn service_without_live_backend_drops_and_counts_no_backend() {
    lab("nobe", settings(), |lab| {
        let empty_vip = v4(VIP_V4, RPC_PORT + 1);
        lab.apply(&[
            nat_tcp(
                vip(),
                vec![
                    backend(b4(2), BackendState::Draining),
                    backend(b4(3), BackendState::Draining),
                ],
            ),
            nat_tcp(empty_vip, vec![]),
        ]);
        lab.dropped(
            "new flow to a service whose backends all drain",
            Packet::syn(client(40000), vip()).bytes(),
            Counted::ServiceDrop(DropReason::NoBackend),
        );
        lab.dropped(
            "new flow to a service without backends",
            Packet::syn(client(40000), empty_vip).bytes(),
            Counted::ServiceDrop(DropReason::NoBackend),
        );
    });
}

#[test]
fn draining_backend_keeps_established_flow_and_gets_no_new_ones() {
    lab("drain", settings(), |lab| {
        lab.apply(&[nat_tcp(vip(), vec![up(b4(2))])]);
        let flow = Packet::syn(client(40000), vip());
        let port = lab.new_nat_flow("flow established on backend 2".into(), &flow, b4(2));

        lab.apply(&[nat_tcp(
            vip(),
            vec![backend(b4(2), BackendState::Draining), up(b4(3))],
        )]);
        lab.established_nat_flow(
            "backend 2 drains: its established flow stays, same NAT port".into(),
            &Packet::tcp(client(40000), vip()),
            b4(2),
            port,
        );
        for client_port in 41000..41008 {
            lab.new_nat_flow(
                format!("backend 2 drains: new flow from port {client_port} goes to backend 3"),
                &Packet::syn(client(client_port), vip()),
                b4(3),
            );
        }

        lab.apply(&[nat_tcp(
            vip(),
            vec![
                backend(b4(2), BackendState::Draining),
                backend(b4(3), BackendState::Draining),
            ],
        )]);
        lab.established_nat_flow(
            "every backend drains: the established flow still goes to backend 2".into(),
            &Packet::tcp(client(40000), vip()),
            b4(2),
            port,
        );
        lab.dropped(
            "every backend drains: a new flow is dropped (no_backend)",
            Packet::syn(client(42000), vip()).bytes(),
            Counted::ServiceDrop(DropReason::NoBackend),
        );
    });
}

#[test]
fn flows_of_a_removed_service_stop_and_carry_on_when_it_returns() {
    lab("svcgone", settings(), |lab| {
        // Keeps backend 2 configured (and its flows tracked) while the service comes and goes.
        let keeper = nat_tcp(v4(VIP_V4, RPC_PORT + 2), vec![up(b4(2))]);
        let other = nat_tcp(v4(VIP_V4, RPC_PORT + 1), vec![up(b4(3))]);
        let nat = nat_tcp(vip(), vec![up(b4(2))]);
        lab.apply(&[keeper.clone(), nat.clone()]);
        let syn = Packet::syn(client(40000), vip());
        let port = lab.new_nat_flow("flow established on backend 2".into(), &syn, b4(2));
        let data = Packet::tcp(client(40000), vip());

        lab.apply(std::slice::from_ref(&keeper));
        lab.passed(
            "the service is removed: its tracked flow's next segment goes to the stack",
            CLIENT_LINK,
            data.bytes(),
        );
        lab.apply(&[keeper.clone(), other.clone()]);
        lab.passed(
            "another service takes the freed id: the old flow's segment still goes to the stack",
            CLIENT_LINK,
            data.bytes(),
        );
        lab.new_nat_flow(
            "the other service balances its own flows".into(),
            &Packet::syn(client(40001), v4(VIP_V4, RPC_PORT + 1)),
            b4(3),
        );

        lab.apply(&[keeper.clone(), other.clone(), nat]);
        for round in ["the service is back under another id", "and again"] {
            lab.established_nat_flow(
                format!("{round}: the tracked flow carries on, same backend, same NAT port"),
                &data,
                b4(2),
                port,
            );
        }
        lab.apply(&[
            keeper,
            other,
            service(vip(), Protocol::Tcp, ForwardingMode::Dsr, vec![up(b4(2))]),
        ]);
        let input = data.bytes();
        let output = ipip_v4(&input, dsr_source_v4(&data), 2);
        lab.row(Row {
            description: "the service turns to DSR: the tracked flow's next segment is \
                          encapsulated to the same backend"
                .into(),
            link: CLIENT_LINK,
            input,
            expect: Expect::Forward(XdpAction::Redirect, output),
            counted: Counted::Forwarded { new_flow: false },
        });
    });
}

#[test]
fn established_flows_stay_when_backends_are_added() {
    lab("add", settings(), |lab| {
        let before = nat_tcp(vip(), vec![up(b4(2))]);
        lab.apply(std::slice::from_ref(&before));
        let flows: Vec<(Packet, u16)> = (40000..40016)
            .map(|client_port| {
                let syn = Packet::syn(client(client_port), vip());
                let port = lab.new_nat_flow(
                    format!("flow from port {client_port} established on backend 2"),
                    &syn,
                    b4(2),
                );
                (syn, port)
            })
            .collect();

        let after = nat_tcp(vip(), vec![up(b4(2)), up(b4(3)), up(b4(4))]);
        lab.apply(std::slice::from_ref(&after));
        let moved = flows
            .iter()
            .filter(|(syn, _)| lab.maps.maglev_choice(&after.key(), &syn.flow_key()) != Some(b4(2)))
            .count();
        assert!(
            moved > 0,
            "the new Maglev table should give some of the 16 flows another backend, or this \
             test shows nothing"
        );
        for (syn, port) in &flows {
            let next = Packet::tcp(syn.src, vip());
            let choice = lab.maps.maglev_choice(&after.key(), &syn.flow_key());
            lab.established_nat_flow(
                format!(
                    "backends 3 and 4 added: flow from port {} stays on backend 2 (the live \
                     table says {choice:?}), same NAT port",
                    syn.src.port()
                ),
                &next,
                b4(2),
                *port,
            );
        }
        let template = Packet::syn(client(0), vip());
        let fresh = lab
            .ports_choosing(&after, &template, b4(3), 50000)
            .next()
            .expect("a port whose flow the table gives backend 3");
        lab.new_nat_flow(
            "a new flow the live table gives backend 3 goes there".into(),
            &Packet::syn(client(fresh), vip()),
            b4(3),
        );
    });
}

#[test]
fn flows_of_a_backend_marked_down_rehash_to_live_backends() {
    lab("down", settings(), |lab| {
        let only_2 = nat_tcp(vip(), vec![up(b4(2))]);
        lab.apply(std::slice::from_ref(&only_2));
        let flows: Vec<(Packet, u16)> = (40000..40008)
            .map(|client_port| {
                let syn = Packet::syn(client(client_port), vip());
                let port = lab.new_nat_flow(
                    format!("flow from port {client_port} established on backend 2"),
                    &syn,
                    b4(2),
                );
                (syn, port)
            })
            .collect();
        let both = nat_tcp(vip(), vec![up(b4(2)), up(b4(3))]);
        lab.apply(std::slice::from_ref(&both));
        let (rehashed, stays): (Vec<_>, Vec<_>) = flows.iter().partition(|(syn, _)| {
            lab.maps.maglev_choice(&both.key(), &syn.flow_key()) == Some(b4(3))
        });
        let (rehashed, _) = rehashed
            .first()
            .expect("one of 8 flows the 2-backend table gives backend 3");
        let (kept, kept_port) = stays
            .first()
            .expect("one of 8 flows the 2-backend table gives backend 2");

        // The kernel's own check, before any purge by userspace: backend 2 is marked down in
        // BACKENDS only (its Maglev entries still exist).
        lab.maps.set_backend_state(b4(2), BACKEND_DOWN);
        let next = Packet::tcp(rehashed.src, vip());
        lab.new_nat_flow(
            "backend 2 marked down (BACKENDS only, flows not purged): its flow re-hashes to \
             backend 3 with a new NAT port"
                .into(),
            &next,
            b4(3),
        );

        lab.apply(&[nat_tcp(
            vip(),
            vec![backend(b4(2), BackendState::Down), up(b4(3))],
        )]);
        let _ = kept_port;
        lab.new_nat_flow(
            "backend 2 down through apply (flows purged, table rebuilt): another of its flows \
             re-hashes to backend 3"
                .into(),
            &Packet::tcp(kept.src, vip()),
            b4(3),
        );
    });
}

/// Userspace writes only the Maglev entries a change moves, and leaves unchanged services alone;
/// after every change, whatever came before it, each service's live table in the kernel is the
/// one built from its `up` backends.
#[test]
fn kernel_tables_follow_every_change_writing_only_what_moved() {
    lab("tables", settings(), |lab| {
        let size = lab.settings.maglev_table_size as usize;
        let rpc = |backends: Vec<BackendSpec>| nat_tcp(vip(), backends);
        let p2p = |backends: Vec<BackendSpec>| nat_tcp(v4(VIP_V4, P2P_PORT), backends);
        let weighted = |n: u8, weight: u32| BackendSpec {
            weight,
            ..up(b4(n))
        };
        let ten: Vec<BackendSpec> = (2..12).map(|n| up(b4(n))).collect();
        let nine_up: Vec<BackendSpec> = (2..12)
            .map(|n| {
                if n == 5 {
                    backend(b4(n), BackendState::Down)
                } else {
                    up(b4(n))
                }
            })
            .collect();
        let heavier: Vec<BackendSpec> = (2..12)
            .map(|n| weighted(n, 1 + u32::from(n == 7)))
            .collect();
        let dsr = |backends| service(vip(), Protocol::Tcp, ForwardingMode::Dsr, backends);
        let udp = |backends| service(vip(), Protocol::Udp, ForwardingMode::Nat, backends);
        let pair = || p2p(vec![up(b4(2)), up(b4(3))]);
        let steps: Vec<(&str, Vec<ServiceSpec>, Written)> = vec![
            (
                "two new services",
                vec![rpc(ten.clone()), pair()],
                Written::Whole(2),
            ),
            (
                "the same again",
                vec![rpc(ten.clone()), pair()],
                Written::Nothing,
            ),
            (
                "one of ten backends down (the other half is new to this process)",
                vec![rpc(nine_up.clone()), pair()],
                Written::Whole(1),
            ),
            (
                "back up (the other half holds that very table)",
                vec![rpc(ten.clone()), pair()],
                Written::OneService { at_most: 0 },
            ),
            (
                "down again",
                vec![rpc(nine_up), pair()],
                Written::OneService { at_most: 0 },
            ),
            (
                "back up, one backend's weight doubled (~8% of entries move from the table of \
                 ten)",
                vec![rpc(heavier.clone()), pair()],
                Written::OneService { at_most: size / 8 },
            ),
            (
                "mode changed, same table: no entry written",
                vec![dsr(heavier.clone()), pair()],
                Written::OneService { at_most: 0 },
            ),
            (
                "a service removed",
                vec![dsr(heavier.clone())],
                Written::Nothing,
            ),
            (
                "a new service takes its id (its halves hold another service's tables)",
                vec![dsr(heavier.clone()), udp(vec![up(b4(4))])],
                Written::Whole(1),
            ),
            (
                "its only backend down",
                vec![dsr(heavier), udp(vec![backend(b4(4), BackendState::Down)])],
                Written::Whole(1),
            ),
        ];
        for (step, services, expected) in steps {
            let report = lab.apply(&services);
            let (changed, entries) = (report.services_changed, report.table_entries_written);
            let as_expected = match expected {
                Written::Nothing => changed == 0 && entries == 0,
                Written::Whole(services) => changed == services && entries == services * size,
                Written::OneService { at_most } => changed == 1 && entries <= at_most,
            };
            assert!(
                as_expected,
                "{step}: {changed} services changed, {entries} entries written; expected \
                 {expected:?} (tables of {size} entries)"
            );
            for service in &services {
                let live: Vec<MaglevBackend> = service
                    .backends
                    .iter()
                    .filter(|backend| backend.state == BackendState::Up)
                    .map(|backend| MaglevBackend {
                        id: lab.maps.backend_id(backend.addr),
                        key: MaglevBackend::socket_addr_key(backend.addr),
                        weight: backend.weight,
                    })
                    .collect();
                let wanted = build_table(&live, size as u32).expect("a valid backend set");
                let in_kernel = lab.maps.live_table(&service.key());
                let differing = wanted
                    .iter()
                    .zip(&in_kernel)
                    .filter(|(a, b)| a != b)
                    .count();
                assert_eq!(
                    differing, 0,
                    "{step}: service {}:{} ({:?}): {differing} of {size} live entries differ from \
                     the table its up backends give",
                    service.vip, service.port, service.protocol
                );
            }
        }
    });
}

/// What a step of `kernel_tables_follow_every_change_writing_only_what_moved` may write.
#[derive(Debug, Clone, Copy)]
enum Written {
    /// No service entry, no table entry.
    Nothing,
    /// This many services, each with a whole half written (one this process never wrote).
    Whole(usize),
    /// One service, with at most this many table entries written.
    OneService { at_most: usize },
}

/// Purging a down backend's flows reads the flow table many entries at a time: every flow of
/// that backend goes and every other flow stays, over several batches of the walk.
#[test]
fn a_down_backend_s_flows_are_purged_from_a_table_of_many() {
    const PER_BACKEND: usize = 5000;
    lab("purge", settings(), |lab| {
        let addrs = [b4(2), b4(3), b4(4)];
        lab.apply(&[nat_tcp(vip(), addrs.iter().copied().map(up).collect())]);
        let ids = addrs.map(|addr| lab.maps.backend_id(addr));
        let service_id = lab.maps.service(&nat_tcp(vip(), vec![]).key()).id as u8;
        let flows: Vec<(FlowKey, Flow)> = (0..PER_BACKEND * ids.len())
            .map(|i| {
                let client = v4(
                    Ipv4Addr::new(10, 200, 50 + (i / 50_000) as u8, 2),
                    1024 + (i % 50_000) as u16,
                );
                let flow = Flow {
                    backend_id: ids[i % ids.len()],
                    hash: 0,
                    nat_port_be: 0,
                    service_id,
                    flags: 0,
                    blocklist_version: 0,
                    last_seen_ns: 0,
                };
                (Packet::tcp(client, vip()).flow_key(), flow)
            })
            .collect();
        lab.maps.insert_flows(&flows);

        let report = lab.apply(&[nat_tcp(
            vip(),
            vec![
                backend(addrs[0], BackendState::Down),
                up(addrs[1]),
                up(addrs[2]),
            ],
        )]);
        assert_eq!(report.flows_purged, PER_BACKEND, "flows purged");
        let left = lab.maps.flows_per_backend();
        let wanted =
            std::collections::BTreeMap::from([(ids[1], PER_BACKEND), (ids[2], PER_BACKEND)]);
        assert_eq!(
            left, wanted,
            "flows left per backend id (backend {} had id {})",
            addrs[0], ids[0]
        );
    });
}

/// Established flows are served from a per-CPU cache of `FLOWS`; no CPU may go on using a
/// copy once the flow's entry is replaced, purged or its NAT port taken over, or its service
/// goes or changes mode. Each step fills one CPU's cache (two packets: the first copies the
/// entry, the second uses the copy), changes the flow on the other CPU or from userspace, and
/// comes back to the first: all within the 25 ticks a copy lasts (the smallest Maglev table
/// keeps `apply` quick), or the copies would expire on their own and the rows could not tell.
#[test]
fn cached_flows_end_with_their_flow_entries_on_every_cpu() {
    let settings = LbSettings {
        maglev_table_size: lb_common::maglev::TABLE_SIZES[0],
        ..settings()
    };
    lab("cache", settings, |lab| {
        let only_2 = nat_tcp(vip(), vec![up(b4(2))]);
        lab.apply(std::slice::from_ref(&only_2));
        let flows: Vec<(Packet, u16)> = (40000..40016)
            .map(|client_port| {
                let syn = Packet::syn(client(client_port), vip());
                let port = lab.new_nat_flow(format!("flow from port {client_port}"), &syn, b4(2));
                (Packet::tcp(client(client_port), vip()), port)
            })
            .collect();
        let both = nat_tcp(vip(), vec![up(b4(2)), up(b4(3))]);
        lab.apply(std::slice::from_ref(&both));
        let moving: Vec<&(Packet, u16)> = flows
            .iter()
            .filter(|(packet, _)| {
                lab.maps.maglev_choice(&both.key(), &packet.flow_key()) == Some(b4(3))
            })
            .collect();
        let [(replaced, replaced_port), (purged, purged_port), ..] = moving[..] else {
            panic!("two of 16 flows the 2-backend table gives backend 3");
        };

        run_on_cpu(0);
        lab.cached_nat_flow("flow A on backend 2", replaced, b4(2), *replaced_port);
        run_on_cpu(1);
        lab.maps.set_backend_state(b4(2), BACKEND_DOWN);
        let moved_port = lab.new_nat_flow(
            "CPU 1: backend 2 down (BACKENDS only): flow A's entry is replaced, on backend 3"
                .into(),
            replaced,
            b4(3),
        );
        lab.maps.set_backend_state(b4(2), BACKEND_UP);
        run_on_cpu(0);
        lab.established_nat_flow(
            "CPU 0, backend 2 up again: flow A stays on backend 3 (CPU 0's copy was cleared)"
                .into(),
            replaced,
            b4(3),
            moved_port,
        );

        lab.cached_nat_flow("flow B on backend 2", purged, b4(2), *purged_port);
        lab.apply(&[nat_tcp(
            vip(),
            vec![backend(b4(2), BackendState::Down), up(b4(3))],
        )]);
        let moved_port = lab.new_nat_flow(
            "backend 2 down through apply (flows purged): flow B re-hashes to backend 3".into(),
            purged,
            b4(3),
        );
        lab.apply(std::slice::from_ref(&both));
        lab.established_nat_flow(
            "backend 2 up again: flow B stays on backend 3 (the purge voided every copy)".into(),
            purged,
            b4(3),
            moved_port,
        );

        // A copy carries its service's mode and backend: changing the mode voids it, and so
        // does removing the service. Both backends stay configured under another service,
        // added beforehand, so neither a purge nor a new service voids the copy instead.
        let keeper = nat_tcp(v4(VIP_V4, RPC_PORT + 2), vec![up(b4(2)), up(b4(3))]);
        lab.apply(&[both.clone(), keeper.clone()]);
        lab.cached_nat_flow("flow B on backend 3", purged, b4(3), moved_port);
        let dsr = service(
            vip(),
            Protocol::Tcp,
            ForwardingMode::Dsr,
            vec![up(b4(2)), up(b4(3))],
        );
        lab.apply(&[dsr, keeper.clone()]);
        let input = purged.bytes();
        let encapsulated = ipip_v4(&input, dsr_source_v4(purged), 3);
        for what in [
            "service turned to DSR: flow B's copy is void, its packet is encapsulated to backend 3",
            "and its new copy, in DSR mode, is served",
        ] {
            lab.row(Row {
                description: what.into(),
                link: CLIENT_LINK,
                input: input.clone(),
                expect: Expect::Forward(XdpAction::Redirect, encapsulated.clone()),
                counted: Counted::Forwarded { new_flow: false },
            });
        }
        lab.apply(std::slice::from_ref(&keeper));
        lab.passed(
            "service removed: flow B's copy is void, its packet finds no service and passes",
            CLIENT_LINK,
            purged.bytes(),
        );
    });
}

/// A flow whose entry the LRU evicted while a CPU still holds a copy: when a new flow takes its
/// NAT port over on another CPU, the copy goes too, so the port is never used by both.
#[test]
fn a_taken_over_nat_port_is_not_used_by_a_cached_copy() {
    lab("takeover", settings(), |lab| {
        lab.apply(&[nat_tcp(vip(), vec![up(b4(2))])]);
        let evicted = Packet::tcp(client(20000), vip());
        run_on_cpu(0);
        let port = lab.new_nat_flow(
            "flow from port 20000 takes NAT port 20000".into(),
            &Packet::syn(client(20000), vip()),
            b4(2),
        );
        lab.cached_nat_flow("its next packets", &evicted, b4(2), port);
        lab.maps.evict_flow(&evicted.flow_key());

        run_on_cpu(1);
        let newcomer = Packet::syn(v4(CLIENT2_V4, 20000), vip());
        let (action, output) = nat_forwarded(&newcomer, 20000, b4(2));
        lab.row(Row {
            description: "CPU 1: a new client takes over port 20000 from the evicted flow".into(),
            link: CLIENT_LINK,
            input: newcomer.bytes(),
            expect: Expect::Forward(action, output),
            counted: Counted::Forwarded { new_flow: true },
        });
        run_on_cpu(0);
        lab.new_nat_flow(
            "CPU 0: the evicted flow's next packet is a new flow on another port (its copy \
             was cleared)"
                .into(),
            &evicted,
            b4(2),
        );
    });
}

#[test]
fn tcp_rst_or_fin_then_syn_on_the_same_tuple_starts_a_new_flow() {
    lab("rst", settings(), |lab| {
        lab.apply(&[nat_tcp(vip(), vec![up(b4(2))])]);
        let flows: Vec<(Packet, u16)> = (40000..40008)
            .map(|client_port| {
                let syn = Packet::syn(client(client_port), vip());
                let port = lab.new_nat_flow(
                    format!("flow from port {client_port} established on backend 2"),
                    &syn,
                    b4(2),
                );
                (syn, port)
            })
            .collect();
        let both = nat_tcp(vip(), vec![up(b4(2)), up(b4(3))]);
        lab.apply(std::slice::from_ref(&both));
        let mut moving = flows
            .iter()
            .filter(|(syn, _)| lab.maps.maglev_choice(&both.key(), &syn.flow_key()) == Some(b4(3)));
        let (reset, reset_port) = moving.next().expect("a flow the new table gives backend 3");
        let (finished, finished_port) = moving
            .next()
            .expect("a second flow the new table gives backend 3");

        lab.established_nat_flow(
            "SYN retransmitted on an open flow stays on its backend".into(),
            reset,
            b4(2),
            *reset_port,
        );
        lab.established_nat_flow(
            "RST goes to the flow's backend and marks the flow closing".into(),
            &reset.clone().flags(TCP_RST),
            b4(2),
            *reset_port,
        );
        lab.new_nat_flow(
            "SYN after RST on the same 5-tuple is a new flow: the live table's backend 3".into(),
            reset,
            b4(3),
        );

        lab.established_nat_flow(
            "FIN goes to the flow's backend and marks the flow closing".into(),
            &Packet::tcp(finished.src, vip()).flags(TCP_FIN | TCP_ACK),
            b4(2),
            *finished_port,
        );
        lab.established_nat_flow(
            "the last ACK of a closing flow still goes to its backend".into(),
            &Packet::tcp(finished.src, vip()).flags(TCP_ACK),
            b4(2),
            *finished_port,
        );
        lab.new_nat_flow(
            "SYN after FIN on the same 5-tuple is a new flow".into(),
            finished,
            b4(3),
        );
    });
}

#[test]
fn fragments_to_a_vip_are_dropped_or_passed_by_setting() {
    let services = [
        nat_tcp(vip(), vec![up(b4(2))]),
        nat_tcp(vip6(), vec![up(b6(2))]),
    ];
    lab("frag", settings(), |lab| {
        lab.apply(&services);
        let later = Packet::tcp(client(40000), vip()).fragment(185, false);
        let middle = Packet::tcp(client(40000), vip()).fragment(185, true);
        let first = Packet::tcp(client(40000), vip()).fragment(0, true);
        let v6_fragment = with_ipv6_extension(
            Packet::tcp(client6(40000), vip6()).bytes(),
            IPV6_FRAGMENT,
            [0, 1, 0, 0, 0, 7],
        );
        lab.dropped(
            "non-first (last) IPv4 fragment to a VIP",
            later.bytes(),
            Counted::Drop(DropReason::Fragment),
        );
        lab.dropped(
            "non-first (middle) IPv4 fragment to a VIP",
            middle.bytes(),
            Counted::Drop(DropReason::Fragment),
        );
        lab.dropped(
            "first IPv4 fragment (MF set) to a service",
            first.bytes(),
            Counted::ServiceDrop(DropReason::Fragment),
        );
        lab.dropped(
            "IPv6 fragment to a VIP",
            v6_fragment.clone(),
            Counted::Drop(DropReason::Fragment),
        );
        lab.passed(
            "non-first IPv4 fragment to another address",
            CLIENT_LINK,
            Packet::tcp(client(40000), v4(LB_CLIENT_V4, 22))
                .fragment(185, false)
                .bytes(),
        );

        let flow = Packet::syn(client(40001), vip());
        let port = lab.new_nat_flow("a flow to reply to".into(), &flow, b4(2));
        lab.row(Row {
            description: "first fragment (MF set) of a backend's reply: not translated alone \
                          (its later fragments cannot be)"
                .into(),
            link: BACKEND_LINK,
            input: Packet::tcp(b4(2), nat4(port))
                .fragment(0, true)
                .sent_by_backend(2)
                .bytes(),
            expect: Expect::NotForwarded,
            counted: Counted::Unchecked,
        });

        lab.settings.pass_fragments = true;
        lab.apply(&services);
        lab.passed(
            "pass_fragments: non-first IPv4 fragment to a VIP goes to the stack",
            CLIENT_LINK,
            later.bytes(),
        );
        lab.passed(
            "pass_fragments: first IPv4 fragment to a service goes to the stack",
            CLIENT_LINK,
            first.bytes(),
        );
        lab.passed(
            "pass_fragments: IPv6 fragment to a VIP goes to the stack",
            CLIENT_LINK,
            v6_fragment,
        );
    });
}

#[test]
fn ttl_or_hop_limit_of_one_is_dropped() {
    lab("ttl", settings(), |lab| {
        lab.apply(&[
            nat_tcp(vip(), vec![up(b4(2))]),
            nat_tcp(vip6(), vec![up(b6(2))]),
        ]);
        let expiring = Packet::syn(client(40000), vip()).ttl(1);
        lab.dropped(
            "IPv4 TTL 1 to a service: dropped (ttl_exceeded), not counted as forwarded",
            expiring.bytes(),
            Counted::ServiceDrop(DropReason::TtlExceeded),
        );
        let expiring6 = Packet::syn(client6(40000), vip6()).ttl(1);
        lab.dropped(
            "IPv6 hop limit 1 to a service: dropped (ttl_exceeded), not counted as forwarded",
            expiring6.bytes(),
            Counted::ServiceDrop(DropReason::TtlExceeded),
        );
        for packet in [&expiring, &expiring6] {
            assert_eq!(
                lab.maps.flow(&packet.flow_key()),
                None,
                "a packet dropped for its TTL must claim no flow entry (nor a NAT port)"
            );
        }
        let flow = Packet::syn(client(40001), vip()).ttl(2);
        let port = lab.new_nat_flow("IPv4 TTL 2: forwarded with TTL 1".into(), &flow, b4(2));
        lab.row(Row {
            description: "reply with TTL 1: dropped (ttl_exceeded, no service)".into(),
            link: BACKEND_LINK,
            input: Packet::tcp(b4(2), nat4(port))
                .ttl(1)
                .sent_by_backend(2)
                .bytes(),
            expect: Expect::Drop,
            counted: Counted::Drop(DropReason::TtlExceeded),
        });
    });
}

#[test]
fn frames_too_short_for_their_headers_are_never_forwarded() {
    lab("short", settings(), |lab| {
        lab.apply(&[
            nat_tcp(vip(), vec![up(b4(2))]),
            nat_tcp(vip6(), vec![up(b6(2))]),
        ]);
        let syn = Packet::syn(client(40000), vip()).bytes();
        let syn6 = Packet::syn(client6(40000), vip6()).bytes();
        let cut = with_ipv4_total_len(syn.clone(), 30)[..L3 + 30].to_vec();
        lab.passed(
            "TCP header cut short: IPv4 total length 30, frame ends there",
            CLIENT_LINK,
            cut.clone(),
        );
        let mut padded = cut;
        padded.resize(60, 0);
        lab.row(Row {
            description: "the same, padded with zeros to Ethernet's 60-byte minimum (the \
                          padding is no TCP header)"
                .into(),
            link: CLIENT_LINK,
            input: padded,
            expect: Expect::NotForwarded,
            counted: Counted::Unchecked,
        });
        lab.row(Row {
            description: "IPv4 total length 30 (shorter than IP + TCP headers), the frame \
                          still carries the whole segment"
                .into(),
            link: CLIENT_LINK,
            input: with_ipv4_total_len(syn.clone(), 30),
            expect: Expect::NotForwarded,
            counted: Counted::Unchecked,
        });
        lab.passed(
            "IPv4 total length beyond the end of the frame",
            CLIENT_LINK,
            with_ipv4_total_len(syn.clone(), 1500),
        );
        lab.passed(
            "IPv4 total length shorter than its own header",
            CLIENT_LINK,
            with_ipv4_total_len(syn.clone(), 16),
        );
        lab.passed(
            "IPv4 IHL 4 (shorter than the minimum header)",
            CLIENT_LINK,
            fix_ipv4_checksum(with_bytes(syn.clone(), L3, &[0x44])),
        );
        lab.passed(
            "IPv4 header cut short",
            CLIENT_LINK,
            syn[..L3 + 12].to_vec(),
        );
        let cut6 = with_bytes(syn6.clone(), L3 + 4, &10u16.to_be_bytes())[..L3 + 50].to_vec();
        lab.passed(
            "TCP header cut short: IPv6 payload length 10, frame ends there",
            CLIENT_LINK,
            cut6,
        );
        lab.row(Row {
            description: "IPv6 payload length 10 for TCP, the frame still carries the whole \
                          segment"
                .into(),
            link: CLIENT_LINK,
            input: with_bytes(syn6.clone(), L3 + 4, &10u16.to_be_bytes()),
            expect: Expect::NotForwarded,
            counted: Counted::Unchecked,
        });
        lab.passed(
            "IPv6 payload length beyond the end of the frame",
            CLIENT_LINK,
            with_bytes(syn6, L3 + 4, &1500u16.to_be_bytes()),
        );
    });
}

#[test]
fn ipv4_options_are_kept_on_forwarded_packets() {
    lab("opts", settings(), |lab| {
        lab.apply(&[nat_tcp(vip(), vec![up(b4(2))])]);
        lab.new_nat_flow(
            "IPv4 with 4 bytes of options (IHL 6): forwarded with the options intact".into(),
            &Packet::syn(client(40000), vip()).ipv4_options(&[1, 1, 1, 0]),
            b4(2),
        );
        let mut longest = vec![1u8; 39];
        longest.push(0);
        lab.new_nat_flow(
            "IPv4 with 40 bytes of options (IHL 15): forwarded with the options intact".into(),
            &Packet::tcp(client(40001), vip()).ipv4_options(&longest),
            b4(2),
        );
    });
}

#[test]
fn icmp_errors_for_tracked_flows_are_passed_untranslated() {
    lab("icmp", settings(), |lab| {
        lab.apply(&[nat_tcp(vip(), vec![up(b4(2))])]);
        let flow = Packet::syn(client(40000), vip());
        let port = lab.new_nat_flow("a tracked flow".into(), &flow, b4(2));

        // The first 28 bytes of the packet the error is about, as ICMP quotes it.
        let quote = |packet: &Packet| packet.bytes()[L3..L3 + 28].to_vec();
        let mut from_router = Vec::new();
        PacketBuilder::ethernet2(CLIENT_MAC, LB_CLIENT_MAC)
            .ipv4(ROUTER_V4.octets(), VIP_V4.octets(), 64)
            .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
                DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 },
            ))
            .write(&mut from_router, &quote(&Packet::tcp(vip(), flow.src)))
            .expect("ICMP frame");
        lab.passed(
            "ICMP fragmentation needed from a router, about the VIP's segment to the client: \
             passed to the stack, not translated",
            CLIENT_LINK,
            from_router,
        );
        let mut from_backend = Vec::new();
        PacketBuilder::ethernet2(backend_mac(2), LB_BACKEND_MAC)
            .ipv4(backend_v4(2).octets(), NAT_SOURCE_V4.octets(), 64)
            .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
                DestUnreachableHeader::Port,
            ))
            .write(&mut from_backend, &quote(&Packet::tcp(nat4(port), b4(2))))
            .expect("ICMP frame");
        lab.passed(
            "ICMP port unreachable from the backend to the NAT address, about the flow: passed \
             to the stack, not translated",
            BACKEND_LINK,
            from_backend,
        );
    });
}

#[test]
fn nat_ports_exhausted_after_eight_probes_drops_and_counts() {
    let settings = LbSettings {
        nat_ports: 20000..=20001,
        ..settings()
    };
    lab("ports", settings, |lab| {
        lab.apply(&[nat_tcp(vip(), vec![up(b4(2))])]);
        lab.new_nat_flow(
            "first flow takes its client port 20000".into(),
            &Packet::syn(client(20000), vip()),
            b4(2),
        );
        lab.new_nat_flow(
            "second flow takes its client port 20001".into(),
            &Packet::syn(v4(CLIENT2_V4, 20001), vip()),
            b4(2),
        );
        lab.dropped(
            "third flow: both ports of the range are taken towards this backend, 8 probes \
             fail (nat_ports_exhausted)",
            Packet::syn(v4(CLIENT2_V4, 20000), vip()).bytes(),
            Counted::ServiceDrop(DropReason::NatPortsExhausted),
        );
    });
}

#[test]
fn nat_ports_come_back_from_reopened_and_purged_flows() {
    let settings = LbSettings {
        nat_ports: 20000..=20001,
        ..settings()
    };
    lab("reclaim", settings, |lab| {
        let service = |state| nat_tcp(vip(), vec![backend(b4(2), state)]);
        lab.apply(&[service(BackendState::Up)]);
        let first = lab.new_nat_flow(
            "first flow takes its client port 20000".into(),
            &Packet::syn(client(20000), vip()),
            b4(2),
        );
        lab.new_nat_flow(
            "second flow takes its client port 20001: the range is full".into(),
            &Packet::syn(v4(CLIENT2_V4, 20001), vip()),
            b4(2),
        );
        lab.established_nat_flow(
            "the first flow's RST goes out on its port and closes the flow".into(),
            &Packet::tcp(client(20000), vip()).flags(TCP_RST),
            b4(2),
            first,
        );
        let reopened = Packet::syn(client(20000), vip());
        let (action, output) = nat_forwarded(&reopened, first, b4(2));
        lab.row(Row {
            description: "a SYN reopening the closed 5-tuple is a new flow on its own old port"
                .into(),
            link: CLIENT_LINK,
            input: reopened.bytes(),
            expect: Expect::Forward(action, output),
            counted: Counted::Forwarded { new_flow: true },
        });
        // Marking the backend down purges its flows; their NAT ports become free for others.
        lab.apply(&[service(BackendState::Down)]);
        lab.apply(&[service(BackendState::Up)]);
        let newcomer = Packet::syn(v4(CLIENT2_V4, 20000), vip());
        let (action, output) = nat_forwarded(&newcomer, 20000, b4(2));
        lab.row(Row {
            description: "after a purge, a new client takes over port 20000 from the purged flow"
                .into(),
            link: CLIENT_LINK,
            input: newcomer.bytes(),
            expect: Expect::Forward(action, output),
            counted: Counted::Forwarded { new_flow: true },
        });
    });
}

#[test]
fn a_closed_connection_s_nat_port_is_held_from_other_clients() {
    let settings = LbSettings {
        nat_ports: 20000..=20001,
        ..settings()
    };
    // Well past the last ACKs' 0.5 s, well within the 61 s hold.
    let a_while = std::time::Duration::from_secs(10);
    lab("hold", settings, |lab| {
        lab.apply(&[nat_tcp(vip(), vec![up(b4(2))])]);
        let first = Packet::syn(client(20000), vip());
        lab.new_nat_flow(
            "the first client's flow takes port 20000".into(),
            &first,
            b4(2),
        );
        let closing = Packet::tcp(client(20000), vip()).flags(TCP_RST);
        lab.established_nat_flow("its RST closes the flow".into(), &closing, b4(2), 20000);
        lab.maps.age_flow(&first.flow_key(), a_while);
        // Its port 20000 is the other client's first choice too; the model skips it as used.
        let second = Packet::syn(v4(CLIENT2_V4, 20000), vip());
        let port = lab.new_nat_flow(
            "another client's SYN 10 s later passes over the held port 20000 (the backend is \
             in TIME_WAIT for it) and takes the free 20001"
                .into(),
            &second,
            b4(2),
        );
        assert_eq!(port, 20001, "the free port of the two");
        let (action, output) = nat_forwarded(&first, 20000, b4(2));
        lab.row(Row {
            description: "the first client reconnecting from the same port takes 20000 at once"
                .into(),
            link: CLIENT_LINK,
            input: first.bytes(),
            expect: Expect::Forward(action, output),
            counted: Counted::Forwarded { new_flow: true },
        });
        lab.established_nat_flow("it closes again".into(), &closing, b4(2), 20000);
        let third = Packet::syn(client(20002), vip());
        lab.dropped(
            "a third flow right after: one port live, the other closed just now: \
             nat_ports_exhausted",
            third.bytes(),
            Counted::ServiceDrop(DropReason::NatPortsExhausted),
        );
        lab.maps.age_flow(&first.flow_key(), a_while);
        let (action, output) = nat_forwarded(&third, 20000, b4(2));
        lab.row(Row {
            description: "the third flow 10 s later: with no port free, the one closed for \
             longer than its last ACKs need is reused rather than the SYN dropped"
                .into(),
            link: CLIENT_LINK,
            input: third.bytes(),
            expect: Expect::Forward(action, output),
            counted: Counted::Forwarded { new_flow: true },
        });
    });
}

#[test]
fn a_backend_s_new_mac_address_is_used_within_the_route_cache_time() {
    lab("macmove", settings(), |lab| {
        lab.apply(&[nat_tcp(vip(), vec![up(b4(2))])]);
        let first = Packet::syn(client(40000), vip());
        let port = lab.new_nat_flow(
            "the route to backend 2 is looked up and cached".into(),
            &first,
            b4(2),
        );
        let segment = Packet::tcp(client(40000), vip());
        for description in [
            "the flow's next segment: its flow-cache copy takes the route",
            "and the one after: it goes by the copy's route",
        ] {
            lab.established_nat_flow(description.into(), &segment, b4(2), port);
        }
        // The backend's host is replaced: same address, new MAC.
        let new_mac = [0x02, 0, 0, 0, 0x10, 0x99];
        lab.net.neighbour(b4(2).ip(), new_mac, BACKEND_LINK);
        let ingress = lab.net.ifindex(CLIENT_LINK);
        let goes_to_new_mac = |packet: &Packet| {
            let verdict = lab.run_from(ingress, &packet.bytes());
            verdict.output.get(..6) == Some(&new_mac[..])
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut client_port = 40001;
        // New flows (the route cache) and the established flow (its copy's route) both move.
        loop {
            let new_flow_moved = goes_to_new_mac(&Packet::syn(client(client_port), vip()));
            if new_flow_moved && goes_to_new_mac(&segment) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "packets to backend 2 (new flows: {new_flow_moved}) still go to its old MAC 5 s \
                 after the neighbour changed (cached routes must be refreshed within a second)"
            );
            client_port += 1;
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    });
}

#[test]
fn a_client_s_new_mac_address_is_used_for_replies_within_the_route_cache_time() {
    lab("clientmac", settings(), |lab| {
        lab.apply(&[nat_tcp(vip(), vec![up(b4(2))])]);
        let syn = Packet::syn(client(40000), vip());
        let port = lab.new_nat_flow("a flow to backend 2".into(), &syn, b4(2));
        let reply = Packet::tcp(b4(2), nat4(port))
            .flags(TCP_SYN | TCP_ACK)
            .sent_by_backend(2);
        for round in [
            "the route to the client is looked up and cached",
            "and used",
        ] {
            lab.row(Row {
                description: format!("reply: {round}"),
                link: BACKEND_LINK,
                input: reply.bytes(),
                expect: Expect::Forward(XdpAction::Redirect, nat_reply(&reply, &syn)),
                counted: Counted::Nothing,
            });
        }
        // The client's host is replaced: same address, new MAC.
        let new_mac = [0x02, 0, 0, 0, 0x01, 0x99];
        lab.net.neighbour(client(40000).ip(), new_mac, CLIENT_LINK);
        let ingress = lab.net.ifindex(BACKEND_LINK);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let verdict = lab.run_from(ingress, &reply.bytes());
            assert_eq!(
                verdict.action,
                XdpAction::Redirect,
                "the reply is forwarded"
            );
            if verdict.output.get(..6) == Some(&new_mac[..]) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "replies to the client still go to its old MAC 5 s after the neighbour changed \
                 (the cached route must be refreshed within a second)"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    });
}

#[test]
fn backend_without_route_or_neighbour_is_dropped_no_route() {
    lab("route", settings(), |lab| {
        let vip2 = v4(VIP_V4, RPC_PORT + 1);
        lab.apply(&[
            nat_tcp(vip(), vec![up(b4(9))]),
            nat_tcp(vip2, vec![up(v4(Ipv4Addr::new(10, 200, 99, 2), RPC_PORT))]),
        ]);
        lab.dropped(
            "backend on the backend link without a resolved neighbour: dropped (no_route), \
             not counted as forwarded",
            Packet::syn(client(40000), vip()).bytes(),
            Counted::ServiceDrop(DropReason::NoRoute),
        );
        lab.dropped(
            "backend without a route: dropped (no_route), not counted as forwarded",
            Packet::syn(client(40000), vip2).bytes(),
            Counted::ServiceDrop(DropReason::NoRoute),
        );
    });
}

#[test]
fn service_key_helpers_agree_with_the_program() {
    // The fixtures compute Maglev choices from the maps with `ServiceSpec::key`; a wrong key
    // would make the multi-backend rows vacuous.
    let spec = nat_tcp(vip(), vec![]);
    let key: ServiceKey = spec.key();
    assert_eq!(key.vip[..4], VIP_V4.octets());
    assert_eq!(u16::from_be(key.port_be), RPC_PORT);
    assert_eq!(key.proto, 6);
}

/// The gateway's port in the second chance rows.
const GATEWAY_PORT: u16 = 8443;

#[test]
fn gateway_segments_without_a_socket_go_to_the_previous_owner_during_second_chance() {
    lab("second", settings(), |lab| {
        lab.apply(&[nat_tcp(vip(), vec![up(b4(2))])]);
        // The gateway listens on the LB's client address, and one connection to it is this
        // host's own: a socket of the fixture namespace.
        let gateway = v4(LB_CLIENT_V4, GATEWAY_PORT);
        let listener = std::net::TcpListener::bind(gateway).expect("the gateway's listener");
        let own = std::net::TcpStream::connect(gateway).expect("a connection of this host's own");
        let own_client = own.local_addr().expect("its client address");
        // The previous owner, reached over the backend link (backend 3's neighbour entry).
        let previous_owner = b4(3).ip();
        let pin_dir = pin_dir("second");
        let mut second_chance = SecondChanceMap::open(&pin_dir, SecondChanceMode::Handover)
            .expect("the SECOND_CHANCE map");
        let segment = Packet::tcp(client(40000), gateway);
        lab.passed(
            "before a handover, a gateway segment without a socket goes to the stack",
            CLIENT_LINK,
            segment.bytes(),
        );

        second_chance
            .arm_for(gateway, previous_owner, Duration::from_secs(60))
            .expect("arming second chance");
        let (action, lb_mac, owner_mac) = next_hop(previous_owner);
        lab.row(Row {
            description: "a gateway segment of a connection this host has no socket for (only \
                          the listener) goes to the previous owner, unchanged but for its MACs"
                .into(),
            link: CLIENT_LINK,
            input: segment.bytes(),
            expect: Expect::Forward(action, segment.clone().macs(lb_mac, owner_mac).bytes()),
            counted: Counted::Nothing,
        });
        lab.passed(
            "a SYN to the gateway opens a connection here",
            CLIENT_LINK,
            Packet::syn(client(40001), gateway).bytes(),
        );
        lab.passed(
            "a segment of this host's own connection to the gateway stays here",
            CLIENT_LINK,
            Packet::tcp(own_client, gateway).bytes(),
        );
        lab.passed(
            "a segment to another port of the gateway's address goes to the stack",
            CLIENT_LINK,
            Packet::tcp(client(40000), v4(LB_CLIENT_V4, 22)).bytes(),
        );
        lab.passed(
            "a gateway segment that came from the previous owner's side is not sent back there",
            BACKEND_LINK,
            segment.clone().sent_by_backend(3).bytes(),
        );

        let gateway6 = v6(Ipv6Addr::new(0xfd00, 0x200, 1, 0, 0, 0, 0, 1), GATEWAY_PORT);
        second_chance
            .arm_for(gateway6, b6(3).ip(), Duration::from_secs(60))
            .expect("arming second chance for IPv6");
        let segment6 = Packet::tcp(client6(40000), gateway6);
        let (action, lb_mac, owner_mac) = next_hop(b6(3).ip());
        lab.row(Row {
            description: "an IPv6 gateway segment without a socket goes to the previous owner"
                .into(),
            link: CLIENT_LINK,
            input: segment6.bytes(),
            expect: Expect::Forward(action, segment6.clone().macs(lb_mac, owner_mac).bytes()),
            counted: Counted::Nothing,
        });
        lab.passed(
            "an IPv4 segment to the port goes to the stack while second chance is for IPv6",
            CLIENT_LINK,
            segment.bytes(),
        );

        second_chance
            .arm_for(gateway, previous_owner, Duration::ZERO)
            .expect("arming an expired second chance");
        lab.passed(
            "once second chance has ended, the segment goes to the stack (which resets it)",
            CLIENT_LINK,
            segment.bytes(),
        );
        assert_eq!(
            read_second_chance_packets(&pin_dir, SecondChanceMode::Handover)
                .expect("SECOND_CHANCE_PACKETS"),
            2,
            "the segments sent to the previous owner are counted"
        );
        drop((own, listener));
    });
}

#[test]
fn gateway_connections_go_to_the_other_host_while_no_gateway_listens_here() {
    lab("standing", settings(), |lab| {
        lab.apply(&[nat_tcp(vip(), vec![up(b4(2))])]);
        let gateway = v4(LB_CLIENT_V4, GATEWAY_PORT);
        // The other host of the pair, reached over the backend link (backend 3's neighbour).
        let other_host = b4(3).ip();
        let pin_dir = pin_dir("standing");
        let mut standing = SecondChanceMap::open(&pin_dir, SecondChanceMode::Standing)
            .expect("the STANDING_SECOND_CHANCE map");
        let syn = Packet::syn(client(40000), gateway);
        let segment = Packet::tcp(client(40001), gateway);
        lab.passed(
            "unarmed, a SYN to a gateway that does not listen goes to the stack (which resets it)",
            CLIENT_LINK,
            syn.bytes(),
        );

        // The admin API listens at the gateway's address too (on every address, say).
        let admin = v4(LB_CLIENT_V4, 9900);
        standing
            .arm(gateway, Some(admin.port()), other_host)
            .expect("arming the standing second chance");
        let (action, lb_mac, peer_mac) = next_hop(other_host);
        let to_other_host = |packet: &Packet| {
            Expect::Forward(action, packet.clone().macs(lb_mac, peer_mac).bytes())
        };
        lab.row(Row {
            description: "while nothing listens on the gateway's port (lb-control down), a SYN \
                          goes to the other host, unchanged but for its MACs"
                .into(),
            link: CLIENT_LINK,
            input: syn.bytes(),
            expect: to_other_host(&syn),
            counted: Counted::Nothing,
        });
        lab.row(Row {
            description: "... and so do the segments of that connection, having no socket here"
                .into(),
            link: CLIENT_LINK,
            input: segment.bytes(),
            expect: to_other_host(&segment),
            counted: Counted::Nothing,
        });
        let admin_syn = Packet::syn(client(40002), admin);
        lab.row(Row {
            description: "... and so does a SYN to the admin API's port while it does not \
                          listen either"
                .into(),
            link: CLIENT_LINK,
            input: admin_syn.bytes(),
            expect: to_other_host(&admin_syn),
            counted: Counted::Nothing,
        });
        lab.passed(
            "a SYN to another port of the gateway's address goes to the stack",
            CLIENT_LINK,
            Packet::syn(client(40000), v4(LB_CLIENT_V4, 22)).bytes(),
        );
        lab.passed(
            "a SYN that came from the other host's side is not sent back there",
            BACKEND_LINK,
            syn.clone().sent_by_backend(3).bytes(),
        );

        // lb-control is back: its gateway listens, and has a connection of its own.
        let listener = std::net::TcpListener::bind(gateway).expect("the gateway's listener");
        let admin_listener = std::net::TcpListener::bind(admin).expect("the admin listener");
        let own = std::net::TcpStream::connect(gateway).expect("a connection of this host's own");
        let own_client = own.local_addr().expect("its client address");
        lab.passed(
            "once the gateway listens, a SYN opens the connection here",
            CLIENT_LINK,
            syn.bytes(),
        );
        lab.passed(
            "once the admin API listens, its SYN opens the connection here",
            CLIENT_LINK,
            admin_syn.bytes(),
        );
        lab.passed(
            "a segment of no connection here goes to the stack, which resets it (the other \
             host may have died with it: sent there, its client would hang)",
            CLIENT_LINK,
            segment.bytes(),
        );
        lab.passed(
            "a segment of this host's own connection stays here",
            CLIENT_LINK,
            Packet::tcp(own_client, gateway).bytes(),
        );
        drop((own, listener, admin_listener));

        let gateway6 = v6(Ipv6Addr::new(0xfd00, 0x200, 1, 0, 0, 0, 0, 1), GATEWAY_PORT);
        standing
            .arm(gateway6, None, b6(3).ip())
            .expect("arming the standing second chance for IPv6");
        let syn6 = Packet::syn(client6(40000), gateway6);
        let (action, lb_mac, peer_mac) = next_hop(b6(3).ip());
        lab.row(Row {
            description: "an IPv6 SYN to a gateway that does not listen goes to the other host"
                .into(),
            link: CLIENT_LINK,
            input: syn6.bytes(),
            expect: Expect::Forward(action, syn6.clone().macs(lb_mac, peer_mac).bytes()),
            counted: Counted::Nothing,
        });
        lab.passed(
            "an IPv4 SYN goes to the stack while the entry is for IPv6",
            CLIENT_LINK,
            syn.bytes(),
        );

        standing.disarm().expect("disarming");
        lab.passed(
            "disarmed (a clean stop), the SYN goes to the stack again",
            CLIENT_LINK,
            syn6.bytes(),
        );
        assert_eq!(
            read_second_chance_packets(&pin_dir, SecondChanceMode::Standing)
                .expect("STANDING_SECOND_CHANCE_PACKETS"),
            4,
            "the packets sent to the other host are counted"
        );
        assert_eq!(
            read_second_chance_packets(&pin_dir, SecondChanceMode::Handover)
                .expect("SECOND_CHANCE_PACKETS"),
            0,
            "under the standing second chance, not a handover's"
        );
    });
}
