//! `/v1/gateway`: what the gateway serves from: the tier its new clients go to, and the other
//! sites' gateways it falls back to, with their health.

use axum::{Json, extract::State};

use super::{
    Context,
    model::{ErrorBody, GatewayInfo, HealthInfo, RemoteInfo},
};
use crate::health::Target;

/// The gateway's serving tier and its remote gateways (`enabled` false without a gateway).
#[utoipa::path(
    get,
    path = "/v1/gateway",
    tag = "status",
    responses(
        (status = 200, description = "The gateway's nodes", body = GatewayInfo),
        (status = 401, description = "No or wrong bearer token", body = ErrorBody),
    )
)]
pub async fn status(State(context): State<Context>) -> Json<GatewayInfo> {
    let Some(gateway) = &context.gateway else {
        return Json(GatewayInfo::default());
    };
    let health = context.backends.health().await;
    Json(GatewayInfo {
        enabled: true,
        serving_tier: gateway.serving_tier(),
        healthy_nodes: gateway.healthy_nodes(),
        remotes: gateway
            .remotes()
            .iter()
            .map(|remote| RemoteInfo {
                url: remote.url.clone(),
                tier: remote.tier,
                node: remote.node,
                health: health
                    .nodes
                    .get(&Target::substrate(remote.node))
                    .cloned()
                    .map(HealthInfo::from),
            })
            .collect(),
    })
}
