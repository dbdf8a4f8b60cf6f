//! Medians over repeats, the ratios the goals name, and the markdown report.

use std::{fmt, fmt::Write as _, time::Duration};

use clap::ValueEnum;
use lb_tests::{bench::median, cpu::Usage, wrk::WrkResult};

use crate::{
    Settings,
    balancer::{Balancer, XdpCounters},
};

/// Repeats below which the report says its figures are not the benchmark's.
const MIN_REPEATS: usize = 5;
/// Busy share of all cores above which the machine counts as saturated.
const SATURATED: f64 = 0.95;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum Mode {
    /// Keep-alive: every connection carries many requests.
    Keepalive,
    /// A new connection per request (`Connection: close`).
    Close,
}

impl Mode {
    pub fn label(self) -> &'static str {
        match self {
            Mode::Keepalive => "keep-alive",
            Mode::Close => "new connection each",
        }
    }
}

/// One measured run.
#[derive(Debug, Clone)]
pub struct Run {
    pub repeat: usize,
    pub balancer: Balancer,
    pub mode: Mode,
    pub wrk: WrkResult,
    pub cpu: Usage,
    /// Packets each node received during the run.
    pub node_packets: Vec<u64>,
    /// The XDP service's new flows and drops during the run (XDP runs only).
    pub xdp: Option<XdpCounters>,
    /// How the XDP program was attached during the run (XDP runs only).
    pub xdp_attached: Option<String>,
}

impl Run {
    /// Busy CPU time of the whole machine per request, in microseconds.
    pub fn cpu_us_per_request(&self) -> f64 {
        self.cpu.micros_per(self.wrk.requests)
    }
}

impl fmt::Display for Run {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: {}, CPU {:.1} µs/req, busy {:.0}%, node packets {:?}",
            self.balancer.label(),
            self.mode.label(),
            self.wrk,
            self.cpu_us_per_request(),
            self.cpu.busy_fraction * 100.0,
            self.node_packets
        )?;
        if let Some(xdp) = &self.xdp {
            write!(
                f,
                ", XDP new flows {}, drops {}",
                xdp.new_flows,
                xdp.drops_line()
            )?;
        }
        Ok(())
    }
}

pub struct Context<'a> {
    pub settings: &'a Settings,
    pub runs: &'a [Run],
    pub load_before: f64,
    pub load_after: f64,
    pub elapsed: Duration,
}

/// Medians of one balancer in one mode.
struct Summary {
    requests_per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_us: f64,
    busy: f64,
    errors: u64,
    node_share: Vec<f64>,
    repeats: usize,
}

/// What the goals ask of the XDP service, in requests/s against each reference.
struct Goal {
    other: Balancer,
    mode: Mode,
    /// `None`: shown for information, no goal.
    at_least: Option<f64>,
}

const GOALS: &[Goal] = &[
    Goal {
        other: Balancer::Ecmp,
        mode: Mode::Keepalive,
        at_least: Some(1.0),
    },
    Goal {
        other: Balancer::Ecmp,
        mode: Mode::Close,
        at_least: Some(1.0),
    },
    Goal {
        other: Balancer::Nftables,
        mode: Mode::Keepalive,
        at_least: None,
    },
    Goal {
        other: Balancer::Nftables,
        mode: Mode::Close,
        at_least: Some(1.1),
    },
    Goal {
        other: Balancer::Haproxy,
        mode: Mode::Keepalive,
        at_least: Some(1.5),
    },
    Goal {
        other: Balancer::Haproxy,
        mode: Mode::Close,
        at_least: Some(1.5),
    },
];

/// Requests/s of the calibration lab (keep-alive, new connection each), from the issue.
const CALIBRATION: &[(Balancer, f64, f64)] = &[
    (Balancer::Ecmp, 156_000.0, 34_000.0),
    (Balancer::Nftables, 152_000.0, 31_000.0),
    (Balancer::Haproxy, 102_000.0, 21_000.0),
];

pub fn markdown(context: &Context<'_>) -> String {
    let settings = context.settings;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# L4 benchmark: XDP service vs. ECMP, nftables, HAProxy\n"
    );
    if settings.repeats < MIN_REPEATS {
        let _ = writeln!(
            out,
            "> **Smoke run**: {} repeat(s) of {} s. The benchmark's figures need at least \
             {MIN_REPEATS} repeats on a quiet machine.\n",
            settings.repeats, settings.seconds
        );
    }
    write_setup(&mut out, context);
    write_xdp_attached(&mut out, context);
    for &mode in &settings.modes {
        write_mode_table(&mut out, context, mode);
    }
    write_goals(&mut out, context);
    write_xdp_drops(&mut out, context);
    write_calibration(&mut out, context);
    write_runs(&mut out, context);
    out
}

fn write_setup(out: &mut String, context: &Context<'_>) {
    let settings = context.settings;
    let (kernel, cpus) = lb_tests::bench::machine();
    let _ = writeln!(
        out,
        "- Lab: client → LB → {} nginx nodes (network namespaces, veth), kernel {kernel}, {cpus} \
         CPUs shared by client, LB and nodes.\n\
         - Load: `wrk -t{} -c{} -d{}s --timeout 2s` from the client, JSON-RPC POST \
         (`system_health`), {} s unmeasured warm-up first; keep-alive, and `Connection: close` \
         for a new connection per request (wrk's latency starts once connected, so it leaves out \
         the handshake).\n\
         - Nodes: nginx, {} worker(s) each, answering a fixed JSON-RPC result.\n\
         - XDP service: lb-control, full NAT, XDP mode `{}` on client0 and the node veths.\n\
         - ECMP route: multipath route, `fib_multipath_hash_policy=1` (L4 hash), VIP on the \
         nodes' loopback: no state, no NAT.\n\
         - nftables DNAT: `dnat to numgen inc mod N map {{…}}` + `snat to` the LB's address.\n\
         - HAProxy TCP: `mode tcp`, `balance roundrobin`, `nbthread {}`.\n\
         - Interleaved A/B: each repeat runs every balancer in turn (order rotated per repeat, \
         mode order alternated), each set up from nothing before every run and fully undone after it. {} repeat(s), \
         medians shown.\n\
         - CPU per request: busy time of the whole machine (`/proc/stat`) during the run ÷ \
         requests; busy = share of both cores' time busy (≥ {:.0}% counts as saturated).\n\
         - Load average before / after: {:.2} / {:.2}; wall time {:.0} s.\n",
        crate::NODES,
        settings.threads,
        settings.connections,
        settings.seconds,
        settings.warmup,
        settings.nginx_workers,
        settings.xdp_mode,
        settings.haproxy_threads,
        settings.repeats,
        SATURATED * 100.0,
        context.load_before,
        context.load_after,
        context.elapsed.as_secs_f64(),
    );
}

/// The attach modes the XDP runs saw (`auto` falls back to generic where native fails).
fn write_xdp_attached(out: &mut String, context: &Context<'_>) {
    let mut seen: Vec<&str> = Vec::new();
    for attached in context
        .runs
        .iter()
        .filter_map(|run| run.xdp_attached.as_deref())
    {
        if !seen.contains(&attached) {
            seen.push(attached);
        }
    }
    if !seen.is_empty() {
        let _ = writeln!(out, "XDP program attached: {}.\n", seen.join("; "));
    }
}

fn write_mode_table(out: &mut String, context: &Context<'_>, mode: Mode) {
    let _ = writeln!(out, "## {} (medians)\n", capitalised(mode.label()));
    let _ = writeln!(
        out,
        "| balancer | req/s | p50 ms | p99 ms | CPU µs/req | busy | saturated | errors | node split | repeats |\n\
         |---|---:|---:|---:|---:|---:|:-:|---:|---|---:|"
    );
    for &balancer in &context.settings.balancers {
        let Some(summary) = summarise(context.runs, balancer, mode) else {
            continue;
        };
        let split: Vec<String> = summary
            .node_share
            .iter()
            .map(|share| format!("{:.0}%", share * 100.0))
            .collect();
        let _ = writeln!(
            out,
            "| {} | {:.0} | {:.3} | {:.3} | {:.1} | {:.0}% | {} | {} | {} | {} |",
            balancer.label(),
            summary.requests_per_second,
            summary.p50_ms,
            summary.p99_ms,
            summary.cpu_us,
            summary.busy * 100.0,
            if summary.busy >= SATURATED {
                "yes"
            } else {
                "no"
            },
            summary.errors,
            split.join(" / "),
            summary.repeats,
        );
    }
    out.push('\n');
}

fn write_goals(out: &mut String, context: &Context<'_>) {
    let rows: Vec<String> = GOALS
        .iter()
        .filter_map(|goal| goal_row(context.runs, goal))
        .collect();
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "## XDP service vs. the others (requests/s)\n\n\
         Ratio of medians; the range is the per-repeat ratios (each XDP run against the same \
         repeat's run of the other). CPU ratio: XDP's CPU per request ÷ the other's.\n\n\
         | vs. | mode | goal | req/s ratio | per-repeat range | CPU/req ratio | met |\n\
         |---|---|---:|---:|---|---:|:-:|"
    );
    for row in rows {
        let _ = writeln!(out, "{row}");
    }
    out.push('\n');
}

fn goal_row(runs: &[Run], goal: &Goal) -> Option<String> {
    let xdp = summarise(runs, Balancer::Xdp, goal.mode)?;
    let other = summarise(runs, goal.other, goal.mode)?;
    let ratio = xdp.requests_per_second / other.requests_per_second;
    let paired: Vec<f64> = runs
        .iter()
        .filter(|run| run.balancer == Balancer::Xdp && run.mode == goal.mode)
        .filter_map(|xdp_run| {
            runs.iter()
                .find(|run| {
                    run.balancer == goal.other
                        && run.mode == goal.mode
                        && run.repeat == xdp_run.repeat
                })
                .map(|other_run| {
                    xdp_run.wrk.requests_per_second() / other_run.wrk.requests_per_second()
                })
        })
        .collect();
    let range = match (
        paired.iter().copied().reduce(f64::min),
        paired.iter().copied().reduce(f64::max),
    ) {
        (Some(low), Some(high)) => format!("{low:.2}–{high:.2}"),
        _ => "—".to_owned(),
    };
    let (goal_text, met) = match goal.at_least {
        Some(at_least) => (
            format!("≥ {at_least:.1}×"),
            if ratio >= at_least { "yes" } else { "**no**" },
        ),
        None => ("—".to_owned(), "—"),
    };
    Some(format!(
        "| {} | {} | {goal_text} | {ratio:.2}× | {range} | {:.2} | {met} |",
        goal.other.label(),
        goal.mode.label(),
        xdp.cpu_us / other.cpu_us,
    ))
}

/// Drops in the XDP service during measured runs: each dropped SYN stalls a connection for a
/// retransmission timeout (1 s and up), which wrk's latency (timed from the connection's first
/// write) does not show, so they are named here.
fn write_xdp_drops(out: &mut String, context: &Context<'_>) {
    for &mode in &context.settings.modes {
        let mut total = XdpCounters::default();
        let mut runs = 0;
        for run in context.runs.iter().filter(|run| run.mode == mode) {
            let Some(xdp) = &run.xdp else { continue };
            runs += 1;
            total.new_flows += xdp.new_flows;
            for (reason, count) in &xdp.drops {
                *total.drops.entry(reason.clone()).or_default() += count;
            }
        }
        if total.total_drops() > 0 {
            let _ = writeln!(
                out,
                "**The XDP service dropped service packets** ({}, {runs} run(s)): {} with {} new \
                 flows. A dropped SYN stalls its connection for a retransmission timeout (1 s, \
                 then 2 s, …), which lowers requests/s but does not show in wrk's latency.\n",
                mode.label(),
                total.drops_line(),
                total.new_flows,
            );
        }
    }
}

fn write_calibration(out: &mut String, context: &Context<'_>) {
    let _ = writeln!(
        out,
        "## Beside the calibration lab (requests/s)\n\n\
         The issue's calibration lab (same shape: wrk -t2 -c64, nginx nodes, JSON-RPC POST).\n\n\
         | balancer | keep-alive: calibration | measured | new connection: calibration | measured |\n\
         |---|---:|---:|---:|---:|"
    );
    let measured = |balancer, mode| {
        summarise(context.runs, balancer, mode).map_or("—".to_owned(), |summary| {
            format!("{:.0}", summary.requests_per_second)
        })
    };
    for &(balancer, keepalive, close) in CALIBRATION {
        let _ = writeln!(
            out,
            "| {} | ~{:.0}k | {} | ~{:.0}k | {} |",
            balancer.label(),
            keepalive / 1e3,
            measured(balancer, Mode::Keepalive),
            close / 1e3,
            measured(balancer, Mode::Close),
        );
    }
    let _ = writeln!(
        out,
        "| {} | — | {} | — | {} |\n",
        Balancer::Xdp.label(),
        measured(Balancer::Xdp, Mode::Keepalive),
        measured(Balancer::Xdp, Mode::Close),
    );
}

fn write_runs(out: &mut String, context: &Context<'_>) {
    let _ = writeln!(
        out,
        "## Every run, in order\n\n\
         | repeat | balancer | mode | req/s | p50 ms | p99 ms | max ms | CPU µs/req | busy | errors | node packets | XDP new flows | XDP drops |\n\
         |---:|---|---|---:|---:|---:|---:|---:|---:|---|---|---:|---|"
    );
    for run in context.runs {
        let errors = if run.wrk.errors() == 0 {
            "0".to_owned()
        } else {
            run.wrk.errors_line()
        };
        let packets: Vec<String> = run.node_packets.iter().map(u64::to_string).collect();
        let (new_flows, drops) = run
            .xdp
            .as_ref()
            .map_or(("—".to_owned(), "—".to_owned()), |xdp| {
                (xdp.new_flows.to_string(), xdp.drops_line())
            });
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.0} | {:.3} | {:.3} | {:.1} | {:.1} | {:.0}% | {errors} | {} | {new_flows} | {drops} |",
            run.repeat + 1,
            run.balancer.label(),
            run.mode.label(),
            run.wrk.requests_per_second(),
            run.wrk.p50.as_secs_f64() * 1e3,
            run.wrk.p99.as_secs_f64() * 1e3,
            run.wrk.max.as_secs_f64() * 1e3,
            run.cpu_us_per_request(),
            run.cpu.busy_fraction * 100.0,
            packets.join(" / "),
        );
    }
}

fn summarise(runs: &[Run], balancer: Balancer, mode: Mode) -> Option<Summary> {
    let runs: Vec<&Run> = runs
        .iter()
        .filter(|run| run.balancer == balancer && run.mode == mode)
        .collect();
    if runs.is_empty() {
        return None;
    }
    let median_of = |value: fn(&Run) -> f64| median(runs.iter().map(|run| value(run)).collect());
    let nodes = runs
        .iter()
        .map(|run| run.node_packets.len())
        .max()
        .unwrap_or(0);
    let totals: Vec<u64> = (0..nodes)
        .map(|index| {
            runs.iter()
                .map(|run| run.node_packets.get(index).copied().unwrap_or(0))
                .sum()
        })
        .collect();
    let all: u64 = totals.iter().sum();
    Some(Summary {
        requests_per_second: median_of(|run| run.wrk.requests_per_second()),
        p50_ms: median_of(|run| run.wrk.p50.as_secs_f64() * 1e3),
        p99_ms: median_of(|run| run.wrk.p99.as_secs_f64() * 1e3),
        cpu_us: median_of(Run::cpu_us_per_request),
        busy: median_of(|run| run.cpu.busy_fraction),
        errors: runs.iter().map(|run| run.wrk.errors()).sum(),
        node_share: totals
            .iter()
            .map(|total| *total as f64 / all.max(1) as f64)
            .collect(),
        repeats: runs.len(),
    })
}

fn capitalised(text: &str) -> String {
    let mut chars = text.chars();
    chars
        .next()
        .map(|first| first.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}
