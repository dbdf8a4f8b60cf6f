//! What the cluster is doing: kernel counters, health, and the event log.

use std::collections::BTreeMap;

use axum::{Json, extract::State};
use prometheus_client::registry::Registry;

use super::{
    Context,
    error::{ApiError, ApiResult},
    extract::Query,
    model::{
        BackendInfo, ClusterHealth, DEFAULT_EVENT_LIMIT, ErrorBody, EventInfo, EventQuery,
        MAX_EVENT_LIMIT, StatsReport,
    },
    run_blocking,
};
use crate::dataplane::read_pinned_stats;

/// The kernel's counters (summed over CPUs) and the gateway's.
#[utoipa::path(
    get,
    path = "/v1/stats",
    tag = "status",
    responses(
        (status = 200, description = "Counters", body = StatsReport),
        (status = 401, description = "No or wrong bearer token", body = ErrorBody),
        (status = 500, description = "The kernel maps could not be read", body = ErrorBody),
    )
)]
pub async fn stats(State(context): State<Context>) -> ApiResult<Json<StatsReport>> {
    let pin_dir = context.pin_dir.clone();
    let stats = run_blocking(move || {
        read_pinned_stats(&pin_dir)
            .map_err(|error| ApiError::internal(format!("kernel counters: {error}")))
    })
    .await?;
    let mut report = StatsReport::from(&stats);
    report.gateway = gateway_counters(&context.registry)?;
    Ok(Json(report))
}

/// The gateway's counters and gauges as `/metrics` shows them (`lb_gateway_…` samples, by
/// name and labels; histogram buckets left out), so the two can never disagree.
fn gateway_counters(registry: &Registry) -> ApiResult<BTreeMap<String, u64>> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode_registry(&mut text, registry)
        .map_err(|error| ApiError::internal(format!("encoding the gateway counters: {error}")))?;
    Ok(text
        .lines()
        .filter(|line| line.starts_with("lb_gateway_") && !line.contains("_bucket{"))
        .filter_map(|line| {
            let (sample, value) = line.rsplit_once(' ')?;
            Some((sample.to_owned(), value.parse::<f64>().ok()? as u64))
        })
        .collect())
}

/// The cluster's best block and every node's state and health.
#[utoipa::path(
    get,
    path = "/v1/health",
    tag = "status",
    responses(
        (status = 200, description = "Cluster health", body = ClusterHealth),
        (status = 401, description = "No or wrong bearer token", body = ErrorBody),
    )
)]
pub async fn health(State(context): State<Context>) -> Json<ClusterHealth> {
    let snapshot = context.backends.health().await;
    let nodes = context.backends.backend_statuses().await;
    Json(ClusterHealth {
        cluster_best: snapshot.cluster_best,
        nodes: nodes.into_iter().map(BackendInfo::from).collect(),
    })
}

/// The event log, oldest first: every change of the backend set and of API keys.
#[utoipa::path(
    get,
    path = "/v1/events",
    tag = "status",
    params(EventQuery),
    responses(
        (status = 200, description = "Events, oldest first", body = Vec<EventInfo>),
        (status = 400, description = "A query parameter is invalid", body = ErrorBody),
        (status = 401, description = "No or wrong bearer token", body = ErrorBody),
        (status = 500, description = "The state store failed", body = ErrorBody),
    )
)]
pub async fn events(
    State(context): State<Context>,
    Query(query): Query<EventQuery>,
) -> ApiResult<Json<Vec<EventInfo>>> {
    let limit = query.limit.unwrap_or(DEFAULT_EVENT_LIMIT);
    if !(1..=MAX_EVENT_LIMIT).contains(&limit) {
        return Err(ApiError::invalid_field(
            "limit",
            format!("{limit} is out of range: use 1 to {MAX_EVENT_LIMIT}"),
        ));
    }
    let store = context.store.clone();
    let events = run_blocking(move || {
        match query.after {
            Some(after) => store.events(Some(after), limit),
            None => store.recent_events(limit),
        }
        .map_err(|error| ApiError::store(&error))
    })
    .await?;
    Ok(Json(events.into_iter().map(EventInfo::from).collect()))
}
