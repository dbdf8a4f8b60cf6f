use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use super::{Store, StoreError, schema::SCHEMA_VERSION};
use crate::model::{
    AdminState, ApiKeyRecord, Backend, BackendDef, ForwardingMode, HealthCheck, Origin, Protocol,
    RateLimit, Service, ServiceDef,
};

/// A fresh directory under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "lb-store-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&dir).expect("creating the test directory");
        TempDir(dir)
    }

    fn db(&self) -> PathBuf {
        self.0.join("state.db")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn open(dir: &TempDir) -> Store {
    Store::open(&dir.db()).expect("opening the store")
}

/// A time the store keeps exactly: whole milliseconds.
fn at(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(1_700_000_000_000 + ms)
}

fn service_def(vip: &str, port: u16) -> ServiceDef {
    ServiceDef {
        vip: vip.parse().expect("test VIP"),
        port,
        protocol: Protocol::Tcp,
        mode: ForwardingMode::Nat,
        check: HealthCheck::Substrate,
    }
}

fn backend_def(address: &str) -> BackendDef {
    BackendDef {
        address: address.parse().expect("test backend address"),
        rpc_port: 9944,
        weight: 1,
        admin: AdminState::Enabled,
    }
}

fn conflict_message(result: Result<impl std::fmt::Debug, StoreError>) -> String {
    match result {
        Err(error @ StoreError::Conflict { .. }) => error.to_string(),
        other => panic!("expected a conflict, got {other:?}"),
    }
}

#[test]
fn every_record_round_trips_and_survives_reopen() {
    let dir = TempDir::new();
    let store = open(&dir);
    let v4 = ServiceDef {
        vip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)),
        port: 9944,
        protocol: Protocol::Tcp,
        mode: ForwardingMode::Nat,
        check: HealthCheck::Substrate,
    };
    let v6 = ServiceDef {
        vip: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
        port: 30333,
        protocol: Protocol::Udp,
        mode: ForwardingMode::Dsr,
        check: HealthCheck::None,
    };
    let b1 = BackendDef {
        address: SocketAddr::new(Ipv4Addr::new(198, 51, 100, 11).into(), 9944),
        rpc_port: 9944,
        weight: 3,
        admin: AdminState::Draining,
    };
    let b2 = BackendDef {
        address: "[2001:db8::11]:30333".parse().expect("address"),
        rpc_port: 9945,
        weight: u32::MAX,
        admin: AdminState::Disabled,
    };
    let tcp = ServiceDef {
        check: HealthCheck::Tcp,
        ..service_def("192.0.2.20", 443)
    };
    let limit = RateLimit {
        rps: 50,
        burst: 100,
    };
    let (s1, s2, s3, k1, k2) = store
        .write(|tx| -> Result<_, StoreError> {
            let s1 = tx.insert_service(&v4, Origin::Config)?;
            let s2 = tx.insert_service(&v6, Origin::Api)?;
            let s3 = tx.insert_service(&tcp, Origin::Api)?;
            let k1 = tx.insert_api_key("alice", &[1; 32], Some(limit), at(1))?;
            let k2 = tx.insert_api_key("bob", &[2; 32], None, at(2))?;
            Ok((s1, s2, s3, k1, k2))
        })
        .expect("first write");
    let (b1_id, b2_id) = store
        .write(|tx| -> Result<_, StoreError> {
            let b1_id = tx.insert_backend(s1, &b1, Origin::Config)?;
            let b2_id = tx.insert_backend(s2, &b2, Origin::Api)?;
            assert!(tx.revoke_api_key(k2, at(5))?);
            tx.record_event("service.added", "service 1", "config")?;
            tx.record_event("key.revoked", "key 2 (bob)", "api")?;
            Ok((b1_id, b2_id))
        })
        .expect("second write");
    store
        .touch_api_keys(&[(k1, at(3))])
        .expect("touching a key");

    let services = vec![
        Service {
            id: s1,
            def: v4,
            origin: Origin::Config,
        },
        Service {
            id: s2,
            def: v6,
            origin: Origin::Api,
        },
        Service {
            id: s3,
            def: tcp,
            origin: Origin::Api,
        },
    ];
    let backends = vec![
        Backend {
            id: b1_id,
            service: s1,
            def: b1,
            origin: Origin::Config,
        },
        Backend {
            id: b2_id,
            service: s2,
            def: b2,
            origin: Origin::Api,
        },
    ];
    let keys = vec![
        ApiKeyRecord {
            id: k1,
            name: "alice".into(),
            secret_sha256: [1; 32],
            rate_limit: Some(limit),
            created: at(1),
            last_used: Some(at(3)),
            revoked: None,
        },
        ApiKeyRecord {
            id: k2,
            name: "bob".into(),
            secret_sha256: [2; 32],
            rate_limit: None,
            created: at(2),
            last_used: None,
            revoked: Some(at(5)),
        },
    ];
    let check = |store: &Store| {
        assert_eq!(store.services().expect("services"), services);
        assert_eq!(store.backends().expect("backends"), backends);
        assert_eq!(store.api_keys().expect("keys"), keys);
        let events = store.events(None, 10).expect("events");
        let summary: Vec<_> = events
            .iter()
            .map(|e| (e.kind.as_str(), e.subject.as_str(), e.detail.as_str()))
            .collect();
        assert_eq!(
            summary,
            [
                ("service.added", "service 1", "config"),
                ("key.revoked", "key 2 (bob)", "api"),
            ]
        );
        events
    };
    let events = check(&store);
    drop(store);
    let reopened = open(&dir);
    assert_eq!(check(&reopened), events, "events differ after reopen");
}

#[test]
fn updates_replace_the_definition_and_keep_origin() {
    let dir = TempDir::new();
    let store = open(&dir);
    let (service, backend) = store
        .write(|tx| -> Result<_, StoreError> {
            let service = tx.insert_service(&service_def("192.0.2.1", 80), Origin::Config)?;
            let backend = tx.insert_backend(service, &backend_def("10.0.0.1:80"), Origin::Api)?;
            Ok((service, backend))
        })
        .expect("insert");
    let new_service = ServiceDef {
        mode: ForwardingMode::Dsr,
        ..service_def("192.0.2.2", 81)
    };
    let new_backend = BackendDef {
        weight: 7,
        admin: AdminState::Draining,
        ..backend_def("10.0.0.2:80")
    };
    store
        .write(|tx| -> Result<_, StoreError> {
            assert!(tx.update_service(service, &new_service)?);
            assert!(tx.update_backend(backend, &new_backend)?);
            assert!(!tx.update_service(service + 100, &new_service)?);
            assert!(!tx.update_backend(backend + 100, &new_backend)?);
            Ok(())
        })
        .expect("update");
    let services = store.services().expect("services");
    assert_eq!(
        (services[0].def.clone(), services[0].origin),
        (new_service, Origin::Config)
    );
    let backends = store.backends().expect("backends");
    assert_eq!(
        (backends[0].def.clone(), backends[0].origin),
        (new_backend, Origin::Api)
    );
}

#[test]
fn ids_are_never_reused_after_delete_even_across_reopen() {
    let dir = TempDir::new();
    let store = open(&dir);
    let (service, backend) = store
        .write(|tx| -> Result<_, StoreError> {
            let service = tx.insert_service(&service_def("192.0.2.1", 80), Origin::Api)?;
            let backend = tx.insert_backend(service, &backend_def("10.0.0.1:80"), Origin::Api)?;
            Ok((service, backend))
        })
        .expect("insert");
    store
        .write(|tx| -> Result<_, StoreError> {
            assert!(tx.delete_backend(backend)?);
            assert!(tx.delete_service(service)?);
            assert!(!tx.delete_service(service)?);
            assert!(!tx.delete_backend(backend)?);
            Ok(())
        })
        .expect("delete");
    drop(store);
    let store = open(&dir);
    let (service2, backend2) = store
        .write(|tx| -> Result<_, StoreError> {
            let service = tx.insert_service(&service_def("192.0.2.1", 80), Origin::Api)?;
            let backend = tx.insert_backend(service, &backend_def("10.0.0.1:80"), Origin::Api)?;
            Ok((service, backend))
        })
        .expect("insert again");
    assert!(
        service2 > service,
        "service id {service} reused as {service2}"
    );
    assert!(
        backend2 > backend,
        "backend id {backend} reused as {backend2}"
    );
}

#[test]
fn deleting_a_service_cascades_its_backends() {
    let dir = TempDir::new();
    let store = open(&dir);
    let kept_service = store
        .write(|tx| -> Result<_, StoreError> {
            let gone = tx.insert_service(&service_def("192.0.2.1", 80), Origin::Api)?;
            let kept = tx.insert_service(&service_def("192.0.2.2", 80), Origin::Api)?;
            tx.insert_backend(gone, &backend_def("10.0.0.1:80"), Origin::Api)?;
            tx.insert_backend(gone, &backend_def("10.0.0.2:80"), Origin::Api)?;
            tx.insert_backend(kept, &backend_def("10.0.0.1:80"), Origin::Api)?;
            assert!(tx.delete_service(gone)?);
            Ok(kept)
        })
        .expect("write");
    let backends = store.backends().expect("backends");
    assert_eq!(backends.len(), 1);
    assert_eq!(backends[0].service, kept_service);
}

#[test]
fn duplicate_service_is_a_conflict_naming_it() {
    let dir = TempDir::new();
    let store = open(&dir);
    let other = store
        .write(|tx| -> Result<_, StoreError> {
            tx.insert_service(&service_def("10.0.0.1", 80), Origin::Config)?;
            // Same VIP and port over UDP is another service.
            let udp = ServiceDef {
                protocol: Protocol::Udp,
                ..service_def("10.0.0.1", 80)
            };
            tx.insert_service(&udp, Origin::Config)?;
            tx.insert_service(&service_def("10.0.0.2", 80), Origin::Config)
        })
        .expect("distinct services");
    let duplicate = ServiceDef {
        mode: ForwardingMode::Dsr,
        ..service_def("10.0.0.1", 80)
    };
    assert_eq!(
        conflict_message(store.write(|tx| tx.insert_service(&duplicate, Origin::Api))),
        "a service 10.0.0.1:80/tcp already exists"
    );
    assert_eq!(
        conflict_message(store.write(|tx| tx.update_service(other, &duplicate))),
        "a service 10.0.0.1:80/tcp already exists"
    );
}

#[test]
fn duplicate_backend_is_a_conflict_naming_it() {
    let dir = TempDir::new();
    let store = open(&dir);
    let (service, other) = store
        .write(|tx| -> Result<_, StoreError> {
            let service = tx.insert_service(&service_def("192.0.2.1", 80), Origin::Api)?;
            let second = tx.insert_service(&service_def("192.0.2.2", 80), Origin::Api)?;
            tx.insert_backend(service, &backend_def("10.0.0.1:80"), Origin::Api)?;
            // The same node may back another service.
            tx.insert_backend(second, &backend_def("10.0.0.1:80"), Origin::Api)?;
            let other = tx.insert_backend(service, &backend_def("10.0.0.2:80"), Origin::Api)?;
            Ok((service, other))
        })
        .expect("distinct backends");
    let expected = format!("a backend 10.0.0.1:80 in service {service} already exists");
    assert_eq!(
        conflict_message(store.write(|tx| tx.insert_backend(
            service,
            &backend_def("10.0.0.1:80"),
            Origin::Config
        ))),
        expected
    );
    assert_eq!(
        conflict_message(store.write(|tx| tx.update_backend(other, &backend_def("10.0.0.1:80")))),
        expected
    );
}

#[test]
fn backend_of_a_missing_service_is_refused() {
    let dir = TempDir::new();
    let store = open(&dir);
    let result = store.write(|tx| tx.insert_backend(42, &backend_def("10.0.0.1:80"), Origin::Api));
    assert!(
        matches!(result, Err(StoreError::Sql(_))),
        "expected a foreign key error, got {result:?}"
    );
}

#[test]
fn duplicate_key_name_or_secret_is_a_conflict_naming_it() {
    let dir = TempDir::new();
    let store = open(&dir);
    store
        .write(|tx| tx.insert_api_key("alice", &[1; 32], None, at(0)))
        .expect("first key");
    assert_eq!(
        conflict_message(store.write(|tx| tx.insert_api_key("alice", &[2; 32], None, at(0)))),
        "an API key named alice already exists"
    );
    assert_eq!(
        conflict_message(store.write(|tx| tx.insert_api_key("bob", &[1; 32], None, at(0)))),
        "an API key with this secret already exists"
    );
}

#[test]
fn failed_write_leaves_nothing_behind() {
    let dir = TempDir::new();
    let store = open(&dir);
    let result: Result<(), _> = store.write(|tx| -> Result<_, StoreError> {
        let service = tx.insert_service(&service_def("192.0.2.1", 80), Origin::Api)?;
        tx.insert_backend(service, &backend_def("10.0.0.1:80"), Origin::Api)?;
        tx.insert_api_key("alice", &[1; 32], None, at(0))?;
        tx.record_event("service.added", "service 1", "api")?;
        tx.insert_service(&service_def("192.0.2.1", 80), Origin::Api)?;
        Ok(())
    });
    assert!(
        matches!(result, Err(StoreError::Conflict { .. })),
        "{result:?}"
    );
    drop(store);
    let store = open(&dir);
    assert_eq!(store.services().expect("services"), []);
    assert_eq!(store.backends().expect("backends"), []);
    assert_eq!(store.api_keys().expect("keys"), []);
    assert_eq!(store.events(None, 10).expect("events"), []);
}

#[test]
fn newer_schema_is_refused_naming_both_versions() {
    let dir = TempDir::new();
    drop(open(&dir));
    let newer = SCHEMA_VERSION + 1;
    rusqlite::Connection::open(dir.db())
        .and_then(|conn| conn.pragma_update(None, "user_version", newer))
        .expect("raising the schema version");
    let error = Store::open(&dir.db())
        .err()
        .expect("a newer schema is refused");
    assert!(
        matches!(error, StoreError::NewerSchema { found, supported, .. }
            if found == newer && supported == SCHEMA_VERSION),
        "{error:?}"
    );
    assert_eq!(
        error.to_string(),
        format!(
            "state store {}: schema version {newer} is newer than this lb-control supports \
             ({SCHEMA_VERSION}); use a newer lb-control or restore a backup",
            dir.db().display()
        )
    );
}

#[test]
fn new_file_is_at_the_current_schema_version() {
    let dir = TempDir::new();
    drop(open(&dir));
    let version: i64 = rusqlite::Connection::open(dir.db())
        .and_then(|conn| conn.pragma_query_value(None, "user_version", |row| row.get(0)))
        .expect("reading the schema version");
    assert_eq!(version, SCHEMA_VERSION);
    // Reopening a current file applies nothing and keeps it current.
    drop(open(&dir));
}

#[test]
fn api_key_by_hash_finds_the_key() {
    let dir = TempDir::new();
    let store = open(&dir);
    let id = store
        .write(|tx| -> Result<_, StoreError> {
            tx.insert_api_key("alice", &[1; 32], None, at(0))?;
            tx.insert_api_key("bob", &[2; 32], Some(RateLimit { rps: 1, burst: 1 }), at(0))
        })
        .expect("keys");
    let found = store.api_key_by_hash(&[2; 32]).expect("lookup");
    assert_eq!(
        found.map(|key| (key.id, key.name)),
        Some((id, "bob".to_owned()))
    );
    assert_eq!(store.api_key_by_hash(&[3; 32]).expect("lookup"), None);
}

#[test]
fn key_revocation_and_limit_changes_apply_once_to_existing_keys() {
    let dir = TempDir::new();
    let store = open(&dir);
    let limit = RateLimit { rps: 5, burst: 10 };
    let id = store
        .write(|tx| tx.insert_api_key("alice", &[1; 32], None, at(0)))
        .expect("key");
    store
        .write(|tx| -> Result<_, StoreError> {
            assert!(tx.set_api_key_limit(id, Some(limit))?);
            assert!(!tx.set_api_key_limit(id + 1, Some(limit))?);
            assert!(tx.revoke_api_key(id, at(1))?);
            assert!(!tx.revoke_api_key(id, at(2))?, "already revoked");
            assert!(!tx.revoke_api_key(id + 1, at(2))?, "no such key");
            Ok(())
        })
        .expect("changes");
    let key = store
        .api_key_by_hash(&[1; 32])
        .expect("lookup")
        .expect("key");
    assert_eq!((key.rate_limit, key.revoked), (Some(limit), Some(at(1))));
    store
        .write(|tx| tx.set_api_key_limit(id, None))
        .expect("unlimited");
    let key = store
        .api_key_by_hash(&[1; 32])
        .expect("lookup")
        .expect("key");
    assert_eq!(key.rate_limit, None);
}

#[test]
fn touch_api_keys_updates_last_used_and_never_moves_it_back() {
    let dir = TempDir::new();
    let store = open(&dir);
    let (alice, bob) = store
        .write(|tx| -> Result<_, StoreError> {
            Ok((
                tx.insert_api_key("alice", &[1; 32], None, at(0))?,
                tx.insert_api_key("bob", &[2; 32], None, at(0))?,
            ))
        })
        .expect("keys");
    store
        .touch_api_keys(&[(alice, at(10)), (bob, at(20))])
        .expect("touch");
    store.touch_api_keys(&[(alice, at(5))]).expect("late batch");
    let last_used: Vec<_> = store
        .api_keys()
        .expect("keys")
        .into_iter()
        .map(|key| key.last_used)
        .collect();
    assert_eq!(last_used, [Some(at(10)), Some(at(20))]);
}

#[test]
fn events_are_ordered_and_capped() {
    let dir = TempDir::new();
    let mut store = open(&dir);
    store.events_kept = 3;
    let ids = store
        .write(|tx| -> Result<_, StoreError> {
            (0..5)
                .map(|n| tx.record_event("test", &format!("event {n}"), ""))
                .collect::<Result<Vec<_>, _>>()
        })
        .expect("events");
    assert!(ids.windows(2).all(|pair| pair[0] < pair[1]), "{ids:?}");
    let subjects = |events: Vec<crate::model::Event>| -> Vec<String> {
        events.into_iter().map(|event| event.subject).collect()
    };
    assert_eq!(
        subjects(store.events(None, 10).expect("events")),
        ["event 2", "event 3", "event 4"]
    );
    assert_eq!(
        subjects(store.events(Some(ids[2]), 10).expect("events")),
        ["event 3", "event 4"]
    );
    assert_eq!(
        subjects(store.events(None, 2).expect("events")),
        ["event 2", "event 3"]
    );
    assert_eq!(
        subjects(store.recent_events(2).expect("events")),
        ["event 3", "event 4"]
    );
    let events = store.events(None, 10).expect("events");
    assert!(events.windows(2).all(|pair| pair[0].at <= pair[1].at));
}

#[test]
fn open_in_a_missing_directory_names_the_path() {
    let dir = TempDir::new();
    let path = dir.0.join("missing").join("state.db");
    let error = Store::open(&path).err().expect("no directory, no store");
    assert!(matches!(error, StoreError::Open { .. }), "{error:?}");
    let message = error.to_string();
    assert!(
        message.starts_with(&format!("state store {}: ", path.display())),
        "{message}"
    );
}

#[test]
fn a_file_that_is_not_a_database_is_refused() {
    let dir = TempDir::new();
    std::fs::write(dir.db(), vec![b'x'; 4096]).expect("writing junk");
    let error = Store::open(&dir.db()).err().expect("junk is not a store");
    assert!(matches!(error, StoreError::Open { .. }), "{error:?}");
}

#[test]
fn corrupt_value_names_table_row_and_column() {
    let dir = TempDir::new();
    let store = open(&dir);
    let id = store
        .write(|tx| tx.insert_service(&service_def("192.0.2.1", 80), Origin::Api))
        .expect("service");
    rusqlite::Connection::open(dir.db())
        .and_then(|conn| conn.execute("UPDATE services SET vip = 'nonsense' WHERE id = ?1", [id]))
        .expect("corrupting the row");
    let error = store.services().expect_err("a bad VIP does not decode");
    assert_eq!(
        error.to_string(),
        format!(
            "state store {}: table services, row {id}, column vip: \"nonsense\" is not an IP \
             address; repair it with the sqlite3 CLI or restore a backup",
            dir.db().display()
        )
    );
}

#[test]
fn connection_commits_durably_and_enforces_foreign_keys() {
    let dir = TempDir::new();
    let store = open(&dir);
    let conn = store.lock();
    let journal_mode: String = conn
        .pragma_query_value(None, "journal_mode", |row| row.get(0))
        .expect("journal_mode");
    assert_eq!(journal_mode, "wal");
    let int = |name: &str| -> i64 {
        conn.pragma_query_value(None, name, |row| row.get(0))
            .expect("reading a pragma")
    };
    assert_eq!(int("synchronous"), 2, "synchronous is not FULL");
    assert_eq!(int("foreign_keys"), 1);
}

#[test]
fn calls_are_counted_by_kind_across_clones() {
    let dir = TempDir::new();
    let store = open(&dir);
    let start = store.calls();
    let clone = store.clone();
    let id = clone
        .write(|tx| tx.insert_api_key("alice", &[1; 32], None, at(0)))
        .expect("key");
    clone.touch_api_keys(&[(id, at(1))]).expect("touch");
    store.api_keys().expect("keys");
    store.api_key_by_hash(&[1; 32]).expect("lookup");
    store.events(None, 10).expect("events");
    let calls = store.calls();
    assert_eq!(calls.writes - start.writes, 2);
    assert_eq!(calls.reads - start.reads, 3);
}
