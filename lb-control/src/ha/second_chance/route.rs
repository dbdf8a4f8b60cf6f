//! How a host of the pair takes in the gateway's segments the other host sends it over the
//! private link (second chance), addressed to the gateway's address, which this host may not
//! hold: the other host's new connections while its lb-control is down (standing second
//! chance), or its own connections after a planned handover. A routing rule takes them in:
//! packets that arrive on the private link's interface are looked up in a table of their own,
//! where the gateway's addresses are local. Only those: on the client side this host must not
//! answer ARP for the addresses (the other host holds them). The gateway's sockets are
//! transparent (`gateway::Bind`), so they may send from the address.
//!
//! The rule and the table are iproute2's (`ip rule`, `ip route`), as an operator would type
//! them. They stay while lb-control is in a pair, and go when it stops cleanly.

use std::{io, net::IpAddr, path::Path};

use tokio::process::Command;

/// The routing table, and the priority of the rule that leads to it.
pub const TABLE: u32 = 7946;

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("`ip {command}` could not start: {source}; install iproute2")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("`ip {command}` failed: {stderr}")]
    Failed { command: String, stderr: String },
    #[error(
        "net.ipv4.conf.{interface}.rp_filter is strict (1, also when net.ipv4.conf.all.rp_filter \
         is): the gateway's segments the other host sends over the private link carry clients' \
         addresses routed elsewhere and would be dropped; set both to 2 (loose) or 0"
    )]
    StrictReversePath { interface: String },
}

/// The rule and the local routes, in place.
#[derive(Debug)]
pub struct LocalRoutes {
    families: Vec<&'static str>,
}

impl LocalRoutes {
    /// Makes `addresses` local to packets that arrive on `interface`. A rule already in place
    /// for `interface` is kept (a restarted lb-control's: removing it even for a moment would
    /// let the kernel route the other host's segments back to the client side); any other rule
    /// at its priority goes first.
    pub async fn install(interface: &str, addresses: &[IpAddr]) -> Result<LocalRoutes, RouteError> {
        let mut families: Vec<&'static str> = addresses.iter().map(|&a| family(a)).collect();
        families.sort_unstable();
        families.dedup();
        let table = TABLE.to_string();
        for family in &families {
            let rules = ip_output(&[family, "rule", "list", "pref", &table]).await?;
            let wanted = format!("iif {interface} lookup {table}");
            if rules.lines().count() == 1 && rules.contains(&wanted) {
                continue;
            }
            clear(family).await;
            ip(&[
                family, "rule", "add", "pref", &table, "iif", interface, "lookup", &table,
            ])
            .await?;
        }
        for &address in addresses {
            let prefix = if address.is_ipv4() { 32 } else { 128 };
            let local = format!("{address}/{prefix}");
            ip(&[
                family(address),
                "route",
                "replace",
                "local",
                &local,
                "dev",
                "lo",
                "table",
                &table,
            ])
            .await?;
        }
        Ok(LocalRoutes { families })
    }

    /// Removes the rule and the table's routes.
    pub async fn remove(self) {
        for family in &self.families {
            clear(family).await;
        }
    }
}

/// Removes the rule and the table's routes of `family`, as far as they exist.
async fn clear(family: &str) {
    let table = TABLE.to_string();
    // Absent ones fail, which is as good.
    let _ = ip(&[family, "rule", "del", "pref", &table]).await;
    let _ = ip(&[family, "route", "flush", "table", &table]).await;
}

fn family(address: IpAddr) -> &'static str {
    if address.is_ipv4() { "-4" } else { "-6" }
}

/// Whether IPv4 reverse-path filtering is strict on `interface`: the kernel applies the
/// larger of its own and `all`'s value.
pub fn is_strict_reverse_path(interface: &str) -> bool {
    let read = |path: &Path| {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|value| value.trim().parse::<u8>().ok())
            .unwrap_or(0)
    };
    let conf = Path::new("/proc/sys/net/ipv4/conf");
    read(&conf.join("all/rp_filter")).max(read(&conf.join(interface).join("rp_filter"))) == 1
}

async fn ip(args: &[&str]) -> Result<(), RouteError> {
    ip_output(args).await.map(drop)
}

/// Runs `ip ARGS…`; its standard output.
async fn ip_output(args: &[&str]) -> Result<String, RouteError> {
    let command = args.join(" ");
    let output = Command::new("ip")
        .args(args)
        .output()
        .await
        .map_err(|source| RouteError::Spawn {
            command: command.clone(),
            source,
        })?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(RouteError::Failed {
            command,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}
