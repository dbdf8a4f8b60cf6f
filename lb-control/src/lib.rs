//! lb-control: the load balancer's daemon and CLI.
//!
//! - [`cache`]: the gateway's Substrate-aware response cache and the chain follower feeding it.
//! - [`config`]: the TOML configuration, validated.
//! - [`dataplane`]: the XDP program and its maps (the only module that touches aya).
//! - [`netns`]: entering a named network namespace.

pub mod backends;
pub mod cache;
pub mod config;
pub mod dataplane;
pub mod metrics;
pub mod netns;
