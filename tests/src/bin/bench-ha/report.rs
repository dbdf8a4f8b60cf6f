//! Each run's figures, their medians over the runs of a scenario, the goals checked
//! against them, and the markdown report.

use std::{fmt::Write as _, time::Duration};

use lb_tests::{bench::median, wrk::Pause};

use crate::{
    NODES, Settings,
    load::{AGE_BUCKETS, HttpKind},
    scenario::Scenario,
};

/// One HTTP load's figures in a run.
#[derive(Debug, Clone, Default)]
pub struct HttpFigures {
    /// The longest pause in answers after the event; when it ended, answers came again (None:
    /// they did not before the load stopped).
    pub pause: Option<Pause>,
    pub answered: u64,
    /// Requests sent and lost: an error answer, a reset or closed connection, a timeout.
    pub failed: u64,
    /// Connections refused or not made (no request was sent on them).
    pub refused_connects: u64,
    pub first_failure: Option<String>,
}

/// The polkadot.js clients' figures in a run.
#[derive(Debug, Clone, Default)]
pub struct WebSocketFigures {
    pub clients: usize,
    /// Reconnections after the event (one per client that lost its connection): from the
    /// disconnect to connected again, and from the event to connected again.
    pub reconnect: Vec<Duration>,
    pub event_to_connected: Vec<Duration>,
    /// Of those, the ones that heard a head again (their subscription made anew).
    pub heads_again: usize,
    /// Calls a disconnect cut off, and calls answered with an error.
    pub cut_off: u64,
    pub error_answers: u64,
}

/// The admin write loop's figures in a run.
#[derive(Debug, Clone, Default)]
pub struct WriteFigures {
    pub acknowledged: usize,
    pub refused: usize,
    /// From the event to the first write acknowledged after it.
    pub acknowledged_again: Option<Duration>,
    /// Acknowledged writes the new master does not list.
    pub lost: Vec<String>,
}

/// The long-lived L4 connections of one age bucket in a run.
#[derive(Debug, Clone, Copy, Default)]
pub struct Flows {
    pub connections: usize,
    pub broken: usize,
}

/// One run of one scenario.
#[derive(Debug, Clone)]
pub struct Run {
    pub scenario: Scenario,
    pub index: usize,
    /// From the event until the standby held every floating address.
    pub vip_on_standby: Duration,
    /// By [`HttpKind::ALL`]'s order.
    pub http: Vec<HttpFigures>,
    pub websocket: WebSocketFigures,
    pub writes: WriteFigures,
    /// By [`AGE_BUCKETS`]' order.
    pub flows: [Flows; AGE_BUCKETS.len()],
    /// The first broken long-lived connections' errors, to quote.
    pub broken: Vec<String>,
}

/// A shorter pause in answers is the load's own jitter (at the default pace each wrk load is
/// answered several times per 10 ms step), not an interruption.
const NOTICEABLE_PAUSE: Duration = Duration::from_millis(50);

impl HttpFigures {
    /// From the event until answers came again after a pause of [`NOTICEABLE_PAUSE`] or more;
    /// zero when they never paused that long.
    fn answered_again(&self) -> Option<Duration> {
        self.pause.map(|pause| {
            if pause.ended - pause.began >= NOTICEABLE_PAUSE {
                pause.ended
            } else {
                Duration::ZERO
            }
        })
    }
}

impl Run {
    fn http(&self, kind: HttpKind) -> &HttpFigures {
        let index = HttpKind::ALL
            .iter()
            .position(|each| *each == kind)
            .unwrap_or_default();
        &self.http[index]
    }

    /// Long-lived connections broken whose age at the event was at least `age`.
    fn broken_older_than(&self, age: Duration) -> usize {
        AGE_BUCKETS
            .iter()
            .zip(&self.flows)
            .filter(|(bucket, _)| bucket.is_older_than(age))
            .map(|(_, flows)| flows.broken)
            .sum()
    }

    /// A line for the console while the benchmark runs.
    pub fn line(&self) -> String {
        let pauses: Vec<String> = HttpKind::ALL
            .iter()
            .map(|kind| format!("{} {}", kind.name(), pause_text(self.http(*kind).pause)))
            .collect();
        let broken: Vec<String> = self
            .flows
            .iter()
            .map(|flows| format!("{}/{}", flows.broken, flows.connections))
            .collect();
        format!(
            "{} run {}: VIP on the standby {:.0} ms; longest pause in answers: {}; WebSocket reconnect max \
             {}; write acknowledged again {}; L4 connections broken by age {}; {} acknowledged \
             writes lost",
            self.scenario.name(),
            self.index + 1,
            ms(self.vip_on_standby),
            pauses.join(", "),
            ms_or_never(self.websocket.reconnect.iter().max().copied()),
            ms_or_never(self.writes.acknowledged_again),
            broken.join(" "),
            self.writes.lost.len(),
        )
    }
}

/// A goal of the issue and how a scenario's runs are held to it.
pub struct Goal {
    pub what: &'static str,
    /// The figure over the runs, as shown.
    figure: fn(&[&Run]) -> String,
    met: fn(&[&Run]) -> bool,
}

/// What the issue asks of an unplanned takeover.
pub const UNPLANNED_GOALS: [Goal; 3] = [
    Goal {
        what: "the standby answers ≤ 1 s after the event (gateway, median of the runs)",
        figure: |runs| ms_or_never(median_again(runs, HttpKind::Gateway)),
        met: |runs| {
            median_again(runs, HttpKind::Gateway)
                .is_some_and(|again| again <= Duration::from_secs(1))
        },
    },
    Goal {
        what: "0 L4 connections older than 1 s broken (all runs)",
        figure: |runs| broken_older_than_a_second(runs).to_string(),
        met: |runs| broken_older_than_a_second(runs) == 0,
    },
    Goal {
        what: "0 acknowledged admin writes lost (all runs)",
        figure: |runs| lost_writes(runs).to_string(),
        met: |runs| lost_writes(runs) == 0,
    },
];

/// What the issue asks of a planned handover.
pub const PLANNED_GOALS: [Goal; 3] = [
    Goal {
        what: "0 failed HTTP requests, connections refused included (every kind, all runs)",
        figure: |runs| failed_requests(runs).to_string(),
        met: |runs| failed_requests(runs) == 0,
    },
    Goal {
        what: "0 L4 connections broken, any age (all runs)",
        figure: |runs| broken_older_than(runs, Duration::ZERO).to_string(),
        met: |runs| broken_older_than(runs, Duration::ZERO) == 0,
    },
    Goal {
        what: "polkadot.js: every client back ≤ 1 s after its close, no call failed (all runs)",
        figure: |runs| {
            format!(
                "slowest {}, {} failed calls",
                ms_or_never(slowest_reconnect(runs)),
                failed_js_calls(runs)
            )
        },
        met: |runs| {
            slowest_reconnect(runs).is_some_and(|slowest| slowest <= Duration::from_secs(1))
                && failed_js_calls(runs) == 0
        },
    },
];

fn failed_requests(runs: &[&Run]) -> u64 {
    runs.iter()
        .flat_map(|run| &run.http)
        .map(|http| http.failed + http.refused_connects)
        .sum()
}

fn broken_older_than(runs: &[&Run], age: Duration) -> usize {
    runs.iter().map(|run| run.broken_older_than(age)).sum()
}

/// The slowest reconnection of every run; None when a run had none (no client was moved).
fn slowest_reconnect(runs: &[&Run]) -> Option<Duration> {
    runs.iter()
        .map(|run| run.websocket.reconnect.iter().max().copied())
        .collect::<Option<Vec<_>>>()?
        .into_iter()
        .max()
}

fn failed_js_calls(runs: &[&Run]) -> u64 {
    runs.iter()
        .map(|run| run.websocket.cut_off + run.websocket.error_answers)
        .sum()
}

/// The median over `runs` of when `kind` was answered again; None if in any run it never was.
fn median_again(runs: &[&Run], kind: HttpKind) -> Option<Duration> {
    let agains: Option<Vec<f64>> = runs
        .iter()
        .map(|run| run.http(kind).answered_again().map(ms))
        .collect();
    let median = median(agains?);
    (!median.is_nan()).then(|| Duration::from_secs_f64(median / 1e3))
}

fn broken_older_than_a_second(runs: &[&Run]) -> usize {
    broken_older_than(runs, Duration::from_secs(1))
}

fn lost_writes(runs: &[&Run]) -> usize {
    runs.iter().map(|run| run.writes.lost.len()).sum()
}

pub struct Context<'a> {
    pub settings: &'a Settings,
    pub runs: &'a [Run],
    pub load_before: f64,
    pub load_after: f64,
    pub elapsed: Duration,
}

pub fn markdown(context: &Context<'_>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HA benchmark: the master of the pair fails, or hands over, under load\n"
    );
    write_setup(&mut out, context);
    for scenario in &context.settings.scenarios {
        let runs: Vec<&Run> = context
            .runs
            .iter()
            .filter(|run| run.scenario == *scenario)
            .collect();
        write_scenario(&mut out, *scenario, &runs);
    }
    write_runs(&mut out, context.runs);
    write_quoted(&mut out, context.runs);
    out
}

fn write_setup(out: &mut String, context: &Context<'_>) {
    let settings = context.settings;
    let (kernel, cpus) = lb_tests::bench::machine();
    let http: Vec<String> = HttpKind::ALL
        .iter()
        .map(|kind| format!("{} ({} connections)", kind.name(), kind.connections()))
        .collect();
    let ages: Vec<&str> = AGE_BUCKETS.iter().map(|bucket| bucket.name).collect();
    let _ = writeln!(
        out,
        "- Lab: the HA pair of `cargo xtask run --ha` (client, LB a and LB b each running \
         lb-control and keepalived with VRRPv3 adverts every 100 ms, {NODES} sim-nodes, etcd on \
         both LBs and a fallback site, L4 flow sync on), kernel {kernel}, {cpus} CPUs shared by \
         everything; a fresh lab per run. LB a is master when the event comes; LB b takes over.\n\
         - Load from the client namespace, started before the event: wrk, each connection \
         waiting {} ms after an answer before its next request: {}; {} polkadot.js clients \
         (`@polkadot/api`, reconnecting 250 ms after a close) following new heads through the \
         gateway and calling `system_chain` every 500 ms; an admin write loop at the floating \
         address (an API key, then a backend of a service of its own, every 100 ms, 1 s to \
         answer); {} keep-alive connections through the L4 NAT service opened so that their \
         ages at the event spread evenly over {} ({} s to 10 s), each asked once then and once \
         after.\n\
         - Figures per run, then medians over the runs: the floating addresses on the standby \
         (read every 5 ms); \"answered again\": from the event to the first answer after the \
         longest pause in answers that begins after it (10 ms steps), 0 when answers never \
         paused for {} ms or more; failed requests (an \
         error answer, a reset, a timeout) apart from connections refused before a request; \
         L4 connections broken (an error, or another node answering) after {} s, by their age \
         at the event; WebSocket reconnections (disconnect → connected, event → connected, \
         p50 and max per run); acknowledged admin writes the new master does not list.\n\
         - Load average before / after: {:.2} / {:.2}; wall time {:.0} s.\n",
        settings.pace.as_millis(),
        http.join(", "),
        settings.ws_clients,
        settings.l4_connections,
        ages.join(", "),
        AGE_BUCKETS[0].from.as_secs_f64(),
        NOTICEABLE_PAUSE.as_millis(),
        settings.after.as_secs(),
        context.load_before,
        context.load_after,
        context.elapsed.as_secs_f64(),
    );
}

/// A figure of one run, in ms or a count; NaN when the run has none.
type Figure = Box<dyn Fn(&Run) -> f64>;

fn write_scenario(out: &mut String, scenario: Scenario, runs: &[&Run]) {
    let _ = writeln!(
        out,
        "## {} ({} runs)\n\n{}.\n\n| goal | over the runs | met |\n|---|---:|---|",
        scenario.name(),
        runs.len(),
        scenario.description()
    );
    for goal in scenario.goals() {
        let _ = writeln!(
            out,
            "| {} | {} | {} |",
            goal.what,
            (goal.figure)(runs),
            if (goal.met)(runs) { "yes" } else { "**no**" }
        );
    }
    let _ = writeln!(out, "\n| | median | min | max |\n|---|---:|---:|---:|");
    let mut rows: Vec<(String, Figure)> = vec![(
        "floating addresses on the standby, ms".to_owned(),
        Box::new(|run: &Run| ms(run.vip_on_standby)),
    )];
    for kind in HttpKind::ALL {
        rows.push((
            format!("{}: answered again, ms", kind.name()),
            Box::new(move |run: &Run| run.http(kind).answered_again().map_or(f64::NAN, ms)),
        ));
    }
    rows.push((
        "admin write acknowledged again, ms".to_owned(),
        Box::new(|run: &Run| run.writes.acknowledged_again.map_or(f64::NAN, ms)),
    ));
    rows.push((
        "WebSocket reconnect (disconnect → connected) p50, ms".to_owned(),
        Box::new(|run: &Run| median_ms(&run.websocket.reconnect)),
    ));
    rows.push((
        "WebSocket reconnect max, ms".to_owned(),
        Box::new(|run: &Run| max_ms(&run.websocket.reconnect)),
    ));
    rows.push((
        "WebSocket event → connected max, ms".to_owned(),
        Box::new(|run: &Run| max_ms(&run.websocket.event_to_connected)),
    ));
    for kind in HttpKind::ALL {
        rows.push((
            format!("{}: failed requests", kind.name()),
            Box::new(move |run: &Run| run.http(kind).failed as f64),
        ));
        rows.push((
            format!("{}: refused connects", kind.name()),
            Box::new(move |run: &Run| run.http(kind).refused_connects as f64),
        ));
    }
    rows.push((
        "WebSocket calls cut off by a disconnect".to_owned(),
        Box::new(|run: &Run| run.websocket.cut_off as f64),
    ));
    rows.push((
        "admin writes refused or unanswered".to_owned(),
        Box::new(|run: &Run| run.writes.refused as f64),
    ));
    rows.push((
        "admin writes acknowledged".to_owned(),
        Box::new(|run: &Run| run.writes.acknowledged as f64),
    ));
    for (label, figure) in rows {
        let values: Vec<f64> = runs.iter().map(|run| figure(run)).collect();
        let _ = writeln!(out, "| {label} | {} |", spread(&values));
    }
    let _ = writeln!(
        out,
        "\n| L4 connections by age at the event | broken / connections (all runs) |\n|---|---:|"
    );
    for (index, bucket) in AGE_BUCKETS.iter().enumerate() {
        let broken: usize = runs.iter().map(|run| run.flows[index].broken).sum();
        let connections: usize = runs.iter().map(|run| run.flows[index].connections).sum();
        let _ = writeln!(out, "| {} | {broken} / {connections} |", bucket.name);
    }
    out.push('\n');
}

/// `median | min | max` of `values`, NaN ones shown as "never" and left out of the median.
fn spread(values: &[f64]) -> String {
    let known: Vec<f64> = values
        .iter()
        .copied()
        .filter(|value| !value.is_nan())
        .collect();
    let never = values.len() - known.len();
    let min = known.iter().copied().reduce(f64::min);
    let max = known.iter().copied().reduce(f64::max);
    let show =
        |value: Option<f64>| value.map_or_else(|| "—".to_owned(), |value| format!("{value:.0}"));
    let median = show((!known.is_empty()).then(|| median(known.clone())));
    let never = if never > 0 {
        format!(" ({never} never)")
    } else {
        String::new()
    };
    format!("{median}{never} | {} | {}", show(min), show(max))
}

fn write_runs(out: &mut String, runs: &[Run]) {
    let kinds: Vec<&str> = HttpKind::ALL.iter().map(|kind| kind.name()).collect();
    let ages: Vec<&str> = AGE_BUCKETS.iter().map(|bucket| bucket.name).collect();
    let _ = writeln!(
        out,
        "## Every run\n\n\
         The longest pause in answers after the event (its length, then from–to counted from \
         the event), and \
         failed requests / refused connects / answered requests, for: {}. \
         WebSocket clients reconnected / heard heads again / all. L4 connections broken / \
         opened by age: {}.\n\n\
         | scenario | run | VIP on standby, ms | longest pause | failed / refused / answered | \
         WebSocket reconnect p50 / max, ms | WebSocket clients | write acknowledged again | \
         writes acknowledged / refused / lost | L4 connections broken |\n\
         |---|---:|---:|---|---|---|---|---:|---|---|",
        kinds.join("; "),
        ages.join(", "),
    );
    for run in runs {
        let pauses: Vec<String> = run.http.iter().map(|http| pause_text(http.pause)).collect();
        let failed: Vec<String> = run
            .http
            .iter()
            .map(|http| {
                format!(
                    "{} / {} / {}",
                    http.failed, http.refused_connects, http.answered
                )
            })
            .collect();
        let broken: Vec<String> = run
            .flows
            .iter()
            .map(|flows| format!("{}/{}", flows.broken, flows.connections))
            .collect();
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {} | {} | {:.0} / {:.0} | {} / {} / {} | {} | {} / {} / {} | {} |",
            run.scenario.name(),
            run.index + 1,
            ms(run.vip_on_standby),
            pauses.join("; "),
            failed.join("; "),
            median_ms(&run.websocket.reconnect),
            max_ms(&run.websocket.reconnect),
            run.websocket.reconnect.len(),
            run.websocket.heads_again,
            run.websocket.clients,
            ms_or_never(run.writes.acknowledged_again),
            run.writes.acknowledged,
            run.writes.refused,
            run.writes.lost.len(),
            broken.join(" "),
        );
    }
    out.push('\n');
}

/// What failed, quoted: each kind's first failure, the broken connections, the lost writes.
fn write_quoted(out: &mut String, runs: &[Run]) {
    let mut lines = Vec::new();
    for run in runs {
        let tag = format!("{} run {}", run.scenario.name(), run.index + 1);
        for (kind, http) in HttpKind::ALL.iter().zip(&run.http) {
            if let Some(failure) = &http.first_failure {
                lines.push(format!(
                    "- {tag}, {}: first failed answer: {failure}",
                    kind.name()
                ));
            }
        }
        for broken in &run.broken {
            lines.push(format!("- {tag}, L4 connection broken: {broken}"));
        }
        for lost in &run.writes.lost {
            lines.push(format!("- {tag}, acknowledged write missing: {lost}"));
        }
        if run.websocket.error_answers > 0 {
            lines.push(format!(
                "- {tag}, polkadot.js: {} calls answered with an error",
                run.websocket.error_answers
            ));
        }
    }
    if !lines.is_empty() {
        let _ = writeln!(out, "**What failed**\n\n{}\n", lines.join("\n"));
    }
}

/// The median of `durations` in ms; NaN for none.
fn median_ms(durations: &[Duration]) -> f64 {
    median(durations.iter().copied().map(ms).collect())
}

/// The longest of `durations` in ms; NaN for none.
fn max_ms(durations: &[Duration]) -> f64 {
    durations.iter().max().map_or(f64::NAN, |max| ms(*max))
}

/// The pause's length first, then when it was (`10 ms, 1031–1041 ms after`): the bounds alone
/// read as a length (a 10 ms gap at 2 s was once reported as a 2 s pause).
fn pause_text(pause: Option<Pause>) -> String {
    pause.map_or_else(
        || "no answer again".to_owned(),
        |pause| {
            format!(
                "{:.0} ms ({:.0}–{:.0} ms after)",
                ms(pause.ended - pause.began),
                ms(pause.began),
                ms(pause.ended)
            )
        },
    )
}

fn ms_or_never(duration: Option<Duration>) -> String {
    duration.map_or_else(
        || "never".to_owned(),
        |duration| format!("{:.0} ms", ms(duration)),
    )
}

pub fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}
