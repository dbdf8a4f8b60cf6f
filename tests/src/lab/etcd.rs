//! The HA lab's etcd cluster: three members on the private segment, one in each LB's
//! namespace and one in the fallback site's, as a pair runs it (Debian's etcd-server).

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    time::Duration,
};

use super::{LabError, PORT_PROBE_TIMEOUT, in_netns, run::Run};

pub const ETCD_CLIENT_PORT: u16 = 2379;
const ETCD_PEER_PORT: u16 = 2380;
const ETCD_READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A member: its name, namespace and address on the private segment.
#[derive(Debug, Clone)]
pub struct EtcdMember {
    pub name: String,
    pub netns: String,
    pub addr_v4: Ipv4Addr,
}

impl EtcdMember {
    pub fn client_url(&self) -> String {
        format!("http://{}:{ETCD_CLIENT_PORT}", self.addr_v4)
    }

    fn peer_url(&self) -> String {
        format!("http://{}:{ETCD_PEER_PORT}", self.addr_v4)
    }
}

/// Starts every member (data under the run's log directory), then waits until each reports
/// itself healthy (a leader elected).
pub(crate) fn start_cluster(run: &mut Run, members: &[EtcdMember]) -> Result<(), LabError> {
    for member in members {
        spawn_member(run, member, members, &format!("etcd-{}", member.name))?;
    }
    wait_until_healthy(run, members)
}

/// SIGKILL to `member`'s etcd, as a crash of its host would be; the lab reaps it when it
/// starts it again or at teardown.
pub(crate) fn kill_member(run: &Run, member: &EtcdMember) -> Result<(), LabError> {
    run.process(&process_name(member))?.signal(libc::SIGKILL);
    Ok(())
}

/// Starts the killed `members` of the cluster `cluster` again, on their data directories (so
/// they rejoin with what they had), and waits until each reports itself healthy: with a
/// majority of the cluster back, that is once they have caught up with the leader.
pub(crate) fn restart_members(
    run: &mut Run,
    members: &[EtcdMember],
    cluster: &[EtcdMember],
) -> Result<(), LabError> {
    for member in members {
        let killed = run.reap_ended(&process_name(member))?;
        let log_name = format!("etcd-{}-after-{killed}", member.name);
        spawn_member(run, member, cluster, &log_name)?;
    }
    wait_until_healthy(run, members)
}

fn process_name(member: &EtcdMember) -> String {
    format!("etcd {}", member.name)
}

/// Starts `member` of `cluster`; its data directory is kept across restarts.
fn spawn_member(
    run: &mut Run,
    member: &EtcdMember,
    cluster: &[EtcdMember],
    log_name: &str,
) -> Result<(), LabError> {
    let initial_cluster = cluster
        .iter()
        .map(|member| format!("{}={}", member.name, member.peer_url()))
        .collect::<Vec<_>>()
        .join(",");
    let token = run.prefix.clone();
    let data_dir = run.log_dir.join(format!("etcd-{}", member.name));
    let (client, peer) = (member.client_url(), member.peer_url());
    let args = [
        "--name",
        &member.name,
        "--data-dir",
        &data_dir.to_string_lossy(),
        "--listen-client-urls",
        &client,
        "--advertise-client-urls",
        &client,
        "--listen-peer-urls",
        &peer,
        "--initial-advertise-peer-urls",
        &peer,
        // Read at the first start only: a member that restarts on its data directory rejoins
        // the cluster it belonged to.
        "--initial-cluster",
        &initial_cluster,
        "--initial-cluster-state",
        "new",
        "--initial-cluster-token",
        &token,
        // Elections within a second: a lost member shows quickly.
        "--heartbeat-interval",
        "100",
        "--election-timeout",
        "1000",
        // A change of many backends is one transaction.
        "--max-txn-ops",
        "4096",
        "--logger",
        "zap",
        "--log-level",
        "warn",
    ];
    run.spawn_process(
        &process_name(member),
        &member.netns,
        "etcd",
        &args,
        log_name,
    )
    .map(drop)
}

/// Waits until each of `members` answers its health check with a leader known.
fn wait_until_healthy<'a>(
    run: &mut Run,
    members: impl IntoIterator<Item = &'a EtcdMember>,
) -> Result<(), LabError> {
    for member in members {
        let name = process_name(member);
        let index = run
            .processes
            .iter()
            .position(|process| process.name() == name)
            .ok_or_else(|| LabError::Config(format!("the lab runs no {name}")))?;
        let health = SocketAddr::from((member.addr_v4, ETCD_CLIENT_PORT));
        run.processes[index].wait_ready(
            &format!("{} to report healthy", member.client_url()),
            ETCD_READY_TIMEOUT,
            || in_netns(&member.netns, || is_healthy(health)),
        )?;
    }
    Ok(())
}

/// Whether the member at `address` answers `GET /health` with `"health":"true"`.
fn is_healthy(address: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&address, PORT_PROBE_TIMEOUT) else {
        return false;
    };
    let mut answer = String::new();
    stream
        .set_read_timeout(Some(Duration::from_secs(1)))
        .is_ok()
        && stream
            .write_all(b"GET /health HTTP/1.0\r\nHost: etcd\r\n\r\n")
            .is_ok()
        && stream.read_to_string(&mut answer).is_ok()
        && answer.contains("\"health\":\"true\"")
}
