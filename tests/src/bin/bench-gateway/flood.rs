//! The made-up key flood: a second wrk sending a new well-formed API key on every request,
//! around a measured run of valid-key calls, and what the gateway did with it: every flood
//! request refused, and no state store call for any of them.

use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use lb_tests::wrk::{self, Load, WrkResult};

use crate::{Settings, setup::Setup};

/// How much longer than the measured run the flood runs, so it covers the whole run.
const MARGIN_SECONDS: u64 = 2;
/// How long the flood gets to reach the gateway.
const START_TIMEOUT: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(50);

/// What the flood sent and what it cost the store.
#[derive(Debug, Clone)]
pub struct Flood {
    pub wrk: WrkResult,
    /// Key checks the gateway refused while the flood ran (`lb_gateway_auth_failures_total`).
    pub refused: u64,
    /// State store calls while the flood ran (`lb_store_calls_total`): reads, writes.
    pub store_reads: u64,
    pub store_writes: u64,
}

/// Runs `measured` while the flood runs: the flood starts first, `measured` once the gateway
/// refuses its keys, and the flood outlasts it.
pub fn around<R>(
    setup: &Setup,
    settings: &Settings,
    measured: impl FnOnce() -> R,
) -> anyhow::Result<(R, Flood)> {
    let store_before = setup.store_calls()?;
    let refused_before = setup.auth_failures()?;
    let url = setup.flood_url();
    let load = Load {
        netns: &setup.lab.client().netns,
        threads: 1,
        connections: settings.flood_connections,
        seconds: settings.seconds + MARGIN_SECONDS,
        script: setup.flood_script(),
        url: &url,
    };
    std::thread::scope(|scope| {
        let flood = scope.spawn(|| wrk::run(&setup.lab, &load));
        let deadline = Instant::now() + START_TIMEOUT;
        while setup.auth_failures()? == refused_before {
            if flood.is_finished() || Instant::now() >= deadline {
                bail!("the flood of made-up keys did not reach the gateway");
            }
            std::thread::sleep(POLL);
        }
        let measured = measured();
        let wrk = flood
            .join()
            .map_err(|_| anyhow::anyhow!("the flood's thread panicked"))?
            .context("the flood of made-up keys")?;
        let store_after = setup.store_calls()?;
        let refused = setup.auth_failures()? - refused_before;
        ensure!(
            wrk.requests > 0 && wrk.errors_status >= wrk.requests,
            "the gateway answered some made-up keys with HTTP 2xx: {} of {} refused",
            wrk.errors_status,
            wrk.requests
        );
        Ok((
            measured,
            Flood {
                wrk,
                refused,
                store_reads: store_after.0 - store_before.0,
                store_writes: store_after.1 - store_before.1,
            },
        ))
    })
}
