//! The HA lab: a pair of LBs, each running lb-control and keepalived, in front of the same
//! nodes, with their shared state on a three-member etcd cluster (both LBs and the fallback
//! site). The layout is [`pair`](super::pair)'s; what runs where is decided here, for
//! `cargo xtask run --ha` and the HA tests alike. Two L4 services float with the pair: one in
//! full NAT at [`VIP_V4`], one in DSR at [`DSR_VIP_V4`], whose nodes are prepared as DSR
//! backends ([`DsrNode`]).
//!
//! LB a is preferred (VRRP priority 150 against 100): it takes the floating addresses at start,
//! and back `preempt_delay` after it returns.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use lb_control::{
    api::model::HaStatus,
    ha::{Role, handover::track_file, local_addresses},
};

use super::{
    LabError, SIM_NODE_RPC_PORT, Teardown,
    admin::lb_control_metrics_in,
    binaries::binary_path,
    certs::{LabCa, write_pem},
    command_in_netns,
    dsr::DsrNode,
    etcd::{self, EtcdMember},
    in_netns,
    keepalived::{VrrpInstance, keepalived_args},
    pair::{
        CLIENT_IFACE, DSR_VIP_V4, GATEWAY_V4, Member, NAT_SOURCE_V4, NODE_IFACE, PairLb,
        PairTopology, Station, VIP_V4,
    },
    run::{LB_CONTROL_RUNNING_LOG, Run},
    run_checked,
};

/// The gateway's HTTPS port on the floating gateway address.
pub const PAIR_GATEWAY_PORT: u16 = 8443;
/// The admin API's port. lb-control's admin API listens on every address of its LB, so the
/// client reaches the master's at the floating gateway address, as an operator's tooling
/// would, and each LB's at its own address.
pub const PAIR_ADMIN_PORT: u16 = 9900;
/// Both lb-controls' admin token (the CLI reads it from their config files).
const ADMIN_TOKEN: &str = "ha-lab-admin-token-0123456789abcdef";
/// The flow sync's port on each LB's private address.
const FLOW_SYNC_PORT: u16 = 7946;
/// The flow sync's shared secret, in a file both config files name.
const FLOW_SYNC_SECRET: &str = "ha-lab-flow-sync-secret-0123456789abcdef";
/// The DSR service's outer source prefix (the flow hash goes in its last byte), inside the
/// lab's range; the single-LB lab uses the same.
const DSR_SOURCE_V4: Ipv4Addr = Ipv4Addr::new(10, 200, 254, 0);
/// Every address keepalived moves to the master, as lb-control's `[ha] floating_addresses`.
const FLOATING_V4: [Ipv4Addr; 4] = [GATEWAY_V4, VIP_V4, DSR_VIP_V4, NAT_SOURCE_V4];
const LB_CONTROL_RUNNING_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the first election may take: the adverts' timeout, then `preempt_delay`.
const ELECTION_SLACK: Duration = Duration::from_secs(10);

/// Where an etcd member of the HA lab runs: on one of the LBs, or at the fallback site.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EtcdSite {
    Lb(Member),
    Fallback,
}

#[derive(Debug, Clone)]
pub struct PairConfig {
    /// Nodes behind both LBs, each running sim-node.
    pub nodes: usize,
    /// sim-node's block interval.
    pub block_time: Duration,
    /// keepalived's `preempt_delay`: how long a returning LB a waits before it takes the
    /// addresses back.
    pub preempt_delay: Duration,
}

impl Default for PairConfig {
    fn default() -> Self {
        PairConfig {
            nodes: 3,
            block_time: Duration::from_secs(6),
            preempt_delay: Duration::from_secs(5),
        }
    }
}

/// The processes of one LB that a test kills and brings back.
#[derive(Debug, Default, Clone, Copy)]
struct MemberProcesses {
    lb_control: Option<u32>,
    keepalived: Option<u32>,
    /// How many times its processes were started: names each start's log files.
    starts: usize,
}

/// A running HA lab; dropping it removes everything it made.
#[derive(Debug)]
pub struct PairLab {
    /// Before `run`: their decapsulators stop before the namespaces go.
    dsr_nodes: Vec<DsrNode>,
    run: Run,
    topology: PairTopology,
    config: PairConfig,
    members: [MemberProcesses; 2],
    ca: PathBuf,
}

impl PairLab {
    /// Builds the network, starts the sim-nodes and etcd, then lb-control and keepalived on
    /// both LBs, and waits until LB a holds the floating addresses and serves.
    pub fn start(config: PairConfig) -> Result<PairLab, LabError> {
        let mut run = Run::new()?;
        let topology = PairTopology::plan(&run.prefix, config.nodes)?;
        topology.build(&mut run.namespaces, &mut run.peer_programs)?;
        let nodes: Vec<_> = topology
            .nodes
            .iter()
            .map(|node| (node.netns.clone(), node.addr_v4))
            .collect();
        run.start_sim_nodes(&nodes, config.block_time)?;
        let dsr_nodes = topology
            .nodes
            .iter()
            .enumerate()
            .map(|(index, node)| DsrNode::prepare(&node.netns, index, &[DSR_VIP_V4.into()]))
            .collect::<Result<_, _>>()?;
        let mut lab = PairLab {
            dsr_nodes,
            ca: run.log_dir.join("gateway-ca.crt"),
            run,
            topology,
            config,
            members: [MemberProcesses::default(); 2],
        };
        let etcd_members = lab.etcd_members();
        etcd::start_cluster(&mut lab.run, &etcd_members)?;
        lab.write_certificates()?;
        for member in [Member::A, Member::B] {
            lab.write_configs(member)?;
            lab.start_lb_control(member)?;
        }
        for member in [Member::A, Member::B] {
            lab.start_keepalived(member)?;
        }
        let deadline = Instant::now() + config_election_timeout(&lab.config);
        while lab.holders()? != [Member::A] {
            if Instant::now() >= deadline {
                return Err(LabError::NotReady {
                    what: "LB a to hold the floating addresses".to_owned(),
                    timeout: config_election_timeout(&lab.config),
                    detail: format!("keepalived's log: {}", lab.keepalived_log(Member::A)),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(lab)
    }

    pub fn prefix(&self) -> &str {
        &self.run.prefix
    }

    pub fn client(&self) -> &Station {
        &self.topology.client
    }

    pub fn lb(&self, member: Member) -> &PairLb {
        self.topology.lb(member)
    }

    pub fn nodes(&self) -> &[Station] {
        &self.topology.nodes
    }

    /// The nodes as DSR backends, in node order: what their decapsulators have seen.
    pub fn dsr_nodes(&self) -> &[DsrNode] {
        &self.dsr_nodes
    }

    pub fn fallback(&self) -> &Station {
        &self.topology.fallback
    }

    pub fn log_dir(&self) -> &Path {
        &self.run.log_dir
    }

    /// The lab CA's certificate, which clients trust for the gateway.
    pub fn ca(&self) -> &Path {
        &self.ca
    }

    pub fn preempt_delay(&self) -> Duration {
        self.config.preempt_delay
    }

    /// `http://10.200.1.1:9900`: the admin API of the LB that holds the floating addresses.
    pub fn floating_admin_url(&self) -> String {
        format!("http://{GATEWAY_V4}:{PAIR_ADMIN_PORT}")
    }

    /// `member`'s own admin API, at its own address on the client segment.
    pub fn admin_url(&self, member: Member) -> String {
        format!("http://{}:{PAIR_ADMIN_PORT}", self.lb(member).client_v4)
    }

    /// The admin API's bearer token, the same on both LBs.
    pub fn admin_token(&self) -> &'static str {
        ADMIN_TOKEN
    }

    /// `https://10.200.1.1:8443/<key>`: the gateway at its floating address.
    pub fn gateway_url(&self, key: &str) -> String {
        format!("https://{GATEWAY_V4}:{PAIR_GATEWAY_PORT}/{key}")
    }

    /// The L4 service in full NAT at the floating VIP.
    pub fn vip(&self) -> SocketAddr {
        SocketAddr::from((VIP_V4, SIM_NODE_RPC_PORT))
    }

    /// The L4 service in DSR at its floating VIP.
    pub fn dsr_vip(&self) -> SocketAddr {
        SocketAddr::from((DSR_VIP_V4, SIM_NODE_RPC_PORT))
    }

    /// lb-control's config file on `member`.
    pub fn config_path(&self, member: Member) -> PathBuf {
        self.run
            .log_dir
            .join(format!("lb-control-{}.toml", member.name()))
    }

    pub fn keepalived_config_path(&self, member: Member) -> PathBuf {
        self.run
            .log_dir
            .join(format!("keepalived-{}.conf", member.name()))
    }

    /// lb-control's instance on `member`: its maps are pinned under `/sys/fs/bpf/<instance>`.
    pub fn instance(&self, member: Member) -> String {
        format!("{}-{}", self.run.prefix, member.name())
    }

    /// The LBs that have every floating address on their interfaces now. Both can: a
    /// keepalived killed with SIGKILL leaves its addresses behind (the peer's gratuitous ARP
    /// is what moves the traffic then).
    pub fn holders(&self) -> Result<Vec<Member>, LabError> {
        let mut holders = Vec::new();
        for member in [Member::A, Member::B] {
            let held = in_netns(&self.lb(member).netns, local_addresses)?
                .map_err(LabError::io("listing the LB's addresses"))?;
            if FLOATING_V4
                .iter()
                .all(|&address| held.contains(&IpAddr::from(address)))
            {
                holders.push(member);
            }
        }
        Ok(holders)
    }

    /// The LB the client sends to the gateway address now: the one whose client0 MAC its
    /// neighbour entry for that address holds (what gratuitous ARP moves). None before the
    /// client has resolved it.
    pub fn client_reaches(&self) -> Result<Option<Member>, LabError> {
        self.client_sends_to(GATEWAY_V4)
    }

    /// The LB the client sends packets for the floating `address` to now, as
    /// [`PairLab::client_reaches`] for the gateway's.
    pub fn client_sends_to(&self, address: Ipv4Addr) -> Result<Option<Member>, LabError> {
        let neighbour = ip_output(&[
            "-n",
            &self.topology.client.netns,
            "neigh",
            "show",
            &address.to_string(),
        ])?;
        let Some(mac) = word_after(&neighbour, "lladdr") else {
            return Ok(None);
        };
        for member in [Member::A, Member::B] {
            let link = ip_output(&["-n", &self.lb(member).netns, "link", "show", CLIENT_IFACE])?;
            if word_after(&link, "link/ether") == Some(mac) {
                return Ok(Some(member));
            }
        }
        Ok(None)
    }

    /// `member`'s lb-control's Prometheus metrics.
    pub fn lb_control_metrics(&self, member: Member) -> Result<String, LabError> {
        lb_control_metrics_in(&self.lb(member).netns)
    }

    /// Runs `lb-control ARGS… --config <member's config>` in `member`'s namespace, as
    /// keepalived's hooks and an operator do; returns its standard output.
    pub fn cli(&self, member: Member, args: &[&str]) -> Result<String, LabError> {
        let mut command = command_in_netns(&self.lb(member).netns, binary_path("lb-control")?)?;
        command
            .args(args)
            .arg("--config")
            .arg(self.config_path(member));
        let output = run_checked(&mut command)?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// `member`'s role, as its lb-control reports it (`lb-control ha status`).
    pub fn role(&self, member: Member) -> Result<Role, LabError> {
        let output = self.cli(member, &["ha", "status", "--json"])?;
        let status: HaStatus = serde_json::from_str(&output).map_err(|error| {
            LabError::io(format!(
                "reading `lb-control ha status --json` on LB {}",
                member.name()
            ))(error.into())
        })?;
        Ok(status.role)
    }

    /// SIGKILL to `member`'s lb-control and keepalived (each with its children), as a crash
    /// would: keepalived gets no say, so the floating addresses stay on its interfaces. Both
    /// are reaped, so a restarted keepalived does not take its old pid file for a live one.
    pub fn kill(&mut self, member: Member) -> Result<(), LabError> {
        let processes = &mut self.members[member as usize];
        let pids = [processes.lb_control.take(), processes.keepalived.take()];
        self.kill_processes(pids.into_iter().flatten().collect())
    }

    /// SIGKILL to `member`'s lb-control alone, as an OOM kill or a panic would: keepalived
    /// runs on and keeps the floating addresses (it does not track lb-control in the lab).
    /// To bring the LB back, end its keepalived with [`PairLab::kill`], then
    /// [`PairLab::restart`].
    pub fn kill_lb_control(&mut self, member: Member) -> Result<(), LabError> {
        let pid = self.members[member as usize].lb_control.take();
        self.kill_processes(pid.into_iter().collect())
    }

    /// SIGKILL to each of `pids` (with its children), then reaps them.
    fn kill_processes(&mut self, pids: Vec<u32>) -> Result<(), LabError> {
        for &pid in &pids {
            // SAFETY: kill(2) of a process group the lab started (each child leads its own
            // group) and has not reaped, so the id cannot have been reused.
            unsafe { libc::kill(-(pid as libc::pid_t), libc::SIGKILL) };
        }
        pids.into_iter()
            .try_for_each(|pid| self.run.stop_process(pid))
    }

    /// Cuts `member` off its clients and the other LB (see
    /// [`PairTopology::cut_client_and_private_links`]): its processes run on, isolated, and
    /// its etcd member is cut off from the other two.
    pub fn cut_links(&self, member: Member) -> Result<(), LabError> {
        self.topology.cut_client_and_private_links(member)
    }

    /// SIGKILL to the etcd member at `site`, as a crash would.
    pub fn kill_etcd(&self, site: EtcdSite) -> Result<(), LabError> {
        etcd::kill_member(&self.run, &self.etcd_member(site))
    }

    /// Starts the etcd members at `sites` again after [`PairLab::kill_etcd`], on their data
    /// directories, and waits until each reports itself healthy (which needs a majority).
    pub fn restart_etcd(&mut self, sites: &[EtcdSite]) -> Result<(), LabError> {
        let cluster = self.etcd_members();
        let members: Vec<EtcdMember> = sites.iter().map(|&site| self.etcd_member(site)).collect();
        etcd::restart_members(&mut self.run, &members, &cluster)
    }

    /// Starts `member`'s lb-control and keepalived again after [`PairLab::kill`]; keepalived
    /// starts as backup, as after a reboot.
    pub fn restart(&mut self, member: Member) -> Result<(), LabError> {
        self.start_lb_control(member)?;
        self.start_keepalived(member)
    }

    /// The end of `member`'s current keepalived log.
    pub fn keepalived_log(&self, member: Member) -> String {
        crate::logs::tail(&self.log_path("keepalived", member), 3000)
    }

    /// The log of `member`'s current lb-control.
    pub fn lb_control_log_path(&self, member: Member) -> PathBuf {
        self.log_path("lb-control", member)
    }

    pub fn shutdown(self) -> Result<Teardown, LabError> {
        self.run.shutdown()
    }

    fn log_name(&self, program: &str, member: Member) -> String {
        let starts = self.members[member as usize].starts;
        format!("{program}-{}-{starts}", member.name())
    }

    fn log_path(&self, program: &str, member: Member) -> PathBuf {
        self.run
            .log_dir
            .join(format!("{}.log", self.log_name(program, member)))
    }

    /// lb-control's state directory on `member`.
    pub fn state_dir(&self, member: Member) -> PathBuf {
        self.run.log_dir.join(format!("lb-state-{}", member.name()))
    }

    /// The etcd member at `site`.
    fn etcd_member(&self, site: EtcdSite) -> EtcdMember {
        let index = match site {
            EtcdSite::Lb(member) => member as usize,
            EtcdSite::Fallback => 2,
        };
        self.etcd_members().swap_remove(index)
    }

    /// The three etcd members: one on each LB and one at the fallback site, in that order.
    fn etcd_members(&self) -> Vec<EtcdMember> {
        self.topology
            .lbs
            .iter()
            .map(|lb| EtcdMember {
                name: format!("lb-{}", lb.member.name()),
                netns: lb.netns.clone(),
                addr_v4: lb.private_v4,
            })
            .chain(std::iter::once(EtcdMember {
                name: "fallback".to_owned(),
                netns: self.topology.fallback.netns.clone(),
                addr_v4: self.topology.fallback.addr_v4,
            }))
            .collect()
    }

    fn write_certificates(&self) -> Result<(), LabError> {
        let ca = LabCa::new()?;
        let leaf = ca.issue(&[GATEWAY_V4.into()])?;
        write_pem(&self.ca, &ca.cert_pem())?;
        write_pem(&self.run.log_dir.join("gateway.crt"), &leaf.cert_pem)?;
        write_pem(&self.run.log_dir.join("gateway.key"), &leaf.key_pem)?;
        Ok(())
    }

    /// lb-control's and keepalived's config files for `member`.
    fn write_configs(&self, member: Member) -> Result<(), LabError> {
        let endpoints = self
            .etcd_members()
            .iter()
            .map(|member| format!("\"{}\"", member.client_url()))
            .collect::<Vec<_>>()
            .join(", ");
        let backends = super::backends_toml(self.topology.nodes.iter().map(|node| node.addr_v4));
        let dir = self.run.log_dir.display();
        let secret_file = self.run.log_dir.join("flow-sync.secret");
        std::fs::write(&secret_file, FLOW_SYNC_SECRET)
            .map_err(LabError::io(format!("writing {}", secret_file.display())))?;
        let floating = FLOATING_V4
            .iter()
            .map(|address| format!("\"{address}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let lb_control = format!(
            "# Written by the HA lab for LB {name}; LB {other} has the same but for [ha] name.\n\
             [dataplane]\n\
             nat_source_v4 = \"{NAT_SOURCE_V4}\"\n\
             dsr_source_v4 = \"{DSR_SOURCE_V4}\"\n\n\
             [[services]]\n\
             vip = \"{VIP_V4}\"\n\
             port = {SIM_NODE_RPC_PORT}\n\
             backends = [{backends}]\n\n\
             [[services]]\n\
             vip = \"{DSR_VIP_V4}\"\n\
             port = {SIM_NODE_RPC_PORT}\n\
             mode = \"dsr\"\n\
             backends = [{backends}]\n\n\
             [gateway]\n\
             listen = \"{GATEWAY_V4}:{PAIR_GATEWAY_PORT}\"\n\
             tls_cert = \"{dir}/gateway.crt\"\n\
             tls_key = \"{dir}/gateway.key\"\n\
             service = \"{VIP_V4}:{SIM_NODE_RPC_PORT}/tcp\"\n\n\
             [admin]\n\
             listen = \"0.0.0.0:{PAIR_ADMIN_PORT}\"\n\
             token = \"{ADMIN_TOKEN}\"\n\n\
             [store]\n\
             etcd = {{ endpoints = [{endpoints}], prefix = \"/lb-pair/\" }}\n\n\
             [ha]\n\
             name = \"lb-{name}\"\n\
             floating_addresses = [{floating}]\n\
             flow_sync = {{ listen = \"{own}:{FLOW_SYNC_PORT}\", peer = \"{peer}:{FLOW_SYNC_PORT}\", \
             secret_file = \"{secret}\" }}\n",
            name = member.name(),
            other = member.other().name(),
            own = self.lb(member).private_v4,
            peer = self.lb(member.other()).private_v4,
            secret = secret_file.display(),
        );
        let path = self.config_path(member);
        std::fs::write(&path, lb_control)
            .map_err(LabError::io(format!("writing {}", path.display())))?;
        let vrrp = VrrpInstance {
            member,
            own_v4: self.lb(member).client_v4,
            peer_v4: self.lb(member.other()).client_v4,
            preempt_delay: self.config.preempt_delay,
            notify: format!("{} ha notify", binary_path("lb-control")?.display()),
            notify_args: format!("--config {}", path.display()),
            handover_file: track_file(&self.state_dir(member))
                .to_string_lossy()
                .into_owned(),
        };
        let path = self.keepalived_config_path(member);
        std::fs::write(&path, vrrp.render())
            .map_err(LabError::io(format!("writing {}", path.display())))
    }

    fn start_lb_control(&mut self, member: Member) -> Result<(), LabError> {
        self.members[member as usize].starts += 1;
        let config = self.config_path(member);
        let config = config.to_string_lossy();
        let state_dir = self.state_dir(member);
        let (netns, instance) = (self.lb(member).netns.clone(), self.instance(member));
        let log_name = self.log_name("lb-control", member);
        let process = self.run.spawn_lb_control(
            &netns,
            CLIENT_IFACE,
            &instance,
            &state_dir,
            &["--interface", NODE_IFACE, "--config", &config],
            &log_name,
        )?;
        let pid = process.pid();
        let log = process.log_path().to_owned();
        // A restarted lb-control finds its pins at once: the log says when it serves.
        let deadline = Instant::now() + LB_CONTROL_RUNNING_TIMEOUT;
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains(LB_CONTROL_RUNNING_LOG)
        {
            if Instant::now() >= deadline {
                return Err(LabError::NotReady {
                    what: format!("lb-control on LB {}", member.name()),
                    timeout: LB_CONTROL_RUNNING_TIMEOUT,
                    detail: format!("see {}", log.display()),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.members[member as usize].lb_control = Some(pid);
        Ok(())
    }

    fn start_keepalived(&mut self, member: Member) -> Result<(), LabError> {
        let config = self.keepalived_config_path(member);
        // A directory per start, as /run after a reboot: a killed keepalived's pid files name
        // children that may linger as zombies, which keepalived would take for itself running.
        let pid_dir = self.run.log_dir.join(self.log_name("keepalived", member));
        std::fs::create_dir_all(&pid_dir)
            .map_err(LabError::io(format!("creating {}", pid_dir.display())))?;
        let args = keepalived_args(&config.to_string_lossy(), &pid_dir.to_string_lossy());
        let netns = self.lb(member).netns.clone();
        let log_name = self.log_name("keepalived", member);
        let process = self.run.spawn_process(
            &format!("keepalived {}", member.name()),
            &netns,
            "keepalived",
            &args,
            &log_name,
        )?;
        self.members[member as usize].keepalived = Some(process.pid());
        Ok(())
    }
}

fn ip_output(args: &[&str]) -> Result<String, LabError> {
    let output = run_checked(std::process::Command::new("ip").args(args))?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The word after `key` in `text` (`lladdr 02:…`).
fn word_after<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let mut words = text.split_whitespace();
    words.find(|word| *word == key)?;
    words.next()
}

/// The first election: adverts time out, then `preempt_delay`; with room to spare.
fn config_election_timeout(config: &PairConfig) -> Duration {
    config.preempt_delay + ELECTION_SLACK
}
