//! The configuration file (TOML) an operator writes, validated with errors that name the file,
//! the field and the reason. Every error is reported at once.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use lb_common::{maglev::DEFAULT_TABLE_SIZE, maps::DEFAULT_MAX_FLOWS};
use serde::Deserialize;
use thiserror::Error;

use crate::{
    backends::{self, Declared},
    dataplane::{self, AttachMode, BackendSpec, DEFAULT_BPFFS, LbSettings, ServiceSpec},
    gateway,
    health::HealthSettings,
    model::{
        AdminState, BackendDef, BackendState, DEFAULT_RPC_PORT, ForwardingMode, HealthCheck,
        Protocol, ServiceDef, ServiceKey,
    },
};

/// Admin tokens shorter than this are guessable.
pub const MIN_TOKEN_LEN: usize = 16;

/// Linux limits interface names to 15 bytes (IFNAMSIZ less the NUL).
const MAX_INTERFACE_NAME: usize = 15;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Names this load balancer on the host: its maps are pinned under `<bpffs>/<instance>/`.
    #[serde(default = "default_instance")]
    pub instance: String,
    /// Holds the state store (`state.db`) and the generated admin token.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default)]
    pub dataplane: DataplaneSection,
    #[serde(default)]
    pub admin: AdminSection,
    #[serde(default)]
    pub health: HealthSettings,
    /// L4 services balanced in the kernel.
    #[serde(default)]
    pub services: Vec<ServiceSection>,
    #[serde(default)]
    pub log: LogSection,
    #[serde(default)]
    pub gateway: GatewaySection,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServiceSection {
    pub vip: IpAddr,
    pub port: u16,
    #[serde(default = "default_protocol")]
    pub protocol: Protocol,
    #[serde(default)]
    pub mode: ForwardingMode,
    #[serde(default)]
    pub check: HealthCheck,
    #[serde(default)]
    pub backends: Vec<BackendSection>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BackendSection {
    pub address: SocketAddr,
    #[serde(default = "default_rpc_port")]
    pub rpc_port: u16,
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default)]
    pub admin: AdminState,
}

/// The admin REST API.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    /// Keep it on loopback unless a firewall guards it: it can change everything.
    #[serde(default = "default_admin_listen")]
    pub listen: SocketAddr,
    /// The bearer token, inline. Prefer `token_file` or the `LB_ADMIN_TOKEN` environment
    /// variable; with none of them, a token is generated into `<state_dir>/admin.token`.
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub token_file: Option<PathBuf>,
}

/// The JSON-RPC gateway (HTTPS and HTTP/2 in front of the nodes). Off without `listen`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GatewaySection {
    /// e.g. `"0.0.0.0:443"`; None: no gateway.
    pub listen: Option<SocketAddr>,
    /// PEM certificate chain, leaf first; re-read on SIGHUP.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of the leaf certificate; re-read on SIGHUP.
    pub tls_key: Option<PathBuf>,
    /// Serve plain HTTP instead of TLS: only behind something else that terminates TLS.
    pub plain_http: bool,
    /// The service (`"VIP:port"` or `"VIP:port/tcp"`) whose backends' RPC endpoints the gateway
    /// calls; None: every backend of every service, once per RPC endpoint.
    pub service: Option<String>,
    /// Largest request body (HTTP 413 beyond) and largest WebSocket message (close code 1009
    /// beyond) taken.
    pub max_body_bytes: usize,
    /// Most calls in one batch.
    pub max_batch: usize,
    /// Memory budget of the response cache, in bytes (entries' bookkeeping included).
    pub cache_bytes: u64,
    /// Time a client has for the TLS handshake and for each request's headers (slowloris).
    #[serde(deserialize_with = "crate::health::parse_duration")]
    pub header_timeout: Duration,
    /// A connection with no bytes either way for this long is closed.
    #[serde(deserialize_with = "crate::health::parse_duration")]
    pub idle_timeout: Duration,
    /// Time a node has to answer one call; a read that runs out goes to another node.
    #[serde(deserialize_with = "crate::health::parse_duration")]
    pub upstream_timeout: Duration,
    /// Open connections one client address may hold; more are closed at once.
    pub max_connections_per_ip: u32,
    /// Open WebSocket connections one API key may hold; more are refused (HTTP 429).
    pub max_connections_per_key: u32,
    /// Head subscriptions (`chain_subscribeNewHeads`, `chain_subscribeFinalizedHeads`) one
    /// WebSocket connection may hold; the gateway serves these itself. The node limits the
    /// other subscriptions on the connection's own upstream connection.
    pub max_subscriptions_per_connection: u32,
    /// Methods refused besides the node's unsafe ones: names, or prefixes ending in `*`.
    pub deny: Vec<String>,
    /// Methods let through even if unsafe or denied (allow wins).
    pub allow: Vec<String>,
    /// Put a source address on the kernel blocklist after repeated auth failures; off when
    /// absent.
    pub auth_failures_block: Option<AuthFailureBlock>,
}

/// `[gateway.auth_failures_block]`: `after` failures (missing, unknown or revoked key) within
/// `within` block the source address for `block_for`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AuthFailureBlock {
    pub after: u32,
    #[serde(
        default = "default_block_within",
        deserialize_with = "crate::health::parse_duration"
    )]
    pub within: Duration,
    #[serde(
        default = "default_block_for",
        deserialize_with = "crate::health::parse_duration"
    )]
    pub block_for: Duration,
}

fn default_block_within() -> Duration {
    Duration::from_secs(60)
}

fn default_block_for() -> Duration {
    Duration::from_secs(600)
}

impl Default for GatewaySection {
    fn default() -> Self {
        GatewaySection {
            listen: None,
            tls_cert: None,
            tls_key: None,
            plain_http: false,
            service: None,
            max_body_bytes: 10 * 1024 * 1024,
            max_batch: 100,
            cache_bytes: crate::cache::DEFAULT_MAX_BYTES,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            upstream_timeout: Duration::from_secs(10),
            max_connections_per_ip: 256,
            max_connections_per_key: 1024,
            max_subscriptions_per_connection: 1024,
            deny: Vec::new(),
            allow: Vec::new(),
            auth_failures_block: None,
        }
    }
}

impl GatewaySection {
    /// The service the gateway is limited to, if any.
    pub fn service_key(&self) -> Result<Option<ServiceKey>, String> {
        self.service.as_deref().map(parse_service_key).transpose()
    }

    fn problems(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut report = |field: &str, reason: String| {
            problems.push(Problem {
                field: format!("gateway.{field}"),
                reason,
            });
        };
        if let Err(reason) = self.service_key() {
            report("service", reason);
        }
        if self.listen.is_some() && !self.plain_http {
            for (field, value) in [("tls_cert", &self.tls_cert), ("tls_key", &self.tls_key)] {
                if value.is_none() {
                    report(
                        field,
                        "required to serve TLS: give a PEM file (or set plain_http = true \
                         behind another TLS terminator)"
                            .to_owned(),
                    );
                }
            }
        }
        for (field, value) in [
            ("max_body_bytes", self.max_body_bytes),
            ("max_batch", self.max_batch),
            ("cache_bytes", self.cache_bytes as usize),
            (
                "max_connections_per_ip",
                self.max_connections_per_ip as usize,
            ),
            (
                "max_connections_per_key",
                self.max_connections_per_key as usize,
            ),
            (
                "max_subscriptions_per_connection",
                self.max_subscriptions_per_connection as usize,
            ),
        ] {
            if value == 0 {
                report(field, "must be at least 1".to_owned());
            }
        }
        for (field, value) in [
            ("header_timeout", self.header_timeout),
            ("idle_timeout", self.idle_timeout),
            ("upstream_timeout", self.upstream_timeout),
        ] {
            if value.is_zero() {
                report(field, "must be longer than 0".to_owned());
            }
        }
        if let Some(block) = &self.auth_failures_block {
            if block.after == 0 {
                report("auth_failures_block.after", "must be at least 1".to_owned());
            }
            for (field, value) in [("within", block.within), ("block_for", block.block_for)] {
                if value.is_zero() {
                    report(
                        &format!("auth_failures_block.{field}"),
                        "must be longer than 0".to_owned(),
                    );
                }
            }
        }
        for (list, patterns) in [("deny", &self.deny), ("allow", &self.allow)] {
            for (i, pattern) in patterns.iter().enumerate() {
                if let Err(reason) = gateway::validate_pattern(pattern) {
                    report(&format!("{list}[{i}]"), reason);
                }
            }
        }
        problems
    }
}

/// `"192.0.2.10:443"` (TCP) or `"192.0.2.10:443/tcp"`.
fn parse_service_key(text: &str) -> Result<ServiceKey, String> {
    let (address, protocol) = text.split_once('/').unwrap_or((text, "tcp"));
    let protocol = match protocol {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        other => return Err(format!("\"{other}\" is not a protocol: use tcp or udp")),
    };
    let address: SocketAddr = address.parse().map_err(|_| {
        format!("\"{text}\" is not a service: write VIP:port, e.g. \"192.0.2.10:443/tcp\"")
    })?;
    Ok(ServiceKey {
        vip: address.ip(),
        port: address.port(),
        protocol,
    })
}

/// What to do with fragments of service traffic (their ports are unknown).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FragmentPolicy {
    #[default]
    Drop,
    Pass,
}

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
    #[serde(
        default = "default_nat_port_hold",
        deserialize_with = "crate::health::parse_duration"
    )]
    pub nat_port_hold: Duration,
    /// DSR outer source prefix (a /24 for IPv4, /112 for IPv6: the flow hash fills the rest).
    #[serde(default = "default_dsr_source_v4")]
    pub dsr_source_v4: Ipv4Addr,
    #[serde(default = "default_dsr_source_v6")]
    pub dsr_source_v6: Ipv6Addr,
    #[serde(default)]
    pub fragments: FragmentPolicy,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    #[serde(default)]
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            instance: default_instance(),
            state_dir: default_state_dir(),
            dataplane: DataplaneSection::default(),
            admin: AdminSection::default(),
            health: HealthSettings::default(),
            services: Vec::new(),
            log: LogSection::default(),
            gateway: GatewaySection::default(),
        }
    }
}

impl Default for AdminSection {
    fn default() -> Self {
        AdminSection {
            listen: default_admin_listen(),
            token: None,
            token_file: None,
        }
    }
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

fn default_instance() -> String {
    "lb".to_owned()
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/lb-control")
}

/// The admin API's default address: loopback only.
pub const DEFAULT_ADMIN_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9900);

fn default_admin_listen() -> SocketAddr {
    DEFAULT_ADMIN_LISTEN
}

fn default_rpc_port() -> u16 {
    DEFAULT_RPC_PORT
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

fn default_protocol() -> Protocol {
    Protocol::Tcp
}

fn default_weight() -> u32 {
    1
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("{file}: {source}")]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: {message}")]
    Parse { file: PathBuf, message: String },
    #[error("{file}: {}", .problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid {
        file: PathBuf,
        problems: Vec<Problem>,
    },
}

/// One invalid field: where it is and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub field: String,
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

impl Config {
    pub fn load(file: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
            file: file.to_owned(),
            source,
        })?;
        Config::parse(&text, file)
    }

    /// Parses and validates `text`; `file` only names the source in errors.
    pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|error| ConfigError::Parse {
            file: file.to_owned(),
            message: error.to_string().trim_end().to_owned(),
        })?;
        let problems = config.problems();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid {
                file: file.to_owned(),
                problems,
            })
        }
    }

    /// Every invalid field, in file order.
    pub fn problems(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        if let Err(reason) = validate_instance(&self.instance) {
            problems.push(Problem {
                field: "instance".to_owned(),
                reason,
            });
        }
        for (i, name) in self.dataplane.interfaces.iter().enumerate() {
            if let Err(reason) = validate_interface_name(name) {
                problems.push(Problem {
                    field: format!("dataplane.interfaces[{i}]"),
                    reason,
                });
            }
        }
        for problem in dataplane::validate_services(&self.lb_settings(), &self.service_specs()) {
            problems.push(Problem {
                field: "services".to_owned(),
                reason: problem,
            });
        }
        for (i, service) in self.services.iter().enumerate() {
            for (j, backend) in service.backends.iter().enumerate() {
                let field = |name: &str| format!("services[{i}].backends[{j}].{name}");
                if let Err(error) = backends::validate_weight(backend.weight) {
                    problems.push(Problem {
                        field: field("weight"),
                        reason: error.to_string(),
                    });
                }
                if backend.rpc_port == 0 {
                    problems.push(Problem {
                        field: field("rpc_port"),
                        reason: "port 0 is not a port a node can listen on".to_owned(),
                    });
                }
            }
        }
        for (field, reason) in self.health.problems() {
            problems.push(Problem { field, reason });
        }
        problems.extend(self.gateway.problems());
        if self.admin.token.is_some() && self.admin.token_file.is_some() {
            problems.push(Problem {
                field: "admin.token_file".to_owned(),
                reason: "give the token inline or in a file, not both".to_owned(),
            });
        }
        if self
            .admin
            .token
            .as_deref()
            .is_some_and(|token| token.len() < MIN_TOKEN_LEN)
        {
            problems.push(Problem {
                field: "admin.token".to_owned(),
                reason: format!("too short: use at least {MIN_TOKEN_LEN} characters"),
            });
        }
        if !self.state_dir.is_absolute() {
            problems.push(Problem {
                field: "state_dir".to_owned(),
                reason: format!("\"{}\" is not an absolute path", self.state_dir.display()),
            });
        }
        if !self.dataplane.bpffs.is_absolute() {
            problems.push(Problem {
                field: "dataplane.bpffs".to_owned(),
                reason: format!(
                    "\"{}\" is not an absolute path",
                    self.dataplane.bpffs.display()
                ),
            });
        }
        problems
    }
}

impl Config {
    /// The program-wide forwarding settings the data plane needs.
    pub fn lb_settings(&self) -> LbSettings {
        let dataplane = &self.dataplane;
        LbSettings {
            nat_source_v4: dataplane.nat_source_v4,
            nat_source_v6: dataplane.nat_source_v6,
            nat_ports: dataplane.nat_ports[0]..=dataplane.nat_ports[1],
            nat_port_hold: dataplane.nat_port_hold,
            dsr_source_v4: dataplane.dsr_source_v4,
            dsr_source_v6: dataplane.dsr_source_v6,
            maglev_table_size: dataplane.maglev_table_size,
            pass_fragments: dataplane.fragments == FragmentPolicy::Pass,
        }
    }

    /// The services and backends the file declares, for the backend set.
    pub fn declared(&self) -> Declared {
        Declared {
            services: self
                .services
                .iter()
                .map(|service| {
                    let def = ServiceDef {
                        vip: service.vip,
                        port: service.port,
                        protocol: service.protocol,
                        mode: service.mode,
                        check: service.check,
                    };
                    let backends = service
                        .backends
                        .iter()
                        .map(|backend| BackendDef {
                            address: backend.address,
                            rpc_port: backend.rpc_port,
                            weight: backend.weight,
                            admin: backend.admin,
                        })
                        .collect();
                    (def, backends)
                })
                .collect(),
        }
    }

    /// The declared services as the kernel would get them with every backend up: checks the
    /// kernel's limits before anything starts.
    fn service_specs(&self) -> Vec<ServiceSpec> {
        self.services
            .iter()
            .map(|service| ServiceSpec {
                vip: service.vip,
                port: service.port,
                protocol: service.protocol,
                mode: service.mode,
                backends: service
                    .backends
                    .iter()
                    .map(|backend| BackendSpec {
                        addr: backend.address,
                        weight: backend.weight,
                        state: BackendState::Up,
                    })
                    .collect(),
            })
            .collect()
    }
}

/// The instance names a directory, so it is kept to a safe, short alphabet.
pub fn validate_instance(instance: &str) -> Result<(), String> {
    let valid = !instance.is_empty()
        && instance.len() <= 64
        && instance
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "\"{instance}\" is not a valid instance name: use 1 to 64 letters, digits, '-' or '_'"
        ))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("lb.toml"))
    }

    #[test]
    fn empty_file_gives_working_defaults() {
        let config = parse("").expect("an empty config is valid");
        assert_eq!(config, Config::default());
        assert_eq!(config.dataplane.bpffs, Path::new("/sys/fs/bpf"));
        assert_eq!(config.dataplane.xdp_mode, AttachMode::Auto);
    }

    #[test]
    fn annotated_example_config_is_valid() {
        let config = parse(include_str!("../../examples/lb.toml")).expect("examples/lb.toml");
        assert_eq!(config.services.len(), 1);
        assert_eq!(config.services[0].backends[2].admin, AdminState::Draining);
    }

    #[test]
    fn service_errors_name_the_service_and_the_fix() {
        let message = parse(
            r#"
            [[services]]
            vip = "10.0.0.1"
            port = 80
            backends = [{ address = "[2001:db8::1]:80" }]
            "#,
        )
        .expect_err("mixed families, no NAT source")
        .to_string();
        assert!(
            message.contains(
                "service 10.0.0.1:80: backend [2001:db8::1]:80 is of another address family"
            ),
            "{message}"
        );
        assert!(
            message.contains("NAT mode needs a NAT source address"),
            "{message}"
        );
        let message = parse("[[services]]\nvip = \"10.0.0.300\"\nport = 80\n")
            .expect_err("bad address")
            .to_string();
        assert!(
            message.contains("vip") && message.contains("invalid IP address"),
            "{message}"
        );
    }

    #[test]
    fn full_file_is_read() {
        let config = parse(
            r#"
            instance = "edge-1"
            [dataplane]
            interfaces = ["eth0", "eth1"]
            xdp_mode = "generic"
            bpffs = "/mnt/bpf"
            [log]
            format = "json"
            "#,
        )
        .expect("valid config");
        assert_eq!(config.instance, "edge-1");
        assert_eq!(config.dataplane.interfaces, ["eth0", "eth1"]);
        assert_eq!(config.dataplane.xdp_mode, AttachMode::Generic);
        assert_eq!(config.log.format, LogFormat::Json);
    }

    #[test]
    fn every_invalid_field_is_reported_at_once() {
        let error = parse(
            r#"
            instance = "a/b"
            [dataplane]
            interfaces = ["eth0", "a-name-longer-than-15", ""]
            bpffs = "relative/path"
            "#,
        )
        .expect_err("invalid config");
        let message = error.to_string();
        for expected in [
            "lb.toml: instance: \"a/b\" is not a valid instance name",
            "dataplane.interfaces[1]: \"a-name-longer-than-15\" is not an interface name",
            "dataplane.interfaces[2]: \"\" is not an interface name",
            "dataplane.bpffs: \"relative/path\" is not an absolute path",
        ] {
            assert!(
                message.contains(expected),
                "{expected:?} missing from:\n{message}"
            );
        }
    }

    #[test]
    fn gateway_section_defaults_and_errors() {
        let config = parse("[gateway]\nlisten = \"127.0.0.1:8443\"\nplain_http = true\n")
            .expect("plain HTTP needs no certificate");
        assert_eq!(config.gateway.max_batch, 100);
        assert_eq!(config.gateway.max_body_bytes, 10 * 1024 * 1024);
        let message = parse(
            r#"
            [gateway]
            listen = "0.0.0.0:443"
            service = "10.0.0.1/tcp"
            max_batch = 0
            header_timeout = "0s"
            deny = ["bad name"]
            auth_failures_block = { after = 0 }
            "#,
        )
        .expect_err("invalid gateway")
        .to_string();
        for expected in [
            "gateway.service: \"10.0.0.1/tcp\" is not a service",
            "gateway.tls_cert: required to serve TLS",
            "gateway.tls_key: required to serve TLS",
            "gateway.max_batch: must be at least 1",
            "gateway.header_timeout: must be longer than 0",
            "gateway.deny[0]: \"bad name\" is not a method name",
            "gateway.auth_failures_block.after: must be at least 1",
        ] {
            assert!(
                message.contains(expected),
                "{expected:?} missing from:\n{message}"
            );
        }
        let config = parse("[gateway]\nservice = \"10.0.0.1:9944\"\n").expect("valid");
        assert_eq!(
            config.gateway.service_key(),
            Ok(Some(ServiceKey {
                vip: "10.0.0.1".parse().unwrap(),
                port: 9944,
                protocol: Protocol::Tcp,
            }))
        );
    }

    #[test]
    fn unknown_field_and_bad_value_name_the_file_and_field() {
        let message = parse("[dataplane]\nxdp_mode = \"fast\"\n")
            .expect_err("bad mode")
            .to_string();
        assert!(message.starts_with("lb.toml: "), "{message}");
        assert!(message.contains("xdp_mode"), "{message}");
        assert!(message.contains("unknown variant `fast`"), "{message}");

        let message = parse("[dataplane]\ninterface = [\"eth0\"]\n")
            .expect_err("unknown field")
            .to_string();
        assert!(message.contains("unknown field `interface`"), "{message}");
    }
}
