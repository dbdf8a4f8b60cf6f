//! Sockets passed to the new process across `exec`, as nginx's binary upgrade and systemd's
//! socket activation pass them: the new process finds them at fixed descriptor numbers from 3
//! on, which an environment variable names. The very same sockets, not new ones on the same
//! port: a connection waiting in a listener's queue stays there for the new process.

use std::{
    io,
    os::fd::{FromRawFd, OwnedFd, RawFd},
};

/// The first descriptor number after stdin, stdout and stderr.
const FIRST_FD: RawFd = 3;

/// Makes `command`'s process start with `fds` as descriptors 3, 4, … in that order; they must
/// stay open until it is spawned.
pub(super) fn pass_fds(command: &mut tokio::process::Command, mut fds: Vec<RawFd>) {
    // SAFETY: the closure runs in the child between fork and exec, where only async-signal-safe
    // calls are allowed: it makes only fcntl and dup2 calls and allocates nothing (`fds` is
    // rewritten in place).
    unsafe {
        command.pre_exec(move || place_fds(&mut fds));
    }
}

/// Moves each of `fds` to `FIRST_FD + index`, inheritable (dup2 clears close-on-exec).
fn place_fds(fds: &mut [RawFd]) -> io::Result<()> {
    // First above the target range, so that moving one does not overwrite another still to
    // be moved (the sockets may already sit at 3, 4, …).
    let above = FIRST_FD + fds.len() as RawFd;
    for fd in fds.iter_mut() {
        // SAFETY: fcntl on a descriptor number; a bad one is an error, not undefined behaviour.
        let copy = unsafe { libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, above) };
        if copy < 0 {
            return Err(io::Error::last_os_error());
        }
        *fd = copy;
    }
    for (index, fd) in fds.iter().enumerate() {
        // SAFETY: as above.
        if unsafe { libc::dup2(*fd, FIRST_FD + index as RawFd) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The descriptor the new process finds the socket at `index` of [`pass_fds`] under.
pub(super) fn passed_fd(index: usize) -> RawFd {
    FIRST_FD + index as RawFd
}

/// Takes descriptor `fd`, passed by the process this one upgrades, as its own; it is closed
/// on exec again (the next upgrade passes it explicitly).
pub(super) fn take_fd(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: fcntl on a descriptor number; an unopened one answers EBADF.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor is open (fcntl said so) and nothing else in this process owns it:
    // it came from the process that started this one, and is taken once, at start.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
