//! One HTTP request through the gateway: API key → body (size limit) → JSON-RPC parse (batch
//! limit) → rate limit → per call: method policy → [`Pipeline::resolve`] (response cache, else
//! a node) → answers in the order of the calls, each with the client's id. A WebSocket
//! upgrade takes the same key check, then goes to [`websocket`](super::websocket).
//!
//! Nothing reaches a node before the key is known good: the body of an unauthenticated request
//! is only drained (at most [`UNAUTHENTICATED_BODY_DRAIN`] bytes), never parsed.

use std::{net::IpAddr, sync::Arc};

use futures_util::future::join_all;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{self, HeaderValue},
};
use serde_json::value::RawValue;
use tracing::warn;

use super::{
    auth::{AuthError, Authenticator, find_key},
    block::FailureTracker,
    jsonrpc::{self, Body, Call, Entry, Outcome, RpcError},
    metrics::{AuthFailureLabels, CacheLabels, CallLabels, GatewayMetrics},
    policy::MethodPolicy,
    server::ConnectionHold,
    slots::Slots,
    upstream::Upstream,
    websocket::{self, WebSocketLimits},
};
use crate::{
    backends::ApiKeyId,
    cache::{
        CachePolicy, FetchError, Lookup, NodeFeeds, ResponseCache, UpstreamAnswer, classify_by_rule,
    },
    methods,
};

/// How much of an unauthenticated request's body is read (and dropped) before the 401.
pub const UNAUTHENTICATED_BODY_DRAIN: usize = 64 * 1024;

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
    pub policy: MethodPolicy,
    pub upstream: Arc<Upstream>,
    pub cache: ResponseCache,
    pub metrics: Arc<GatewayMetrics>,
    pub limits: BodyLimits,
    pub websocket: WebSocketLimits,
    /// Open WebSocket connections per key.
    pub key_connections: Arc<Slots<ApiKeyId>>,
    /// Each node's latest heads and runtime version, which WebSocket clients' subscriptions
    /// share.
    pub feeds: NodeFeeds,
}

impl Pipeline {
    pub async fn handle(
        self: &Arc<Self>,
        request: Request<Incoming>,
        client: IpAddr,
        hold: ConnectionHold,
    ) -> Response<Full<Bytes>> {
        let upgrade = hyper_tungstenite::is_upgrade_request(&request);
        if request.method() != Method::POST && !upgrade {
            self.metrics.rejected("method_not_allowed");
            let mut response = rpc_response(
                StatusCode::METHOD_NOT_ALLOWED,
                jsonrpc::error_body(&RpcError::invalid_request(
                    "JSON-RPC over HTTP takes POST (or a WebSocket upgrade)",
                )),
            );
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST"));
            return response;
        }
        let secret = find_key(request.uri(), request.headers()).map(str::to_owned);
        let checked = match &secret {
            Some(secret) => self.auth.authenticate(secret).await,
            None => Err(AuthError::Missing),
        };
        let key = match checked {
            Ok(key) => key,
            Err(error) => {
                self.metrics
                    .auth_failures
                    .get_or_create(&AuthFailureLabels {
                        reason: error.reason().to_owned(),
                    })
                    .inc();
                let status = match error {
                    AuthError::Missing | AuthError::Unknown => {
                        if let Some(failures) = &self.failures
                            && failures.record(client)
                        {
                            warn!(%client, "repeated auth failures: blocking the address");
                            self.metrics.rejected("auth_failures_blocked");
                        }
                        StatusCode::UNAUTHORIZED
                    }
                    AuthError::Store(_) => {
                        warn!("{error}");
                        StatusCode::SERVICE_UNAVAILABLE
                    }
                };
                // Read (and drop) what the client already sent: answering an HTTP/2 request
                // before its body ends resets the stream, and curl and others then report a
                // framing error instead of the 401. Bounded, never parsed, never forwarded.
                let _ = Limited::new(request.into_body(), UNAUTHENTICATED_BODY_DRAIN)
                    .collect()
                    .await;
                return rpc_response(
                    status,
                    jsonrpc::error_body(&RpcError::unauthorized(&error.to_string())),
                );
            }
        };
        if upgrade {
            let secret = secret.expect("a key was found");
            return websocket::accept(self.clone(), request, client, secret, key, hold).await;
        }
        let bytes = match Limited::new(request.into_body(), self.limits.max_body_bytes)
            .collect()
            .await
        {
            Ok(body) => body.to_bytes(),
            Err(error) if error.is::<http_body_util::LengthLimitError>() => {
                self.metrics.rejected("body_too_big");
                return rpc_response(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    jsonrpc::error_body(&RpcError::request_too_big(self.limits.max_body_bytes)),
                );
            }
            Err(error) => {
                return rpc_response(
                    StatusCode::BAD_REQUEST,
                    jsonrpc::error_body(&RpcError::parse_error(format!(
                        "reading the body: {error}"
                    ))),
                );
            }
        };
        let body = match jsonrpc::parse_body(&bytes, self.limits.max_batch) {
            Ok(body) => body,
            Err(error) => {
                self.metrics.rejected(match error.code {
                    jsonrpc::code::BATCH_TOO_BIG => "batch_too_big",
                    jsonrpc::code::PARSE_ERROR => "parse_error",
                    _ => "invalid_request",
                });
                return rpc_response(StatusCode::OK, jsonrpc::error_body(&error));
            }
        };
        let calls = u32::try_from(body.entries().len()).unwrap_or(u32::MAX);
        if let Err(limited) = self.auth.admit(&key, calls) {
            self.metrics.rate_limited.inc();
            let seconds = limited.retry_after_secs();
            let mut response = rpc_response(
                StatusCode::TOO_MANY_REQUESTS,
                jsonrpc::error_body(&RpcError::rate_limited(seconds)),
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
            return response;
        }
        rpc_response(StatusCode::OK, self.answer_body(body, client).await)
    }

    /// The answer to a parsed body that passed the key and rate checks: empty when it held
    /// only notifications.
    pub async fn answer_body(&self, body: Body, client: IpAddr) -> Vec<u8> {
        let answer = match &body {
            // The common case without join_all's vector of futures (measurable on cache hits).
            Body::Single(entry) => self
                .answer_entry(entry, client)
                .await
                .map(|answer| answer.get().as_bytes().to_vec()),
            Body::Batch(entries) => {
                let answers: Vec<Box<RawValue>> =
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
    pub fn is_cacheable(&self, call: &Call, method: &methods::Method) -> bool {
        classify_by_rule(method.cache, &params_of(call), self.cache.finalized())
            != CachePolicy::Never
    }

    /// The answer to one entry; None for a notification.
    async fn answer_entry(&self, entry: &Entry, client: IpAddr) -> Option<Box<RawValue>> {
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
        let (outcome, label) = match self.policy.refusal_of(&call.method, method) {
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
        method: &methods::Method,
        client: IpAddr,
    ) -> (Outcome, &'static str) {
        let params = params_of(call);
        let policy = classify_by_rule(method.cache, &params, self.cache.finalized());
        let fetch = || async {
            match self
                .upstream
                .call(client, &call.method, call.params.as_deref())
                .await
            {
                Ok(Outcome::Result(result)) => Ok(UpstreamAnswer::Result(result)),
                Ok(Outcome::Error(error)) => Ok(UpstreamAnswer::Error(error)),
                Err(error) => Err(FetchError::Unreachable(error.to_string())),
            }
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

pub fn rpc_response(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
