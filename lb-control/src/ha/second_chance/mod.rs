//! Standing second chance between the hosts of a pair: what keeps a crashed lb-control from
//! refusing new gateway connections.
//!
//! When the master's lb-control dies, its host keeps the floating gateway address until
//! keepalived moves it (~0.35 s after a crash of both; never, if keepalived does not notice
//! lb-control's death), and its kernel answers every SYN to the gateway with a reset: nothing
//! listens. So each member arms the pinned `STANDING_SECOND_CHANCE` entry of its XDP program
//! at start (`lb-ebpf/src/second_chance.rs`): while no gateway listens here, a segment to the
//! gateway that finds no socket here (a SYN, and the rest of its connection) goes to the other
//! host over the private link. Once the gateway listens here again, a segment of no connection
//! is reset here, as without second chance: the other host may be the one that died.
//! The entry has no deadline and needs no userspace: it works after this process's death,
//! which is when it matters. Each member also keeps the routing rule ([`route`]) that takes
//! the other host's segments in on its floating-bound gateway listener, which answers the
//! clients directly. A planned handover's second chance arrives through the same rule.
//!
//! Lifetime: armed (and the rule in place) from the start of an lb-control in a pair with
//! `[ha] flow_sync` (its private link) and a gateway, through crashes and restarts (SIGQUIT,
//! `lb-control upgrade`); disarmed (and the rule removed) when lb-control stops cleanly
//! (SIGINT, SIGTERM: the program is detached then anyway) and at the start of an lb-control
//! that is not in such a pair any more.

mod route;

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use tokio::sync::Mutex;
use tracing::{error, info, warn};

use self::route::{LocalRoutes, is_strict_reverse_path};
pub use self::route::{RouteError, TABLE as ROUTE_TABLE};
use super::{HaSection, addresses::interface_of, set_ip_option};
use crate::dataplane::{
    DataplaneError, SecondChanceMap, SecondChanceMode, read_second_chance_packets,
};

#[derive(Debug, thiserror::Error)]
pub enum SecondChanceError {
    #[error(
        "ha.flow_sync.listen: {0} is on no interface of this host; the private link's interface \
         is found by it"
    )]
    NoPrivateInterface(IpAddr),
    #[error("listing this host's interfaces: {0}")]
    Interfaces(#[source] std::io::Error),
    #[error("the standing second chance: {0}")]
    Dataplane(#[from] DataplaneError),
    #[error(
        "the admin API's listener: {0} (IP_TRANSPARENT, so it may answer at a floating address \
         this host does not hold, needs CAP_NET_ADMIN)"
    )]
    AdminListener(#[source] std::io::Error),
}

/// This member's standing second chance: its XDP entry towards the other host, and the rule
/// that takes the other host's segments in.
pub struct StandingSecondChance {
    pin_dir: PathBuf,
    /// The private link's interface.
    interface: String,
    /// The gateway's addresses that float (all of its family when it listens on every address).
    gateway_addresses: Vec<IpAddr>,
    /// None while the rule could not be put in place (see the log).
    routes: Mutex<Option<LocalRoutes>>,
}

impl StandingSecondChance {
    /// Arms it when this lb-control is in a pair with a private link (`section`'s flow sync)
    /// and a gateway listening at `gateway`; otherwise disarms what an earlier lb-control of
    /// this instance may have left armed, and returns None. The admin API's port is armed too
    /// when its listener (`admin`) answers at the gateway's address (the same address or every
    /// one); the listener then may answer from the address when this host does not hold it
    /// (`IP_TRANSPARENT`), as the gateway's may: the other host's operators' calls come here.
    pub async fn start(
        section: Option<&HaSection>,
        gateway: Option<SocketAddr>,
        admin: &std::net::TcpListener,
        pin_dir: &Path,
    ) -> Result<Option<StandingSecondChance>, SecondChanceError> {
        let mut entry = SecondChanceMap::open(pin_dir, SecondChanceMode::Standing)?;
        let sent = read_second_chance_packets(pin_dir, SecondChanceMode::Standing)?;
        if sent > 0 {
            info!(
                "ha: standing second chance has sent {sent} gateway packets to the other host \
                 since this instance's maps were made (lb_xdp_second_chance_packets_total)"
            );
        }
        // Only a gateway on the floating addresses is the other host's to serve as well.
        let (Some(section), Some(gateway)) = (section, gateway) else {
            entry.disarm()?;
            return Ok(None);
        };
        if !section.floats(gateway.ip()) && !gateway.ip().is_unspecified() {
            entry.disarm()?;
            return Ok(None);
        }
        let Some(flow_sync) = &section.flow_sync else {
            entry.disarm()?;
            info!(
                "ha: no [ha] flow_sync, so no private link: while lb-control is down, this \
                 host's kernel refuses new gateway connections until keepalived moves the \
                 addresses"
            );
            return Ok(None);
        };
        let private = flow_sync.listen.ip();
        let interface = interface_of(private)
            .map_err(SecondChanceError::Interfaces)?
            .ok_or(SecondChanceError::NoPrivateInterface(private))?;
        let peer = flow_sync.peer.ip();
        let admin_address = admin
            .local_addr()
            .map_err(SecondChanceError::AdminListener)?;
        let admin_port = reaches_admin_at(admin_address, gateway).then_some(admin_address.port());
        if admin_port.is_some() {
            set_ip_option(admin, libc::IP_TRANSPARENT).map_err(SecondChanceError::AdminListener)?;
        }
        entry.arm(gateway, admin_port, peer)?;
        let standing = StandingSecondChance {
            pin_dir: pin_dir.to_owned(),
            interface,
            gateway_addresses: gateway_addresses(section, gateway),
            routes: Mutex::new(None),
        };
        match standing.ensure_routes().await {
            Ok(()) => info!(
                %gateway, ?admin_port, %peer, interface = %standing.interface,
                "ha: standing second chance armed: while no gateway (or admin API) listens \
                 here, new connections to it go to the other host; the other host's come in on \
                 the private link"
            ),
            Err(error) => error!(
                "ha: the other host's gateway segments cannot come in here (second chance): \
                 {error}"
            ),
        }
        Ok(Some(standing))
    }

    /// Puts the routing rule in place unless it is; an error names why it cannot be.
    pub async fn ensure_routes(&self) -> Result<(), RouteError> {
        let mut routes = self.routes.lock().await;
        if routes.is_some() || self.gateway_addresses.is_empty() {
            return Ok(());
        }
        self.check_reverse_path()?;
        *routes = Some(LocalRoutes::install(&self.interface, &self.gateway_addresses).await?);
        Ok(())
    }

    /// Fails when strict reverse-path filtering on the private link would drop the other
    /// host's segments (they carry clients' addresses).
    pub fn check_reverse_path(&self) -> Result<(), RouteError> {
        if self.gateway_addresses.iter().any(IpAddr::is_ipv4)
            && is_strict_reverse_path(&self.interface)
        {
            return Err(RouteError::StrictReversePath {
                interface: self.interface.clone(),
            });
        }
        Ok(())
    }

    /// A clean stop: disarmed, the rule removed.
    pub async fn stop(&self) {
        let disarmed = SecondChanceMap::open(&self.pin_dir, SecondChanceMode::Standing)
            .and_then(|mut entry| entry.disarm());
        match disarmed {
            Ok(()) => info!("ha: standing second chance disarmed"),
            Err(error) => warn!("ha: disarming the standing second chance: {error}"),
        }
        if let Some(routes) = self.routes.lock().await.take() {
            routes.remove().await;
        }
    }
}

/// Whether the admin API listening at `admin` answers at the gateway's address too (every
/// address of its family, or the same one), so the other host's serves it there as well.
fn reaches_admin_at(admin: SocketAddr, gateway: SocketAddr) -> bool {
    admin.port() != gateway.port()
        && admin.is_ipv4() == gateway.is_ipv4()
        && (admin.ip().is_unspecified() || admin.ip() == gateway.ip())
}

/// The gateway's addresses the other host's segments come to: its listening address, or when
/// it listens on every address, the floating ones of its family.
fn gateway_addresses(section: &HaSection, gateway: SocketAddr) -> Vec<IpAddr> {
    let listen = gateway.ip();
    if listen.is_unspecified() {
        section
            .floating_addresses
            .iter()
            .copied()
            .filter(|address| address.is_ipv4() == listen.is_ipv4())
            .collect()
    } else {
        vec![listen]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_admin_port_is_armed_only_where_the_admin_api_answers_at_the_gateway_s_address() {
        let gateway: SocketAddr = "10.200.1.1:8443".parse().unwrap();
        let every_v4: SocketAddr = "0.0.0.0:9900".parse().unwrap();
        let same: SocketAddr = "10.200.1.1:9900".parse().unwrap();
        let private: SocketAddr = "10.200.2.1:9900".parse().unwrap();
        let every_v6: SocketAddr = "[::]:9900".parse().unwrap();
        let loopback: SocketAddr = "127.0.0.1:9900".parse().unwrap();
        assert!(reaches_admin_at(every_v4, gateway));
        assert!(reaches_admin_at(same, gateway));
        assert!(!reaches_admin_at(private, gateway));
        assert!(!reaches_admin_at(every_v6, gateway));
        assert!(!reaches_admin_at(loopback, gateway));
        let any_gateway: SocketAddr = "0.0.0.0:8443".parse().unwrap();
        assert!(reaches_admin_at(every_v4, any_gateway));
        assert!(!reaches_admin_at(private, any_gateway));
    }
}
