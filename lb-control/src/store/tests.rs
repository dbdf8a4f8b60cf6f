use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use super::{
    Engine, EtcdSettings, Store, StoreError,
    sqlite::schema::{MIGRATIONS, SCHEMA_VERSION},
    test_etcd,
};
use crate::model::{
    AdminState, ApiKeyRecord, Backend, BackendDef, BlockRecord, BlockSource, ForwardingMode,
    HealthCheck, JoinTokenRecord, KeyCaps, Origin, Protocol, RateLimit, Service, ServiceDef,
    ServiceKey,
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

/// Where a test's store lives: a fresh SQLite file, or a fresh prefix on the test process's
/// etcd member. Opening it again is a restart (SQLite) or another lb-control (etcd).
enum Place {
    Sqlite(TempDir),
    Etcd(EtcdSettings),
}

impl Place {
    fn sqlite() -> Place {
        Place::Sqlite(TempDir::new())
    }

    fn etcd() -> Place {
        Place::Etcd(EtcdSettings::plain(
            vec![test_etcd::shared().to_owned()],
            &test_etcd::unique_prefix("store"),
        ))
    }

    fn open(&self) -> Store {
        match self {
            Place::Sqlite(dir) => open(dir),
            Place::Etcd(settings) => Store::open_etcd(settings).expect("connecting to etcd"),
        }
    }
}

/// Each test named runs twice, as `sqlite::NAME` and `etcd::NAME`: one suite, both engines.
macro_rules! on_both_engines {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(#[test]
            fn $test() {
                super::$test(&super::Place::sqlite());
            })*
        }
        mod etcd {
            $(#[test]
            fn $test() {
                super::$test(&super::Place::etcd());
            })*
        }
    };
}

on_both_engines!(
    every_record_round_trips_and_survives_reopen,
    updates_replace_the_definition_and_keep_origin,
    ids_are_never_reused_after_delete_even_across_reopen,
    deleting_a_service_cascades_its_backends,
    duplicate_service_is_a_conflict_naming_it,
    duplicate_backend_is_a_conflict_naming_it,
    backend_of_a_missing_service_is_refused,
    duplicate_key_name_or_secret_is_a_conflict_naming_it,
    failed_write_leaves_nothing_behind,
    api_key_by_hash_finds_the_key,
    key_revocation_and_limit_changes_apply_once_to_existing_keys,
    touch_api_keys_updates_last_used_and_never_moves_it_back,
    join_tokens_round_trip_and_are_revoked_once,
    duplicate_join_token_name_or_secret_is_a_conflict_naming_it,
    blocks_are_kept_by_prefix_replaced_and_deleted_and_survive_reopen,
    events_are_ordered_and_capped,
    calls_are_counted_by_kind_across_clones,
    an_export_imports_into_an_empty_store_as_the_same_state,
    an_export_from_before_tiers_imports_with_its_backends_as_primaries,
    import_into_a_store_with_state_is_refused_unless_replacing,
);

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
        tier: 0,
    }
}

fn conflict_message(result: Result<impl std::fmt::Debug, StoreError>) -> String {
    match result {
        Err(error @ StoreError::Conflict { .. }) => error.to_string(),
        other => panic!("expected a conflict, got {other:?}"),
    }
}

fn every_record_round_trips_and_survives_reopen(place: &Place) {
    let store = place.open();
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
        tier: 0,
    };
    let b2 = BackendDef {
        address: "[2001:db8::11]:30333".parse().expect("address"),
        rpc_port: 9945,
        weight: u32::MAX,
        admin: AdminState::Disabled,
        tier: 2,
    };
    let tcp = ServiceDef {
        check: HealthCheck::Tcp,
        ..service_def("192.0.2.20", 443)
    };
    let limit = RateLimit {
        rps: 50,
        burst: 100,
    };
    let caps = KeyCaps {
        max_connections: Some(5000),
        max_subscriptions: None,
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
            assert!(tx.set_api_key_caps(k1, caps)?);
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
            caps,
            created: at(1),
            last_used: Some(at(3)),
            revoked: None,
        },
        ApiKeyRecord {
            id: k2,
            name: "bob".into(),
            secret_sha256: [2; 32],
            rate_limit: None,
            caps: KeyCaps::default(),
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
    let reopened = place.open();
    assert_eq!(check(&reopened), events, "events differ after reopen");
}

fn updates_replace_the_definition_and_keep_origin(place: &Place) {
    let store = place.open();
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
        tier: 1,
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

fn ids_are_never_reused_after_delete_even_across_reopen(place: &Place) {
    let store = place.open();
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
    let store = place.open();
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

fn deleting_a_service_cascades_its_backends(place: &Place) {
    let store = place.open();
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

fn duplicate_service_is_a_conflict_naming_it(place: &Place) {
    let store = place.open();
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

fn duplicate_backend_is_a_conflict_naming_it(place: &Place) {
    let store = place.open();
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

fn backend_of_a_missing_service_is_refused(place: &Place) {
    let store = place.open();
    let result = store.write(|tx| tx.insert_backend(42, &backend_def("10.0.0.1:80"), Origin::Api));
    match result {
        Err(error @ StoreError::NotFound { .. }) => {
            assert_eq!(error.to_string(), "service 42 does not exist");
        }
        other => panic!("expected service 42 not to exist, got {other:?}"),
    }
}

fn duplicate_key_name_or_secret_is_a_conflict_naming_it(place: &Place) {
    let store = place.open();
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

fn failed_write_leaves_nothing_behind(place: &Place) {
    let store = place.open();
    let result: Result<(), _> = store.write(|tx| -> Result<_, StoreError> {
        let service = tx.insert_service(&service_def("192.0.2.1", 80), Origin::Api)?;
        tx.insert_backend(service, &backend_def("10.0.0.1:80"), Origin::Api)?;
        tx.insert_api_key("alice", &[1; 32], None, at(0))?;
        tx.put_block(&block("203.0.113.0/24", None, BlockSource::Admin))?;
        tx.record_event("service.added", "service 1", "api")?;
        tx.insert_service(&service_def("192.0.2.1", 80), Origin::Api)?;
        Ok(())
    });
    assert!(
        matches!(result, Err(StoreError::Conflict { .. })),
        "{result:?}"
    );
    drop(store);
    let store = place.open();
    assert_eq!(store.services().expect("services"), []);
    assert_eq!(store.backends().expect("backends"), []);
    assert_eq!(store.api_keys().expect("keys"), []);
    assert_eq!(store.join_tokens().expect("join tokens"), []);
    assert_eq!(store.blocklist().expect("blocklist"), []);
    assert_eq!(store.events(None, 10).expect("events"), []);
}

/// A block of `prefix` created at `at(0)`, until `until` (ms after `at(0)`; None: forever).
fn block(prefix: &str, until: Option<u64>, source: BlockSource) -> BlockRecord {
    BlockRecord {
        prefix: prefix.parse().expect("test prefix"),
        until: until.map(at),
        source,
        created: at(0),
    }
}

fn blocks_are_kept_by_prefix_replaced_and_deleted_and_survive_reopen(place: &Place) {
    let store = place.open();
    let admin = block("203.0.113.0/24", None, BlockSource::Admin);
    let guesser = block("2001:db8:0:7::/64", Some(600_000), BlockSource::AuthFailure);
    let address = block("198.51.100.7/32", Some(5_000), BlockSource::Adopted);
    // Written with host bits, kept without them.
    let with_host_bits = BlockRecord {
        prefix: "10.1.2.3/8".parse().expect("prefix"),
        ..block("10.0.0.0/8", Some(1_000), BlockSource::Admin)
    };
    store
        .write(|tx| -> Result<_, StoreError> {
            for record in [&admin, &guesser, &address, &with_host_bits] {
                tx.put_block(record)?;
            }
            assert_eq!(
                tx.blocklist()?.len(),
                4,
                "the transaction sees its own writes"
            );
            tx.record_event("blocklist.added", "prefix 203.0.113.0/24", "api")
        })
        .expect("blocks");
    let ten = block("10.0.0.0/8", Some(1_000), BlockSource::Admin);
    // In prefix order (IPv4 first, numerically), after a reopen.
    drop(store);
    let store = place.open();
    assert_eq!(
        store.blocklist().expect("blocklist"),
        [ten.clone(), address.clone(), admin.clone(), guesser.clone()]
    );

    // Blocking a blocked prefix again replaces its record.
    let longer = block("198.51.100.7/32", None, BlockSource::Admin);
    store
        .write(|tx| tx.put_block(&longer))
        .expect("blocked again");
    // Deleting gives the record as it was, host bits ignored; a prefix not blocked gives None,
    // and a covering prefix does not delete a covered one.
    let (deleted, missing, covering) = store
        .write(|tx| -> Result<_, StoreError> {
            Ok((
                tx.delete_block("203.0.113.77/24".parse().expect("prefix"))?,
                tx.delete_block("192.0.2.0/24".parse().expect("prefix"))?,
                tx.delete_block("198.51.100.0/24".parse().expect("prefix"))?,
            ))
        })
        .expect("deleted");
    assert_eq!(deleted, Some(admin));
    assert_eq!((missing, covering), (None, None));
    drop(store);
    assert_eq!(
        place.open().blocklist().expect("blocklist"),
        [ten, longer, guesser]
    );
}

#[test]
fn a_file_from_before_the_blocklist_migrates_with_an_empty_one() {
    let dir = TempDir::new();
    {
        let mut conn = rusqlite::Connection::open(dir.db()).expect("creating a version 3 file");
        let tx = conn.transaction().expect("a transaction");
        for step in &MIGRATIONS[..3] {
            tx.execute_batch(step).expect("a version 3 schema step");
        }
        tx.pragma_update(None, "user_version", 3)
            .and_then(|()| tx.commit())
            .expect("the version 3 schema");
    }
    let store = open(&dir);
    assert_eq!(store.blocklist().expect("blocklist"), []);
    let record = block("203.0.113.0/24", Some(1), BlockSource::Admin);
    store.write(|tx| tx.put_block(&record)).expect("a block");
    drop(store);
    assert_eq!(open(&dir).blocklist().expect("blocklist"), [record]);
}

#[test]
fn a_file_from_before_key_caps_migrates_with_its_keys_at_the_default() {
    let dir = TempDir::new();
    {
        let mut conn = rusqlite::Connection::open(dir.db()).expect("creating a version 4 file");
        let tx = conn.transaction().expect("a transaction");
        for step in &MIGRATIONS[..4] {
            tx.execute_batch(step).expect("a version 4 schema step");
        }
        tx.execute(
            "INSERT INTO api_keys (name, secret_sha256, rps, burst, created_ms) \
             VALUES ('alice', ?1, 5, 10, 1000)",
            [&[1u8; 32][..]],
        )
        .expect("a key of version 4");
        tx.pragma_update(None, "user_version", 4)
            .and_then(|()| tx.commit())
            .expect("the version 4 schema");
    }
    let store = open(&dir);
    let keys = store.api_keys().expect("keys");
    assert_eq!(keys.len(), 1);
    assert_eq!(
        (keys[0].name.as_str(), keys[0].rate_limit, keys[0].caps),
        (
            "alice",
            Some(RateLimit { rps: 5, burst: 10 }),
            KeyCaps::default()
        )
    );
    let caps = KeyCaps {
        max_connections: None,
        max_subscriptions: Some(3),
    };
    assert!(
        store
            .write(|tx| tx.set_api_key_caps(keys[0].id, caps))
            .expect("caps")
    );
    drop(store);
    assert_eq!(open(&dir).api_keys().expect("keys")[0].caps, caps);
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
fn a_file_from_before_tiers_migrates_with_its_backends_as_primaries() {
    let dir = TempDir::new();
    {
        let conn = rusqlite::Connection::open(dir.db()).expect("creating a version 1 file");
        conn.execute_batch(MIGRATIONS[0])
            .and_then(|()| conn.pragma_update(None, "user_version", 1))
            .expect("the version 1 schema");
        conn.execute_batch(
            "INSERT INTO services (vip, port, protocol, mode, health_check, origin) \
             VALUES ('192.0.2.1', 443, 'tcp', 'nat', 'substrate', 'config');
             INSERT INTO backends (service_id, address, rpc_port, weight, admin, origin) \
             VALUES (1, '10.0.0.1:443', 9944, 2, 'draining', 'api');",
        )
        .expect("a version 1 backend");
    }
    let store = open(&dir);
    let backends = store.backends().expect("backends");
    assert_eq!(
        backends,
        [Backend {
            id: 1,
            service: 1,
            def: BackendDef {
                weight: 2,
                admin: AdminState::Draining,
                ..backend_def("10.0.0.1:443")
            },
            origin: Origin::Api,
        }]
    );
    assert_eq!(backends[0].def.tier, 0);
    // The migrated file takes tiers like a new one.
    store
        .write(|tx| {
            tx.update_backend(
                1,
                &BackendDef {
                    tier: 3,
                    ..backends[0].def.clone()
                },
            )
        })
        .expect("setting a tier");
    drop(store);
    assert_eq!(open(&dir).backends().expect("backends")[0].def.tier, 3);
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

fn api_key_by_hash_finds_the_key(place: &Place) {
    let store = place.open();
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

fn key_revocation_and_limit_changes_apply_once_to_existing_keys(place: &Place) {
    let store = place.open();
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

fn service_key(text: &str) -> ServiceKey {
    text.parse().expect("test service key")
}

fn join_tokens_round_trip_and_are_revoked_once(place: &Place) {
    let store = place.open();
    let services = [
        service_key("192.0.2.10:9944"),
        service_key("[2001:db8::10]:30333/udp"),
    ];
    let (eu, us) = store
        .write(|tx| -> Result<_, StoreError> {
            Ok((
                tx.insert_join_token("eu", &[1; 32], &services, at(1))?,
                tx.insert_join_token("us", &[2; 32], &services[..1], at(2))?,
            ))
        })
        .expect("tokens");
    store
        .write(|tx| -> Result<_, StoreError> {
            assert!(tx.revoke_join_token(eu, at(3))?);
            assert!(!tx.revoke_join_token(eu, at(4))?, "already revoked");
            assert!(!tx.revoke_join_token(us + 1, at(4))?, "no such token");
            Ok(())
        })
        .expect("revoking");
    let expected = vec![
        JoinTokenRecord {
            id: eu,
            name: "eu".to_owned(),
            secret_sha256: [1; 32],
            services: services.to_vec(),
            created: at(1),
            revoked: Some(at(3)),
        },
        JoinTokenRecord {
            id: us,
            name: "us".to_owned(),
            secret_sha256: [2; 32],
            services: services[..1].to_vec(),
            created: at(2),
            revoked: None,
        },
    ];
    assert_eq!(store.join_tokens().expect("tokens"), expected);
    // Another handle (a restart, or another lb-control) reads the same.
    assert_eq!(place.open().join_tokens().expect("tokens"), expected);
}

fn duplicate_join_token_name_or_secret_is_a_conflict_naming_it(place: &Place) {
    let store = place.open();
    let services = [service_key("192.0.2.10:9944")];
    store
        .write(|tx| tx.insert_join_token("eu", &[1; 32], &services, at(0)))
        .expect("first token");
    assert_eq!(
        conflict_message(store.write(|tx| tx.insert_join_token("eu", &[2; 32], &services, at(0)))),
        "a join token named eu already exists"
    );
    assert_eq!(
        conflict_message(store.write(|tx| tx.insert_join_token("us", &[1; 32], &services, at(0)))),
        "a join token with this secret already exists"
    );
    // Join tokens and API keys are apart: a key may share a token's name.
    store
        .write(|tx| tx.insert_api_key("eu", &[3; 32], None, at(0)))
        .expect("a key named like a token");
}

fn touch_api_keys_updates_last_used_and_never_moves_it_back(place: &Place) {
    let store = place.open();
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

fn events_are_ordered_and_capped(place: &Place) {
    let mut store = place.open();
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
    let Engine::Sqlite(sqlite) = &store.engine else {
        unreachable!("opened on SQLite")
    };
    let conn = sqlite.lock();
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

fn calls_are_counted_by_kind_across_clones(place: &Place) {
    let store = place.open();
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

/// Some state of every kind, written through the store's ordinary interface.
fn fill(store: &Store) {
    let (service, key) = store
        .write(|tx| -> Result<_, StoreError> {
            let service = tx.insert_service(&service_def("192.0.2.1", 443), Origin::Config)?;
            tx.insert_backend(service, &backend_def("10.0.0.1:443"), Origin::Config)?;
            let key = tx.insert_api_key(
                "alice",
                &[7; 32],
                Some(RateLimit { rps: 5, burst: 9 }),
                at(1),
            )?;
            tx.insert_api_key("bob", &[8; 32], None, at(2))?;
            let eu =
                tx.insert_join_token("eu", &[9; 32], &[service_key("192.0.2.1:443")], at(2))?;
            tx.revoke_join_token(eu, at(3))?;
            tx.insert_join_token(
                "us",
                &[10; 32],
                &[
                    service_key("192.0.2.1:443"),
                    service_key("[2001:db8::1]:443/udp"),
                ],
                at(4),
            )?;
            tx.put_block(&block("203.0.113.0/24", None, BlockSource::Admin))?;
            tx.put_block(&block(
                "2001:db8:0:7::/64",
                Some(600_000),
                BlockSource::AuthFailure,
            ))?;
            tx.record_event("service.added", "service 1", "config")?;
            Ok((service, key))
        })
        .expect("filling the store");
    store
        .write(|tx| -> Result<_, StoreError> {
            tx.insert_backend(service, &backend_def("10.0.0.2:443"), Origin::Api)?;
            tx.revoke_api_key(key + 1, at(3))?;
            tx.record_event("key.revoked", "key 2 (bob)", "api")
        })
        .expect("changing the store");
    store
        .touch_api_keys(&[(key, at(4))])
        .expect("touching a key");
}

/// State as a user sees it: ids and all, events without their (wall-clock) times.
fn state_of(store: &Store) -> impl PartialEq + std::fmt::Debug {
    let snapshot = store.export().expect("export");
    let events: Vec<_> = snapshot
        .events
        .iter()
        .map(|event| (event.id, event.kind.clone(), event.subject.clone()))
        .collect();
    (
        snapshot.services,
        snapshot.backends,
        snapshot.api_keys,
        snapshot.join_tokens,
        snapshot.blocklist,
        events,
    )
}

fn an_export_imports_into_an_empty_store_as_the_same_state(place: &Place) {
    let source = Place::sqlite();
    let from = source.open();
    fill(&from);
    let text = serde_json::to_string(&from.export().expect("export")).expect("JSON");
    let into = place.open();
    let snapshot = super::snapshot::Snapshot::parse(&text).expect("parses back");
    into.import(&snapshot, false)
        .expect("import into an empty store");
    assert_eq!(state_of(&into), state_of(&from));
    // Ids go on from the imported ones: nothing issued again.
    let next = into
        .write(|tx| tx.insert_service(&service_def("192.0.2.9", 443), Origin::Api))
        .expect("a new service");
    assert!(next > from.services().expect("services")[0].id);
}

fn an_export_from_before_tiers_imports_with_its_backends_as_primaries(place: &Place) {
    let text = r#"{"format": "lb-control-state", "version": 1,
        "services": [{"id": 4, "vip": "192.0.2.1", "port": 443, "protocol": "tcp",
                      "mode": "nat", "check": "substrate", "origin": "config"}],
        "backends": [{"id": 7, "service": 4, "address": "10.0.0.1:443", "rpc_port": 9944,
                      "weight": 1, "admin": "enabled", "origin": "config"}],
        "api_keys": [], "events": []}"#;
    let snapshot = super::snapshot::Snapshot::parse(text).expect("a version 1 export");
    let store = place.open();
    store.import(&snapshot, false).expect("import");
    let backends = store.backends().expect("backends");
    assert_eq!(
        backends
            .iter()
            .map(|b| (b.id, b.def.tier))
            .collect::<Vec<_>>(),
        [(7, 0)]
    );
    // Nor had it a blocklist.
    assert_eq!(store.blocklist().expect("blocklist"), []);
}

fn import_into_a_store_with_state_is_refused_unless_replacing(place: &Place) {
    let store = place.open();
    fill(&store);
    let empty = super::snapshot::Snapshot::new(
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    let refused = store
        .import(&empty, false)
        .expect_err("the store has state");
    assert!(
        matches!(refused, StoreError::NotEmpty { .. }),
        "{refused:?}"
    );
    assert!(refused.to_string().contains("--replace"), "{refused}");
    store.import(&empty, true).expect("replacing");
    assert_eq!(store.services().expect("services"), []);
    assert_eq!(store.blocklist().expect("blocklist"), []);
    assert_eq!(store.api_keys().expect("keys"), []);
    assert_eq!(store.join_tokens().expect("join tokens"), []);
    assert_eq!(store.events(None, 10).expect("events"), []);
}

#[test]
fn two_etcd_writers_never_issue_the_same_id() {
    let place = Place::etcd();
    let (first, second) = (place.open(), place.open());
    let create = |store: Store, name: &'static str| {
        std::thread::spawn(move || {
            (0..10)
                .map(|n| {
                    store
                        .write(|tx| {
                            tx.insert_api_key(
                                &format!("{name}{n}"),
                                &[n as u8 + if name == "a" { 0 } else { 100 }; 32],
                                None,
                                at(0),
                            )
                        })
                        .expect("a key")
                })
                .collect::<Vec<_>>()
        })
    };
    let a = create(first, "a");
    let b = create(second, "b");
    let mut ids: Vec<_> = a
        .join()
        .expect("writer a")
        .into_iter()
        .chain(b.join().expect("writer b"))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 20, "ids issued twice: {ids:?}");
    assert_eq!(place.open().api_keys().expect("keys").len(), 20);
}

#[test]
fn an_etcd_store_sees_another_writers_changes_through_its_watch() {
    let place = Place::etcd();
    let (watching, writing) = (place.open(), place.open());
    let mut changes = watching.changes().expect("etcd is shared");
    let before = *changes.borrow_and_update();
    writing
        .write(|tx| tx.insert_service(&service_def("192.0.2.1", 80), Origin::Api))
        .expect("a service");
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    while changes.borrow().backends == before.backends {
        assert!(
            std::time::Instant::now() < deadline,
            "no change seen within 1 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        changes.borrow().keys,
        before.keys,
        "a service is not a key change"
    );
    assert_eq!(watching.services().expect("services").len(), 1);
}

#[test]
fn an_etcd_store_sees_another_writers_blocks_through_its_watch() {
    let place = Place::etcd();
    let (watching, writing) = (place.open(), place.open());
    let changes = watching.changes().expect("etcd is shared");
    let before = *changes.borrow();
    // Waits until the blocklist's generation moves past `seen`'s.
    let moved_past = |seen: super::StoreChanges| {
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        while changes.borrow().blocklist == seen.blocklist {
            assert!(
                std::time::Instant::now() < deadline,
                "no blocklist change seen within 1 s"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        *changes.borrow()
    };
    let record = block("203.0.113.0/24", None, BlockSource::Admin);
    writing.write(|tx| tx.put_block(&record)).expect("a block");
    let blocked = moved_past(before);
    assert_eq!(
        watching.blocklist().expect("blocklist"),
        std::slice::from_ref(&record)
    );
    assert_eq!(
        (blocked.backends, blocked.keys),
        (before.backends, before.keys),
        "a block is neither a backend nor a key change"
    );
    writing
        .write(|tx| tx.delete_block(record.prefix))
        .expect("an unblock");
    moved_past(blocked);
    assert_eq!(watching.blocklist().expect("blocklist"), []);
}
