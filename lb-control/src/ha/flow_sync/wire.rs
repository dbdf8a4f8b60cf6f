//! The flow sync's messages on the private link and how they are signed.
//!
//! A connection starts with the backup sending a random 16-byte challenge. Then the master sends
//! frames: a batch's length (u32, big-endian), the batch, and HMAC-SHA-256 under the shared
//! secret over the challenge, the frame's number in the connection (u64) and the batch. A frame
//! from someone without the secret, an altered one, or one replayed from another connection or
//! out of order fails the check, and the backup closes the connection without installing it.
//! The link is not encrypted: flows name client addresses, as the packets on the link do
//! anyway; what matters is that nobody else can write into the backup's flow table.
//!
//! A batch: its kind (u8), the sender's monotonic clock at the walk it comes from (u64), the
//! keys of ended flows (u32 count, then each), and new or changed flows (u32 count, then each).
//! Every integer is big-endian, except the `_be` fields of keys, which go as the kernel holds
//! them (network order already).
//!
//! A planned handover adds one exchange ([`Message`]): the master sends `Handover` (kind 3,
//! the drain time in milliseconds as a u32) after a full snapshot, and the backup answers
//! `HandoverReady` (kind 4) in a frame of its own, signed under the same secret and challenge
//! but apart from the master's frames (its own frame count, and a label), so neither side's
//! frames can be played back as the other's.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use hmac::{Hmac, Mac};
use lb_common::flow::{FAMILY_IPV4, FAMILY_IPV6, FlowKey};
use sha2::Sha256;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::dataplane::PortableFlow;

/// The backup's challenge: makes every connection's signatures its own.
pub const CHALLENGE_LEN: usize = 16;
pub type Challenge = [u8; CHALLENGE_LEN];
pub const TAG_LEN: usize = 32;
/// Flows (ended and changed together) in one batch: loxilb sends 8192 a batch too. A full
/// batch is about 600 KiB.
pub const MAX_FLOWS_PER_BATCH: usize = 8192;
/// The longest batch a receiver reads: room for [`MAX_FLOWS_PER_BATCH`] of the larger kind.
pub const MAX_BATCH_LEN: usize = HEADER_LEN + 8 + MAX_FLOWS_PER_BATCH * FLOW_LEN;

/// A key without its padding; a flow: key, backend (address, port, family), NAT port, hash,
/// flags, last seen.
const KEY_LEN: usize = 16 + 16 + 2 + 2 + 1 + 1;
const FLOW_LEN: usize = KEY_LEN + 16 + 2 + 1 + 2 + 4 + 1 + 8;
const HEADER_LEN: usize = 1 + 8;

/// The kinds of the handover's messages, after the batches' 0 to 2.
const KIND_HANDOVER: u8 = 3;
const KIND_HANDOVER_READY: u8 = 4;

/// Which way a frame goes: each way is signed apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// The master's frames: batches and the handover.
    ToBackup,
    /// The backup's answers.
    ToMaster,
}

/// What a frame carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Batch(Batch),
    /// The master gives its addresses up (a planned handover): for `drain`, the backup sends
    /// the segments of gateway connections it has no socket for to the master, which finishes
    /// them (second chance).
    Handover {
        drain: Duration,
    },
    /// The backup's answer to `Handover`: every batch before it is installed and second
    /// chance is armed.
    HandoverReady,
}

impl Message {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Message::Batch(batch) => batch.encode(),
            Message::Handover { drain } => {
                let millis = u32::try_from(drain.as_millis()).unwrap_or(u32::MAX);
                let mut out = vec![KIND_HANDOVER];
                out.extend_from_slice(&millis.to_be_bytes());
                out
            }
            Message::HandoverReady => vec![KIND_HANDOVER_READY],
        }
    }

    pub fn decode(bytes: &[u8]) -> Result<Message, WireError> {
        match bytes {
            [KIND_HANDOVER, millis @ ..] => {
                let millis: [u8; 4] = millis
                    .try_into()
                    .map_err(|_| WireError::Malformed("a handover of the wrong length"))?;
                Ok(Message::Handover {
                    drain: Duration::from_millis(u64::from(u32::from_be_bytes(millis))),
                })
            }
            [KIND_HANDOVER_READY] => Ok(Message::HandoverReady),
            _ => Batch::decode(bytes).map(Message::Batch),
        }
    }
}

/// Writes `message` as the next frame under `signer`.
pub async fn write_message(
    stream: &mut tokio::net::TcpStream,
    signer: &mut Signer,
    message: &Message,
) -> std::io::Result<()> {
    let bytes = message.encode();
    let tag = signer.sign(&bytes);
    let mut frame = Vec::with_capacity(4 + bytes.len() + tag.len());
    frame.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    frame.extend_from_slice(&bytes);
    frame.extend_from_slice(&tag);
    stream.write_all(&frame).await
}

/// Reads the next frame and checks its signature under `signer`; a frame that fails ends the
/// connection.
pub async fn read_message(
    stream: &mut tokio::net::TcpStream,
    signer: &mut Signer,
) -> Result<Message, super::FlowSyncError> {
    let len = stream.read_u32().await? as usize;
    if len > MAX_BATCH_LEN {
        return Err(WireError::TooLong(len).into());
    }
    let mut bytes = vec![0; len];
    stream.read_exact(&mut bytes).await?;
    let mut tag = [0; TAG_LEN];
    stream.read_exact(&mut tag).await?;
    signer.verify(&bytes, &tag)?;
    Ok(Message::decode(&bytes)?)
}

/// What a batch is part of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchKind {
    /// Changes since the walk before.
    Delta,
    /// Part of a full copy of the sender's table, which replaces the receiver's whole table
    /// once its last part arrives.
    Snapshot { last: bool },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub kind: BatchKind,
    /// The sender's monotonic clock when it read these flows: their `last_seen_ns` are
    /// readings of the same clock.
    pub sender_clock_ns: u64,
    pub ended: Vec<FlowKey>,
    pub changed: Vec<PortableFlow>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error(
        "a batch failed authentication: the hosts' flow_sync secrets differ, or someone else is sending"
    )]
    BadSignature,
    #[error("a batch of {0} bytes is longer than {MAX_BATCH_LEN}")]
    TooLong(usize),
    #[error("a malformed batch: {0}")]
    Malformed(&'static str),
}

/// Signs or checks the frames of one connection, counting them.
pub struct Signer {
    mac: Hmac<Sha256>,
    next_frame: u64,
}

impl Signer {
    /// The signer of one connection's frames going `direction`.
    pub fn new(secret: &[u8], challenge: &Challenge, direction: Direction) -> Signer {
        // HMAC takes a key of any length.
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts any key length");
        mac.update(challenge);
        if direction == Direction::ToMaster {
            mac.update(b"to-master");
        }
        Signer { mac, next_frame: 0 }
    }

    /// The next frame's tag over `batch`.
    pub fn sign(&mut self, batch: &[u8]) -> [u8; TAG_LEN] {
        self.next_mac(batch).finalize().into_bytes().into()
    }

    /// Checks the next frame's tag over `batch`, in constant time.
    pub fn verify(&mut self, batch: &[u8], tag: &[u8]) -> Result<(), WireError> {
        self.next_mac(batch)
            .verify_slice(tag)
            .map_err(|_| WireError::BadSignature)
    }

    fn next_mac(&mut self, batch: &[u8]) -> Hmac<Sha256> {
        let mut mac = self.mac.clone();
        mac.update(&self.next_frame.to_be_bytes());
        mac.update(batch);
        self.next_frame += 1;
        mac
    }
}

impl Batch {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            HEADER_LEN + 8 + self.ended.len() * KEY_LEN + self.changed.len() * FLOW_LEN,
        );
        out.push(match self.kind {
            BatchKind::Delta => 0,
            BatchKind::Snapshot { last: false } => 1,
            BatchKind::Snapshot { last: true } => 2,
        });
        out.extend_from_slice(&self.sender_clock_ns.to_be_bytes());
        out.extend_from_slice(&(self.ended.len() as u32).to_be_bytes());
        for key in &self.ended {
            encode_key(key, &mut out);
        }
        out.extend_from_slice(&(self.changed.len() as u32).to_be_bytes());
        for flow in &self.changed {
            encode_key(&flow.key, &mut out);
            let (addr, family) = match flow.backend.ip() {
                IpAddr::V4(ip) => {
                    let mut addr = [0; 16];
                    addr[..4].copy_from_slice(&ip.octets());
                    (addr, FAMILY_IPV4)
                }
                IpAddr::V6(ip) => (ip.octets(), FAMILY_IPV6),
            };
            out.extend_from_slice(&addr);
            out.extend_from_slice(&flow.backend.port().to_be_bytes());
            out.push(family);
            out.extend_from_slice(&flow.nat_port_be.to_ne_bytes());
            out.extend_from_slice(&flow.hash.to_be_bytes());
            out.push(flow.flags);
            out.extend_from_slice(&flow.last_seen_ns.to_be_bytes());
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Batch, WireError> {
        let mut reader = Reader(bytes);
        let kind = match reader.u8()? {
            0 => BatchKind::Delta,
            1 => BatchKind::Snapshot { last: false },
            2 => BatchKind::Snapshot { last: true },
            _ => return Err(WireError::Malformed("unknown kind")),
        };
        let sender_clock_ns = reader.u64()?;
        let ended_count = reader.count(KEY_LEN)?;
        let ended = (0..ended_count)
            .map(|_| reader.key())
            .collect::<Result<_, _>>()?;
        let changed_count = reader.count(FLOW_LEN)?;
        let changed = (0..changed_count)
            .map(|_| reader.flow())
            .collect::<Result<_, _>>()?;
        if !reader.0.is_empty() {
            return Err(WireError::Malformed("bytes after the last flow"));
        }
        Ok(Batch {
            kind,
            sender_clock_ns,
            ended,
            changed,
        })
    }
}

fn encode_key(key: &FlowKey, out: &mut Vec<u8>) {
    out.extend_from_slice(&key.src_addr);
    out.extend_from_slice(&key.dst_addr);
    out.extend_from_slice(&key.src_port_be.to_ne_bytes());
    out.extend_from_slice(&key.dst_port_be.to_ne_bytes());
    out.extend_from_slice(&[key.proto, key.family]);
}

/// Reads a batch front to back; every read fails rather than run past the end.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let (head, rest) = self
            .0
            .split_first_chunk::<N>()
            .ok_or(WireError::Malformed("cut short"))?;
        self.0 = rest;
        Ok(*head)
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take::<1>()?[0])
    }

    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.take()?))
    }

    /// A count of items of `item_len` bytes, checked against what is left, so a forged count
    /// allocates nothing.
    fn count(&mut self, item_len: usize) -> Result<usize, WireError> {
        let count = u32::from_be_bytes(self.take()?) as usize;
        if count.saturating_mul(item_len) > self.0.len() {
            return Err(WireError::Malformed("a count beyond the batch's end"));
        }
        Ok(count)
    }

    fn key(&mut self) -> Result<FlowKey, WireError> {
        let src_addr = self.take()?;
        let dst_addr = self.take()?;
        let src_port_be = u16::from_ne_bytes(self.take()?);
        let dst_port_be = u16::from_ne_bytes(self.take()?);
        let [proto, family] = self.take()?;
        if family != FAMILY_IPV4 && family != FAMILY_IPV6 {
            return Err(WireError::Malformed("a key of no address family"));
        }
        Ok(FlowKey {
            src_addr,
            dst_addr,
            src_port_be,
            dst_port_be,
            proto,
            family,
            _pad: [0; 2],
        })
    }

    fn flow(&mut self) -> Result<PortableFlow, WireError> {
        let key = self.key()?;
        let addr: [u8; 16] = self.take()?;
        let port = u16::from_be_bytes(self.take()?);
        let ip = match self.u8()? {
            FAMILY_IPV4 => IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3])),
            FAMILY_IPV6 => IpAddr::V6(Ipv6Addr::from(addr)),
            _ => return Err(WireError::Malformed("a backend of no address family")),
        };
        Ok(PortableFlow {
            key,
            backend: SocketAddr::new(ip, port),
            nat_port_be: u16::from_ne_bytes(self.take()?),
            hash: u32::from_be_bytes(self.take()?),
            flags: self.u8()?,
            last_seen_ns: self.u64()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn sample() -> Batch {
        let v6 = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 0x21);
        Batch {
            kind: BatchKind::Snapshot { last: true },
            sender_clock_ns: 123_456_789,
            ended: vec![FlowKey::from_v4(
                [10, 0, 0, 2],
                [10, 0, 1, 10],
                40_001,
                9944,
                6,
            )],
            changed: vec![
                PortableFlow {
                    key: FlowKey::from_v4([10, 0, 0, 2], [10, 0, 1, 10], 40_000, 9944, 6),
                    backend: SocketAddr::from((Ipv4Addr::new(10, 0, 10, 21), 9944)),
                    nat_port_be: 25_000u16.to_be(),
                    hash: 0xdead_beef,
                    flags: 1,
                    last_seen_ns: 100_000_000,
                },
                PortableFlow {
                    key: FlowKey::from_v6([1; 16], [2; 16], 5555, 9944, 17),
                    backend: SocketAddr::new(v6.into(), 9944),
                    nat_port_be: 0,
                    hash: 42,
                    flags: 0,
                    last_seen_ns: 5,
                },
            ],
        }
    }

    #[test]
    fn batch_decodes_to_what_was_encoded() {
        let batch = sample();
        assert_eq!(Batch::decode(&batch.encode()), Ok(batch));
    }

    #[test]
    fn truncated_or_padded_batch_is_malformed() {
        let bytes = sample().encode();
        for cut in [0, 1, 9, 13, bytes.len() - 1] {
            assert!(
                matches!(Batch::decode(&bytes[..cut]), Err(WireError::Malformed(_))),
                "cut at {cut}"
            );
        }
        let mut padded = bytes;
        padded.push(0);
        assert_eq!(
            Batch::decode(&padded),
            Err(WireError::Malformed("bytes after the last flow"))
        );
    }

    #[test]
    fn frames_verify_only_in_order_under_the_same_secret_and_challenge() {
        let challenge = [7; CHALLENGE_LEN];
        let (first, second) = (b"first batch".as_slice(), b"second batch".as_slice());
        let mut sender = Signer::new(SECRET, &challenge, Direction::ToBackup);
        let tags = [sender.sign(first), sender.sign(second)];

        let mut receiver = Signer::new(SECRET, &challenge, Direction::ToBackup);
        assert_eq!(receiver.verify(first, &tags[0]), Ok(()));
        assert_eq!(receiver.verify(second, &tags[1]), Ok(()));

        // Replayed out of order, on another connection, under another secret, altered, or sent
        // back the other way.
        let mut receiver = Signer::new(SECRET, &challenge, Direction::ToBackup);
        assert_eq!(
            receiver.verify(second, &tags[1]),
            Err(WireError::BadSignature)
        );
        let mut other_connection = Signer::new(SECRET, &[8; CHALLENGE_LEN], Direction::ToBackup);
        assert_eq!(
            other_connection.verify(first, &tags[0]),
            Err(WireError::BadSignature)
        );
        let mut other_secret = Signer::new(
            b"another secret, also 32 bytes!!!",
            &challenge,
            Direction::ToBackup,
        );
        assert_eq!(
            other_secret.verify(first, &tags[0]),
            Err(WireError::BadSignature)
        );
        let mut receiver = Signer::new(SECRET, &challenge, Direction::ToBackup);
        assert_eq!(
            receiver.verify(b"first batcH", &tags[0]),
            Err(WireError::BadSignature)
        );
        let mut reflected = Signer::new(SECRET, &challenge, Direction::ToMaster);
        assert_eq!(
            reflected.verify(first, &tags[0]),
            Err(WireError::BadSignature)
        );
    }

    #[test]
    fn handover_messages_decode_to_what_was_encoded() {
        for message in [
            Message::Handover {
                drain: Duration::from_millis(12_345),
            },
            Message::HandoverReady,
            Message::Batch(sample()),
        ] {
            assert_eq!(Message::decode(&message.encode()), Ok(message));
        }
        assert_eq!(
            Message::decode(&[KIND_HANDOVER, 0, 0]),
            Err(WireError::Malformed("a handover of the wrong length"))
        );
    }
}
