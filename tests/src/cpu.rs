//! The whole machine's CPU time from `/proc/stat`: busy and idle time between two samples.
//!
//! Client, balancer and nodes share the machine's cores, so the busy time of the whole machine
//! divided by the requests served is the CPU a request costs end to end; the balancer's share
//! is the difference between balancers.

use anyhow::{Context, bail};

const PROC_STAT: &str = "/proc/stat";

/// Cumulative jiffies of the aggregate `cpu` line.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    busy: u64,
    idle: u64,
}

/// CPU time between two samples.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    /// Busy CPU-seconds summed over all cores (user, nice, system, irq, softirq, steal).
    pub busy_seconds: f64,
    /// Busy share of all cores' time, 0 to 1.
    pub busy_fraction: f64,
}

impl Usage {
    /// Busy CPU time per request, in microseconds.
    pub fn micros_per(&self, requests: u64) -> f64 {
        self.busy_seconds * 1e6 / requests.max(1) as f64
    }
}

pub fn sample() -> anyhow::Result<Sample> {
    let text =
        std::fs::read_to_string(PROC_STAT).with_context(|| format!("reading {PROC_STAT}"))?;
    parse(&text)
}

fn parse(text: &str) -> anyhow::Result<Sample> {
    let Some(line) = text.lines().find(|line| line.starts_with("cpu ")) else {
        bail!("{PROC_STAT} has no aggregate `cpu` line");
    };
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing {PROC_STAT}'s `cpu` line {line:?}"))?;
    // user nice system idle iowait irq softirq steal [guest guest_nice: already in user/nice]
    if fields.len() < 8 {
        bail!(
            "{PROC_STAT}'s `cpu` line has {} fields, expected at least 8",
            fields.len()
        );
    }
    Ok(Sample {
        busy: fields[0] + fields[1] + fields[2] + fields[5] + fields[6] + fields[7],
        idle: fields[3] + fields[4],
    })
}

impl Sample {
    pub fn since(&self, earlier: &Sample) -> Usage {
        let busy = self.busy.saturating_sub(earlier.busy);
        let idle = self.idle.saturating_sub(earlier.idle);
        let total = busy + idle;
        Usage {
            busy_seconds: busy as f64 / ticks_per_second(),
            busy_fraction: if total == 0 {
                0.0
            } else {
                busy as f64 / total as f64
            },
        }
    }
}

pub(crate) fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_excludes_idle_and_iowait_and_guest() {
        let sample = parse("cpu  10 1 5 100 7 2 3 4 9 9\ncpu0 1 1 1 1 1 1 1 1 0 0\n").unwrap();
        assert_eq!(sample.busy, 10 + 1 + 5 + 2 + 3 + 4);
        assert_eq!(sample.idle, 107);
    }
}
