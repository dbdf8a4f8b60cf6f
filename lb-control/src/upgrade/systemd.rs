//! systemd's readiness protocol (`Type=notify`): the daemon says when it serves, and a process
//! that took over after an upgrade says that it is the service's main process now, so systemd
//! follows it rather than ending the service when the old process exits
//! (`NotifyAccess=all` lets it speak).

use std::os::{
    linux::net::SocketAddrExt,
    unix::net::{SocketAddr, UnixDatagram},
};

use tracing::warn;

/// Tells systemd that this process serves and is the service's main process; nothing without
/// systemd (no `NOTIFY_SOCKET`).
pub fn notify_ready() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let state = format!("MAINPID={}\nREADY=1", std::process::id());
    if let Err(error) = send(&path.to_string_lossy(), &state) {
        warn!(
            "could not tell systemd that lb-control is ready ({}): {error}",
            path.to_string_lossy()
        );
    }
}

fn send(path: &str, state: &str) -> std::io::Result<()> {
    // A leading '@' names an abstract socket.
    let address = match path.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name)?,
        None => SocketAddr::from_pathname(path)?,
    };
    UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &address)?;
    Ok(())
}
