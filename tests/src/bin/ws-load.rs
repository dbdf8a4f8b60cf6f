//! `ws-load`: WebSocket connections over TLS, each keeping calls in flight (see
//! `lb_tests::ws_load`); `bench gateway` runs it in the lab's client namespace. Prints the
//! summary as one line of JSON.
//!
//! ```text
//! ws-load --server 10.200.1.1:8443 --path /lbk_… --ca ca.crt --connections 64 \
//!     --in-flight 4 --seconds 10 --method state_getRuntimeVersion
//! ```

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use lb_tests::ws_load::{self, WsLoadPlan};

#[derive(Debug, Parser)]
#[command(about = "WebSocket connections over TLS, each keeping JSON-RPC calls in flight")]
struct Cli {
    #[command(flatten)]
    plan: WsLoadPlan,
}

fn main() -> ExitCode {
    lb_tests::bench::main("ws-load", || {
        let plan = Cli::parse().plan;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the runtime")?;
        let summary = runtime.block_on(ws_load::run(plan))?;
        println!("{}", serde_json::to_string(&summary)?);
        Ok(())
    })
}
