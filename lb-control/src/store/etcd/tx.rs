//! One write on etcd: reads at the revision it began at, checks what SQLite's constraints
//! check (unique service keys, backend addresses, key names and secrets; a backend's service
//! exists), collects its writes, and commits them in one Txn guarded by `P/ids`.

use std::{collections::BTreeMap, time::SystemTime};

use etcd_client::{Compare, CompareOp, DeleteOptions, GetOptions, Txn, TxnOp};
use serde::de::DeserializeOwned;

use ipnet::IpNet;

use super::{Dir, EtcdStore, Ids, decode_blocklist, encode};
use crate::{
    model::{
        ApiKeyId, Backend, BackendDef, BackendId, BlockRecord, JoinTokenId, KeyCaps, Origin,
        RateLimit, Service, ServiceDef, ServiceId, ServiceKey,
    },
    store::{
        StoreError,
        record::{BlocklistEntry, EventEntry, KeyEntry, TokenEntry, unix_ms},
    },
};

pub(in crate::store) struct EtcdTx {
    store: EtcdStore,
    /// Every read of this transaction is of this revision.
    revision: i64,
    ids: Ids,
    /// `P/ids`'s mod revision when read (0: not there yet): the commit's guard.
    ids_revision: i64,
    events_kept: i64,
    /// Each kind is read on first use.
    services: Option<BTreeMap<ServiceId, Service>>,
    backends: Option<BTreeMap<BackendId, Backend>>,
    keys: Option<BTreeMap<ApiKeyId, KeyEntry>>,
    tokens: Option<BTreeMap<JoinTokenId, TokenEntry>>,
    blocklist: Option<BTreeMap<IpNet, BlockRecord>>,
    /// What the commit writes: a key's new value, or None to delete it. A map, because etcd
    /// refuses a Txn that writes one key twice.
    writes: BTreeMap<String, Option<Vec<u8>>>,
}

impl EtcdTx {
    pub(super) fn begin(store: EtcdStore, events_kept: i64) -> Result<EtcdTx, StoreError> {
        let (kvs, revision) = store.range(store.inner.layout.ids(), GetOptions::new())?;
        let (ids, ids_revision) = match kvs.first() {
            Some(kv) => (store.decode(kv)?, kv.mod_revision()),
            None => (Ids::default(), 0),
        };
        Ok(EtcdTx {
            store,
            revision,
            ids,
            ids_revision,
            events_kept,
            services: None,
            backends: None,
            keys: None,
            tokens: None,
            blocklist: None,
            writes: BTreeMap::new(),
        })
    }

    /// Sends the writes; false if another lb-control wrote since this transaction began (then
    /// nothing was written, and the caller runs the write again).
    pub(super) fn commit(mut self) -> Result<bool, StoreError> {
        if self.writes.is_empty() {
            return Ok(true);
        }
        let layout = self.store.inner.layout.clone();
        let cut = self.ids.events - self.events_kept;
        if cut > 0 {
            // Events this very write recorded and the cap drops at once are not written: etcd
            // refuses a Txn that puts a key inside a range it deletes.
            let first_kept = layout.key(Dir::Events, cut + 1);
            let events = layout.dir(Dir::Events);
            self.writes
                .retain(|key, _| !key.starts_with(&events) || *key >= first_kept);
        }
        let mut ops: Vec<TxnOp> = self
            .writes
            .into_iter()
            .map(|(key, value)| match value {
                Some(value) => TxnOp::put(key, value, None),
                None => TxnOp::delete(key, None),
            })
            .collect();
        ops.push(TxnOp::put(layout.ids(), encode(&self.ids), None));
        if cut > 0 {
            ops.push(TxnOp::delete(
                layout.key(Dir::Events, 0),
                Some(DeleteOptions::new().with_range(layout.key(Dir::Events, cut + 1))),
            ));
        }
        let guard = Compare::mod_revision(layout.ids(), CompareOp::Equal, self.ids_revision);
        Ok(self
            .store
            .commit(Txn::new().when([guard]).and_then(ops))?
            .is_some())
    }

    fn load<T: DeserializeOwned>(
        &self,
        dir: Dir,
        id: impl Fn(&T) -> i64,
    ) -> Result<BTreeMap<i64, T>, StoreError> {
        let options = GetOptions::new().with_prefix().with_revision(self.revision);
        let (kvs, _) = self
            .store
            .range(self.store.inner.layout.dir(dir), options)?;
        kvs.iter()
            .map(|kv| {
                let record: T = self.store.decode(kv)?;
                Ok((id(&record), record))
            })
            .collect()
    }

    fn services_mut(&mut self) -> Result<&mut BTreeMap<ServiceId, Service>, StoreError> {
        if self.services.is_none() {
            self.services = Some(self.load(Dir::Services, |s: &Service| s.id)?);
        }
        Ok(self.services.get_or_insert_default())
    }

    fn backends_mut(&mut self) -> Result<&mut BTreeMap<BackendId, Backend>, StoreError> {
        if self.backends.is_none() {
            self.backends = Some(self.load(Dir::Backends, |b: &Backend| b.id)?);
        }
        Ok(self.backends.get_or_insert_default())
    }

    fn keys_mut(&mut self) -> Result<&mut BTreeMap<ApiKeyId, KeyEntry>, StoreError> {
        if self.keys.is_none() {
            self.keys = Some(self.load(Dir::Keys, |k: &KeyEntry| k.id)?);
        }
        Ok(self.keys.get_or_insert_default())
    }

    fn tokens_mut(&mut self) -> Result<&mut BTreeMap<JoinTokenId, TokenEntry>, StoreError> {
        if self.tokens.is_none() {
            self.tokens = Some(self.load(Dir::JoinTokens, |t: &TokenEntry| t.id)?);
        }
        Ok(self.tokens.get_or_insert_default())
    }

    fn blocklist_mut(&mut self) -> Result<&mut BTreeMap<IpNet, BlockRecord>, StoreError> {
        if self.blocklist.is_none() {
            let options = GetOptions::new().with_prefix().with_revision(self.revision);
            let (kvs, _) = self
                .store
                .range(self.store.inner.layout.dir(Dir::Blocklist), options)?;
            let records = decode_blocklist(&self.store.inner.endpoints, &kvs)?;
            self.blocklist = Some(
                records
                    .into_iter()
                    .map(|record| (record.prefix, record))
                    .collect(),
            );
        }
        Ok(self.blocklist.get_or_insert_default())
    }

    fn block_key(&self, prefix: IpNet) -> String {
        self.store
            .inner
            .layout
            .named_key(Dir::Blocklist, &prefix.to_string())
    }

    fn put(&mut self, dir: Dir, id: i64, value: &impl serde::Serialize) {
        let key = self.store.inner.layout.key(dir, id);
        self.writes.insert(key, Some(encode(value)));
    }

    fn delete(&mut self, dir: Dir, id: i64) {
        let key = self.store.inner.layout.key(dir, id);
        self.writes.insert(key, None);
    }

    pub(in crate::store) fn services(&mut self) -> Result<Vec<Service>, StoreError> {
        Ok(self.services_mut()?.values().cloned().collect())
    }

    pub(in crate::store) fn backends(&mut self) -> Result<Vec<Backend>, StoreError> {
        Ok(self.backends_mut()?.values().cloned().collect())
    }

    fn check_service_key(&mut self, id: ServiceId, def: &ServiceDef) -> Result<(), StoreError> {
        let key = def.key();
        if self
            .services_mut()?
            .values()
            .any(|s| s.id != id && s.def.key() == key)
        {
            return Err(StoreError::Conflict {
                what: format!("a service {key}"),
            });
        }
        Ok(())
    }

    pub(in crate::store) fn insert_service(
        &mut self,
        def: &ServiceDef,
        origin: Origin,
    ) -> Result<ServiceId, StoreError> {
        self.check_service_key(0, def)?;
        self.ids.services += 1;
        let service = Service {
            id: self.ids.services,
            def: def.clone(),
            origin,
        };
        self.put(Dir::Services, service.id, &service);
        self.services_mut()?.insert(service.id, service);
        Ok(self.ids.services)
    }

    pub(in crate::store) fn update_service(
        &mut self,
        id: ServiceId,
        def: &ServiceDef,
    ) -> Result<bool, StoreError> {
        if !self.services_mut()?.contains_key(&id) {
            return Ok(false);
        }
        self.check_service_key(id, def)?;
        let service = self.services_mut()?.get_mut(&id).expect("checked above");
        service.def = def.clone();
        let service = service.clone();
        self.put(Dir::Services, id, &service);
        Ok(true)
    }

    /// Its backends go with it, as SQLite's ON DELETE CASCADE has them.
    pub(in crate::store) fn delete_service(&mut self, id: ServiceId) -> Result<bool, StoreError> {
        if self.services_mut()?.remove(&id).is_none() {
            return Ok(false);
        }
        self.delete(Dir::Services, id);
        let orphans: Vec<BackendId> = self
            .backends_mut()?
            .values()
            .filter(|backend| backend.service == id)
            .map(|backend| backend.id)
            .collect();
        for backend in orphans {
            self.delete_backend(backend)?;
        }
        Ok(true)
    }

    fn check_backend_address(
        &mut self,
        id: BackendId,
        service: ServiceId,
        def: &BackendDef,
    ) -> Result<(), StoreError> {
        if self
            .backends_mut()?
            .values()
            .any(|b| b.id != id && b.service == service && b.def.address == def.address)
        {
            return Err(StoreError::Conflict {
                what: format!("a backend {} in service {service}", def.address),
            });
        }
        Ok(())
    }

    pub(in crate::store) fn insert_backend(
        &mut self,
        service: ServiceId,
        def: &BackendDef,
        origin: Origin,
    ) -> Result<BackendId, StoreError> {
        if !self.services_mut()?.contains_key(&service) {
            return Err(StoreError::NotFound {
                what: format!("service {service}"),
            });
        }
        self.check_backend_address(0, service, def)?;
        self.ids.backends += 1;
        let backend = Backend {
            id: self.ids.backends,
            service,
            def: def.clone(),
            origin,
        };
        self.put(Dir::Backends, backend.id, &backend);
        self.backends_mut()?.insert(backend.id, backend);
        Ok(self.ids.backends)
    }

    pub(in crate::store) fn update_backend(
        &mut self,
        id: BackendId,
        def: &BackendDef,
    ) -> Result<bool, StoreError> {
        let Some(service) = self.backends_mut()?.get(&id).map(|b| b.service) else {
            return Ok(false);
        };
        self.check_backend_address(id, service, def)?;
        let backend = self.backends_mut()?.get_mut(&id).expect("checked above");
        backend.def = def.clone();
        let backend = backend.clone();
        self.put(Dir::Backends, id, &backend);
        Ok(true)
    }

    pub(in crate::store) fn delete_backend(&mut self, id: BackendId) -> Result<bool, StoreError> {
        if self.backends_mut()?.remove(&id).is_none() {
            return Ok(false);
        }
        self.delete(Dir::Backends, id);
        Ok(true)
    }

    pub(in crate::store) fn insert_api_key(
        &mut self,
        name: &str,
        secret_sha256: &[u8; 32],
        rate_limit: Option<RateLimit>,
        created: SystemTime,
    ) -> Result<ApiKeyId, StoreError> {
        let secret = hex::encode(secret_sha256);
        let keys = self.keys_mut()?;
        if keys.values().any(|key| key.name == name) {
            return Err(StoreError::Conflict {
                what: format!("an API key named {name}"),
            });
        }
        if keys.values().any(|key| key.secret_sha256 == secret) {
            return Err(StoreError::Conflict {
                what: "an API key with this secret".to_owned(),
            });
        }
        self.ids.api_keys += 1;
        let entry = KeyEntry {
            id: self.ids.api_keys,
            name: name.to_owned(),
            secret_sha256: secret,
            rate_limit,
            caps: KeyCaps::default(),
            created_ms: unix_ms(created),
            last_used_ms: None,
            revoked_ms: None,
        };
        self.put(Dir::Keys, entry.id, &entry);
        self.keys_mut()?.insert(entry.id, entry);
        Ok(self.ids.api_keys)
    }

    /// Changes key `id` with `change` (false: nothing to change); false if there is no such key.
    fn change_key(
        &mut self,
        id: ApiKeyId,
        change: impl FnOnce(&mut KeyEntry) -> bool,
    ) -> Result<bool, StoreError> {
        let Some(entry) = self.keys_mut()?.get_mut(&id) else {
            return Ok(false);
        };
        if !change(entry) {
            return Ok(false);
        }
        let entry = entry.clone();
        self.put(Dir::Keys, id, &entry);
        Ok(true)
    }

    pub(in crate::store) fn revoke_api_key(
        &mut self,
        id: ApiKeyId,
        at: SystemTime,
    ) -> Result<bool, StoreError> {
        self.change_key(id, |entry| {
            let first = entry.revoked_ms.is_none();
            entry.revoked_ms.get_or_insert(unix_ms(at));
            first
        })
    }

    pub(in crate::store) fn set_api_key_limit(
        &mut self,
        id: ApiKeyId,
        rate_limit: Option<RateLimit>,
    ) -> Result<bool, StoreError> {
        self.change_key(id, |entry| {
            entry.rate_limit = rate_limit;
            true
        })
    }

    pub(in crate::store) fn set_api_key_caps(
        &mut self,
        id: ApiKeyId,
        caps: KeyCaps,
    ) -> Result<bool, StoreError> {
        self.change_key(id, |entry| {
            entry.caps = caps;
            true
        })
    }

    pub(in crate::store) fn insert_join_token(
        &mut self,
        name: &str,
        secret_sha256: &[u8; 32],
        services: &[ServiceKey],
        created: SystemTime,
    ) -> Result<JoinTokenId, StoreError> {
        let secret = hex::encode(secret_sha256);
        let tokens = self.tokens_mut()?;
        if tokens.values().any(|token| token.name == name) {
            return Err(StoreError::Conflict {
                what: format!("a join token named {name}"),
            });
        }
        if tokens.values().any(|token| token.secret_sha256 == secret) {
            return Err(StoreError::Conflict {
                what: "a join token with this secret".to_owned(),
            });
        }
        self.ids.join_tokens += 1;
        let entry = TokenEntry {
            id: self.ids.join_tokens,
            name: name.to_owned(),
            secret_sha256: secret,
            services: services.iter().map(ToString::to_string).collect(),
            created_ms: unix_ms(created),
            revoked_ms: None,
        };
        self.put(Dir::JoinTokens, entry.id, &entry);
        self.tokens_mut()?.insert(entry.id, entry);
        Ok(self.ids.join_tokens)
    }

    pub(in crate::store) fn revoke_join_token(
        &mut self,
        id: JoinTokenId,
        at: SystemTime,
    ) -> Result<bool, StoreError> {
        let Some(entry) = self.tokens_mut()?.get_mut(&id) else {
            return Ok(false);
        };
        if entry.revoked_ms.is_some() {
            return Ok(false);
        }
        entry.revoked_ms = Some(unix_ms(at));
        let entry = entry.clone();
        self.put(Dir::JoinTokens, id, &entry);
        Ok(true)
    }

    pub(in crate::store) fn blocklist(&mut self) -> Result<Vec<BlockRecord>, StoreError> {
        Ok(self.blocklist_mut()?.values().cloned().collect())
    }

    pub(in crate::store) fn put_block(&mut self, record: &BlockRecord) -> Result<(), StoreError> {
        self.blocklist_mut()?.insert(record.prefix, record.clone());
        let key = self.block_key(record.prefix);
        self.writes
            .insert(key, Some(encode(&BlocklistEntry::from_record(record))));
        Ok(())
    }

    pub(in crate::store) fn delete_block(
        &mut self,
        prefix: IpNet,
    ) -> Result<Option<BlockRecord>, StoreError> {
        let removed = self.blocklist_mut()?.remove(&prefix);
        if removed.is_some() {
            let key = self.block_key(prefix);
            self.writes.insert(key, None);
        }
        Ok(removed)
    }

    pub(in crate::store) fn record_event(
        &mut self,
        kind: &str,
        subject: &str,
        detail: &str,
    ) -> Result<i64, StoreError> {
        self.ids.events += 1;
        let event = EventEntry {
            id: self.ids.events,
            at_ms: unix_ms(SystemTime::now()),
            kind: kind.to_owned(),
            subject: subject.to_owned(),
            detail: detail.to_owned(),
        };
        self.put(Dir::Events, event.id, &event);
        Ok(event.id)
    }
}
