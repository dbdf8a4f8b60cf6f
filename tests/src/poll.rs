//! Waiting for a condition in async tests: polled, never slept on blindly.

use std::{future::Future, time::Duration};

use tokio::time::Instant;

/// How long a test waits for a condition before it fails.
pub const PATIENCE: Duration = Duration::from_secs(10);

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
