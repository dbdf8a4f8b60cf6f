//! `cargo xtask bench xdp`: nanoseconds per packet of the XDP load balancer, measured by the
//! kernel (BPF_PROG_TEST_RUN), beside two reference programs in the same run: the bare
//! parse-and-XDP_PASS program the goal names (`xdp_parse_pass`: the load balancer's own
//! parser, then XDP_PASS) and an empty `xdp_pass` (the test-run harness alone).
//!
//! Runs as root in a network namespace of its own (the forwarding paths call
//! `bpf_fib_lookup`, which needs real links and neighbours): the packet fixtures' namespace.
//!
//! Several methods, because BPF_PROG_TEST_RUN's `repeat` runs the program again and again on the
//! same buffer without restoring it: after the first run a NAT-rewritten packet is no longer
//! the client's packet (it is addressed to the backend and takes the pass path), and a DSR
//! packet keeps its outer header (and its head moves further each run). So:
//!
//! - *repeat*: `repeat` runs in one call, the kernel's mean, for frames the program leaves
//!   unchanged (passed, blocked, bare XDP_PASS). The median of several rounds.
//! - *loop*: the established NAT path and the NAT reply path with `repeat`, on a service built so
//!   that the rewrite gives back the same packet: its backend is the VIP itself and the client is
//!   the NAT source address, with a client port in the NAT range (so the NAT port is the client's
//!   port). Every run does all the work of an established flow (flow and backend lookups,
//!   rewrite with checksum updates, next hop (the flow-cache copy's route; the reply path asks
//!   the FIB), MACs, redirect); only the TTL goes down, so a call is at most 250 runs, starting
//!   from TTL 255. The median of many calls. Its flow comes from the CPU's flow cache (a busy
//!   flow's steady state); the same loop with SYN and ACK set, segments the cache leaves out,
//!   takes the flow from `FLOWS` (the LRU hash map) on every run: the cache-miss row.
//! - *marginal*: the cost of one more run of a loop, from calls of two lengths run in turn,
//!   [`LOOP_REPEAT`] and [`SHORT_LOOP`] runs: (250 t_250 - 25 t_25) / 225 over the medians of the
//!   per-call means. A call's first runs are slow (after the syscall the kernel re-points its
//!   XDP dispatcher and the program finds its code and maps out of the caches: a few
//!   microseconds a call for the load balancer, which touches some 80 cache lines, under one
//!   for the bare program), and a 250-run loop spreads that over only 250 packets; the
//!   difference leaves it out, which is the steady state a busy interface sees. Measured the
//!   same way for the bare program, as the yardstick.
//! - *single*: one run per call on a fresh copy of the frame, the median of many calls. The
//!   kernel's time then includes one clock read and the loop around the program, and the caches
//!   are colder after the syscall; the bare program measured the same way shows the fixed part,
//!   and "net" subtracts it (the single-run bare time minus the repeat bare time).
//!
//! New flows: each single run sends a SYN of a 5-tuple never seen before (distinct client
//! ports), so every run takes the whole new-flow path: Maglev lookup, NAT port allocation with
//! its reverse-entry insert, flow insert, rewrite, FIB.

#[path = "../tests/fixtures/mod.rs"]
mod fixtures;

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use lb_control::{
    dataplane::{
        BackendSpec, DEFAULT_BPFFS, DataplaneError, LbSettings, ProgramHarness, ReferenceProgram,
        SecondChanceMap, SecondChanceMode, ServiceSpec, TestVerdict, XdpAction,
    },
    model::{BackendState, ForwardingMode, Protocol},
};

use self::fixtures::*;

const TAG: &str = "bench";
/// The loop service: its backend is its own VIP, reached over the backend link.
const LOOP_VIP: Ipv4Addr = Ipv4Addr::new(10, 200, 100, 2);
/// The NAT source address in this benchmark, and the loop's client: not an address of the LB's
/// namespace, so the loop's replies (addressed to it) have a next hop.
const NAT_SOURCE: Ipv4Addr = Ipv4Addr::new(10, 200, 100, 3);
/// Runs per call of a loop: a TTL of 255 allows 254 forwards.
const LOOP_REPEAT: u32 = 250;
/// Runs per call of the short loop the marginal cost is taken against.
const SHORT_LOOP: u32 = 25;
/// Backends per service.
const BACKENDS: u8 = 4;

struct Options {
    repeat: u32,
    rounds: usize,
    singles: usize,
    out: Option<PathBuf>,
}

fn parse_options() -> Result<Options, String> {
    let mut options = Options {
        repeat: 1_000_000,
        rounds: 5,
        singles: 20_000,
        out: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--repeat" => options.repeat = number(&value("--repeat")?)?,
            "--rounds" => options.rounds = number(&value("--rounds")?)?,
            "--singles" => options.singles = number(&value("--singles")?)?,
            "--out" => options.out = Some(PathBuf::from(value("--out")?)),
            "--help" | "-h" => {
                return Err("usage: bench_xdp [--repeat N (1000000)] [--rounds N (5)] \
                            [--singles N (20000)] [--out FILE.md]"
                    .to_owned());
            }
            other => return Err(format!("unknown argument {other}; try --help")),
        }
    }
    if options.repeat == 0 || options.rounds == 0 || options.singles == 0 {
        return Err("--repeat, --rounds and --singles must be positive".to_owned());
    }
    Ok(options)
}

fn number<T: std::str::FromStr>(text: &str) -> Result<T, String> {
    text.parse()
        .map_err(|_| format!("{text:?} is not a positive number"))
}

fn main() -> ExitCode {
    let options = match parse_options() {
        Ok(options) => options,
        Err(message) => {
            eprintln!("bench_xdp: {message}");
            return ExitCode::FAILURE;
        }
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "bench_xdp: BPF_PROG_TEST_RUN and network namespaces need root: run `sudo cargo \
             xtask bench xdp`"
        );
        return ExitCode::FAILURE;
    }
    let started = Instant::now();
    let report = in_fixture_net(TAG, |net| run(net, &options));
    let report = match report {
        Ok(report) => report,
        Err(message) => {
            eprintln!("bench_xdp: {message}");
            return ExitCode::FAILURE;
        }
    };
    print!("{report}");
    println!("(took {:.1} s)", started.elapsed().as_secs_f64());
    if let Some(out) = &options.out {
        if let Some(dir) = out.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        if let Err(error) = std::fs::write(out, &report) {
            eprintln!("bench_xdp: writing {}: {error}", out.display());
            return ExitCode::FAILURE;
        }
        println!("wrote {}", out.display());
    }
    ExitCode::SUCCESS
}

/// One measured path.
struct Row {
    path: &'static str,
    method: &'static str,
    ns: f64,
    note: String,
}

fn settings() -> LbSettings {
    LbSettings {
        nat_source_v4: Some(NAT_SOURCE),
        nat_source_v6: Some(NAT_SOURCE_V6),
        // Wide enough that 20 000 new flows over 4 backends fill an eighth of it: about one
        // probe per flow, as in steady operation.
        nat_ports: 20000..=59999,
        nat_port_hold: std::time::Duration::from_secs(61),
        dsr_source_v4: DSR_SOURCE_V4,
        dsr_source_v6: DSR_SOURCE_V6,
        maglev_table_size: lb_common::maglev::DEFAULT_TABLE_SIZE,
        pass_fragments: false,
    }
}

fn service(vip: SocketAddr, mode: ForwardingMode, backends: Vec<SocketAddr>) -> ServiceSpec {
    ServiceSpec {
        vip: vip.ip(),
        port: vip.port(),
        protocol: Protocol::Tcp,
        mode,
        backends: backends
            .into_iter()
            .map(|addr| BackendSpec {
                addr,
                weight: 1,
                state: BackendState::Up,
            })
            .collect(),
    }
}

fn run(net: &FixtureNet, options: &Options) -> Result<String, String> {
    let mut harness = load_harness(TAG);
    let maps = PinnedMaps::new(TAG);
    let bare =
        ReferenceProgram::bare_pass().map_err(|error| format!("loading xdp-pass: {error}"))?;
    let parse_pass = ReferenceProgram::parse_pass()
        .map_err(|error| format!("loading xdp-parse-pass: {error}"))?;

    net.ip("route add 10.200.100.0/24 dev eth1");
    net.neighbour(IpAddr::V4(LOOP_VIP), backend_mac(100), BACKEND_LINK);
    net.neighbour(IpAddr::V4(NAT_SOURCE), backend_mac(101), BACKEND_LINK);
    let loop_vip = v4(LOOP_VIP, RPC_PORT);
    let vip = v4(VIP_V4, RPC_PORT);
    let dsr_vip = v4(VIP_V4, RPC_PORT + 1);
    let vip6 = v6(VIP_V6, RPC_PORT);
    let backends = |family: fn(u8) -> IpAddr| -> Vec<SocketAddr> {
        (2..2 + BACKENDS)
            .map(|n| SocketAddr::new(family(n), RPC_PORT))
            .collect()
    };
    let services = vec![
        service(vip, ForwardingMode::Nat, backends(|n| backend_v4(n).into())),
        service(
            dsr_vip,
            ForwardingMode::Dsr,
            backends(|n| backend_v4(n).into()),
        ),
        service(
            vip6,
            ForwardingMode::Nat,
            backends(|n| backend_v6(n).into()),
        ),
        service(loop_vip, ForwardingMode::Nat, vec![loop_vip]),
    ];
    harness
        .apply(&settings(), &services)
        .map_err(|error| format!("applying services: {error}"))?;
    maps.block("10.200.66.0/24");

    let client_link = net.ifindex(CLIENT_LINK);
    let backend_link = net.ifindex(BACKEND_LINK);
    let established = Packet::tcp(v4(CLIENT_V4, 40000), vip).bytes();
    let established_dsr = Packet::tcp(v4(CLIENT_V4, 40000), dsr_vip).bytes();
    let established6 = Packet::tcp(v6(CLIENT_V6, 40000), vip6).bytes();
    let passed = Packet::tcp(v4(CLIENT_V4, 40000), v4(LB_CLIENT_V4, 22)).bytes();
    let blocked = Packet::tcp(v4(Ipv4Addr::new(10, 200, 66, 7), 40000), vip).bytes();
    let blocked_syn = Packet::syn(v4(Ipv4Addr::new(10, 200, 66, 7), 40000), vip).bytes();

    // Open the flows, and learn the NAT flow's backend and port for its reply.
    let first = expect(
        &harness,
        client_link,
        &established,
        XdpAction::Redirect,
        "the first packet of the NAT flow",
    )?;
    for (frame, what) in [
        (&established_dsr, "the first packet of the DSR flow"),
        (&established6, "the first packet of the IPv6 NAT flow"),
    ] {
        expect(&harness, client_link, frame, XdpAction::Redirect, what)?;
    }
    let (backend, nat_port) = nat_destination(&first)?;
    let n = match backend.ip() {
        IpAddr::V4(addr) => addr.octets()[3],
        IpAddr::V6(_) => unreachable!("an IPv4 flow"),
    };
    let reply = Packet::tcp(backend, v4(NAT_SOURCE, nat_port))
        .sent_by_backend(n)
        .bytes();
    expect(
        &harness,
        backend_link,
        &reply,
        XdpAction::Redirect,
        "the NAT reply",
    )?;
    expect(
        &harness,
        client_link,
        &passed,
        XdpAction::Pass,
        "the passed packet",
    )?;
    expect(
        &harness,
        client_link,
        &blocked,
        XdpAction::Drop,
        "the blocked packet",
    )?;
    expect(
        &harness,
        client_link,
        &blocked_syn,
        XdpAction::Drop,
        "the blocked SYN",
    )?;

    // The loop: forward and reply frames that the program turns into themselves.
    let loop_forward = Packet::tcp(v4(NAT_SOURCE, 25000), loop_vip)
        .ttl(255)
        .bytes();
    let loop_forward_uncached = Packet::tcp(v4(NAT_SOURCE, 25000), loop_vip)
        .flags(TCP_SYN | TCP_ACK)
        .ttl(255)
        .bytes();
    let loop_reply = Packet::tcp(loop_vip, v4(NAT_SOURCE, 25000))
        .ttl(255)
        .bytes();
    expect(
        &harness,
        client_link,
        &loop_forward,
        XdpAction::Redirect,
        "the loop's first packet",
    )?;
    // Each call with more than one run re-points the kernel's XDP dispatcher twice (tens of
    // ms), so loops get fewer calls than the repeat rows get runs.
    let loop_calls = options.rounds * 20;
    let looped = |frame: &[u8], what: &str| {
        loop_runs(loop_calls, what, true, |repeat| {
            harness.run_repeated(frame, Some(client_link), repeat)
        })
    };

    let mut rows = Vec::new();
    let lb_repeated = |frame: &[u8], action: XdpAction| {
        repeated(options, action, |repeat| {
            harness.run_repeated(frame, Some(client_link), repeat)
        })
    };
    // Each reference program: repeat, loop and marginal rows, from the same frame.
    let mut reference = |program: &ReferenceProgram, path: &'static str, note: &str| {
        let repeat = repeated(options, XdpAction::Pass, |repeat| {
            program.run_repeated(&established, Some(client_link), repeat)
        })?;
        let loops = loop_runs(loop_calls, path, false, |repeat| {
            program.run_repeated(&established, Some(client_link), repeat)
        })?;
        rows.push(Row {
            path,
            method: "repeat",
            ns: repeat,
            note: note.into(),
        });
        rows.push(Row {
            path,
            method: "loop",
            ns: loops.long,
            note: format!(
                "{LOOP_REPEAT} runs a call, as the loops below; a call's warm-up: {:.1} us",
                loops.warm_up_us()
            ),
        });
        rows.push(Row {
            path,
            method: "marginal",
            ns: loops.marginal(),
            note: "one more run, warm-up left out".into(),
        });
        Ok::<_, String>((repeat, loops))
    };
    let (bare_repeat, bare_loop) = reference(
        &bare,
        "bare xdp_pass (reference)",
        "returns XDP_PASS, reads nothing",
    )?;
    let (_, parse_pass_loop) = reference(
        &parse_pass,
        "bare parse-and-XDP_PASS (reference)",
        "the load balancer's parser (Ethernet, VLAN, IPv4/IPv6, ports), then XDP_PASS",
    )?;
    let passed_repeat = lb_repeated(&passed, XdpAction::Pass)?;
    rows.push(Row {
        path: "passed packet (TCP to the LB's own address)",
        method: "repeat",
        ns: passed_repeat,
        note: "parse, count, NAT-reply check, flow lookup, blocklist, service lookup, XDP_PASS"
            .into(),
    });
    // A gateway segment (to a port of no service) on a member of an HA pair: the standing
    // second chance looks its socket up, this host's own connection, and passes it.
    let gateway = v4(LB_CLIENT_V4, 8443);
    let gateway_listener = std::net::TcpListener::bind(gateway)
        .map_err(|error| format!("the gateway's listener: {error}"))?;
    let own = std::net::TcpStream::connect(gateway)
        .map_err(|error| format!("a gateway connection: {error}"))?;
    let own_client = own
        .local_addr()
        .map_err(|error| format!("its address: {error}"))?;
    let gateway_segment = Packet::tcp(own_client, gateway).bytes();
    rows.push(Row {
        path: "gateway segment, no pair",
        method: "repeat",
        ns: lb_repeated(&gateway_segment, XdpAction::Pass)?,
        note: "as a passed packet (the second chance entries read, none armed)".into(),
    });
    SecondChanceMap::open(
        &std::path::Path::new(DEFAULT_BPFFS).join(instance(TAG)),
        SecondChanceMode::Standing,
    )
    .and_then(|mut standing| standing.arm(gateway, None, backend_v4(3).into()))
    .map_err(|error| format!("arming the standing second chance: {error}"))?;
    rows.push(Row {
        path: "gateway segment on an HA pair member",
        method: "repeat",
        ns: lb_repeated(&gateway_segment, XdpAction::Pass)?,
        note: "the same, the standing second chance armed: plus its socket lookup \
               (bpf_skc_lookup_tcp), which finds the connection"
            .into(),
    });
    drop((own, gateway_listener));
    rows.push(Row {
        path: "blocked packet (source in a blocked /24)",
        method: "repeat",
        ns: lb_repeated(&blocked, XdpAction::Drop)?,
        note: "parse, count, flow lookup (a TCP segment may be tracked), blocklist hit, drop \
               counted"
            .into(),
    });
    rows.push(Row {
        path: "blocked SYN (source in a blocked /24)",
        method: "repeat",
        ns: lb_repeated(&blocked_syn, XdpAction::Drop)?,
        note: "parse, count, blocklist hit, drop counted".into(),
    });

    let established_loop = looped(&loop_forward, "established loop")?;
    rows.push(Row {
        path: "established flow, NAT v4",
        method: "loop",
        ns: established_loop.long,
        note: format!(
            "flow, backend, mode and route from this CPU's flow cache, rewrite, checksums, \
             redirect; a call's warm-up: {:.1} us",
            established_loop.warm_up_us()
        ),
    });
    rows.push(Row {
        path: "established flow, NAT v4",
        method: "marginal",
        ns: established_loop.marginal(),
        note: "one more run, warm-up left out".into(),
    });
    // The same flow's segments with SYN and ACK set: the flow cache leaves out segments that
    // may change a flow, so each run looks the flow up in FLOWS (and is otherwise the same
    // established path: a SYN-ACK neither reopens nor closes a flow).
    let uncached_loop = looped(&loop_forward_uncached, "established loop, flow-cache miss")?;
    rows.push(Row {
        path: "established flow, NAT v4, flow-cache miss",
        method: "loop",
        ns: uncached_loop.long,
        note: format!(
            "as above with the flow from FLOWS (LRU hash map) instead of this CPU's flow cache, \
             its backend from BACKENDS, its route from the route cache; a call's warm-up: \
             {:.1} us",
            uncached_loop.warm_up_us()
        ),
    });
    rows.push(Row {
        path: "established flow, NAT v4, flow-cache miss",
        method: "marginal",
        ns: uncached_loop.marginal(),
        note: "one more run, warm-up left out".into(),
    });
    let reply_loop = looped(&loop_reply, "reply loop")?;
    rows.push(Row {
        path: "reply path, NAT v4",
        method: "loop",
        ns: reply_loop.long,
        note: format!(
            "NAT reverse lookup, rewrite, checksums, FIB, redirect; a call's warm-up: {:.1} us",
            reply_loop.warm_up_us()
        ),
    });
    rows.push(Row {
        path: "reply path, NAT v4",
        method: "marginal",
        ns: reply_loop.marginal(),
        note: "one more run, warm-up left out".into(),
    });

    let singles = |ingress: u32, frame: &[u8], action: XdpAction, what: &str| {
        single_runs(options.singles, action, what, |_| {
            harness.run_repeated(frame, Some(ingress), 1)
        })
    };
    let bare_single = single_runs(options.singles, XdpAction::Pass, "bare", |_| {
        bare.run_repeated(&established, Some(client_link), 1)
    })?;
    let overhead = (bare_single - bare_repeat).max(0.0);
    rows.push(Row {
        path: "bare xdp_pass (reference)",
        method: "single",
        ns: bare_single,
        note: format!("the single-run floor: {overhead:.1} ns above repeat"),
    });
    let passed_single = singles(client_link, &passed, XdpAction::Pass, "passed")?;
    rows.push(Row {
        path: "passed packet (TCP to the LB's own address)",
        method: "single",
        ns: passed_single,
        note: format!("net {:.1} ns", passed_single - overhead),
    });
    let established_single = singles(
        client_link,
        &established,
        XdpAction::Redirect,
        "established",
    )?;
    rows.push(Row {
        path: "established flow, NAT v4",
        method: "single",
        ns: established_single,
        note: format!("net {:.1} ns", established_single - overhead),
    });
    let established6_single = singles(
        client_link,
        &established6,
        XdpAction::Redirect,
        "established v6",
    )?;
    rows.push(Row {
        path: "established flow, NAT v6",
        method: "single",
        ns: established6_single,
        note: format!("net {:.1} ns", established6_single - overhead),
    });
    let dsr_single = singles(
        client_link,
        &established_dsr,
        XdpAction::Redirect,
        "established DSR",
    )?;
    rows.push(Row {
        path: "established flow, DSR v4 (IPIP)",
        method: "single",
        ns: dsr_single,
        note: format!("net {:.1} ns", dsr_single - overhead),
    });
    let reply_single = singles(backend_link, &reply, XdpAction::Redirect, "reply")?;
    rows.push(Row {
        path: "reply path, NAT v4",
        method: "single",
        ns: reply_single,
        note: format!("net {:.1} ns", reply_single - overhead),
    });
    let syns: Vec<Vec<u8>> = (0..options.singles)
        .map(|i| {
            // Client ports outside the NAT range: the port is found by hashed probes.
            let port = 60000 + (i % 5000) as u16;
            let client = Ipv4Addr::new(10, 200, 2 + (i / 5000) as u8, 2);
            Packet::syn(v4(client, port), vip).bytes()
        })
        .collect();
    let new_flow_single = single_runs(options.singles, XdpAction::Redirect, "new flow", |i| {
        harness.run_repeated(&syns[i], Some(client_link), 1)
    })?;
    rows.push(Row {
        path: "new flow, NAT v4 (SYN of an unseen 5-tuple)",
        method: "single",
        ns: new_flow_single,
        note: format!("net {:.1} ns", new_flow_single - overhead),
    });

    let tracked_flows = maps.flows_per_backend().values().sum();
    let tables = table_changes(&mut harness, services, options.rounds * 4)?;

    let established_net = established_loop.long;
    let established_marginal = established_loop.marginal();
    let bare_marginal = bare_loop.marginal();
    let parse_pass_marginal = parse_pass_loop.marginal();
    let mut report = String::new();
    let _ = writeln!(
        report,
        "# XDP load balancer: ns per packet (BPF_PROG_TEST_RUN)\n"
    );
    let _ = writeln!(
        report,
        "Kernel {}, {} CPUs. repeat: {} runs per call, median of {} rounds. loop: {LOOP_REPEAT} \
         runs per call, median of {} calls. marginal: the cost of one more run, from loops of \
         {LOOP_REPEAT} and {SHORT_LOOP} runs in turn. single: one run per call, median of {} \
         calls (new flows: {} distinct SYNs). Frames: 54-103 bytes; services with {BACKENDS} \
         backends, Maglev M = 65537, one blocked /24. Methods: see \
         lb-control/examples/bench_xdp.rs.\n",
        kernel_release(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        options.repeat,
        options.rounds,
        loop_calls,
        options.singles,
        options.singles,
    );
    let _ = writeln!(report, "| path | method | ns/packet | |");
    let _ = writeln!(report, "|---|---|---:|---|");
    for row in &rows {
        let _ = writeln!(
            report,
            "| {} | {} | {:.1} | {} |",
            row.path, row.method, row.ns, row.note
        );
    }
    let _ = writeln!(report);
    let _ = writeln!(
        report,
        "Single-run times include the test-run loop's clock reads; \"net\" subtracts the bare \
         program's single-run excess over its repeat time ({overhead:.1} ns).\n"
    );
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    let _ = writeln!(
        report,
        "Goal, established flow <= 100 ns: loop {established_net:.1} ns -> {}; marginal \
         {established_marginal:.1} ns -> {} (single runs: {established_single:.1} raw, {:.1} \
         net).",
        met(established_net <= 100.0),
        met(established_marginal <= 100.0),
        established_single - overhead,
    );
    let _ = writeln!(
        report,
        "Goal, established flow <= 3x the bare parse-and-XDP_PASS program: loop {:.1}x its loop \
         ({:.1} ns) -> {}; marginal {:.1}x its marginal ({parse_pass_marginal:.1} ns) -> {}.",
        established_net / parse_pass_loop.long,
        parse_pass_loop.long,
        met(established_net / parse_pass_loop.long <= 3.0),
        established_marginal / parse_pass_marginal,
        met(established_marginal / parse_pass_marginal <= 3.0),
    );
    let _ = writeln!(
        report,
        "Beside the empty XDP_PASS (the test-run harness alone): loop {:.1}x its loop ({:.1} \
         ns); marginal {:.1}x its marginal ({bare_marginal:.1} ns); loop {:.1}x its repeat \
         ({bare_repeat:.1} ns). And {:.1}x the load balancer's own pass path ({passed_repeat:.1} \
         ns).",
        established_net / bare_loop.long,
        bare_loop.long,
        established_marginal / bare_marginal,
        established_net / bare_repeat,
        established_net / passed_repeat,
    );
    tables.write(&mut report, tracked_flows);
    Ok(report)
}

/// Backends of the service whose table changes are timed: the Maglev paper's case.
const TABLE_BACKENDS: u8 = 100;

/// How long a change of the backend set takes to reach the kernel, for a service of
/// [`TABLE_BACKENDS`] backends at M = 65537 beside the benchmark's other services: the Maglev
/// build alone, and `apply` (build, write the inactive half, flip), as lb-control runs it on
/// every change. Milliseconds and Maglev entries written, medians of `changes`.
struct TableChanges {
    changes: usize,
    build_ms: f64,
    first: (f64, usize),
    down: (f64, usize),
    up: (f64, usize),
    unchanged: (f64, usize),
}

/// Applies of one kind: their milliseconds and Maglev entries written.
#[derive(Default)]
struct Applies {
    ms: Vec<f64>,
    entries: Vec<f64>,
}

impl Applies {
    fn push(&mut self, (ms, entries): (f64, usize)) {
        self.ms.push(ms);
        self.entries.push(entries as f64);
    }

    fn medians(mut self) -> (f64, usize) {
        (median(&mut self.ms), median(&mut self.entries) as usize)
    }
}

fn table_changes(
    harness: &mut ProgramHarness,
    mut services: Vec<ServiceSpec>,
    changes: usize,
) -> Result<TableChanges, String> {
    let vip = v4(VIP_V4, P2P_PORT);
    let all: Vec<SocketAddr> = (2..2 + TABLE_BACKENDS)
        .map(|n| v4(backend_v4(n), P2P_PORT))
        .collect();
    let table_service = |down: Option<SocketAddr>| {
        let mut spec = service(vip, ForwardingMode::Nat, all.clone());
        for backend in &mut spec.backends {
            if Some(backend.addr) == down {
                backend.state = BackendState::Down;
            }
        }
        spec
    };
    let maglev_backends: Vec<lb_common::maglev::MaglevBackend> = all
        .iter()
        .zip(0..)
        .map(|(addr, id)| lb_common::maglev::MaglevBackend {
            id,
            key: lb_common::maglev::MaglevBackend::socket_addr_key(*addr),
            weight: 1,
        })
        .collect();
    let mut builds = Vec::with_capacity(changes);
    for _ in 0..changes {
        let started = Instant::now();
        lb_common::maglev::build_table(&maglev_backends, lb_common::maglev::DEFAULT_TABLE_SIZE)
            .map_err(|error| format!("building a Maglev table: {error}"))?;
        builds.push(started.elapsed().as_secs_f64() * 1e3);
    }
    services.push(table_service(None));
    let mut apply = |services: &[ServiceSpec]| {
        let started = Instant::now();
        let report = harness
            .apply(&settings(), services)
            .map_err(|error| format!("applying a table change: {error}"))?;
        Ok::<_, String>((
            started.elapsed().as_secs_f64() * 1e3,
            report.table_entries_written,
        ))
    };
    let first = apply(&services)?;
    let [mut down, mut up, mut unchanged] = [(); 3].map(|_| Applies::default());
    for change in 0..changes {
        // A different backend each time, so both halves keep changing.
        let backend = all[change * 7 % all.len()];
        *services.last_mut().expect("the table service") = table_service(Some(backend));
        down.push(apply(&services)?);
        *services.last_mut().expect("the table service") = table_service(None);
        up.push(apply(&services)?);
        unchanged.push(apply(&services)?);
    }
    Ok(TableChanges {
        changes,
        build_ms: median(&mut builds),
        first,
        down: down.medians(),
        up: up.medians(),
        unchanged: unchanged.medians(),
    })
}

impl TableChanges {
    fn write(&self, report: &mut String, tracked_flows: usize) {
        let _ = writeln!(
            report,
            "\n## Backend changes reaching the kernel\n\nA service of {TABLE_BACKENDS} backends, \
             Maglev M = 65537, beside the services above; `apply` is what lb-control runs on \
             every change (build, write the entries that differ into the inactive half, flip; \
             for a backend going down, also purge its flows from the {tracked_flows} flows the \
             benchmark left tracked). Medians of {} changes each.\n",
            self.changes
        );
        let _ = writeln!(report, "| change | ms | Maglev entries written |");
        let _ = writeln!(report, "|---|---:|---:|");
        let _ = writeln!(
            report,
            "| Maglev build alone (no kernel write) | {:.2} | - |",
            self.build_ms
        );
        let rows = [
            ("first apply of the service (whole half)", self.first),
            ("a backend down (a different one each time)", self.down),
            ("the backend up again", self.up),
            ("apply with nothing changed", self.unchanged),
        ];
        for (change, (ms, entries)) in rows {
            let _ = writeln!(report, "| {change} | {ms:.2} | {entries} |");
        }
    }
}

/// Runs `frame` once and checks the action; returns the output frame.
fn expect(
    harness: &ProgramHarness,
    ingress: u32,
    frame: &[u8],
    action: XdpAction,
    what: &str,
) -> Result<Vec<u8>, String> {
    let verdict = harness.run_from(ingress, frame).map_err(test_run_failed)?;
    if verdict.action != action {
        return Err(format!(
            "{what}: the program returned {:?}, expected {action:?}; run `cargo test -p \
             lb-control --test xdp_lb_fixtures` to see which behaviour broke",
            verdict.action
        ));
    }
    Ok(verdict.output)
}

/// The backend and NAT port of a NAT-forwarded frame.
fn nat_destination(frame: &[u8]) -> Result<(SocketAddr, u16), String> {
    let packet =
        SlicedPacket::from_ethernet(frame).map_err(|error| format!("forwarded frame: {error}"))?;
    let (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Tcp(tcp))) =
        (&packet.net, &packet.transport)
    else {
        return Err("the forwarded frame is no IPv4 TCP segment".to_owned());
    };
    let backend = SocketAddr::new(
        IpAddr::V4(ip.header().destination_addr()),
        tcp.destination_port(),
    );
    Ok((backend, tcp.source_port()))
}

/// What a call of BPF_PROG_TEST_RUN gives: the last verdict and the kernel's mean time per run.
type TestRun = Result<(TestVerdict, Duration), DataplaneError>;

fn test_run_failed(error: DataplaneError) -> String {
    format!("BPF_PROG_TEST_RUN: {error}")
}

/// The median over `options.rounds` calls of `repeat` runs each.
fn repeated(
    options: &Options,
    action: XdpAction,
    mut run: impl FnMut(u32) -> TestRun,
) -> Result<f64, String> {
    let mut means = Vec::with_capacity(options.rounds);
    for _ in 0..options.rounds {
        let (verdict, mean) = run(options.repeat).map_err(test_run_failed)?;
        if verdict.action != action {
            return Err(format!(
                "a repeated run returned {:?}, expected {action:?}",
                verdict.action
            ));
        }
        means.push(mean.as_nanos() as f64);
    }
    Ok(median(&mut means))
}

/// Loops of [`LOOP_REPEAT`] and [`SHORT_LOOP`] runs, called in turn: the medians of their
/// per-call means.
struct Loops {
    long: f64,
    short: f64,
}

impl Loops {
    /// The cost of one more run: the per-call warm-up cancels out.
    fn marginal(&self) -> f64 {
        let (long, short) = (f64::from(LOOP_REPEAT), f64::from(SHORT_LOOP));
        (long * self.long - short * self.short) / (long - short)
    }

    /// What a call costs beyond its runs at the marginal cost, in microseconds.
    fn warm_up_us(&self) -> f64 {
        f64::from(LOOP_REPEAT) * (self.long - self.marginal()) / 1000.0
    }
}

/// `calls` calls each of [`LOOP_REPEAT`] and [`SHORT_LOOP`] runs, in turn. With
/// `forwards`, the frame is one the program gives back unchanged but for its TTL: checks that
/// every run forwarded it.
fn loop_runs(
    calls: usize,
    what: &str,
    forwards: bool,
    mut run: impl FnMut(u32) -> TestRun,
) -> Result<Loops, String> {
    let mut long = Vec::with_capacity(calls);
    let mut short = Vec::with_capacity(calls);
    for _ in 0..calls {
        for (repeat, means) in [(LOOP_REPEAT, &mut long), (SHORT_LOOP, &mut short)] {
            let (verdict, mean) = run(repeat).map_err(test_run_failed)?;
            let ttl = verdict.output.get(L3 + 8).copied();
            let expected_ttl = 255 - repeat as u8;
            if forwards && (verdict.action != XdpAction::Redirect || ttl != Some(expected_ttl)) {
                return Err(format!(
                    "{what}: {repeat} runs ended in {:?} with TTL {ttl:?}; every run should \
                     have forwarded the packet (TTL {expected_ttl})",
                    verdict.action,
                ));
            }
            means.push(mean.as_nanos() as f64);
        }
    }
    Ok(Loops {
        long: median(&mut long),
        short: median(&mut short),
    })
}

/// The median of `count` single runs; `run` gets the run's index.
fn single_runs(
    count: usize,
    action: XdpAction,
    what: &str,
    mut run: impl FnMut(usize) -> TestRun,
) -> Result<f64, String> {
    let mut times = Vec::with_capacity(count);
    for i in 0..count {
        let (verdict, time) = run(i).map_err(test_run_failed)?;
        if verdict.action != action {
            return Err(format!(
                "{what}: run {i} returned {:?}, expected {action:?}",
                verdict.action
            ));
        }
        times.push(time.as_nanos() as f64);
    }
    Ok(median(&mut times))
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    }
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|release| release.trim().to_owned())
        .unwrap_or_else(|_| "?".to_owned())
}
