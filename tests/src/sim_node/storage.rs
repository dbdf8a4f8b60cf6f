//! The storage sim-node can answer: the two well-known values that change every block, so
//! storage reads and storage subscriptions have something real to show. Every other key is
//! absent (`null`), as an unset key is on a real node.

use super::clock::{BlockNumber, ChainClock};

/// `twox128("System") ++ twox128("Number")`: the current block number, `u32`.
const SYSTEM_NUMBER_KEY: [u8; 32] =
    hex_key("26aa394eea5630e07c48ae0c9558cef702a5c1b19ab7a04f536c519aca4983ac");
/// `twox128("Timestamp") ++ twox128("Now")`: the block's timestamp in ms, `u64`.
const TIMESTAMP_NOW_KEY: [u8; 32] =
    hex_key("f0c365c3cf59d671eb72da0e7a4113c49f1f0515f462cdcf84e0f1d6045dfcbb");

/// The SCALE-encoded value under `key` at block `number`, or `None` when the key is unset.
pub fn read_storage(clock: &ChainClock, key: &[u8], number: BlockNumber) -> Option<Vec<u8>> {
    if key == SYSTEM_NUMBER_KEY {
        Some(number.to_le_bytes().to_vec())
    } else if key == TIMESTAMP_NOW_KEY {
        Some(clock.timestamp_ms(number).to_le_bytes().to_vec())
    } else {
        None
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

    #[test]
    fn system_number_and_timestamp_follow_the_block_and_other_keys_are_unset() {
        let clock = ChainClock::new(
            UNIX_EPOCH + Duration::from_secs(1000),
            Duration::from_secs(6),
        );
        assert_eq!(
            read_storage(&clock, &SYSTEM_NUMBER_KEY, 7),
            Some(vec![7, 0, 0, 0])
        );
        assert_eq!(
            read_storage(&clock, &TIMESTAMP_NOW_KEY, 2),
            Some(1_012_000u64.to_le_bytes().to_vec())
        );
        assert_eq!(read_storage(&clock, b":code", 2), None);
    }
}
