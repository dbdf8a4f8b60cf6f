//! Finding the workspace's binaries (sim-node, lb-control) and the JavaScript tools (tests/js)
//! that the lab runs.

use std::path::PathBuf;

use super::LabError;

/// Path of the workspace binary `name` (e.g. `sim-node`, `lb-control`).
///
/// Looks at the environment variable named after it (`SIM_NODE_BIN`, `LB_CONTROL_BIN`) first,
/// then next to the running executable and in its parent directory: binaries live in
/// `target/<profile>/`, integration tests run from `target/<profile>/deps/`.
pub fn binary_path(name: &str) -> Result<PathBuf, LabError> {
    let env_var = format!("{}_BIN", name.to_uppercase().replace('-', "_"));
    if let Some(path) = std::env::var_os(&env_var) {
        let path = PathBuf::from(path);
        if path.is_file() {
            return Ok(path);
        }
        return Err(LabError::BinaryNotFound {
            name: name.to_owned(),
            searched: format!("{} (from {env_var})", path.display()),
            env_var,
        });
    }
    let executable = std::env::current_exe().map_err(LabError::io(
        "finding the running executable, to look for binaries beside it",
    ))?;
    let candidates: Vec<PathBuf> = executable
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join(name))
        .collect();
    candidates
        .iter()
        .find(|path| path.is_file())
        .cloned()
        .ok_or_else(|| LabError::BinaryNotFound {
            name: name.to_owned(),
            searched: candidates
                .iter()
                .map(|path| path.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            env_var,
        })
}

/// tests/js: the pinned JavaScript clients and tools (polkadot.js, chopsticks) and the scripts
/// that drive them; `cargo xtask setup` installs their node_modules.
pub fn js_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("js")
}
