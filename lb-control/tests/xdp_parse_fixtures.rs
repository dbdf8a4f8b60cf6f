//! Packet fixtures for the XDP program's parser, run through BPF_PROG_TEST_RUN: each row is a
//! frame, the stats slot it must be counted in, and the verdict. Today every frame is passed
//! unchanged (no service is configured); the load balancer's rows (NAT, DSR, drops) are in
//! `xdp_lb_fixtures.rs`.

mod fixtures;

use etherparse::{
    IpFragOffset, IpHeaders, Ipv4Header, Ipv4Options, PacketBuilder, PacketBuilderStep, VlanId,
};
use lb_common::stats::ProtoSlot;
use lb_control::dataplane::{ProgramHarness, XdpAction};

use self::fixtures::{L3, load_harness, with_bytes};

const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const CLIENT_V4: [u8; 4] = [10, 200, 1, 2];
const NODE_V4: [u8; 4] = [10, 200, 10, 2];
const CLIENT_V6: [u8; 16] = [0xfd, 0, 0x02, 0, 0, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const NODE_V6: [u8; 16] = [0xfd, 0, 0x02, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const RPC_PORT: u16 = 9944;
const PAYLOAD: &[u8] = b"{\"id\":1,\"jsonrpc\":\"2.0\",\"method\":\"system_health\"}";

struct Fixture {
    description: &'static str,
    frame: Vec<u8>,
    slot: ProtoSlot,
}

fn ethernet() -> PacketBuilderStep<etherparse::Ethernet2Header> {
    PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
}

fn ipv4_header(options: &[u8], fragment_offset: u16) -> IpHeaders {
    let mut header = Ipv4Header::new(0, 64, etherparse::IpNumber::TCP, CLIENT_V4, NODE_V4)
        .expect("valid IPv4 header");
    header.options = Ipv4Options::try_from(options).expect("valid IPv4 options");
    header.fragment_offset = IpFragOffset::try_new(fragment_offset).expect("valid offset");
    IpHeaders::Ipv4(header, Default::default())
}

fn write(builder: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut frame = Vec::new();
    builder(&mut frame);
    frame
}

fn ipv4_tcp() -> Vec<u8> {
    write(|frame| {
        ethernet()
            .ipv4(CLIENT_V4, NODE_V4, 64)
            .tcp(40000, RPC_PORT, 1, 64240)
            .syn()
            .write(frame, PAYLOAD)
            .expect("build frame")
    })
}

fn ipv6_tcp() -> Vec<u8> {
    write(|frame| {
        ethernet()
            .ipv6(CLIENT_V6, NODE_V6, 64)
            .tcp(40000, RPC_PORT, 1, 64240)
            .write(frame, PAYLOAD)
            .expect("build frame")
    })
}

fn fixtures() -> Vec<Fixture> {
    let vlan = VlanId::try_new(100).expect("valid VLAN id");
    vec![
        Fixture {
            description: "IPv4 TCP SYN to an RPC port",
            frame: ipv4_tcp(),
            slot: ProtoSlot::Ipv4Tcp,
        },
        Fixture {
            description: "IPv4 UDP datagram",
            frame: write(|frame| {
                ethernet()
                    .ipv4(CLIENT_V4, NODE_V4, 64)
                    .udp(40000, 30333)
                    .write(frame, PAYLOAD)
                    .expect("build frame")
            }),
            slot: ProtoSlot::Ipv4Udp,
        },
        Fixture {
            description: "IPv4 ICMP echo request",
            frame: write(|frame| {
                ethernet()
                    .ipv4(CLIENT_V4, NODE_V4, 64)
                    .icmpv4_echo_request(1, 1)
                    .write(frame, b"ping")
                    .expect("build frame")
            }),
            slot: ProtoSlot::Ipv4Other,
        },
        Fixture {
            description: "IPv4 TCP behind one 802.1Q tag",
            frame: write(|frame| {
                ethernet()
                    .single_vlan(vlan)
                    .ipv4(CLIENT_V4, NODE_V4, 64)
                    .tcp(40000, RPC_PORT, 1, 64240)
                    .write(frame, PAYLOAD)
                    .expect("build frame")
            }),
            slot: ProtoSlot::Ipv4Tcp,
        },
        Fixture {
            description: "IPv6 UDP behind one 802.1Q tag",
            frame: write(|frame| {
                ethernet()
                    .single_vlan(vlan)
                    .ipv6(CLIENT_V6, NODE_V6, 64)
                    .udp(40000, 30333)
                    .write(frame, PAYLOAD)
                    .expect("build frame")
            }),
            slot: ProtoSlot::Ipv6Udp,
        },
        Fixture {
            description: "IPv4 TCP with 4 bytes of IP options (IHL 6)",
            frame: write(|frame| {
                ethernet()
                    .ip(ipv4_header(&[1, 1, 1, 0], 0))
                    .tcp(40000, RPC_PORT, 1, 64240)
                    .write(frame, PAYLOAD)
                    .expect("build frame")
            }),
            slot: ProtoSlot::Ipv4Tcp,
        },
        Fixture {
            description: "IPv4 non-first fragment: no transport header to read",
            frame: write(|frame| {
                ethernet()
                    .ip(ipv4_header(&[], 185))
                    .tcp(40000, RPC_PORT, 1, 64240)
                    .write(frame, PAYLOAD)
                    .expect("build frame")
            }),
            slot: ProtoSlot::Ipv4Other,
        },
        Fixture {
            description: "IPv6 TCP",
            frame: ipv6_tcp(),
            slot: ProtoSlot::Ipv6Tcp,
        },
        Fixture {
            description: "IPv6 ICMPv6 echo request",
            frame: write(|frame| {
                ethernet()
                    .ipv6(CLIENT_V6, NODE_V6, 64)
                    .icmpv6_echo_request(1, 1)
                    .write(frame, b"ping")
                    .expect("build frame")
            }),
            slot: ProtoSlot::Ipv6Other,
        },
        Fixture {
            description: "ARP request",
            frame: {
                let mut frame = [0u8; 42].to_vec();
                frame[..6].copy_from_slice(&[0xff; 6]);
                frame[6..12].copy_from_slice(&CLIENT_MAC);
                frame[12..14].copy_from_slice(&[0x08, 0x06]);
                frame
            },
            slot: ProtoSlot::NonIp,
        },
        Fixture {
            description: "IPv4 header cut short",
            frame: ipv4_tcp()[..L3 + 12].to_vec(),
            slot: ProtoSlot::Malformed,
        },
        Fixture {
            description: "IPv4 TCP header cut short",
            frame: ipv4_tcp()[..L3 + 20 + 10].to_vec(),
            slot: ProtoSlot::Malformed,
        },
        Fixture {
            description: "IPv4 with IHL 4 (shorter than the minimum header)",
            frame: with_bytes(ipv4_tcp(), L3, &[0x44]),
            slot: ProtoSlot::Malformed,
        },
        Fixture {
            description: "IPv4 total length beyond the end of the frame",
            frame: with_bytes(ipv4_tcp(), L3 + 2, &[0x05, 0xdc]),
            slot: ProtoSlot::Malformed,
        },
        Fixture {
            description: "IPv4 total length shorter than its own header",
            frame: with_bytes(ipv4_tcp(), L3 + 2, &[0x00, 0x10]),
            slot: ProtoSlot::Malformed,
        },
        Fixture {
            description: "EtherType IPv4 carrying version 6",
            frame: with_bytes(ipv4_tcp(), L3, &[0x65]),
            slot: ProtoSlot::Malformed,
        },
        Fixture {
            description: "IPv6 header cut short",
            frame: ipv6_tcp()[..L3 + 30].to_vec(),
            slot: ProtoSlot::Malformed,
        },
        Fixture {
            description: "IPv6 payload length beyond the end of the frame",
            frame: with_bytes(ipv6_tcp(), L3 + 4, &[0x05, 0xdc]),
            slot: ProtoSlot::Malformed,
        },
        Fixture {
            description: "802.1Q tag cut short",
            frame: write(|frame| {
                ethernet()
                    .single_vlan(vlan)
                    .ipv4(CLIENT_V4, NODE_V4, 64)
                    .tcp(40000, RPC_PORT, 1, 64240)
                    .write(frame, PAYLOAD)
                    .expect("build frame")
            })[..16]
                .to_vec(),
            slot: ProtoSlot::Malformed,
        },
    ]
}

fn harness(tag: &str) -> ProgramHarness {
    load_harness(tag)
}

#[test]
fn every_fixture_is_passed_unchanged_and_counted_in_its_slot() {
    let harness = harness("parse");
    for fixture in fixtures() {
        let before = harness.proto_stats().expect("read stats");
        let verdict = harness
            .run(&fixture.frame)
            .unwrap_or_else(|error| panic!("{}: test run failed: {error}", fixture.description));
        let after = harness.proto_stats().expect("read stats");

        assert_eq!(verdict.action, XdpAction::Pass, "{}", fixture.description);
        assert_eq!(
            verdict.output, fixture.frame,
            "{}: the frame was modified",
            fixture.description
        );
        for slot in ProtoSlot::ALL {
            let grew = after.by_slot[slot.name()].packets - before.by_slot[slot.name()].packets;
            let expected = u64::from(slot == fixture.slot);
            assert_eq!(
                grew,
                expected,
                "{}: slot {} counted {grew} packets, expected {expected} (the frame belongs in {})",
                fixture.description,
                slot.name(),
                fixture.slot.name()
            );
        }
        let bytes =
            after.by_slot[fixture.slot.name()].bytes - before.by_slot[fixture.slot.name()].bytes;
        assert_eq!(
            bytes,
            fixture.frame.len() as u64,
            "{}: bytes counted",
            fixture.description
        );
    }
}

#[test]
fn counters_accumulate_over_repeated_frames() {
    let harness = harness("repeat");
    let frame = ipv6_tcp();
    for _ in 0..10 {
        harness.run(&frame).expect("test run");
    }
    let counted = harness.proto_stats().expect("read stats").by_slot[ProtoSlot::Ipv6Tcp.name()];
    assert_eq!(counted.packets, 10);
    assert_eq!(counted.bytes, 10 * frame.len() as u64);
}
