//! `/v1/blocklist`: source prefixes dropped in XDP before any other work, with their expiry.
//! Changes go to the state store first (with their event), then to this host's kernel; on a
//! shared store the other lb-controls' kernels follow (see [`crate::blocklist`]).

use std::time::SystemTime;

use axum::{Json, extract::State, http::StatusCode};

use super::{
    Context,
    error::{ApiError, ApiResult},
    extract::{Body, PrefixParam},
    model::{BlockInfo, ErrorBody, ErrorCode, NewBlock, parse_prefix},
};
use crate::{blocklist::BlocklistError, dataplane::latest_block_expiry};

/// Every prefix this host's kernel drops, with its expiry and who blocked it, in prefix order.
#[utoipa::path(
    get,
    path = "/v1/blocklist",
    tag = "blocklist",
    responses(
        (status = 200, description = "The blocked prefixes", body = Vec<BlockInfo>),
        (status = 401, description = "No or wrong bearer token", body = ErrorBody),
        (status = 500, description = "The kernel maps could not be read", body = ErrorBody),
    )
)]
pub async fn list(State(context): State<Context>) -> ApiResult<Json<Vec<BlockInfo>>> {
    let entries = context.blocklist.list().await.map_err(blocklist_error)?;
    Ok(Json(entries.into_iter().map(BlockInfo::from).collect()))
}

/// Blocks a source prefix, for a while (`for`) or until removed: in the state store (on etcd,
/// on every lb-control sharing it), then in this host's kernel. Blocking a blocked prefix again
/// replaces its expiry.
#[utoipa::path(
    post,
    path = "/v1/blocklist",
    tag = "blocklist",
    request_body = NewBlock,
    responses(
        (status = 201, description = "Blocked in the store and the kernel; the entry as stored",
         body = BlockInfo),
        (status = 400, description = "`prefix` or `for` is invalid", body = ErrorBody),
        (status = 401, description = "No or wrong bearer token", body = ErrorBody),
        (status = 500, description = "The store or the kernel maps could not be written",
         body = ErrorBody),
        (status = 503, description = "The state store takes no writes now (etcd without a \
         majority): nothing was blocked", body = ErrorBody),
    )
)]
pub async fn add(
    State(context): State<Context>,
    Body(new): Body<NewBlock>,
) -> ApiResult<(StatusCode, Json<BlockInfo>)> {
    let prefix =
        parse_prefix(&new.prefix).map_err(|reason| ApiError::invalid_field("prefix", reason))?;
    let expires = new
        .duration
        .as_deref()
        .map(|text| expiry_after(text, SystemTime::now()))
        .transpose()?;
    let record = context
        .blocklist
        .add(prefix, expires)
        .await
        .map_err(blocklist_error)?;
    Ok((StatusCode::CREATED, Json(record.into())))
}

/// Unblocks exactly this prefix (a covering or covered prefix stays): out of the state store,
/// then out of this host's kernel.
#[utoipa::path(
    delete,
    path = "/v1/blocklist/{prefix}",
    tag = "blocklist",
    params(PrefixParam),
    responses(
        (status = 200, description = "Unblocked; the entry as it was", body = BlockInfo),
        (status = 400, description = "Not a prefix", body = ErrorBody),
        (status = 401, description = "No or wrong bearer token", body = ErrorBody),
        (status = 404, description = "The prefix is not on the blocklist", body = ErrorBody),
        (status = 500, description = "The store or the kernel maps could not be written",
         body = ErrorBody),
        (status = 503, description = "The state store takes no writes now (etcd without a \
         majority): nothing was unblocked", body = ErrorBody),
    )
)]
pub async fn remove(
    State(context): State<Context>,
    PrefixParam(prefix): PrefixParam,
) -> ApiResult<Json<BlockInfo>> {
    let Some(record) = context
        .blocklist
        .remove(prefix)
        .await
        .map_err(blocklist_error)?
    else {
        return Err(ApiError::new(
            ErrorCode::NotFound,
            format!("{} is not on the blocklist", prefix.trunc()),
        ));
    };
    Ok(Json(record.into()))
}

/// When a block given `for` (`10m`) ends, counted from `now`.
fn expiry_after(text: &str, now: SystemTime) -> ApiResult<SystemTime> {
    let hint = "write e.g. 90s, 10m, 1h or 7d, or leave `for` out to block until removed";
    let duration = humantime::parse_duration(text).map_err(|error| {
        ApiError::invalid_field(
            "for",
            format!("\"{text}\" is not a duration ({error}): {hint}"),
        )
    })?;
    if duration.is_zero() {
        return Err(ApiError::invalid_field(
            "for",
            format!("\"{text}\" would end the block at once: {hint}"),
        ));
    }
    now.checked_add(duration)
        .filter(|expires| *expires <= latest_block_expiry())
        .ok_or_else(|| {
            ApiError::invalid_field(
                "for",
                format!(
                    "\"{text}\" is too long: a block expires at the latest at {}; leave `for` \
                     out to block until removed",
                    humantime::format_rfc3339_seconds(latest_block_expiry())
                ),
            )
        })
}

fn blocklist_error(error: BlocklistError) -> ApiError {
    match error.store() {
        Some(store) => ApiError::store(store),
        None => ApiError::internal(format!("the blocklist: {error}")),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn field_of(result: ApiResult<SystemTime>) -> Option<String> {
        result.expect_err("refused").0.field
    }

    #[test]
    fn durations_are_read_and_bad_ones_name_the_for_field() {
        let now = SystemTime::now();
        assert_eq!(
            expiry_after("10m", now).expect("10m"),
            now + Duration::from_secs(600)
        );
        assert_eq!(
            expiry_after("1h 30m", now).expect("1h 30m"),
            now + Duration::from_secs(5400)
        );
        for bad in ["soon", "10", "-5m", "0s", "200years"] {
            assert_eq!(
                field_of(expiry_after(bad, now)).as_deref(),
                Some("for"),
                "{bad}"
            );
        }
    }

    #[test]
    fn prefixes_take_cidr_or_one_address() {
        assert_eq!(
            parse_prefix("203.0.113.0/24").expect("v4").to_string(),
            "203.0.113.0/24"
        );
        assert_eq!(
            parse_prefix("2001:db8::1").expect("v6").to_string(),
            "2001:db8::1/128"
        );
        for bad in ["203.0.113.0/33", "example.com", ""] {
            let reason = parse_prefix(bad).expect_err(bad);
            assert!(reason.contains("is not an IP prefix"), "{reason}");
        }
    }
}
