//! The chain's schedule: one block per `block_time` since `genesis`, read off the wall clock.
//!
//! The best block number is a pure function of the time, so every sim-node with the same
//! genesis and block time is at the same height, even across processes, as the nodes of one
//! network are; a node that is stalled or behind simply reports a lower best block.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Substrate's block number type.
pub type BlockNumber = u32;

/// Block numbers wrap here (back to 0) instead of overflowing `u32`: with a fixed genesis and a
/// millisecond block time the chain would reach `u32::MAX` within weeks. Wrapping keeps every
/// node with the same settings on the same number; 2^31 blocks is 400 years at 6 s.
const BLOCK_NUMBER_PERIOD: u64 = 1 << 31;

/// Default genesis: 2026-01-01T00:00:00Z. Fixed (rather than "now") so separately started
/// nodes agree on the chain.
pub const DEFAULT_GENESIS_UNIX_MS: u64 = 1_767_225_600_000;

#[derive(Debug, Clone, Copy)]
pub struct ChainClock {
    genesis: SystemTime,
    block_time: Duration,
}

impl ChainClock {
    /// `block_time` must be at least a millisecond (checked by the node's config validation).
    pub fn new(genesis: SystemTime, block_time: Duration) -> Self {
        Self {
            genesis,
            block_time,
        }
    }

    pub fn block_time_ms(&self) -> u64 {
        (self.block_time.as_millis() as u64).max(1)
    }

    pub fn genesis_unix_ms(&self) -> u64 {
        self.genesis
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }

    fn elapsed_blocks_at(&self, now: SystemTime) -> u64 {
        let elapsed = now.duration_since(self.genesis).unwrap_or_default();
        elapsed.as_millis() as u64 / self.block_time_ms()
    }

    /// The chain's best block at `now`: what a healthy, synced node reports.
    pub fn best_at(&self, now: SystemTime) -> BlockNumber {
        (self.elapsed_blocks_at(now) % BLOCK_NUMBER_PERIOD) as BlockNumber
    }

    pub fn best_now(&self) -> BlockNumber {
        self.best_at(SystemTime::now())
    }

    /// How long from `now` until the next block is due.
    pub fn until_next_block(&self, now: SystemTime) -> Duration {
        let next_ms = (self.elapsed_blocks_at(now) + 1) * self.block_time_ms();
        let next = self.genesis + Duration::from_millis(next_ms);
        next.duration_since(now).unwrap_or_default()
    }

    /// The `Timestamp.now` the block author put into block `number`, in Unix milliseconds.
    pub fn timestamp_ms(&self, number: BlockNumber) -> u64 {
        self.genesis_unix_ms() + u64::from(number) * self.block_time_ms()
    }

    /// The BABE slot of block `number`: one block per slot, slot duration = block time.
    pub fn slot(&self, number: BlockNumber) -> u64 {
        self.timestamp_ms(number) / self.block_time_ms()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_block_counts_whole_block_times_since_genesis() {
        let genesis = UNIX_EPOCH + Duration::from_millis(DEFAULT_GENESIS_UNIX_MS);
        let clock = ChainClock::new(genesis, Duration::from_secs(6));
        assert_eq!(clock.best_at(genesis), 0);
        assert_eq!(clock.best_at(genesis + Duration::from_millis(5_999)), 0);
        assert_eq!(clock.best_at(genesis + Duration::from_secs(60)), 10);
        assert_eq!(
            clock.best_at(genesis - Duration::from_secs(60)),
            0,
            "before genesis"
        );
        assert_eq!(
            clock.until_next_block(genesis + Duration::from_millis(61_500)),
            Duration::from_millis(4_500)
        );
    }
}
