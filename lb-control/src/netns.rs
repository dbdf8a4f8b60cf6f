//! Entering a named network namespace (`ip netns` style, `/run/netns/<name>`).
//!
//! `ip netns exec` also gives the process a private mount namespace with a fresh /sys, where a
//! BPF filesystem mounted by lb-control would be invisible to everyone else. Entering only the
//! network namespace keeps the host's /sys/fs/bpf, so pinned maps stay visible.

use std::{fs::File, io, os::fd::AsRawFd, path::PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum NetnsError {
    #[error("network namespace {name}: opening {path}: {source}; `ip netns list` shows the names")]
    Open {
        name: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("entering network namespace {name}: {source}")]
    Enter {
        name: String,
        #[source]
        source: io::Error,
    },
}

/// Moves the calling thread into the named network namespace. Call it before starting other
/// threads: threads spawned afterwards inherit it, earlier ones do not.
pub fn enter(name: &str) -> Result<(), NetnsError> {
    let path = PathBuf::from("/run/netns").join(name);
    let file = File::open(&path).map_err(|source| NetnsError::Open {
        name: name.to_owned(),
        path: path.clone(),
        source,
    })?;
    // SAFETY: `file` is an open namespace fd for the duration of the call.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(NetnsError::Enter {
            name: name.to_owned(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}
