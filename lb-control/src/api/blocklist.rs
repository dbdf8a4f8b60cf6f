//! `/v1/blocklist`: source prefixes dropped in XDP before any other work, with their expiry.
//! Changes go through the blocklist's one owner, the same the gateway's auth-failure blocks and
//! the expiry sweep use; each is recorded in the event log as an operator action.

use std::time::SystemTime;

use axum::{Json, extract::State, http::StatusCode};
use tracing::error;

use super::{
    Context,
    error::{ApiError, ApiResult},
    extract::{Body, PrefixParam},
    model::{BlockInfo, ErrorBody, ErrorCode, NewBlock, parse_prefix},
};
use crate::{
    dataplane::{BlockEntry, DataplaneError, latest_block_expiry},
    store::{Store, StoreError},
};

/// Every blocked prefix with its expiry, in prefix order.
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
    let entries = context.blocklist.list().await.map_err(kernel_error)?;
    Ok(Json(entries.into_iter().map(BlockInfo::from).collect()))
}

/// Blocks a source prefix, for a while (`for`) or until removed. Blocking a blocked prefix
/// again replaces its expiry.
#[utoipa::path(
    post,
    path = "/v1/blocklist",
    tag = "blocklist",
    request_body = NewBlock,
    responses(
        (status = 201, description = "Blocked in the kernel; the entry as stored",
         body = BlockInfo),
        (status = 400, description = "`prefix` or `for` is invalid", body = ErrorBody),
        (status = 401, description = "No or wrong bearer token", body = ErrorBody),
        (status = 500, description = "The kernel maps could not be written", body = ErrorBody),
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
    let entry = context
        .blocklist
        .block(prefix, expires)
        .await
        .map_err(kernel_error)?;
    let detail = match entry.expires {
        Some(expires) => format!("api: until {}", humantime::format_rfc3339_seconds(expires)),
        None => "api: until removed".to_owned(),
    };
    record_event(&context.store, "blocklist.added", &entry, detail).await;
    Ok((StatusCode::CREATED, Json(entry.into())))
}

/// Unblocks exactly this prefix (a covering or covered prefix stays).
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
        (status = 500, description = "The kernel maps could not be written", body = ErrorBody),
    )
)]
pub async fn remove(
    State(context): State<Context>,
    PrefixParam(prefix): PrefixParam,
) -> ApiResult<Json<BlockInfo>> {
    let Some(entry) = context
        .blocklist
        .unblock(prefix)
        .await
        .map_err(kernel_error)?
    else {
        return Err(ApiError::new(
            ErrorCode::NotFound,
            format!("{} is not on the blocklist", prefix.trunc()),
        ));
    };
    record_event(
        &context.store,
        "blocklist.removed",
        &entry,
        "api".to_owned(),
    )
    .await;
    Ok(Json(entry.into()))
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

fn kernel_error(error: DataplaneError) -> ApiError {
    ApiError::internal(format!("the kernel blocklist: {error}"))
}

/// Records an operator's change in the event log. The kernel has the change already, so a
/// failed record is logged and the request still succeeds.
async fn record_event(store: &Store, kind: &'static str, entry: &BlockEntry, detail: String) {
    let store = store.clone();
    let subject = format!("prefix {}", entry.prefix);
    let written = tokio::task::spawn_blocking(move || {
        store.write::<_, StoreError>(|tx| tx.record_event(kind, &subject, &detail).map(drop))
    })
    .await;
    let error = match written {
        Ok(Ok(())) => return,
        Ok(Err(error)) => error.to_string(),
        Err(error) => error.to_string(),
    };
    error!("event log: recording {kind} of {}: {error}", entry.prefix);
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
