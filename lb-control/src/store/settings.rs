//! The `[store]` section: SQLite in the state directory (the default, nothing to set), or a
//! shared etcd cluster:
//!
//! ```toml
//! [store]
//! etcd = { endpoints = ["https://10.0.0.1:2379", "https://10.0.0.2:2379"], prefix = "/lb/",
//!          ca_file = "/etc/lb/etcd-ca.pem", cert_file = "/etc/lb/etcd.pem",
//!          key_file = "/etc/lb/etcd-key.pem", user = "lb", password_file = "/etc/lb/etcd.pw" }
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::section::Problem;

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    /// Keep the state in etcd instead of the local SQLite file.
    #[serde(default)]
    pub etcd: Option<EtcdSettings>,
}

/// Where the etcd cluster is and how to authenticate to it, as etcd's own client flags have it.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EtcdSettings {
    /// Client URLs of the members, `http://` or `https://` (all the same scheme).
    pub endpoints: Vec<String>,
    /// Every key lb-control writes starts with it; lb-controls sharing a prefix share state.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// The CA that signed the members' certificates (PEM); needed with `https://`.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// A client certificate (PEM) and its key, when the members ask for one.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// etcd's own users (`etcdctl user add`); the password inline or, better, in a file.
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
}

fn default_prefix() -> String {
    "/lb-control/".to_owned()
}

impl StoreSection {
    pub fn problems(&self) -> Vec<Problem> {
        self.etcd
            .as_ref()
            .map_or_else(Vec::new, EtcdSettings::problems)
    }
}

impl EtcdSettings {
    /// Settings for these endpoints and prefix, without TLS or auth.
    pub fn plain(endpoints: Vec<String>, prefix: &str) -> EtcdSettings {
        EtcdSettings {
            endpoints,
            prefix: prefix.to_owned(),
            ca_file: None,
            cert_file: None,
            key_file: None,
            user: None,
            password: None,
            password_file: None,
        }
    }

    pub fn problems(&self) -> Vec<Problem> {
        let field = |name: &str| format!("store.etcd.{name}");
        let mut problems = Vec::new();
        if self.endpoints.is_empty() {
            problems.push(Problem::new(
                field("endpoints"),
                "no endpoint: list the client URLs of the members, e.g. \
                 [\"http://10.0.0.1:2379\"]",
            ));
        }
        for (index, endpoint) in self.endpoints.iter().enumerate() {
            if let Err(reason) = check_endpoint(endpoint) {
                problems.push(Problem::new(
                    format!("{}[{index}]", field("endpoints")),
                    reason,
                ));
            }
        }
        let tls = self.endpoints.iter().any(|e| e.starts_with("https://"));
        if tls && self.endpoints.iter().any(|e| e.starts_with("http://")) {
            problems.push(Problem::new(
                field("endpoints"),
                "mixes http:// and https://: the members of one cluster serve clients one way",
            ));
        }
        if tls && self.ca_file.is_none() {
            problems.push(Problem::new(
                field("ca_file"),
                "https:// endpoints need the CA that signed the members' certificates",
            ));
        }
        if !tls && (self.ca_file.is_some() || self.cert_file.is_some()) {
            problems.push(Problem::new(
                field("endpoints"),
                "TLS files are set but the endpoints are http://: use https://",
            ));
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            problems.push(Problem::new(
                field(if self.cert_file.is_some() {
                    "key_file"
                } else {
                    "cert_file"
                }),
                "a client certificate needs both cert_file and key_file",
            ));
        }
        if self.password.is_some() && self.password_file.is_some() {
            problems.push(Problem::new(
                field("password"),
                "set password or password_file, not both",
            ));
        }
        let has_password = self.password.is_some() || self.password_file.is_some();
        if self.user.is_some() != has_password {
            problems.push(Problem::new(
                field(if self.user.is_some() {
                    "password"
                } else {
                    "user"
                }),
                "etcd's authentication needs a user and its password (or password_file)",
            ));
        }
        if !self.prefix.starts_with('/') || self.prefix.len() < 2 {
            problems.push(Problem::new(
                field("prefix"),
                format!(
                    "\"{}\" is not a prefix: write a path like \"/lb-control/\"",
                    self.prefix
                ),
            ));
        }
        problems
    }

    /// The prefix with one trailing slash, so `/lb` and `/lb/` name the same keys and never
    /// those of `/lb2/`.
    pub fn normalized_prefix(&self) -> String {
        format!("{}/", self.prefix.trim_end_matches('/'))
    }
}

/// What the files of [`EtcdSettings`] hold, read as a start reads them.
pub struct EtcdSecrets {
    pub ca: Option<Vec<u8>>,
    /// The client certificate and its key.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    pub password: Option<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("store.etcd: cannot read {}: {source}", file.display())]
pub struct UnreadableFile {
    file: PathBuf,
    #[source]
    source: std::io::Error,
}

impl EtcdSettings {
    /// Reads the TLS files and the password file.
    pub fn read_files(&self) -> Result<EtcdSecrets, UnreadableFile> {
        let read = |file: &Path| {
            std::fs::read(file).map_err(|source| UnreadableFile {
                file: file.to_owned(),
                source,
            })
        };
        let identity = match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
            _ => None,
        };
        let password = match (&self.password, &self.password_file) {
            (Some(password), _) => Some(password.clone()),
            // A trailing newline is the editor's, not the password's.
            (None, Some(file)) => Some(
                String::from_utf8_lossy(&read(file)?)
                    .trim_end_matches(['\n', '\r'])
                    .to_owned(),
            ),
            (None, None) => None,
        };
        Ok(EtcdSecrets {
            ca: self.ca_file.as_deref().map(read).transpose()?,
            identity,
            password,
        })
    }
}

fn check_endpoint(endpoint: &str) -> Result<(), String> {
    let Some(rest) = endpoint
        .strip_prefix("http://")
        .or_else(|| endpoint.strip_prefix("https://"))
    else {
        return Err(format!(
            "\"{endpoint}\" is not a client URL: write http://HOST:PORT or https://HOST:PORT"
        ));
    };
    let authority = rest.trim_end_matches('/');
    let port = authority.rsplit_once(':').map(|(_, port)| port);
    match port.map(str::parse::<u16>) {
        Some(Ok(port)) if port != 0 && !authority.contains('/') => Ok(()),
        _ => Err(format!(
            "\"{endpoint}\" has no port: write e.g. http://10.0.0.1:2379"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(toml_text: &str) -> Vec<String> {
        let section: StoreSection = toml::from_str(toml_text).expect("parses");
        section.problems().iter().map(ToString::to_string).collect()
    }

    #[test]
    fn sqlite_needs_nothing_and_etcd_with_endpoints_is_fine() {
        assert_eq!(problems(""), Vec::<String>::new());
        assert_eq!(
            problems("etcd = { endpoints = [\"http://127.0.0.1:2379\"], prefix = \"/lb\" }"),
            Vec::<String>::new()
        );
    }

    #[test]
    fn every_bad_field_is_reported_at_once() {
        let found = problems(
            "etcd = { endpoints = [\"10.0.0.1:2379\", \"https://10.0.0.2\"], prefix = \"lb\", \
             cert_file = \"/c.pem\", user = \"lb\" }",
        );
        assert_eq!(
            found,
            [
                "store.etcd.endpoints[0]: \"10.0.0.1:2379\" is not a client URL: write \
                 http://HOST:PORT or https://HOST:PORT",
                "store.etcd.endpoints[1]: \"https://10.0.0.2\" has no port: write e.g. \
                 http://10.0.0.1:2379",
                "store.etcd.ca_file: https:// endpoints need the CA that signed the members' \
                 certificates",
                "store.etcd.key_file: a client certificate needs both cert_file and key_file",
                "store.etcd.password: etcd's authentication needs a user and its password (or \
                 password_file)",
                "store.etcd.prefix: \"lb\" is not a prefix: write a path like \"/lb-control/\"",
            ]
        );
    }

    #[test]
    fn prefix_is_normalized_to_one_trailing_slash() {
        let settings = EtcdSettings::plain(vec!["http://127.0.0.1:2379".into()], "/lb//");
        assert_eq!(settings.normalized_prefix(), "/lb/");
    }
}
