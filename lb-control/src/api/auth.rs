//! Bearer-token authentication of the `/v1` routes.
//!
//! The token is compared through its SHA-256 in constant time, so neither the comparison's
//! timing nor the token's length leaks. The token itself is never logged.

use std::sync::Arc;

use axum::{
    extract::{Request, State},
    http::header,
    middleware::Next,
    response::Response,
};

use super::{error::ApiError, model::ErrorCode};
use crate::keys::{digest, digests_equal};

/// The SHA-256 of the admin token.
#[derive(Clone)]
pub struct TokenDigest(Arc<[u8; 32]>);

impl TokenDigest {
    pub fn new(token: &str) -> Self {
        TokenDigest(Arc::new(digest(token)))
    }
}

pub async fn require_token(
    State(expected): State<TokenDigest>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        None => Err(ApiError::new(
            ErrorCode::Unauthorized,
            "missing bearer token: send `Authorization: Bearer <token>` (the token is \
             LB_ADMIN_TOKEN, the config's admin.token or admin.token_file, or \
             <state_dir>/admin.token)",
        )),
        Some(token) if digests_equal(&digest(token), &expected.0) => Ok(next.run(request).await),
        Some(_) => Err(ApiError::new(ErrorCode::Unauthorized, "wrong bearer token")),
    }
}
