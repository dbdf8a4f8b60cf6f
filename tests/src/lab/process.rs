//! Programs the lab runs inside its namespaces: started with their output in a log file,
//! watched while starting, and stopped (SIGTERM, then SIGKILL) by the lab's guard.

use std::{
    ffi::OsStr,
    fs::File,
    io::{Read, Seek, SeekFrom},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use super::{
    LabError,
    netns::{command_in_netns, describe},
};

/// How often readiness and exit are checked while waiting.
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// How much of a log an error quotes.
const LOG_TAIL_BYTES: u64 = 2048;

/// A program running in one of the lab's namespaces.
#[derive(Debug)]
pub struct LabProcess {
    name: String,
    netns: String,
    child: Child,
    log: PathBuf,
}

impl LabProcess {
    /// Starts `program ARGS…` inside `netns`, its stdout and stderr appended to `log`.
    ///
    /// The child gets its own process group, so a Ctrl-C at the terminal reaches only the lab,
    /// which then stops its children in order.
    pub(crate) fn spawn(
        name: String,
        netns: &str,
        program: &Path,
        args: &[impl AsRef<OsStr>],
        log: PathBuf,
    ) -> Result<LabProcess, LabError> {
        let output =
            File::create(&log).map_err(LabError::io(format!("creating {}", log.display())))?;
        let errors = output
            .try_clone()
            .map_err(LabError::io(format!("opening {}", log.display())))?;
        let mut command = command_in_netns(netns, program)?;
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(output)
            .stderr(errors)
            .process_group(0);
        let child = command.spawn().map_err(|source| LabError::Spawn {
            command: format!("{} (in {netns})", describe(&command)),
            source,
        })?;
        Ok(LabProcess {
            name,
            netns: netns.to_owned(),
            child,
            log,
        })
    }

    /// What it is, e.g. `sim-node node0` or `lb-control`.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn netns(&self) -> &str {
        &self.netns
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The file holding its stdout and stderr.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Fails, quoting the end of its log, if it has exited; `when` completes the sentence
    /// "exited (status) …".
    pub(crate) fn check_running(&mut self, when: &'static str) -> Result<(), LabError> {
        let status = self
            .child
            .try_wait()
            .map_err(LabError::io(format!("checking on {}", self.name)))?;
        match status {
            None => Ok(()),
            Some(status) => Err(LabError::ProcessExited {
                process: self.name.clone(),
                netns: self.netns.clone(),
                status,
                when,
                log: self.log.clone(),
                log_tail: read_tail(&self.log),
            }),
        }
    }

    /// Polls `is_ready` until it says yes, failing when the process exits or `timeout` passes.
    pub(crate) fn wait_ready(
        &mut self,
        what: &str,
        timeout: Duration,
        mut is_ready: impl FnMut() -> Result<bool, LabError>,
    ) -> Result<(), LabError> {
        let deadline = Instant::now() + timeout;
        loop {
            if is_ready()? {
                return Ok(());
            }
            self.check_running("before it was ready")?;
            if Instant::now() >= deadline {
                return Err(LabError::NotReady {
                    what: format!("{} in {}: {what}", self.name, self.netns),
                    timeout,
                    detail: format!(
                        "last lines of {}:\n{}",
                        self.log.display(),
                        read_tail(&self.log)
                    ),
                });
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    pub(crate) fn signal(&self, signal: libc::c_int) {
        let Ok(pid) = libc::pid_t::try_from(self.child.id()) else {
            return;
        };
        // SAFETY: plain kill(2) on our own, not yet reaped child: its pid cannot be reused.
        unsafe { libc::kill(pid, signal) };
    }
}

/// Stops every process: SIGTERM to all, then SIGKILL to those still running after `grace`.
/// Every process is reaped. Returns one line per process that could not be stopped.
pub(crate) fn stop_all(processes: &mut [LabProcess], grace: Duration) -> Vec<String> {
    for process in processes.iter_mut() {
        if matches!(process.child.try_wait(), Ok(None)) {
            process.signal(libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + grace;
    let mut problems = Vec::new();
    for process in processes.iter_mut() {
        if let Err(error) = wait_or_kill(process, deadline) {
            problems.push(format!("{} (pid {}): {error}", process.name, process.pid()));
        }
    }
    problems
}

fn wait_or_kill(process: &mut LabProcess, deadline: Instant) -> std::io::Result<ExitStatus> {
    loop {
        if let Some(status) = process.child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            process.signal(libc::SIGKILL);
            return process.child.wait();
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// The last few lines of a log file, for error messages.
fn read_tail(log: &Path) -> String {
    let mut tail = String::new();
    let read = File::open(log).and_then(|mut file| {
        let length = file.metadata()?.len();
        file.seek(SeekFrom::Start(length.saturating_sub(LOG_TAIL_BYTES)))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        tail = String::from_utf8_lossy(&bytes).into_owned();
        Ok(())
    });
    match read {
        Ok(()) if tail.trim().is_empty() => "(empty)".to_owned(),
        Ok(()) => tail.trim_end().to_owned(),
        Err(error) => format!("(could not read it: {error})"),
    }
}
