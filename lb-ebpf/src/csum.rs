//! Incremental Internet checksum updates (RFC 1624): HC' = ~(~HC + ~m + m').
//!
//! Words are summed as they lie in memory, in native byte order: the one's-complement sum is
//! byte-order independent (RFC 1071, 2(B)), so a checksum field read and written in native
//! order takes the delta as it is. And a 32-bit word adds the same as its two 16-bit halves
//! once the sum is folded, so addresses are summed a word (one load) at a time, in a 64-bit
//! sum that cannot overflow.

/// The one's-complement sum of the changes to a checksummed range.
#[derive(Clone, Copy, Default)]
pub struct ChecksumDelta {
    sum: u64,
}

impl ChecksumDelta {
    /// Records that the 16-bit word `old` became `new` (both as read from memory).
    #[inline(always)]
    pub fn replace_u16(&mut self, old: u16, new: u16) {
        self.sum += u64::from(!old) + u64::from(new);
    }

    /// Records that the 32-bit word `old` became `new` (both as read from memory).
    #[inline(always)]
    pub fn replace_u32(&mut self, old: u32, new: u32) {
        self.sum += u64::from(!old) + u64::from(new);
    }

    /// Records that `old` became `new`, for byte strings whose length is a multiple of 4
    /// (addresses).
    #[inline(always)]
    pub fn replace_bytes<const N: usize>(&mut self, old: &[u8; N], new: &[u8; N]) {
        let mut i = 0;
        while i + 3 < N {
            self.replace_u32(word(old, i), word(new, i));
            i += 4;
        }
    }

    /// Adds the words of `bytes` (a length that is a multiple of 4), to checksum a range
    /// written from scratch.
    #[inline(always)]
    pub fn add_bytes<const N: usize>(&mut self, bytes: &[u8; N]) {
        let mut i = 0;
        while i + 3 < N {
            self.sum += u64::from(word(bytes, i));
            i += 4;
        }
    }

    /// Applies the delta to a checksum field holding `check` (read from memory).
    #[inline(always)]
    pub fn apply(self, check: u16) -> u16 {
        !(fold(u64::from(!check) + self.sum) as u16)
    }

    /// The checksum of a range whose words were all added with `add_bytes`.
    #[inline(always)]
    pub fn checksum(self) -> u16 {
        !(fold(self.sum) as u16)
    }
}

/// The 32-bit word at `bytes[i..i + 4]`, as it lies in memory.
#[inline(always)]
fn word<const N: usize>(bytes: &[u8; N], i: usize) -> u32 {
    u32::from_ne_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]])
}

/// Folds carries back into the low 16 bits: 64 to 32 bits twice, then 32 to 16 twice.
#[inline(always)]
fn fold(mut sum: u64) -> u64 {
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum
}
