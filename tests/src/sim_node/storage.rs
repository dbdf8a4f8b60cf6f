//! The storage sim-node can answer: the two well-known values that change every block, so
//! storage reads and storage subscriptions have something real to show, and `:code`, the
//! runtime, which every chain has. Every other key is absent (`null`), as an unset key is on a
//! real node.
//!
//! [`Storage::query`] answers the new API's storage queries (`chainHead_v1_storage`) from the
//! same values: a value, its hash, the values or hashes under a prefix, and a Merkle value.

use std::sync::Arc;

use super::clock::{BlockNumber, ChainClock};
use super::primitives::blake2_256;

/// `twox128("System") ++ twox128("Number")`: the current block number, `u32`.
const SYSTEM_NUMBER_KEY: [u8; 32] =
    hex_key("26aa394eea5630e07c48ae0c9558cef702a5c1b19ab7a04f536c519aca4983ac");
/// `twox128("Timestamp") ++ twox128("Now")`: the block's timestamp in ms, `u64`.
const TIMESTAMP_NOW_KEY: [u8; 32] =
    hex_key("f0c365c3cf59d671eb72da0e7a4113c49f1f0515f462cdcf84e0f1d6045dfcbb");
/// The well-known key of the runtime code.
const CODE_KEY: &[u8] = b":code";

/// Every key that has a value, in key order (the order a trie iterates them).
const KEYS: [&[u8]; 3] = [&SYSTEM_NUMBER_KEY, CODE_KEY, &TIMESTAMP_NOW_KEY];

/// What a storage query asks for (the spec's `type` of a `chainHead_v1_storage` item).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryType {
    Value,
    Hash,
    ClosestDescendantMerkleValue,
    DescendantsValues,
    DescendantsHashes,
}

/// One result of a storage query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageItem {
    Value {
        key: Vec<u8>,
        value: Vec<u8>,
    },
    /// The chain's hash of the value: blake2-256, as `BlakeTwo256` on a Substrate chain.
    Hash {
        key: Vec<u8>,
        hash: [u8; 32],
    },
    ClosestDescendantMerkleValue {
        key: Vec<u8>,
        merkle_value: [u8; 32],
    },
}

/// The chain's storage at any block.
pub struct Storage {
    clock: ChainClock,
    /// `:code`, the same at every block (the runtime never upgrades).
    code: Arc<[u8]>,
}

impl Storage {
    pub fn new(clock: ChainClock, code: Vec<u8>) -> Self {
        Self {
            clock,
            code: code.into(),
        }
    }

    /// The SCALE-encoded value under `key` at block `number`, or `None` when the key is unset.
    pub fn read(&self, key: &[u8], number: BlockNumber) -> Option<Vec<u8>> {
        if key == SYSTEM_NUMBER_KEY {
            Some(number.to_le_bytes().to_vec())
        } else if key == TIMESTAMP_NOW_KEY {
            Some(self.clock.timestamp_ms(number).to_le_bytes().to_vec())
        } else if key == CODE_KEY {
            Some(self.code.to_vec())
        } else {
            None
        }
    }

    /// Answers one storage query at block `number`; nothing when there is nothing under the key.
    ///
    /// sim-node keeps no trie, so `closestDescendantMerkleValue` is a stand-in: the blake2-256
    /// of every key and value under `key`. Like a real Merkle value it changes exactly when a
    /// value under the key changes, which is what clients use it for; it is not the trie node's
    /// value.
    pub fn query(&self, number: BlockNumber, key: &[u8], query: QueryType) -> Vec<StorageItem> {
        let descendants = || {
            KEYS.into_iter()
                .filter(move |candidate| candidate.starts_with(key))
                .filter_map(move |candidate| {
                    Some((candidate.to_vec(), self.read(candidate, number)?))
                })
        };
        match query {
            QueryType::Value => self
                .read(key, number)
                .map(|value| StorageItem::Value {
                    key: key.to_vec(),
                    value,
                })
                .into_iter()
                .collect(),
            QueryType::Hash => self
                .read(key, number)
                .map(|value| StorageItem::Hash {
                    key: key.to_vec(),
                    hash: blake2_256(b"", &value),
                })
                .into_iter()
                .collect(),
            QueryType::DescendantsValues => descendants()
                .map(|(key, value)| StorageItem::Value { key, value })
                .collect(),
            QueryType::DescendantsHashes => descendants()
                .map(|(key, value)| StorageItem::Hash {
                    hash: blake2_256(b"", &value),
                    key,
                })
                .collect(),
            QueryType::ClosestDescendantMerkleValue => {
                let mut node = Vec::new();
                for (key, value) in descendants() {
                    node.extend_from_slice(&key);
                    node.extend_from_slice(&value);
                }
                if node.is_empty() {
                    return Vec::new();
                }
                vec![StorageItem::ClosestDescendantMerkleValue {
                    key: key.to_vec(),
                    merkle_value: blake2_256(b"sim-node/merkle-value", &node),
                }]
            }
        }
    }
}

/// Decodes a 64-digit hex constant at compile time.
const fn hex_key(digits: &str) -> [u8; 32] {
    const fn nibble(digit: u8) -> u8 {
        match digit {
            b'0'..=b'9' => digit - b'0',
            b'a'..=b'f' => digit - b'a' + 10,
            _ => panic!("storage key constant is not lowercase hex"),
        }
    }
    let digits = digits.as_bytes();
    assert!(digits.len() == 64, "storage key constant is not 32 bytes");
    let mut key = [0u8; 32];
    let mut i = 0;
    while i < 32 {
        key[i] = (nibble(digits[2 * i]) << 4) | nibble(digits[2 * i + 1]);
        i += 1;
    }
    key
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    const CODE: &[u8] = b"\0asm";

    fn storage() -> Storage {
        Storage::new(
            ChainClock::new(
                UNIX_EPOCH + Duration::from_secs(1000),
                Duration::from_secs(6),
            ),
            CODE.to_vec(),
        )
    }

    #[test]
    fn system_number_and_timestamp_follow_the_block_code_stays_and_other_keys_are_unset() {
        let storage = storage();
        assert_eq!(storage.read(&SYSTEM_NUMBER_KEY, 7), Some(vec![7, 0, 0, 0]));
        assert_eq!(
            storage.read(&TIMESTAMP_NOW_KEY, 2),
            Some(1_012_000u64.to_le_bytes().to_vec())
        );
        assert_eq!(storage.read(b":code", 2), Some(CODE.to_vec()));
        assert_eq!(storage.read(b":heappages", 2), None);
    }

    #[test]
    fn queries_answer_values_hashes_and_descendants_and_nothing_for_unset_keys() {
        let storage = storage();
        let number = 7u32.to_le_bytes().to_vec();
        assert_eq!(
            storage.query(7, &SYSTEM_NUMBER_KEY, QueryType::Value),
            [StorageItem::Value {
                key: SYSTEM_NUMBER_KEY.to_vec(),
                value: number.clone()
            }]
        );
        assert_eq!(
            storage.query(7, b":code", QueryType::Hash),
            [StorageItem::Hash {
                key: b":code".to_vec(),
                hash: blake2_256(b"", CODE)
            }]
        );
        // twox128("System"): the prefix of every System storage item.
        let system = &SYSTEM_NUMBER_KEY[..16];
        assert_eq!(
            storage.query(7, system, QueryType::DescendantsValues),
            [StorageItem::Value {
                key: SYSTEM_NUMBER_KEY.to_vec(),
                value: number
            }]
        );
        let all: Vec<Vec<u8>> = storage
            .query(7, &[], QueryType::DescendantsHashes)
            .into_iter()
            .map(|item| match item {
                StorageItem::Hash { key, .. } => key,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(all, KEYS.map(<[u8]>::to_vec), "every key, in key order");
        assert!(storage.query(7, system, QueryType::Value).is_empty());
        for query in [
            QueryType::Value,
            QueryType::Hash,
            QueryType::ClosestDescendantMerkleValue,
        ] {
            assert!(
                storage.query(7, b":heappages", query).is_empty(),
                "{query:?}"
            );
        }
    }

    #[test]
    fn merkle_value_changes_when_a_value_under_the_key_changes() {
        let storage = storage();
        let system = &SYSTEM_NUMBER_KEY[..16];
        let at = |number| storage.query(number, system, QueryType::ClosestDescendantMerkleValue);
        assert_eq!(at(7), at(7));
        assert_ne!(at(7), at(8));
        assert_eq!(at(7).len(), 1);
    }
}
