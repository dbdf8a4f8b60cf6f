//! `/v1/ha`: this lb-control's role in its HA pair. keepalived's notify hooks set it
//! (`lb-control ha notify master|backup|fault` posts to `/v1/ha/role`); `lb-control ha
//! handover` posts to `/v1/ha/handover` and follows its progress in `/v1/ha`.

use std::collections::BTreeSet;

use axum::{Json, extract::State, http::StatusCode};

use super::{
    Context,
    error::{ApiError, ApiResult},
    extract::Body,
    model::{
        ErrorBody, ErrorCode, FloatingAddress, HaStatus, HandoverInfo, HandoverRequest, RoleChange,
        Timestamp,
    },
};
use crate::ha::{
    Ha, HaError,
    handover::{DEFAULT_DRAIN, Handover, HandoverError},
    local_addresses,
};

/// The role, since when, and which floating addresses this host holds.
#[utoipa::path(
    get,
    path = "/v1/ha",
    tag = "ha",
    responses(
        (status = 200, description = "The role", body = HaStatus),
        (status = 401, description = "No or wrong bearer token", body = ErrorBody),
        (status = 500, description = "This host's addresses could not be listed", body = ErrorBody),
    )
)]
pub async fn status(State(context): State<Context>) -> ApiResult<Json<HaStatus>> {
    status_of(&context.ha, &context.handover).map(Json)
}

/// Takes the role keepalived reports (its notify hooks call `lb-control ha notify ROLE`). The
/// same role again changes nothing.
#[utoipa::path(
    post,
    path = "/v1/ha/role",
    tag = "ha",
    request_body = RoleChange,
    responses(
        (status = 200, description = "Taken; the role now", body = HaStatus),
        (status = 400, description = "`role` is not master, backup or fault", body = ErrorBody),
        (status = 401, description = "No or wrong bearer token", body = ErrorBody),
        (status = 409, description = "This lb-control has no [ha] section", body = ErrorBody),
    )
)]
pub async fn set_role(
    State(context): State<Context>,
    Body(change): Body<RoleChange>,
) -> ApiResult<Json<HaStatus>> {
    context.ha.take(change.role).map_err(|error| match error {
        HaError::NotConfigured => ApiError::new(ErrorCode::Conflict, error.to_string()),
        HaError::StandaloneInPair => ApiError::invalid_field("role", error.to_string()),
    })?;
    status_of(&context.ha, &context.handover).map(Json)
}

/// Starts a planned handover of the floating addresses to the other host of the pair (this
/// host's OS update): the flows and second chance to the other host, keepalived gives the
/// addresses up, the gateway's connections here finish. Answers once it has begun; `GET
/// /v1/ha` follows it.
#[utoipa::path(
    post,
    path = "/v1/ha/handover",
    tag = "ha",
    request_body = HandoverRequest,
    responses(
        (status = 202, description = "Begun; its progress", body = HandoverInfo),
        (status = 400, description = "`drain` is not a duration from 1s to 10m", body = ErrorBody),
        (status = 401, description = "No or wrong bearer token", body = ErrorBody),
        (status = 409, description = "Not possible here now: no [ha] or flow_sync, not master, \
            one under way, the private link filtering strictly", body = ErrorBody),
    )
)]
pub async fn hand_over(
    State(context): State<Context>,
    Body(request): Body<HandoverRequest>,
) -> ApiResult<(StatusCode, Json<HandoverInfo>)> {
    let drain = match request.drain.as_deref() {
        None => DEFAULT_DRAIN,
        Some(text) => humantime::parse_duration(text)
            .map_err(|error| ApiError::invalid_field("drain", format!("{text:?}: {error}")))?,
    };
    let state = context.handover.begin(drain).map_err(|error| match error {
        HandoverError::DrainOutOfRange(_) => ApiError::invalid_field("drain", error.to_string()),
        _ => ApiError::new(ErrorCode::Conflict, error.to_string()),
    })?;
    Ok((StatusCode::ACCEPTED, Json(state.into())))
}

fn status_of(ha: &Ha, handover: &Handover) -> ApiResult<HaStatus> {
    let state = ha.current();
    let floating = ha
        .section()
        .map(|section| section.floating_addresses.clone())
        .unwrap_or_default();
    let held = if floating.is_empty() {
        BTreeSet::new()
    } else {
        local_addresses().map_err(|error| {
            ApiError::internal(format!("listing this host's addresses: {error}"))
        })?
    };
    Ok(HaStatus {
        name: ha.name().to_owned(),
        role: state.role,
        since: Timestamp(state.since),
        records_health: state.role.records_health(),
        floating_addresses: floating
            .into_iter()
            .map(|address| FloatingAddress {
                address,
                held: held.contains(&address),
            })
            .collect(),
        handover: handover.state().map(HandoverInfo::from),
    })
}
