//! What the config file declares, and how it meets the stored set.
//!
//! The file seeds; the API changes at run time. At start, declared records the store lacks
//! are added and config records the file no longer declares are removed, but stored values
//! win for the rest, so a weight or drain set through the API survives a restart. On a reload
//! the new file is diffed against the old one, and only what changed in the file is applied.

use std::net::SocketAddr;

use super::{Cause, ChangeError, Draft};
use crate::{
    model::{BackendDef, Origin, ServiceDef, ServiceKey},
    store::Tx,
};

/// The services and backends a config file declares.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Declared {
    pub services: Vec<(ServiceDef, Vec<BackendDef>)>,
}

impl Declared {
    fn service(&self, key: ServiceKey) -> Option<&(ServiceDef, Vec<BackendDef>)> {
        self.services.iter().find(|(def, _)| def.key() == key)
    }
}

fn declared_backend(backends: &[BackendDef], address: SocketAddr) -> Option<&BackendDef> {
    backends.iter().find(|backend| backend.address == address)
}

pub(super) fn merge_at_start(
    draft: &mut Draft,
    tx: &mut Tx<'_>,
    declared: &Declared,
) -> Result<(), ChangeError> {
    remove_undeclared(draft, tx, declared)?;
    for (service_def, backend_defs) in &declared.services {
        let service = ensure_service(draft, tx, service_def)?;
        for backend_def in backend_defs {
            if find_backend(draft, service, backend_def.address).is_none() {
                draft.add_backend(tx, service, backend_def.clone(), Origin::Config)?;
            }
        }
    }
    Ok(())
}

pub(super) fn apply_diff(
    draft: &mut Draft,
    tx: &mut Tx<'_>,
    before: &Declared,
    after: &Declared,
) -> Result<(), ChangeError> {
    remove_undeclared(draft, tx, after)?;
    for (service_def, backend_defs) in &after.services {
        let old = before.service(service_def.key());
        let service = ensure_service(draft, tx, service_def)?;
        if old.is_some_and(|(old_def, _)| old_def != service_def) {
            draft.update_service(tx, service, service_def.clone())?;
        }
        for backend_def in backend_defs {
            let old_def = old.and_then(|(_, old)| declared_backend(old, backend_def.address));
            match (find_backend(draft, service, backend_def.address), old_def) {
                (None, _) => {
                    draft.add_backend(tx, service, backend_def.clone(), Origin::Config)?;
                }
                (Some(id), Some(old_def)) if old_def != backend_def => {
                    draft.update_backend(tx, id, Cause::Config.name(), |def| {
                        apply_changed_fields(def, old_def, backend_def);
                    })?;
                }
                (Some(_), _) => {}
            }
        }
    }
    Ok(())
}

/// Only the fields the file changed overwrite the running values.
fn apply_changed_fields(running: &mut BackendDef, old: &BackendDef, new: &BackendDef) {
    if old.rpc_port != new.rpc_port {
        running.rpc_port = new.rpc_port;
    }
    if old.weight != new.weight {
        running.weight = new.weight;
    }
    if old.admin != new.admin {
        running.admin = new.admin;
    }
    if old.tier != new.tier {
        running.tier = new.tier;
    }
}

/// Removes config-file services and backends that `declared` no longer holds.
fn remove_undeclared(
    draft: &mut Draft,
    tx: &mut Tx<'_>,
    declared: &Declared,
) -> Result<(), ChangeError> {
    let undeclared_services: Vec<_> = draft
        .services
        .values()
        .filter(|s| s.origin == Origin::Config && declared.service(s.def.key()).is_none())
        .map(|s| s.id)
        .collect();
    for id in undeclared_services {
        draft.remove_service(tx, id, Cause::Config)?;
    }
    let undeclared_backends: Vec<_> = draft
        .backends
        .values()
        .filter(|backend| backend.origin == Origin::Config)
        .filter(|backend| {
            let key = draft.services[&backend.service].def.key();
            declared
                .service(key)
                .and_then(|(_, defs)| declared_backend(defs, backend.def.address))
                .is_none()
        })
        .map(|backend| backend.id)
        .collect();
    for id in undeclared_backends {
        draft.remove_backend(tx, id, Cause::Config, Cause::Config.name())?;
    }
    Ok(())
}

/// The id of the service with `def`'s key, added (as a config record) if missing.
fn ensure_service(
    draft: &mut Draft,
    tx: &mut Tx<'_>,
    def: &ServiceDef,
) -> Result<i64, ChangeError> {
    let key = def.key();
    match draft.services.values().find(|s| s.def.key() == key) {
        Some(service) => Ok(service.id),
        None => Ok(draft.add_service(tx, def.clone(), Origin::Config)?.id),
    }
}

fn find_backend(draft: &Draft, service: i64, address: SocketAddr) -> Option<i64> {
    draft
        .backends
        .values()
        .find(|backend| backend.service == service && backend.def.address == address)
        .map(|backend| backend.id)
}
