//! The configuration file (TOML) an operator writes, validated with errors that name the file,
//! the field and the reason. Every error is reported at once.

use std::{
    fmt,
    path::{Path, PathBuf},
};

use serde::Deserialize;
use thiserror::Error;

use crate::dataplane::{AttachMode, DEFAULT_BPFFS};

/// Linux limits interface names to 15 bytes (IFNAMSIZ less the NUL).
const MAX_INTERFACE_NAME: usize = 15;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Names this load balancer on the host: its maps are pinned under `<bpffs>/<instance>/`.
    #[serde(default = "default_instance")]
    pub instance: String,
    #[serde(default)]
    pub dataplane: DataplaneSection,
    #[serde(default)]
    pub log: LogSection,
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
            dataplane: DataplaneSection::default(),
            log: LogSection::default(),
        }
    }
}

impl Default for DataplaneSection {
    fn default() -> Self {
        DataplaneSection {
            interfaces: Vec::new(),
            xdp_mode: AttachMode::default(),
            bpffs: default_bpffs(),
        }
    }
}

fn default_instance() -> String {
    "lb".to_owned()
}

fn default_bpffs() -> PathBuf {
    PathBuf::from(DEFAULT_BPFFS)
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
