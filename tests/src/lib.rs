//! Test support for the load balancer: the network-namespace lab and sim-node.
//!
//! - [`lab`] builds throwaway hosts (network namespaces joined by veth pairs) for tests and for
//!   `cargo xtask run`.
//! - [`sim_node`] is a fast simulated Polkadot node, also built as the `sim-node` binary.
//! - [`rpc_client`] sends JSON-RPC over HTTP/1.1 to sim-nodes and tells which node answered;
//!   [`load`] keeps many such requests going and records each one's outcome;
//!   [`ws_client`] is a JSON-RPC WebSocket client for tests; [`poll`] waits for a condition;
//!   [`js_client`] runs the pinned JavaScript clients (polkadot.js, polkadot-api) from a test;
//!   [`new_spec`] tells from a sim-node's counts whether a client took the new JSON-RPC spec;
//!   [`logs`] shows the end of a process's log.
//! - [`admin_writes`] writes keys and backends through the admin API in a loop and checks
//!   afterwards that every acknowledged write is there (the HA tests and `bench ha`).
//! - [`crowd`] is many WebSocket clients over TLS to the gateway from several addresses (the
//!   `crowd` binary), for the crowd benchmark and its lighter lab tests.
//! - [`bench`] is what the benchmark binaries share (Ctrl-C, load average, report file), with
//!   [`cpu`] (the machine's busy time), [`proc_usage`] (one process's memory and CPU time),
//!   [`prometheus`] (lb-control's metrics read back), [`wrk`] (load from a lab namespace) and
//!   [`nginx`] (a reference server or proxy in a lab namespace).

pub mod admin_writes;
pub mod bench;
pub mod cpu;
pub mod crowd;
pub mod js_client;
pub mod lab;
pub mod load;
pub mod logs;
pub mod new_spec;
pub mod nginx;
pub mod poll;
pub mod proc_usage;
pub mod prometheus;
pub mod rpc_client;
pub mod sim_node;
pub mod wrk;
pub mod ws_client;
pub mod ws_load;
