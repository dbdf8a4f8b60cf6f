//! lb-control: the load balancer's daemon and CLI.
//!
//! Data flows one way: [`config`] and the admin API change the [`backends`] set, which pushes
//! every change to the [`dataplane`] and publishes a view the health checker and the gateway
//! follow.
//!
//! - [`model`]: the domain vocabulary (services, backends, keys, events); imports nothing of the
//!   crate.
//! - [`config`]: the TOML configuration, validated; [`section`]: what its sections share (each
//!   section lives with the module it configures).
//! - [`backends`]: the backend set and its one change path.
//! - [`dataplane`]: the XDP program and its maps (the only module that touches aya).
//! - [`health`]: the chain-aware health checker (syncing, peers, lag, stalls, rise/fall).
//! - [`metrics`]: the Prometheus metric families.
//! - [`daemon`]: `lb-control run`, wiring the parts together.
//! - [`ha`]: this lb-control's role in an HA pair (master, backup, fault), from keepalived.
//! - [`netns`]: entering a named network namespace.
//! - [`store`]: the persistent state (services, backends, API keys, join tokens, the blocklist,
//!   events).
//! - [`api`]: the admin REST API and `/metrics`; [`admin_client`]: its typed client.
//! - [`keys`]: the gateway's API keys.
//! - [`blocklist`]: the source blocklist, kept in the store, with the kernel map following it.
//! - [`tokens`]: join tokens, the admin API credentials of nodes that register themselves.
//! - [`gateway`]: the JSON-RPC gateway (TLS, API keys, rate limits, method policy, upstream).
//! - [`cache`]: the gateway's Substrate-aware response cache and the chain follower feeding it.
//! - [`upgrade`]: `lb-control upgrade`, a new process taking the listening sockets over from
//!   the running one.
//! - [`methods`]: what the gateway knows of each JSON-RPC method (safety, cache rule,
//!   subscription, retry), one table that the gateway and the cache both read.

pub mod admin_client;
pub mod api;
pub mod backends;
pub mod blocklist;
pub mod cache;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod gateway;
pub mod ha;
pub mod health;
pub mod keys;
pub mod methods;
pub mod metrics;
pub mod model;
pub mod netns;
pub mod section;
pub mod store;
pub mod tokens;
pub mod upgrade;
