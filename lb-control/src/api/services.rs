//! `/v1/services`: the L4 services (VIP, port, protocol) and their backends.

use axum::{Json, extract::State, http::StatusCode};

use super::{
    Context,
    error::{ApiError, ApiResult},
    extract::{Body, Id},
    model::{BackendInfo, ErrorBody, ErrorCode, NewService, ServiceInfo},
};
use crate::model::{Service, ServiceId};

/// Every service with its backends.
#[utoipa::path(
    get,
    path = "/v1/services",
    tag = "services",
    responses(
        (status = 200, description = "Every service with its backends", body = Vec<ServiceInfo>),
        (status = 401, description = "No or wrong bearer token", body = ErrorBody),
    )
)]
pub async fn list(State(context): State<Context>) -> Json<Vec<ServiceInfo>> {
    Json(service_infos(&context).await)
}

/// Adds a service; its backends are added with `POST /v1/backends`.
#[utoipa::path(
    post,
    path = "/v1/services",
    tag = "services",
    request_body = NewService,
    responses(
        (status = 201, description = "Added and pushed to the kernel", body = ServiceInfo),
        (status = 400, description = "A field is invalid", body = ErrorBody),
        (status = 401, description = "No or wrong bearer token", body = ErrorBody),
        (status = 409, description = "A service with this VIP, port and protocol exists",
         body = ErrorBody),
        (status = 500, description = "The state store or the kernel failed", body = ErrorBody),
    )
)]
pub async fn add(
    State(context): State<Context>,
    Body(new): Body<NewService>,
) -> ApiResult<(StatusCode, Json<ServiceInfo>)> {
    if new.port == 0 {
        return Err(ApiError::invalid_field(
            "port",
            "port 0 is not a port a service can listen on",
        ));
    }
    let service = context.backends.add_service(new.into()).await?;
    let name = service.def.key().to_string();
    Ok((
        StatusCode::CREATED,
        Json(ServiceInfo {
            service,
            name,
            serving_tier: None,
            backends: Vec::new(),
        }),
    ))
}

/// One service with its backends.
#[utoipa::path(
    get,
    path = "/v1/services/{id}",
    tag = "services",
    params(Id),
    responses(
        (status = 200, description = "The service with its backends", body = ServiceInfo),
        (status = 401, description = "No or wrong bearer token", body = ErrorBody),
        (status = 404, description = "No such service", body = ErrorBody),
    )
)]
pub async fn get(State(context): State<Context>, Id(id): Id) -> ApiResult<Json<ServiceInfo>> {
    service_infos(&context)
        .await
        .into_iter()
        .find(|info| info.service.id == id)
        .map(Json)
        .ok_or_else(|| service_not_found(id))
}

/// Removes a service and all its backends.
#[utoipa::path(
    delete,
    path = "/v1/services/{id}",
    tag = "services",
    params(Id),
    responses(
        (status = 200, description = "Removed; the service as it was", body = Service),
        (status = 401, description = "No or wrong bearer token", body = ErrorBody),
        (status = 404, description = "No such service", body = ErrorBody),
        (status = 500, description = "The state store or the kernel failed", body = ErrorBody),
    )
)]
pub async fn remove(State(context): State<Context>, Id(id): Id) -> ApiResult<Json<Service>> {
    Ok(Json(context.backends.remove_service(id).await?))
}

/// Every service, each with its backends' states and health.
pub async fn service_infos(context: &Context) -> Vec<ServiceInfo> {
    let view = context.backends.view();
    let statuses = context.backends.backend_statuses().await;
    view.services
        .iter()
        .map(|service| ServiceInfo {
            service: service.service.clone(),
            name: service.name.clone(),
            serving_tier: service.serving_tier,
            backends: statuses
                .iter()
                .filter(|status| status.view.backend.service == service.service.id)
                .cloned()
                .map(BackendInfo::from)
                .collect(),
        })
        .collect()
}

pub fn service_not_found(id: ServiceId) -> ApiError {
    ApiError::new(ErrorCode::NotFound, format!("service {id} does not exist"))
}
