//! Running the pinned JavaScript clients of tests/js (polkadot.js, polkadot-api) against a
//! sim-node from a test: install them when their node_modules is missing, run a script, read the
//! one-line JSON summary it prints last, and check what papi-check.mjs reports against the node
//! it ran against (straight or through the gateway).

use std::ffi::OsStr;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, ensure};
use serde_json::{Value, json};

use crate::lab::{command_in_netns, js_dir};
use crate::new_spec::assert_took_the_new_spec;
use crate::poll::wait_until;
use crate::sim_node::{BlockNumber, SimNodeHandle};

/// What polkadot.js 16.5.6 warns about for the `node` runtime on a real node too: its metadata
/// uses a transaction extension polkadot.js does not know.
const UNKNOWN_EXTENSION_WARNING: &str =
    "REGISTRY: Unknown signed extensions AuthorizeCall found, treating them as no-effect";
/// What polkadot.js warns about a node whose `rpc_methods` lists methods it has no decoration
/// for, as every Substrate node that serves the new JSON-RPC spec does.
const UNDECORATED_WARNING: &str = "API/INIT: RPC methods not decorated: ";
/// The method families a real node's `rpc_methods` lists and polkadot.js 16 decorates none of:
/// the new spec's, and the statement store's (`statement_dump`, listed by the `node` runtime's
/// real `rpc_methods`).
const UNDECORATED_PREFIXES: [&str; 5] = [
    "chainHead_v1_",
    "chainSpec_v1_",
    "transaction_v1_",
    "transactionWatch_v1_",
    "statement_",
];

/// How long `npm ci` may take (a fresh install downloads every package).
const NPM_TIMEOUT: Duration = Duration::from_secs(300);

/// Runs `program args` in `dir`, panicking (with what to install) when it cannot start or does
/// not finish within `timeout`.
pub async fn run(program: &str, args: &[&str], dir: &Path, timeout: Duration) -> Output {
    run_with_env(program, args, &[], dir, timeout).await
}

/// [`run`] with `env` added to the environment (e.g. `NODE_EXTRA_CA_CERTS`).
pub async fn run_with_env(
    program: &str,
    args: &[&str],
    env: &[(&str, &OsStr)],
    dir: &Path,
    timeout: Duration,
) -> Output {
    let child = tokio::process::Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .current_dir(dir)
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(timeout, child)
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} did not finish within {timeout:?}"))
        .unwrap_or_else(|error| {
            panic!("running {program} {args:?} (is Node.js 20 installed?): {error}")
        })
}

/// Installs tests/js from its lock file (`npm ci`) unless `package` (e.g. `@polkadot/api`) is
/// there already; `cargo xtask setup` does the same ahead of time.
pub async fn ensure_installed(package: &str) {
    let dir = js_dir();
    if dir
        .join("node_modules")
        .join(package)
        .join("package.json")
        .exists()
    {
        return;
    }
    let npm = run("npm", &["ci", "--no-audit", "--no-fund"], &dir, NPM_TIMEOUT).await;
    assert!(
        npm.status.success(),
        "npm ci in {}: {}",
        dir.display(),
        String::from_utf8_lossy(&npm.stderr)
    );
}

/// Starts `node FLAGS SCRIPT ARGS…` (a script in tests/js) in the lab namespace `netns`,
/// trusting the lab CA in `ca`; its output is piped, for [`summary`]. The scripts bound their
/// own run time; one that runs until told waits for its standard input to close.
pub fn spawn_in(
    netns: &str,
    ca: &Path,
    node_flags: &[&str],
    script: &str,
    args: &[&str],
) -> anyhow::Result<Child> {
    command_in_netns(netns, "node")?
        .args(node_flags)
        .arg(script)
        .args(args)
        .current_dir(js_dir())
        .env("NODE_EXTRA_CA_CERTS", ca)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running node {script} (is Node.js 20 installed?)"))
}

/// polkadot.js clients (`tests/js/follow-restarts.mjs`) in a lab namespace, as apps use the
/// endpoint: each follows new heads and calls every 500 ms, reconnecting by itself when its
/// connection is lost. The script writes its ready file once every client has heard a head and
/// appends `back` once each has heard one again after a reconnection; it prints its summary
/// (errors, calls cut off, reconnection times) when its standard input closes.
pub struct FollowingClients {
    child: Child,
    ready: PathBuf,
}

impl FollowingClients {
    const SCRIPT: &str = "follow-restarts.mjs";
    /// How long the clients may take to connect and hear their first head (Node's start
    /// included, on a busy machine).
    pub const FOLLOWING_WITHIN: Duration = Duration::from_secs(60);

    /// Starts `clients` clients on `url` (`wss://…/KEY`), trusting the lab CA in `ca`, and
    /// returns once every one has heard a head (at most [`Self::FOLLOWING_WITHIN`]); the
    /// script gives up after `max_seconds`. `ready` is the file it marks (it must not exist).
    pub fn start(
        netns: &str,
        ca: &Path,
        url: &str,
        clients: usize,
        max_seconds: u64,
        ready: PathBuf,
    ) -> anyhow::Result<FollowingClients> {
        let ready_arg = ready.to_str().context("a UTF-8 ready file path")?;
        let child = spawn_in(
            netns,
            ca,
            &[],
            Self::SCRIPT,
            &[
                url,
                &clients.to_string(),
                &max_seconds.to_string(),
                ready_arg,
            ],
        )?;
        let mut clients = FollowingClients { child, ready };
        wait_until(
            "the polkadot.js clients following heads",
            Self::FOLLOWING_WITHIN,
            || clients.following(),
        )?;
        Ok(clients)
    }

    /// Whether every client has heard a head; an error, with what the script said, when it
    /// exited before that.
    fn following(&mut self) -> anyhow::Result<bool> {
        if self.ready.exists() {
            return Ok(true);
        }
        if let Some(status) = self.child.try_wait()? {
            let mut said = String::new();
            if let Some(mut stdout) = self.child.stdout.take() {
                let _ = stdout.read_to_string(&mut said);
            }
            if let Some(mut stderr) = self.child.stderr.take() {
                let _ = stderr.read_to_string(&mut said);
            }
            anyhow::bail!(
                "the polkadot.js clients exited ({status}) before they all followed heads: {said}"
            );
        }
        Ok(false)
    }

    /// Whether every client has heard a head again since it lost its connection.
    pub fn back(&self) -> anyhow::Result<bool> {
        Ok(std::fs::read_to_string(&self.ready)?.contains("back"))
    }

    /// Stops the clients; the script's summary, failing with the error it reports.
    pub fn finish(mut self) -> anyhow::Result<Value> {
        // The script stops when its standard input closes.
        drop(self.child.stdin.take());
        let output = self
            .child
            .wait_with_output()
            .context("waiting for the polkadot.js clients")?;
        summary(Self::SCRIPT, &[], &output)
    }
}

/// The JSON summary `script` (run with `args`) printed as its last line, failing with the error
/// it reports.
pub fn summary(script: &str, args: &[&str], output: &Output) -> anyhow::Result<Value> {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let summary: Value = stdout
        .lines()
        .last()
        .and_then(|line| serde_json::from_str(line).ok())
        .with_context(|| {
            format!(
                "node {script} printed no JSON summary; stdout: {stdout}; stderr: {}",
                String::from_utf8_lossy(&output.stderr)
            )
        })?;
    ensure!(
        output.status.success() && summary.get("error").is_none(),
        "node {script} {args:?} failed: {summary}"
    );
    Ok(summary)
}

/// The JSON summary a script printed as its last line, after checking the script succeeded
/// and reported no `error`; panics with its output otherwise.
pub fn summary_of(output: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let summary: Value = stdout
        .lines()
        .last()
        .and_then(|line| serde_json::from_str(line).ok())
        .unwrap_or_else(|| {
            panic!(
                "no JSON summary; stdout: {stdout}; stderr: {}",
                String::from_utf8_lossy(&output.stderr)
            )
        });
    assert!(
        output.status.success() && summary.get("error").is_none(),
        "script failed: {summary}; stderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    summary
}

/// Whether `warning` (as polkadot.js printed it, with or without its timestamp) is one it also
/// prints against a real node serving sim-node's runtime: the unknown `AuthorizeCall` extension,
/// or the methods of `rpc_methods` it cannot decorate (the new spec's, the statement store's). Anything else is a complaint
/// about what sim-node serves.
pub fn is_expected_polkadot_js_warning(warning: &str) -> bool {
    if warning.ends_with(UNKNOWN_EXTENSION_WARNING) {
        return true;
    }
    warning
        .split_once(UNDECORATED_WARNING)
        .is_some_and(|(_, methods)| {
            methods.split(", ").all(|method| {
                UNDECORATED_PREFIXES
                    .iter()
                    .any(|prefix| method.starts_with(prefix))
            })
        })
}

/// The new JSON-RPC spec's calls papi-check.mjs makes polkadot-api send: the chain spec, the
/// follow subscription, the metadata (a runtime call) and the storage read.
pub const PAPI_NEW_SPEC_CALLS: [&str; 6] = [
    "rpc_methods",
    "chainSpec_v1_chainName",
    "chainSpec_v1_genesisHash",
    "chainHead_v1_follow",
    "chainHead_v1_call",
    "chainHead_v1_storage",
];

fn papi_block_number(block: &Value) -> BlockNumber {
    block["number"]
        .as_u64()
        .and_then(|number| BlockNumber::try_from(number).ok())
        .unwrap_or_else(|| panic!("no block number in {block}"))
}

/// The block papi reported is `node`'s block of that number, with its parent.
fn assert_is_node_block(node: &SimNodeHandle, block: &Value) {
    let number = papi_block_number(block);
    assert_eq!(block["hash"], json!(node.block_hash(number)), "{block}");
    assert_eq!(
        block["parent"],
        json!(node.block_hash(number - 1)),
        "{block}"
    );
}

/// Checks what papi-check.mjs reported as a user would, against the sim-node `node` it read
/// (straight or through the gateway): the chain spec, the runtime version from the decoded
/// metadata, the finalized block and `System.Number` read at it, three best blocks of the node
/// moving forward, and no complaint from papi.
pub fn assert_papi_summary_matches_node(node: &SimNodeHandle, summary: &Value) {
    assert_eq!(summary["chainName"], "Development", "{summary}");
    assert_eq!(
        summary["genesisHash"],
        json!(node.block_hash(0)),
        "{summary}"
    );
    assert_eq!(summary["properties"]["ss58Format"], 42, "{summary}");
    assert_eq!(summary["specName"], "node", "metadata decoded: {summary}");
    assert_eq!(summary["specVersion"], 268, "{summary}");

    let finalized = &summary["finalized"];
    assert_is_node_block(node, finalized);
    assert_eq!(
        summary["systemNumber"],
        json!(papi_block_number(finalized)),
        "System.Number read at the finalized block: {summary}"
    );

    let best: Vec<&Value> = summary["bestBlocks"]
        .as_array()
        .expect("best blocks")
        .iter()
        .collect();
    assert_eq!(best.len(), 3, "{summary}");
    for block in &best {
        assert_is_node_block(node, block);
    }
    assert!(
        best.windows(2)
            .all(|pair| papi_block_number(pair[0]) < papi_block_number(pair[1])),
        "best blocks move forward: {summary}"
    );
    assert!(
        papi_block_number(best[0]) >= papi_block_number(finalized),
        "best is not below finalized: {summary}"
    );
    assert_eq!(summary["warnings"], json!([]), "papi complained: {summary}");
}

/// papi took the new API at `node`: each of [`PAPI_NEW_SPEC_CALLS`] reached it, and no legacy
/// read.
pub fn assert_papi_took_the_new_spec(node: &SimNodeHandle) {
    assert_took_the_new_spec(node, &PAPI_NEW_SPEC_CALLS);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_real_node_warnings_are_expected() {
        assert!(is_expected_polkadot_js_warning(
            "2026-12-07 03:04:09        REGISTRY: Unknown signed extensions AuthorizeCall found, treating them as no-effect"
        ));
        assert!(is_expected_polkadot_js_warning(
            "API/INIT: RPC methods not decorated: chainHead_v1_body, chainSpec_v1_chainName, transactionWatch_v1_unwatch, transaction_v1_stop"
        ));
        assert!(is_expected_polkadot_js_warning(
            "API/INIT: RPC methods not decorated: chainHead_v1_body, statement_dump"
        ));
        assert!(!is_expected_polkadot_js_warning(
            "API/INIT: RPC methods not decorated: chainHead_v1_body, sim_secret"
        ));
        assert!(!is_expected_polkadot_js_warning(
            "REGISTRY: Unable to decode storage"
        ));
    }
}
