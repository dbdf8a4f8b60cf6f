//! lb-control: the load balancer's daemon and CLI.
//!
//! - [`config`]: the TOML configuration, validated.
//! - [`dataplane`]: the XDP program and its maps (the only module that touches aya).
//! - [`health`]: the chain-aware health checker (syncing, peers, lag, stalls, rise/fall).
//! - [`netns`]: entering a named network namespace.

pub mod backends;
pub mod config;
pub mod dataplane;
pub mod health;
pub mod metrics;
pub mod netns;
