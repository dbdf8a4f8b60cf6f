//! The `[ha]` section: this lb-control is one of a pair whose floating addresses keepalived
//! moves, and learns its role from keepalived's notify hooks (`lb-control ha notify …`).

use std::net::IpAddr;

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
        assert!(
            parse("floating_addresses = []").problems()[0]
                .to_string()
                .starts_with("ha.floating_addresses: list the addresses keepalived moves")
        );
    }
}
