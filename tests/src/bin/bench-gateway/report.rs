//! Medians over repeats, the goals the issue names, memory, and the markdown report.

use std::{fmt, fmt::Write as _, time::Duration};

use lb_tests::{bench::median, cpu::Usage, wrk::WrkResult};

use crate::{
    CACHED_METHOD, NODES, Settings, Target, UNCACHED_METHOD, call_of,
    flood::Flood,
    setup::{CacheLookups, Memory},
};

/// Repeats below which the report says its figures are not the benchmark's.
const MIN_REPEATS: usize = 5;

/// One measured run.
#[derive(Debug, Clone)]
pub struct Run {
    pub repeat: usize,
    pub target: Target,
    pub wrk: WrkResult,
    pub cpu: Usage,
    /// The gateway's cache lookups during the run (gateway runs only).
    pub cache: Option<CacheLookups>,
    /// The made-up key flood around the run ([`Target::GatewayHitUnderFlood`] only).
    pub flood: Option<Flood>,
    /// Resident memory right after the run.
    pub memory: Memory,
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
            "{}: {}, CPU {:.1} µs/req, busy {:.0}%",
            self.target.label(),
            self.wrk,
            self.cpu_us_per_request(),
            self.cpu.busy_fraction * 100.0,
        )?;
        if let Some(cache) = &self.cache {
            write!(f, ", cache {cache}")?;
        }
        if let Some(flood) = &self.flood {
            write!(
                f,
                ", flood {:.0} made-up keys/s ({} refused, store reads {} writes {})",
                flood.wrk.requests_per_second(),
                flood.refused,
                flood.store_reads,
                flood.store_writes
            )?;
        }
        write!(f, ", {}", self.memory)
    }
}

pub struct Context<'a> {
    pub settings: &'a Settings,
    pub runs: &'a [Run],
    /// After the last run: the high-water marks cover every run.
    pub memory: &'a Memory,
    pub load_before: f64,
    pub load_after: f64,
    pub elapsed: Duration,
}

/// What a goal compares.
enum Measure {
    /// Requests/s of the first target ÷ the second's: at least `.0` (`None`: no goal, shown
    /// for comparison).
    ThroughputRatio(Option<f64>),
    /// p50 of the first target − the second's, in ms: at most `.0` (`None`: no goal, shown
    /// for comparison).
    AddedLatency(Option<f64>),
    /// p99 of the first target ÷ the second's: at most `.0`.
    P99Ratio(f64),
}

struct Goal {
    ours: Target,
    other: Target,
    measure: Measure,
}

const GOALS: &[Goal] = &[
    Goal {
        ours: Target::GatewayHit,
        other: Target::NginxProxy,
        measure: Measure::ThroughputRatio(Some(2.0)),
    },
    Goal {
        ours: Target::GatewayHit,
        other: Target::NginxHit,
        measure: Measure::ThroughputRatio(Some(1.3)),
    },
    Goal {
        ours: Target::GatewayMiss,
        other: Target::NginxProxy,
        measure: Measure::ThroughputRatio(Some(1.1)),
    },
    Goal {
        ours: Target::GatewayWsHit,
        other: Target::NginxWs,
        measure: Measure::ThroughputRatio(None),
    },
    Goal {
        ours: Target::GatewayWsMiss,
        other: Target::NginxWs,
        measure: Measure::ThroughputRatio(None),
    },
    Goal {
        ours: Target::GatewayHitUnderFlood,
        other: Target::GatewayHitLight,
        measure: Measure::P99Ratio(2.0),
    },
    Goal {
        ours: Target::GatewayMiss,
        other: Target::Node,
        measure: Measure::AddedLatency(Some(0.3)),
    },
    Goal {
        ours: Target::GatewayMissSerial,
        other: Target::NodeSerial,
        measure: Measure::AddedLatency(Some(0.3)),
    },
    Goal {
        ours: Target::NginxProxy,
        other: Target::Node,
        measure: Measure::AddedLatency(None),
    },
];

/// Requests/s of nginx over TLS keep-alive in the calibration lab (2 cores).
const CALIBRATION: &[(Target, f64)] =
    &[(Target::NginxProxy, 54_000.0), (Target::NginxHit, 90_000.0)];

pub fn markdown(context: &Context<'_>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Gateway benchmark: cache hits and misses over TLS vs. the node and nginx\n"
    );
    let settings = context.settings;
    if settings.repeats < MIN_REPEATS {
        let _ = writeln!(
            out,
            "> **Smoke run**: {} repeat(s) of {} s. The benchmark's figures need at least \
             {MIN_REPEATS} repeats on a quiet machine.\n",
            settings.repeats, settings.seconds
        );
    }
    write_setup(&mut out, context);
    write_medians(&mut out, context);
    write_goals(&mut out, context);
    write_flood(&mut out, context);
    write_calibration(&mut out, context);
    write_memory(&mut out, context);
    write_runs(&mut out, context);
    out
}

fn write_setup(out: &mut String, context: &Context<'_>) {
    let settings = context.settings;
    let (kernel, cpus) = lb_tests::bench::machine();
    let _ = writeln!(
        out,
        "- Lab: client → LB → {NODES} sim-nodes (network namespaces, veth), kernel {kernel}, \
         {cpus} CPUs shared by client, LB and nodes.\n\
         - Load: `wrk -t{} -c{} -d{}s --timeout 2s` from the client, keep-alive, HTTP/1.1, one \
         JSON-RPC POST repeated; {} s unmeasured warm-up first (it also fills the caches). The \
         \"1 connection\" runs use `wrk -t1 -c1`: one request at a time, so their latency is the \
         path's own, without the queueing that dominates p50 on a saturated machine. The \
         WebSocket runs use `ws-load` from the client: {} connections over TLS, each keeping {} \
         calls in flight (a new call as each answer comes); nginx passes each client's \
         WebSocket through to a node, the gateway carries the misses on its shared upstream \
         connections.\n\
         - Cached call `{}` (the gateway keeps it until the runtime changes); \
         uncached call `{}` (never cached: every request reaches a node).\n\
         - Gateway: lb-control's gateway, TLS (rustls, ring) on the LB's address, API key in the \
         path; its node for a client comes from the Maglev table (one client address: one node).\n\
         - nginx: {} worker(s), TLS with the same certificate on the same address; upstream the \
         {NODES} sim-nodes with idle keep-alive connections (`keepalive 64`, round robin); the \
         cache server adds `proxy_cache_methods POST`, `proxy_cache_key \
         \"$request_uri|$request_body\"`, `proxy_cache_valid 200 1h`.\n\
         - Straight to the node: plain HTTP to node 0's sim-node (jsonrpsee), no TLS.\n\
         - Interleaved A/B: each repeat runs every target in turn, the order rotated per repeat. \
         {} repeat(s), medians shown.\n\
         - CPU per request: busy time of the whole machine (`/proc/stat`) during the run ÷ \
         requests.\n\
         - Load average before / after: {:.2} / {:.2}; wall time {:.0} s.\n",
        settings.threads,
        settings.connections,
        settings.seconds,
        settings.warmup,
        settings.ws_connections,
        settings.ws_in_flight,
        call_of(CACHED_METHOD),
        call_of(UNCACHED_METHOD),
        settings.nginx_workers,
        settings.repeats,
        context.load_before,
        context.load_after,
        context.elapsed.as_secs_f64(),
    );
}

/// Medians of one target's runs.
struct Summary {
    requests_per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_us: f64,
    busy: f64,
    errors: u64,
    repeats: usize,
}

fn summarise(runs: &[Run], target: Target) -> Option<Summary> {
    let runs: Vec<&Run> = runs.iter().filter(|run| run.target == target).collect();
    if runs.is_empty() {
        return None;
    }
    let median_of = |value: fn(&Run) -> f64| median(runs.iter().map(|run| value(run)).collect());
    Some(Summary {
        requests_per_second: median_of(|run| run.wrk.requests_per_second()),
        p50_ms: median_of(|run| milliseconds(run.wrk.p50)),
        p99_ms: median_of(|run| milliseconds(run.wrk.p99)),
        cpu_us: median_of(Run::cpu_us_per_request),
        busy: median_of(|run| run.cpu.busy_fraction),
        errors: runs.iter().map(|run| run.wrk.errors()).sum(),
        repeats: runs.len(),
    })
}

fn write_medians(out: &mut String, context: &Context<'_>) {
    let _ = writeln!(
        out,
        "## Medians\n\n\
         | target | call | req/s | p50 ms | p99 ms | CPU µs/req | busy | errors | repeats |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|"
    );
    for &target in &context.settings.targets {
        let Some(summary) = summarise(context.runs, target) else {
            continue;
        };
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {:.3} | {:.3} | {:.1} | {:.0}% | {} | {} |",
            target.label(),
            if target.is_cached_call() {
                "cached"
            } else {
                "uncached"
            },
            summary.requests_per_second,
            summary.p50_ms,
            summary.p99_ms,
            summary.cpu_us,
            summary.busy * 100.0,
            summary.errors,
            summary.repeats,
        );
    }
    let mut lookups = CacheLookups::default();
    let mut requests = 0;
    for run in context
        .runs
        .iter()
        .filter(|run| run.target == Target::GatewayHit)
    {
        let Some(cache) = &run.cache else { continue };
        lookups.hit += cache.hit;
        lookups.miss += cache.miss;
        lookups.coalesced += cache.coalesced;
        requests += run.wrk.requests;
    }
    if requests > 0 {
        let _ = writeln!(
            out,
            "\nThe gateway's cache during its cache-hit runs (`lb_gateway_cache_lookups_total`): \
             {lookups} for {requests} requests wrk completed."
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
        "## Goals\n\n\
         From medians; the range is over the repeats (each run against the same repeat's run of \
         the other).\n\n\
         | measure | goal | measured | per-repeat range | met |\n\
         |---|---:|---:|---|:-:|"
    );
    for row in rows {
        let _ = writeln!(out, "{row}");
    }
    out.push('\n');
}

fn goal_row(runs: &[Run], goal: &Goal) -> Option<String> {
    let ours = summarise(runs, goal.ours)?;
    let other = summarise(runs, goal.other)?;
    let compare: fn(&WrkResult, &WrkResult) -> f64 = match goal.measure {
        Measure::ThroughputRatio(_) => {
            |ours, other| ours.requests_per_second() / other.requests_per_second()
        }
        Measure::AddedLatency(_) => |ours, other| milliseconds(ours.p50) - milliseconds(other.p50),
        Measure::P99Ratio(_) => |ours, other| ours.p99.as_secs_f64() / other.p99.as_secs_f64(),
    };
    let paired: Vec<f64> = runs
        .iter()
        .filter(|run| run.target == goal.ours)
        .filter_map(|our_run| {
            runs.iter()
                .find(|run| run.target == goal.other && run.repeat == our_run.repeat)
                .map(|other_run| compare(&our_run.wrk, &other_run.wrk))
        })
        .collect();
    let (low, high) = (
        paired.iter().copied().reduce(f64::min)?,
        paired.iter().copied().reduce(f64::max)?,
    );
    let (what, goal_text, measured, range, met) = match goal.measure {
        Measure::ThroughputRatio(at_least) => {
            let ratio = ours.requests_per_second / other.requests_per_second;
            (
                format!("{} ÷ {} req/s", goal.ours.label(), goal.other.label()),
                at_least.map_or("—".to_owned(), |at_least| format!("≥ {at_least:.1}×")),
                format!("{ratio:.2}×"),
                format!("{low:.2}–{high:.2}"),
                at_least.map(|at_least| ratio >= at_least),
            )
        }
        Measure::AddedLatency(at_most) => {
            let added = ours.p50_ms - other.p50_ms;
            (
                format!("{} − {} p50", goal.ours.label(), goal.other.label()),
                at_most.map_or("—".to_owned(), |at_most| format!("≤ +{at_most:.1} ms")),
                format!("{added:+.3} ms"),
                format!("{low:+.3} – {high:+.3} ms"),
                at_most.map(|at_most| added <= at_most),
            )
        }
        Measure::P99Ratio(at_most) => {
            let ratio = ours.p99_ms / other.p99_ms;
            (
                format!("{} ÷ {} p99", goal.ours.label(), goal.other.label()),
                format!("≤ {at_most:.1}×"),
                format!("{ratio:.2}×"),
                format!("{low:.2}–{high:.2}"),
                Some(ratio <= at_most),
            )
        }
    };
    let met = match met {
        Some(true) => "yes",
        Some(false) => "**no**",
        None => "—",
    };
    Some(format!(
        "| {what} | {goal_text} | {measured} | {range} | {met} |"
    ))
}

fn write_flood(out: &mut String, context: &Context<'_>) {
    let floods: Vec<(&Run, &Flood)> = context
        .runs
        .iter()
        .filter_map(|run| Some((run, run.flood.as_ref()?)))
        .collect();
    if floods.is_empty() {
        return;
    }
    let settings = context.settings;
    let _ = writeln!(
        out,
        "## Made-up key flood\n\n\
         A second wrk (`-t1 -c{}`) sends the cached call with a new well-formed made-up key in \
         the path of every request (`lbk_` + 64 hex digits), from before the gateway's first \
         refusal until after the measured run of the valid key (`-t1 -c{}`, the cached call) \
         that starts then; \"{}\" is the same valid load without the flood. The store's calls \
         are lb-control's own count (`lb_store_calls_total`) over the flood.\n\n\
         | repeat | made-up keys sent | keys/s | refused (401) | store reads | store writes | valid p99 ms |\n\
         |---:|---:|---:|---:|---:|---:|---:|",
        settings.flood_connections,
        settings.light_connections,
        Target::GatewayHitLight.label(),
    );
    for (run, flood) in floods {
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {} | {} | {} | {:.3} |",
            run.repeat + 1,
            flood.wrk.requests,
            flood.wrk.requests_per_second(),
            flood.refused,
            flood.store_reads,
            flood.store_writes,
            milliseconds(run.wrk.p99),
        );
    }
    out.push('\n');
}

fn write_calibration(out: &mut String, context: &Context<'_>) {
    let _ = writeln!(
        out,
        "## Beside the calibration lab (requests/s)\n\n\
         The issue's calibration lab, TLS keep-alive on the same 2 cores. Its nginx proxied to \
         nodes whose own cost is unknown here; these nodes are sim-nodes.\n\n\
         | target | calibration | measured |\n\
         |---|---:|---:|"
    );
    for &(target, calibration) in CALIBRATION {
        let measured = summarise(context.runs, target).map_or("—".to_owned(), |summary| {
            format!("{:.0}", summary.requests_per_second)
        });
        let _ = writeln!(
            out,
            "| {} | ~{:.0}k | {measured} |",
            target.label(),
            calibration / 1e3
        );
    }
    out.push('\n');
}

fn write_memory(out: &mut String, context: &Context<'_>) {
    let memory = context.memory;
    let mebibytes = |kib: u64| kib as f64 / 1024.0;
    let largest_rss = |rss: fn(&Memory) -> u64| {
        context
            .runs
            .iter()
            .map(|run| rss(&run.memory))
            .max()
            .unwrap_or(0)
    };
    // The master's children: workers and the cache manager (the cache loader exits after its
    // first pass, so it may count in a run's RSS but not at the end).
    let children = memory.nginx.len().saturating_sub(1);
    let _ = writeln!(
        out,
        "## Memory (`/proc/<pid>/status`)\n\n\
         | process | largest VmRSS after a run | VmRSS at the end | VmHWM (peak) |\n\
         |---|---:|---:|---:|\n\
         | lb-control (whole daemon: gateway, control plane, admin API) | {:.1} MiB | {:.1} MiB | {:.1} MiB |\n\
         | nginx, master + {} children (workers, cache manager) | {:.1} MiB | {:.1} MiB | {:.1} MiB (sum) |\n",
        mebibytes(largest_rss(|memory| memory.lb_control.rss_kib)),
        mebibytes(memory.lb_control.rss_kib),
        mebibytes(memory.lb_control.hwm_kib),
        children,
        mebibytes(largest_rss(Memory::nginx_rss_kib)),
        mebibytes(memory.nginx_rss_kib()),
        mebibytes(memory.nginx.iter().map(|process| process.hwm_kib).sum()),
    );
}

fn write_runs(out: &mut String, context: &Context<'_>) {
    let _ = writeln!(
        out,
        "## Every run, in order\n\n\
         | repeat | target | req/s | p50 ms | p99 ms | max ms | CPU µs/req | busy | errors | gateway cache | RSS lb-control / nginx MiB |\n\
         |---:|---|---:|---:|---:|---:|---:|---:|---|---|---|"
    );
    for run in context.runs {
        let errors = if run.wrk.errors() == 0 {
            "0".to_owned()
        } else {
            run.wrk.errors_line()
        };
        let cache = run
            .cache
            .as_ref()
            .map_or("—".to_owned(), CacheLookups::to_string);
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {:.3} | {:.3} | {:.1} | {:.1} | {:.0}% | {errors} | {cache} | {:.1} / {:.1} |",
            run.repeat + 1,
            run.target.label(),
            run.wrk.requests_per_second(),
            milliseconds(run.wrk.p50),
            milliseconds(run.wrk.p99),
            milliseconds(run.wrk.max),
            run.cpu_us_per_request(),
            run.cpu.busy_fraction * 100.0,
            run.memory.lb_control.rss_kib as f64 / 1024.0,
            run.memory.nginx_rss_kib() as f64 / 1024.0,
        );
    }
}

fn milliseconds(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}
