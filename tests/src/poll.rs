//! Waiting for a condition: polled, never slept on blindly. [`until`] in async tests;
//! [`wait_until`] in blocking code (the lab tests, the benchmarks).

use std::{future::Future, time::Duration};

use anyhow::bail;
use tokio::time::Instant;

/// How long a test waits for a condition before it fails.
pub const PATIENCE: Duration = Duration::from_secs(10);
/// How often [`wait_until`] asks.
const BLOCKING_INTERVAL: Duration = Duration::from_millis(20);

/// Polls `condition` every 10 ms until it holds; panics naming `what` after [`PATIENCE`].
pub async fn until<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + PATIENCE;
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls `condition` every 20 ms for up to `within`, on this thread; fails naming `what`, or
/// with the condition's own error. Returns how long it took.
pub fn wait_until(
    what: &str,
    within: Duration,
    mut condition: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<Duration> {
    let start = std::time::Instant::now();
    while !condition()? {
        if start.elapsed() > within {
            bail!("{what}: not within {within:?}");
        }
        std::thread::sleep(BLOCKING_INTERVAL);
    }
    Ok(start.elapsed())
}
