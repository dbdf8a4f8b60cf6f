//! The configuration file (TOML) an operator writes, validated with errors that name the file,
//! the field and the reason. Every error is reported at once.
//!
//! Each section belongs to the module it configures (`[dataplane]` to `dataplane`, `[admin]`
//! to `api`, `[health]` to `health`, `[[services]]` to `backends`, `[gateway]` to `gateway`),
//! which reports that section's problems; this module parses the file and collects them.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;
use thiserror::Error;

use crate::{
    api::AdminSection,
    backends::{
        Declared,
        settings::{self as services, ServiceSection},
    },
    dataplane::{DataplaneSection, LbSettings},
    gateway::GatewaySection,
    ha::HaSection,
    health::HealthSettings,
    section::Problem,
    store::StoreSection,
};

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
    #[serde(default)]
    pub store: StoreSection,
    /// One of an HA pair: the floating addresses keepalived moves, role hooks.
    #[serde(default)]
    pub ha: Option<HaSection>,
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
            store: StoreSection::default(),
            ha: None,
        }
    }
}

fn default_instance() -> String {
    "lb".to_owned()
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/lb-control")
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

    /// Every invalid field, each section's in turn.
    pub fn problems(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        if let Err(reason) = validate_instance(&self.instance) {
            problems.push(Problem::new("instance", reason));
        }
        problems.extend(self.dataplane.problems());
        problems.extend(services::problems(&self.services, &self.lb_settings()));
        problems.extend(self.health.problems());
        problems.extend(self.gateway.problems());
        problems.extend(self.admin.problems());
        problems.extend(self.store.problems());
        if let Some(ha) = &self.ha {
            problems.extend(ha.problems());
            problems.extend(self.pair_problems(ha));
        }
        if !self.state_dir.is_absolute() {
            problems.push(Problem::new(
                "state_dir",
                format!("\"{}\" is not an absolute path", self.state_dir.display()),
            ));
        }
        problems
    }

    /// What must float for a takeover to carry the traffic: the gateway's address (unless it
    /// listens on every address) and the NAT source, to which the nodes answer.
    fn pair_problems(&self, ha: &HaSection) -> Vec<Problem> {
        let mut problems = Vec::new();
        if let Some(listen) = self.gateway.listen
            && !listen.ip().is_unspecified()
            && !ha.floats(listen.ip())
        {
            problems.push(Problem::new(
                "gateway.listen",
                format!(
                    "{} is not in ha.floating_addresses: clients reach the pair at a floating                      address, and only that one is bound ahead of a takeover",
                    listen.ip()
                ),
            ));
        }
        let nat_sources = [
            (
                "dataplane.nat_source_v4",
                self.dataplane.nat_source_v4.map(IpAddr::from),
            ),
            (
                "dataplane.nat_source_v6",
                self.dataplane.nat_source_v6.map(IpAddr::from),
            ),
        ];
        for (field, source) in nat_sources {
            if let Some(source) = source
                && !ha.floats(source)
            {
                problems.push(Problem::new(
                    field,
                    format!(
                        "{source} is not in ha.floating_addresses: the nodes answer NAT flows \
                         to it, so it must move with the master"
                    ),
                ));
            }
        }
        problems
    }

    /// The program-wide forwarding settings the data plane needs.
    pub fn lb_settings(&self) -> LbSettings {
        self.dataplane.lb_settings()
    }

    /// The services and backends the file declares, for the backend set.
    pub fn declared(&self) -> Declared {
        services::declared(&self.services)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        dataplane::AttachMode,
        model::{AdminState, Protocol, ServiceKey},
    };

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
        assert_eq!(config.services[0].backends[3].tier, 1);
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
    fn service_problems_name_the_entry_and_the_setting() {
        let message = parse(
            r#"
            [dataplane]
            nat_source_v4 = "10.0.0.9"
            maglev_table_size = 1000
            [[services]]
            vip = "10.0.0.1"
            port = 80
            [[services]]
            vip = "10.0.0.2"
            port = 0
            backends = [{ address = "10.0.0.3:80", tier = 10 }]
            "#,
        )
        .expect_err("port 0, table size not a prime, tier 10")
        .to_string();
        assert!(
            message.contains(
                "services[1].backends[0].tier: tier: 10 is not a tier: use 0 (primary) to 9"
            ),
            "{message}"
        );
        assert!(
            message.contains("services[1]: service 10.0.0.2:0: port 0"),
            "{message}"
        );
        assert!(!message.contains("services[0]"), "{message}");
        assert!(
            message.contains("dataplane.maglev_table_size: maglev table size"),
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
            max_connections = 0
            ipv6_prefix_len = 16
            header_timeout = "0s"
            deny = ["bad name"]
            auth_failures_block = { after = 0 }
            [[gateway.remotes]]
            url = "http://fallback.example.org"
            key_file = "/etc/lb-control/fallback.key"
            ca_file = "/etc/lb-control/fallback-ca.pem"
            tier = 12
            "#,
        )
        .expect_err("invalid gateway")
        .to_string();
        for expected in [
            "gateway.service: \"10.0.0.1/tcp\" is not a service",
            "gateway.tls_cert: required to serve TLS",
            "gateway.tls_key: required to serve TLS",
            "gateway.max_batch: must be at least 1",
            "gateway.max_connections: must be at least 1",
            "gateway.ipv6_prefix_len: 16 is not a prefix length from 32 to 128",
            "gateway.header_timeout: must be longer than 0",
            "gateway.deny[0]: \"bad name\" is not a method name",
            "gateway.auth_failures_block.after: must be at least 1",
            "gateway.remotes[0].url: \"http://fallback.example.org\": the remote is called over \
             TLS",
            "gateway.remotes[0].tier: tier: 12 is not a tier",
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
    fn a_pair_floats_the_gateway_address_and_the_nat_source() {
        let pair = r#"
            [dataplane]
            nat_source_v4 = "10.0.1.1"
            [gateway]
            listen = "10.0.0.1:443"
            plain_http = true
            [ha]
            name = "lb-a"
            floating_addresses = ["10.0.0.1", "10.0.1.1"]
            hooks = { master = ["/usr/local/bin/move-floating-ip", "--to", "me"] }
            "#;
        let config = parse(pair).expect("a valid pair member");
        let ha = config.ha.expect("[ha]");
        assert_eq!(ha.name.as_deref(), Some("lb-a"));
        assert!(ha.floats("10.0.1.1".parse().unwrap()));
        let message = parse(&pair.replace("[\"10.0.0.1\", \"10.0.1.1\"]", "[\"10.0.9.9\"]"))
            .expect_err("neither floats")
            .to_string();
        for expected in [
            "gateway.listen: 10.0.0.1 is not in ha.floating_addresses",
            "dataplane.nat_source_v4: 10.0.1.1 is not in ha.floating_addresses",
        ] {
            assert!(
                message.contains(expected),
                "{expected:?} missing from:\n{message}"
            );
        }
        let everywhere = pair
            .replace("10.0.0.1:443", "0.0.0.0:443")
            .replace("[\"10.0.0.1\", ", "[");
        parse(&everywhere).expect("a gateway on every address takes the floating ones too");
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
