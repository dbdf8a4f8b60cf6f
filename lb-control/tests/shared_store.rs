//! Two lb-controls on one etcd, and one that loses its quorum: real etcd members (Debian's
//! etcd-server) on 127.0.0.1, each lb-control its own store connection, backend set (over a
//! kernel that records what it is given), API key registry and watch
//! ([`follow_shared_store`], as the daemon wires them).

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use lb_control::{
    backends::{BackendSet, Declared, KernelTables, Requester, State},
    daemon::follow_shared_store,
    dataplane::{ApplyReport, DataplaneError, DataplaneSection, LbSettings, ServiceSpec},
    health::{Badness, Condition, HealthSnapshot, NodeHealth, Target, Verdict},
    keys::{ApiKeys, CreatedKey, CredentialError},
    metrics::Metrics,
    model::{
        AdminState, BackendDef, BackendState, ForwardingMode, HealthCheck, KeyCaps, Protocol,
        ServiceDef,
    },
    store::{Store, test_etcd::EtcdCluster},
};

/// What the kernel tables were last given, shared with the test.
#[derive(Clone, Default)]
struct RecordedKernel(Arc<Mutex<Vec<ServiceSpec>>>);

impl KernelTables for RecordedKernel {
    fn apply(
        &mut self,
        _settings: &LbSettings,
        services: &[ServiceSpec],
    ) -> Result<ApplyReport, DataplaneError> {
        *self.0.lock().expect("kernel record") = services.to_vec();
        Ok(ApplyReport::default())
    }

    fn detach(&mut self) -> Result<(), DataplaneError> {
        Ok(())
    }
}

impl RecordedKernel {
    fn state_of(&self, address: SocketAddr) -> Option<BackendState> {
        self.0
            .lock()
            .expect("kernel record")
            .iter()
            .flat_map(|service| service.backends.iter())
            .find(|backend| backend.addr == address)
            .map(|backend| backend.state)
    }
}

/// One lb-control's state-holding parts over a shared store.
struct LbControl {
    store: Store,
    backends: Arc<BackendSet>,
    keys: ApiKeys,
    kernel: RecordedKernel,
}

impl LbControl {
    async fn start(cluster: &EtcdCluster, prefix: &str) -> LbControl {
        let store = Store::open_etcd(&cluster.settings(prefix)).expect("connecting to etcd");
        let kernel = RecordedKernel::default();
        let metrics = Arc::new(Metrics::register(&mut Default::default()));
        let backends = Arc::new(
            BackendSet::start(
                store.clone(),
                Box::new(kernel.clone()),
                DataplaneSection::default().lb_settings(),
                &Declared::default(),
                metrics,
            )
            .await
            .expect("the backend set starts"),
        );
        let keys = ApiKeys::open(store.clone()).expect("the key registry opens");
        let changes = store.changes().expect("etcd tells of changes");
        tokio::spawn(follow_shared_store(changes, backends.clone(), keys.clone()));
        LbControl {
            store,
            backends,
            keys,
            kernel,
        }
    }

    /// `key create NAME` through this lb-control's registry, off the async workers (the
    /// store blocks).
    async fn create_key(&self, name: &'static str) -> Result<CreatedKey, CredentialError> {
        let keys = self.keys.clone();
        tokio::task::spawn_blocking(move || keys.create(name, None, KeyCaps::default()))
            .await
            .expect("task")
    }
}

fn service() -> ServiceDef {
    ServiceDef {
        vip: "192.0.2.10".parse().expect("VIP"),
        port: 9944,
        protocol: Protocol::Tcp,
        // DSR: NAT would need a NAT source address, which says nothing here.
        mode: ForwardingMode::Dsr,
        check: HealthCheck::None,
    }
}

fn backend(address: &str) -> BackendDef {
    BackendDef {
        address: address.parse().expect("backend address"),
        rpc_port: 9944,
        weight: 1,
        admin: AdminState::Enabled,
        tier: 0,
    }
}

/// Polls `done` every 10 ms until it holds; fails naming `what` after `within`.
async fn eventually(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_created_or_revoked_through_one_lb_control_holds_at_the_others_gateway_within_a_second()
 {
    let cluster = EtcdCluster::start(1);
    let first = LbControl::start(&cluster, "/pair/").await;
    let second = LbControl::start(&cluster, "/pair/").await;

    let created = first.create_key("alice").await.expect("a key");
    eventually(
        "the second lb-control's gateway accepts the new key",
        Duration::from_secs(1),
        || second.keys.verify(&created.secret).is_some(),
    )
    .await;

    let keys = first.keys.clone();
    let id = created.record.id;
    tokio::task::spawn_blocking(move || keys.revoke(id))
        .await
        .expect("task")
        .expect("revoked");
    eventually(
        "the second lb-control's gateway refuses the revoked key",
        Duration::from_secs(1),
        || second.keys.verify(&created.secret).is_none(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_drained_through_one_lb_control_is_draining_in_the_others_kernel_and_view() {
    let cluster = EtcdCluster::start(1);
    let first = LbControl::start(&cluster, "/pair/").await;
    let second = LbControl::start(&cluster, "/pair/").await;
    let address: SocketAddr = "10.0.0.1:9944".parse().expect("address");

    let service = first
        .backends
        .add_service(service())
        .await
        .expect("service");
    let added = first
        .backends
        .add_backend(service.id, backend("10.0.0.1:9944"))
        .await
        .expect("backend");
    eventually(
        "the second lb-control's kernel has the new backend up",
        Duration::from_secs(1),
        || second.kernel.state_of(address) == Some(BackendState::Up),
    )
    .await;

    first
        .backends
        .set_admin(added.id, AdminState::Draining, &Requester::Operator)
        .await
        .expect("drained");
    eventually(
        "the second lb-control's kernel and view have it draining",
        Duration::from_secs(1),
        || {
            let view = second.backends.view();
            let state = view.backend(added.id).map(|(_, backend)| backend.state);
            second.kernel.state_of(address) == Some(BackendState::Draining)
                && state == Some(State::Draining)
        },
    )
    .await;
    // The backend is the same record on both: one id, the weight kept.
    let on_second = second.backends.view();
    let (_, view) = on_second.backend(added.id).expect("same id");
    assert_eq!(view.backend.def.admin, AdminState::Draining);
    drop(first.store);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_quorum_writes_fail_naming_etcd_and_the_last_state_keeps_serving() {
    let mut cluster = EtcdCluster::start(3);
    let lb = LbControl::start(&cluster, "/quorum/").await;
    let checked = ServiceDef {
        check: HealthCheck::Tcp,
        ..service()
    };
    let service = lb.backends.add_service(checked).await.expect("service");
    for address in ["10.0.0.1:9944", "10.0.0.2:9944"] {
        lb.backends
            .add_backend(service.id, backend(address))
            .await
            .expect("backend");
    }
    let alice = lb.create_key("alice").await.expect("a key");

    // One member down: a majority is left, writes go on.
    cluster.stop_member(2);
    lb.create_key("bob")
        .await
        .expect("a write with two of three members");

    // Two down: no quorum.
    cluster.stop_member(1);
    let started = Instant::now();
    let refused = lb
        .create_key("carol")
        .await
        .expect_err("no write without quorum");
    let took = started.elapsed();
    let message = refused.to_string();
    assert!(
        message.contains("etcd (") && message.contains(&cluster.endpoints()[0]),
        "the error names etcd and its endpoints: {message}"
    );
    assert!(message.contains("unavailable"), "{message}");
    assert!(took < Duration::from_secs(10), "the refusal took {took:?}");

    // The last state keeps serving: the gateway's keys, the kernel's table, the stored lists.
    assert!(lb.keys.verify(&alice.secret).is_some());
    assert_eq!(
        lb.kernel
            .state_of("10.0.0.1:9944".parse().expect("address")),
        Some(BackendState::Up)
    );
    assert_eq!(lb.backends.view().services.len(), 1);
    let store = lb.store.clone();
    let listed = tokio::task::spawn_blocking(move || store.api_keys())
        .await
        .expect("task")
        .expect("the member's last state is read");
    assert_eq!(listed.len(), 2, "alice and bob, as committed");

    // A node that dies meanwhile still leaves this host's kernel table: only its event waits
    // for the store.
    let dead: SocketAddr = "10.0.0.2:9944".parse().expect("address");
    lb.backends
        .apply_health(unreachable(dead))
        .await
        .expect("a health change applies without quorum");
    assert_eq!(lb.kernel.state_of(dead), Some(BackendState::Down));
    assert_eq!(
        lb.kernel
            .state_of("10.0.0.1:9944".parse().expect("address")),
        Some(BackendState::Up)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_go_on_through_the_other_members_while_this_hosts_own_member_is_down() {
    // Every member listens on 127.0.0.1, so the first endpoint is this host's own member: the
    // one requests go to first.
    let mut cluster = EtcdCluster::start(3);
    let lb = LbControl::start(&cluster, "/own/").await;
    lb.create_key("before")
        .await
        .expect("a write with every member up");

    cluster.stop_member(0);
    // The others may be electing a leader (when the stopped one led): a client tries again.
    let deadline = Instant::now() + Duration::from_secs(10);
    let created = loop {
        match lb.create_key("after").await {
            Ok(created) => break created,
            Err(error) => {
                assert!(
                    Instant::now() < deadline,
                    "no write through the other two members: {error}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let store = lb.store.clone();
    let listed = tokio::task::spawn_blocking(move || store.api_keys())
        .await
        .expect("task")
        .expect("a read through the other two members");
    assert!(
        listed.iter().any(|key| key.id == created.record.id),
        "the key written without this host's member is listed: {listed:?}"
    );
}

/// A health snapshot in which the TCP check of `address` finds nothing listening.
fn unreachable(address: SocketAddr) -> Arc<HealthSnapshot> {
    let target = Target {
        endpoint: address,
        check: HealthCheck::Tcp,
        joining: false,
    };
    let health = NodeHealth {
        verdict: Verdict::Unhealthy,
        badness: Badness {
            condition: Condition::Unreachable,
            blocks_behind: 0,
        },
        reason: Some("connect: Connection refused (os error 111)".to_owned()),
        ..NodeHealth::unchecked()
    };
    Arc::new(HealthSnapshot {
        nodes: [(target, health)].into(),
        ..HealthSnapshot::default()
    })
}
