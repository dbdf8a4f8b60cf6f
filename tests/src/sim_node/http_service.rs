//! The HTTP layer in front of jsonrpsee, one instance per connection: it tags every response
//! with the node's id (`x-sim-node`) and serves `GET /health` and `GET /health/readiness`
//! the way Substrate's `NodeHealthProxyLayer` does: by calling `system_health` through the
//! JSON-RPC stack (so faults and request counts apply) and translating the answer.

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{ACCEPT, CONTENT_TYPE, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri};
use jsonrpsee::core::BoxError;
use jsonrpsee::server::HttpBody;
use serde::Deserialize;
use tower::Service;

use std::sync::Arc;

use super::state::{Health, OpenConnection};

/// The response header naming the node that answered.
pub const NODE_ID_HEADER: HeaderName = HeaderName::from_static("x-sim-node");

const SYSTEM_HEALTH_CALL: &str = r#"{"jsonrpc":"2.0","method":"system_health","id":0}"#;
const JSON: HeaderValue = HeaderValue::from_static("application/json; charset=utf-8");

/// What a request is, for the health proxy.
enum HealthEndpoint {
    /// Not a health endpoint: JSON-RPC over HTTP or a WebSocket upgrade.
    None,
    Health,
    Readiness,
    /// A health path with a method other than GET.
    WrongMethod,
}

impl HealthEndpoint {
    fn of<B>(request: &Request<B>) -> Self {
        let is_get = request.method() == Method::GET;
        match request.uri().path() {
            "/health" if is_get => Self::Health,
            "/health/readiness" if is_get => Self::Readiness,
            "/health" | "/health/readiness" => Self::WrongMethod,
            _ => Self::None,
        }
    }
}

/// Serves one HTTP request with `rpc`, the connection's jsonrpsee service; an accepted
/// WebSocket upgrade marks `connection` as a WebSocket.
pub async fn serve_request<S>(
    mut rpc: S,
    node_id: HeaderValue,
    connection: Arc<OpenConnection>,
    request: Request<Incoming>,
) -> Result<Response<HttpBody>, BoxError>
where
    S: Service<Request<HttpBody>, Response = Response<HttpBody>, Error = BoxError>,
{
    let endpoint = HealthEndpoint::of(&request);
    let mut response = match endpoint {
        HealthEndpoint::None => rpc.call(request.map(HttpBody::new)).await?,
        HealthEndpoint::WrongMethod => {
            status_response(StatusCode::METHOD_NOT_ALLOWED, HttpBody::empty())
        }
        HealthEndpoint::Health | HealthEndpoint::Readiness => {
            let (mut parts, _) = request.into_parts();
            parts.method = Method::POST;
            parts.uri = Uri::from_static("/");
            parts.headers.insert(CONTENT_TYPE, JSON);
            parts.headers.insert(ACCEPT, JSON);
            let rpc_response = rpc
                .call(Request::from_parts(
                    parts,
                    HttpBody::from(SYSTEM_HEALTH_CALL),
                ))
                .await?;
            match (endpoint, read_health(rpc_response).await) {
                (_, None) => status_response(StatusCode::INTERNAL_SERVER_ERROR, HttpBody::empty()),
                (HealthEndpoint::Health, Some(health)) => {
                    let body = serde_json::to_string(&health)?;
                    let mut response = status_response(StatusCode::OK, HttpBody::from(body));
                    response.headers_mut().insert(CONTENT_TYPE, JSON);
                    response
                }
                (_, Some(health)) if is_ready(&health) => {
                    status_response(StatusCode::OK, HttpBody::empty())
                }
                (_, Some(_)) => {
                    status_response(StatusCode::INTERNAL_SERVER_ERROR, HttpBody::empty())
                }
            }
        }
    };
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        connection.upgraded();
    }
    response.headers_mut().insert(NODE_ID_HEADER, node_id);
    Ok(response)
}

/// Substrate's readiness rule, kept verbatim: a node that should not have peers is ready even
/// while syncing.
fn is_ready(health: &Health) -> bool {
    (!health.is_syncing && health.peers > 0) || !health.should_have_peers
}

#[derive(Deserialize)]
struct HealthResponse {
    result: Health,
}

async fn read_health(response: Response<HttpBody>) -> Option<Health> {
    let body = response.into_body().collect().await.ok()?.to_bytes();
    let HealthResponse { result } = serde_json::from_slice(&body).ok()?;
    Some(result)
}

fn status_response(status: StatusCode, body: HttpBody) -> Response<HttpBody> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response
}
