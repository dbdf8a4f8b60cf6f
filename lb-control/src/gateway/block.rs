//! Repeated auth failures from one client put it on the kernel blocklist for a while
//! (`[gateway.auth_failures_block]`, off by default): a key-guessing client is then dropped in
//! XDP before it costs a TLS handshake.
//!
//! A client is what the connection limit counts as one
//! ([`client_group`](super::admission::client_group)): an IPv4 address, or an IPv6 prefix (a
//! /64 by default), so a guesser cannot move to the next address of its prefix; the whole
//! prefix is blocked. Failures are counted per client in fixed windows of `within`; the
//! `after`-th failure in a window sends a [`BlockRequest`] (the serving threads never wait on
//! the kernel), which [`apply_requests`] carries out through the blocklist, for `block_for`:
//! into this host's kernel at once, into the state store batched (see [`crate::blocklist`]).

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::Mutex,
    time::{Instant, SystemTime},
};

use ipnet::IpNet;
use tokio::sync::mpsc;

use super::{AuthFailureBlock, admission::client_group};
use crate::blocklist::StoredBlocklist;

/// Beyond this many tracked clients, windows that ended are dropped.
const MAX_TRACKED: usize = 100_000;
/// The most block requests carried out together: one store transaction for all of them.
const MAX_BATCH: usize = 1024;

/// A client (an IPv4 address as a /32, an IPv6 prefix) to block until `until`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockRequest {
    pub prefix: IpNet,
    pub until: SystemTime,
}

struct Window {
    start: Instant,
    failures: u32,
}

pub struct FailureTracker {
    policy: AuthFailureBlock,
    /// The IPv6 prefix counted as one client.
    ipv6_prefix_len: u8,
    windows: Mutex<HashMap<IpNet, Window>>,
    blocks: mpsc::UnboundedSender<BlockRequest>,
}

impl FailureTracker {
    pub fn new(
        policy: AuthFailureBlock,
        ipv6_prefix_len: u8,
        blocks: mpsc::UnboundedSender<BlockRequest>,
    ) -> Self {
        FailureTracker {
            policy,
            ipv6_prefix_len,
            windows: Mutex::default(),
            blocks,
        }
    }

    /// Counts one auth failure from `address`; true when it asked for its client to be blocked.
    pub fn record(&self, address: IpAddr) -> bool {
        let client = client_group(address, self.ipv6_prefix_len);
        let now = Instant::now();
        let mut windows = self
            .windows
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if windows.len() >= MAX_TRACKED {
            windows.retain(|_, window| now.duration_since(window.start) < self.policy.within);
        }
        let window = windows.entry(client).or_insert(Window {
            start: now,
            failures: 0,
        });
        if now.duration_since(window.start) >= self.policy.within {
            *window = Window {
                start: now,
                failures: 0,
            };
        }
        window.failures += 1;
        if window.failures < self.policy.after {
            return false;
        }
        windows.remove(&client);
        // The applier may be gone at shutdown: nothing left to block then.
        let _ = self.blocks.send(BlockRequest {
            prefix: client,
            until: SystemTime::now() + self.policy.block_for,
        });
        true
    }
}

/// Puts the requested prefixes on the blocklist until every sender is gone: those queued while
/// the previous ones were written go together, in one store transaction.
pub async fn apply_requests(
    mut requests: mpsc::UnboundedReceiver<BlockRequest>,
    blocklist: StoredBlocklist,
) {
    let mut batch = Vec::new();
    while requests.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let blocks = batch
            .drain(..)
            .map(|request| (request.prefix, request.until))
            .collect();
        blocklist.add_auth_failure_blocks(blocks).await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn the_nth_failure_in_a_window_blocks_and_a_new_window_starts_over() {
        let (sender, mut requests) = mpsc::unbounded_channel();
        let tracker = FailureTracker::new(
            AuthFailureBlock {
                after: 3,
                within: Duration::from_millis(200),
                block_for: Duration::from_secs(600),
            },
            64,
            sender,
        );
        let guesser: IpAddr = "192.0.2.7".parse().unwrap();
        let other: IpAddr = "192.0.2.8".parse().unwrap();
        assert!(!tracker.record(guesser));
        assert!(!tracker.record(other));
        assert!(!tracker.record(guesser));
        assert!(tracker.record(guesser));
        let request = requests.try_recv().expect("a block request");
        assert_eq!(request.prefix, IpNet::from(guesser));
        assert!(request.until > SystemTime::now() + Duration::from_secs(590));
        assert!(requests.try_recv().is_err());

        std::thread::sleep(Duration::from_millis(250));
        assert!(!tracker.record(other), "the window of `other` ended");
    }

    #[test]
    fn failures_from_addresses_of_one_ipv6_prefix_block_the_prefix() {
        let (sender, mut requests) = mpsc::unbounded_channel();
        let policy = AuthFailureBlock {
            after: 3,
            within: Duration::from_secs(60),
            block_for: Duration::from_secs(600),
        };
        let tracker = FailureTracker::new(policy, 64, sender);
        let address = |text: &str| text.parse::<IpAddr>().unwrap();
        assert!(!tracker.record(address("2001:db8:0:7::1")));
        assert!(!tracker.record(address("2001:db8:0:8::1")), "another /64");
        assert!(!tracker.record(address("2001:db8:0:7::2")));
        assert!(tracker.record(address("2001:db8:0:7:ffff::3")));
        let request = requests.try_recv().expect("a block request");
        assert_eq!(
            request.prefix,
            "2001:db8:0:7::/64".parse::<IpNet>().unwrap()
        );
    }
}
