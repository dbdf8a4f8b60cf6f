//! What happens to the master in a run: each scenario is one variant and one function that
//! makes it happen, with the goals its figures are held to.

use anyhow::Context;
use clap::ValueEnum;
use lb_tests::lab::{Member, PairLab};

use crate::report::{Goal, UNPLANNED_GOALS};

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
    // A planned handover (`lb-control ha handover`, being built on branch `handover`) goes
    // here: a variant, its arm in each match below, and its function beside `kill_master`,
    // with goals of its own (0 failed requests, 0 broken flows).
}

impl Scenario {
    pub const ALL: [Scenario; 2] = [Scenario::Kill, Scenario::CutLinks];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Kill => "kill -9 of the master",
            Scenario::CutLinks => "the master's links cut",
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
        }
    }

    /// Makes the event happen to the master.
    pub fn cause(self, lab: &mut PairLab) -> anyhow::Result<()> {
        match self {
            Scenario::Kill => kill_master(lab),
            Scenario::CutLinks => cut_master_links(lab),
        }
    }

    /// The goals of the issue its figures are checked against.
    pub fn goals(self) -> &'static [Goal] {
        match self {
            Scenario::Kill | Scenario::CutLinks => &UNPLANNED_GOALS,
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
