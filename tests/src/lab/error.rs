//! Errors of the lab: each says which step or command failed and, where there is one, what to do.

use std::{io, path::PathBuf, process::ExitStatus, time::Duration};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum LabError {
    #[error(
        "the lab needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) to create network namespaces: \
         run as root or via `cargo xtask test`"
    )]
    NotRoot,
    #[error("lab config: {0}")]
    Config(String),
    #[error("could not start `{command}`: {source}")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: ExitStatus,
        stderr: String,
    },
    #[error(
        "{name} binary not found (looked at {searched}): build it with `cargo build --bins` \
         (the default members; `--workspace` would also build lb-ebpf for the host), or point \
         {env_var} at it"
    )]
    BinaryNotFound {
        name: String,
        env_var: String,
        searched: String,
    },
    #[error("entering network namespace {netns}: {source}")]
    EnterNetns {
        netns: String,
        #[source]
        source: io::Error,
    },
    #[error("{process} in {netns} exited ({status}) {when}; last lines of {log}:\n{log_tail}", log = log.display())]
    ProcessExited {
        process: String,
        netns: String,
        status: ExitStatus,
        when: &'static str,
        log: PathBuf,
        log_tail: String,
    },
    #[error("{what} not ready after {timeout:?}: {detail}")]
    NotReady {
        what: String,
        timeout: Duration,
        detail: String,
    },
    #[error("attaching the XDP_PASS program to {iface} in {netns}: {source}")]
    PassProgram {
        netns: String,
        iface: String,
        #[source]
        source: Box<lb_control::dataplane::DataplaneError>,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("node{index}: {source}")]
    NodeControl {
        index: usize,
        #[source]
        source: crate::sim_node::ControlClientError,
    },
    #[error(transparent)]
    Cert(#[from] super::certs::CertError),
    #[error("cleanup left things behind:\n  {}", .0.join("\n  "))]
    Cleanup(Vec<String>),
}

impl LabError {
    /// Wraps an I/O error with what was being done: `.map_err(LabError::io("creating x"))`.
    pub fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> LabError {
        let context = context.into();
        move |source| LabError::Io { context, source }
    }
}
