//! keepalived for the HA lab: the VRRP instance each LB runs, rendered from one description
//! (`dist/keepalived/keepalived.conf.example` is the same config for LB a, with comments; a
//! test keeps the two in step).

use std::{net::Ipv4Addr, time::Duration};

use super::pair::{
    CLIENT_IFACE, DSR_VIP_V4, GATEWAY_V4, Member, NAT_SOURCE_V4, NODE_IFACE, VIP_V4,
};

/// VRRPv3 adverts every 100 ms: the backup declares the master dead after 3 adverts and its
/// skew, ~0.36 s (keepalived's default of 1 s takes ~3.6 s).
pub const ADVERT_INTERVAL: Duration = Duration::from_millis(100);

/// One LB's VRRP instance.
#[derive(Debug, Clone)]
pub struct VrrpInstance {
    pub member: Member,
    /// This LB's own address on the client segment, where it sends its adverts from.
    pub own_v4: Ipv4Addr,
    /// The other LB's, where they go (unicast: clouds drop multicast).
    pub peer_v4: Ipv4Addr,
    /// How long a returning higher-priority LB waits before it takes the addresses back.
    pub preempt_delay: Duration,
    /// The notify hooks' command before the role: `/usr/bin/lb-control ha notify`.
    pub notify: String,
    /// What follows the role: `--config /etc/lb-control/lb.toml`.
    pub notify_args: String,
    /// lb-control's track file (`<state_dir>/ha-handover`): `lb-control ha handover` writes 1
    /// into it to make keepalived give the addresses up.
    pub handover_file: String,
}

impl VrrpInstance {
    /// a is preferred: it takes the addresses back `preempt_delay` after it returns.
    fn priority(&self) -> u8 {
        match self.member {
            Member::A => 150,
            Member::B => 100,
        }
    }

    pub fn render(&self) -> String {
        let notify = |role: &str| format!("\"{} {role} {}\"", self.notify, self.notify_args);
        format!(
            "global_defs {{\n\
             \x20   router_id lb-{name}\n\
             \x20   vrrp_version 3\n\
             \x20   script_user root\n\
             }}\n\
             \n\
             track_file lb_handover {{\n\
             \x20   file \"{handover_file}\"\n\
             \x20   weight 0\n\
             \x20   init_file 0 overwrite\n\
             }}\n\
             \n\
             vrrp_instance lb_pair {{\n\
             \x20   state BACKUP\n\
             \x20   interface {CLIENT_IFACE}\n\
             \x20   virtual_router_id 51\n\
             \x20   priority {priority}\n\
             \x20   advert_int {advert}\n\
             \x20   preempt_delay {preempt}\n\
             \x20   unicast_src_ip {own}\n\
             \x20   unicast_peer {{\n\
             \x20       {peer}\n\
             \x20   }}\n\
             \x20   track_interface {{\n\
             \x20       {NODE_IFACE}\n\
             \x20   }}\n\
             \x20   track_file {{\n\
             \x20       lb_handover\n\
             \x20   }}\n\
             \x20   virtual_ipaddress {{\n\
             \x20       {GATEWAY_V4}/32 dev {CLIENT_IFACE}\n\
             \x20       {VIP_V4}/32 dev {CLIENT_IFACE}\n\
             \x20       {DSR_VIP_V4}/32 dev {CLIENT_IFACE}\n\
             \x20       {NAT_SOURCE_V4}/32 dev {NODE_IFACE}\n\
             \x20   }}\n\
             \x20   notify_master {master}\n\
             \x20   notify_backup {backup}\n\
             \x20   notify_fault {fault}\n\
             \x20   notify_stop {backup}\n\
             }}\n",
            name = self.member.name(),
            priority = self.priority(),
            advert = ADVERT_INTERVAL.as_secs_f64(),
            preempt = self.preempt_delay.as_secs_f64(),
            own = self.own_v4,
            peer = self.peer_v4,
            master = notify("master"),
            backup = notify("backup"),
            fault = notify("fault"),
            handover_file = self.handover_file,
        )
    }
}

/// keepalived's arguments: VRRP only, in the foreground, logging to its console (the lab's log
/// file), with pid files of its own so two instances can run on one machine.
pub fn keepalived_args(config: &str, pid_dir: &str) -> Vec<String> {
    let mut args: Vec<String> = ["--vrrp", "--dont-fork", "--log-console", "--log-detail"]
        .map(str::to_owned)
        .to_vec();
    args.extend([
        "--no-syslog".to_owned(),
        "--use-file".to_owned(),
        config.to_owned(),
    ]);
    for (flag, file) in [
        ("--pid", "keepalived.pid"),
        ("--vrrp_pid", "vrrp.pid"),
        ("--checkers_pid", "checkers.pid"),
    ] {
        args.extend([flag.to_owned(), format!("{pid_dir}/{file}")]);
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lines of a config that say something: comments and blank lines dropped.
    fn directives(text: &str) -> Vec<String> {
        text.lines()
            .map(|line| line.split('#').next().unwrap_or("").trim().to_owned())
            .filter(|line| !line.is_empty())
            .collect()
    }

    #[test]
    fn the_shipped_example_is_what_the_lab_runs_on_lb_a() {
        let example = include_str!("../../../dist/keepalived/keepalived.conf.example");
        let lab_a = VrrpInstance {
            member: Member::A,
            own_v4: Ipv4Addr::new(10, 200, 1, 11),
            peer_v4: Ipv4Addr::new(10, 200, 1, 12),
            preempt_delay: Duration::from_secs(60),
            notify: "/usr/bin/lb-control ha notify".to_owned(),
            notify_args: "--config /etc/lb-control/lb.toml".to_owned(),
            handover_file: "/var/lib/lb-control/ha-handover".to_owned(),
        };
        assert_eq!(directives(example), directives(&lab_a.render()));
    }
}
