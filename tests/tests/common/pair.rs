//! Helpers for the tests that run the HA lab (a pair of LBs with keepalived and etcd).

use std::time::Duration;

use anyhow::Context;
use lb_tests::{
    lab::{LabError, Member, PairConfig, PairLab},
    poll::wait_until,
};

/// keepalived's `preempt_delay` in the tests' pairs.
pub const PREEMPT_DELAY: Duration = Duration::from_secs(5);

/// The HA lab with `nodes` sim-nodes (a block every 2 s), once LB a is master and LB b backup,
/// as keepalived told them.
pub fn start_pair(nodes: usize) -> anyhow::Result<PairLab> {
    let lab = PairLab::start(PairConfig {
        nodes,
        block_time: Duration::from_secs(2),
        preempt_delay: PREEMPT_DELAY,
    })
    .map_err(|error: LabError| anyhow::anyhow!("starting the HA lab: {error}"))?;
    wait_until(
        "LB a master and LB b backup, as keepalived told them",
        Duration::from_secs(5),
        || Ok(role(&lab, Member::A)? == "master" && role(&lab, Member::B)? == "backup"),
    )?;
    Ok(lab)
}

/// `member`'s role as `lb-control ha status` names it.
pub fn role(lab: &PairLab, member: Member) -> anyhow::Result<String> {
    Ok(lab.role(member)?.name().to_owned())
}

/// `lb-control key create --name NAME` on `member`: the key's secret.
pub fn create_key(lab: &PairLab, member: Member, name: &str) -> anyhow::Result<String> {
    let created = lab.cli(member, &["key", "create", "--name", name])?;
    Ok(created
        .lines()
        .find_map(|line| line.strip_prefix("secret: "))
        .context("`key create` printed no secret")?
        .to_owned())
}
