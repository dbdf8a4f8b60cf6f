//! The `[[services]]` sections of the configuration: the L4 services and their backends, which
//! seed the backend set. They are checked as the backend set checks any change, through a
//! draft, so the file is refused for exactly what a change would be refused for.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

use serde::Deserialize;

use super::{Declared, Draft, validate_tier, validate_weight};
use crate::{
    dataplane::{LbSettings, ProblemSubject},
    model::{
        AdminState, Backend, BackendDef, DEFAULT_RPC_PORT, ForwardingMode, HealthCheck, Origin,
        Protocol, Service, ServiceDef, Tier,
    },
    section::Problem,
};

/// `[[services]]` in the config file.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServiceSection {
    pub vip: IpAddr,
    pub port: u16,
    #[serde(default = "default_protocol")]
    pub protocol: Protocol,
    #[serde(default)]
    pub mode: ForwardingMode,
    #[serde(default)]
    pub check: HealthCheck,
    #[serde(default)]
    pub backends: Vec<BackendSection>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BackendSection {
    pub address: SocketAddr,
    #[serde(default = "default_rpc_port")]
    pub rpc_port: u16,
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default)]
    pub admin: AdminState,
    /// 0 = primary; 1, 2, … = backups, used only while every lower tier is down.
    #[serde(default)]
    pub tier: Tier,
}

/// The services and backends the file declares, for the backend set.
pub fn declared(services: &[ServiceSection]) -> Declared {
    Declared {
        services: services
            .iter()
            .map(|service| (service_def(service), backend_defs(service).collect()))
            .collect(),
    }
}

fn service_def(service: &ServiceSection) -> ServiceDef {
    ServiceDef {
        vip: service.vip,
        port: service.port,
        protocol: service.protocol,
        mode: service.mode,
        check: service.check,
    }
}

fn backend_defs(service: &ServiceSection) -> impl Iterator<Item = BackendDef> + '_ {
    service.backends.iter().map(|backend| BackendDef {
        address: backend.address,
        rpc_port: backend.rpc_port,
        weight: backend.weight,
        admin: backend.admin,
        tier: backend.tier,
    })
}

/// Every invalid field of the services, `dataplane` settings included where the kernel would
/// refuse them for these services: what the backend set would refuse with every backend up.
pub fn problems(services: &[ServiceSection], settings: &LbSettings) -> Vec<Problem> {
    let mut problems = Vec::new();
    for (i, service) in services.iter().enumerate() {
        for (j, backend) in service.backends.iter().enumerate() {
            let field = |name: &str| format!("services[{i}].backends[{j}].{name}");
            if let Err(error) = validate_weight(backend.weight) {
                problems.push(Problem::new(field("weight"), error.to_string()));
            }
            if let Err(error) = validate_tier(backend.tier) {
                problems.push(Problem::new(field("tier"), error.to_string()));
            }
            if backend.rpc_port == 0 {
                problems.push(Problem::new(
                    field("rpc_port"),
                    "port 0 is not a port a node can listen on",
                ));
            }
        }
    }
    let draft = draft_of(services, settings);
    for problem in draft.kernel_problems(&BTreeMap::new()) {
        let field = match problem.subject {
            ProblemSubject::Setting(name) => format!("dataplane.{name}"),
            ProblemSubject::Service(index) => format!("services[{index}]"),
            ProblemSubject::Services => "services".to_owned(),
        };
        problems.push(Problem::new(field, problem.reason));
    }
    problems
}

/// A draft holding exactly the declared services, ids in file order (so a service's index in
/// the draft's specs is its index in the file).
fn draft_of(services: &[ServiceSection], settings: &LbSettings) -> Draft {
    let mut draft = Draft {
        settings: settings.clone(),
        services: BTreeMap::new(),
        backends: BTreeMap::new(),
    };
    for (service_id, service) in (0..).zip(services) {
        draft.services.insert(
            service_id,
            Service {
                id: service_id,
                def: service_def(service),
                origin: Origin::Config,
            },
        );
        for def in backend_defs(service) {
            let id = draft.backends.len() as i64;
            draft.backends.insert(
                id,
                Backend {
                    id,
                    service: service_id,
                    def,
                    origin: Origin::Config,
                },
            );
        }
    }
    draft
}

fn default_protocol() -> Protocol {
    Protocol::Tcp
}

fn default_weight() -> u32 {
    1
}

fn default_rpc_port() -> u16 {
    DEFAULT_RPC_PORT
}
