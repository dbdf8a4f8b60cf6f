//! The gateway over real TLS and real sockets on 127.0.0.1, in front of in-process sim-nodes:
//! API keys in every position, refusals that never reach a node, rate limits, the method
//! policy, batches, body limits, stickiness to the node the shared Maglev table predicts,
//! failover of reads, HTTP/2 and HTTP/1.1, and a certificate reload.
//!
//! - [`head`]: a lagging node never makes a client's view go backwards.
//! - [`http`]: JSON-RPC over HTTPS.
//! - [`websocket`]: JSON-RPC over `wss://`, shared head subscriptions, node exits.
//! - [`upstream_pool`]: many WebSocket clients over the nodes' few shared connections.
//! - [`papi`]: polkadot-api (Node.js) over `wss://` beside a hundred clients on one node
//!   connection; [`subxt`]: subxt (Rust) the same way; [`shared_upstream`]: what both share.
//! - [`remote`]: another site's gateway as the upstream of a gateway with no node of its own.
//! - [`setup`]: the sim-nodes, the gateway and the clients the tests share.

mod head;
mod http;
mod papi;
mod remote;
mod setup;
mod shared_upstream;
mod subxt;
mod upstream_pool;
mod websocket;
