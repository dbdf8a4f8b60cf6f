//! The simulated chain: one block per `block_time` since `genesis`, read off the wall clock.
//!
//! Everything about a block (hash, header, body) is a pure function of its number, and the
//! number is a pure function of the time. So every sim-node with the same genesis and block
//! time serves the same chain, even across processes, as the nodes of one network do; a node
//! that is stalled or behind simply reports a lower best block.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::primitives::{Hash32, blake2_256, prefixed_hex};
use super::scale::{encode_bytes, encode_compact};

/// Substrate's block number type.
pub type BlockNumber = u32;

/// Block numbers wrap here (back to 0) instead of overflowing `u32`: with a fixed genesis and a
/// millisecond block time the chain would reach `u32::MAX` within weeks. Wrapping keeps every
/// node with the same settings on the same number; 2^31 blocks is 400 years at 6 s.
const BLOCK_NUMBER_PERIOD: u64 = 1 << 31;

/// Default genesis: 2026-01-01T00:00:00Z. Fixed (rather than "now") so separately started
/// nodes agree on the chain.
pub const DEFAULT_GENESIS_UNIX_MS: u64 = 1_767_225_600_000;

/// The hash of block `number`. The last four bytes are the number (big endian), so a hash can
/// be mapped back to its block without remembering every block; the rest is a blake2 hash.
pub fn block_hash(number: BlockNumber) -> Hash32 {
    let mut hash = blake2_256(b"sim-node/block-hash", &number.to_le_bytes());
    hash[28..].copy_from_slice(&number.to_be_bytes());
    Hash32(hash)
}

/// The number of the block with this hash, if the hash is one of this chain's.
pub fn block_number_of(hash: &Hash32) -> Option<BlockNumber> {
    let tail: [u8; 4] = hash.0[28..].try_into().ok()?;
    let number = BlockNumber::from_be_bytes(tail);
    (block_hash(number) == *hash).then_some(number)
}

/// A block header in `chain_getHeader` form; fields in the node's order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Header {
    pub parent_hash: Hash32,
    /// Hex without leading zeros, as Substrate prints block numbers: `"0x1a"`.
    pub number: String,
    pub state_root: Hash32,
    pub extrinsics_root: Hash32,
    pub digest: Digest,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Digest {
    /// SCALE-encoded `DigestItem`s as hex.
    pub logs: Vec<String>,
}

/// `chain_getBlock` result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SignedBlock {
    pub block: Block,
    /// Always `None` (`null`): blocks here are finalized without justifications.
    pub justifications: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Block {
    pub header: Header,
    /// SCALE-encoded extrinsics (each with its length prefix) as hex.
    pub extrinsics: Vec<String>,
}

/// The wall-clock schedule of the chain.
#[derive(Debug, Clone, Copy)]
pub struct ChainClock {
    genesis: SystemTime,
    block_time: Duration,
}

impl ChainClock {
    /// `block_time` must be at least a millisecond (checked by the node's config validation).
    pub fn new(genesis: SystemTime, block_time: Duration) -> Self {
        Self { genesis, block_time }
    }

    fn block_time_ms(&self) -> u64 {
        (self.block_time.as_millis() as u64).max(1)
    }

    fn genesis_unix_ms(&self) -> u64 {
        self.genesis.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
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
    fn slot(&self, number: BlockNumber) -> u64 {
        self.timestamp_ms(number) / self.block_time_ms()
    }

    /// `chain_getHeader` result for block `number`.
    pub fn header(&self, number: BlockNumber) -> Header {
        let parent_hash = match number {
            0 => Hash32([0; 32]),
            n => block_hash(n - 1),
        };
        let logs: Vec<String> = if number == 0 {
            Vec::new()
        } else {
            vec![
                prefixed_hex(&self.babe_pre_digest(number)),
                prefixed_hex(&babe_seal(number)),
            ]
        };
        Header {
            parent_hash,
            number: format!("0x{number:x}"),
            state_root: Hash32(blake2_256(b"sim-node/state-root", &number.to_le_bytes())),
            extrinsics_root: Hash32(blake2_256(b"sim-node/extrinsics-root", &number.to_le_bytes())),
            digest: Digest { logs },
        }
    }

    /// `chain_getBlock` result for block `number`.
    pub fn signed_block(&self, number: BlockNumber) -> SignedBlock {
        let extrinsics: Vec<String> = if number == 0 {
            Vec::new()
        } else {
            vec![prefixed_hex(&self.timestamp_inherent(number))]
        };
        SignedBlock {
            block: Block { header: self.header(number), extrinsics },
            justifications: None,
        }
    }

    /// `DigestItem::PreRuntime(*b"BABE", PreDigest::SecondaryPlain { authority_index, slot })`.
    fn babe_pre_digest(&self, number: BlockNumber) -> Vec<u8> {
        let mut pre_digest = vec![2]; // PreDigest::SecondaryPlain
        pre_digest.extend_from_slice(&0u32.to_le_bytes()); // authority_index
        pre_digest.extend_from_slice(&self.slot(number).to_le_bytes());
        let mut item = vec![6]; // DigestItem::PreRuntime
        item.extend_from_slice(b"BABE");
        encode_bytes(&pre_digest, &mut item);
        item
    }

    /// The unsigned `Timestamp.set(now)` inherent every block carries: extrinsic format 4,
    /// pallet 3 (Timestamp), call 0 (set), `Compact<u64>` moment; length-prefixed.
    fn timestamp_inherent(&self, number: BlockNumber) -> Vec<u8> {
        let mut body = vec![0x04, 3, 0];
        encode_compact(self.timestamp_ms(number), &mut body);
        let mut extrinsic = Vec::with_capacity(body.len() + 1);
        encode_bytes(&body, &mut extrinsic);
        extrinsic
    }
}

/// `DigestItem::Seal(*b"BABE", signature)` with a 64-byte stand-in signature.
fn babe_seal(number: BlockNumber) -> Vec<u8> {
    let first = blake2_256(b"sim-node/seal-1", &number.to_le_bytes());
    let second = blake2_256(b"sim-node/seal-2", &number.to_le_bytes());
    let mut item = vec![5]; // DigestItem::Seal
    item.extend_from_slice(b"BABE");
    encode_bytes(&[first, second].concat(), &mut item);
    item
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clock() -> ChainClock {
        ChainClock::new(
            UNIX_EPOCH + Duration::from_millis(DEFAULT_GENESIS_UNIX_MS),
            Duration::from_secs(6),
        )
    }

    #[test]
    fn block_hash_maps_back_to_its_number_and_foreign_hashes_to_none() {
        for number in [0, 1, 26, 1 << 20, BlockNumber::MAX] {
            assert_eq!(block_number_of(&block_hash(number)), Some(number));
        }
        let mut forged = block_hash(7);
        forged.0[0] ^= 1;
        assert_eq!(block_number_of(&forged), None);
        assert_eq!(block_number_of(&Hash32([0; 32])), None);
    }

    #[test]
    fn best_block_counts_whole_block_times_since_genesis() {
        let clock = clock();
        let genesis = UNIX_EPOCH + Duration::from_millis(DEFAULT_GENESIS_UNIX_MS);
        assert_eq!(clock.best_at(genesis), 0);
        assert_eq!(clock.best_at(genesis + Duration::from_millis(5_999)), 0);
        assert_eq!(clock.best_at(genesis + Duration::from_secs(60)), 10);
        assert_eq!(clock.best_at(genesis - Duration::from_secs(60)), 0, "before genesis");
        assert_eq!(
            clock.until_next_block(genesis + Duration::from_millis(61_500)),
            Duration::from_millis(4_500)
        );
    }

    #[test]
    fn header_links_to_parent_and_prints_number_as_hex() {
        let header = clock().header(26);
        assert_eq!(header.number, "0x1a");
        assert_eq!(header.parent_hash, block_hash(25));
        assert_eq!(header.digest.logs.len(), 2);
        let genesis = serde_json::to_value(clock().header(0)).expect("serializes");
        assert_eq!(genesis["number"], "0x0");
        assert_eq!(genesis["parentHash"], format!("0x{}", "00".repeat(32)));
        assert_eq!(genesis["digest"]["logs"], serde_json::json!([]));
    }

    #[test]
    fn block_carries_the_timestamp_inherent() {
        let clock = clock();
        let block = serde_json::to_value(clock.signed_block(1)).expect("serializes");
        let extrinsic = block["block"]["extrinsics"][0].as_str().expect("hex string");
        // Length 10 (0x28), format 4, Timestamp (3) set (0), compact u64 in 6 bytes (0x0b).
        assert!(extrinsic.starts_with("0x280403000b"), "{extrinsic}");
        let moment = clock.timestamp_ms(1).to_le_bytes();
        assert!(extrinsic.ends_with(&hex::encode(&moment[..6])));
        assert_eq!(block["justifications"], serde_json::Value::Null);
    }
}
