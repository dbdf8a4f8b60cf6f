//! What every client of a crowd saw, added up: the `crowd` binary's JSON summary.

use std::{collections::BTreeMap, time::Duration};

use serde::{Deserialize, Serialize};

use super::client::{Admission, CallTally, ClientTally};

/// The crowd's summary.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CrowdSummary {
    pub clients: usize,
    /// Clients that got their WebSocket.
    pub connected: usize,
    /// Upgrades the gateway refused, by HTTP status...
    pub refused: BTreeMap<u16, usize>,
    /// ... and the body of the first refusal of each status (a JSON-RPC error).
    pub refusal_bodies: BTreeMap<u16, String>,
    /// Clients that got no connection, by stage (`tcp`, `tls`, `websocket`).
    pub failed: BTreeMap<String, usize>,
    pub first_failure: Option<String>,
    /// Connected clients the gateway closed before the crowd stopped, by close code (or how
    /// the connection ended without one).
    pub dropped: BTreeMap<String, usize>,
    /// Clients whose head subscription, and whose storage subscription, was answered with an
    /// id.
    pub heads_subscribed: usize,
    pub storage_subscribed: usize,
    pub subscription_errors: u64,
    pub first_subscription_error: Option<String>,
    /// `chain_newHead` notifications received in all, in the steady phase, and connected
    /// clients that got none.
    pub heads: u64,
    pub heads_in_steady: u64,
    pub clients_without_heads: usize,
    pub storage_notifications: u64,
    /// From when the node made a block to when its head arrived at a client's socket, heads
    /// received in the steady phase...
    pub head_delay: Percentiles,
    /// ... and to when the client read it.
    #[serde(default)]
    pub head_read_delay: Percentiles,
    /// `system_chain` (cached by the gateway) and `system_localPeerId` (never cached).
    pub cached_calls: CallSummary,
    pub uncached_calls: CallSummary,
    pub first_call_error: Option<String>,
    /// Connected clients that did not get at least one answer of each kind.
    pub clients_without_answers: usize,
    /// Until every client was in place, and the hold after it.
    pub ramp_seconds: f64,
    pub steady_seconds: f64,
}

/// One kind of call over all clients.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CallSummary {
    pub ok: u64,
    pub errors: u64,
    /// Sent, and still unanswered when the crowd stopped (not failed).
    pub unanswered_at_close: u64,
    /// Time from sending to the answer.
    pub latency: Percentiles,
}

/// A distribution in milliseconds (all 0 without samples: JSON has no NaN).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Percentiles {
    pub samples: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    /// From samples in microseconds.
    fn of(mut micros: Vec<u32>) -> Percentiles {
        micros.sort_unstable();
        let at = |quantile: f64| -> f64 {
            if micros.is_empty() {
                return 0.0;
            }
            // Nearest rank.
            let rank = (quantile * micros.len() as f64).ceil() as usize;
            f64::from(micros[rank.clamp(1, micros.len()) - 1]) / 1000.0
        };
        Percentiles {
            samples: micros.len(),
            p50_ms: at(0.50),
            p99_ms: at(0.99),
            max_ms: at(1.0),
        }
    }
}

impl CrowdSummary {
    /// Clients the gateway dropped, whatever the code.
    pub fn dropped_total(&self) -> usize {
        self.dropped.values().sum()
    }

    pub fn refused_total(&self) -> usize {
        self.refused.values().sum()
    }

    pub fn failed_total(&self) -> usize {
        self.failed.values().sum()
    }

    /// Call errors of both kinds.
    pub fn call_errors(&self) -> u64 {
        self.cached_calls.errors + self.uncached_calls.errors
    }
}

/// Adds up every client's tally; `ramp` and `hold` are the phases' lengths.
pub(super) fn add_up(tallies: &[ClientTally], ramp: Duration, hold: Duration) -> CrowdSummary {
    let mut summary = CrowdSummary {
        clients: tallies.len(),
        ramp_seconds: ramp.as_secs_f64(),
        steady_seconds: hold.as_secs_f64(),
        ..CrowdSummary::default()
    };
    let (mut delays, mut read_delays) = (Vec::new(), Vec::new());
    let (mut cached, mut uncached) = (Vec::new(), Vec::new());
    for tally in tallies {
        match &tally.admission {
            Admission::NotTried => {}
            Admission::Connected => summary.connected += 1,
            Admission::Refused { status, body } => {
                *summary.refused.entry(*status).or_default() += 1;
                summary
                    .refusal_bodies
                    .entry(*status)
                    .or_insert_with(|| body.clone());
            }
            Admission::Failed { stage, error } => {
                *summary.failed.entry((*stage).to_owned()).or_default() += 1;
                summary
                    .first_failure
                    .get_or_insert_with(|| format!("{stage}: {error}"));
            }
        }
        if !matches!(tally.admission, Admission::Connected) {
            continue;
        }
        if let Some(code) = &tally.dropped {
            *summary.dropped.entry(code.clone()).or_default() += 1;
        }
        summary.heads_subscribed += usize::from(tally.heads_subscribed);
        summary.storage_subscribed += usize::from(tally.storage_subscribed);
        summary.subscription_errors += tally.subscription_errors;
        if summary.first_subscription_error.is_none() {
            summary
                .first_subscription_error
                .clone_from(&tally.first_subscription_error);
        }
        summary.heads += tally.heads;
        summary.heads_in_steady += tally.heads_in_steady;
        summary.clients_without_heads += usize::from(tally.heads == 0);
        summary.storage_notifications += tally.storage_notifications;
        delays.extend_from_slice(&tally.head_delays_us);
        read_delays.extend_from_slice(&tally.head_read_delays_us);
        add_calls(&mut summary.cached_calls, &mut cached, &tally.cached);
        add_calls(&mut summary.uncached_calls, &mut uncached, &tally.uncached);
        if summary.first_call_error.is_none() {
            summary.first_call_error.clone_from(&tally.first_call_error);
        }
        summary.clients_without_answers +=
            usize::from(tally.cached.ok == 0 || tally.uncached.ok == 0);
    }
    summary.head_delay = Percentiles::of(delays);
    summary.head_read_delay = Percentiles::of(read_delays);
    summary.cached_calls.latency = Percentiles::of(cached);
    summary.uncached_calls.latency = Percentiles::of(uncached);
    summary
}

fn add_calls(summary: &mut CallSummary, latencies: &mut Vec<u32>, tally: &CallTally) {
    summary.ok += tally.ok;
    summary.errors += tally.errors;
    summary.unanswered_at_close += tally.unanswered_at_close;
    latencies.extend_from_slice(&tally.latencies_us);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let percentiles = Percentiles::of((1..=100).map(|ms| ms * 1000).collect());
        assert_eq!(percentiles.samples, 100);
        assert_eq!(percentiles.p50_ms, 50.0);
        assert_eq!(percentiles.p99_ms, 99.0);
        assert_eq!(percentiles.max_ms, 100.0);
        assert_eq!(Percentiles::of(Vec::new()).samples, 0);
    }

    #[test]
    fn refusals_and_drops_are_counted_by_status_and_code() {
        let connected = |dropped: Option<&str>| ClientTally {
            admission: Admission::Connected,
            dropped: dropped.map(str::to_owned),
            heads: 3,
            ..ClientTally::default()
        };
        let refused = ClientTally {
            admission: Admission::Refused {
                status: 429,
                body: "at most 100".to_owned(),
            },
            ..ClientTally::default()
        };
        let summary = add_up(
            &[
                connected(None),
                connected(Some("1012")),
                refused.clone(),
                refused,
            ],
            Duration::from_secs(1),
            Duration::from_secs(10),
        );
        assert_eq!(summary.connected, 2);
        assert_eq!(summary.refused[&429], 2);
        assert_eq!(summary.refusal_bodies[&429], "at most 100");
        assert_eq!(summary.dropped["1012"], 1);
        assert_eq!(summary.heads, 6);
        assert_eq!(summary.clients_without_answers, 2);
    }
}
