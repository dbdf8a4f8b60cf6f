//! Which backends are in rotation: admin state and health combined, with the "keep the least
//! bad" fallback when a service has no healthy backend left, and which of them are saturated.
//! Pure, so every rule is testable.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{
    health::{Badness, HealthSnapshot, Target, Verdict},
    model::{AdminState, Backend, BackendId, BackendState, HealthCheck, Service},
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
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Up => "up",
            State::Down => "down",
            State::Draining => "draining",
            State::Disabled => "disabled",
            State::Joining => "joining",
        }
    }

    pub fn kernel(self) -> BackendState {
        match self {
            State::Up => BackendState::Up,
            State::Draining => BackendState::Draining,
            State::Down | State::Disabled | State::Joining => BackendState::Down,
        }
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

/// The placement of each backend of `service`.
pub fn place<'a>(
    service: &Service,
    backends: impl IntoIterator<Item = &'a Backend>,
    health: &HealthSnapshot,
) -> BTreeMap<BackendId, Placement> {
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
            (AdminState::Enabled, None) => State::Up,
        };
        if let (AdminState::Enabled, Some(badness)) = (backend.def.admin, failure) {
            unhealthy.push((badness, backend.id, is_saturated(backend)));
        }
        placements.insert(
            backend.id,
            Placement {
                state,
                fallback: false,
                saturated: matches!(state, State::Up | State::Draining) && is_saturated(backend),
            },
        );
    }
    let any_up = placements.values().any(|p| p.state == State::Up);
    if !any_up
        && let Some(least) = unhealthy
            .iter()
            .map(|(badness, _, _)| badness)
            .min()
            .copied()
    {
        for (badness, id, saturated) in &unhealthy {
            if *badness == least {
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
