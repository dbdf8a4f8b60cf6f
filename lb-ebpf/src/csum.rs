//! Incremental Internet checksum updates (RFC 1624): HC' = ~(~HC + ~m + m').
//!
//! A [`ChecksumDelta`] collects the 16-bit words that change and then patches a checksum, so a
//! rewrite of addresses and ports costs a few additions instead of a pass over the packet.

/// The one's-complement sum of the changes to a checksummed range.
#[derive(Clone, Copy, Default)]
pub struct ChecksumDelta {
    sum: u32,
}

impl ChecksumDelta {
    /// Records that the 16-bit word `old` became `new` (both as read from the wire, big-endian).
    #[inline(always)]
    pub fn replace_u16(&mut self, old: u16, new: u16) {
        self.sum += u32::from(!old) + u32::from(new);
    }

    /// Records that `old` became `new`, for byte strings of even length (addresses, ports).
    #[inline(always)]
    pub fn replace_bytes<const N: usize>(&mut self, old: &[u8; N], new: &[u8; N]) {
        let mut i = 0;
        while i + 1 < N {
            self.replace_u16(
                u16::from_be_bytes([old[i], old[i + 1]]),
                u16::from_be_bytes([new[i], new[i + 1]]),
            );
            i += 2;
        }
    }

    /// Applies the delta to a checksum field holding `check` (big-endian, as on the wire).
    #[inline(always)]
    pub fn apply(self, check: u16) -> u16 {
        !(fold(u32::from(!check) + fold(self.sum)) as u16)
    }
}

/// Folds carries back into the low 16 bits.
#[inline(always)]
fn fold(mut sum: u32) -> u32 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum
}
