//! `lb-control ha handover`: starts a planned handover to the other host of the pair and
//! follows it to its end, printing each step as it happens (the open gateway connections as
//! they fall, as `backend drain --wait` prints a node's).

use std::time::Duration;

use anyhow::{Context, bail};
use lb_control::{
    admin_client::AdminClient,
    api::model::{HandoverInfo, HandoverRequest},
    ha::handover::Phase,
};

use super::print_json;

/// How often the progress is read.
const POLL: Duration = Duration::from_millis(100);

/// Hands over with `drain` for the gateway's connections and waits for the end; prints the
/// steps, or with `json` only the last progress. Fails when the handover fails or ends with
/// connections open.
pub async fn run(client: &AdminClient, drain: Duration, json: bool) -> anyhow::Result<()> {
    let request = HandoverRequest {
        drain: Some(humantime::format_duration(drain).to_string()),
    };
    let mut shown = Shown::default();
    let mut progress = client.hand_over(&request).await?;
    loop {
        if !json {
            shown.print_news(&progress);
        }
        if progress.phase.is_over() {
            break;
        }
        tokio::time::sleep(POLL).await;
        progress = client
            .ha_status()
            .await?
            .handover
            .context("the daemon no longer knows the handover: did it restart?")?;
    }
    if json {
        print_json(&progress)?;
    }
    match progress.phase {
        Phase::Failed => bail!(
            "the handover failed, this host is still master: {}",
            progress.error.as_deref().unwrap_or("no reason given")
        ),
        _ if progress.open_connections > 0 => bail!(
            "handed over, but {} gateway connections were still open at the end of the drain \
             ({}): they break when the other host's second chance ends",
            progress.open_connections,
            humantime::format_duration(drain)
        ),
        _ => Ok(()),
    }
}

/// What was printed already.
#[derive(Default)]
struct Shown {
    phase: Option<Phase>,
    synced: bool,
    released: bool,
    peer_master: bool,
    open: Option<u32>,
}

impl Shown {
    fn print_news(&mut self, progress: &HandoverInfo) {
        if let (false, Some(ms)) = (self.synced, progress.synced_after_ms) {
            println!("the other host has the flows and second chance after {ms} ms");
            self.synced = true;
        }
        if self.phase != Some(progress.phase) {
            match progress.phase {
                Phase::Syncing => println!(
                    "syncing: the L4 flows go to the other host, which arms second chance for \
                     this host's gateway connections"
                ),
                Phase::Releasing => {
                    println!("releasing: keepalived gives the floating addresses up")
                }
                Phase::Draining => println!(
                    "draining: the gateway's connections finish (Connection: close, GOAWAY, \
                     WebSockets 1012)"
                ),
                Phase::HandedOver | Phase::Failed => {}
            }
        }
        if let (false, Some(ms)) = (self.released, progress.released_after_ms) {
            println!("the floating addresses left this host after {ms} ms");
            self.released = true;
        }
        if let (false, Some(ms)) = (self.peer_master, progress.peer_master_after_ms) {
            println!("the other host is master after {ms} ms");
            self.peer_master = true;
        }
        let draining = matches!(progress.phase, Phase::Draining | Phase::HandedOver);
        if draining && self.open != Some(progress.open_connections) {
            println!(
                "gateway connections open here: {}",
                progress.open_connections
            );
            self.open = Some(progress.open_connections);
        }
        if progress.phase == Phase::HandedOver
            && self.phase != Some(Phase::HandedOver)
            && let Some(ms) = progress.drained_after_ms
        {
            println!(
                "handed over after {ms} ms: every gateway connection here finished. This host \
                 stays in FAULT until keepalived restarts (`echo 0 > <state_dir>/ha-handover` \
                 makes it a backup now)"
            );
        }
        self.phase = Some(progress.phase);
    }
}
