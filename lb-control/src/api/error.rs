//! Every error the admin API answers, as `{ "error": { "code", "message", "field" } }` with the
//! code's HTTP status. The mapping from the modules' errors lives here and nowhere else.

use axum::{
    Json,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use tracing::error;

use super::model::{ErrorBody, ErrorCode, ErrorDetail};
use crate::{backends::ChangeError, keys::CredentialError, store::StoreError};

#[derive(Debug)]
pub struct ApiError(pub ErrorDetail);

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError(ErrorDetail {
            code,
            message: message.into(),
            field: None,
        })
    }

    pub fn invalid(field: Option<String>, message: impl Into<String>) -> Self {
        ApiError(ErrorDetail {
            field,
            ..ApiError::new(ErrorCode::Invalid, message).0
        })
    }

    pub fn invalid_field(field: &str, message: impl Into<String>) -> Self {
        ApiError::invalid(Some(field.to_owned()), message)
    }

    /// A store that cannot take writes now: the message names it (etcd, its endpoints) and says
    /// that serving goes on.
    pub fn store(error: &StoreError) -> Self {
        if error.is_unavailable() {
            let message = format!("state store: {error}");
            error!("admin API: {message}");
            ApiError::new(ErrorCode::Unavailable, message)
        } else {
            ApiError::internal(format!("state store: {error}"))
        }
    }

    /// A failure of the store or the kernel: logged here, since the client may not be watching.
    pub fn internal(message: impl Into<String>) -> Self {
        let message = message.into();
        error!("admin API: {message}");
        ApiError::new(ErrorCode::Internal, message)
    }
}

pub fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::Invalid => StatusCode::BAD_REQUEST,
        ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorCode::Forbidden => StatusCode::FORBIDDEN,
        ErrorCode::NotFound => StatusCode::NOT_FOUND,
        ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        ErrorCode::Conflict => StatusCode::CONFLICT,
        ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = status_of(self.0.code);
        let mut response = (status, Json(ErrorBody { error: self.0 })).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

impl From<ChangeError> for ApiError {
    fn from(error: ChangeError) -> Self {
        match error {
            ChangeError::NotFound { .. } => ApiError::new(ErrorCode::NotFound, error.to_string()),
            ChangeError::Conflict { .. } => ApiError::new(ErrorCode::Conflict, error.to_string()),
            ChangeError::Invalid { field, reason } => ApiError::invalid(Some(field), reason),
            ChangeError::Store(store) => ApiError::store(&store),
            ChangeError::Kernel(_) => ApiError::internal(error.to_string()),
        }
    }
}

impl From<CredentialError> for ApiError {
    fn from(error: CredentialError) -> Self {
        match error {
            CredentialError::NotFound { .. } => {
                ApiError::new(ErrorCode::NotFound, error.to_string())
            }
            CredentialError::Revoked { .. } | CredentialError::Conflict { .. } => {
                ApiError::new(ErrorCode::Conflict, error.to_string())
            }
            CredentialError::Invalid { field, reason } => ApiError::invalid_field(field, reason),
            CredentialError::Store(store) => ApiError::store(&store),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::EtcdError;

    #[test]
    fn a_store_without_quorum_answers_503_naming_etcd_and_its_endpoints() {
        let unavailable = StoreError::Etcd(EtcdError::Unavailable {
            endpoints: "http://10.0.0.1:2379,http://10.0.0.2:2379".to_owned(),
            detail: "etcdserver: no leader".to_owned(),
        });
        let error = ApiError::from(CredentialError::Store(unavailable));
        assert_eq!(status_of(error.0.code), StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            error.0.message.starts_with(
                "state store: etcd (http://10.0.0.1:2379,http://10.0.0.2:2379) is unavailable: \
                 etcdserver: no leader; no majority of its members answers"
            ),
            "{}",
            error.0.message
        );
    }
}
