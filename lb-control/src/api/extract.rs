//! Request extractors whose rejections are API errors naming the field at fault: a JSON body,
//! a query string, and a numeric id or a source prefix in the path.
//!
//! axum's own extractors answer in plain text and say where a value went wrong only inside
//! their message; these keep the path serde reports (`weight`, `rate_limit.rps`) as the error's
//! `field`.

use axum::{
    body::Bytes,
    extract::{FromRequest, FromRequestParts, Path, Request},
    http::request::Parts,
};
use ipnet::IpNet;
use serde::de::DeserializeOwned;
use utoipa::{
    IntoParams,
    openapi::{
        KnownFormat, ObjectBuilder, Required, SchemaFormat, Type,
        path::{Parameter, ParameterBuilder, ParameterIn},
    },
};

use super::{error::ApiError, model::parse_prefix};

/// A JSON request body. The content type is not checked: the bearer token already rules out
/// the cross-site requests that check is for.
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| ApiError::invalid(None, format!("request body: {rejection}")))?;
        let mut deserializer = serde_json::Deserializer::from_slice(&bytes);
        let value = serde_path_to_error::deserialize(&mut deserializer)
            .map_err(|error| field_error("request body", error))?;
        deserializer
            .end()
            .map_err(|error| ApiError::invalid(None, format!("request body: {error}")))?;
        Ok(Body(value))
    }
}

/// Query-string parameters.
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let query = parts.uri.query().unwrap_or_default();
        let deserializer =
            serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
        serde_path_to_error::deserialize(deserializer)
            .map(Query)
            .map_err(|error| field_error("query string", error))
    }
}

/// The `{id}` of a path.
pub struct Id(pub i64);

/// Documents the `{id}` parameter: `params(Id)` in a path's annotation.
impl IntoParams for Id {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        let integer = ObjectBuilder::new()
            .schema_type(Type::Integer)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)));
        vec![
            ParameterBuilder::new()
                .name("id")
                .parameter_in(ParameterIn::Path)
                .required(Required::True)
                .description(Some("The record's id"))
                .schema(Some(integer))
                .build(),
        ]
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Id {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|rejection| ApiError::invalid_field("id", rejection.body_text()))?;
        raw.parse().map(Id).map_err(|_| {
            ApiError::invalid_field("id", format!("\"{raw}\" is not an id: ids are integers"))
        })
    }
}

/// The `{prefix}` of a path: a source prefix, URL-encoded (`203.0.113.0%2F24`), or one address.
pub struct PrefixParam(pub IpNet);

/// Documents the `{prefix}` parameter: `params(PrefixParam)` in a path's annotation.
impl IntoParams for PrefixParam {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        vec![
            ParameterBuilder::new()
                .name("prefix")
                .parameter_in(ParameterIn::Path)
                .required(Required::True)
                .description(Some(
                    "A source prefix with its `/` URL-encoded (`203.0.113.0%2F24`), or one \
                     address",
                ))
                .schema(Some(
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .examples(["203.0.113.0%2F24"]),
                ))
                .build(),
        ]
    }
}

impl<S: Send + Sync> FromRequestParts<S> for PrefixParam {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|rejection| ApiError::invalid_field("prefix", rejection.body_text()))?;
        parse_prefix(&raw)
            .map(PrefixParam)
            .map_err(|reason| ApiError::invalid_field("prefix", reason))
    }
}

/// A deserialization error as an `invalid` answer. serde reports unknown and missing fields
/// at their parent, naming them only in the message, so the name is taken from there.
fn field_error<E: std::fmt::Display>(what: &str, error: serde_path_to_error::Error<E>) -> ApiError {
    let path = error.path().to_string();
    let message = error.inner().to_string();
    let field = if path == "." {
        field_named_in(&message)
    } else {
        Some(path)
    };
    let message = match &field {
        Some(field) => format!("{what}: {field}: {message}"),
        None => format!("{what}: {message}"),
    };
    ApiError::invalid(field, message)
}

/// `x` from serde's "unknown field `x`, expected …" and "missing field `x`".
fn field_named_in(message: &str) -> Option<String> {
    ["unknown field `", "missing field `"]
        .iter()
        .find_map(|prefix| message.strip_prefix(prefix))
        .and_then(|rest| rest.split('`').next())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::model::{LimitChange, NewBackend, WeightChange};

    fn body_error<T: DeserializeOwned>(json: &str) -> ApiError {
        let mut deserializer = serde_json::Deserializer::from_str(json);
        match serde_path_to_error::deserialize::<_, T>(&mut deserializer) {
            Ok(_) => panic!("{json} was accepted"),
            Err(error) => field_error("request body", error),
        }
    }

    #[test]
    fn errors_name_the_field() {
        for (json, field) in [
            (r#"{"weight": "heavy"}"#, "weight"),
            (r#"{"weight": 1, "wieght": 2}"#, "wieght"),
            (r#"{}"#, "weight"),
        ] {
            let error = body_error::<WeightChange>(json);
            assert_eq!(error.0.field.as_deref(), Some(field), "{json}: {error:?}");
            assert!(error.0.message.contains(field), "{error:?}");
        }
        let error = body_error::<NewBackend>(r#"{"address": "10.0.0.300:9944"}"#);
        assert_eq!(error.0.field.as_deref(), Some("address"));
        let error = body_error::<LimitChange>(r#"{"burst": 3}"#);
        assert_eq!(error.0.field.as_deref(), Some("rps"), "{error:?}");
    }

    #[test]
    fn syntax_errors_name_a_field_only_inside_one() {
        let error = body_error::<WeightChange>("weight=2");
        assert_eq!(error.0.field, None);
        assert!(error.0.message.starts_with("request body: "), "{error:?}");
        let error = body_error::<WeightChange>(r#"{"weight": "#);
        assert_eq!(error.0.field.as_deref(), Some("weight"));
    }
}
