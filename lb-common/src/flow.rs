//! The flow key and its hash: one function in kernel and userspace, so userspace can predict
//! which backend a flow gets.

/// Address family of a key, as stored in `family` fields.
pub const FAMILY_IPV4: u8 = 4;
pub const FAMILY_IPV6: u8 = 6;

/// A connection as the client sees it: its 5-tuple. IPv4 addresses take the first 4 bytes of the
/// 16-byte fields, the rest zero. Ports are in network byte order, as on the wire.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    pub src_port_be: u16,
    pub dst_port_be: u16,
    /// IANA protocol number (6 TCP, 17 UDP).
    pub proto: u8,
    /// `FAMILY_IPV4` or `FAMILY_IPV6`.
    pub family: u8,
    pub _pad: [u8; 2],
}

const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);

#[cfg(feature = "user")]
// SAFETY: `FlowKey` is `repr(C)` with explicit padding and only integer fields.
unsafe impl aya::Pod for FlowKey {}

impl FlowKey {
    /// The key of an IPv4 flow. Ports are given in host order and stored in network order.
    pub const fn from_v4(
        src: [u8; 4],
        dst: [u8; 4],
        src_port: u16,
        dst_port: u16,
        proto: u8,
    ) -> FlowKey {
        FlowKey {
            src_addr: widen_v4(src),
            dst_addr: widen_v4(dst),
            src_port_be: src_port.to_be(),
            dst_port_be: dst_port.to_be(),
            proto,
            family: FAMILY_IPV4,
            _pad: [0; 2],
        }
    }

    /// The key of an IPv6 flow. Ports are given in host order and stored in network order.
    pub const fn from_v6(
        src: [u8; 16],
        dst: [u8; 16],
        src_port: u16,
        dst_port: u16,
        proto: u8,
    ) -> FlowKey {
        FlowKey {
            src_addr: src,
            dst_addr: dst,
            src_port_be: src_port.to_be(),
            dst_port_be: dst_port.to_be(),
            proto,
            family: FAMILY_IPV6,
            _pad: [0; 2],
        }
    }

    /// The key the gateway hashes to keep a client on one node whatever its ports and
    /// destination: the source address and family only. An IPv4 address takes the first 4
    /// bytes of `src`, the rest zero, as in every key.
    pub const fn client_key(src: &[u8; 16], family: u8) -> FlowKey {
        FlowKey {
            src_addr: *src,
            dst_addr: [0; 16],
            src_port_be: 0,
            dst_port_be: 0,
            proto: 0,
            family,
            _pad: [0; 2],
        }
    }
}

/// An IPv4 address in a 16-byte key field: first 4 bytes, the rest zero.
const fn widen_v4(addr: [u8; 4]) -> [u8; 16] {
    [
        addr[0], addr[1], addr[2], addr[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ]
}

/// lookup3's `initval` for flow hashes. Any fixed value works; changing it moves every flow
/// to another Maglev entry, so kernel and userspace must agree on it (they share this one).
const FLOW_HASH_INITVAL: u32 = 0x4c42_0001;

/// Bob Jenkins' lookup3 `hashword` (the kernel's `jhash2`; Katran hashes flows with lookup3
/// too) over the key's ten little-endian `u32` words, with [`FLOW_HASH_INITVAL`].
///
/// Written out word by word with constant indexes so the BPF verifier sees straight-line code:
/// no loop, no slice, nothing that can panic. The result is the same on every host.
#[inline(always)]
pub fn flow_hash(key: &FlowKey) -> u32 {
    let s = &key.src_addr;
    let d = &key.dst_addr;
    let [sp0, sp1] = key.src_port_be.to_ne_bytes();
    let [dp0, dp1] = key.dst_port_be.to_ne_bytes();
    // `to_ne_bytes` of a `_be` field gives its bytes as they lie in memory, i.e. on the wire.
    let words: [u32; 10] = [
        u32::from_le_bytes([s[0], s[1], s[2], s[3]]),
        u32::from_le_bytes([s[4], s[5], s[6], s[7]]),
        u32::from_le_bytes([s[8], s[9], s[10], s[11]]),
        u32::from_le_bytes([s[12], s[13], s[14], s[15]]),
        u32::from_le_bytes([d[0], d[1], d[2], d[3]]),
        u32::from_le_bytes([d[4], d[5], d[6], d[7]]),
        u32::from_le_bytes([d[8], d[9], d[10], d[11]]),
        u32::from_le_bytes([d[12], d[13], d[14], d[15]]),
        u32::from_le_bytes([sp0, sp1, dp0, dp1]),
        u32::from_le_bytes([key.proto, key.family, key._pad[0], key._pad[1]]),
    ];

    let (mut a, mut b, mut c) = jhash_init(10, FLOW_HASH_INITVAL);
    // Ten words: three full 12-byte blocks, then one word in `a` before the final mix.
    a = a.wrapping_add(words[0]);
    b = b.wrapping_add(words[1]);
    c = c.wrapping_add(words[2]);
    jhash_mix(&mut a, &mut b, &mut c);
    a = a.wrapping_add(words[3]);
    b = b.wrapping_add(words[4]);
    c = c.wrapping_add(words[5]);
    jhash_mix(&mut a, &mut b, &mut c);
    a = a.wrapping_add(words[6]);
    b = b.wrapping_add(words[7]);
    c = c.wrapping_add(words[8]);
    jhash_mix(&mut a, &mut b, &mut c);
    a = a.wrapping_add(words[9]);
    jhash_final(&mut a, &mut b, &mut c);
    c
}

/// lookup3's starting state for `hashword` over `word_count` words.
#[inline(always)]
const fn jhash_init(word_count: u32, initval: u32) -> (u32, u32, u32) {
    let start = 0xdead_beef_u32
        .wrapping_add(word_count << 2)
        .wrapping_add(initval);
    (start, start, start)
}

/// lookup3's `mix()`.
#[inline(always)]
fn jhash_mix(a: &mut u32, b: &mut u32, c: &mut u32) {
    *a = a.wrapping_sub(*c) ^ c.rotate_left(4);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a) ^ a.rotate_left(6);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b) ^ b.rotate_left(8);
    *b = b.wrapping_add(*a);
    *a = a.wrapping_sub(*c) ^ c.rotate_left(16);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a) ^ a.rotate_left(19);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b) ^ b.rotate_left(4);
    *b = b.wrapping_add(*a);
}

/// lookup3's `final()`.
#[inline(always)]
fn jhash_final(a: &mut u32, b: &mut u32, c: &mut u32) {
    *c = (*c ^ *b).wrapping_sub(b.rotate_left(14));
    *a = (*a ^ *c).wrapping_sub(c.rotate_left(11));
    *b = (*b ^ *a).wrapping_sub(a.rotate_left(25));
    *c = (*c ^ *b).wrapping_sub(b.rotate_left(16));
    *a = (*a ^ *c).wrapping_sub(c.rotate_left(4));
    *b = (*b ^ *a).wrapping_sub(a.rotate_left(14));
    *c = (*c ^ *b).wrapping_sub(b.rotate_left(24));
}

#[cfg(test)]
mod tests {
    // The crate is `no_std` without the `std` feature; the tests run on the host either way.
    extern crate std;
    use std::{vec, vec::Vec};

    use super::*;

    /// lookup3 `hashword` transcribed loop-for-loop from Bob Jenkins' C source, over any number
    /// of words: the reference the unrolled [`flow_hash`] is checked against.
    fn reference_hashword(words: &[u32], initval: u32) -> u32 {
        fn rot(x: u32, k: u32) -> u32 {
            x.rotate_left(k)
        }
        let mut a = 0xdead_beef_u32
            .wrapping_add((words.len() as u32) << 2)
            .wrapping_add(initval);
        let mut b = a;
        let mut c = a;
        let mut k = words;
        while k.len() > 3 {
            a = a.wrapping_add(k[0]);
            b = b.wrapping_add(k[1]);
            c = c.wrapping_add(k[2]);
            a = a.wrapping_sub(c);
            a ^= rot(c, 4);
            c = c.wrapping_add(b);
            b = b.wrapping_sub(a);
            b ^= rot(a, 6);
            a = a.wrapping_add(c);
            c = c.wrapping_sub(b);
            c ^= rot(b, 8);
            b = b.wrapping_add(a);
            a = a.wrapping_sub(c);
            a ^= rot(c, 16);
            c = c.wrapping_add(b);
            b = b.wrapping_sub(a);
            b ^= rot(a, 19);
            a = a.wrapping_add(c);
            c = c.wrapping_sub(b);
            c ^= rot(b, 4);
            b = b.wrapping_add(a);
            k = &k[3..];
        }
        if k.is_empty() {
            return c;
        }
        if k.len() == 3 {
            c = c.wrapping_add(k[2]);
        }
        if k.len() >= 2 {
            b = b.wrapping_add(k[1]);
        }
        a = a.wrapping_add(k[0]);
        c ^= b;
        c = c.wrapping_sub(rot(b, 14));
        a ^= c;
        a = a.wrapping_sub(rot(c, 11));
        b ^= a;
        b = b.wrapping_sub(rot(a, 25));
        c ^= b;
        c = c.wrapping_sub(rot(b, 16));
        a ^= c;
        a = a.wrapping_sub(rot(c, 4));
        b ^= a;
        b = b.wrapping_sub(rot(a, 14));
        c ^= b;
        c = c.wrapping_sub(rot(b, 24));
        c
    }

    /// The key as it lies in memory (and in a BPF map), read as little-endian words.
    fn key_words(key: &FlowKey) -> [u32; 10] {
        // SAFETY: `FlowKey` is `repr(C)`, 40 bytes, integers only, with no implicit padding.
        let bytes: [u8; 40] = unsafe { core::mem::transmute(*key) };
        core::array::from_fn(|i| {
            u32::from_le_bytes([
                bytes[4 * i],
                bytes[4 * i + 1],
                bytes[4 * i + 2],
                bytes[4 * i + 3],
            ])
        })
    }

    /// SplitMix64: a fixed-seed source of test keys, so failures reproduce.
    struct TestRng(u64);

    impl TestRng {
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn bytes<const N: usize>(&mut self) -> [u8; N] {
            core::array::from_fn(|_| self.next_u64() as u8)
        }

        fn key(&mut self) -> FlowKey {
            let ports = self.next_u64();
            if ports & 1 == 0 {
                FlowKey::from_v4(
                    self.bytes(),
                    self.bytes(),
                    (ports >> 8) as u16,
                    (ports >> 24) as u16,
                    6,
                )
            } else {
                FlowKey::from_v6(
                    self.bytes(),
                    self.bytes(),
                    (ports >> 8) as u16,
                    (ports >> 24) as u16,
                    17,
                )
            }
        }
    }

    #[test]
    fn known_answers_match_lookup3_c_source() {
        // Computed with lookup3.c's `hashword(words, 10, 0x4c420001)` on a little-endian host;
        // that build reproduces the published `hashlittle` answers 0x17770551 / 0xcd628161.
        assert_eq!(flow_hash(&FlowKey::default()), 0x791f_3b77);
        let v4 = FlowKey::from_v4([10, 0, 0, 1], [192, 168, 1, 10], 40000, 443, 6);
        assert_eq!(flow_hash(&v4), 0xc641_4d11);
        let mut src = [0; 16];
        src[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
        let mut dst = src;
        src[15] = 1;
        dst[15] = 2;
        let v6 = FlowKey::from_v6(src, dst, 5555, 9944, 17);
        assert_eq!(flow_hash(&v6), 0x0d85_b006);
    }

    #[test]
    fn unrolled_hash_equals_reference_hashword_over_memory_layout() {
        let mut rng = TestRng(1);
        for _ in 0..10_000 {
            let key = rng.key();
            assert_eq!(
                flow_hash(&key),
                reference_hashword(&key_words(&key), FLOW_HASH_INITVAL),
                "{key:?}"
            );
        }
    }

    #[test]
    fn constructors_store_ports_in_network_order_and_v4_in_the_first_four_bytes() {
        let key = FlowKey::from_v4([10, 0, 0, 1], [10, 0, 0, 2], 0x1234, 0xabcd, 6);
        assert_eq!(key.src_addr[..4], [10, 0, 0, 1]);
        assert_eq!(key.src_addr[4..], [0; 12]);
        assert_eq!(key.src_port_be.to_ne_bytes(), [0x12, 0x34]);
        assert_eq!(key.dst_port_be.to_ne_bytes(), [0xab, 0xcd]);
        assert_eq!(key.family, FAMILY_IPV4);
        assert_eq!(
            FlowKey::from_v6([1; 16], [2; 16], 1, 2, 17).family,
            FAMILY_IPV6
        );

        let client = FlowKey::client_key(&[7; 16], FAMILY_IPV6);
        assert_eq!(
            client,
            FlowKey {
                src_addr: [7; 16],
                family: FAMILY_IPV6,
                ..FlowKey::default()
            }
        );
    }

    #[test]
    fn flipping_any_input_bit_flips_about_half_the_output_bits() {
        const KEYS: u32 = 400;
        const MEANINGFUL_BITS: usize = 38 * 8;
        let mut rng = TestRng(2);
        let keys: Vec<FlowKey> = (0..KEYS).map(|_| rng.key()).collect();
        let mut total_flips = 0u64;
        for bit in 0..MEANINGFUL_BITS {
            let mut flips = 0u32;
            for key in &keys {
                let mut words = key_words(key);
                let original = reference_hashword(&words, FLOW_HASH_INITVAL);
                words[bit / 32] ^= 1 << (bit % 32);
                // SAFETY: any 40 bytes are a valid `FlowKey` (integers only).
                let flipped: FlowKey = unsafe { core::mem::transmute(words) };
                flips += (flow_hash(&flipped) ^ original).count_ones();
            }
            let mean = f64::from(flips) / f64::from(KEYS);
            assert!(
                (14.5..=17.5).contains(&mean),
                "input bit {bit}: {mean:.2} output bits flip"
            );
            total_flips += u64::from(flips);
        }
        let mean = total_flips as f64 / (f64::from(KEYS) * MEANINGFUL_BITS as f64);
        assert!(
            (15.8..=16.2).contains(&mean),
            "{mean:.3} output bits flip on average"
        );
    }

    /// Counts keys per bucket of `flow_hash % 65537`, as the kernel picks a Maglev entry.
    fn bucket_counts(keys: impl Iterator<Item = FlowKey>) -> Vec<u32> {
        let mut counts = vec![0u32; 65_537];
        for key in keys {
            counts[(flow_hash(&key) % 65_537) as usize] += 1;
        }
        counts
    }

    /// Asserts that `counts` look like a uniform draw: the chi-squared statistic within 3% of
    /// its expectation, and every block of 1024 buckets within 5 standard deviations of its
    /// share (within 2.8% for the smallest test, 16 keys a bucket).
    fn assert_even(counts: &[u32], what: &str) {
        let total: u64 = counts.iter().map(|&c| u64::from(c)).sum();
        let expected = total as f64 / counts.len() as f64;
        let chi_squared: f64 = counts
            .iter()
            .map(|&c| (f64::from(c) - expected).powi(2) / expected)
            .sum();
        let degrees = (counts.len() - 1) as f64;
        assert!(
            (chi_squared / degrees - 1.0).abs() < 0.03,
            "{what}: chi-squared {chi_squared:.0} for {degrees} degrees of freedom"
        );
        for block in counts.chunks_exact(1024) {
            let got: u64 = block.iter().map(|&c| u64::from(c)).sum();
            let want = expected * block.len() as f64;
            let tolerance = 5.0 / want.sqrt();
            assert!(
                (got as f64 / want - 1.0).abs() < tolerance,
                "{what}: a block of {} buckets got {got} keys, expected {want:.0}",
                block.len()
            );
        }
    }

    #[test]
    fn random_keys_spread_evenly_over_maglev_entries() {
        let mut rng = TestRng(3);
        assert_even(
            &bucket_counts((0..65_537 * 32).map(|_| rng.key())),
            "random keys",
        );
    }

    #[test]
    fn sequential_clients_and_ports_spread_evenly_over_maglev_entries() {
        // Real traffic is structured: neighbouring client addresses and ephemeral ports to one VIP.
        let keys = (0..2048u32).flat_map(|client| {
            let [_, _, hi, lo] = client.to_be_bytes();
            (32768..32768 + 1024)
                .map(move |port| FlowKey::from_v4([10, 0, hi, lo], [192, 0, 2, 1], port, 443, 6))
        });
        assert_even(&bucket_counts(keys), "sequential keys");
        let clients = (0..65_537u32 * 16).map(|client| {
            let mut src = [0; 16];
            src[..4].copy_from_slice(&client.to_be_bytes());
            FlowKey::client_key(&src, FAMILY_IPV4)
        });
        assert_even(&bucket_counts(clients), "client keys");
    }
}
