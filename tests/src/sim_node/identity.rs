//! A node's identity: the `--id` name a test uses, and the libp2p peer id derived from it.

use super::primitives::blake2_256;

/// The libp2p peer id a node with this name reports in `system_localPeerId`: the identity
/// multihash of a protobuf-encoded Ed25519 public key, base58 (so it starts with `12D3KooW`
/// like a real node's). The "public key" is a hash of the name, so it is stable per name.
pub fn local_peer_id(node_id: &str) -> String {
    let public_key = blake2_256(b"sim-node/peer-key", node_id.as_bytes());
    // Multihash identity (0x00) of 36 bytes: protobuf PublicKey { Type = Ed25519 (field 1,
    // value 1), Data (field 2, 32 bytes) }.
    let mut multihash = vec![0x00, 0x24, 0x08, 0x01, 0x12, 0x20];
    multihash.extend_from_slice(&public_key);
    bs58::encode(multihash).into_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_id_looks_like_an_ed25519_libp2p_id_and_differs_per_node() {
        let node0 = local_peer_id("node0");
        assert!(node0.starts_with("12D3KooW"), "{node0}");
        assert_eq!(node0.len(), 52);
        assert_eq!(node0, local_peer_id("node0"));
        assert_ne!(node0, local_peer_id("node1"));
    }
}
