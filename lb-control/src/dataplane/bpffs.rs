//! The BPF filesystem where maps are pinned: checked, and mounted when it is missing.

use std::{
    ffi::CString,
    io,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use thiserror::Error;

/// `f_type` of a mounted BPF filesystem (`BPF_FS_MAGIC` in linux/magic.h).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, Error)]
pub enum BpffsError {
    #[error(
        "{path}: no such directory, so no BPF filesystem can be mounted there; create it or \
         point --bpffs at the mount point of a BPF filesystem (usually /sys/fs/bpf)"
    )]
    MissingMountPoint { path: PathBuf },
    #[error(
        "{path} is not a BPF filesystem and mounting one there failed: {source}; mount it by \
         hand with `mount -t bpf bpf {path}`"
    )]
    Mount {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path} is not a BPF filesystem, and this process runs in a private mount namespace (as \
         under `ip netns exec`), where one mounted now would be invisible to other processes and \
         vanish with this one; use `lb-control run --netns NAME` instead of `ip netns exec`, or \
         mount it on the host first with `mount -t bpf bpf {path}`"
    )]
    PrivateMountNamespace { path: PathBuf },
    #[error("checking whether {path} is a BPF filesystem: {source}")]
    Stat {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What [`ensure_mounted`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BpffsState {
    AlreadyMounted,
    MountedNow,
}

/// Makes sure a BPF filesystem is mounted at `path`, mounting one if it is not.
pub fn ensure_mounted(path: &Path) -> Result<BpffsState, BpffsError> {
    if !path.is_dir() {
        return Err(BpffsError::MissingMountPoint {
            path: path.to_owned(),
        });
    }
    if is_bpffs(path)? {
        return Ok(BpffsState::AlreadyMounted);
    }
    if is_private_mount_namespace() {
        return Err(BpffsError::PrivateMountNamespace {
            path: path.to_owned(),
        });
    }
    mount_bpffs(path)?;
    Ok(BpffsState::MountedNow)
}

/// True when this process's mount namespace is not the host's. The host's is init's; where
/// init's cannot be read (a sandbox), the parent's stands in for it, which still catches
/// `ip netns exec`: it unshares the mount namespace and then execs in place.
fn is_private_mount_namespace() -> bool {
    let Ok(ours) = std::fs::read_link("/proc/self/ns/mnt") else {
        return false;
    };
    let parent = format!("/proc/{}/ns/mnt", std::os::unix::process::parent_id());
    let reference = std::fs::read_link("/proc/1/ns/mnt").or_else(|_| std::fs::read_link(parent));
    matches!(reference, Ok(reference) if reference != ours)
}

pub fn is_bpffs(path: &Path) -> Result<bool, BpffsError> {
    let c_path = c_path(path);
    let mut stat = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: `c_path` is a valid C string and `stat` is a valid out-pointer.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return Err(BpffsError::Stat {
            path: path.to_owned(),
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: statfs returned 0, so it filled in `stat`.
    let stat = unsafe { stat.assume_init() };
    #[allow(
        clippy::unnecessary_cast,
        reason = "f_type's width differs between libc targets"
    )]
    Ok(stat.f_type as i64 == BPF_FS_MAGIC)
}

fn mount_bpffs(path: &Path) -> Result<(), BpffsError> {
    let c_path = c_path(path);
    let bpf = c"bpf";
    // SAFETY: all pointers are valid C strings; no data argument.
    let rc = unsafe {
        libc::mount(
            bpf.as_ptr(),
            c_path.as_ptr(),
            bpf.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(BpffsError::Mount {
            path: path.to_owned(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

fn c_path(path: &Path) -> CString {
    // A path from the OS or the command line cannot hold an interior NUL on Unix.
    CString::new(path.as_os_str().as_bytes()).unwrap_or_default()
}
