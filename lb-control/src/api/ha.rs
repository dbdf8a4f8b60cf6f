//! `/v1/ha`: this lb-control's role in its HA pair. keepalived's notify hooks set it
//! (`lb-control ha notify master|backup|fault` posts to `/v1/ha/role`).

use std::collections::BTreeSet;

use axum::{Json, extract::State};

use super::{
    Context,
    error::{ApiError, ApiResult},
    extract::Body,
    model::{ErrorBody, ErrorCode, FloatingAddress, HaStatus, RoleChange, Timestamp},
};
use crate::ha::{Ha, HaError, local_addresses};

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
    status_of(&context.ha).map(Json)
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
    status_of(&context.ha).map(Json)
}

fn status_of(ha: &Ha) -> ApiResult<HaStatus> {
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
    })
}
