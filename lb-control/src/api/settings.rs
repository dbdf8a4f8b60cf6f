//! The `[admin]` section of the configuration: where the admin API listens and the bearer token
//! it wants, which the daemon and the CLI resolve the same way.

use std::{
    fs,
    io::Write,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use anyhow::Context;
use serde::Deserialize;
use tracing::info;

use crate::section::Problem;

/// Admin tokens shorter than this are guessable.
pub const MIN_TOKEN_LEN: usize = 16;

/// Environment variable that carries the admin token (wins over the config file).
pub const ADMIN_TOKEN_ENV: &str = "LB_ADMIN_TOKEN";

/// The admin API's default address: loopback only.
pub const DEFAULT_ADMIN_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9900);

/// `[admin]` in the config file: the admin REST API.
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

impl Default for AdminSection {
    fn default() -> Self {
        AdminSection {
            listen: DEFAULT_ADMIN_LISTEN,
            token: None,
            token_file: None,
        }
    }
}

impl AdminSection {
    /// Every invalid field of the section.
    pub fn problems(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        if self.token.is_some() && self.token_file.is_some() {
            problems.push(Problem::new(
                "admin.token_file",
                "give the token inline or in a file, not both",
            ));
        }
        if self
            .token
            .as_deref()
            .is_some_and(|token| token.len() < MIN_TOKEN_LEN)
        {
            problems.push(Problem::new(
                "admin.token",
                format!("too short: use at least {MIN_TOKEN_LEN} characters"),
            ));
        }
        problems
    }

    /// The admin token as configured: `LB_ADMIN_TOKEN`, else the config's token or token file,
    /// else the one generated into the state directory at an earlier start; None when there is
    /// none yet. The daemon and the CLI resolve it the same way.
    pub fn configured_token(&self, state_dir: &Path) -> anyhow::Result<Option<String>> {
        if let Ok(token) = std::env::var(ADMIN_TOKEN_ENV)
            && !token.is_empty()
        {
            return Ok(Some(token));
        }
        if let Some(token) = &self.token {
            return Ok(Some(token.clone()));
        }
        if let Some(file) = &self.token_file {
            return read_token(file).map(Some);
        }
        let file = generated_token_path(state_dir);
        if file.exists() {
            return read_token(&file).map(Some);
        }
        Ok(None)
    }

    /// The configured admin token, or a new one generated into the state directory.
    pub fn token(&self, state_dir: &Path) -> anyhow::Result<String> {
        if let Some(token) = self.configured_token(state_dir)? {
            return Ok(token);
        }
        let file = generated_token_path(state_dir);
        let token: String = rand::random::<[u8; 24]>()
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect();
        let mut out = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&file)
            .with_context(|| format!("writing the admin token to {}", file.display()))?;
        writeln!(out, "{token}")?;
        out.sync_all()?;
        info!(file = %file.display(), "generated an admin API token");
        Ok(token)
    }
}

/// Where a generated admin token is kept.
pub fn generated_token_path(state_dir: &Path) -> PathBuf {
    state_dir.join("admin.token")
}

/// A token file's first line.
pub fn read_token(file: &Path) -> anyhow::Result<String> {
    let text =
        fs::read_to_string(file).with_context(|| format!("admin token file {}", file.display()))?;
    let token = text.lines().next().unwrap_or_default().trim().to_owned();
    anyhow::ensure!(
        token.len() >= MIN_TOKEN_LEN,
        "admin token file {}: the token must be at least {} characters",
        file.display(),
        MIN_TOKEN_LEN
    );
    Ok(token)
}

fn default_admin_listen() -> SocketAddr {
    DEFAULT_ADMIN_LISTEN
}
