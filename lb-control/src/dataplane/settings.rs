//! The `[dataplane]` section of the configuration: where the XDP program is attached, the size
//! of its tables, and the addresses and ports NAT and DSR traffic leaves with.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    time::Duration,
};

use lb_common::{maglev::DEFAULT_TABLE_SIZE, maps::DEFAULT_MAX_FLOWS};
use serde::Deserialize;

use super::{AttachMode, DEFAULT_BPFFS, DataplaneConfig, LbSettings};
use crate::section::{Problem, parse_duration};

/// Linux limits interface names to 15 bytes (IFNAMSIZ less the NUL).
const MAX_INTERFACE_NAME: usize = 15;

/// What to do with fragments of service traffic (their ports are unknown).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FragmentPolicy {
    #[default]
    Drop,
    Pass,
}

/// `[dataplane]` in the config file.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataplaneSection {
    /// Interfaces the XDP program is attached to.
    #[serde(default)]
    pub interfaces: Vec<String>,
    #[serde(default)]
    pub xdp_mode: AttachMode,
    /// Mount point of the BPF filesystem; mounted there when missing.
    #[serde(default = "default_bpffs")]
    pub bpffs: PathBuf,
    /// Entries of each service's Maglev table: a prime from the list Maglev allows.
    #[serde(default = "default_maglev_table_size")]
    pub maglev_table_size: u32,
    /// Connection-tracking capacity (least recently used flows are evicted first).
    #[serde(default = "default_max_flows")]
    pub max_flows: u32,
    /// Source address of NAT traffic to IPv4 backends; they must route it back to this host.
    #[serde(default)]
    pub nat_source_v4: Option<Ipv4Addr>,
    #[serde(default)]
    pub nat_source_v6: Option<Ipv6Addr>,
    /// First and last NAT source port; reserved from the kernel's own use.
    #[serde(default = "default_nat_ports")]
    pub nat_ports: [u16; 2],
    /// How long a closed TCP connection's NAT port is kept from other clients: longer than the
    /// backends' TIME_WAIT (60 s on Linux), or their PAWS check refuses some new connections.
    #[serde(default = "default_nat_port_hold", deserialize_with = "parse_duration")]
    pub nat_port_hold: Duration,
    /// DSR outer source prefix (a /24 for IPv4, /112 for IPv6: the flow hash fills the rest).
    #[serde(default = "default_dsr_source_v4")]
    pub dsr_source_v4: Ipv4Addr,
    #[serde(default = "default_dsr_source_v6")]
    pub dsr_source_v6: Ipv6Addr,
    #[serde(default)]
    pub fragments: FragmentPolicy,
}

impl Default for DataplaneSection {
    fn default() -> Self {
        DataplaneSection {
            interfaces: Vec::new(),
            xdp_mode: AttachMode::default(),
            bpffs: default_bpffs(),
            maglev_table_size: default_maglev_table_size(),
            max_flows: default_max_flows(),
            nat_source_v4: None,
            nat_source_v6: None,
            nat_ports: default_nat_ports(),
            nat_port_hold: default_nat_port_hold(),
            dsr_source_v4: default_dsr_source_v4(),
            dsr_source_v6: default_dsr_source_v6(),
            fragments: FragmentPolicy::default(),
        }
    }
}

impl DataplaneSection {
    /// The program-wide forwarding settings the data plane needs.
    pub fn lb_settings(&self) -> LbSettings {
        LbSettings {
            nat_source_v4: self.nat_source_v4,
            nat_source_v6: self.nat_source_v6,
            nat_ports: self.nat_ports[0]..=self.nat_ports[1],
            nat_port_hold: self.nat_port_hold,
            dsr_source_v4: self.dsr_source_v4,
            dsr_source_v6: self.dsr_source_v6,
            maglev_table_size: self.maglev_table_size,
            pass_fragments: self.fragments == FragmentPolicy::Pass,
        }
    }

    /// How to start the data plane of load balancer `instance`.
    pub fn start_config(&self, instance: &str) -> DataplaneConfig {
        DataplaneConfig {
            instance: instance.to_owned(),
            interfaces: self.interfaces.clone(),
            mode: self.xdp_mode,
            bpffs: self.bpffs.clone(),
            maglev_table_size: self.maglev_table_size,
            max_flows: self.max_flows,
        }
    }

    /// Every invalid field of the section. The forwarding settings are checked with the
    /// services they serve (`backends::settings`), as the kernel would check them.
    pub fn problems(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        for (i, name) in self.interfaces.iter().enumerate() {
            if let Err(reason) = validate_interface_name(name) {
                problems.push(Problem::new(format!("dataplane.interfaces[{i}]"), reason));
            }
        }
        if !self.bpffs.is_absolute() {
            problems.push(Problem::new(
                "dataplane.bpffs",
                format!("\"{}\" is not an absolute path", self.bpffs.display()),
            ));
        }
        problems
    }
}

pub fn validate_interface_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_INTERFACE_NAME {
        return Err(format!(
            "\"{name}\" is not an interface name: names are 1 to {MAX_INTERFACE_NAME} bytes"
        ));
    }
    if name.contains(['/', ' ', '\0']) {
        return Err(format!(
            "\"{name}\" is not an interface name: names cannot hold '/', spaces or NUL"
        ));
    }
    Ok(())
}

fn default_bpffs() -> PathBuf {
    PathBuf::from(DEFAULT_BPFFS)
}

fn default_maglev_table_size() -> u32 {
    DEFAULT_TABLE_SIZE
}

fn default_max_flows() -> u32 {
    DEFAULT_MAX_FLOWS
}

fn default_nat_ports() -> [u16; 2] {
    [20_000, 49_999]
}

fn default_nat_port_hold() -> Duration {
    Duration::from_secs(61)
}

fn default_dsr_source_v4() -> Ipv4Addr {
    Ipv4Addr::new(172, 16, 0, 0)
}

fn default_dsr_source_v6() -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x16, 0, 0, 0, 0, 0, 0)
}
