//! Which backends are in rotation: admin state and health combined, tiers (new flows go to the
//! lowest tier with a backend up; the healthy backends of higher tiers stand by), the "keep the
//! least bad" fallback when a service has no healthy backend left in any tier, and which of
//! them are saturated. Pure, so every rule is testable.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{
    health::{Badness, HealthSnapshot, Target, Verdict},
    model::{AdminState, Backend, BackendId, BackendState, HealthCheck, Service, Tier},
};

/// A backend's effective state: what the kernel and the gateway act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Healthy (or not judged yet) and enabled: gets new flows.
    Up,
    /// Failed its health checks: out, its flows move to other backends.
    Down,
    /// Admin: keeps its flows, gets no new ones.
    Draining,
    /// Admin: out, its flows move to other backends.
    Disabled,
    /// Out until its node has passed `rise` checks in a row (counted from when it started
    /// joining); then enabled.
    Joining,
    /// Healthy and enabled, in a backup tier while a lower tier has a backend up: keeps the
    /// flows and clients it has (as a draining backend does), gets no new ones.
    Standby,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Up => "up",
            State::Down => "down",
            State::Draining => "draining",
            State::Disabled => "disabled",
            State::Joining => "joining",
            State::Standby => "standby",
        }
    }

    pub fn kernel(self) -> BackendState {
        match self {
            State::Up => BackendState::Up,
            State::Draining | State::Standby => BackendState::Draining,
            State::Down | State::Disabled | State::Joining => BackendState::Down,
        }
    }

    /// Whether its node keeps the flows and clients it has.
    pub fn keeps_connections(self) -> bool {
        matches!(self, State::Up | State::Draining | State::Standby)
    }
}

/// A backend's place in its service's rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub state: State,
    /// Up only because every backend of its service is unhealthy and it is among the least bad.
    pub fallback: bool,
    /// Up or draining, and its node refuses new connections ("too many connections"): it keeps
    /// its place in the kernel's table, but the gateway places no new clients on it.
    pub saturated: bool,
}

/// What the health checker checks for a backend of `service`, if anything.
pub fn health_target(service: &Service, backend: &Backend) -> Target {
    let endpoint = match service.def.check {
        HealthCheck::Tcp => backend.def.address,
        HealthCheck::Substrate | HealthCheck::None => backend.def.rpc_endpoint(),
    };
    Target {
        endpoint,
        check: service.def.check,
        joining: backend.def.admin == AdminState::Joining,
    }
}

/// Whether a joining backend of `service` may enter: its node, judged from when it started
/// joining, has passed `rise` checks in a row (at once for a service without checks).
pub fn has_risen(service: &Service, backend: &Backend, health: &HealthSnapshot) -> bool {
    if service.def.check == HealthCheck::None {
        return true;
    }
    health
        .nodes
        .get(&health_target(service, backend))
        .is_some_and(|node| node.verdict == Verdict::Healthy && node.passes >= health.rise.max(1))
}

/// The placement of each backend of `service`: healthy enabled backends of the lowest tier
/// that has one are up, those of higher tiers stand by; with none healthy in any tier, the
/// least bad (of the lowest tier among equally bad) are up as a fallback.
pub fn place<'a>(
    service: &Service,
    backends: impl IntoIterator<Item = &'a Backend>,
    health: &HealthSnapshot,
) -> BTreeMap<BackendId, Placement> {
    let backends: Vec<&Backend> = backends.into_iter().collect();
    // A backend not judged yet counts as healthy: a new backend takes traffic at once, and its
    // first check (which decides directly) takes it out if it is dead.
    let judged = |backend: &Backend| -> Option<Badness> {
        let node = health.nodes.get(&health_target(service, backend))?;
        (node.verdict == Verdict::Unhealthy).then_some(node.badness)
    };
    let is_saturated = |backend: &Backend| {
        health
            .nodes
            .get(&health_target(service, backend))
            .is_some_and(|node| node.saturated)
    };
    let serving_tier = backends
        .iter()
        .filter(|backend| backend.def.admin == AdminState::Enabled && judged(backend).is_none())
        .map(|backend| backend.def.tier)
        .min();
    let mut placements = BTreeMap::new();
    let mut unhealthy = Vec::new();
    for backend in backends {
        let failure = judged(backend);
        let state = match (backend.def.admin, &failure) {
            (AdminState::Disabled, _) => State::Disabled,
            // Enabled by the backend set once it has risen, never before.
            (AdminState::Joining, _) => State::Joining,
            (_, Some(_)) => State::Down,
            (AdminState::Draining, None) => State::Draining,
            (AdminState::Enabled, None) if Some(backend.def.tier) == serving_tier => State::Up,
            (AdminState::Enabled, None) => State::Standby,
        };
        if let (AdminState::Enabled, Some(badness)) = (backend.def.admin, failure) {
            unhealthy.push((
                (badness, backend.def.tier),
                backend.id,
                is_saturated(backend),
            ));
        }
        placements.insert(
            backend.id,
            Placement {
                state,
                fallback: false,
                saturated: state.keeps_connections() && is_saturated(backend),
            },
        );
    }
    if serving_tier.is_none()
        && let Some(least) = unhealthy.iter().map(|(rank, _, _)| rank).min().copied()
    {
        for (rank, id, saturated) in &unhealthy {
            if *rank == least {
                placements.insert(
                    *id,
                    Placement {
                        state: State::Up,
                        fallback: true,
                        saturated: *saturated,
                    },
                );
            }
        }
    }
    placements
}

/// The tier new flows of a service go to: that of its backends up (the fallback's included);
/// None while none is.
pub fn serving_tier<'a>(
    backends: impl IntoIterator<Item = &'a Backend>,
    placements: &BTreeMap<BackendId, Placement>,
) -> Option<Tier> {
    backends
        .into_iter()
        .filter(|backend| placements.get(&backend.id).map(|p| p.state) == Some(State::Up))
        .map(|backend| backend.def.tier)
        .min()
}
