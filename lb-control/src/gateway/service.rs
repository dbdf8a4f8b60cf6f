//! The HTTP transport: one HTTP request through the [`Pipeline`]'s stages, framed as HTTP.
//! POST only (or a WebSocket upgrade, which takes the same key check, then goes to
//! [`websocket`](super::websocket)); the body is read up to `max_body_bytes`; a refusal is
//! answered with the pipeline's JSON-RPC error and the HTTP status that goes with it.
//!
//! Nothing reaches a node before the key is known good: the body of an unauthenticated request
//! is only drained (at most [`UNAUTHENTICATED_BODY_DRAIN`] bytes), never parsed.
//!
//! One request needs no key: `GET /health` (or `HEAD`), for a DNS provider's or load
//! balancer's health monitor: 200 while some node is up to serve, 503 when none is, with a
//! small JSON body.

use std::{net::IpAddr, sync::Arc};

use http_body_util::{BodyExt, Full, Limited};
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{self, HeaderValue},
};

use super::{
    jsonrpc,
    pipeline::{Pipeline, Rejection},
    server::ConnectionHold,
    stages::auth::find_key,
    websocket,
};

/// Where a health monitor asks whether this gateway can serve.
pub const HEALTH_PATH: &str = "/health";

/// How much of an unauthenticated request's body is read (and dropped) before the 401.
pub const UNAUTHENTICATED_BODY_DRAIN: usize = 64 * 1024;

/// Answers one HTTP request: key check, body, parse, rate limit, then the pipeline's answer.
pub async fn handle(
    pipeline: &Arc<Pipeline>,
    request: Request<Incoming>,
    client: IpAddr,
    hold: ConnectionHold,
) -> Response<Full<Bytes>> {
    if request.uri().path() == HEALTH_PATH
        && matches!(*request.method(), Method::GET | Method::HEAD)
    {
        return health(pipeline);
    }
    let upgrade = hyper_tungstenite::is_upgrade_request(&request);
    if request.method() != Method::POST && !upgrade {
        return refused(pipeline, &Rejection::MethodNotAllowed, client);
    }
    let secret = find_key(request.uri(), request.headers()).map(str::to_owned);
    let (key, digest) = match pipeline.check_key(secret.as_deref()) {
        Ok(checked) => checked,
        Err(rejection) => {
            // Read (and drop) what the client already sent: answering an HTTP/2 request
            // before its body ends resets the stream, and curl and others then report a
            // framing error instead of the 401. Bounded, never parsed, never forwarded.
            // Before the refusal is counted: a count that blocks the source drops its
            // packets in XDP at once, and a body still on its way would never arrive.
            let _ = Limited::new(request.into_body(), UNAUTHENTICATED_BODY_DRAIN)
                .collect()
                .await;
            return refused(pipeline, &rejection, client);
        }
    };
    if upgrade {
        return websocket::accept(pipeline.clone(), request, client, digest, key, hold).await;
    }
    let bytes = match Limited::new(request.into_body(), pipeline.limits.max_body_bytes)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => {
            return refused(pipeline, &Rejection::BodyTooBig, client);
        }
        Err(error) => {
            return refused(
                pipeline,
                &Rejection::BodyUnreadable(error.to_string()),
                client,
            );
        }
    };
    let body = match pipeline.parse(&bytes) {
        Ok(body) => body,
        Err(rejection) => return refused(pipeline, &rejection, client),
    };
    if let Err(rejection) = pipeline.limit_rate(&key, &body) {
        return refused(pipeline, &rejection, client);
    }
    rpc_response(
        StatusCode::OK,
        pipeline.answer_body(body, client).await.into_bytes(),
    )
}

/// `GET /health`: 200 `{"status":"ok","nodes":N}` while N > 0 healthy nodes take clients,
/// else 503 `{"status":"unavailable","nodes":0}` (the "least bad" nodes a service keeps while
/// none is healthy do not count: a monitor should steer clients to another site then).
fn health(pipeline: &Pipeline) -> Response<Full<Bytes>> {
    let nodes = pipeline.upstream.healthy_nodes();
    let (status, word) = if nodes > 0 {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
    };
    let body = serde_json::json!({ "status": word, "nodes": nodes }).to_string();
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The HTTP answer to a refusal: the pipeline's JSON-RPC error (to id `null`) with the status
/// and headers HTTP gives it.
pub fn refused(
    pipeline: &Pipeline,
    rejection: &Rejection,
    client: IpAddr,
) -> Response<Full<Bytes>> {
    let error = pipeline.refuse(rejection, client);
    let status = match rejection {
        Rejection::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        Rejection::NoNode(_) | Rejection::NodeFull(_) | Rejection::NodeBusy { .. } => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        Rejection::Key(_) => StatusCode::UNAUTHORIZED,
        Rejection::BodyTooBig => StatusCode::PAYLOAD_TOO_LARGE,
        Rejection::BodyUnreadable(_) | Rejection::Handshake(_) => StatusCode::BAD_REQUEST,
        // JSON-RPC's own error, as a node answers it.
        Rejection::Parse(_) => StatusCode::OK,
        Rejection::RateLimited(_)
        | Rejection::KeyConnectionLimit(_)
        | Rejection::SubscriptionLimit
        | Rejection::KeySubscriptionLimit(_) => StatusCode::TOO_MANY_REQUESTS,
    };
    let mut response = rpc_response(status, jsonrpc::error_body(&error));
    match rejection {
        Rejection::MethodNotAllowed => {
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST"));
        }
        Rejection::RateLimited(limited) => {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(limited.retry_after_secs()),
            );
        }
        _ => {}
    }
    response
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
