//! The few SCALE encodings sim-node needs to answer `state_call` like a runtime would.
//!
//! Written out by hand instead of pulling in `parity-scale-codec`: only compact integers,
//! length-prefixed byte strings and the `RuntimeVersion` struct are needed.

/// Appends `value` as a SCALE compact integer.
pub fn encode_compact(value: u64, out: &mut Vec<u8>) {
    match value {
        0..=0x3f => out.push((value as u8) << 2),
        0x40..=0x3fff => out.extend_from_slice(&(((value as u16) << 2) | 0b01).to_le_bytes()),
        0x4000..=0x3fff_ffff => {
            out.extend_from_slice(&(((value as u32) << 2) | 0b10).to_le_bytes())
        }
        _ => {
            let bytes = value.to_le_bytes();
            let significant = 8 - (value.leading_zeros() / 8) as usize;
            // Big-integer mode: the low two bits are 0b11, the upper six hold (byte count - 4).
            out.push((((significant - 4) as u8) << 2) | 0b11);
            out.extend_from_slice(&bytes[..significant]);
        }
    }
}

/// Appends `bytes` as a SCALE `Vec<u8>` (compact length, then the bytes).
pub fn encode_bytes(bytes: &[u8], out: &mut Vec<u8>) {
    encode_compact(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

/// Decodes a SCALE `Compact<u32>` (a length prefix) from the start of `input`: the value and
/// how many bytes it took. Non-canonical encodings (a value in a longer form than needed) are
/// refused, as `parity-scale-codec` refuses them.
pub fn decode_compact_len(input: &[u8]) -> Option<(usize, usize)> {
    let first = *input.first()?;
    let (value, taken, least) = match first & 0b11 {
        0b00 => (u32::from(first >> 2), 1, 0),
        0b01 => {
            let bytes: [u8; 2] = input.get(..2)?.try_into().ok()?;
            (u32::from(u16::from_le_bytes(bytes) >> 2), 2, 0x40)
        }
        0b10 => {
            let bytes: [u8; 4] = input.get(..4)?.try_into().ok()?;
            (u32::from_le_bytes(bytes) >> 2, 4, 0x4000)
        }
        _ => {
            // Big-integer mode: a `u32` fits only in exactly 4 following bytes.
            if first >> 2 != 0 {
                return None;
            }
            let bytes: [u8; 4] = input.get(1..5)?.try_into().ok()?;
            (u32::from_le_bytes(bytes), 5, 0x4000_0000)
        }
    };
    (value >= least).then_some((usize::try_from(value).ok()?, taken))
}

/// Decodes a SCALE `u32` (4 bytes, little endian) from the start of `input`. Trailing bytes are
/// ignored, as a runtime's `Decode::decode(&mut &input[..])` ignores them.
pub fn decode_u32(input: &[u8]) -> Option<u32> {
    let bytes: [u8; 4] = input.get(..4)?.try_into().ok()?;
    Some(u32::from_le_bytes(bytes))
}

/// Encodes a `Vec<u32>`.
pub fn encode_u32_vec(values: &[u32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + 4 * values.len());
    encode_compact(values.len() as u64, &mut out);
    for value in values {
        out.extend_from_slice(&value.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compact(value: u64) -> Vec<u8> {
        let mut out = Vec::new();
        encode_compact(value, &mut out);
        out
    }

    // Vectors from the SCALE specification (docs.substrate.io "SCALE codec", compact integers).
    #[test]
    fn compact_integers_match_the_specification() {
        assert_eq!(compact(0), [0x00]);
        assert_eq!(compact(1), [0x04]);
        assert_eq!(compact(42), [0xa8]);
        assert_eq!(compact(63), [0xfc]);
        assert_eq!(compact(64), [0x01, 0x01]);
        assert_eq!(compact(69), [0x15, 0x01]);
        assert_eq!(compact(16383), [0xfd, 0xff]);
        assert_eq!(compact(16384), [0x02, 0x00, 0x01, 0x00]);
        assert_eq!(compact(65535), [0xfe, 0xff, 0x03, 0x00]);
        assert_eq!(compact(1_073_741_823), [0xfe, 0xff, 0xff, 0xff]);
        assert_eq!(compact(1_073_741_824), [0x03, 0x00, 0x00, 0x00, 0x40]);
        assert_eq!(
            compact(100_000_000_000_000),
            [0x0b, 0x00, 0x40, 0x7a, 0x10, 0xf3, 0x5a]
        );
        assert_eq!(
            compact(u64::MAX),
            [0x13, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]
        );
    }

    #[test]
    fn compact_lengths_decode_what_encode_compact_writes_and_refuse_longer_forms() {
        for value in [
            0u64,
            1,
            63,
            64,
            16383,
            16384,
            1_073_741_823,
            1_073_741_824,
            u64::from(u32::MAX),
        ] {
            let encoded = compact(value);
            assert_eq!(
                decode_compact_len(&encoded),
                Some((value as usize, encoded.len())),
                "{value}"
            );
        }
        assert_eq!(decode_compact_len(&[0x01, 0x00]), None, "0 in two bytes");
        assert_eq!(decode_compact_len(&[0x01]), None, "truncated");
        assert_eq!(
            decode_compact_len(&[0x07, 0, 0, 0, 0, 1]),
            None,
            "beyond u32"
        );
        assert_eq!(decode_compact_len(&[]), None);
    }

    #[test]
    fn u32_vec_is_compact_length_then_little_endian_items() {
        assert_eq!(
            encode_u32_vec(&[14, 15, 16]),
            [0x0c, 14, 0, 0, 0, 15, 0, 0, 0, 16, 0, 0, 0]
        );
    }

    #[test]
    fn u32_argument_needs_four_bytes_and_ignores_the_rest() {
        assert_eq!(decode_u32(&[15, 0, 0, 0]), Some(15));
        assert_eq!(decode_u32(&[0, 1, 0, 0, 9]), Some(256));
        assert_eq!(decode_u32(&[15, 0, 0]), None);
    }
}
