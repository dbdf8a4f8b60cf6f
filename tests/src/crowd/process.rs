//! The `crowd` binary as a child process in a lab namespace: started with a plan, its events
//! read line by line from its stdout as they come, its stderr kept in a log file.

use std::{
    io::{BufRead, BufReader},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::mpsc,
    time::Duration,
};

use anyhow::{Context, bail};

use super::{CrowdPlan, CrowdSummary, Event};
use crate::lab::{binary_path, command_in_netns};

/// How much of the crowd's log an error quotes.
const LOG_TAIL_BYTES: usize = 2000;

/// A running crowd.
pub struct CrowdProcess {
    child: Child,
    events: mpsc::Receiver<anyhow::Result<Event>>,
    log: PathBuf,
    plan: CrowdPlan,
}

/// The crowd in place: what [`Event::Steady`] says.
#[derive(Debug, Clone, Copy)]
pub struct Steady {
    pub connected: usize,
    pub unsettled: usize,
    pub ramp_seconds: f64,
}

/// How the crowd's threads share the CPUs with the gateway they load. On separate machines
/// the clients would not share the gateway's CPUs at all; here they must.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuShare {
    /// `SCHED_BATCH`: the crowd has its share of the CPUs, but its threads do not preempt the
    /// gateway when a notification wakes them (preempted at each of the fan-out's writes, the
    /// gateway paid a context switch per notification: a fifth of its samples in
    /// `finish_task_switch`). For tests, where the crowd must keep up whatever else runs.
    Batch,
    /// `SCHED_IDLE`: the crowd runs only on CPU time nothing else wants, so the gateway's
    /// fan-out never waits for the clients' own work; the head delay is then read from the
    /// kernel's receive stamps, not from when the crowd got around to reading. For the
    /// benchmark.
    Idle,
}

impl CrowdProcess {
    /// Starts `crowd` with `plan` inside `netns`, its stderr to `log`, its threads scheduled
    /// as `share` says.
    pub fn start(
        netns: &str,
        plan: &CrowdPlan,
        log: &Path,
        share: CpuShare,
    ) -> anyhow::Result<CrowdProcess> {
        let errors =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let mut command = command_in_netns(netns, binary_path("crowd")?)?;
        let policy = match share {
            CpuShare::Batch => libc::SCHED_BATCH,
            CpuShare::Idle => libc::SCHED_IDLE,
        };
        // SAFETY: runs in the forked child before exec and calls only sched_setscheduler,
        // which is async-signal-safe.
        unsafe {
            command.pre_exec(move || {
                let param = libc::sched_param { sched_priority: 0 };
                if libc::sched_setscheduler(0, policy, &param) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        command
            .args(plan.to_args())
            .env(super::API_KEY_ENV, &plan.key)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(errors);
        let mut child = command
            .spawn()
            .with_context(|| format!("starting crowd in {netns}"))?;
        let stdout = child.stdout.take().context("crowd's stdout")?;
        let (sender, events) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let event = line.context("reading crowd's output").and_then(|line| {
                    serde_json::from_str(&line).with_context(|| format!("crowd printed {line:?}"))
                });
                if sender.send(event).is_err() {
                    return;
                }
            }
        });
        Ok(CrowdProcess {
            child,
            events,
            log: log.to_owned(),
            plan: plan.clone(),
        })
    }

    /// The crowd's process id (its CPU time is the load generator's share of the machine).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until every client is in place (or failed).
    pub fn steady(&mut self) -> anyhow::Result<Steady> {
        // The ramp, then as long as the crowd itself waits for the last clients, and a margin.
        let patience = self.plan.ramp() + super::SETTLE_TIMEOUT + Duration::from_secs(30);
        match self.next(patience)? {
            Event::Steady {
                connected,
                unsettled,
                ramp_seconds,
            } => Ok(Steady {
                connected,
                unsettled,
                ramp_seconds,
            }),
            other => bail!("crowd: expected the steady phase, got {other:?}"),
        }
    }

    /// Waits until the hold is over (the clients are still connected).
    pub fn closing(&mut self) -> anyhow::Result<()> {
        let patience = Duration::from_secs(self.plan.hold_seconds + 30);
        match self.next(patience)? {
            Event::Closing => Ok(()),
            other => bail!("crowd: expected the end of the hold, got {other:?}"),
        }
    }

    /// Waits for the summary and for the process to exit.
    pub fn summary(mut self) -> anyhow::Result<CrowdSummary> {
        let summary = match self.next(Duration::from_secs(60))? {
            Event::Summary(summary) => *summary,
            other => bail!("crowd: expected the summary, got {other:?}"),
        };
        let status = self.child.wait().context("waiting for crowd to exit")?;
        if !status.success() {
            bail!("crowd exited with {status}: {}", self.log_tail());
        }
        Ok(summary)
    }

    fn next(&mut self, patience: Duration) -> anyhow::Result<Event> {
        match self.events.recv_timeout(patience) {
            Ok(event) => event.with_context(|| self.log_tail()),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                bail!("crowd: nothing within {patience:?}; {}", self.log_tail())
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = self.child.wait().ok();
                bail!("crowd ended ({status:?}) early; {}", self.log_tail())
            }
        }
    }

    fn log_tail(&self) -> String {
        format!(
            "crowd's log {}",
            crate::logs::tail(&self.log, LOG_TAIL_BYTES)
        )
    }
}

impl Drop for CrowdProcess {
    /// A caller that fails early leaves no crowd running.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
