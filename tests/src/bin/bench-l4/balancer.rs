//! The four balancers, each set up in the LB namespace (and, for ECMP, on the nodes) and
//! undone completely before the next: routes, sysctls, nftables tables, processes, addresses
//! and pinned maps.
//!
//! - `xdp`: lb-control, full NAT from the LB's client address, on client0 and every node veth.
//! - `ecmp`: a multipath route to the VIP with an L4 hash; the VIP on each node's loopback, so
//!   nodes answer for it directly. No state, no NAT: the zero-cost reference.
//! - `nftables`: DNAT round robin (`numgen inc`) to the nodes plus SNAT to the LB's client
//!   address, so replies come back through the LB as with full NAT.
//! - `haproxy`: HAProxy in TCP mode on the VIP (added to the LB's loopback), round robin.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::ValueEnum;
use lb_tests::{
    bench::find_command,
    lab::{Lab, binary_path, in_netns, run_checked},
};

use crate::{PORT, Settings, VIP, nodes};

/// Connections the readiness probe makes through a balancer; all must be answered, and by
/// more than one node.
const PROBE_CONNECTIONS: usize = 20;
/// A probe this slow waited for a retransmission.
const SLOW_PROBE: Duration = Duration::from_millis(900);
const READY_TIMEOUT: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_millis(100);
/// Name of the nftables table the nftables balancer adds (and deletes).
const NFT_TABLE: &str = "bench_l4";

const RESERVED_PORTS: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";
const MULTIPATH_HASH_POLICY: &str = "/proc/sys/net/ipv4/fib_multipath_hash_policy";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum Balancer {
    /// The XDP service (lb-control, full NAT).
    Xdp,
    /// Stateless ECMP multipath route with an L4 hash, VIP on the nodes' loopback.
    Ecmp,
    /// nftables DNAT (numgen round robin) plus SNAT.
    #[value(alias = "nft")]
    Nftables,
    /// HAProxy in TCP mode.
    Haproxy,
}

impl Balancer {
    pub fn label(self) -> &'static str {
        match self {
            Balancer::Xdp => "XDP service",
            Balancer::Ecmp => "ECMP route",
            Balancer::Nftables => "nftables DNAT",
            Balancer::Haproxy => "HAProxy TCP",
        }
    }
}

/// A balancer that is set up; [`Active::teardown`] undoes all of it.
pub enum Active {
    Xdp {
        pid: u32,
        reserved_ports_before: String,
        /// How the program got attached, e.g. `client0 native, node0 native, node1 native`.
        attached: String,
    },
    Ecmp {
        hash_policy_before: String,
    },
    Nftables,
    Haproxy {
        pid: u32,
    },
}

pub fn setup(lab: &mut Lab, balancer: Balancer, settings: &Settings) -> anyhow::Result<Active> {
    match balancer {
        Balancer::Xdp => setup_xdp(lab, settings),
        Balancer::Ecmp => setup_ecmp(lab),
        Balancer::Nftables => setup_nftables(lab),
        Balancer::Haproxy => setup_haproxy(lab, settings),
    }
}

impl Active {
    /// How the XDP program got attached (XDP only).
    pub fn xdp_attached(&self) -> Option<&str> {
        match self {
            Active::Xdp { attached, .. } => Some(attached),
            _ => None,
        }
    }

    pub fn teardown(self, lab: &mut Lab) -> anyhow::Result<()> {
        let lb = lab.lb().netns.clone();
        match self {
            Active::Xdp {
                pid,
                reserved_ports_before,
                ..
            } => {
                lab.stop_process(pid).context("stopping lb-control")?;
                // Its maps stay pinned on a clean stop (for a restart); the next repeat starts
                // with empty flow tables, like the other balancers.
                let pin_dir = lab.pin_dir();
                if pin_dir.exists() {
                    std::fs::remove_dir_all(&pin_dir)
                        .with_context(|| format!("removing {}", pin_dir.display()))?;
                }
                write_sysctl(&lb, RESERVED_PORTS, &reserved_ports_before)?;
                let interfaces: Vec<String> = std::iter::once(lab.lb().client_iface.clone())
                    .chain(lab.lb().node_ifaces.iter().cloned())
                    .collect();
                for iface in interfaces {
                    if xdp_attach_mode(lab, &lb, &iface)? != "none" {
                        bail!(
                            "an XDP program is still attached to {iface} after lb-control stopped"
                        );
                    }
                }
            }
            Active::Ecmp { hash_policy_before } => {
                ip(lab, &lb, &["route", "del", &format!("{VIP}/32")])?;
                write_sysctl(&lb, MULTIPATH_HASH_POLICY, &hash_policy_before)?;
                for node in lab.nodes().to_vec() {
                    ip(
                        lab,
                        &node.netns,
                        &["addr", "del", &format!("{VIP}/32"), "dev", "lo"],
                    )?;
                }
            }
            Active::Nftables => {
                run_checked(
                    lab.exec(&lb, nft()?)?
                        .args(["delete", "table", "ip", NFT_TABLE]),
                )?;
            }
            Active::Haproxy { pid } => {
                lab.stop_process(pid).context("stopping haproxy")?;
                ip(
                    lab,
                    &lb,
                    &["addr", "del", &format!("{VIP}/32"), "dev", "lo"],
                )?;
            }
        }
        Ok(())
    }
}

/// The XDP service's counters (summed over services), read with `lb-control stats --json`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct XdpCounters {
    pub new_flows: u64,
    /// Drops by reason, inside services and outside them.
    pub drops: BTreeMap<String, u64>,
}

impl XdpCounters {
    pub fn read(lab: &Lab) -> anyhow::Result<XdpCounters> {
        let program = binary_path("lb-control")?;
        let output = run_checked(lab.exec(&lab.lb().netns, program)?.args([
            "stats",
            "--json",
            "--instance",
            lab.prefix(),
        ]))?;
        let stats: serde_json::Value =
            serde_json::from_slice(&output.stdout).context("parsing `lb-control stats --json`")?;
        let mut counters = XdpCounters::default();
        let services = stats["services"].as_array().cloned().unwrap_or_default();
        for drops in std::iter::once(&stats["drops"]).chain(services.iter().map(|s| &s["drops"])) {
            for (reason, count) in drops.as_object().into_iter().flatten() {
                *counters.drops.entry(reason.clone()).or_default() += count.as_u64().unwrap_or(0);
            }
        }
        counters.new_flows = services
            .iter()
            .filter_map(|service| service["new_flows"].as_u64())
            .sum();
        Ok(counters)
    }

    /// What happened between `earlier` and this reading.
    pub fn since(&self, earlier: &XdpCounters) -> XdpCounters {
        let drops = self
            .drops
            .iter()
            .map(|(reason, count)| {
                let before = earlier.drops.get(reason).copied().unwrap_or(0);
                (reason.clone(), count.saturating_sub(before))
            })
            .filter(|(_, count)| *count > 0)
            .collect();
        XdpCounters {
            new_flows: self.new_flows.saturating_sub(earlier.new_flows),
            drops,
        }
    }

    pub fn total_drops(&self) -> u64 {
        self.drops.values().sum()
    }

    /// `reason=count, …`, or `0`.
    pub fn drops_line(&self) -> String {
        if self.drops.is_empty() {
            return "0".to_owned();
        }
        self.drops
            .iter()
            .map(|(reason, count)| format!("{reason}={count}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn setup_xdp(lab: &mut Lab, settings: &Settings) -> anyhow::Result<Active> {
    let lb = lab.lb().netns.clone();
    let reserved_ports_before = read_sysctl(&lb, RESERVED_PORTS)?;
    let backends: Vec<String> = lab
        .nodes()
        .iter()
        .map(|node| format!("{{ address = \"{}:{PORT}\" }}", node.addr_v4))
        .collect();
    let config = format!(
        "[dataplane]\nnat_source_v4 = \"{}\"\n\n[[services]]\nvip = \"{VIP}\"\nport = {PORT}\n\
         check = \"none\"\nbackends = [{}]\n",
        lab.lb().addr_v4,
        backends.join(", ")
    );
    let path: PathBuf = lab.log_dir().join("lb-control.toml");
    std::fs::write(&path, config).with_context(|| format!("writing {}", path.display()))?;
    let path = path.to_string_lossy().into_owned();
    let mut args = vec!["--config", path.as_str(), "--xdp-mode", settings.xdp_mode];
    let node_ifaces = lab.lb().node_ifaces.clone();
    for iface in &node_ifaces {
        args.extend(["-i", iface.as_str()]);
    }
    let pid = lab.spawn_lb_control(&args)?.pid();
    let mut attached = Vec::new();
    for iface in std::iter::once(lab.lb().client_iface.clone()).chain(node_ifaces) {
        attached.push(format!("{iface} {}", xdp_attach_mode(lab, &lb, &iface)?));
    }
    Ok(Active::Xdp {
        pid,
        reserved_ports_before,
        attached: attached.join(", "),
    })
}

/// `native`, `generic` or `none`: what `ip link` shows attached to `iface`.
fn xdp_attach_mode(lab: &Lab, netns: &str, iface: &str) -> anyhow::Result<&'static str> {
    let output = run_checked(lab.exec(netns, "ip")?.args(["link", "show", "dev", iface]))?;
    let text = String::from_utf8_lossy(&output.stdout);
    Ok(if text.contains("xdpgeneric") {
        "generic"
    } else if text.contains("xdp") {
        "native"
    } else {
        "none"
    })
}

fn setup_ecmp(lab: &mut Lab) -> anyhow::Result<Active> {
    let lb = lab.lb().netns.clone();
    let hash_policy_before = read_sysctl(&lb, MULTIPATH_HASH_POLICY)?;
    // 1: hash on the L4 5-tuple, so each connection keeps its node and connections spread.
    write_sysctl(&lb, MULTIPATH_HASH_POLICY, "1")?;
    let nodes = lab.nodes().to_vec();
    for node in &nodes {
        ip(
            lab,
            &node.netns,
            &["addr", "add", &format!("{VIP}/32"), "dev", "lo"],
        )?;
    }
    let mut args = vec!["route".to_owned(), "add".to_owned(), format!("{VIP}/32")];
    for node in &nodes {
        args.extend([
            "nexthop".to_owned(),
            "via".to_owned(),
            node.addr_v4.to_string(),
            "dev".to_owned(),
            node.gateway_iface_in_lb.clone(),
        ]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ip(lab, &lb, &args)?;
    Ok(Active::Ecmp { hash_policy_before })
}

fn setup_nftables(lab: &mut Lab) -> anyhow::Result<Active> {
    let lb = lab.lb().netns.clone();
    let nodes = lab.nodes();
    let map: Vec<String> = nodes
        .iter()
        .enumerate()
        .map(|(index, node)| format!("{index} : {}", node.addr_v4))
        .collect();
    let addresses: Vec<String> = nodes.iter().map(|node| node.addr_v4.to_string()).collect();
    let ruleset = format!(
        "table ip {NFT_TABLE} {{\n\
         \tchain prerouting {{\n\
         \t\ttype nat hook prerouting priority dstnat; policy accept;\n\
         \t\tip daddr {VIP} tcp dport {PORT} dnat to numgen inc mod {} map {{ {} }}\n\
         \t}}\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tip daddr {{ {} }} tcp dport {PORT} snat to {}\n\
         \t}}\n\
         }}\n",
        nodes.len(),
        map.join(", "),
        addresses.join(", "),
        lab.lb().addr_v4,
    );
    let path = lab.log_dir().join("nftables.nft");
    std::fs::write(&path, ruleset).with_context(|| format!("writing {}", path.display()))?;
    run_checked(lab.exec(&lb, nft()?)?.arg("-f").arg(&path))?;
    Ok(Active::Nftables)
}

fn setup_haproxy(lab: &mut Lab, settings: &Settings) -> anyhow::Result<Active> {
    let haproxy = find_command("haproxy").context("haproxy not found (Debian package haproxy)")?;
    let lb = lab.lb().netns.clone();
    ip(
        lab,
        &lb,
        &["addr", "add", &format!("{VIP}/32"), "dev", "lo"],
    )?;
    let mut config = String::new();
    let _ = write!(
        config,
        "global\n\
         \tnbthread {}\n\
         \tmaxconn 8000\n\
         defaults\n\
         \tmode tcp\n\
         \ttimeout connect 5s\n\
         \ttimeout client 60s\n\
         \ttimeout server 60s\n\
         frontend vip\n\
         \tbind {VIP}:{PORT}\n\
         \tdefault_backend nodes\n\
         backend nodes\n\
         \tbalance roundrobin\n",
        settings.haproxy_threads
    );
    for (index, node) in lab.nodes().iter().enumerate() {
        let _ = writeln!(config, "\tserver node{index} {}:{PORT}", node.addr_v4);
    }
    let path = lab.log_dir().join("haproxy.cfg");
    std::fs::write(&path, config).with_context(|| format!("writing {}", path.display()))?;
    let path = path.to_string_lossy().into_owned();
    // -db: stay in the foreground, so the lab holds and stops the process itself.
    let pid = lab
        .spawn_process("haproxy", &lb, haproxy, &["-db", "-f", &path], "haproxy")?
        .pid();
    Ok(Active::Haproxy { pid })
}

/// Waits until the balancer answers on the VIP, then sends [`PROBE_CONNECTIONS`] requests on
/// new connections: every one must be answered, and by more than one node. Returns how many
/// each node answered.
pub fn probe(lab: &mut Lab, balancer: Balancer) -> anyhow::Result<BTreeMap<String, usize>> {
    let vip = SocketAddr::from((VIP, PORT));
    let client = lab.client().netns.clone();
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        match in_netns(&client, || nodes::post(vip))? {
            Ok(_) => break,
            Err(error) if Instant::now() >= deadline => {
                return Err(error.context(format!(
                    "{} did not answer on {vip} within {READY_TIMEOUT:?}",
                    balancer.label()
                )));
            }
            Err(_) => {
                // A balancer process that died says why in its log; quote it now.
                lab.check_processes()?;
                std::thread::sleep(POLL);
            }
        }
    }
    let mut split = BTreeMap::new();
    let mut slow = Vec::new();
    for _ in 0..PROBE_CONNECTIONS {
        let started = Instant::now();
        // One more try on a new connection: a single stalled handshake is reported, not fatal.
        let node = match in_netns(&client, || nodes::post(vip))? {
            Ok(node) => node,
            Err(error) => {
                slow.push(format!("failed after {:?} ({error:#})", started.elapsed()));
                in_netns(&client, || nodes::post(vip))??
            }
        };
        let elapsed = started.elapsed();
        if elapsed >= SLOW_PROBE {
            slow.push(format!("answered after {elapsed:?}"));
        }
        *split.entry(node).or_insert(0) += 1;
    }
    if !slow.is_empty() {
        eprintln!(
            "bench-l4: warning: {} of {PROBE_CONNECTIONS} probe connections through {} were \
             slow (a SYN was probably retransmitted): {}",
            slow.len(),
            balancer.label(),
            slow.join("; ")
        );
    }
    if split.len() < 2 && lab.nodes().len() > 1 {
        bail!(
            "{} sent all {PROBE_CONNECTIONS} probe connections to one node: {split:?}",
            balancer.label()
        );
    }
    Ok(split)
}

fn ip(lab: &Lab, netns: &str, args: &[&str]) -> anyhow::Result<()> {
    run_checked(lab.exec(netns, "ip")?.args(args))?;
    Ok(())
}

fn nft() -> anyhow::Result<PathBuf> {
    find_command("nft").context("nft not found (Debian package nftables)")
}

/// Reads a sysctl of `netns` (/proc/sys/net shows the namespace of the thread that opens it).
fn read_sysctl(netns: &str, path: &'static str) -> anyhow::Result<String> {
    in_netns(netns, || std::fs::read_to_string(path))?
        .map(|value| value.trim().to_owned())
        .with_context(|| format!("reading {path} in {netns}"))
}

fn write_sysctl(netns: &str, path: &'static str, value: &str) -> anyhow::Result<()> {
    // An empty write is refused by some sysctls; a newline clears a list such as
    // ip_local_reserved_ports.
    let value = if value.is_empty() { "\n" } else { value };
    in_netns(netns, || std::fs::write(path, value))?
        .with_context(|| format!("writing {value:?} to {path} in {netns}"))
}
