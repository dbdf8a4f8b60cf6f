//! The crowd: many WebSocket clients over TLS to the gateway, as a public endpoint meets them.
//!
//! Each client connects from one of several source addresses (bound before it connects),
//! trusts the lab's CA, subscribes to `chain_subscribeNewHeads` (which the gateway serves from
//! one shared subscription per node), optionally holds a subscription on the node
//! (`state_subscribeStorage` of `System.Number`), and every few seconds, jittered, calls one
//! method the gateway caches (`system_chain`) and one it never caches (`system_localPeerId`).
//! Clients open at a bounded rate (the ramp); once every one is connected and subscribed or
//! has failed, the crowd is steady and stays for the hold; then every client closes.
//!
//! A head's delay is measured from when the node made the block to when it reached the
//! client: sim-node makes block `n` at `genesis + n × block_time` by the wall clock (its
//! control API tells both), and the crowd runs on the same machine, under the same clock.
//!
//! The `crowd` binary runs [`run`] inside the lab's client namespace and prints each
//! [`Event`] as a line of JSON; [`CrowdProcess`] starts it from a test or a benchmark and reads
//! them. Modules: `client` (one client's life), [`summary`] (what every client saw, added up),
//! `process` (the binary as a child process).

mod arrival;
mod client;
mod process;
pub mod summary;

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU8, AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::{sync::Notify, task::JoinSet, time::Instant};
use tokio_util::sync::CancellationToken;

pub use process::{CpuShare, CrowdProcess, Steady};
pub use summary::CrowdSummary;

use client::ClientTally;

/// Sets a socket option that takes an int, as the crowd's clients set theirs.
fn set_socket_option(
    fd: std::os::fd::RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> std::io::Result<()> {
    // SAFETY: setsockopt with a pointer to a c_int and its size.
    let set = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if set != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// How long the crowd waits, after the last client started, for every client to be connected
/// and subscribed (or to have failed) before it reports the clients still on their way as
/// unsettled and goes on.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The environment variable the `crowd` binary reads its API key from.
pub const API_KEY_ENV: &str = "CROWD_API_KEY";

/// What a crowd does; also the `crowd` binary's command line.
#[derive(Debug, Clone, clap::Args)]
pub struct CrowdPlan {
    /// The gateway's TLS address (`IP:port`); its certificate must name the IP.
    #[arg(long)]
    pub gateway: SocketAddr,
    /// The API key every client uses (in the URL path, as `wss://gateway/<key>`). The binary
    /// takes it from the environment ([`API_KEY_ENV`]), so it never shows in a process list.
    #[arg(skip)]
    pub key: String,
    /// The CA certificate (PEM) the clients trust.
    #[arg(long)]
    pub ca: PathBuf,
    /// Source addresses, comma-separated; client i binds to address i mod their number.
    #[arg(long, value_delimiter = ',', required = true)]
    pub sources: Vec<IpAddr>,
    /// Clients in all.
    #[arg(long, default_value_t = 100)]
    pub clients: usize,
    /// New clients per second during the ramp.
    #[arg(long, default_value_t = 200.0)]
    pub ramp_per_second: f64,
    /// Seconds the whole crowd stays connected once it is in place.
    #[arg(long, default_value_t = 10)]
    pub hold_seconds: u64,
    /// Mean time between a client's rounds of calls, in ms (each round: one cached call, one
    /// uncached; the gap is drawn between half and one and a half of it).
    #[arg(long, default_value_t = 5000)]
    pub call_interval_ms: u64,
    /// Each client also holds a subscription on the node (`state_subscribeStorage` of
    /// `System.Number`), which takes a place on an upstream connection.
    #[arg(long)]
    pub storage_subscription: bool,
    /// When the nodes' block 0 was made (Unix ms): sim-node's `genesis_unix_ms`.
    #[arg(long)]
    pub genesis_unix_ms: u64,
    /// The nodes' block time in ms: sim-node's `block_time_ms`.
    #[arg(long)]
    pub block_time_ms: u64,
}

impl CrowdPlan {
    /// The command line that gives this plan back (the key travels in the environment, in
    /// [`API_KEY_ENV`]).
    pub fn to_args(&self) -> Vec<String> {
        let sources: Vec<String> = self.sources.iter().map(IpAddr::to_string).collect();
        let mut args = vec![
            "--gateway".to_owned(),
            self.gateway.to_string(),
            "--ca".to_owned(),
            self.ca.display().to_string(),
            "--sources".to_owned(),
            sources.join(","),
            "--clients".to_owned(),
            self.clients.to_string(),
            "--ramp-per-second".to_owned(),
            self.ramp_per_second.to_string(),
            "--hold-seconds".to_owned(),
            self.hold_seconds.to_string(),
            "--call-interval-ms".to_owned(),
            self.call_interval_ms.to_string(),
            "--genesis-unix-ms".to_owned(),
            self.genesis_unix_ms.to_string(),
            "--block-time-ms".to_owned(),
            self.block_time_ms.to_string(),
        ];
        if self.storage_subscription {
            args.push("--storage-subscription".to_owned());
        }
        args
    }

    /// How long the ramp takes at its rate.
    pub fn ramp(&self) -> Duration {
        Duration::from_secs_f64(self.clients as f64 / self.ramp_per_second)
    }

    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.clients == 0 {
            problems.push("--clients must be at least 1".to_owned());
        }
        if self.ramp_per_second.is_nan() || self.ramp_per_second <= 0.0 {
            problems.push("--ramp-per-second must be above 0".to_owned());
        }
        if self.call_interval_ms == 0 || self.block_time_ms == 0 {
            problems.push("--call-interval-ms and --block-time-ms must be at least 1".to_owned());
        }
        if self.sources.is_empty() {
            problems.push("--sources needs at least one address".to_owned());
        }
        problems
    }
}

/// What the crowd reports as it goes: one line of JSON each on the `crowd` binary's stdout,
/// `{"event": …, "data": …}` (adjacently tagged: an internally tagged enum would lose the
/// summary's numeric map keys on the way back).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", content = "data", rename_all = "snake_case")]
pub enum Event {
    /// Every client is connected and subscribed, or has failed: the hold starts.
    Steady {
        connected: usize,
        /// Clients neither in place nor failed after the settle timeout.
        unsettled: usize,
        ramp_seconds: f64,
    },
    /// The hold is over: the clients close now.
    Closing,
    /// Everything every client saw.
    Summary(Box<CrowdSummary>),
}

/// Where the crowd is; a client counts heads and their delays only in the steady phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Phase {
    Ramp = 0,
    Steady = 1,
    Closing = 2,
}

/// What every client shares.
struct Shared {
    plan: CrowdPlan,
    tls: tokio_rustls::TlsConnector,
    phase: AtomicU8,
    /// Cancelled at the end of the hold: every client closes.
    stop: CancellationToken,
    /// Clients connected and subscribed, or failed.
    settled: AtomicUsize,
    /// Clients connected (whether or not still open).
    connected: AtomicUsize,
    settled_changed: Notify,
}

impl Shared {
    fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Relaxed) {
            0 => Phase::Ramp,
            1 => Phase::Steady,
            _ => Phase::Closing,
        }
    }

    fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Relaxed);
    }

    fn settle(&self) {
        self.settled.fetch_add(1, Ordering::Relaxed);
        self.settled_changed.notify_one();
    }
}

/// Runs the crowd of `plan` from this process's network namespace, reporting each [`Event`]
/// to `emit` (the summary too, which it also returns).
pub async fn run(plan: CrowdPlan, mut emit: impl FnMut(&Event)) -> anyhow::Result<CrowdSummary> {
    let problems = plan.problems();
    anyhow::ensure!(problems.is_empty(), "{}", problems.join("; "));
    let tls = crate::lab::certs::trusting_client(&plan.ca)?;
    let clients = plan.clients;
    let shared = Arc::new(Shared {
        tls: tokio_rustls::TlsConnector::from(tls),
        phase: AtomicU8::new(Phase::Ramp as u8),
        stop: CancellationToken::new(),
        settled: AtomicUsize::new(0),
        connected: AtomicUsize::new(0),
        settled_changed: Notify::new(),
        plan,
    });

    let started = Instant::now();
    let mut running = JoinSet::new();
    for index in 0..clients {
        let due = started + Duration::from_secs_f64(index as f64 / shared.plan.ramp_per_second);
        tokio::time::sleep_until(due).await;
        running.spawn(client::run(shared.clone(), index));
    }
    let settle_by = Instant::now() + SETTLE_TIMEOUT;
    while shared.settled.load(Ordering::Relaxed) < clients && Instant::now() < settle_by {
        // Bounded, so a notification lost between the check and the wait costs a second.
        let _ =
            tokio::time::timeout(Duration::from_secs(1), shared.settled_changed.notified()).await;
    }
    let ramp = started.elapsed();
    shared.set_phase(Phase::Steady);
    emit(&Event::Steady {
        connected: shared.connected.load(Ordering::Relaxed),
        unsettled: clients.saturating_sub(shared.settled.load(Ordering::Relaxed)),
        ramp_seconds: ramp.as_secs_f64(),
    });

    let hold = Duration::from_secs(shared.plan.hold_seconds);
    tokio::time::sleep(hold).await;
    shared.set_phase(Phase::Closing);
    emit(&Event::Closing);
    shared.stop.cancel();

    let mut tallies: Vec<ClientTally> = Vec::with_capacity(clients);
    while let Some(tally) = running.join_next().await {
        tallies.push(tally.context("a crowd client panicked")?);
    }
    let summary = summary::add_up(&tallies, ramp, hold);
    emit(&Event::Summary(Box::new(summary.clone())));
    Ok(summary)
}
