//! What the benchmark binaries share: their `main`, Ctrl-C handling that lets the lab's guard
//! remove everything, the machine's load, medians, and the report file.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

/// Set by SIGINT/SIGTERM; benchmarks check it between steps and return, so the lab is torn
/// down on the way out instead of the process dying with it in place.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_signal: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// A benchmark binary's `main`: warnings (or `RUST_LOG`) to stderr, then `run`; an error is
/// printed as `NAME: error: …` and the exit status says it failed.
pub fn main(name: &str, run: impl FnOnce() -> anyhow::Result<()>) -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{name}: error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// From now on SIGINT and SIGTERM only set the flag [`interrupted`] reads. Programs the lab
/// runs have process groups of their own, so a Ctrl-C at the terminal reaches them only
/// through the lab's teardown; programs started in ours (e.g. wrk) stop at once.
pub fn install_interrupt_handler() {
    let handler = on_interrupt as extern "C" fn(libc::c_int) as libc::sighandler_t;
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(signal, handler) };
    }
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Fails once interrupted, so `?` unwinds to the lab's guard.
pub fn check_interrupted() -> anyhow::Result<()> {
    if interrupted() {
        bail!("interrupted; the lab is being removed");
    }
    Ok(())
}

/// Raises this process's open-file limit to at least `at_least` (the soft limit, and the hard
/// one when it is lower: root with CAP_SYS_RESOURCE may), for tools that hold thousands of
/// connections; the programs it starts inherit it. Returns the new soft limit.
pub fn raise_open_files_limit(at_least: u64) -> anyhow::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error()).context("reading the open-file limit");
    }
    if limit.rlim_cur >= at_least {
        return Ok(limit.rlim_cur);
    }
    limit.rlim_cur = at_least;
    limit.rlim_max = limit.rlim_max.max(at_least);
    // SAFETY: setrlimit reads the struct it is given.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| {
            format!(
                "raising the open-file limit to {at_least} (as root, or under a hard limit that \
                 high: `ulimit -Hn`)"
            )
        });
    }
    Ok(at_least)
}

/// The 1-minute load average, or NaN when /proc/loadavg cannot be read.
pub fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// The machine a report describes: its kernel release and CPU count.
pub fn machine() -> (String, usize) {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|text| text.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned());
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    (kernel, cpus)
}

/// Where `name` is on PATH (or in /usr/sbin, /sbin, where nginx and HAProxy live but root's
/// PATH may not look).
pub fn find_command(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Runs `command` (`name` in messages) to its end and returns what it printed; kills it when
/// it runs past `limit`.
pub fn output_within(command: &mut Command, name: &str, limit: Duration) -> anyhow::Result<Output> {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    let deadline = Instant::now() + limit;
    while child
        .try_wait()
        .with_context(|| format!("waiting for {name}"))?
        .is_none()
    {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{name} ran past {limit:?} and was killed");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child
        .wait_with_output()
        .with_context(|| format!("reading {name}'s output"))
}

/// Writes the markdown report to `path` (creating its directory) and to standard output, and
/// tells on standard error where it went, as benchmark `tool` (e.g. `bench-ha`).
pub fn publish_report(tool: &str, path: &Path, markdown: &str) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, markdown).with_context(|| format!("writing {}", path.display()))?;
    println!("{markdown}");
    eprintln!("{tool}: report written to {}", path.display());
    Ok(())
}

/// The middle value (the mean of the two middle ones for an even count); NaN for none.
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    match values.len() {
        0 => f64::NAN,
        len if len % 2 == 1 => values[middle],
        _ => (values[middle - 1] + values[middle]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(Vec::new()).is_nan());
    }
}
