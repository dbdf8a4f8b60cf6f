//! Substrate headers as the heads subscriptions send them, and their block hashes.
//!
//! A header notification carries no hash, and a head is only known for sure by its hash (two
//! blocks of one height on two forks differ by it). The hash is blake2-256 of the
//! SCALE-encoded header, computed here as the chain does.

use blake2::digest::consts::U32;
use blake2::{Blake2b, Digest as _};
use serde::Deserialize;

/// A header in JSON: `{"parentHash","number":"0x…","stateRoot","extrinsicsRoot","digest":{"logs":[…]}}`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Header {
    parent_hash: String,
    number: String,
    state_root: String,
    extrinsics_root: String,
    digest: Digest,
}

#[derive(Debug, Deserialize)]
struct Digest {
    /// Each item already SCALE-encoded, as hex.
    logs: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub(super) enum HeaderError {
    #[error("{field} {value:?} is not 0x-prefixed hex")]
    NotHex { field: &'static str, value: String },
    #[error("{field} is {len} bytes, not 32")]
    NotAHash { field: &'static str, len: usize },
    #[error("block number {0:?} is not a 0x-prefixed hex number that fits 64 bits")]
    BadNumber(String),
}

impl Header {
    pub(super) fn number(&self) -> Result<u64, HeaderError> {
        self.number
            .strip_prefix("0x")
            .and_then(|digits| u64::from_str_radix(digits, 16).ok())
            .ok_or_else(|| HeaderError::BadNumber(self.number.clone()))
    }

    /// The block hash, `0x`-prefixed lowercase hex.
    pub(super) fn hash(&self) -> Result<String, HeaderError> {
        let mut encoded = Vec::with_capacity(128);
        encoded.extend_from_slice(&hash_bytes("parentHash", &self.parent_hash)?);
        encode_compact(self.number()?, &mut encoded);
        encoded.extend_from_slice(&hash_bytes("stateRoot", &self.state_root)?);
        encoded.extend_from_slice(&hash_bytes("extrinsicsRoot", &self.extrinsics_root)?);
        encode_compact(self.digest.logs.len() as u64, &mut encoded);
        for log in &self.digest.logs {
            encoded.extend_from_slice(&hex_bytes("digest log", log)?);
        }
        Ok(format!(
            "0x{}",
            hex::encode(Blake2b::<U32>::digest(&encoded))
        ))
    }
}

fn hex_bytes(field: &'static str, value: &str) -> Result<Vec<u8>, HeaderError> {
    value
        .strip_prefix("0x")
        .and_then(|digits| hex::decode(digits).ok())
        .ok_or_else(|| HeaderError::NotHex {
            field,
            value: value.to_owned(),
        })
}

fn hash_bytes(field: &'static str, value: &str) -> Result<[u8; 32], HeaderError> {
    let bytes = hex_bytes(field, value)?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| HeaderError::NotAHash {
        field,
        len: bytes.len(),
    })
}

/// SCALE compact encoding of an unsigned integer.
fn encode_compact(value: u64, out: &mut Vec<u8>) {
    match value {
        0..=0x3f => out.push((value as u8) << 2),
        0x40..=0x3fff => out.extend_from_slice(&((value as u16) << 2 | 0b01).to_le_bytes()),
        0x4000..=0x3fff_ffff => out.extend_from_slice(&((value as u32) << 2 | 0b10).to_le_bytes()),
        _ => {
            let len = 8 - (value.leading_zeros() / 8) as usize;
            out.push(((len - 4) as u8) << 2 | 0b11);
            out.extend_from_slice(&value.to_le_bytes()[..len]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compact(value: u64) -> Vec<u8> {
        let mut out = Vec::new();
        encode_compact(value, &mut out);
        out
    }

    #[test]
    fn compact_encoding_matches_scale() {
        // Vectors from the SCALE codec's documentation.
        assert_eq!(compact(0), [0x00]);
        assert_eq!(compact(1), [0x04]);
        assert_eq!(compact(42), [0xa8]);
        assert_eq!(compact(69), [0x15, 0x01]);
        assert_eq!(compact(65535), [0xfe, 0xff, 0x03, 0x00]);
        assert_eq!(
            compact(100_000_000_000_000),
            [0x0b, 0x00, 0x40, 0x7a, 0x10, 0xf3, 0x5a]
        );
        assert_eq!(compact(1 << 30), [0x03, 0x00, 0x00, 0x00, 0x40]);
    }

    #[test]
    fn a_malformed_header_names_its_field() {
        let header: Header = serde_json::from_value(serde_json::json!({
            "parentHash": "0x00",
            "number": "0x1",
            "stateRoot": "0x00",
            "extrinsicsRoot": "0x00",
            "digest": { "logs": [] },
        }))
        .unwrap();
        assert_eq!(header.number().unwrap(), 1);
        assert_eq!(
            header.hash().unwrap_err().to_string(),
            "parentHash is 1 bytes, not 32"
        );
    }
}
