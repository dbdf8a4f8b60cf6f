//! Another site for the fallback tier: a second lb-control with its gateway in a node's
//! namespace, in front of that node's sim-node, as the other provider's site runs it. The LB's
//! gateway names it in `[[gateway.remotes]]` with a key of that site and that site's CA.
//!
//! The site's lb-control attaches its XDP program to `lo` (generic mode): the lab's node
//! interface already carries an XDP_PASS program, and the site balances nothing in the kernel
//! (its one service only gives its gateway a node).

use std::{
    net::{Ipv4Addr, SocketAddr},
    os::unix::fs::DirBuilderExt,
    path::PathBuf,
    time::Duration,
};

use super::{
    Lab, LabError, SIM_NODE_RPC_PORT, admin::create_api_key, certs::GatewayCerts,
    run::LB_CONTROL_RUNNING_LOG,
};

/// The site gateway's HTTPS port on its node's address.
const SITE_GATEWAY_PORT: u16 = 8443;
/// The site's admin token, which its CLI reads from the state directory.
const SITE_ADMIN_TOKEN: &str = "lab-site-admin-token-0123456789ab";
/// An address of the site's own L4 service, used by nothing: the service is what gives the
/// site's gateway its node.
const SITE_VIP: Ipv4Addr = Ipv4Addr::new(10, 200, 250, 10);
const SITE_RUNNING_TIMEOUT: Duration = Duration::from_secs(20);

/// The other site, running.
#[derive(Debug)]
pub struct RemoteSite {
    /// `https://<node address>:8443`, the site's public endpoint without a key.
    pub url: String,
    /// The site's CA, which the LB's gateway trusts for it alone.
    pub ca: PathBuf,
    /// A file holding an API key of the site's gateway.
    pub key_file: PathBuf,
    /// The site lb-control's log.
    pub log: PathBuf,
}

impl RemoteSite {
    /// The `[[gateway.remotes]]` table naming this site as the LB gateway's tier `tier`: TOML
    /// to append to the `[gateway]` section.
    pub fn gateway_remote(&self, tier: u32) -> String {
        format!(
            "[[gateway.remotes]]\nurl = \"{}\"\nkey_file = \"{}\"\nca_file = \"{}\"\ntier = {tier}\n",
            self.url,
            self.key_file.display(),
            self.ca.display()
        )
    }
}

impl Lab {
    /// Starts the other site in node `index`'s namespace: lb-control with its gateway in front
    /// of that node's sim-node, and an API key made with its CLI. The node is then the site's
    /// alone: leave it out of the LB's services.
    pub fn start_remote_site(&mut self, index: usize) -> Result<RemoteSite, LabError> {
        let node = self.node(index).clone();
        let dir = self.log_dir().to_owned();
        let GatewayCerts { ca, cert, key } =
            GatewayCerts::write(&dir, "site", &[node.addr_v4.into()])?;
        let state_dir = dir.join("site-state");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&state_dir)
            .map_err(LabError::io(format!("creating {}", state_dir.display())))?;
        std::fs::write(
            state_dir.join("admin.token"),
            format!("{SITE_ADMIN_TOKEN}\n"),
        )
        .map_err(LabError::io("writing the site's admin token"))?;
        let listen = SocketAddr::from((node.addr_v4, SITE_GATEWAY_PORT));
        let config = format!(
            "[dataplane]\nnat_source_v4 = \"{addr}\"\n\n\
             [gateway]\nlisten = \"{listen}\"\ntls_cert = \"{cert}\"\ntls_key = \"{key}\"\n\n\
             [[services]]\nvip = \"{SITE_VIP}\"\nport = {SIM_NODE_RPC_PORT}\n\
             backends = [{{ address = \"{addr}:{SIM_NODE_RPC_PORT}\" }}]\n",
            addr = node.addr_v4,
            cert = cert.display(),
            key = key.display(),
        );
        let config_path = dir.join("site.toml");
        std::fs::write(&config_path, config)
            .map_err(LabError::io(format!("writing {}", config_path.display())))?;
        let instance = format!("{}-site", self.prefix());
        self.run.spawn_lb_control(
            &node.netns,
            "lo",
            &instance,
            &state_dir,
            &["--config", &config_path.to_string_lossy()],
            "lb-control-site",
        )?;
        let process = self.run.last_process();
        let log = process.log_path().to_owned();
        process.wait_ready(
            "the site's lb-control to serve",
            SITE_RUNNING_TIMEOUT,
            || {
                Ok(std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .contains(LB_CONTROL_RUNNING_LOG))
            },
        )?;
        let secret = create_api_key(&node.netns, &state_dir, "lab-lb")?;
        let key_file = dir.join("site.key");
        std::fs::write(&key_file, format!("{secret}\n"))
            .map_err(LabError::io("writing the site's key file"))?;
        Ok(RemoteSite {
            url: format!("https://{listen}"),
            ca,
            key_file,
            log,
        })
    }
}
