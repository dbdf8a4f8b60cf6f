//! The `[ha]` section: this lb-control is one of a pair whose floating addresses keepalived
//! moves, and learns its role from keepalived's notify hooks (`lb-control ha notify …`).

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use serde::Deserialize;

use crate::section::Problem;

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HaSection {
    /// This host in the pair, as the event log and `ha status` name it [default: the host
    /// name].
    #[serde(default)]
    pub name: Option<String>,
    /// Every address keepalived moves to the master (its `virtual_ipaddress` list): the
    /// gateway's address, the L4 service VIPs, the NAT source address on the node side. A
    /// gateway listening on one of them binds it before the address is here (`IP_FREEBIND`),
    /// and at start the role is master when this host holds them all, else backup.
    pub floating_addresses: Vec<IpAddr>,
    /// Commands run after this lb-control took a role (e.g. a cloud provider's floating-IP
    /// call on `master`), with `LB_HA_ROLE` and `LB_HA_PREVIOUS_ROLE` set.
    #[serde(default)]
    pub hooks: RoleHooks,
    /// The L4 flow sync over the private link (see `ha::flow_sync`); without it a takeover
    /// breaks the established L4 connections through the VIPs.
    #[serde(default)]
    pub flow_sync: Option<FlowSyncSection>,
}

/// `[ha] flow_sync = { listen = "10.0.0.1:7946", peer = "10.0.0.2:7946", secret_file = … }`:
/// the master sends its flows to `peer`; a backup takes them on `listen`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FlowSyncSection {
    /// This host's address on the private link and the port the other host sends to.
    pub listen: SocketAddr,
    /// The other host's `listen`.
    pub peer: SocketAddr,
    /// A file holding the secret both hosts share (at least 32 bytes, e.g. `openssl rand -hex
    /// 32`): every batch carries an HMAC-SHA-256 under it, and a backup installs only batches
    /// that check out.
    pub secret_file: PathBuf,
}

/// The shortest shared secret: HMAC-SHA-256's own key strength.
pub const MIN_SECRET_LEN: usize = 32;

impl FlowSyncSection {
    /// The secret, its surrounding whitespace (a trailing newline) trimmed; or why it cannot
    /// be used.
    pub fn read_secret(&self) -> Result<Vec<u8>, String> {
        let text = std::fs::read(&self.secret_file)
            .map_err(|error| format!("{}: {error}", self.secret_file.display()))?;
        let secret = text.trim_ascii().to_vec();
        if secret.len() < MIN_SECRET_LEN {
            return Err(format!(
                "{}: the secret has {} bytes, use at least {MIN_SECRET_LEN} (e.g. `openssl rand \
                 -hex 32`), the same on both hosts",
                self.secret_file.display(),
                secret.len()
            ));
        }
        Ok(secret)
    }

    fn problems(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        if let Err(reason) = self.read_secret() {
            problems.push(Problem::new("ha.flow_sync.secret_file", reason));
        }
        if self.peer.ip().is_unspecified() || self.peer.port() == 0 {
            problems.push(Problem::new(
                "ha.flow_sync.peer",
                format!(
                    "{}: name the other host's address on the private link and its port",
                    self.peer
                ),
            ));
        }
        if self.listen.port() == 0 {
            problems.push(Problem::new(
                "ha.flow_sync.listen",
                "give the port the other host sends its flows to",
            ));
        }
        problems
    }
}

/// A command per role: the program (an absolute path) and its arguments.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RoleHooks {
    #[serde(default)]
    pub master: Option<Vec<String>>,
    #[serde(default)]
    pub backup: Option<Vec<String>>,
    #[serde(default)]
    pub fault: Option<Vec<String>>,
}

impl HaSection {
    /// Whether keepalived moves `address` (the unspecified address never floats).
    pub fn floats(&self, address: IpAddr) -> bool {
        self.floating_addresses.contains(&address)
    }

    pub fn problems(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        if self.floating_addresses.is_empty() {
            problems.push(Problem::new(
                "ha.floating_addresses",
                "list the addresses keepalived moves to the master (its virtual_ipaddress \
                 list): the gateway's, the service VIPs, the NAT source",
            ));
        }
        for (index, address) in self.floating_addresses.iter().enumerate() {
            if address.is_unspecified() || address.is_loopback() || address.is_multicast() {
                problems.push(Problem::new(
                    format!("ha.floating_addresses[{index}]"),
                    format!("{address} cannot float between hosts"),
                ));
            }
        }
        if let Some(name) = &self.name
            && (name.trim().is_empty() || name.len() > 64)
        {
            problems.push(Problem::new(
                "ha.name",
                format!("{name:?} is not a name: use 1 to 64 characters"),
            ));
        }
        for (role, hook) in [
            ("master", &self.hooks.master),
            ("backup", &self.hooks.backup),
            ("fault", &self.hooks.fault),
        ] {
            match hook.as_deref() {
                None => {}
                Some([program, ..]) if program.starts_with('/') => {}
                Some([program, ..]) => problems.push(Problem::new(
                    format!("ha.hooks.{role}"),
                    format!("{program:?} is not an absolute path: hooks run without a PATH search"),
                )),
                Some([]) => problems.push(Problem::new(
                    format!("ha.hooks.{role}"),
                    "name the program to run, e.g. [\"/usr/local/bin/move-floating-ip\"]",
                )),
            }
        }
        if let Some(flow_sync) = &self.flow_sync {
            problems.extend(flow_sync.problems());
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> HaSection {
        toml::from_str(text).expect("an [ha] section")
    }

    #[test]
    fn every_bad_field_is_named() {
        let section = parse(
            r#"
            name = ""
            floating_addresses = ["0.0.0.0", "10.0.0.1"]
            hooks = { master = ["move-ip"], fault = [] }
            "#,
        );
        let problems: Vec<String> = section.problems().iter().map(ToString::to_string).collect();
        assert_eq!(
            problems,
            [
                "ha.floating_addresses[0]: 0.0.0.0 cannot float between hosts",
                "ha.name: \"\" is not a name: use 1 to 64 characters",
                "ha.hooks.master: \"move-ip\" is not an absolute path: hooks run without a PATH \
                 search",
                "ha.hooks.fault: name the program to run, e.g. \
                 [\"/usr/local/bin/move-floating-ip\"]",
            ]
        );
        let short_secret =
            std::env::temp_dir().join(format!("short-secret-{}", std::process::id()));
        std::fs::write(&short_secret, "0123456789\n").unwrap();
        let flow_sync = parse(&format!(
            r#"
            floating_addresses = ["10.0.0.1"]
            flow_sync = {{ listen = "10.0.2.1:0", peer = "0.0.0.0:7946", secret_file = {:?} }}
            "#,
            short_secret.display()
        ));
        let problems: Vec<String> = flow_sync
            .problems()
            .iter()
            .map(ToString::to_string)
            .collect();
        std::fs::remove_file(&short_secret).unwrap();
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].starts_with("ha.flow_sync.secret_file: "));
        assert!(problems[0].contains("has 10 bytes, use at least 32"));
        assert!(problems[1].starts_with("ha.flow_sync.peer: 0.0.0.0:7946: name the other host"));
        assert!(problems[2].starts_with("ha.flow_sync.listen: give the port"));
        assert!(
            parse("floating_addresses = []").problems()[0]
                .to_string()
                .starts_with("ha.floating_addresses: list the addresses keepalived moves")
        );
    }
}
