//! lb-control: the load balancer's daemon and CLI.
//!
//! - [`config`]: the TOML configuration, validated.
//! - [`dataplane`]: the XDP program and its maps (the only module that touches aya).
//! - [`netns`]: entering a named network namespace.
//! - [`api`]: the admin REST API and `/metrics`; [`admin_client`]: its typed client.
//! - [`keys`]: the gateway's API keys.

pub mod admin_client;
pub mod api;
pub mod backends;
pub mod config;
pub mod dataplane;
pub mod keys;
pub mod metrics;
pub mod netns;
