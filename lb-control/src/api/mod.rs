//! The admin REST API (axum) and the Prometheus endpoint.
//!
//! Every route is registered through utoipa-axum's `routes!`, which adds the handler to the
//! router and its `#[utoipa::path]` to the OpenAPI document in one step: the document served at
//! `/openapi.json` and the routes cannot disagree.
//!
//! - `/v1/…` (bearer token): services, backends, API keys, join tokens, the blocklist, stats,
//!   health, events, the gateway's nodes, the HA role; a join token reaches only its own
//!   backends (see `auth`);
//! - `/metrics`, `/healthz`, `/openapi.json`: no token.
//!
//! A change answers only after the backend set or the key registry returned, i.e. after the
//! store's durable commit.
//!
//! One module per concern: [`model`] (the wire format), `error` (the error answers), `extract`
//! (body, query and path parsing that names the field at fault), `auth`, `metrics`, and a
//! handler module per resource.

mod auth;
mod backends;
mod blocklist;
mod error;
mod extract;
mod gateway;
mod ha;
mod join;
mod keys;
mod metrics;
pub mod model;
mod services;
mod settings;
mod status;
mod tokens;

use std::{future::Future, net::SocketAddr, path::PathBuf, sync::Arc};

use axum::{
    Extension, Router,
    body::Bytes,
    http::{Method, Uri, header},
    middleware,
    response::IntoResponse,
};
use prometheus_client::registry::Registry;
use tracing::info;
use utoipa::{
    Modify, OpenApi,
    openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme},
};
use utoipa_axum::{router::OpenApiRouter, routes};

pub use self::settings::{
    ADMIN_TOKEN_ENV, AdminSection, DEFAULT_ADMIN_LISTEN, MIN_TOKEN_LEN, generated_token_path,
    read_token,
};
use self::{
    error::{ApiError, ApiResult},
    model::ErrorCode,
};
use crate::{
    backends::BackendSet,
    blocklist::StoredBlocklist,
    gateway::{GatewayState, NodeClients},
    ha::{Ha, handover::Handover},
    keys::ApiKeys,
    metrics::Metrics,
    store::Store,
    tokens::JoinTokens,
};

/// What the admin API serves from. (`AdminState` is the backends' admin state.)
#[derive(Clone)]
pub struct AdminContext {
    pub backends: Arc<BackendSet>,
    pub keys: Arc<ApiKeys>,
    pub tokens: JoinTokens,
    /// The event log.
    pub store: Store,
    /// The control plane's metrics, encoded at `/metrics`.
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    /// The source blocklist: the store's, and this host's kernel map following it.
    pub blocklist: StoredBlocklist,
    /// The instance's pinned maps: the kernel counters.
    pub pin_dir: PathBuf,
    /// The gateway's WebSocket clients per node (none without a gateway: the counts stay 0).
    pub gateway_clients: Arc<NodeClients>,
    /// What the gateway serves from; None without a gateway.
    pub gateway: Option<GatewayState>,
    /// This lb-control's role in its HA pair.
    pub ha: Arc<Ha>,
    /// Its planned handover to the other host.
    pub handover: Arc<Handover>,
    /// The bearer token of the `/v1` routes.
    pub token: String,
}

/// What the handlers share.
struct Shared {
    backends: Arc<BackendSet>,
    keys: Arc<ApiKeys>,
    tokens: JoinTokens,
    store: Store,
    blocklist: StoredBlocklist,
    registry: Arc<Registry>,
    /// Holds only the collector of the kernel counters.
    kernel_registry: Registry,
    pin_dir: PathBuf,
    gateway_clients: Arc<NodeClients>,
    gateway: Option<GatewayState>,
    ha: Arc<Ha>,
    handover: Arc<Handover>,
}

type Context = Arc<Shared>;

/// Serves the API on `listener` until `shutdown` completes, then finishes the requests in
/// flight. Handlers see each connection's source address (a join is of its own address).
pub async fn serve(
    listener: tokio::net::TcpListener,
    context: AdminContext,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    info!(address = %listener.local_addr()?, "admin API listening");
    axum::serve(
        listener,
        router(context).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

pub fn router(context: AdminContext) -> Router {
    let credentials = auth::Credentials::new(&context.token, context.tokens.clone());
    let (router, document) = documented_routes(credentials).split_for_parts();
    // Serialized once: the document is fixed for the life of the process.
    let document = OpenApiJson(Bytes::from(
        document
            .to_pretty_json()
            .expect("the OpenAPI document serializes"),
    ));
    let shared = Arc::new(Shared {
        backends: context.backends,
        keys: context.keys,
        tokens: context.tokens,
        store: context.store,
        blocklist: context.blocklist,
        registry: context.registry,
        kernel_registry: metrics::kernel_registry(context.pin_dir.clone()),
        pin_dir: context.pin_dir,
        gateway_clients: context.gateway_clients,
        gateway: context.gateway,
        ha: context.ha,
        handover: context.handover,
    });
    router
        .with_state(shared)
        .layer(Extension(document))
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        // Outermost, so that refused and unmatched requests are counted too.
        .layer(middleware::from_fn_with_state(
            context.metrics,
            metrics::count_requests,
        ))
}

/// Every route, each with its documentation.
fn documented_routes(credentials: auth::Credentials) -> OpenApiRouter<Context> {
    let v1 = OpenApiRouter::new()
        .routes(routes!(services::list, services::add))
        .routes(routes!(services::get, services::remove))
        .routes(routes!(backends::list, backends::add))
        .routes(routes!(backends::get, backends::remove))
        .routes(routes!(backends::drain))
        .routes(routes!(backends::connections))
        .routes(routes!(backends::close_clients))
        .routes(routes!(backends::enable))
        .routes(routes!(backends::rejoin))
        .routes(routes!(join::join))
        .routes(routes!(backends::disable))
        .routes(routes!(backends::set_weight))
        .routes(routes!(backends::set_tier))
        .routes(routes!(keys::list, keys::create))
        .routes(routes!(keys::revoke))
        .routes(routes!(keys::set_limit))
        .routes(routes!(keys::set_caps))
        .routes(routes!(tokens::list, tokens::create))
        .routes(routes!(tokens::revoke))
        .routes(routes!(blocklist::list, blocklist::add))
        .routes(routes!(blocklist::remove))
        .routes(routes!(status::stats))
        .routes(routes!(status::health))
        .routes(routes!(status::events))
        .routes(routes!(gateway::status))
        .routes(routes!(ha::status))
        .routes(routes!(ha::set_role))
        .routes(routes!(ha::hand_over))
        .route_layer(middleware::from_fn_with_state(
            credentials,
            auth::authenticate,
        ));
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(v1)
        .routes(routes!(metrics::metrics))
        .routes(routes!(healthz))
        .routes(routes!(openapi_json))
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "lb-control admin API",
        description = "Services, backends, API keys, join tokens, the source blocklist, \
                       counters, health and events of an lb-control instance. Every /v1 route \
                       needs `Authorization: Bearer <token>`: the admin token, or a join token, \
                       which reaches only POST /v1/join and its own backends (403 elsewhere). \
                       Errors are \
                       `{ \"error\": { \"code\", \"message\", \"field\" } }`."
    ),
    modifiers(&BearerToken),
    security(("bearer" = [])),
    tags(
        (name = "services", description = "L4 services: VIP, port, protocol"),
        (name = "backends", description = "The nodes behind each service"),
        (name = "keys", description = "API keys of the JSON-RPC gateway"),
        (name = "tokens", description = "Join tokens: nodes that register themselves"),
        (name = "blocklist", description = "Source prefixes dropped in XDP, with their expiry"),
        (name = "status", description = "Counters, health and the event log"),
        (name = "ha", description = "This lb-control's role in its HA pair, set by keepalived; a planned handover"),
        (name = "metrics", description = "Prometheus and liveness"),
    )
)]
struct ApiDoc;

struct BearerToken;

impl Modify for BearerToken {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                "bearer",
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
    }
}

/// Liveness: answers while the process serves requests.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "metrics",
    security(()),
    responses((status = 200, description = "Alive", content_type = "text/plain", body = String))
)]
async fn healthz() -> &'static str {
    "ok"
}

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "metrics",
    security(()),
    responses((status = 200, description = "The OpenAPI document", body = Object))
)]
async fn openapi_json(Extension(document): Extension<OpenApiJson>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], document.0)
}

#[derive(Clone)]
struct OpenApiJson(Bytes);

async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        ErrorCode::NotFound,
        format!("no route {method} {}: see /openapi.json", uri.path()),
    )
}

async fn wrong_method(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        format!("{} does not take {method}: see /openapi.json", uri.path()),
    )
}

/// Runs blocking work (a store write waits for fsync; kernel map reads are syscalls) off the
/// async workers.
async fn run_blocking<T: Send + 'static>(
    call: impl FnOnce() -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(call)
        .await
        .map_err(|error| ApiError::internal(format!("blocking task: {error}")))?
}
