//! What happens to the master in a run: each scenario is one variant and one function that
//! makes it happen, with the goals its figures are held to.

use std::process::Stdio;

use anyhow::Context;
use clap::ValueEnum;
use lb_tests::lab::{Member, PairLab, binary_path, command_in_netns};

use crate::report::{Goal, PLANNED_GOALS, UNPLANNED_GOALS};

/// The LB that holds the floating addresses when a run's event comes; the other takes over.
pub const MASTER: Member = Member::A;
pub const STANDBY: Member = Member::B;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// kill -9 of the master's lb-control and keepalived: no goodbye advert, the floating
    /// addresses stay on its interfaces, its XDP program keeps forwarding from the pinned maps.
    Kill,
    /// The master's links to the clients and to the other LB cut (their switch ends set down):
    /// its processes run on, cut off; its etcd member is in a minority.
    CutLinks,
    /// A planned handover: `lb-control ha handover` on the master (for its OS update).
    Handover,
}

impl Scenario {
    pub const ALL: [Scenario; 3] = [Scenario::Kill, Scenario::CutLinks, Scenario::Handover];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Kill => "kill -9 of the master",
            Scenario::CutLinks => "the master's links cut",
            Scenario::Handover => "a planned handover",
        }
    }

    /// What the event is, for the report.
    pub fn description(self) -> &'static str {
        match self {
            Scenario::Kill => {
                "SIGKILL to the master's lb-control and keepalived at once: no goodbye advert; \
                 the floating addresses stay on its interfaces and its XDP program keeps \
                 forwarding from the pinned maps until the standby's gratuitous ARP moves the \
                 traffic"
            }
            Scenario::CutLinks => {
                "the switch ends of the master's client-side and private links set down at once \
                 (pulled cables): its lb-control, keepalived and etcd member run on, cut off \
                 from the clients, the standby and the etcd majority; its node-side link stays up"
            }
            Scenario::Handover => {
                "`lb-control ha handover --drain 10s` on the master: its flows and second chance \
                 to the standby, keepalived gives the addresses up, its gateway's connections \
                 finish through second chance (the event is the command's start)"
            }
        }
    }

    /// Makes the event happen to the master.
    pub fn cause(self, lab: &mut PairLab) -> anyhow::Result<()> {
        match self {
            Scenario::Kill => kill_master(lab),
            Scenario::CutLinks => cut_master_links(lab),
            Scenario::Handover => hand_over(lab),
        }
    }

    /// The goals of the issue its figures are checked against.
    pub fn goals(self) -> &'static [Goal] {
        match self {
            Scenario::Kill | Scenario::CutLinks => &UNPLANNED_GOALS,
            Scenario::Handover => &PLANNED_GOALS,
        }
    }
}

fn kill_master(lab: &mut PairLab) -> anyhow::Result<()> {
    lab.kill(MASTER)
        .context("killing the master's lb-control and keepalived")
}

fn cut_master_links(lab: &mut PairLab) -> anyhow::Result<()> {
    lab.cut_links(MASTER).context("cutting the master's links")
}

/// Starts the handover and returns: the command ends only once the master's gateway
/// connections have finished, while the run times what happens from its start. A failure is
/// printed, and shows in the figures (the standby not master, failed requests).
fn hand_over(lab: &mut PairLab) -> anyhow::Result<()> {
    let mut command = command_in_netns(&lab.lb(MASTER).netns, binary_path("lb-control")?)?;
    command
        .args(["ha", "handover", "--drain", "10s", "--config"])
        .arg(lab.config_path(MASTER))
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let child = command
        .spawn()
        .context("starting `lb-control ha handover` on the master")?;
    std::thread::spawn(move || match child.wait_with_output() {
        Ok(output) if !output.status.success() => eprintln!(
            "bench-ha: `lb-control ha handover` failed: {}",
            String::from_utf8_lossy(&output.stderr)
        ),
        Ok(_) => {}
        Err(error) => eprintln!("bench-ha: waiting for `lb-control ha handover`: {error}"),
    });
    Ok(())
}
