//! `/v1/backends`: the nodes behind each service, their admin state and weight.

use axum::{Extension, Json, extract::State, http::StatusCode};

use super::{
    Context,
    auth::Caller,
    error::{ApiError, ApiResult},
    extract::{Body, Id, Query},
    model::{
        BackendConnections, BackendFilter, BackendInfo, ClosedClients, ErrorBody, NewBackend,
        TierChange, WeightChange,
    },
    run_blocking,
    services::service_not_found,
};
use crate::{
    backends::{BackendStatus, Requester},
    dataplane::open_flows_to,
    model::{AdminState, Backend, BackendDef, BackendId, ServiceId},
};

/// Every backend with its state and health; a join token sees only its own.
#[utoipa::path(
    get,
    path = "/v1/backends",
    tag = "backends",
    params(BackendFilter),
    responses(
        (status = 200, description = "The backends", body = Vec<BackendInfo>),
        (status = 400, description = "A query parameter is invalid", body = ErrorBody),
        (status = 401, description = "No or wrong bearer token", body = ErrorBody),
        (status = 404, description = "No such service", body = ErrorBody),
    )
)]
pub async fn list(
    State(context): State<Context>,
    Extension(caller): Extension<Caller>,
    Query(filter): Query<BackendFilter>,
) -> ApiResult<Json<Vec<BackendInfo>>> {
    if let Some(service) = filter.service {
        service_exists(&context, service)?;
    }
    let statuses = context.backends.backend_statuses().await;
    Ok(Json(
        statuses
            .into_iter()
            .filter(|status| {
                filter
                    .service
                    .is_none_or(|service| status.view.backend.service == service)
                    && caller.owns(&status.service_name, &status.view.backend)
            })
            .map(BackendInfo::from)
            .collect(),
    ))
}

/// Adds a backend to a service.
#[utoipa::path(
    post,
    path = "/v1/backends",
    tag = "backends",
    request_body = NewBackend,
    responses(
        (status = 201, description = "Added and pushed to the kernel", body = BackendInfo),
        (status = 400, description = "A field is invalid, or `service` is needed",
         body = ErrorBody),
        (status = 401, description = "No or wrong bearer token", body = ErrorBody),
        (status = 404, description = "No such service", body = ErrorBody),
        (status = 409, description = "The service has a backend at this address",
         body = ErrorBody),
        (status = 500, description = "The state store or the kernel failed", body = ErrorBody),
    )
)]
pub async fn add(
    State(context): State<Context>,
    Body(new): Body<NewBackend>,
) -> ApiResult<(StatusCode, Json<BackendInfo>)> {
    let service = match new.service {
        Some(service) => service,
        None => only_service(&context)?,
    };
    let def = BackendDef {
        address: new.address,
        rpc_port: new.rpc_port,
        weight: new.weight,
        admin: new.admin,
        tier: new.tier,
    };
    let backend = context.backends.add_backend(service, def).await?;
    Ok((StatusCode::CREATED, status_of(&context, backend.id).await?))
}

/// One backend with its state and health.
#[utoipa::path(
    get,
    path = "/v1/backends/{id}",
    tag = "backends",
    params(Id),
    responses(
        (status = 200, description = "The backend", body = BackendInfo),
        (status = 401, description = "No or wrong bearer token", body = ErrorBody),
        (status = 403, description = "A join token asked for another node's backend",
         body = ErrorBody),
        (status = 404, description = "No such backend", body = ErrorBody),
    )
)]
pub async fn get(
    State(context): State<Context>,
    Extension(caller): Extension<Caller>,
    Id(id): Id,
) -> ApiResult<Json<BackendInfo>> {
    Ok(Json(owned(&context, &caller, id).await?.into()))
}

/// Removes a backend: its flows move to the service's other backends.
#[utoipa::path(
    delete,
    path = "/v1/backends/{id}",
    tag = "backends",
    params(Id),
    responses(
        (status = 200, description = "Removed; the backend as it was", body = Backend),
        (status = 401, description = "No or wrong bearer token", body = ErrorBody),
        (status = 403, description = "A join token asked for another node's backend",
         body = ErrorBody),
        (status = 404, description = "No such backend", body = ErrorBody),
        (status = 500, description = "The state store or the kernel failed", body = ErrorBody),
    )
)]
pub async fn remove(
    State(context): State<Context>,
    Extension(caller): Extension<Caller>,
    Id(id): Id,
) -> ApiResult<Json<Backend>> {
    owned(&context, &caller, id).await?;
    Ok(Json(
        context
            .backends
            .remove_backend(id, &caller.requester())
            .await?,
    ))
}

/// Drains a backend: it keeps its established flows and gets no new ones.
#[utoipa::path(
    post,
    path = "/v1/backends/{id}/drain",
    tag = "backends",
    params(Id),
    responses(
        (status = 200, description = "Draining", body = BackendInfo),
        (status = 401, description = "No or wrong bearer token", body = ErrorBody),
        (status = 403, description = "A join token asked for another node's backend",
         body = ErrorBody),
        (status = 404, description = "No such backend", body = ErrorBody),
        (status = 500, description = "The state store or the kernel failed", body = ErrorBody),
    )
)]
pub async fn drain(
    State(context): State<Context>,
    Extension(caller): Extension<Caller>,
    Id(id): Id,
) -> ApiResult<Json<BackendInfo>> {
    owned(&context, &caller, id).await?;
    set_admin(&context, id, AdminState::Draining, &caller.requester()).await
}

/// What a backend still carries: its open kernel flows and its gateway WebSocket clients. A
/// drained backend is empty, ready for its upgrade, when both are 0.
#[utoipa::path(
    get,
    path = "/v1/backends/{id}/connections",
    tag = "backends",
    params(Id),
    responses(
        (status = 200, description = "Its connections now", body = BackendConnections),
        (status = 401, description = "No or wrong bearer token", body = ErrorBody),
        (status = 403, description = "A join token asked for another node's backend",
         body = ErrorBody),
        (status = 404, description = "No such backend", body = ErrorBody),
        (status = 500, description = "The kernel's flow table could not be read",
         body = ErrorBody),
    )
)]
pub async fn connections(
    State(context): State<Context>,
    Extension(caller): Extension<Caller>,
    Id(id): Id,
) -> ApiResult<Json<BackendConnections>> {
    let backend = owned(&context, &caller, id).await?.view.backend;
    let (pin_dir, address) = (context.pin_dir.clone(), backend.def.address);
    let flows = run_blocking(move || {
        open_flows_to(&pin_dir, address)
            .map_err(|error| ApiError::internal(format!("counting flows: {error}")))
    })
    .await?;
    Ok(Json(BackendConnections {
        flows,
        websocket_clients: context.gateway_clients.count(backend.def.rpc_endpoint()),
    }))
}

/// Closes the gateway's WebSocket clients of a backend's node with 1012 (service restart), so
/// they reconnect to another node: the end of a drain that ran out of time.
#[utoipa::path(
    post,
    path = "/v1/backends/{id}/close-clients",
    tag = "backends",
    params(Id),
    responses(
        (status = 200, description = "The clients told to reconnect", body = ClosedClients),
        (status = 401, description = "No or wrong bearer token", body = ErrorBody),
        (status = 403, description = "A join token asked for another node's backend",
         body = ErrorBody),
        (status = 404, description = "No such backend", body = ErrorBody),
    )
)]
pub async fn close_clients(
    State(context): State<Context>,
    Extension(caller): Extension<Caller>,
    Id(id): Id,
) -> ApiResult<Json<ClosedClients>> {
    let backend = owned(&context, &caller, id).await?.view.backend;
    let closed = context.gateway_clients.close(backend.def.rpc_endpoint());
    Ok(Json(ClosedClients { closed }))
}

/// Enables a backend: in rotation while healthy.
#[utoipa::path(
    post,
    path = "/v1/backends/{id}/enable",
    tag = "backends",
    params(Id),
    responses(
        (status = 200, description = "Enabled", body = BackendInfo),
        (status = 401, description = "No or wrong bearer token", body = ErrorBody),
        (status = 404, description = "No such backend", body = ErrorBody),
        (status = 500, description = "The state store or the kernel failed", body = ErrorBody),
    )
)]
pub async fn enable(State(context): State<Context>, Id(id): Id) -> ApiResult<Json<BackendInfo>> {
    set_admin(&context, id, AdminState::Enabled, &Requester::Operator).await
}

/// Puts a backend back through the join gate: out of rotation at once, health-checked from
/// scratch, and enabled by itself once its node has passed `rise` checks in a row (the last
/// step of a node's upgrade in a rollout).
#[utoipa::path(
    post,
    path = "/v1/backends/{id}/rejoin",
    tag = "backends",
    params(Id),
    responses(
        (status = 200, description = "Joining", body = BackendInfo),
        (status = 401, description = "No or wrong bearer token", body = ErrorBody),
        (status = 404, description = "No such backend", body = ErrorBody),
        (status = 500, description = "The state store or the kernel failed", body = ErrorBody),
    )
)]
pub async fn rejoin(State(context): State<Context>, Id(id): Id) -> ApiResult<Json<BackendInfo>> {
    set_admin(&context, id, AdminState::Joining, &Requester::Operator).await
}

/// Disables a backend: out of rotation at once, its flows move to other backends.
#[utoipa::path(
    post,
    path = "/v1/backends/{id}/disable",
    tag = "backends",
    params(Id),
    responses(
        (status = 200, description = "Disabled", body = BackendInfo),
        (status = 401, description = "No or wrong bearer token", body = ErrorBody),
        (status = 404, description = "No such backend", body = ErrorBody),
        (status = 500, description = "The state store or the kernel failed", body = ErrorBody),
    )
)]
pub async fn disable(State(context): State<Context>, Id(id): Id) -> ApiResult<Json<BackendInfo>> {
    set_admin(&context, id, AdminState::Disabled, &Requester::Operator).await
}

/// Sets a backend's weight: its relative share of new flows.
#[utoipa::path(
    put,
    path = "/v1/backends/{id}/weight",
    tag = "backends",
    params(Id),
    request_body = WeightChange,
    responses(
        (status = 200, description = "Weight set", body = BackendInfo),
        (status = 400, description = "Not a weight", body = ErrorBody),
        (status = 401, description = "No or wrong bearer token", body = ErrorBody),
        (status = 404, description = "No such backend", body = ErrorBody),
        (status = 500, description = "The state store or the kernel failed", body = ErrorBody),
    )
)]
pub async fn set_weight(
    State(context): State<Context>,
    Id(id): Id,
    Body(change): Body<WeightChange>,
) -> ApiResult<Json<BackendInfo>> {
    context.backends.set_weight(id, change.weight).await?;
    status_of(&context, id).await
}

/// Moves a backend to another tier: new flows go to the lowest tier that has a backend up.
#[utoipa::path(
    put,
    path = "/v1/backends/{id}/tier",
    tag = "backends",
    params(Id),
    request_body = TierChange,
    responses(
        (status = 200, description = "Tier set", body = BackendInfo),
        (status = 400, description = "Not a tier", body = ErrorBody),
        (status = 401, description = "No or wrong bearer token", body = ErrorBody),
        (status = 404, description = "No such backend", body = ErrorBody),
        (status = 500, description = "The state store or the kernel failed", body = ErrorBody),
    )
)]
pub async fn set_tier(
    State(context): State<Context>,
    Id(id): Id,
    Body(change): Body<TierChange>,
) -> ApiResult<Json<BackendInfo>> {
    context.backends.set_tier(id, change.tier).await?;
    status_of(&context, id).await
}

async fn set_admin(
    context: &Context,
    id: BackendId,
    admin: AdminState,
    by: &Requester,
) -> ApiResult<Json<BackendInfo>> {
    context.backends.set_admin(id, admin, by).await?;
    status_of(context, id).await
}

/// Backend `id`, if the caller may see and change it (403 otherwise).
async fn owned(context: &Context, caller: &Caller, id: BackendId) -> ApiResult<BackendStatus> {
    let status = context.backends.backend_status(id).await?;
    caller.must_own(&status.service_name, &status.view.backend)?;
    Ok(status)
}

pub(super) async fn status_of(context: &Context, id: BackendId) -> ApiResult<Json<BackendInfo>> {
    Ok(Json(context.backends.backend_status(id).await?.into()))
}

fn service_exists(context: &Context, id: ServiceId) -> ApiResult<()> {
    if context
        .backends
        .view()
        .services
        .iter()
        .any(|service| service.service.id == id)
    {
        Ok(())
    } else {
        Err(service_not_found(id))
    }
}

/// The service a backend goes to when the request names none: the only one there is.
fn only_service(context: &Context) -> ApiResult<ServiceId> {
    let view = context.backends.view();
    match view.services.as_slice() {
        [only] => Ok(only.service.id),
        [] => Err(ApiError::invalid_field(
            "service",
            "there is no service yet: add one first (POST /v1/services)",
        )),
        services => Err(ApiError::invalid_field(
            "service",
            format!(
                "{} services exist: name the one the backend belongs to ({})",
                services.len(),
                services
                    .iter()
                    .map(|service| format!("{} = {}", service.service.id, service.name))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}
