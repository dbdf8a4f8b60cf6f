//! The simulated chain's blocks: headers, bodies and hashes, all a pure function of the block
//! number (and the clock's genesis and block time), so every sim-node with the same settings
//! serves the same chain.
//!
//! Block hashes are real: blake2-256 of the SCALE-encoded header, as clients (polkadot.js
//! computes `header.hash` itself) expect; and each header's `parentHash` is its parent's hash.
//! That makes hashes a chain, so computing one means hashing every block before it. To keep
//! that cheap, the chain is cut into segments of `SEGMENT_LEN` (2048) blocks: a segment's first block
//! links to a stand-in parent hash derived from the number (which sim-node also resolves to the
//! parent block, and which `chainHead_v1_follow` reports as the parent block's own hash), so at
//! most one segment has to be hashed to answer any block.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use serde::Serialize;

use super::clock::{BlockNumber, ChainClock};
use super::primitives::{Hash32, blake2_256, prefixed_hex};
use super::scale::{encode_bytes, encode_compact};

/// Blocks per hash segment: a link break every ~3.4 hours at 6 s blocks, every ~100 s at
/// 50 ms; hashing a whole segment takes about 2 ms (about 50 ms in a debug build).
const SEGMENT_LEN: BlockNumber = 1 << 11;
/// Segments whose hashes are kept (for hash → number lookups); older ones are dropped.
const CACHED_SEGMENTS: usize = 8;

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

/// A header in SCALE form, from which both its JSON and its hash are made.
struct EncodedHeader {
    parent_hash: Hash32,
    number: BlockNumber,
    state_root: Hash32,
    extrinsics_root: Hash32,
    logs: Vec<Vec<u8>>,
}

impl EncodedHeader {
    /// The SCALE encoding: what the hash is taken of, and what `chainHead_v1_header` returns.
    fn encode(&self) -> Vec<u8> {
        let mut encoded = Vec::with_capacity(256);
        encoded.extend_from_slice(&self.parent_hash.0);
        encode_compact(u64::from(self.number), &mut encoded);
        encoded.extend_from_slice(&self.state_root.0);
        encoded.extend_from_slice(&self.extrinsics_root.0);
        encode_compact(self.logs.len() as u64, &mut encoded);
        for log in &self.logs {
            encoded.extend_from_slice(log);
        }
        encoded
    }

    fn hash(&self) -> Hash32 {
        Hash32(blake2_256(b"", &self.encode()))
    }

    fn to_json(&self) -> Header {
        Header {
            parent_hash: self.parent_hash,
            number: format!("0x{:x}", self.number),
            state_root: self.state_root,
            extrinsics_root: self.extrinsics_root,
            digest: Digest {
                logs: self.logs.iter().map(|log| prefixed_hex(log)).collect(),
            },
        }
    }
}

/// Hashes computed so far, by segment, and the reverse map.
#[derive(Default)]
struct HashCache {
    segments: BTreeMap<BlockNumber, Vec<Hash32>>,
    numbers: HashMap<Hash32, BlockNumber>,
}

pub struct Chain {
    clock: ChainClock,
    hashes: Mutex<HashCache>,
}

impl Chain {
    pub fn new(clock: ChainClock) -> Self {
        Self {
            clock,
            hashes: Mutex::new(HashCache::default()),
        }
    }

    pub fn clock(&self) -> &ChainClock {
        &self.clock
    }

    /// The hash of block `number`.
    pub fn block_hash(&self, number: BlockNumber) -> Hash32 {
        let mut cache = self.lock_cache();
        self.hash_in_cache(&mut cache, number)
    }

    /// The number of the block with `hash`, among blocks up to `best`, if this chain has it.
    /// Blocks in the segments of `best` and the one before are always found; older ones only
    /// while their segment is still cached.
    pub fn block_number_of(&self, hash: &Hash32, best: BlockNumber) -> Option<BlockNumber> {
        let mut cache = self.lock_cache();
        if !cache.numbers.contains_key(hash) {
            self.hash_in_cache(&mut cache, best);
            if let Some(previous_segment_end) = segment_start(best).checked_sub(1) {
                self.hash_in_cache(&mut cache, previous_segment_end);
            }
        }
        cache
            .numbers
            .get(hash)
            .copied()
            .filter(|number| *number <= best)
    }

    /// `chain_getHeader` result for block `number`.
    pub fn header(&self, number: BlockNumber) -> Header {
        self.encoded_header(number, self.parent_hash(number))
            .to_json()
    }

    /// The SCALE-encoded header of block `number` (`chainHead_v1_header`).
    pub fn scale_header(&self, number: BlockNumber) -> Vec<u8> {
        self.encoded_header(number, self.parent_hash(number))
            .encode()
    }

    /// `chain_getBlock` result for block `number`.
    pub fn signed_block(&self, number: BlockNumber) -> SignedBlock {
        let extrinsics: Vec<String> = if number == 0 {
            Vec::new()
        } else {
            vec![prefixed_hex(&self.timestamp_inherent(number))]
        };
        SignedBlock {
            block: Block {
                header: self.header(number),
                extrinsics,
            },
            justifications: None,
        }
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, HashCache> {
        // The cache is only ever extended; a panic mid-update leaves it usable.
        self.hashes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn parent_hash(&self, number: BlockNumber) -> Hash32 {
        match number {
            0 => Hash32([0; 32]),
            n if n == segment_start(n) => segment_link(n - 1),
            n => self.block_hash(n - 1),
        }
    }

    /// Hashes `number`'s segment up to `number` (from where the cache left off).
    fn hash_in_cache(&self, cache: &mut HashCache, number: BlockNumber) -> Hash32 {
        let start = segment_start(number);
        if !cache.segments.contains_key(&start) {
            self.evict_old_segments(cache, start);
            if let Some(link_number) = start.checked_sub(1) {
                cache.numbers.insert(segment_link(link_number), link_number);
            }
        }
        let HashCache { segments, numbers } = cache;
        let segment = segments.entry(start).or_default();
        let wanted = (number - start) as usize;
        while segment.len() <= wanted {
            let block = start + segment.len() as BlockNumber;
            let parent = match segment.last() {
                Some(parent) => *parent,
                None if block == 0 => Hash32([0; 32]),
                None => segment_link(block - 1),
            };
            let hash = self.encoded_header(block, parent).hash();
            numbers.insert(hash, block);
            segment.push(hash);
        }
        segment[wanted]
    }

    /// Keeps at most `CACHED_SEGMENTS - 1` segments besides the one about to be added,
    /// dropping those furthest from it.
    fn evict_old_segments(&self, cache: &mut HashCache, keep: BlockNumber) {
        while cache.segments.len() >= CACHED_SEGMENTS {
            let furthest = cache
                .segments
                .keys()
                .copied()
                .max_by_key(|start| start.abs_diff(keep));
            let Some(furthest) = furthest else { break };
            if let Some(hashes) = cache.segments.remove(&furthest) {
                for hash in hashes {
                    cache.numbers.remove(&hash);
                }
            }
            if let Some(link_number) = furthest.checked_sub(1) {
                cache.numbers.remove(&segment_link(link_number));
            }
        }
    }

    fn encoded_header(&self, number: BlockNumber, parent_hash: Hash32) -> EncodedHeader {
        let logs = if number == 0 {
            Vec::new()
        } else {
            vec![self.babe_pre_digest(number), babe_seal(number)]
        };
        EncodedHeader {
            parent_hash,
            number,
            state_root: Hash32(filler_bytes(STATE_ROOT_DOMAIN, number)),
            extrinsics_root: Hash32(filler_bytes(EXTRINSICS_ROOT_DOMAIN, number)),
            logs,
        }
    }

    /// `DigestItem::PreRuntime(*b"BABE", PreDigest::SecondaryPlain { authority_index, slot })`.
    fn babe_pre_digest(&self, number: BlockNumber) -> Vec<u8> {
        let mut pre_digest = vec![2]; // PreDigest::SecondaryPlain
        pre_digest.extend_from_slice(&0u32.to_le_bytes()); // authority_index
        pre_digest.extend_from_slice(&self.clock.slot(number).to_le_bytes());
        let mut item = vec![6]; // DigestItem::PreRuntime
        item.extend_from_slice(b"BABE");
        encode_bytes(&pre_digest, &mut item);
        item
    }

    /// The unsigned `Timestamp.set(now)` inherent every block carries: extrinsic format 4,
    /// pallet 3 (Timestamp), call 0 (set), `Compact<u64>` moment; length-prefixed.
    fn timestamp_inherent(&self, number: BlockNumber) -> Vec<u8> {
        let mut body = vec![0x04, 3, 0];
        encode_compact(self.clock.timestamp_ms(number), &mut body);
        let mut extrinsic = Vec::with_capacity(body.len() + 1);
        encode_bytes(&body, &mut extrinsic);
        extrinsic
    }
}

fn segment_start(number: BlockNumber) -> BlockNumber {
    number - number % SEGMENT_LEN
}

/// The stand-in `parentHash` of a segment's first block; resolves to block `parent`.
fn segment_link(parent: BlockNumber) -> Hash32 {
    Hash32(blake2_256(b"sim-node/segment-link", &parent.to_le_bytes()))
}

/// `DigestItem::Seal(*b"BABE", signature)` with a 64-byte stand-in signature.
fn babe_seal(number: BlockNumber) -> Vec<u8> {
    let mut item = vec![5]; // DigestItem::Seal
    item.extend_from_slice(b"BABE");
    encode_bytes(&filler_bytes::<64>(SEAL_DOMAIN, number), &mut item);
    item
}

const STATE_ROOT_DOMAIN: u64 = 0x5354_4154_4521;
const EXTRINSICS_ROOT_DOMAIN: u64 = 0x4558_5452_4e53;
const SEAL_DOMAIN: u64 = 0x5345_414c_2121;

/// Random-looking bytes for a block's stand-in values (roots, seal), from SplitMix64 rather
/// than blake2: they are made for every block hashed, so they must be cheap, and nothing
/// checks them.
fn filler_bytes<const N: usize>(domain: u64, number: BlockNumber) -> [u8; N] {
    const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut state = domain ^ u64::from(number).wrapping_mul(GOLDEN_GAMMA);
    let mut bytes = [0u8; N];
    for chunk in bytes.chunks_mut(8) {
        state = state.wrapping_add(GOLDEN_GAMMA);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
    }
    bytes
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::super::clock::DEFAULT_GENESIS_UNIX_MS;
    use super::*;

    fn chain() -> Chain {
        Chain::new(ChainClock::new(
            UNIX_EPOCH + Duration::from_millis(DEFAULT_GENESIS_UNIX_MS),
            Duration::from_secs(6),
        ))
    }

    #[test]
    fn block_hash_is_the_blake2_hash_of_the_encoded_header() {
        let chain = chain();
        let header = chain.encoded_header(26, chain.block_hash(25));
        assert_eq!(chain.block_hash(26), header.hash());
        assert_ne!(chain.block_hash(26), chain.block_hash(27));
    }

    #[test]
    fn hashes_are_the_same_on_every_node_and_in_any_order() {
        let (first, second) = (chain(), chain());
        let late = SEGMENT_LEN * 3 + 7;
        let late_hash = first.block_hash(late);
        assert_eq!(first.block_hash(5), second.block_hash(5));
        assert_eq!(second.block_hash(late), late_hash);
    }

    #[test]
    fn hash_lookup_finds_recent_blocks_and_segment_links_but_not_future_or_foreign_ones() {
        let chain = chain();
        let best = SEGMENT_LEN * 2 + 10;
        assert_eq!(
            chain.block_number_of(&chain.block_hash(best), best),
            Some(best)
        );
        assert_eq!(
            chain.block_number_of(&chain.block_hash(best - 100), best),
            Some(best - 100)
        );
        let previous_segment = SEGMENT_LEN + 3;
        assert_eq!(
            chain.block_number_of(&chain.block_hash(previous_segment), best),
            Some(previous_segment)
        );
        let first_of_segment = chain.header(SEGMENT_LEN * 2);
        assert_eq!(
            chain.block_number_of(&first_of_segment.parent_hash, best),
            Some(SEGMENT_LEN * 2 - 1),
            "a segment's link resolves to its parent"
        );
        assert_eq!(
            chain.block_number_of(&chain.block_hash(best + 1), best),
            None
        );
        assert_eq!(chain.block_number_of(&Hash32([7; 32]), best), None);
    }

    #[test]
    fn old_segments_are_evicted_but_their_hashes_stay_computable() {
        let chain = chain();
        let old = chain.block_hash(1);
        for segment in 1..=CACHED_SEGMENTS as BlockNumber + 1 {
            chain.block_hash(segment * SEGMENT_LEN);
        }
        assert!(chain.lock_cache().segments.len() <= CACHED_SEGMENTS);
        assert_eq!(chain.block_hash(1), old);
    }

    #[test]
    fn scale_header_hashes_to_the_block_hash() {
        let chain = chain();
        let header = chain.scale_header(26);
        assert_eq!(Hash32(blake2_256(b"", &header)), chain.block_hash(26));
        assert_eq!(&header[..32], &chain.block_hash(25).0, "parent hash first");
    }

    #[test]
    fn header_links_to_parent_and_prints_number_as_hex() {
        let chain = chain();
        let header = chain.header(26);
        assert_eq!(header.number, "0x1a");
        assert_eq!(header.parent_hash, chain.block_hash(25));
        assert_eq!(header.digest.logs.len(), 2);
        let genesis = serde_json::to_value(chain.header(0)).expect("serializes");
        assert_eq!(genesis["number"], "0x0");
        assert_eq!(genesis["parentHash"], format!("0x{}", "00".repeat(32)));
        assert_eq!(genesis["digest"]["logs"], serde_json::json!([]));
    }

    #[test]
    fn block_carries_the_timestamp_inherent() {
        let chain = chain();
        let block = serde_json::to_value(chain.signed_block(1)).expect("serializes");
        let extrinsic = block["block"]["extrinsics"][0]
            .as_str()
            .expect("hex string");
        // Length 10 (0x28), format 4, Timestamp (3) set (0), compact u64 in 6 bytes (0x0b).
        assert!(extrinsic.starts_with("0x280403000b"), "{extrinsic}");
        let moment = chain.clock().timestamp_ms(1).to_le_bytes();
        assert!(extrinsic.ends_with(&hex::encode(&moment[..6])));
        assert_eq!(block["justifications"], serde_json::Value::Null);
    }
}
