//! `/v1/tokens`: join tokens, for nodes that register themselves. A token's secret is in the
//! creation answer and nowhere else; listings carry neither the secret nor its hash.

use axum::{Json, extract::State, http::StatusCode};

use super::{
    Context,
    error::{ApiError, ApiResult},
    extract::{Body, Id},
    model::{ErrorBody, NewToken, TokenCreated, TokenInfo},
    run_blocking,
};
use crate::{keys::CredentialError, model::ServiceKey, tokens::JoinTokens};

/// Every join token, revoked ones included.
#[utoipa::path(
    get,
    path = "/v1/tokens",
    tag = "tokens",
    responses(
        (status = 200, description = "Every token, without secrets", body = Vec<TokenInfo>),
        (status = 401, description = "No or wrong bearer token", body = ErrorBody),
        (status = 403, description = "A join token asked", body = ErrorBody),
        (status = 500, description = "The state store failed", body = ErrorBody),
    )
)]
pub async fn list(State(context): State<Context>) -> ApiResult<Json<Vec<TokenInfo>>> {
    let tokens = blocking(&context, JoinTokens::list).await?;
    Ok(Json(tokens.into_iter().map(TokenInfo::from).collect()))
}

/// Creates a join token for existing services. The answer holds its secret, which cannot be
/// shown again.
#[utoipa::path(
    post,
    path = "/v1/tokens",
    tag = "tokens",
    request_body = NewToken,
    responses(
        (status = 201, description = "Created; the secret is shown this once",
         body = TokenCreated),
        (status = 400, description = "A field is invalid, or a service does not exist",
         body = ErrorBody),
        (status = 401, description = "No or wrong bearer token", body = ErrorBody),
        (status = 403, description = "A join token asked", body = ErrorBody),
        (status = 409, description = "A token with this name exists (or existed)",
         body = ErrorBody),
        (status = 500, description = "The state store failed", body = ErrorBody),
    )
)]
pub async fn create(
    State(context): State<Context>,
    Body(new): Body<NewToken>,
) -> ApiResult<(StatusCode, Json<TokenCreated>)> {
    let view = context.backends.view();
    let services = new
        .services
        .iter()
        .enumerate()
        .map(|(index, text)| {
            let field = format!("services[{index}]");
            let key: ServiceKey = text
                .parse()
                .map_err(|reason: String| ApiError::invalid(Some(field.clone()), reason))?;
            if !view.services.iter().any(|s| s.service.def.key() == key) {
                return Err(ApiError::invalid(
                    Some(field),
                    format!("there is no service {key}: see GET /v1/services"),
                ));
            }
            Ok(key)
        })
        .collect::<ApiResult<Vec<ServiceKey>>>()?;
    let created = blocking(&context, move |tokens| tokens.create(&new.name, &services)).await?;
    Ok((
        StatusCode::CREATED,
        Json(TokenCreated {
            token: created.record.into(),
            secret: created.secret,
        }),
    ))
}

/// Revokes a join token for good: its next request gets 401. Nodes it joined stay backends.
#[utoipa::path(
    delete,
    path = "/v1/tokens/{id}",
    tag = "tokens",
    params(Id),
    responses(
        (status = 200, description = "Revoked", body = TokenInfo),
        (status = 401, description = "No or wrong bearer token", body = ErrorBody),
        (status = 403, description = "A join token asked", body = ErrorBody),
        (status = 404, description = "No such token", body = ErrorBody),
        (status = 409, description = "Revoked already", body = ErrorBody),
        (status = 500, description = "The state store failed", body = ErrorBody),
    )
)]
pub async fn revoke(State(context): State<Context>, Id(id): Id) -> ApiResult<Json<TokenInfo>> {
    let token = blocking(&context, move |tokens| tokens.revoke(id)).await?;
    Ok(Json(token.into()))
}

/// Runs a token registry call on a blocking thread: it waits for the store.
async fn blocking<T: Send + 'static>(
    context: &Context,
    call: impl FnOnce(&JoinTokens) -> Result<T, CredentialError> + Send + 'static,
) -> ApiResult<T> {
    let tokens = context.tokens.clone();
    run_blocking(move || call(&tokens).map_err(ApiError::from)).await
}
