//! Test support for the load balancer: the network-namespace lab and sim-node.
//!
//! - [`lab`] builds throwaway hosts (network namespaces joined by veth pairs) for tests and for
//!   `cargo xtask run`.
//! - [`sim_node`] is a fast simulated Polkadot node, also built as the `sim-node` binary.

pub mod lab;
pub mod sim_node;
