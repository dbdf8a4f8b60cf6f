//! Network namespaces: create and delete them, run commands and closures inside them.
//!
//! Programs are started in a namespace by `setns(2)` between fork and exec rather than through
//! `ip netns exec`: that keeps the caller's mount namespace, so the BPF filesystem at
//! `/sys/fs/bpf` (where lb-control pins its maps) is the host's, and the child's pid is the
//! program's own pid, which is what cleanup signals.

use std::{
    ffi::{CString, OsStr},
    fs::File,
    io,
    os::{fd::AsRawFd, unix::ffi::OsStrExt, unix::process::CommandExt},
    path::PathBuf,
    process::{Command, Output},
};

use super::LabError;

/// Where `ip netns add` keeps the handle of a named namespace.
const NETNS_RUN_DIR: &str = "/run/netns";

pub(crate) fn netns_path(netns: &str) -> PathBuf {
    PathBuf::from(NETNS_RUN_DIR).join(netns)
}

/// Names of all namespaces made by `ip netns add`.
pub(crate) fn list_netns() -> Result<Vec<String>, LabError> {
    let entries = match std::fs::read_dir(NETNS_RUN_DIR) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(LabError::io(format!("listing {NETNS_RUN_DIR}"))(error)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(LabError::io(format!("listing {NETNS_RUN_DIR}")))?;
        if let Some(name) = entry.file_name().to_str() {
            names.push(name.to_owned());
        }
    }
    Ok(names)
}

pub(crate) fn add_netns(netns: &str) -> Result<(), LabError> {
    run_ip(&["netns", "add", netns])
}

pub(crate) fn delete_netns(netns: &str) -> Result<(), LabError> {
    run_ip(&["netns", "del", netns])
}

/// Pids of the processes whose network namespace is `netns`.
pub(crate) fn netns_pids(netns: &str) -> Result<Vec<i32>, LabError> {
    let output = run_checked(Command::new("ip").args(["netns", "pids", netns]))?;
    Ok(String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .filter_map(|pid| pid.parse().ok())
        .collect())
}

/// Runs `ip ARGS…` and fails with its stderr when it fails.
pub(crate) fn run_ip(args: &[&str]) -> Result<(), LabError> {
    run_checked(Command::new("ip").args(args)).map(drop)
}

/// Runs a command to completion; a non-zero exit becomes an error carrying its stderr.
pub fn run_checked(command: &mut Command) -> Result<Output, LabError> {
    let output = command.output().map_err(|source| LabError::Spawn {
        command: describe(command),
        source,
    })?;
    if !output.status.success() {
        return Err(LabError::Command {
            command: describe(command),
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(output)
}

/// The command line as a user would type it, for error messages.
pub(crate) fn describe(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}

/// A [`Command`] for `program` that runs inside network namespace `netns` (and otherwise in
/// the caller's namespaces), like `ip netns exec NETNS PROGRAM` but keeping `/sys/fs/bpf`.
pub fn command_in_netns(netns: &str, program: impl AsRef<OsStr>) -> Result<Command, LabError> {
    let path = CString::new(netns_path(netns).as_os_str().as_bytes()).map_err(|_| {
        LabError::Config(format!(
            "network namespace name {netns:?} contains a NUL byte"
        ))
    })?;
    let mut command = Command::new(program);
    // SAFETY: the hook runs in the forked child before exec and calls only open, setns and
    // close, which are async-signal-safe; `path` is owned by the closure.
    unsafe {
        command.pre_exec(move || enter_netns_at(&path));
    }
    Ok(command)
}

/// Switches the calling thread into the namespace at `path`, using only raw system calls.
fn enter_netns_at(path: &CString) -> io::Result<()> {
    // SAFETY: `path` is a valid C string.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is an open namespace file descriptor owned by this function.
    let result = unsafe { libc::setns(fd, libc::CLONE_NEWNET) };
    let error = io::Error::last_os_error();
    // SAFETY: `fd` was opened above and is closed exactly once.
    unsafe { libc::close(fd) };
    if result != 0 {
        return Err(error);
    }
    Ok(())
}

/// Sets each `(name, value)` of `settings` in `netns`, the name under `/proc/sys/net`
/// (`ipv4/ip_forward`).
pub(crate) fn write_sysctls(netns: &str, settings: &[(&str, &str)]) -> Result<(), LabError> {
    in_netns(netns, || {
        // /proc/sys/net shows the namespace of the thread that opens it.
        for (name, value) in settings {
            let path = format!("/proc/sys/net/{name}");
            std::fs::write(&path, value)
                .map_err(LabError::io(format!("setting {path} = {value} in {netns}")))?;
        }
        Ok(())
    })?
}

/// Runs `body` on a new thread inside network namespace `netns` and returns its result.
///
/// Sockets made inside `body` stay in that namespace after it returns, so a test can create
/// a `TcpListener` in a node's namespace or connect a `TcpStream` from the client's, then use
/// it from any thread. A panic in `body` is resumed on the caller's thread.
pub fn in_netns<T: Send>(netns: &str, body: impl FnOnce() -> T + Send) -> Result<T, LabError> {
    let path = netns_path(netns);
    let handle = File::open(&path).map_err(|source| LabError::EnterNetns {
        netns: netns.to_owned(),
        source,
    })?;
    std::thread::scope(|scope| {
        let thread = scope.spawn(move || {
            // SAFETY: `handle` is an open namespace file; setns affects only this thread.
            if unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(LabError::EnterNetns {
                    netns: netns.to_owned(),
                    source: io::Error::last_os_error(),
                });
            }
            Ok(body())
        });
        match thread.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}
