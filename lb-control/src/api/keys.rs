//! `/v1/keys`: the gateway's API keys. A key's secret is in the creation answer and nowhere
//! else; listings carry neither the secret nor its hash.

use axum::{Json, extract::State, http::StatusCode};

use super::{
    Context,
    error::{ApiError, ApiResult},
    extract::{Body, Id},
    model::{
        CapsChange, ErrorBody, KeyCreated, KeyInfo, LimitChange, NewKey, Timestamp, requested_limit,
    },
    run_blocking,
};
use crate::keys::{ApiKeys, CredentialError};

/// Every key, revoked ones included.
#[utoipa::path(
    get,
    path = "/v1/keys",
    tag = "keys",
    responses(
        (status = 200, description = "Every key, without secrets", body = Vec<KeyInfo>),
        (status = 401, description = "No or wrong bearer token", body = ErrorBody),
        (status = 500, description = "The state store failed", body = ErrorBody),
    )
)]
pub async fn list(State(context): State<Context>) -> ApiResult<Json<Vec<KeyInfo>>> {
    let keys = blocking(&context, ApiKeys::list).await?;
    Ok(Json(keys.into_iter().map(KeyInfo::from).collect()))
}

/// Creates a key. The answer holds its secret, which cannot be shown again.
#[utoipa::path(
    post,
    path = "/v1/keys",
    tag = "keys",
    request_body = NewKey,
    responses(
        (status = 201, description = "Created; the secret is shown this once", body = KeyCreated),
        (status = 400, description = "A field is invalid", body = ErrorBody),
        (status = 401, description = "No or wrong bearer token", body = ErrorBody),
        (status = 409, description = "A key with this name exists (or existed)", body = ErrorBody),
        (status = 500, description = "The state store failed", body = ErrorBody),
    )
)]
pub async fn create(
    State(context): State<Context>,
    Body(new): Body<NewKey>,
) -> ApiResult<(StatusCode, Json<KeyCreated>)> {
    let limit = requested_limit(new.rps, new.burst)
        .map_err(|reason| ApiError::invalid_field("burst", reason))?;
    let created = blocking(&context, move |keys| {
        keys.create(&new.name, limit, new.caps())
    })
    .await?;
    let record = created.record;
    Ok((
        StatusCode::CREATED,
        Json(KeyCreated {
            id: record.id,
            name: record.name,
            secret: created.secret,
            rate_limit: record.rate_limit,
            max_connections: record.caps.max_connections,
            max_subscriptions: record.caps.max_subscriptions,
            created: Timestamp(record.created),
        }),
    ))
}

/// Revokes a key for good. Revoking a revoked key is a conflict (409).
#[utoipa::path(
    delete,
    path = "/v1/keys/{id}",
    tag = "keys",
    params(Id),
    responses(
        (status = 200, description = "Revoked", body = KeyInfo),
        (status = 401, description = "No or wrong bearer token", body = ErrorBody),
        (status = 404, description = "No such key", body = ErrorBody),
        (status = 409, description = "Revoked already", body = ErrorBody),
        (status = 500, description = "The state store failed", body = ErrorBody),
    )
)]
pub async fn revoke(State(context): State<Context>, Id(id): Id) -> ApiResult<Json<KeyInfo>> {
    let key = blocking(&context, move |keys| keys.revoke(id)).await?;
    Ok(Json(key.into()))
}

/// Sets a key's rate limit; `{ "rps": null }` lifts it.
#[utoipa::path(
    put,
    path = "/v1/keys/{id}/limit",
    tag = "keys",
    params(Id),
    request_body = LimitChange,
    responses(
        (status = 200, description = "Limit set", body = KeyInfo),
        (status = 400, description = "A field is invalid", body = ErrorBody),
        (status = 401, description = "No or wrong bearer token", body = ErrorBody),
        (status = 404, description = "No such key", body = ErrorBody),
        (status = 409, description = "The key is revoked", body = ErrorBody),
        (status = 500, description = "The state store failed", body = ErrorBody),
    )
)]
pub async fn set_limit(
    State(context): State<Context>,
    Id(id): Id,
    Body(change): Body<LimitChange>,
) -> ApiResult<Json<KeyInfo>> {
    let limit = requested_limit(change.rps, change.burst)
        .map_err(|reason| ApiError::invalid_field("burst", reason))?;
    let key = blocking(&context, move |keys| keys.set_limit(id, limit)).await?;
    Ok(Json(key.into()))
}

/// Sets a key's WebSocket caps; null takes the gateway's default. Connections and subscriptions
/// a lowered cap finds open stay; new ones are held to it.
#[utoipa::path(
    put,
    path = "/v1/keys/{id}/caps",
    tag = "keys",
    params(Id),
    request_body = CapsChange,
    responses(
        (status = 200, description = "Caps set", body = KeyInfo),
        (status = 400, description = "A field is invalid", body = ErrorBody),
        (status = 401, description = "No or wrong bearer token", body = ErrorBody),
        (status = 404, description = "No such key", body = ErrorBody),
        (status = 409, description = "The key is revoked", body = ErrorBody),
        (status = 500, description = "The state store failed", body = ErrorBody),
    )
)]
pub async fn set_caps(
    State(context): State<Context>,
    Id(id): Id,
    Body(change): Body<CapsChange>,
) -> ApiResult<Json<KeyInfo>> {
    let key = blocking(&context, move |keys| keys.set_caps(id, change.into())).await?;
    Ok(Json(key.into()))
}

/// Runs a key registry call on a blocking thread: it waits for the store's fsync.
async fn blocking<T: Send + 'static>(
    context: &Context,
    call: impl FnOnce(&ApiKeys) -> Result<T, CredentialError> + Send + 'static,
) -> ApiResult<T> {
    let keys = context.keys.clone();
    run_blocking(move || call(&keys).map_err(ApiError::from)).await
}
