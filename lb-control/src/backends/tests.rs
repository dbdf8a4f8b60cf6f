//! The change path against a real store (a file in a temp directory) and a kernel that records
//! what it was given.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use prometheus_client::registry::Registry;

use super::*;
use crate::{
    dataplane::DataplaneSection,
    health::{Badness, Condition, NodeHealth, Verdict},
    model::{BackendState, DEFAULT_RPC_PORT, ForwardingMode, HealthCheck, Protocol},
};

/// The kernel tables as last applied, shared with the test.
#[derive(Clone, Default)]
struct RecordedKernel(Arc<Mutex<Vec<ServiceSpec>>>);

impl KernelTables for RecordedKernel {
    fn apply(
        &mut self,
        _settings: &LbSettings,
        services: &[ServiceSpec],
    ) -> Result<ApplyReport, DataplaneError> {
        *self.0.lock().unwrap() = services.to_vec();
        Ok(ApplyReport::default())
    }

    fn detach(&mut self) -> Result<(), DataplaneError> {
        Ok(())
    }
}

impl RecordedKernel {
    /// Kernel state of each backend address.
    fn states(&self) -> Vec<(SocketAddr, BackendState)> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .flat_map(|service| service.backends.iter().map(|b| (b.addr, b.state)))
            .collect()
    }

    fn state_of(&self, address: &str) -> Option<BackendState> {
        let address: SocketAddr = address.parse().unwrap();
        self.states()
            .into_iter()
            .find(|(addr, _)| *addr == address)
            .map(|(_, state)| state)
    }
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "lb-backends-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn store(&self) -> Store {
        Store::open(&self.0.join("state.db")).unwrap()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn settings() -> LbSettings {
    DataplaneSection {
        nat_source_v4: Some("10.0.0.1".parse().unwrap()),
        ..DataplaneSection::default()
    }
    .lb_settings()
}

fn service(vip: &str, port: u16) -> ServiceDef {
    ServiceDef {
        vip: vip.parse().unwrap(),
        port,
        protocol: Protocol::Tcp,
        mode: ForwardingMode::Nat,
        check: HealthCheck::Substrate,
    }
}

fn backend(address: &str) -> BackendDef {
    BackendDef {
        address: address.parse().unwrap(),
        rpc_port: DEFAULT_RPC_PORT,
        weight: 1,
        admin: AdminState::Enabled,
        tier: 0,
    }
}

fn declared(backends: &[&str]) -> Declared {
    Declared {
        services: vec![(
            service("192.0.2.10", 9944),
            backends.iter().map(|address| backend(address)).collect(),
        )],
    }
}

async fn start(dir: &TempDir, declared: &Declared) -> (BackendSet, RecordedKernel) {
    start_on(dir, declared, RecordedKernel::default()).await
}

/// The backend set over `kernel`, which the test keeps a handle to.
async fn start_on<K: KernelTables + Clone + 'static>(
    dir: &TempDir,
    declared: &Declared,
    kernel: K,
) -> (BackendSet, K) {
    let set = BackendSet::start(
        dir.store(),
        Box::new(kernel.clone()),
        settings(),
        declared,
        Arc::new(Metrics::register(&mut Registry::default())),
    )
    .await
    .unwrap();
    (set, kernel)
}

/// A snapshot judging each `(address, verdict, condition, blocks behind)`.
fn snapshot(nodes: &[(&str, Verdict, Condition, u64)]) -> Arc<HealthSnapshot> {
    Arc::new(HealthSnapshot {
        nodes: nodes
            .iter()
            .map(|(address, verdict, condition, behind)| {
                let address: SocketAddr = address.parse().unwrap();
                (
                    Target {
                        endpoint: SocketAddr::new(address.ip(), DEFAULT_RPC_PORT),
                        check: HealthCheck::Substrate,
                        joining: false,
                    },
                    NodeHealth {
                        verdict: *verdict,
                        badness: Badness {
                            condition: *condition,
                            blocks_behind: *behind,
                        },
                        ..NodeHealth::unchecked()
                    },
                )
            })
            .collect(),
        ..HealthSnapshot::default()
    })
}

/// A snapshot in which the joining node at `address` is healthy with `passes` checks passed
/// in a row, judged with rise 2.
fn joining_snapshot(address: &str, passes: u32) -> Arc<HealthSnapshot> {
    let mut snapshot = (*snapshot(&[(address, Verdict::Healthy, Condition::Healthy, 0)])).clone();
    let (mut target, mut health) = snapshot.nodes.pop_first().unwrap();
    target.joining = true;
    health.passes = passes;
    snapshot.nodes.insert(target, health);
    snapshot.rise = 2;
    Arc::new(snapshot)
}

const A: &str = "198.51.100.1:30333";
const B: &str = "198.51.100.2:30333";
const C: &str = "198.51.100.3:30333";

#[tokio::test(flavor = "multi_thread")]
async fn config_seeds_the_store_and_runtime_changes_survive_a_restart() {
    let dir = TempDir::new("seed");
    let (set, kernel) = start(&dir, &declared(&[A, B])).await;
    assert_eq!(kernel.states().len(), 2);
    let b = set.view().services[0].backends[1].backend.id;
    set.set_weight(b, 3).await.unwrap();
    set.set_admin(b, AdminState::Draining, &Requester::Operator)
        .await
        .unwrap();
    drop(set);

    // The file now also declares C: it is added; B keeps its runtime weight and drain.
    let (set, kernel) = start(&dir, &declared(&[A, B, C])).await;
    let view = set.view();
    let backends = &view.services[0].backends;
    assert_eq!(backends.len(), 3);
    assert_eq!(backends[1].backend.def.weight, 3);
    assert_eq!(backends[1].state, State::Draining);
    assert_eq!(kernel.state_of(B), Some(BackendState::Draining));
    drop(set);

    // A backend the file no longer declares is removed at start.
    let (set, _) = start(&dir, &declared(&[A, C])).await;
    let addresses: Vec<String> = set.view().services[0]
        .backends
        .iter()
        .map(|b| b.backend.def.address.to_string())
        .collect();
    assert_eq!(addresses, [A, C]);
}

#[tokio::test(flavor = "multi_thread")]
async fn reload_applies_only_what_the_file_changed() {
    let dir = TempDir::new("reload");
    let before = declared(&[A, B]);
    let (set, kernel) = start(&dir, &before).await;
    let a = set.view().services[0].backends[0].backend.id;
    set.set_admin(a, AdminState::Disabled, &Requester::Operator)
        .await
        .unwrap();

    let mut after = declared(&[B, C]);
    after.services[0].1[0].weight = 5;
    set.reload(settings(), &before, &after).await.unwrap();
    let view = set.view();
    let backends = &view.services[0].backends;
    let summary: Vec<(String, u32)> = backends
        .iter()
        .map(|b| (b.backend.def.address.to_string(), b.backend.def.weight))
        .collect();
    assert_eq!(summary, [(B.to_owned(), 5), (C.to_owned(), 1)]);
    assert_eq!(kernel.state_of(A), None, "removed from the file: gone");

    // A field the file did not change keeps its runtime value.
    let b = backends[0].backend.id;
    set.set_admin(b, AdminState::Draining, &Requester::Operator)
        .await
        .unwrap();
    let mut again = after.clone();
    again.services[0].1[0].weight = 6;
    set.reload(settings(), &after, &again).await.unwrap();
    let view = set.view();
    let b = &view.backend(b).unwrap().1;
    assert_eq!(b.backend.def.weight, 6);
    assert_eq!(b.state, State::Draining);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_joining_backend_enters_once_its_node_has_risen_and_events_name_the_token() {
    let dir = TempDir::new("join");
    let (set, kernel) = start(&dir, &declared(&[A])).await;
    let service = set.view().services[0].service.def.key();
    let token = Requester::JoinToken("join token 1 (eu)".to_owned());
    let Joined::Added(joined) = set.join(service, backend(B), &token).await.unwrap() else {
        panic!("B was not a backend yet");
    };
    assert_eq!(joined.def.admin, AdminState::Joining);
    assert_eq!(
        kernel.state_of(B),
        Some(BackendState::Down),
        "out until it has risen"
    );
    let checked = Target {
        endpoint: SocketAddr::new(joined.def.address.ip(), DEFAULT_RPC_PORT),
        check: HealthCheck::Substrate,
        joining: true,
    };
    assert!(set.view().health_targets().contains(&checked));

    // Healthy after one check, but not yet `rise` checks in a row: still out.
    set.apply_health(joining_snapshot(B, 1)).await.unwrap();
    assert_eq!(kernel.state_of(B), Some(BackendState::Down));
    assert_eq!(
        set.view().backend(joined.id).unwrap().1.state,
        State::Joining
    );

    set.apply_health(joining_snapshot(B, 2)).await.unwrap();
    assert_eq!(kernel.state_of(B), Some(BackendState::Up));
    let stored = dir.store().backends().unwrap();
    assert_eq!(
        stored[1].def.admin,
        AdminState::Enabled,
        "admitted for good"
    );
    // Its node is checked as usual from now on.
    assert!(!set.view().health_targets().contains(&checked));

    // Joining again changes nothing.
    assert_eq!(
        set.join(service, backend(B), &token).await.unwrap(),
        Joined::Present(stored[1].clone())
    );
    set.remove_backend(joined.id, &token).await.unwrap();
    let events: Vec<(String, String)> = dir
        .store()
        .recent_events(100)
        .unwrap()
        .into_iter()
        .filter(|event| event.subject.starts_with(&format!("backend {}", joined.id)))
        .filter(|event| event.kind != "backend.state")
        .map(|event| (event.kind, event.detail))
        .collect();
    assert_eq!(
        events,
        [
            ("backend.added".to_owned(), "join token 1 (eu)".to_owned()),
            (
                "backend.joined".to_owned(),
                "passed 2 health checks in a row: in rotation".to_owned()
            ),
            ("backend.removed".to_owned(), "join token 1 (eu)".to_owned()),
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backup_leaves_admission_to_its_master_and_admits_once_it_records() {
    let dir = TempDir::new("admit");
    let (set, kernel) = start(&dir, &declared(&[A])).await;
    let service = set.view().services[0].service.def.key();
    set.join(service, backend(B), &Requester::Operator)
        .await
        .unwrap();
    set.record_health(false);
    set.apply_health(joining_snapshot(B, 2)).await.unwrap();
    assert_eq!(
        kernel.state_of(B),
        Some(BackendState::Down),
        "a backup admits nothing"
    );
    // Become the one that records (the master): the daemon's next housekeeping admits it.
    set.record_health(true);
    set.admit_risen().await.unwrap();
    assert_eq!(kernel.state_of(B), Some(BackendState::Up));
    assert_eq!(
        dir.store().backends().unwrap()[1].def.admin,
        AdminState::Enabled
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn api_errors_name_what_is_wrong() {
    let dir = TempDir::new("errors");
    let (set, _) = start(&dir, &declared(&[A])).await;
    let service_id = set.view().services[0].service.id;
    assert!(matches!(
        set.add_backend(service_id, backend(A)).await,
        Err(ChangeError::Conflict { .. })
    ));
    assert!(matches!(
        set.add_backend(service_id + 100, backend(B)).await,
        Err(ChangeError::NotFound { .. })
    ));
    let error = set
        .add_backend(service_id, backend("[2001:db8::1]:30333"))
        .await
        .unwrap_err();
    assert!(
        matches!(&error, ChangeError::Invalid { field, .. } if field == "address"),
        "{error}"
    );
    let error = set.set_weight(12345, 2).await.unwrap_err();
    assert_eq!(error.to_string(), "backend 12345 does not exist");
    let error = set.set_weight(1, 0).await.unwrap_err();
    assert!(matches!(&error, ChangeError::Invalid { field, .. } if field == "weight"));
    assert!(matches!(
        set.add_service(service("192.0.2.10", 9944)).await,
        Err(ChangeError::Conflict { .. })
    ));
    // A v6 NAT service needs a v6 NAT source, which these settings lack.
    let error = set
        .add_service(service("2001:db8::10", 9944))
        .await
        .unwrap_err();
    assert!(error.to_string().contains("NAT source"), "{error}");
    // Nothing refused reached the store.
    assert_eq!(dir.store().backends().unwrap().len(), 1);
    assert_eq!(dir.store().services().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn health_moves_backends_and_keeps_the_least_bad_when_all_fail() {
    let dir = TempDir::new("health");
    let (set, kernel) = start(&dir, &declared(&[A, B, C])).await;
    // Not judged yet: in rotation.
    assert_eq!(kernel.state_of(A), Some(BackendState::Up));

    set.apply_health(snapshot(&[
        (A, Verdict::Healthy, Condition::Healthy, 0),
        (B, Verdict::Unhealthy, Condition::Unreachable, 0),
        (C, Verdict::Healthy, Condition::Healthy, 0),
    ]))
    .await
    .unwrap();
    assert_eq!(kernel.state_of(B), Some(BackendState::Down));
    assert_eq!(kernel.state_of(A), Some(BackendState::Up));

    // A draining backend that fails goes down (its node cannot serve its flows anyway).
    let c = set.view().services[0].backends[2].backend.id;
    set.set_admin(c, AdminState::Draining, &Requester::Operator)
        .await
        .unwrap();
    assert_eq!(kernel.state_of(C), Some(BackendState::Draining));

    // Every enabled backend unhealthy: the least bad (answering, fewest blocks behind) stays.
    set.apply_health(snapshot(&[
        (A, Verdict::Unhealthy, Condition::Answering, 12),
        (B, Verdict::Unhealthy, Condition::Answering, 7),
        (C, Verdict::Unhealthy, Condition::Unreachable, 0),
    ]))
    .await
    .unwrap();
    assert_eq!(kernel.state_of(A), Some(BackendState::Down));
    assert_eq!(kernel.state_of(B), Some(BackendState::Up));
    assert_eq!(kernel.state_of(C), Some(BackendState::Down));
    let view = set.view();
    assert!(view.services[0].backends[1].fallback);

    // The transitions are in the event log.
    let events = dir.store().recent_events(100).unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.kind == "backend.state" && e.detail.contains("up -> down (health)")),
        "{events:#?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_saturated_backend_stays_up_in_the_kernel_and_is_marked_in_the_view() {
    let dir = TempDir::new("saturated");
    let (set, kernel) = start(&dir, &declared(&[A, B])).await;
    let healthy = [
        (A, Verdict::Healthy, Condition::Healthy, 0),
        (B, Verdict::Healthy, Condition::Healthy, 0),
    ];
    set.apply_health(snapshot(&healthy)).await.unwrap();
    let changes_before = dir.store().recent_events(100).unwrap().len();

    let mut full = (*snapshot(&healthy)).clone();
    for node in full.nodes.values_mut().skip(1) {
        node.saturated = true;
    }
    set.apply_health(Arc::new(full)).await.unwrap();
    assert_eq!(kernel.state_of(B), Some(BackendState::Up));
    let view = set.view();
    let saturated: Vec<bool> = view.services[0]
        .backends
        .iter()
        .map(|backend| backend.saturated)
        .collect();
    assert_eq!(saturated, [false, true]);
    assert_eq!(view.services[0].backends[1].state, State::Up);
    // Not a change of state: nothing in the event log.
    assert_eq!(
        dir.store().recent_events(100).unwrap().len(),
        changes_before
    );

    set.apply_health(snapshot(&healthy)).await.unwrap();
    assert!(!set.view().services[0].backends[1].saturated);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backup_tier_stands_by_until_every_primary_is_down_and_hands_back() {
    let dir = TempDir::new("tiers");
    // A and B primaries, C a backup.
    let mut tiers = declared(&[A, B, C]);
    tiers.services[0].1[2].tier = 1;
    let (set, kernel) = start(&dir, &tiers).await;
    let states = || {
        let view = set.view();
        let states: Vec<State> = view.services[0].backends.iter().map(|b| b.state).collect();
        (states, view.services[0].serving_tier)
    };
    assert_eq!(
        states(),
        (vec![State::Up, State::Up, State::Standby], Some(0))
    );
    assert_eq!(kernel.state_of(C), Some(BackendState::Draining));

    let healthy = |address| (address, Verdict::Healthy, Condition::Healthy, 0);
    let dead = |address| (address, Verdict::Unhealthy, Condition::Unreachable, 0);
    set.apply_health(snapshot(&[dead(A), healthy(B), healthy(C)]))
        .await
        .unwrap();
    assert_eq!(
        states(),
        (vec![State::Down, State::Up, State::Standby], Some(0)),
        "one primary up is enough"
    );

    set.apply_health(snapshot(&[dead(A), dead(B), healthy(C)]))
        .await
        .unwrap();
    assert_eq!(
        states(),
        (vec![State::Down, State::Down, State::Up], Some(1))
    );
    assert_eq!(kernel.state_of(C), Some(BackendState::Up));
    assert!(!set.view().services[0].backends[2].fallback);

    // Every tier down: the least bad serve, the lower tier first among equals.
    let behind = |address, blocks| (address, Verdict::Unhealthy, Condition::Answering, blocks);
    set.apply_health(snapshot(&[behind(A, 9), behind(B, 7), behind(C, 7)]))
        .await
        .unwrap();
    assert_eq!(
        states(),
        (vec![State::Down, State::Up, State::Down], Some(0))
    );
    assert!(set.view().services[0].backends[1].fallback);
    set.apply_health(snapshot(&[behind(A, 9), behind(B, 8), behind(C, 7)]))
        .await
        .unwrap();
    assert_eq!(
        states(),
        (vec![State::Down, State::Down, State::Up], Some(1))
    );

    // A primary back: new flows go to it, the backup keeps its flows.
    set.apply_health(snapshot(&[healthy(A), dead(B), healthy(C)]))
        .await
        .unwrap();
    assert_eq!(
        states(),
        (vec![State::Up, State::Down, State::Standby], Some(0))
    );
    assert_eq!(kernel.state_of(C), Some(BackendState::Draining));

    let events = dir.store().recent_events(100).unwrap();
    let tiers: Vec<&str> = events
        .iter()
        .filter(|e| e.kind == "service.tier")
        .map(|e| e.detail.as_str())
        .collect();
    assert_eq!(
        tiers,
        [
            "served by tier 0 -> tier 1 (health)",
            "served by tier 1 -> tier 0 (health)",
            "served by tier 0 -> tier 1 (health)",
            "served by tier 1 -> tier 0 (health)",
        ]
    );
    assert!(
        events
            .iter()
            .any(|e| e.kind == "backend.state" && e.detail == "up -> standby (health)"),
        "{events:#?}"
    );
}

/// A kernel whose every push takes `SLOW_PUSH`, as a large table's BPF system calls can.
#[derive(Clone, Default)]
struct SlowKernel(RecordedKernel);

const SLOW_PUSH: Duration = Duration::from_millis(300);

impl KernelTables for SlowKernel {
    fn apply(
        &mut self,
        settings: &LbSettings,
        services: &[ServiceSpec],
    ) -> Result<ApplyReport, DataplaneError> {
        std::thread::sleep(SLOW_PUSH);
        self.0.apply(settings, services)
    }

    fn detach(&mut self) -> Result<(), DataplaneError> {
        std::thread::sleep(SLOW_PUSH);
        self.0.detach()
    }
}

impl SlowKernel {
    fn weight_of(&self, address: &str) -> Option<u32> {
        let address: SocketAddr = address.parse().unwrap();
        self.0
            .0
            .lock()
            .unwrap()
            .iter()
            .flat_map(|service| service.backends.iter())
            .find(|backend| backend.addr == address)
            .map(|backend| backend.weight)
    }
}

async fn start_slow(dir: &TempDir, declared: &Declared) -> (Arc<BackendSet>, SlowKernel) {
    let (set, kernel) = start_on(dir, declared, SlowKernel::default()).await;
    (Arc::new(set), kernel)
}

/// The longest pause between the ticks of a task that ticks every 10 ms, until dropped.
struct Ticker {
    longest_gap: Arc<Mutex<Duration>>,
    task: tokio::task::JoinHandle<()>,
}

impl Ticker {
    fn start() -> Ticker {
        let longest_gap = Arc::new(Mutex::new(Duration::ZERO));
        let gap = longest_gap.clone();
        let task = tokio::spawn(async move {
            let mut last = Instant::now();
            loop {
                tokio::time::sleep(Duration::from_millis(10)).await;
                let now = Instant::now();
                let mut longest = gap.lock().unwrap();
                *longest = (*longest).max(now - last);
                last = now;
            }
        });
        Ticker { longest_gap, task }
    }

    /// Checks that the ticks never paused for half a slow push, up to now.
    async fn assert_never_paused_long(&self, during: &str) {
        // A few more ticks, so a pause that just ended is measured.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let gap = *self.longest_gap.lock().unwrap();
        assert!(
            gap < SLOW_PUSH / 2,
            "{during}: a task on the same runtime paused {gap:?} while the kernel was busy"
        );
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// One worker: a kernel push made on it would stop every other task for as long as it takes.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn slow_kernel_push_does_not_stall_other_tasks() {
    let dir = TempDir::new("slow-kernel");
    let (set, kernel) = start_slow(&dir, &declared(&[A, B])).await;
    let b = set.view().services[0].backends[1].backend.id;
    let ticker = Ticker::start();
    let began = Instant::now();
    // Spawned, so the change runs on the worker (the test's own future does not).
    let changing = set.clone();
    let changed = tokio::spawn(async move { changing.set_weight(b, 3).await });
    changed.await.unwrap().unwrap();
    assert!(
        began.elapsed() >= SLOW_PUSH,
        "the change waits for its push"
    );
    assert_eq!(
        kernel.weight_of(B),
        Some(3),
        "pushed before the change returns"
    );
    ticker.assert_never_paused_long("a change").await;
    // Detaching is a kernel call too (and one that no store write precedes).
    let detaching = set.clone();
    tokio::spawn(async move { detaching.detach_kernel().await })
        .await
        .unwrap()
        .unwrap();
    ticker.assert_never_paused_long("detaching").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn change_whose_caller_stops_waiting_is_still_pushed_and_published_in_order() {
    let dir = TempDir::new("cancelled-change");
    let (set, kernel) = start_slow(&dir, &declared(&[A, B])).await;
    let b = set.view().services[0].backends[1].backend.id;
    let mut view = set.subscribe();
    // The caller gives up while the kernel is busy with its change (an admin request whose
    // client went away).
    let gave_up = tokio::time::timeout(SLOW_PUSH / 3, set.set_weight(b, 3)).await;
    assert!(gave_up.is_err(), "the push takes {SLOW_PUSH:?}");
    // The change still reaches the kernel and the view, before the next change.
    let weight_in_view = |view: &ClusterView| view.backend(b).map(|(_, b)| b.backend.def.weight);
    tokio::time::timeout(SLOW_PUSH * 3, async {
        while weight_in_view(&view.borrow_and_update()) != Some(3) {
            view.changed().await.unwrap();
        }
    })
    .await
    .expect("the view shows the change");
    assert_eq!(kernel.weight_of(B), Some(3));
    set.set_weight(b, 4).await.unwrap();
    assert_eq!(kernel.weight_of(B), Some(4));
    assert_eq!(weight_in_view(&set.view()), Some(4));
}
