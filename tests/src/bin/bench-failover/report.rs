//! Each run's figures, their median/min/max, and the markdown report.

use std::{fmt, fmt::Write as _, time::Duration};

use lb_tests::{
    bench::median,
    load::{Kind, Outcome},
};

use crate::{CHECK_INTERVAL, KERNEL_POLL, NODES, PAUSE_AFTER_FAILURE, Settings, VIP};

/// When a request ran, relative to the node's death and its removal from the kernel's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Ended before the death.
    BeforeDeath,
    /// Ended after the death and started before the removal: the dead node could still be
    /// chosen.
    UntilRemoval,
    /// Started after the removal: the dead node could no longer be chosen.
    AfterRemoval,
}

const PHASES: [Phase; 3] = [Phase::BeforeDeath, Phase::UntilRemoval, Phase::AfterRemoval];
const KINDS: [Kind; 2] = [Kind::NewConnection, Kind::KeepAlive];

/// Where the tally of a phase and kind is kept in [`Run`].
fn slot(phase: Phase, kind: Kind) -> usize {
    let phase = match phase {
        Phase::BeforeDeath => 0,
        Phase::UntilRemoval => 1,
        Phase::AfterRemoval => 2,
    };
    let kind = match kind {
        Kind::NewConnection => 0,
        Kind::KeepAlive => 1,
    };
    phase * KINDS.len() + kind
}

/// Requests and failures of one phase and kind.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tally {
    pub requests: u64,
    pub failed: u64,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        self.requests += other.requests;
        self.failed += other.failed;
    }
}

impl fmt::Display for Tally {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} / {}", self.failed, self.requests)
    }
}

/// One run.
#[derive(Debug, Clone)]
pub struct Run {
    pub index: usize,
    pub victim: usize,
    /// From the SIGKILL to the first read of the kernel's table that showed the node down.
    pub removal: Duration,
    /// The slowest read of the kernel's table: with [`KERNEL_POLL`], the removal time's
    /// resolution.
    pub slowest_read: Duration,
    /// By phase and kind, see [`slot`].
    tallies: [Tally; PHASES.len() * KINDS.len()],
    /// How long after the removal the last failed request started: how long the dead node
    /// still got new connections although its state read down (there should be none).
    pub last_failure_after_removal: Option<Duration>,
    /// The first failures after the removal, for the report.
    pub quoted_failures: Vec<String>,
    /// lb-control's first error lines.
    pub lb_control_errors: Vec<String>,
}

impl Run {
    pub fn new(index: usize, victim: usize, removal: Duration, slowest_read: Duration) -> Run {
        Run {
            index,
            victim,
            removal,
            slowest_read,
            tallies: Default::default(),
            last_failure_after_removal: None,
            quoted_failures: Vec::new(),
            lb_control_errors: Vec::new(),
        }
    }

    pub fn count(&mut self, phase: Phase, outcome: &Outcome) {
        let tally = &mut self.tallies[slot(phase, outcome.kind)];
        tally.requests += 1;
        tally.failed += u64::from(!outcome.is_ok());
    }

    /// The tally of `phase`, of one kind or (None) both.
    pub fn tally(&self, phase: Phase, kind: Option<Kind>) -> Tally {
        let mut total = Tally::default();
        for each in KINDS {
            if kind.is_none_or(|kind| kind == each) {
                total.add(self.tallies[slot(phase, each)]);
            }
        }
        total
    }

    pub fn requests(&self) -> u64 {
        PHASES
            .iter()
            .map(|phase| self.tally(*phase, None).requests)
            .sum()
    }
}

impl fmt::Display for Run {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "run {}: node{} out of the table {:.0} ms after its death; failed/requests until \
             then: new connection {}, keep-alive {}; after: {}",
            self.index + 1,
            self.victim,
            ms(self.removal),
            self.tally(Phase::UntilRemoval, Some(Kind::NewConnection)),
            self.tally(Phase::UntilRemoval, Some(Kind::KeepAlive)),
            self.tally(Phase::AfterRemoval, None),
        )?;
        if let Some(after) = self.last_failure_after_removal {
            write!(f, " (the last {:.0} ms after the removal)", ms(after))?;
        }
        write!(f, "; {} requests in all", self.requests())
    }
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
        "# Failover benchmark: a node's death to its removal from the XDP service\n"
    );
    write_setup(&mut out, context);
    write_summary(&mut out, context.runs);
    write_runs(&mut out, context.runs);
    write_failures(&mut out, context.runs);
    out
}

fn write_setup(out: &mut String, context: &Context<'_>) {
    let settings = context.settings;
    let (kernel, cpus) = lb_tests::bench::machine();
    let slowest_read = context
        .runs
        .iter()
        .map(|run| run.slowest_read)
        .max()
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "- Lab: client → LB → {NODES} sim-nodes (network namespaces, veth), kernel {kernel}, \
         {cpus} CPUs shared by client, LB and nodes; a fresh lab per run.\n\
         - lb-control: full NAT on `{VIP}:9944`, XDP mode `{}`, `check = \"substrate\"` with the \
         default `[health]` settings (interval 1 s, fast_interval 200 ms, timeout 1 s, fall 2).\n\
         - Load from the client: {} worker(s) each opening a new connection per JSON-RPC POST \
         (`system_health`), and {} keep-alive connection(s) sending them in a loop; after a \
         failure a client waits {} ms before its next request (a keep-alive client on a new \
         connection).\n\
         - Death: SIGKILL of one sim-node (node0, node1, node2 in turn) after {} s of steady \
         load plus run/runs of the {} s check interval, so the runs meet the checks at \
         different points. Its host stays up, so its kernel refuses connections to it (RST) \
         rather than letting them time out.\n\
         - Removal: the first read of the kernel's backend table (the pinned maps, read every \
         {} ms; slowest read {:.1} ms) that shows the node down.\n\
         - Requests \"until removal\" ended after the death and started before the removal; \
         requests \"after removal\" started after it, during {} s. Failed / requests.\n\
         - Load average before / after: {:.2} / {:.2}; wall time {:.0} s.\n",
        settings.xdp_mode,
        settings.shape.new_connection_workers,
        settings.shape.keep_alive_connections,
        PAUSE_AFTER_FAILURE.as_millis(),
        settings.warmup.as_secs(),
        CHECK_INTERVAL.as_secs(),
        KERNEL_POLL.as_millis(),
        ms(slowest_read),
        settings.after.as_secs(),
        context.load_before,
        context.load_after,
        context.elapsed.as_secs_f64(),
    );
}

/// One figure of a run, for the summary.
type Figure = fn(&Run) -> f64;

fn write_summary(out: &mut String, runs: &[Run]) {
    let _ = writeln!(
        out,
        "## Over {} run(s)\n\n| | median | min | max |\n|---|---:|---:|---:|",
        runs.len()
    );
    let rows: [(&str, Figure); 5] = [
        ("death → removal, ms", |run| ms(run.removal)),
        ("failed until removal, new connection", |run| {
            run.tally(Phase::UntilRemoval, Some(Kind::NewConnection))
                .failed as f64
        }),
        ("failed until removal, keep-alive", |run| {
            run.tally(Phase::UntilRemoval, Some(Kind::KeepAlive)).failed as f64
        }),
        ("failed after removal", |run| {
            run.tally(Phase::AfterRemoval, None).failed as f64
        }),
        ("requests per run", |run| run.requests() as f64),
    ];
    for (label, value) in rows {
        let values: Vec<f64> = runs.iter().map(value).collect();
        let min = values.iter().copied().reduce(f64::min).unwrap_or(f64::NAN);
        let max = values.iter().copied().reduce(f64::max).unwrap_or(f64::NAN);
        let _ = writeln!(
            out,
            "| {label} | {:.0} | {min:.0} | {max:.0} |",
            median(values)
        );
    }
    out.push('\n');
}

fn write_runs(out: &mut String, runs: &[Run]) {
    let _ = writeln!(
        out,
        "## Every run\n\n\
         | run | killed | death → removal ms | until removal: new connection | until removal: \
         keep-alive | after removal | last failure after removal, ms | before death | requests |\n\
         |---:|---|---:|---:|---:|---:|---:|---:|---:|"
    );
    for run in runs {
        let _ = writeln!(
            out,
            "| {} | node{} | {:.0} | {} | {} | {} | {} | {} | {} |",
            run.index + 1,
            run.victim,
            ms(run.removal),
            run.tally(Phase::UntilRemoval, Some(Kind::NewConnection)),
            run.tally(Phase::UntilRemoval, Some(Kind::KeepAlive)),
            run.tally(Phase::AfterRemoval, None),
            run.last_failure_after_removal
                .map_or_else(|| "—".to_owned(), |after| format!("{:.0}", ms(after))),
            run.tally(Phase::BeforeDeath, None),
            run.requests(),
        );
    }
    out.push('\n');
}

/// Failures after the removal, quoted: each one is a request the table sent to a dead node,
/// or a fault elsewhere; and lb-control's errors, which say when a change did not reach the
/// kernel.
fn write_failures(out: &mut String, runs: &[Run]) {
    write_quoted(out, "Requests failed after the removal", runs, |run| {
        &run.quoted_failures
    });
    write_quoted(out, "lb-control logged errors", runs, |run| {
        &run.lb_control_errors
    });
}

/// A list of every run's `lines`, under `title`; nothing when there are none.
fn write_quoted(out: &mut String, title: &str, runs: &[Run], lines: fn(&Run) -> &[String]) {
    let quoted: Vec<String> = runs
        .iter()
        .flat_map(|run| {
            lines(run)
                .iter()
                .map(move |line| format!("- run {}: {line}", run.index + 1))
        })
        .collect();
    if !quoted.is_empty() {
        let _ = writeln!(
            out,
            "**{title}** (first {} per run):\n\n{}\n",
            crate::QUOTED_FAILURES,
            quoted.join("\n")
        );
    }
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}
