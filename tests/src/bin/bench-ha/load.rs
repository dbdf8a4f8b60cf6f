//! The load a run puts on the pair from the client namespace, started before the event and
//! read after it: wrk through the gateway and through the L4 NAT service, polkadot.js clients
//! following new heads, the admin write loop, and long-lived L4 connections of known ages.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use lb_tests::{
    admin_writes::{WriteLog, WriteLoop, WriteTarget},
    bench::check_interrupted,
    js_client::FollowingClients,
    lab::PairLab,
    rpc_client::{KeepAlive, SYSTEM_HEALTH},
    wrk,
};
use serde::Deserialize;

use crate::Settings;

/// The gateway's call: answered from its cache, so it measures the gateway, not the nodes.
const GATEWAY_CALL: &str = r#"{"jsonrpc":"2.0","id":"ha","method":"system_chain"}"#;
/// How long wrk may run: it is stopped once a run has what it needs.
const WRK_SECONDS: u64 = 600;
/// How long the polkadot.js clients may run: they are stopped the same way.
const JS_MAX_SECONDS: u64 = 600;
/// How long an admin write may wait for its answer: a tool that retries soon.
const WRITE_ANSWER_TIMEOUT: Duration = Duration::from_secs(1);
/// The pause between admin writes.
const WRITE_PACE: Duration = Duration::from_millis(100);

/// The HTTP loads, each a wrk at a steady pace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpKind {
    /// HTTPS keep-alive to the gateway at the floating address.
    Gateway,
    /// Keep-alive HTTP through the L4 NAT service at the floating VIP.
    L4KeepAlive,
    /// A new connection per request through the L4 NAT service.
    L4NewConnection,
}

impl HttpKind {
    pub const ALL: [HttpKind; 3] = [
        HttpKind::Gateway,
        HttpKind::L4KeepAlive,
        HttpKind::L4NewConnection,
    ];

    pub fn name(self) -> &'static str {
        match self {
            HttpKind::Gateway => "gateway, HTTPS keep-alive",
            HttpKind::L4KeepAlive => "L4 NAT, keep-alive",
            HttpKind::L4NewConnection => "L4 NAT, new connection each",
        }
    }

    fn file_stem(self) -> &'static str {
        match self {
            HttpKind::Gateway => "wrk-gateway",
            HttpKind::L4KeepAlive => "wrk-l4-keep-alive",
            HttpKind::L4NewConnection => "wrk-l4-new-connection",
        }
    }

    pub fn connections(self) -> usize {
        match self {
            HttpKind::Gateway | HttpKind::L4KeepAlive => 8,
            HttpKind::L4NewConnection => 4,
        }
    }

    fn url(self, lab: &PairLab, key: &str) -> String {
        match self {
            HttpKind::Gateway => lab.gateway_url(key),
            HttpKind::L4KeepAlive | HttpKind::L4NewConnection => format!("http://{}", lab.vip()),
        }
    }

    fn body(self) -> &'static str {
        match self {
            HttpKind::Gateway => GATEWAY_CALL,
            HttpKind::L4KeepAlive | HttpKind::L4NewConnection => SYSTEM_HEALTH,
        }
    }

    fn headers(self) -> &'static [(&'static str, &'static str)] {
        match self {
            HttpKind::Gateway | HttpKind::L4KeepAlive => &[],
            HttpKind::L4NewConnection => &[("Connection", "close")],
        }
    }
}

/// A polkadot.js client's reconnection, wall-clock milliseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct Reconnection {
    pub down: u64,
    pub up: u64,
    /// The first head after it: the subscription was made anew.
    pub head: Option<u64>,
}

/// What the polkadot.js clients reported.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JsSummary {
    pub clients: usize,
    pub reconnections: Vec<Reconnection>,
    pub error_answers: u64,
    pub cut_off: u64,
}

/// Everything the loads saw, once stopped.
pub struct LoadResults {
    /// By [`HttpKind::ALL`]'s order.
    pub http: Vec<wrk::CountedReads>,
    pub js: JsSummary,
    pub writes: WriteLog,
}

/// The loads of one run, running.
pub struct Loads {
    wrks: Vec<wrk::Background>,
    js: FollowingClients,
    pub writes: WriteLoop,
}

impl Loads {
    /// Starts every load and returns once the polkadot.js clients follow heads.
    pub fn start(lab: &PairLab, settings: &Settings, key: &str) -> anyhow::Result<Loads> {
        let client = &lab.client().netns;
        let mut wrks = Vec::new();
        for kind in HttpKind::ALL {
            let script = lab.log_dir().join(format!("{}.lua", kind.file_stem()));
            let lua = wrk::paced_timeline_script(kind.body(), kind.headers(), settings.pace);
            std::fs::write(&script, lua)
                .with_context(|| format!("writing {}", script.display()))?;
            let url = kind.url(lab, key);
            let load = wrk::Background::start(&wrk::Load {
                netns: client,
                threads: 1,
                connections: kind.connections(),
                seconds: WRK_SECONDS,
                script: &script,
                url: &url,
            })
            .with_context(|| format!("starting wrk ({})", kind.name()))?;
            wrks.push(load);
        }
        let url = lab.gateway_url(key).replacen("https://", "wss://", 1);
        let js = FollowingClients::start(
            client,
            lab.ca(),
            &url,
            settings.ws_clients,
            JS_MAX_SECONDS,
            lab.log_dir().join("js-clients.ready"),
        )?;
        let writes = WriteLoop::start(WriteTarget::pair_floating_address(
            lab,
            WRITE_PACE,
            WRITE_ANSWER_TIMEOUT,
        ))
        .context("starting the admin write loop")?;
        Ok(Loads { wrks, js, writes })
    }

    /// Stops every load and reads what it saw.
    pub fn stop(self) -> anyhow::Result<LoadResults> {
        let Loads { wrks, js, writes } = self;
        let http = wrks
            .into_iter()
            .zip(HttpKind::ALL)
            .map(|(load, kind)| {
                load.stop()
                    .with_context(|| format!("wrk ({})", kind.name()))
            })
            .collect::<anyhow::Result<_>>()?;
        let summary = js.finish()?;
        let js = serde_json::from_value(summary.clone())
            .with_context(|| format!("reading the polkadot.js summary {summary}"))?;
        let writes = writes.stop()?;
        Ok(LoadResults { http, js, writes })
    }
}

/// Waits until the polkadot.js clients wrote `ready` (each started and heard a head); returns
/// them, still running.
/// The ages long-lived connections have at the event, in buckets.
pub const AGE_BUCKETS: [AgeBucket; 4] = [
    AgeBucket {
        name: "< 0.5 s",
        from: Duration::from_millis(100),
        to: Duration::from_millis(500),
    },
    AgeBucket {
        name: "0.5–1 s",
        from: Duration::from_millis(500),
        to: Duration::from_secs(1),
    },
    AgeBucket {
        name: "1–5 s",
        from: Duration::from_secs(1),
        to: Duration::from_secs(5),
    },
    AgeBucket {
        name: "> 5 s",
        from: Duration::from_secs(5),
        to: Duration::from_secs(10),
    },
];

/// A range of ages: the connections opened for it are spread over `from..to`.
#[derive(Debug, Clone, Copy)]
pub struct AgeBucket {
    pub name: &'static str,
    pub from: Duration,
    pub to: Duration,
}

impl AgeBucket {
    /// The bucket of a connection `age` old: by where it is, whatever it was planned to be.
    pub fn of(age: Duration) -> usize {
        AGE_BUCKETS
            .iter()
            .position(|bucket| age < bucket.to)
            .unwrap_or(AGE_BUCKETS.len() - 1)
    }

    /// Whether every connection of this bucket is older than `age`.
    pub fn is_older_than(&self, age: Duration) -> bool {
        self.from >= age
    }
}

/// The ages `count` connections are opened at, oldest first: the same number in each bucket,
/// evenly spread within it.
fn planned_ages(count: usize) -> Vec<Duration> {
    let per_bucket = count.div_ceil(AGE_BUCKETS.len());
    let mut ages: Vec<Duration> = AGE_BUCKETS
        .iter()
        .flat_map(|bucket| {
            (0..per_bucket).map(move |index| {
                let share = (index as f64 + 0.5) / per_bucket as f64;
                bucket.from + (bucket.to - bucket.from).mul_f64(share)
            })
        })
        .take(count)
        .collect();
    ages.sort_by(|a, b| b.cmp(a));
    ages
}

/// Keep-alive connections through the L4 NAT service, each opened at a planned time before the
/// event and asked once then.
pub struct LongLived {
    connections: Vec<(Instant, KeepAlive)>,
}

impl LongLived {
    /// Opens `count` connections so that at the returned moment, the event's, they have the
    /// [`planned_ages`]; returns that moment once it has come.
    pub fn open_before_event(lab: &PairLab, count: usize) -> anyhow::Result<(LongLived, Instant)> {
        let ages = planned_ages(count);
        let oldest = ages.first().copied().unwrap_or_default();
        let event = Instant::now() + oldest + Duration::from_millis(50);
        let mut connections = Vec::new();
        for age in ages {
            wait_until_instant(event - age)?;
            let connection = KeepAlive::open(&lab.client().netns, lab.vip())
                .context("opening a long-lived connection through the VIP")?;
            connections.push((Instant::now(), connection));
        }
        wait_until_instant(event)?;
        Ok((LongLived { connections }, event))
    }

    /// Asks every connection once more: each one's age at `event` and whether it broke (an
    /// error, or another node answered).
    pub fn check(mut self, event: Instant) -> Vec<(Duration, Result<(), String>)> {
        let ages: Vec<Duration> = self
            .connections
            .iter()
            .map(|(opened, _)| event.saturating_duration_since(*opened))
            .collect();
        let mut connections: Vec<KeepAlive> = self
            .connections
            .drain(..)
            .map(|(_, connection)| connection)
            .collect();
        let checks = KeepAlive::check_all_same_node(&mut connections);
        ages.into_iter()
            .zip(checks)
            .map(|(age, check)| (age, check.map_err(|error| format!("{error:#}"))))
            .collect()
    }
}

/// Sleeps until `moment`, returning early with an error on Ctrl-C.
pub fn wait_until_instant(moment: Instant) -> anyhow::Result<()> {
    while Instant::now() < moment {
        check_interrupted()?;
        std::thread::sleep(Duration::from_millis(20).min(moment - Instant::now()));
    }
    Ok(())
}

/// Now in wall-clock milliseconds since the Unix epoch: the polkadot.js clients' clock.
pub fn epoch_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |since| {
        u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn planned_ages_fill_every_bucket_evenly_oldest_first() {
        let ages = planned_ages(8);
        assert_eq!(ages.len(), 8);
        assert!(ages.windows(2).all(|pair| pair[0] >= pair[1]));
        let mut per_bucket = [0; AGE_BUCKETS.len()];
        for age in &ages {
            per_bucket[AgeBucket::of(*age)] += 1;
        }
        assert_eq!(per_bucket, [2, 2, 2, 2]);
        assert_eq!(ages[7], Duration::from_millis(200));
        assert_eq!(ages[0], Duration::from_millis(8750));
    }
}
