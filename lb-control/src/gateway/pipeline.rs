//! The request pipeline both transports share: the stages ([`stages`](super::stages)) in their
//! order, the answer of each call, and the one mapping of a refusal to the client's JSON-RPC
//! error and its metric ([`Pipeline::refuse`]).
//!
//! A request: key check → parse → rate limit → per call: method policy →
//! [`Pipeline::resolve`] (response cache, else a node) → answers in the order of the calls,
//! each with the client's id. The HTTP service ([`service`](super::service)) and the WebSocket
//! sessions ([`websocket`](super::websocket)) run these and adapt only the framing: HTTP
//! statuses and headers; WebSocket ids, close codes, and the calls a session serves itself
//! (shared head subscriptions) or hands to its node.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use futures_util::future::join_all;
use serde_json::value::RawValue;
use tracing::warn;

use super::{
    block::FailureTracker,
    clients::NodeClients,
    jsonrpc::{self, Body, Call, Entry, Outcome, RpcError, code},
    links::{Links, QueueBudget},
    metrics::{AuthFailureLabels, CacheLabels, CallLabels, GatewayMetrics, UpstreamLabels},
    slots::Slots,
    stages::{
        auth::{AuthError, Authenticator},
        parse,
        policy::MethodPolicy,
        rate_limit::{RateLimited, RateLimits},
    },
    upstream::{Upstream, UpstreamError},
    websocket::WebSocketLimits,
};
use crate::{
    cache::{CachePolicy, FetchError, Lookup, NodeFeeds, ResponseCache, classify_by_rule},
    keys::LiveKey,
    methods::{self, Method},
    model::ApiKeyId,
};

/// The request limits the pipeline enforces.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    pub max_body_bytes: usize,
    pub max_batch: usize,
}

pub struct Pipeline {
    pub auth: Arc<Authenticator>,
    /// Counts auth failures per source address when blocking is on.
    pub failures: Option<FailureTracker>,
    pub rates: RateLimits,
    pub policy: MethodPolicy,
    pub upstream: Arc<Upstream>,
    pub cache: ResponseCache,
    pub metrics: Arc<GatewayMetrics>,
    pub limits: BodyLimits,
    pub websocket: WebSocketLimits,
    /// Open WebSocket connections per key.
    pub key_connections: Arc<Slots<ApiKeyId>>,
    /// Subscriptions on the nodes per key.
    pub key_subscriptions: Arc<Slots<ApiKeyId>>,
    /// WebSocket clients per node.
    pub clients: Arc<NodeClients>,
    /// The nodes' shared WebSocket connections.
    pub links: Arc<Links>,
    /// What WebSocket clients may leave unread.
    pub queue_budget: Arc<QueueBudget>,
    /// Each node's latest heads and runtime version, which WebSocket clients' subscriptions
    /// share.
    pub feeds: NodeFeeds,
}

/// Why the gateway turned a request, a WebSocket connection or a subscription away.
#[derive(Debug)]
pub enum Rejection {
    /// HTTP: neither a POST nor a WebSocket upgrade.
    MethodNotAllowed,
    /// Key check: no key, a malformed, unknown or revoked one.
    Key(AuthError),
    /// HTTP: a body over `max_body_bytes`.
    BodyTooBig,
    /// HTTP: the body could not be read.
    BodyUnreadable(String),
    /// Parse: the body as a whole is not JSON-RPC (not JSON, an empty or too long batch).
    Parse(RpcError),
    /// Rate limit: over the key's rate.
    RateLimited(RateLimited),
    /// WebSocket: the key has as many connections open as it may (its own cap, else
    /// `max_connections_per_key`).
    KeyConnectionLimit(u32),
    /// WebSocket: no node took the client's connection.
    NoNode(UpstreamError),
    /// WebSocket: the upgrade handshake failed.
    Handshake(String),
    /// WebSocket: the connection has `max_subscriptions_per_connection` open.
    SubscriptionLimit,
    /// WebSocket: the key holds as many subscriptions on the nodes as it may (its own cap,
    /// else `max_subscriptions_per_key`).
    KeySubscriptionLimit(u32),
    /// WebSocket: every upstream connection of the client's node holds as many subscriptions
    /// as it may, and the pool may not grow.
    NodeFull(SocketAddr),
    /// A call: its node had `max_upstream_http_calls_per_node` in flight for
    /// `upstream_queue_timeout` (and so had the next node, for a read).
    NodeBusy { node: SocketAddr, in_flight: u32 },
}

impl Pipeline {
    /// Key check of a new request (an HTTP call, a WebSocket upgrade), with the key as
    /// [`find_key`](super::stages::auth::find_key) found it: the live key and its digest.
    pub fn check_key(&self, secret: Option<&str>) -> Result<(Arc<LiveKey>, [u8; 32]), Rejection> {
        self.auth.check(secret).map_err(Rejection::Key)
    }

    /// Parse of a body (an HTTP body, a WebSocket message).
    pub fn parse(&self, bytes: &[u8]) -> Result<Body, Rejection> {
        parse::parse_body(bytes, self.limits.max_batch).map_err(Rejection::Parse)
    }

    /// Rate limit: takes `body`'s calls from `key`'s allowance.
    pub fn limit_rate(&self, key: &LiveKey, body: &Body) -> Result<(), Rejection> {
        self.rates.admit(key, body).map_err(Rejection::RateLimited)
    }

    /// Counts `rejection` (its metric; a bad key also toward blocking `client`) and makes the
    /// JSON-RPC error the client gets: the one place that maps a refusal to both.
    pub fn refuse(&self, rejection: &Rejection, client: IpAddr) -> RpcError {
        match rejection {
            Rejection::MethodNotAllowed => {
                self.metrics.rejected("method_not_allowed");
                RpcError::invalid_request("JSON-RPC over HTTP takes POST (or a WebSocket upgrade)")
            }
            Rejection::Key(error) => {
                self.metrics
                    .auth_failures
                    .get_or_create(&AuthFailureLabels {
                        reason: error.reason().to_owned(),
                    })
                    .inc();
                if let Some(failures) = &self.failures
                    && failures.record(client)
                {
                    warn!(%client, "repeated auth failures: blocking the address (IPv6: its prefix)");
                    self.metrics.rejected("auth_failures_blocked");
                }
                RpcError::unauthorized(&error.to_string())
            }
            Rejection::BodyTooBig => {
                self.metrics.rejected("body_too_big");
                RpcError::request_too_big(self.limits.max_body_bytes)
            }
            Rejection::BodyUnreadable(detail) => {
                RpcError::parse_error(format!("reading the body: {detail}"))
            }
            Rejection::Parse(error) => {
                self.metrics.rejected(match error.code {
                    code::BATCH_TOO_BIG => "batch_too_big",
                    code::PARSE_ERROR => "parse_error",
                    _ => "invalid_request",
                });
                error.clone()
            }
            Rejection::RateLimited(limited) => {
                self.metrics.rate_limited.inc();
                RpcError::rate_limited(limited.retry_after_secs())
            }
            Rejection::KeyConnectionLimit(cap) => {
                self.metrics.rejected("key_connection_limit");
                RpcError::too_many_connections(*cap)
            }
            Rejection::NoNode(error) => {
                warn!(%client, "WebSocket client refused: {error}");
                self.metrics.rejected("no_node");
                RpcError::upstream_unavailable(error)
            }
            Rejection::Handshake(detail) => {
                RpcError::invalid_request(&format!("WebSocket handshake: {detail}"))
            }
            Rejection::SubscriptionLimit => {
                self.metrics.rejected("subscription_limit");
                RpcError::too_many_subscriptions(self.websocket.max_subscriptions_per_connection)
            }
            Rejection::KeySubscriptionLimit(cap) => {
                self.metrics.rejected("key_subscription_limit");
                RpcError::too_many_key_subscriptions(*cap)
            }
            Rejection::NodeFull(node) => {
                warn!(%client, %node, "a subscription refused: the node's connections are full");
                self.metrics.rejected("node_full");
                RpcError::node_full(*node)
            }
            Rejection::NodeBusy { node, in_flight } => {
                self.metrics
                    .upstream_busy
                    .get_or_create(&UpstreamLabels {
                        node: node.to_string(),
                    })
                    .inc();
                RpcError::upstream_busy(*node, *in_flight)
            }
        }
    }

    /// The answer to a parsed body that passed the key and rate checks, each call through the
    /// method policy, then [`Pipeline::resolve`]: empty when it held only notifications.
    pub async fn answer_body(&self, body: Body, client: IpAddr) -> String {
        let answer = match &body {
            // The common case without join_all's vector of futures (measurable on cache hits).
            Body::Single(entry) => self.answer_entry(entry, client).await,
            Body::Batch(entries) => {
                let answers: Vec<String> =
                    join_all(entries.iter().map(|entry| self.answer_entry(entry, client)))
                        .await
                        .into_iter()
                        .flatten()
                        .collect();
                (!answers.is_empty()).then(|| jsonrpc::batch_body(&answers))
            }
        };
        // None: only notifications, nothing to answer.
        answer.unwrap_or_default()
    }

    /// May the response cache answer `call` of `method` (now or once fetched)?
    pub fn is_cacheable(&self, call: &Call, method: &Method) -> bool {
        classify_by_rule(method.cache, &params_of(call), self.cache.finalized())
            != CachePolicy::Never
    }

    /// The answer to one entry; None for a notification.
    async fn answer_entry(&self, entry: &Entry, client: IpAddr) -> Option<String> {
        let call = match entry {
            Entry::Invalid { id, error } => {
                self.count("invalid", "invalid");
                return Some(jsonrpc::answer(
                    id.as_deref(),
                    &Outcome::from(error.clone()),
                ));
            }
            Entry::Call(call) => call,
        };
        // Notifications are not forwarded: no Substrate method acts on one, and it gets no
        // answer.
        let id = call.id.as_deref()?;
        // The one lookup of the method table for this call.
        let method = methods::lookup(&call.method);
        let (outcome, label) = match self.policy.refusal_of(call, method) {
            Some(refusal) => (Outcome::from(refusal), "refused"),
            None => self.resolve(call, method, client).await,
        };
        self.count(method.class.name(), label);
        Some(jsonrpc::answer(Some(id), &outcome))
    }

    /// Where a call that passed every check gets its outcome: from the response cache when the
    /// chain allows, else from a node (one upstream call for identical calls in flight). The
    /// client's id is put back by the caller.
    async fn resolve(
        &self,
        call: &Call,
        method: &Method,
        client: IpAddr,
    ) -> (Outcome, &'static str) {
        let params = params_of(call);
        let policy = classify_by_rule(method.cache, &params, self.cache.finalized());
        let fetch = || async {
            // An answer that depends on the head comes from a node at the cluster's head, so a
            // lagging node never puts an older answer in the cache (or before a client that
            // saw a newer one). Looked up on a miss only: a hit needs no node.
            let head = (policy == CachePolicy::UntilNewHead)
                .then(|| self.cache.head_number())
                .flatten();
            let at_head = |node| {
                head.is_none_or(|head| {
                    self.feeds
                        .best_number(node)
                        .is_some_and(|best| best >= head)
                })
            };
            self.upstream
                .call(client, &call.method, call.params.as_deref(), at_head)
                .await
                .map_err(|error| match error {
                    UpstreamError::Busy { node, in_flight } => FetchError::Busy { node, in_flight },
                    error => FetchError::Unreachable(error.to_string()),
                })
        };
        let answer = self
            .cache
            .get_or_fetch(&call.method, &params, policy, fetch)
            .await;
        self.metrics
            .cache_bytes
            .set(self.cache.weighted_size() as i64);
        self.metrics
            .cache_entries
            .set(self.cache.entry_count() as i64);
        match answer {
            Ok((result, lookup)) => {
                let looked_up = match (policy, lookup) {
                    (CachePolicy::Never, _) => "uncacheable",
                    (_, Lookup::Hit) => "hit",
                    (_, Lookup::Miss) => "miss",
                    (_, Lookup::Coalesced) => "coalesced",
                };
                self.metrics
                    .cache_lookups
                    .get_or_create(&CacheLabels { result: looked_up })
                    .inc();
                // A copy of the bytes, not a re-parse (metadata answers run to megabytes).
                (Outcome::Result(RawValue::to_owned(&result)), "ok")
            }
            Err(FetchError::Rpc(error)) => (Outcome::Error(RawValue::to_owned(&error)), "error"),
            // Every caller sharing the call hears it: each is counted.
            Err(FetchError::Busy { node, in_flight }) => (
                Outcome::from(self.refuse(&Rejection::NodeBusy { node, in_flight }, client)),
                "busy",
            ),
            Err(error) => {
                warn!(method = %call.method, "{error}");
                (
                    Outcome::from(RpcError::upstream_unavailable(&error)),
                    "upstream_failed",
                )
            }
        }
    }

    /// Counts a call by its method class and what became of it.
    pub fn count(&self, class: &'static str, outcome: &'static str) {
        self.metrics
            .calls
            .get_or_create(&CallLabels { class, outcome })
            .inc();
    }
}

/// A call's params as a JSON value (none: an empty array), for the cache's policy and key.
fn params_of(call: &Call) -> serde_json::Value {
    match call.params.as_deref() {
        Some(params) => serde_json::from_str(params.get()).unwrap_or_default(),
        None => serde_json::Value::Array(Vec::new()),
    }
}
