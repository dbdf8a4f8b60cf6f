//! How the host that hands over still takes its gateway connections' segments in: they come
//! back over the private link (second chance), addressed to the gateway's address, which this
//! host no longer holds. A routing rule takes them in: packets that arrive on the private
//! link's interface are looked up in a table of their own, where the gateway's addresses are
//! local. Only those: on the client side this host must not answer ARP for the addresses (the
//! other host holds them now). The gateway's sockets are transparent (`gateway::Bind`), so
//! they may still send from the address.
//!
//! The rule and the table are iproute2's (`ip rule`, `ip route`), as an operator would type
//! them; both go again when the drain ends.

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
         is): the gateway's segments that come back over the private link carry clients' \
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
    /// Makes `addresses` local to packets that arrive on `interface` (replacing whatever an
    /// earlier run left).
    pub async fn install(interface: &str, addresses: &[IpAddr]) -> Result<LocalRoutes, RouteError> {
        let mut families: Vec<&'static str> = addresses.iter().map(|&a| family(a)).collect();
        families.sort_unstable();
        families.dedup();
        let routes = LocalRoutes { families };
        routes.clear().await;
        let table = TABLE.to_string();
        for family in &routes.families {
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
        Ok(routes)
    }

    /// Removes the rule and the table's routes.
    pub async fn remove(self) {
        self.clear().await;
    }

    /// Removes them, as far as they exist.
    async fn clear(&self) {
        let table = TABLE.to_string();
        for family in &self.families {
            // Absent ones fail, which is as good.
            let _ = ip(&[family, "rule", "del", "pref", &table]).await;
            let _ = ip(&[family, "route", "flush", "table", &table]).await;
        }
    }
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
        Ok(())
    } else {
        Err(RouteError::Failed {
            command,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}
