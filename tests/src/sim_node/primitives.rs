//! Hex-encoded values as they appear in Substrate JSON-RPC, and the hash function.

use std::fmt;
use std::str::FromStr;

use blake2::digest::consts::U32;
use blake2::{Blake2b, Digest};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A 32-byte block (or extrinsic) hash, `0x`-prefixed hex in JSON.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Hash32(pub [u8; 32]);

impl fmt::Display for Hash32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0x{}", hex::encode(self.0))
    }
}

impl fmt::Debug for Hash32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("expected a 0x-prefixed 32-byte hex hash, got {0:?}")]
pub struct InvalidHash(String);

impl FromStr for Hash32 {
    type Err = InvalidHash;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = s
            .strip_prefix("0x")
            .and_then(|digits| hex::decode(digits).ok())
            .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
            .ok_or_else(|| InvalidHash(s.to_owned()))?;
        Ok(Self(bytes))
    }
}

impl Serialize for Hash32 {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Hash32 {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Bytes as `0x`-prefixed hex (Substrate's `Bytes`); `"0x"` is empty.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HexBytes(pub Vec<u8>);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("expected 0x-prefixed hex bytes, got {0:?}")]
pub struct InvalidHexBytes(String);

impl FromStr for HexBytes {
    type Err = InvalidHexBytes;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.strip_prefix("0x")
            .and_then(|digits| hex::decode(digits).ok())
            .map(Self)
            .ok_or_else(|| InvalidHexBytes(s.to_owned()))
    }
}

impl Serialize for HexBytes {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&prefixed_hex(&self.0))
    }
}

impl<'de> Deserialize<'de> for HexBytes {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

pub fn prefixed_hex(bytes: &[u8]) -> String {
    format!("0x{}", hex::encode(bytes))
}

/// blake2b-256 of a domain tag and some bytes (an empty domain gives the plain hash).
pub fn blake2_256(domain: &[u8], data: &[u8]) -> [u8; 32] {
    let mut hasher = Blake2b::<U32>::new();
    hasher.update(domain);
    hasher.update(data);
    hasher.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_parses_only_32_byte_prefixed_hex() {
        let hash = Hash32([7; 32]);
        assert_eq!(hash.to_string().parse::<Hash32>(), Ok(hash));
        assert!("0x1234".parse::<Hash32>().is_err());
        assert!(hex::encode(hash.0).parse::<Hash32>().is_err());
        assert!(format!("0x{}", "zz".repeat(32)).parse::<Hash32>().is_err());
    }

    #[test]
    fn hex_bytes_need_the_prefix_and_even_digits() {
        assert_eq!("0x".parse::<HexBytes>(), Ok(HexBytes(Vec::new())));
        assert_eq!("0x0a0b".parse::<HexBytes>(), Ok(HexBytes(vec![10, 11])));
        assert!("0a0b".parse::<HexBytes>().is_err());
        assert!("0xabc".parse::<HexBytes>().is_err());
    }
}
