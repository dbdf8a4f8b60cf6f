//! wrk from a lab namespace: a Lua script that sends one request body and prints wrk's summary
//! in a form [`run`] parses, and what one run measured. The lab benchmarks drive every load
//! that wrk can make through here.

use std::{collections::BTreeMap, fmt, path::Path, process::Stdio, time::Duration};

use anyhow::{Context, bail};

use crate::{bench::output_within, lab::Lab};

/// wrk's own per-request timeout; a request slower than this counts as a timeout error.
pub const REQUEST_TIMEOUT: &str = "2s";
/// How long past its duration wrk may take before it is killed.
const OVERRUN: Duration = Duration::from_secs(30);
/// The line the Lua hook prints.
const RESULT_TAG: &str = "wrk-result";

/// A wrk script that POSTs `body` as JSON with `headers` on every request, and whose `done`
/// hook prints the summary [`run`] parses. `body` must not contain `'` (it is a Lua string).
pub fn script(body: &str, headers: &[(&str, &str)]) -> String {
    format!(
        "{}{}{}",
        post_body(body),
        header_lines(headers),
        summary_hook()
    )
}

/// A wrk script like [`script`] whose every request carries a different made-up API key in
/// its path: well-formed (`lbk_` and 64 lowercase hex digits, so the gateway must look it up)
/// and unique across wrk's threads. What a flood of guessed keys looks like.
pub fn made_up_keys_script(body: &str) -> String {
    format!(
        r#"{}
local threads = 0
setup = function(thread)
  threads = threads + 1
  thread:set("thread_id", threads)
end
local sent = 0
request = function()
  sent = sent + 1
  return wrk.format(nil, string.format("/lbk_%048x%08x%08x", 0, thread_id, sent))
end
{}"#,
        post_body(body),
        summary_hook()
    )
}

/// The lines of a script that add `headers` to every request.
fn header_lines(headers: &[(&str, &str)]) -> String {
    headers
        .iter()
        .map(|(name, value)| format!("wrk.headers[\"{name}\"] = \"{value}\"\n"))
        .collect()
}

/// The lines of a script that make every request a JSON POST of `body`.
fn post_body(body: &str) -> String {
    format!(
        "wrk.method = \"POST\"\nwrk.body = '{body}'\nwrk.headers[\"Content-Type\"] = \"application/json\"\n"
    )
}

/// The `done` hook that prints the summary line [`parse`] reads.
fn summary_hook() -> String {
    format!(
        r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "{RESULT_TAG} requests=%.0f duration_us=%.0f connect=%.0f read=%.0f write=%.0f status=%.0f timeout=%.0f p50_us=%.0f p99_us=%.0f max_us=%.0f\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"#
    )
}

/// One wrk run: `wrk -t<threads> -c<connections> -d<seconds>s -s <script> <url>` from `netns`.
#[derive(Debug, Clone, Copy)]
pub struct Load<'a> {
    pub netns: &'a str,
    pub threads: usize,
    pub connections: usize,
    pub seconds: u64,
    pub script: &'a Path,
    pub url: &'a str,
}

/// What one wrk run measured.
#[derive(Debug, Clone, Default)]
pub struct WrkResult {
    pub requests: u64,
    pub duration: Duration,
    pub errors_connect: u64,
    pub errors_read: u64,
    pub errors_write: u64,
    /// Responses other than 2xx/3xx.
    pub errors_status: u64,
    pub errors_timeout: u64,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl WrkResult {
    pub fn requests_per_second(&self) -> f64 {
        self.requests as f64 / self.duration.as_secs_f64().max(f64::MIN_POSITIVE)
    }

    pub fn errors(&self) -> u64 {
        self.errors_connect
            + self.errors_read
            + self.errors_write
            + self.errors_status
            + self.errors_timeout
    }

    pub fn errors_line(&self) -> String {
        format!(
            "errors: connect {}, read {}, write {}, status {}, timeout {}",
            self.errors_connect,
            self.errors_read,
            self.errors_write,
            self.errors_status,
            self.errors_timeout
        )
    }
}

impl fmt::Display for WrkResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:.0} req/s, p50 {:.3} ms, p99 {:.3} ms, {} errors",
            self.requests_per_second(),
            self.p50.as_secs_f64() * 1e3,
            self.p99.as_secs_f64() * 1e3,
            self.errors()
        )
    }
}

/// Runs wrk as `load` says and parses its summary; kills it when it overruns.
pub fn run(lab: &Lab, load: &Load<'_>) -> anyhow::Result<WrkResult> {
    let mut command = lab.exec(load.netns, "wrk")?;
    command
        .arg(format!("-t{}", load.threads))
        .arg(format!("-c{}", load.connections))
        .arg(format!("-d{}s", load.seconds))
        .args(["--timeout", REQUEST_TIMEOUT, "-s"])
        .arg(load.script)
        .arg(load.url)
        .stdin(Stdio::null());
    let output = output_within(
        &mut command,
        "wrk",
        Duration::from_secs(load.seconds) + OVERRUN,
    )?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "wrk failed ({}): {}{}",
            output.status,
            stdout.trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    parse(&stdout).with_context(|| format!("wrk's output:\n{stdout}"))
}

fn parse(stdout: &str) -> anyhow::Result<WrkResult> {
    let line = stdout
        .lines()
        .find_map(|line| line.strip_prefix(RESULT_TAG))
        .with_context(|| format!("no `{RESULT_TAG}` line (the Lua done hook did not run)"))?;
    let mut result = WrkResult::default();
    for field in line.split_whitespace() {
        let (key, value) = field
            .split_once('=')
            .with_context(|| format!("field {field:?} is not key=value"))?;
        let value: u64 = value
            .parse()
            .with_context(|| format!("field {key} = {value:?} is not a count"))?;
        match key {
            "requests" => result.requests = value,
            "duration_us" => result.duration = Duration::from_micros(value),
            "connect" => result.errors_connect = value,
            "read" => result.errors_read = value,
            "write" => result.errors_write = value,
            "status" => result.errors_status = value,
            "timeout" => result.errors_timeout = value,
            "p50_us" => result.p50 = Duration::from_micros(value),
            "p99_us" => result.p99 = Duration::from_micros(value),
            "max_us" => result.max = Duration::from_micros(value),
            _ => {}
        }
    }
    if result.duration.is_zero() {
        bail!("wrk reported a zero duration");
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_done_hook_line() {
        let result = parse(
            "Running 1s test\nwrk-result requests=1000 duration_us=2000000 connect=1 read=2 \
             write=0 status=0 timeout=3 p50_us=250 p99_us=1200 max_us=9000\n",
        )
        .unwrap();
        assert_eq!(result.requests, 1000);
        assert_eq!(result.requests_per_second(), 500.0);
        assert_eq!(result.errors(), 6);
        assert_eq!(result.p99, Duration::from_micros(1200));
    }

    /// A timeline with answers in the given 10 ms steps.
    fn timeline(steps: &[u64]) -> Timeline {
        Timeline {
            answered: steps.iter().map(|&step| (step, 1)).collect(),
        }
    }

    #[test]
    fn the_longest_pause_after_the_event_is_found() {
        let ms = Duration::from_millis;
        // Answers every step, a 3-step pause from 1002, another of 40 steps from 1010.
        let steps: Vec<u64> = (990..1002).chain(1005..1010).chain(1050..1100).collect();
        let event = ms(10_000);
        assert_eq!(
            timeline(&steps).longest_pause(event, Duration::from_secs(1)),
            Some(Pause {
                began: ms(100),
                ended: ms(500)
            })
        );
        // Nothing after the pause: no answer again within the window.
        let steps: Vec<u64> = (990..1005).collect();
        assert_eq!(
            timeline(&steps).longest_pause(event, Duration::from_secs(1)),
            None
        );
        // No pause at all: nothing, at the first step from the event on.
        let steps: Vec<u64> = (990..1200).collect();
        assert_eq!(
            timeline(&steps).longest_pause(event + ms(4), Duration::from_secs(1)),
            Some(Pause {
                began: Duration::ZERO,
                ended: Duration::ZERO
            })
        );
    }

    #[test]
    fn timeline_line_parses() {
        let reads = CountedReads::from_output(
            "rpc answered=3 failed=0 connect=0 read=0 write=0 timeout=0 max_latency_ms=1.0 \
             first_failure=\ntimeline answered=100:2,103:1\n",
        )
        .unwrap();
        assert_eq!(reads.first_failure(), None);
        let timeline = reads.timeline().unwrap();
        assert_eq!(timeline.answered.get(&100), Some(&2));
        assert_eq!(timeline.answered.get(&103), Some(&1));
        assert!(
            CountedReads::from_output("rpc answered=0\n")
                .unwrap()
                .timeline()
                .is_err()
        );
    }

    #[test]
    fn paced_script_waits_between_requests_and_counts_answers_per_step() {
        let text = paced_timeline_script(r#"{"id":1}"#, &[], Duration::from_millis(20));
        assert!(text.contains("function delay() return 20 end"));
        assert!(text.contains("answered_at[at]"));
        assert!(text.contains("timeline answered="));
        assert!(!counting_script(r#"{"id":1}"#, &[]).contains("delay"));
    }

    #[test]
    fn script_sets_body_and_extra_headers() {
        let text = script(r#"{"id":1}"#, &[("Connection", "close")]);
        assert!(text.contains(r#"wrk.body = '{"id":1}'"#));
        assert!(text.contains("wrk.headers[\"Connection\"] = \"close\"\n"));
    }
}

/// A wrk script that POSTs `body` with `headers` and tells apart, per response, a JSON-RPC
/// result from anything else (an HTTP error, a JSON-RPC error: the gateway answers a failed
/// call with HTTP 200 and an error object, which wrk alone would count as a success). It prints
/// one line, `rpc answered=… failed=… connect=… read=… write=… timeout=… max_latency_ms=…
/// first_failure=…`, that [`CountedReads`] reads. `("Connection", "close")` makes each request
/// a connection of its own (a new flow through the kernel path).
pub fn counting_script(body: &str, headers: &[(&str, &str)]) -> String {
    counting_lua(body, headers, None)
}

/// [`counting_script`] at a steady, light load that also tells when answers came: each
/// connection waits `pace` after an answer before its next request, and a second line,
/// `timeline answered=STEP:COUNT,…`, gives the answers per [`TIMELINE_STEP`] of
/// `CLOCK_MONOTONIC` (LuaJIT's FFI reads it), which [`CountedReads::timeline`] reads and
/// [`monotonic_now`] compares with.
pub fn paced_timeline_script(body: &str, headers: &[(&str, &str)], pace: Duration) -> String {
    counting_lua(body, headers, Some(pace))
}

/// The steps of a [`paced_timeline_script`]'s timeline.
pub const TIMELINE_STEP: Duration = Duration::from_millis(10);

/// The Lua of [`counting_script`], paced and with a timeline when `pace` is given.
fn counting_lua(body: &str, headers: &[(&str, &str)], pace: Option<Duration>) -> String {
    let step_ms = TIMELINE_STEP.as_millis();
    let (clock, pacing, count_answer, print_timeline) = match pace {
        None => Default::default(),
        Some(pace) => (
            format!(
                r#"local ffi = require("ffi")
ffi.cdef[[
typedef struct {{ long tv_sec; long tv_nsec; }} lb_timespec;
int clock_gettime(int clock, lb_timespec *now);
]]
local now = ffi.new("lb_timespec")
local CLOCK_MONOTONIC = 1
local function step()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, now)
  return tonumber(now.tv_sec) * {per_second} + math.floor(tonumber(now.tv_nsec) / {step_ns})
end
"#,
                per_second = 1000 / step_ms,
                step_ns = step_ms * 1_000_000,
            ),
            format!(
                "function delay() return {} end
",
                pace.as_millis()
            ),
            "    local at = step()
    answered_at[at] = (answered_at[at] or 0) + 1
",
            r#"  local merged, steps = {}, {}
  for _, thread in ipairs(threads) do
    for at, count in pairs(thread:get("answered_at")) do merged[at] = (merged[at] or 0) + count end
  end
  for at, count in pairs(merged) do table.insert(steps, string.format("%d:%d", at, count)) end
  io.write("timeline answered=" .. table.concat(steps, ",") .. "\n")
"#,
        ),
    };
    format!(
        r#"{}{}{clock}{pacing}local threads = {{}}
function setup(thread) table.insert(threads, thread) end
function init(args) answered = 0; failed = 0; first_failure = ""; answered_at = {{}} end
function response(status, headers, body)
  if status == 200 and string.find(body, '"result"', 1, true) then
    answered = answered + 1
{count_answer}  else
    failed = failed + 1
    if first_failure == "" then first_failure = status .. " " .. body end
  end
end
function done(summary, latency, requests)
  local answered, failed, first = 0, 0, ""
  for _, thread in ipairs(threads) do
    answered = answered + thread:get("answered")
    failed = failed + thread:get("failed")
    if first == "" then first = thread:get("first_failure") end
  end
  local e = summary.errors
  io.write(string.format("rpc answered=%d failed=%d connect=%d read=%d write=%d timeout=%d max_latency_ms=%.1f first_failure=%s\n",
    answered, failed, e.connect, e.read, e.write, e.timeout, latency.max / 1000, first))
{print_timeline}end
"#,
        post_body(body),
        header_lines(headers)
    )
}

/// `CLOCK_MONOTONIC` now, the clock of a [`Timeline`].
pub fn monotonic_now() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the struct it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    Duration::new(
        u64::try_from(now.tv_sec).unwrap_or_default(),
        u32::try_from(now.tv_nsec).unwrap_or_default(),
    )
}

/// When a [`paced_timeline_script`]'s answers came: how many in each [`TIMELINE_STEP`] of
/// `CLOCK_MONOTONIC`.
#[derive(Debug, Clone, Default)]
pub struct Timeline {
    answered: BTreeMap<u64, u64>,
}

impl Timeline {
    fn parse(line: &str) -> anyhow::Result<Timeline> {
        let steps = line
            .strip_prefix("timeline answered=")
            .with_context(|| format!("not a timeline: {line}"))?;
        let mut answered = BTreeMap::new();
        for entry in steps.split(',').filter(|entry| !entry.is_empty()) {
            let (step, count) = entry
                .split_once(':')
                .with_context(|| format!("timeline entry {entry:?} is not STEP:COUNT"))?;
            answered.insert(step.parse()?, count.parse()?);
        }
        Ok(Timeline { answered })
    }

    /// The longest stretch of steps without answers that begins within `window` after `event`
    /// (a [`monotonic_now`] reading), counted from the event: from its first step to the first
    /// step with answers after it, when they came again. When answers never stopped, a pause
    /// of nothing at the first step with answers from the event on. None when no answer came
    /// within the window, or none after the stretch.
    pub fn longest_pause(&self, event: Duration, window: Duration) -> Option<Pause> {
        let step_of = |at: Duration| {
            u64::try_from(at.as_millis() / TIMELINE_STEP.as_millis()).unwrap_or(u64::MAX)
        };
        let since_event =
            |step: u64| Some((TIMELINE_STEP * u32::try_from(step).ok()?).saturating_sub(event));
        let (first, last) = (step_of(event), step_of(event + window));
        // The longest stretch without answers: (its first step, its length).
        let (mut longest, mut current) = ((first, 0), None);
        for step in first..=last {
            if self.answered.contains_key(&step) {
                current = None;
            } else {
                let start = *current.get_or_insert(step);
                if step - start + 1 > longest.1 {
                    longest = (start, step - start + 1);
                }
            }
        }
        let again = *self.answered.range(longest.0 + longest.1..).next()?.0;
        let began = if longest.1 == 0 { again } else { longest.0 };
        Some(Pause {
            began: since_event(began)?,
            ended: since_event(again)?,
        })
    }
}

/// A stretch without answers in a [`Timeline`], counted from an event: from when it began to
/// when answers came again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pause {
    pub began: Duration,
    pub ended: Duration,
}

/// What a run of [`counting_script`] (or [`paced_timeline_script`]) printed.
#[derive(Debug, Clone)]
pub struct CountedReads {
    line: String,
    timeline: Option<String>,
}

impl CountedReads {
    /// The summary line (and the timeline, if any) in wrk's standard output.
    pub fn from_output(stdout: &str) -> anyhow::Result<CountedReads> {
        let line = stdout
            .lines()
            .find(|line| line.starts_with("rpc "))
            .with_context(|| format!("no summary from wrk: {stdout}"))?;
        let timeline = stdout.lines().find(|line| line.starts_with("timeline "));
        Ok(CountedReads {
            line: line.to_owned(),
            timeline: timeline.map(str::to_owned),
        })
    }

    /// When the answers came, from a [`paced_timeline_script`].
    pub fn timeline(&self) -> anyhow::Result<Timeline> {
        let line = self
            .timeline
            .as_deref()
            .context("wrk printed no timeline: run a paced_timeline_script")?;
        Timeline::parse(line)
    }

    /// A count of the line: `answered`, `failed`, `connect`, `read`, `write`, `timeout`.
    pub fn count(&self, name: &str) -> anyhow::Result<u64> {
        self.line
            .split(' ')
            .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
            .with_context(|| format!("{name} missing: {}", self.line))?
            .parse()
            .with_context(|| format!("{name}: {}", self.line))
    }

    /// The first answer that was not a result (status and body), if any.
    pub fn first_failure(&self) -> Option<&str> {
        let failure = self.line.split_once(" first_failure=")?.1.trim();
        (!failure.is_empty()).then_some(failure)
    }

    /// Requests that met a socket error: connect, read (a reset, a connection closed under a
    /// request), write, timeout.
    pub fn socket_errors(&self) -> anyhow::Result<u64> {
        ["connect", "read", "write", "timeout"]
            .iter()
            .map(|name| self.count(name))
            .sum()
    }
}

impl fmt::Display for CountedReads {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.line)
    }
}

/// wrk running a [`counting_script`] in the background (its own `--timeout 5s`, so a slow
/// answer under load is not a failure) while a test acts: [`Background::finish`] waits for its
/// end, [`Background::stop`] ends it early; killed if dropped before either.
pub struct Background {
    child: Option<std::process::Child>,
}

impl Background {
    /// Starts `wrk -t<threads> -c<connections> -d<seconds>s --timeout 5s -s <script> <url>`
    /// from `load.netns`.
    pub fn start(load: &Load<'_>) -> anyhow::Result<Background> {
        let mut command = crate::lab::command_in_netns(load.netns, "wrk")?;
        command
            .arg(format!("-t{}", load.threads))
            .arg(format!("-c{}", load.connections))
            .arg(format!("-d{}s", load.seconds))
            .args(["--timeout", "5s", "-s"])
            .arg(load.script)
            .arg(load.url)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = command.spawn().context("starting wrk")?;
        Ok(Background { child: Some(child) })
    }

    /// Waits for wrk to end its run and reads its summary.
    pub fn finish(mut self) -> anyhow::Result<CountedReads> {
        let child = self.child.take().context("wrk was stopped already")?;
        summary_of(child)
    }

    /// Stops wrk (SIGINT: it ends its run and prints its summary) and reads the summary.
    pub fn stop(mut self) -> anyhow::Result<CountedReads> {
        let child = self.child.take().context("wrk was stopped already")?;
        if let Ok(pid) = libc::pid_t::try_from(child.id()) {
            // SAFETY: plain kill(2) of our own child, not reaped yet: its pid cannot be reused.
            unsafe { libc::kill(pid, libc::SIGINT) };
        }
        summary_of(child)
    }
}

/// The summary of a wrk `child` running a [`counting_script`], once it ends.
fn summary_of(child: std::process::Child) -> anyhow::Result<CountedReads> {
    let output = child.wait_with_output().context("waiting for wrk")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    CountedReads::from_output(&stdout).with_context(|| {
        format!(
            "wrk ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )
    })
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
