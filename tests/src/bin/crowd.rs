//! `crowd`: many WebSocket clients over TLS to the gateway, from several source addresses
//! (see `lb_tests::crowd`). Run it inside the lab's client namespace; it prints each event
//! (steady, closing, the summary) as a line of JSON on stdout, progress on stderr.
//!
//! ```text
//! CROWD_API_KEY=lbk_… crowd --gateway 10.200.1.1:8443 --ca ca.crt \
//!     --sources 10.200.1.10,10.200.1.11 --clients 1000 --storage-subscription \
//!     --genesis-unix-ms 1767225600000 --block-time-ms 1000
//! ```

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use lb_tests::{
    bench::raise_open_files_limit,
    crowd::{self, API_KEY_ENV, CrowdPlan, Event},
};

#[derive(Debug, Parser)]
#[command(about = "Many WebSocket clients over TLS to the gateway, from several source addresses")]
struct Cli {
    #[command(flatten)]
    plan: CrowdPlan,
}

/// Descriptors beside the clients' sockets (the runtime, stdio, the CA file).
const SPARE_FILES: u64 = 256;

fn main() -> ExitCode {
    lb_tests::bench::main("crowd", || {
        let mut plan = Cli::parse().plan;
        plan.key = std::env::var(API_KEY_ENV)
            .with_context(|| format!("set {API_KEY_ENV} to the gateway's API key"))?;
        raise_open_files_limit(plan.clients as u64 + SPARE_FILES)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the runtime")?;
        runtime.block_on(crowd::run(plan, |event| {
            if let Event::Steady {
                connected,
                ramp_seconds,
                ..
            } = event
            {
                eprintln!("crowd: {connected} connected after {ramp_seconds:.1} s; holding");
            }
            // One line per event: the reader takes each as it comes.
            match serde_json::to_string(event) {
                Ok(line) => println!("{line}"),
                Err(error) => eprintln!("crowd: error: printing {event:?}: {error}"),
            }
        }))?;
        Ok(())
    })
}
