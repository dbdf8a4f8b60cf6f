//! wrk from the client namespace: JSON-RPC POSTs to the VIP, keep-alive or with a new
//! connection per request (scripts and parsing in [`lb_tests::wrk`]).

use std::path::{Path, PathBuf};

use anyhow::Context;
use lb_tests::{
    lab::Lab,
    wrk::{self, Load, WrkResult},
};

use crate::{PORT, Settings, VIP, report::Mode};

/// The request every run sends: a JSON-RPC call a Polkadot node answers without state.
pub const REQUEST_BODY: &str = r#"{"jsonrpc":"2.0","id":1,"method":"system_health","params":[]}"#;

/// The Lua scripts, one per mode, written once per lab.
pub struct Scripts {
    keepalive: PathBuf,
    close: PathBuf,
}

impl Scripts {
    pub fn write(dir: &Path) -> anyhow::Result<Scripts> {
        let scripts = Scripts {
            keepalive: dir.join("wrk-keepalive.lua"),
            close: dir.join("wrk-close.lua"),
        };
        for (path, headers) in [
            (&scripts.keepalive, &[][..]),
            (&scripts.close, &[("Connection", "close")][..]),
        ] {
            std::fs::write(path, wrk::script(REQUEST_BODY, headers))
                .with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(scripts)
    }

    fn path(&self, mode: Mode) -> &Path {
        match mode {
            Mode::Keepalive => &self.keepalive,
            Mode::Close => &self.close,
        }
    }
}

/// Runs wrk for `seconds` against the VIP from the client namespace.
pub fn run(
    lab: &Lab,
    scripts: &Scripts,
    settings: &Settings,
    mode: Mode,
    seconds: u64,
) -> anyhow::Result<WrkResult> {
    wrk::run(
        lab,
        &Load {
            netns: &lab.client().netns,
            threads: settings.threads,
            connections: settings.connections,
            seconds,
            script: scripts.path(mode),
            url: &format!("http://{VIP}:{PORT}/"),
        },
    )
}
