//! lb-control: the load balancer's daemon and CLI.
//!
//! - [`config`]: the TOML configuration, validated.
//! - [`dataplane`]: the XDP program and its maps (the only module that touches aya).
//! - [`netns`]: entering a named network namespace.
//! - [`store`]: the persistent state (services, backends, API keys, events) in SQLite.

pub mod backends;
pub mod config;
pub mod dataplane;
pub mod metrics;
pub mod netns;
pub mod store;
