//! `/v1/join`: a node adds its own address as a backend of a service, with a join token (or
//! the admin token). It enters the service's rotation only once its health checks pass.

use std::net::SocketAddr;

use axum::{
    Extension, Json,
    extract::{ConnectInfo, State},
    http::StatusCode,
};

use super::{
    Context,
    auth::Caller,
    backends::status_of,
    error::{ApiError, ApiResult},
    extract::Body,
    model::{BackendInfo, ErrorBody, JoinRequest},
};
use crate::{
    backends::Joined,
    model::{AdminState, BackendDef, ServiceKey},
};

/// Adds the caller's own address (the source of this request) with `port` as a joining
/// backend of `service`: health-checked from now on, out of rotation until its node has
/// passed `rise` checks in a row, then in. A backend already at that address is left as it is
/// (200). A join token must name the service.
#[utoipa::path(
    post,
    path = "/v1/join",
    tag = "backends",
    request_body = JoinRequest,
    responses(
        (status = 201, description = "Joining: enters once its checks pass", body = BackendInfo),
        (status = 200, description = "A backend of the service already; unchanged",
         body = BackendInfo),
        (status = 400, description = "A field is invalid", body = ErrorBody),
        (status = 401, description = "No, wrong or revoked token", body = ErrorBody),
        (status = 403, description = "The join token does not name this service",
         body = ErrorBody),
        (status = 404, description = "No such service", body = ErrorBody),
        (status = 500, description = "The state store or the kernel failed", body = ErrorBody),
    )
)]
pub async fn join(
    State(context): State<Context>,
    Extension(caller): Extension<Caller>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Body(request): Body<JoinRequest>,
) -> ApiResult<(StatusCode, Json<BackendInfo>)> {
    let service: ServiceKey = request
        .service
        .parse()
        .map_err(|reason: String| ApiError::invalid_field("service", reason))?;
    caller.may_join(service)?;
    let def = BackendDef {
        address: SocketAddr::new(peer.ip().to_canonical(), request.port),
        rpc_port: request.rpc_port,
        weight: request.weight,
        admin: AdminState::Joining,
        tier: request.tier,
    };
    let (status, backend) = match context
        .backends
        .join(service, def, &caller.requester())
        .await?
    {
        Joined::Added(backend) => (StatusCode::CREATED, backend),
        Joined::Present(backend) => (StatusCode::OK, backend),
    };
    Ok((status, status_of(&context, backend.id).await?))
}
