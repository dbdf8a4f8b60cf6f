//! Removing what crashed runs left behind: namespaces named `lbt-<pid>-<seq>-…` whose `<pid>`
//! is no longer alive (and the processes still inside them), their pinned-map directories
//! under `/sys/fs/bpf` and their log directories.

use std::{
    fmt, io,
    path::{Path, PathBuf},
};

use super::{LabError, PREFIX_STEM, netns};

/// What a sweep removed.
#[derive(Debug, Default)]
pub struct SweepReport {
    pub namespaces: Vec<String>,
    pub killed_pids: Vec<i32>,
    pub paths: Vec<PathBuf>,
}

impl SweepReport {
    pub fn is_empty(&self) -> bool {
        self.namespaces.is_empty() && self.killed_pids.is_empty() && self.paths.is_empty()
    }
}

impl fmt::Display for SweepReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return write!(f, "nothing stale");
        }
        write!(
            f,
            "removed namespaces [{}], killed pids {:?}, removed [{}]",
            self.namespaces.join(", "),
            self.killed_pids,
            self.paths
                .iter()
                .map(|path| path.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

/// Removes everything left by lab runs whose process is gone. Runs of live processes,
/// including this one, are left alone, so parallel runs and tests do not disturb each other.
pub fn sweep_stale() -> Result<SweepReport, LabError> {
    let mut report = SweepReport::default();
    let mut problems = Vec::new();
    for name in netns::list_netns()? {
        if is_stale(&name)
            && let Err(error) = remove_netns(&name, &mut report)
        {
            problems.push(error.to_string());
        }
    }
    for dir in [PathBuf::from(super::BPFFS), std::env::temp_dir()] {
        for path in stale_entries(&dir)? {
            match std::fs::remove_dir_all(&path) {
                Ok(()) => report.paths.push(path),
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(error) => problems.push(format!("removing {}: {error}", path.display())),
            }
        }
    }
    if problems.is_empty() {
        Ok(report)
    } else {
        Err(LabError::Cleanup(problems))
    }
}

fn remove_netns(name: &str, report: &mut SweepReport) -> Result<(), LabError> {
    for pid in netns::netns_pids(name)? {
        // SAFETY: plain kill(2); the pid was just listed as living in the stale namespace.
        if unsafe { libc::kill(pid, libc::SIGKILL) } == 0 {
            report.killed_pids.push(pid);
        }
    }
    match netns::delete_netns(name) {
        Ok(()) => report.namespaces.push(name.to_owned()),
        // Another process sweeping at the same moment got there first.
        Err(_) if !netns::netns_path(name).exists() => {}
        Err(error) => return Err(error),
    }
    Ok(())
}

/// Directories in `dir` named like a lab run of a dead process.
fn stale_entries(dir: &Path) -> Result<Vec<PathBuf>, LabError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(LabError::io(format!("listing {}", dir.display()))(error)),
    };
    let mut stale = Vec::new();
    for entry in entries {
        let entry = entry.map_err(LabError::io(format!("listing {}", dir.display())))?;
        if entry.file_name().to_str().is_some_and(is_stale) {
            stale.push(entry.path());
        }
    }
    Ok(stale)
}

/// Whether `name` belongs to a lab run whose process is no longer alive.
fn is_stale(name: &str) -> bool {
    owner_pid(name).is_some_and(|pid| pid != std::process::id() && !is_alive(pid))
}

/// The pid in a lab name `lbt-<pid>-<seq>` or `lbt-<pid>-<seq>-<role>`.
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX_STEM)?.strip_prefix('-')?;
    let mut parts = rest.splitn(3, '-');
    let pid = parts.next()?.parse().ok()?;
    let seq = parts.next()?;
    (!seq.is_empty() && seq.bytes().all(|byte| byte.is_ascii_digit())).then_some(pid)
}

/// Whether `pid` is a running process. A zombie counts as dead: a killed lab whose parent
/// has not reaped it yet must not keep its leftovers alive.
fn is_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name, which is in parentheses and may contain anything.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, Some("Z" | "X"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_alive_and_unused_pid_is_not() {
        assert!(is_alive(std::process::id()));
        // Above the kernel's largest possible pid (4194304).
        assert!(!is_alive(4_194_305));
    }

    #[test]
    fn owner_pid_reads_lab_names_only() {
        assert_eq!(owner_pid("lbt-1234-0-node2"), Some(1234));
        assert_eq!(owner_pid("lbt-1234-17"), Some(1234));
        assert_eq!(owner_pid("lbt-1234"), None);
        assert_eq!(owner_pid("lbt-x-0-lb"), None);
        assert_eq!(owner_pid("lbtx-1-0"), None);
        assert_eq!(owner_pid("other-1-0"), None);
    }
}
