//! chopsticks as a lab node: a real Substrate runtime (`@acala-network/chopsticks`, installed in
//! tests/js by `cargo xtask setup`) for the tests that need real runtime execution, such as a
//! signed transfer, where sim-node only pretends.
//!
//! It starts offline from a raw chain spec with the runtime wasm in its genesis (shipped by
//! `@substrate/connect-known-chains`), so it never reaches for a live network. It builds a
//! block 100 ms after the last of a batch of extrinsics it is sent (its default `Batch` mode)
//! and otherwise only when asked (`dev_newBlock`), so its best block stands still between
//! transactions. Not `Instant` mode: there the block can be built before the answer to
//! `author_submitAndWatchExtrinsic` is sent, and polkadot.js then misses `InBlock` (seen here:
//! Ready → Broadcast → Finalized).

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    time::Duration,
};

use super::{
    Lab, LabError, LabProcess, PORT_PROBE_TIMEOUT, SIM_NODE_RPC_PORT, binaries::js_dir, in_netns,
    run_checked,
};
use crate::rpc_client::SYSTEM_HEALTH;

/// The chain chopsticks runs: Rococo Asset Hub, a parachain with AURA consensus, which is what
/// chopsticks can start from a chain spec; its runtime has the balances pallet.
pub const CHOPSTICKS_CHAIN: &str = "rococo_v2_2_asset_hub";
/// Measured ~4 s on an idle machine; compiling the wasm runtime is slow when tests run in
/// parallel.
const CHOPSTICKS_READY_TIMEOUT: Duration = Duration::from_secs(90);
/// How long one readiness probe waits for the answer: chopsticks runs on a busy event loop.
const PROBE_ANSWER_TIMEOUT: Duration = Duration::from_secs(1);

impl Lab {
    /// Starts chopsticks in node `index`'s namespace, serving JSON-RPC over HTTP and WebSocket
    /// on the node's address and port 9944, like sim-node (so start the lab without
    /// sim-nodes), and waits until it answers a JSON-RPC call: it listens only once its genesis
    /// and first block are built.
    pub fn start_chopsticks(&mut self, index: usize) -> Result<&LabProcess, LabError> {
        let js = js_dir();
        let program = js.join("node_modules/.bin/chopsticks");
        if !program.is_file() {
            return Err(LabError::Config(format!(
                "{} is missing: install the JavaScript test clients with `cargo xtask setup` \
                 (npm ci in {})",
                program.display(),
                js.display()
            )));
        }
        let spec = self.write_chain_spec()?;
        let node = self.node(index).clone();
        let args = [
            format!("--genesis={}", spec.display()),
            format!("--host={}", node.addr_v4),
            format!("--port={SIM_NODE_RPC_PORT}"),
        ];
        let id = format!("node{index}");
        let process = self.run.spawn_process(
            &format!("chopsticks {id}"),
            &node.netns,
            &program,
            &args,
            &format!("chopsticks-{id}"),
        )?;
        let rpc = SocketAddr::from((node.addr_v4, SIM_NODE_RPC_PORT));
        process.wait_ready(
            &format!("{rpc} to answer system_health"),
            CHOPSTICKS_READY_TIMEOUT,
            || in_netns(&node.netns, || answers_system_health(rpc)),
        )?;
        Ok(&*process)
    }

    /// Writes [`CHOPSTICKS_CHAIN`]'s chain spec into the log directory (once per lab).
    fn write_chain_spec(&self) -> Result<PathBuf, LabError> {
        let path = self.log_dir().join(format!("{CHOPSTICKS_CHAIN}.json"));
        if !path.is_file() {
            run_checked(
                std::process::Command::new("node")
                    .arg("chain-spec.mjs")
                    .arg(CHOPSTICKS_CHAIN)
                    .arg(&path)
                    .current_dir(js_dir()),
            )?;
        }
        Ok(path)
    }
}

/// Whether `rpc` answers a `system_health` POST with 200. A TCP accept is not enough: before
/// chopsticks listens for real, it opens and closes the port once to see whether it is free.
fn answers_system_health(rpc: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&rpc, PORT_PROBE_TIMEOUT) else {
        return false;
    };
    let request = format!(
        "POST / HTTP/1.1\r\nhost: {rpc}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{SYSTEM_HEALTH}",
        SYSTEM_HEALTH.len()
    );
    let mut status = [0; 12];
    stream.set_read_timeout(Some(PROBE_ANSWER_TIMEOUT)).is_ok()
        && stream.write_all(request.as_bytes()).is_ok()
        && stream.read_exact(&mut status).is_ok()
        && status == *b"HTTP/1.1 200"
}
