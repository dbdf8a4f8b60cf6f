//! The crowd benchmark's report: what must show (rotation, drops, connections at the nodes),
//! what the crowd costs (memory, delay, CPU), and the crowd's own summary.

use std::{fmt::Write as _, net::SocketAddr, time::Duration};

use lb_tests::{
    cpu::Usage,
    crowd::{CrowdSummary, Steady, summary::Percentiles},
    prometheus,
};

use crate::{
    Settings,
    setup::{NODES, Snapshot, UPSTREAM_CAP},
};

/// Goals of the issue: resident memory per connected client, and the heads' p99 delay.
const RSS_PER_CLIENT_GOAL_KIB: f64 = 32.0;
const HEAD_DELAY_P99_GOAL_MS: f64 = 100.0;
/// A Substrate node's `--rpc-max-connections` default, which sim-node keeps.
const SUBSTRATE_MAX_CONNECTIONS: usize = 100;

pub struct Context<'a> {
    pub settings: &'a Settings,
    /// The nodes' RPC addresses, as the gateway's metrics name them.
    pub nodes: Vec<SocketAddr>,
    pub steady: &'a Steady,
    pub summary: &'a CrowdSummary,
    /// Before the crowd, once every node was in rotation.
    pub before: &'a Snapshot,
    /// When every client was in place, and when the hold ended (clients still connected).
    pub at_steady: &'a Snapshot,
    pub at_close: &'a Snapshot,
    /// After every client closed.
    pub after: &'a Snapshot,
    /// The crowd's own CPU during the hold, in cores, and the whole machine's.
    pub crowd_cores: f64,
    pub machine: Usage,
    pub load_before: f64,
    pub load_after: f64,
    pub elapsed: Duration,
}

/// lb-control's connections to one node, all of them and those upgraded to a WebSocket: before
/// the crowd, at the end of the hold, and the most at once (since the node started).
struct NodeConnections {
    before: usize,
    at_close: usize,
    peak: usize,
    websockets_before: usize,
    websockets_at_close: usize,
    websockets_peak: usize,
}

impl NodeConnections {
    /// WebSockets the crowd added at the node at most: the gateway's upstream links.
    fn links_added(&self) -> usize {
        self.websockets_peak.saturating_sub(self.websockets_before)
    }
}

/// The figures the report is about, worked out once.
struct Figures {
    /// Backends that moved out of `up`, or are out of rotation at the end.
    left_rotation: Vec<String>,
    dropped: usize,
    /// Per node, as the node counted them.
    connections: Vec<NodeConnections>,
    rss_per_client_kib: f64,
    cpu_us_per_notification: f64,
    /// lb-control's CPU during the hold, in cores.
    cpu_cores: f64,
    /// The gateway's own part of the heads' delay during the hold, p50 and p99 in ms: from the
    /// chain follower receiving a head to its copy written to each client
    /// (`lb_gateway_feed_delivery_seconds`).
    gateway_delivery_ms: Option<(f64, f64)>,
}

fn figures(context: &Context<'_>) -> Figures {
    let (before, after) = (context.before, context.after);
    let departures_before = before.departures();
    let mut left_rotation: Vec<String> = after
        .departures()
        .into_iter()
        .filter(|(backend, count)| {
            let earlier = departures_before
                .iter()
                .find(|(known, _)| known == backend)
                .map_or(0.0, |(_, count)| *count);
            *count > earlier
        })
        .map(|(backend, _)| backend)
        .collect();
    for backend in after.out_of_rotation() {
        if !left_rotation.contains(&backend) {
            left_rotation.push(backend);
        }
    }
    let connections = (0..NODES)
        .map(|index| NodeConnections {
            before: before.nodes[index].connections,
            at_close: context.at_close.nodes[index].connections,
            peak: after.nodes[index].peak_connections,
            websockets_before: before.nodes[index].websockets,
            websockets_at_close: context.at_close.nodes[index].websockets,
            websockets_peak: after.nodes[index].peak_websockets,
        })
        .collect();
    let connected = context.summary.connected.max(1) as f64;
    let rss_added = context.at_close.memory.rss_kib as f64 - context.before.memory.rss_kib as f64;
    let hold_cpu = context.at_close.cpu_seconds - context.at_steady.cpu_seconds;
    let hold_wall = context
        .at_close
        .at
        .duration_since(context.at_steady.at)
        .as_secs_f64();
    Figures {
        left_rotation,
        dropped: context.summary.dropped_total(),
        connections,
        rss_per_client_kib: rss_added / connected,
        cpu_us_per_notification: hold_cpu * 1e6 / context.summary.heads_in_steady.max(1) as f64,
        cpu_cores: hold_cpu / hold_wall.max(f64::EPSILON),
        gateway_delivery_ms: gateway_delivery_ms(context.at_steady, context.at_close),
    }
}

fn gateway_delivery_ms(from: &Snapshot, to: &Snapshot) -> Option<(f64, f64)> {
    const METRIC: &str = "lb_gateway_feed_delivery_seconds";
    let (before, after) = (
        prometheus::buckets(&from.metrics, METRIC),
        prometheus::buckets(&to.metrics, METRIC),
    );
    let ms = |q| prometheus::quantile_between(&before, &after, q).map(|seconds| seconds * 1e3);
    Some((ms(0.5)?, ms(0.99)?))
}

pub fn markdown(context: &Context<'_>) -> String {
    let figures = figures(context);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Crowd benchmark: {} WebSocket clients through the gateway\n",
        context.settings.clients
    );
    write_setup(&mut out, context);
    write_goals(&mut out, context, &figures);
    write_nodes(&mut out, context, &figures);
    write_crowd(&mut out, context, &figures);
    let _ = writeln!(
        out,
        "## The crowd's summary (JSON)\n\n```json\n{}\n```",
        serde_json::to_string_pretty(context.summary).unwrap_or_default()
    );
    out
}

fn write_setup(out: &mut String, context: &Context<'_>) {
    let settings = context.settings;
    let (kernel, cpus) = lb_tests::bench::machine();
    let _ = writeln!(
        out,
        "- Lab: client → LB → {NODES} sim-nodes (network namespaces, veth), kernel {kernel}, \
         {cpus} CPUs shared by the crowd, lb-control and the nodes.\n\
         - Nodes: sim-node with Substrate's limits (100 RPC connections, 1024 subscriptions per \
         connection), a block every {} ms; lb-control's chain-aware health checker on them.\n\
         - Gateway: lb-control, TLS on the LB's address, one API key; \
         `max_upstream_connections_per_node = {UPSTREAM_CAP}`, per-key and per-address limits \
         raised so the crowd is admitted.\n\
         - Crowd: {} clients from {} source addresses, {}/s while gathering; each subscribes to \
         `chain_subscribeNewHeads`{} and every {} ms on average (jittered ±50 %) calls \
         `system_chain` (cached by the gateway) and `system_localPeerId` (never cached). Held \
         {} s once every client was in place.\n\
         - Head delay: from when the node made the block (sim-node's genesis + number × block \
         time, by the wall clock) to when the notification arrived at the client's socket (the \
         kernel's receive stamp, `SO_TIMESTAMPNS`), heads of the hold only; beside it, to when \
         the client read it. The crowd runs as `SCHED_IDLE`, on CPU time nothing else wants, \
         as clients on machines of their own take none of the gateway's: it reads late, so \
         its reads are not the gateway's delay. The client's link has no XDP program and the \
         LB's end its offloads on, as a client's machine would (`Lab::plain_client_link`).\n\
         - RSS per client: lb-control's `VmRSS` at the end of the hold minus before the crowd, \
         ÷ clients connected. CPU per notification: lb-control's user + system time during the \
         hold ÷ head notifications the clients received in it (the calls' cost is in it too).\n\
         - Load average before / after: {:.2} / {:.2}; wall time {:.0} s.\n",
        settings.block_time_ms,
        settings.clients,
        settings.sources,
        settings.ramp_per_second,
        if settings.storage_subscription {
            ", holds `state_subscribeStorage` of `System.Number` on its node"
        } else {
            ""
        },
        settings.call_interval_ms,
        settings.hold_seconds,
        context.load_before,
        context.load_after,
        context.elapsed.as_secs_f64(),
    );
}

fn write_goals(out: &mut String, context: &Context<'_>, figures: &Figures) {
    let summary = context.summary;
    let most_added = figures
        .connections
        .iter()
        .map(NodeConnections::links_added)
        .max()
        .unwrap_or(0);
    let most_at_a_node = figures
        .connections
        .iter()
        .map(|node| node.peak)
        .max()
        .unwrap_or(0);
    let met = |ok: bool| if ok { "yes" } else { "**no**" };
    let left = if figures.left_rotation.is_empty() {
        "0".to_owned()
    } else {
        format!(
            "{} ({})",
            figures.left_rotation.len(),
            figures.left_rotation.join(", ")
        )
    };
    let _ = writeln!(
        out,
        "## What must show, and the goals\n\n\
         | measure | goal | measured | met |\n\
         |---|---:|---:|:-:|\n\
         | nodes that left the rotation | 0 | {left} | {} |\n\
         | clients dropped by the gateway | 0 | {} of {} connected | {} |\n\
         | upstream WebSocket connections the crowd added at a node (peak − before), most of any node | ≤ {UPSTREAM_CAP} | {most_added} | {} |\n\
         | lb-control's connections at a node at once (all kinds), most of any node | ≤ {SUBSTRATE_MAX_CONNECTIONS} | {most_at_a_node} | {} |\n\
         | lb-control RSS per connected client | ≤ {RSS_PER_CLIENT_GOAL_KIB:.0} KiB | {:.1} KiB | {} |\n\
         | head delay node → client (arrived at its socket), p99 | ≤ {HEAD_DELAY_P99_GOAL_MS:.0} ms | {:.1} ms (p50 {:.1} ms) | {} |\n\
         | head delay node → client's read, p99 | — | {:.1} ms (p50 {:.1} ms) | — |\n\
         | of which in the gateway (head received → written to the client), p99 | — | {} | — |\n\
         | lb-control CPU per head notification | — | {:.1} µs ({:.2} cores during the hold; the crowd {:.2}, the machine {:.0} % busy) | — |\n",
        met(figures.left_rotation.is_empty()),
        figures.dropped,
        summary.connected,
        met(figures.dropped == 0),
        met(most_added <= UPSTREAM_CAP as usize),
        met(most_at_a_node <= SUBSTRATE_MAX_CONNECTIONS),
        figures.rss_per_client_kib,
        met(figures.rss_per_client_kib <= RSS_PER_CLIENT_GOAL_KIB),
        summary.head_delay.p99_ms,
        summary.head_delay.p50_ms,
        met(summary.head_delay.samples > 0 && summary.head_delay.p99_ms <= HEAD_DELAY_P99_GOAL_MS),
        summary.head_read_delay.p99_ms,
        summary.head_read_delay.p50_ms,
        figures.gateway_delivery_ms.map_or("—".to_owned(), |(p50, p99)| {
            format!("{p99:.1} ms (p50 {p50:.1} ms; `lb_gateway_feed_delivery_seconds`, estimated from its buckets)")
        }),
        figures.cpu_us_per_notification,
        figures.cpu_cores,
        context.crowd_cores,
        context.machine.busy_fraction * 100.0,
    );
}

fn write_nodes(out: &mut String, context: &Context<'_>, figures: &Figures) {
    let _ = writeln!(
        out,
        "## Connections at the nodes (sim-node's own count)\n\n\
         lb-control's connections to each node as the node counts them, all kinds and those \
         upgraded to a WebSocket: before the crowd (the health checker's held WebSocket, the \
         chain follower's), at the end of the hold, and the most at once (since the node \
         started). The crowd's WebSockets at a node are the gateway's upstream links; its other \
         connections are HTTP (cache misses, the health checker's probe of a fresh connection). \
         Beside them the gateway's own count of its upstream links at the end of the hold. \
         Substrate's limit is {SUBSTRATE_MAX_CONNECTIONS} connections.\n\n\
         | node | all: before / end of hold / peak | WebSockets: before / end of hold / peak | WebSockets added (peak − before) | gateway's upstream links |\n\
         |---|---:|---:|---:|---:|"
    );
    let gateway = context.at_close.gateway_upstream_connections();
    for (index, node) in figures.connections.iter().enumerate() {
        let address = context.nodes[index].to_string();
        let upstream = gateway
            .iter()
            .find(|(node, _)| *node == address)
            .map_or("—".to_owned(), |(_, count)| format!("{count:.0}"));
        let _ = writeln!(
            out,
            "| {} ({address}) | {} / {} / {} | {} / {} / {} | {} | {upstream} |",
            context.before.nodes[index].id,
            node.before,
            node.at_close,
            node.peak,
            node.websockets_before,
            node.websockets_at_close,
            node.websockets_peak,
            node.links_added(),
        );
    }
    let failed: Vec<String> = context
        .after
        .failed_checks()
        .into_iter()
        .filter(|(_, _, count)| *count > 0.0)
        .map(|(node, result, count)| format!("{node} {result} × {count:.0}"))
        .collect();
    let _ = writeln!(
        out,
        "\nHealth checks that did not pass (since lb-control started): {}.\n",
        if failed.is_empty() {
            "none".to_owned()
        } else {
            failed.join(", ")
        }
    );
}

fn write_crowd(out: &mut String, context: &Context<'_>, figures: &Figures) {
    let summary = context.summary;
    let percentiles = |p: &Percentiles| {
        if p.samples == 0 {
            "—".to_owned()
        } else {
            format!(
                "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} samples)",
                p.p50_ms, p.p99_ms, p.max_ms, p.samples
            )
        }
    };
    let counts = |map: &dyn Fn() -> Vec<String>| {
        let list = map();
        if list.is_empty() {
            "none".to_owned()
        } else {
            list.join(", ")
        }
    };
    let _ = writeln!(
        out,
        "## The crowd\n\n\
         - Connected {} of {} in {:.1} s ({} not settled by then); refused: {}; failed to \
         connect: {}; dropped by the gateway: {}.\n\
         - Subscribed: new heads {}, storage {}; subscription errors {}.\n\
         - Head notifications: {} in all, {} during the hold; connected clients without any: \
         {}. Storage notifications: {}.\n\
         - Head delay: {}; until the client read it: {}.\n\
         - `system_chain` (cached): {} answered, {} failed, {} open at the close; {}.\n\
         - `system_localPeerId` (uncached): {} answered, {} failed, {} open at the close; {}.\n\
         - Connected clients without an answer of each kind: {}.\n\
         - lb-control: RSS {:.1} MiB before the crowd, {:.1} MiB at the end of the hold, {:.1} \
         MiB after the clients left (peak {:.1} MiB); CPU {:.2} cores during the hold. The \
         crowd itself (the load generator, on the same cores): {:.2} cores; the whole machine \
         {:.0} % busy during the hold.\n",
        summary.connected,
        summary.clients,
        context.steady.ramp_seconds,
        context.steady.unsettled,
        counts(&|| summary
            .refused
            .iter()
            .map(|(status, count)| format!("HTTP {status} × {count}"))
            .collect()),
        counts(&|| summary
            .failed
            .iter()
            .map(|(stage, count)| format!("{stage} × {count}"))
            .collect()),
        counts(&|| summary
            .dropped
            .iter()
            .map(|(code, count)| format!("{code} × {count}"))
            .collect()),
        summary.heads_subscribed,
        summary.storage_subscribed,
        summary.subscription_errors,
        summary.heads,
        summary.heads_in_steady,
        summary.clients_without_heads,
        summary.storage_notifications,
        percentiles(&summary.head_delay),
        percentiles(&summary.head_read_delay),
        summary.cached_calls.ok,
        summary.cached_calls.errors,
        summary.cached_calls.unanswered_at_close,
        percentiles(&summary.cached_calls.latency),
        summary.uncached_calls.ok,
        summary.uncached_calls.errors,
        summary.uncached_calls.unanswered_at_close,
        percentiles(&summary.uncached_calls.latency),
        summary.clients_without_answers,
        mebibytes(context.before.memory.rss_kib),
        mebibytes(context.at_close.memory.rss_kib),
        mebibytes(context.after.memory.rss_kib),
        mebibytes(context.after.memory.hwm_kib),
        figures.cpu_cores,
        context.crowd_cores,
        context.machine.busy_fraction * 100.0,
    );
    for (what, error) in [
        ("first failure to connect", &summary.first_failure),
        (
            "first subscription error",
            &summary.first_subscription_error,
        ),
        ("first call error", &summary.first_call_error),
    ] {
        if let Some(error) = error {
            let _ = writeln!(out, "- {what}: `{error}`");
        }
    }
    out.push('\n');
}

fn mebibytes(kib: u64) -> f64 {
    kib as f64 / 1024.0
}
