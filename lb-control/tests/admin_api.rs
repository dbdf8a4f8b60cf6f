//! The admin API of a real `lb-control run`: real HTTP, the real SQLite store, the XDP program
//! attached to the loopback device of a network namespace of the test's own. Each test starts
//! its own daemon (its own namespace, instance, state directory), so they run in parallel.
//!
//! The test thread enters the daemon's namespace to reach `127.0.0.1:9900` there; processes it
//! spawns (the CLI) inherit that namespace.
//!
//! These tests need root: run them as root or with `cargo xtask test`.

use std::{
    collections::BTreeSet,
    fs,
    io::{Read, Seek, SeekFrom},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use aya::maps::{Array, Map, MapData, lpm_trie::LpmTrie};
use ipnet::IpNet;
use lb_common::{
    map_names,
    maps::{BlockV4, BlockV6},
};
use lb_control::{
    admin_client::{AdminClient, ClientError},
    api::model::{
        CapsChange, ErrorCode, JoinRequest, LimitChange, NewBackend, NewBlock, NewKey, NewService,
        NewToken, TokenScope,
    },
    backends::State,
    blocklist::ADOPTED_MARKER,
    dataplane::Blocklist,
    model::{AdminState, BlockSource, ForwardingMode, HealthCheck, Protocol, RateLimit},
};
use reqwest::{Method, StatusCode};
use serde_json::Value;

const TOKEN: &str = "test-token-0123456789abcdef01234";
const ADMIN: &str = "http://127.0.0.1:9900";
/// The service the config file declares.
const VIP: &str = "10.200.50.1";
const SERVICE_NAME: &str = "10.200.50.1:9944/tcp";
/// How long a daemon may take to answer `/healthz` after its start.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// A daemon in a namespace of its own.

/// `lb-control run` in its own network namespace with its own instance name and state
/// directory; everything is removed on drop, and a failing test prints the daemon's log.
struct Daemon {
    name: String,
    dir: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    /// Creates the namespace, moves the calling thread into it, and starts the daemon.
    fn start() -> Daemon {
        require_root();
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "lbapi-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join(&name);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("temp dir");
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let daemon = Daemon {
            name,
            dir,
            child: None,
        };
        run_ok(Command::new("ip").args(["-n", &daemon.name, "link", "set", "lo", "up"]));
        fs::write(daemon.config(), daemon.config_text()).expect("write config");
        lb_control::netns::enter(&daemon.name).expect("enter the daemon's namespace");
        let mut daemon = daemon;
        daemon.spawn();
        daemon
    }

    fn config(&self) -> PathBuf {
        self.dir.join("lb.toml")
    }

    fn config_text(&self) -> String {
        format!(
            r#"
instance = "{name}"
state_dir = "{state}"

[dataplane]
nat_source_v4 = "10.200.50.254"

[admin]
listen = "127.0.0.1:9900"
token = "{TOKEN}"

# No health checks: nothing listens behind the backends, and the tests look at admin states.
[[services]]
vip = "{VIP}"
port = 9944
check = "none"
"#,
            name = self.name,
            state = self.dir.join("state").display(),
        )
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("daemon.log")
    }

    fn spawn(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("daemon log");
        let child = Command::new(env!("CARGO_BIN_EXE_lb-control"))
            .args(["run", "--netns", &self.name, "-i", "lo", "--config"])
            .arg(self.config())
            .env_remove("LB_ADMIN_TOKEN")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("lb-control starts");
        self.child = Some(child);
    }

    /// Waits until the API answers `/healthz`.
    async fn ready(&mut self) -> AdminClient {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("lb-control exited with {status} before it was ready");
            }
            let answer = http.get(format!("{ADMIN}/healthz")).send().await;
            if answer.is_ok_and(|answer| answer.status() == StatusCode::OK) {
                return AdminClient::new(ADMIN, TOKEN);
            }
            assert!(
                Instant::now() < deadline,
                "lb-control did not answer /healthz within {READY_TIMEOUT:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the daemon with `signal` and waits for it to exit.
    fn signal(&mut self, signal: i32) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("the daemon is running");
        // SAFETY: kill has no memory-safety preconditions; the pid is our own child's.
        unsafe { libc::kill(child.id() as i32, signal) };
        child.wait().expect("wait for lb-control")
    }

    async fn restart(&mut self, signal: i32) -> AdminClient {
        self.signal(signal);
        self.spawn();
        self.ready().await
    }

    /// The instance's pinned maps.
    fn pin_dir(&self) -> PathBuf {
        Path::new("/sys/fs/bpf").join(&self.name)
    }

    /// The daemon's log so far.
    fn log(&self) -> String {
        let mut text = String::new();
        if let Ok(mut file) = fs::File::open(self.log_path()) {
            let length = file.seek(SeekFrom::End(0)).unwrap_or(0);
            let _ = file.seek(SeekFrom::Start(length.saturating_sub(20_000)));
            let _ = file.read_to_string(&mut text);
        }
        text
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- lb-control log ({}) ---\n{}", self.name, self.log());
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = fs::remove_dir_all(self.pin_dir());
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test runs lb-control (XDP, network namespaces) and needs root: run it as root or \
         with `cargo xtask test`"
    );
}

fn run_ok(command: &mut Command) -> Output {
    let output = command.output().expect("command runs");
    assert!(
        output.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Runs `test` on a current-thread runtime, on this thread (which is in the namespace).
fn block_on<F: Future<Output = ()>>(test: F) {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(test);
}

/// A request with full control over token and body; the answer's status and JSON body.
async fn raw(method: Method, path: &str, token: Option<&str>, body: Option<&str>) -> (u16, Value) {
    let mut request = reqwest::Client::new().request(method, format!("{ADMIN}{path}"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body.to_owned());
    }
    let response = request.send().await.expect("the API answers");
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// Asserts an error answer: its status, code, and field.
fn assert_error(answer: &(u16, Value), status: u16, code: &str, field: Option<&str>) {
    let (got, body) = answer;
    assert_eq!(*got, status, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert_eq!(body["error"]["field"].as_str(), field, "{body}");
}

fn new_backend(address: &str) -> NewBackend {
    NewBackend {
        address: address.parse().expect("address"),
        service: None,
        rpc_port: 9944,
        weight: 1,
        admin: AdminState::Enabled,
        tier: 0,
    }
}

fn new_key(name: &str, rps: Option<u32>) -> NewKey {
    NewKey {
        name: name.to_owned(),
        rps,
        burst: None,
        max_connections: None,
        max_subscriptions: None,
    }
}

fn new_token(name: &str, services: &[&str]) -> NewToken {
    NewToken {
        name: name.to_owned(),
        scope: TokenScope::Join,
        services: services
            .iter()
            .map(|service| (*service).to_owned())
            .collect(),
    }
}

fn api_error(result: Result<impl std::fmt::Debug, ClientError>) -> (StatusCode, ErrorCode) {
    match result {
        Err(ClientError::Api { status, detail }) => (status, detail.code),
        other => panic!("expected an API error, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Errors.

#[test]
fn every_error_class_has_its_status_code_and_field() {
    let mut daemon = Daemon::start();
    block_on(async {
        let client = daemon.ready().await;
        let token = Some(TOKEN);
        let post =
            |path: &'static str, body: &'static str| raw(Method::POST, path, token, Some(body));

        // 401: no token, a wrong one, another scheme; public routes need none.
        assert_error(
            &raw(Method::GET, "/v1/services", None, None).await,
            401,
            "unauthorized",
            None,
        );
        assert_error(
            &raw(Method::GET, "/v1/services", Some("wrong-token"), None).await,
            401,
            "unauthorized",
            None,
        );
        let basic = reqwest::Client::new()
            .get(format!("{ADMIN}/v1/keys"))
            .basic_auth("admin", Some(TOKEN))
            .send()
            .await
            .expect("answer");
        assert_eq!(basic.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(raw(Method::GET, "/healthz", None, None).await.0, 200);

        // 400: a bad address names `address`; bad JSON names the field serde names.
        assert_error(
            &post("/v1/backends", r#"{"address": "10.200.50.300:9944"}"#).await,
            400,
            "invalid",
            Some("address"),
        );
        assert_error(
            &post("/v1/backends", r#"{"address": "10.200.50.2"}"#).await,
            400,
            "invalid",
            Some("address"),
        );
        assert_error(
            &post(
                "/v1/backends",
                r#"{"address": "10.200.50.2:9944", "weight": "heavy"}"#,
            )
            .await,
            400,
            "invalid",
            Some("weight"),
        );
        assert_error(
            &post(
                "/v1/backends",
                r#"{"address": "10.200.50.2:9944", "colour": "red"}"#,
            )
            .await,
            400,
            "invalid",
            Some("colour"),
        );
        assert_error(
            &post("/v1/backends", r#"{"weight": 2}"#).await,
            400,
            "invalid",
            Some("address"),
        );
        assert_error(
            &post("/v1/backends", r#"{"address": "#).await,
            400,
            "invalid",
            Some("address"),
        );
        assert_error(
            &post("/v1/backends", "not json").await,
            400,
            "invalid",
            None,
        );
        assert_error(
            &post("/v1/backends", r#"{"address": "[fd00:200::2]:9944"}"#).await,
            400,
            "invalid",
            Some("address"),
        );
        assert_error(
            &post(
                "/v1/backends",
                r#"{"address": "10.200.50.2:9944", "weight": 0}"#,
            )
            .await,
            400,
            "invalid",
            Some("weight"),
        );
        assert_error(
            &post(
                "/v1/backends",
                r#"{"address": "10.200.50.2:9944", "tier": 10}"#,
            )
            .await,
            400,
            "invalid",
            Some("tier"),
        );
        assert_error(
            &post("/v1/services", r#"{"vip": "10.200.51.1", "port": 0}"#).await,
            400,
            "invalid",
            Some("port"),
        );
        assert_error(
            &post(
                "/v1/services",
                r#"{"vip": "10.200.51.1", "port": 80, "mode": "tunnel"}"#,
            )
            .await,
            400,
            "invalid",
            Some("mode"),
        );
        assert_error(
            &post("/v1/keys", r#"{"name": "has space"}"#).await,
            400,
            "invalid",
            Some("name"),
        );
        assert_error(
            &post("/v1/keys", r#"{"name": "a", "burst": 3}"#).await,
            400,
            "invalid",
            Some("burst"),
        );
        assert_error(
            &post("/v1/keys", r#"{"name": "a", "rps": 0}"#).await,
            400,
            "invalid",
            Some("rps"),
        );
        assert_error(
            &raw(Method::GET, "/v1/backends/abc", token, None).await,
            400,
            "invalid",
            Some("id"),
        );
        assert_error(
            &raw(Method::GET, "/v1/events?limit=5000", token, None).await,
            400,
            "invalid",
            Some("limit"),
        );
        assert_error(
            &raw(Method::GET, "/v1/backends?service=x", token, None).await,
            400,
            "invalid",
            Some("service"),
        );

        // 404: unknown ids, unknown routes; 405: a route without that method.
        for (method, path) in [
            (Method::GET, "/v1/backends/999"),
            (Method::DELETE, "/v1/backends/999"),
            (Method::POST, "/v1/backends/999/drain"),
            (Method::GET, "/v1/services/999"),
            (Method::DELETE, "/v1/services/999"),
            (Method::DELETE, "/v1/keys/999"),
            (Method::GET, "/v1/backends?service=999"),
            (Method::GET, "/v1/nothing"),
        ] {
            assert_error(
                &raw(method, path, token, None).await,
                404,
                "not_found",
                None,
            );
        }
        assert_error(
            &raw(
                Method::PUT,
                "/v1/backends/999/weight",
                token,
                Some(r#"{"weight": 2}"#),
            )
            .await,
            404,
            "not_found",
            None,
        );
        assert_error(
            &raw(Method::PATCH, "/v1/services", token, None).await,
            405,
            "method_not_allowed",
            None,
        );

        // 409: duplicates of a backend, a service, a key name; a key revoked twice.
        let backend = client
            .add_backend(&new_backend("10.200.50.2:9944"))
            .await
            .expect("backend added");
        assert_eq!(backend.service_name, SERVICE_NAME);
        assert_error(
            &post("/v1/backends", r#"{"address": "10.200.50.2:9944"}"#).await,
            409,
            "conflict",
            None,
        );
        assert_error(
            &post("/v1/services", r#"{"vip": "10.200.50.1", "port": 9944}"#).await,
            409,
            "conflict",
            None,
        );
        let key = client
            .create_key(&new_key("alice", None))
            .await
            .expect("key");
        assert_error(
            &post("/v1/keys", r#"{"name": "alice"}"#).await,
            409,
            "conflict",
            None,
        );
        client.revoke_key(key.id).await.expect("revoked");
        assert_eq!(
            api_error(client.revoke_key(key.id).await),
            (StatusCode::CONFLICT, ErrorCode::Conflict)
        );

        // With two services, a backend must name its service.
        client
            .add_service(&NewService {
                vip: "10.200.51.1".parse().expect("ip"),
                port: 80,
                protocol: Protocol::Tcp,
                mode: ForwardingMode::Nat,
                check: HealthCheck::None,
            })
            .await
            .expect("second service");
        assert_error(
            &post("/v1/backends", r#"{"address": "10.200.50.3:9944"}"#).await,
            400,
            "invalid",
            Some("service"),
        );
        // Nothing refused was stored.
        let backends = client.backends(None).await.expect("backends");
        assert_eq!(backends.len(), 1, "{backends:?}");
        assert_eq!(client.keys().await.expect("keys").len(), 1);
    });
}

// ---------------------------------------------------------------------------------------------
// Round trips.

#[test]
fn backend_round_trip_reaches_the_store_and_the_kernel() {
    let mut daemon = Daemon::start();
    block_on(async {
        let client = daemon.ready().await;
        let services = client.services().await.expect("services");
        assert_eq!(services.len(), 1);
        let service = services[0].service.id;
        assert_eq!(services[0].name, SERVICE_NAME);

        let a = client
            .add_backend(&new_backend("10.200.50.2:9944"))
            .await
            .expect("a");
        let mut with_service = new_backend("10.200.50.3:9944");
        with_service.service = Some(service);
        with_service.weight = 3;
        with_service.rpc_port = 9933;
        let b = client.add_backend(&with_service).await.expect("b");
        assert_eq!((a.state, b.state), (State::Up, State::Up));
        assert_eq!((b.backend.def.weight, b.backend.def.rpc_port), (3, 9933));
        assert_eq!(b.backend.service, service);

        let listed = client.backends(Some(service)).await.expect("list");
        let ids: Vec<i64> = listed.iter().map(|x| x.backend.id).collect();
        assert_eq!(ids, [a.backend.id, b.backend.id]);
        assert_eq!(
            client
                .service(service)
                .await
                .expect("service")
                .backends
                .len(),
            2
        );

        let drained = client
            .set_admin(a.backend.id, AdminState::Draining)
            .await
            .expect("drain");
        assert_eq!(drained.state, State::Draining);
        assert_eq!(drained.backend.def.admin, AdminState::Draining);
        let disabled = client
            .set_admin(b.backend.id, AdminState::Disabled)
            .await
            .expect("disable");
        assert_eq!(disabled.state, State::Disabled);
        // The kernel's own view of the backends (read from the pinned maps).
        let kernel_states = |stats: lb_control::api::model::StatsReport| {
            stats
                .backends
                .iter()
                .map(|row| (row.backend, row.state.clone()))
                .collect::<Vec<(SocketAddr, String)>>()
        };
        assert_eq!(
            kernel_states(client.stats().await.expect("stats")),
            [
                (a.backend.def.address, "draining".to_owned()),
                (b.backend.def.address, "down".to_owned()),
            ]
        );

        let enabled = client
            .set_admin(a.backend.id, AdminState::Enabled)
            .await
            .expect("enable");
        assert_eq!(enabled.state, State::Up);
        let weighted = client.set_weight(a.backend.id, 5).await.expect("weight");
        assert_eq!(weighted.backend.def.weight, 5);
        assert_eq!(
            client
                .backend(a.backend.id)
                .await
                .expect("get")
                .backend
                .def
                .weight,
            5
        );

        let removed = client.remove_backend(b.backend.id).await.expect("remove");
        assert_eq!(removed.def.address, b.backend.def.address);
        assert_eq!(
            api_error(client.backend(b.backend.id).await),
            (StatusCode::NOT_FOUND, ErrorCode::NotFound)
        );
        assert_eq!(
            kernel_states(client.stats().await.expect("stats")),
            [(a.backend.def.address, "up".to_owned())]
        );

        // Each change is in the event log, oldest first.
        let events = client.events(None, 1000).await.expect("events");
        let kinds: BTreeSet<&str> = events.iter().map(|e| e.kind.as_str()).collect();
        for kind in ["backend.added", "backend.changed", "backend.removed"] {
            assert!(kinds.contains(kind), "{kind} missing from {events:?}");
        }
        assert!(events.windows(2).all(|w| w[0].id < w[1].id));
        let after = client
            .events(Some(events[events.len() - 2].id), 10)
            .await
            .expect("events after");
        assert_eq!(after.len(), 1);

        let health = client.health().await.expect("health");
        assert_eq!(health.nodes.len(), 1);
        assert_eq!(health.nodes[0].backend.id, a.backend.id);

        let gone = client
            .remove_service(service)
            .await
            .expect("remove service");
        assert_eq!(gone.id, service);
        assert!(client.backends(None).await.expect("list").is_empty());
    });
}

#[test]
fn the_lowest_tier_with_a_backend_up_gets_new_flows_and_the_others_stand_by() {
    let mut daemon = Daemon::start();
    block_on(async {
        let client = daemon.ready().await;
        let primary = client
            .add_backend(&new_backend("10.200.50.2:9944"))
            .await
            .expect("primary");
        let backup = client
            .add_backend(&NewBackend {
                tier: 1,
                ..new_backend("10.200.50.3:9944")
            })
            .await
            .expect("backup");
        assert_eq!(backup.backend.def.tier, 1);
        assert_eq!((primary.state, backup.state), (State::Up, State::Standby));
        let kernel_states = || async {
            client
                .stats()
                .await
                .expect("stats")
                .backends
                .iter()
                .map(|row| (row.backend.to_string(), row.state.clone()))
                .collect::<Vec<(String, String)>>()
        };
        // Standing by, the backup keeps what flows it has and gets no new ones.
        assert_eq!(
            kernel_states().await,
            [
                ("10.200.50.2:9944".to_owned(), "up".to_owned()),
                ("10.200.50.3:9944".to_owned(), "draining".to_owned()),
            ]
        );
        let serving = || async { client.services().await.expect("services")[0].serving_tier };
        assert_eq!(serving().await, Some(0));

        // The primary out: the backup tier serves, as the kernel, the API and the metrics say.
        client
            .set_admin(primary.backend.id, AdminState::Disabled)
            .await
            .expect("disable");
        assert_eq!(
            client.backend(backup.backend.id).await.expect("get").state,
            State::Up
        );
        assert_eq!(
            kernel_states().await,
            [
                ("10.200.50.2:9944".to_owned(), "down".to_owned()),
                ("10.200.50.3:9944".to_owned(), "up".to_owned()),
            ]
        );
        assert_eq!(serving().await, Some(1));
        let metrics = client.metrics_text().await.expect("metrics");
        assert!(
            metrics.contains(&format!(
                "lb_service_serving_tier{{service=\"{SERVICE_NAME}\"}} 1"
            )),
            "{metrics}"
        );

        // Moved to tier 0 itself, the backup is a primary: it stays up whatever tier 1 does.
        let moved = client.set_tier(backup.backend.id, 0).await.expect("tier");
        assert_eq!((moved.backend.def.tier, moved.state), (0, State::Up));
        client
            .set_admin(primary.backend.id, AdminState::Enabled)
            .await
            .expect("enable");
        assert_eq!(serving().await, Some(0));
        assert_eq!(
            api_error(client.set_tier(backup.backend.id, 10).await),
            (StatusCode::BAD_REQUEST, ErrorCode::Invalid)
        );

        let events = client.events(None, 1000).await.expect("events");
        let tiers: Vec<&str> = events
            .iter()
            .filter(|event| event.kind == "service.tier")
            .map(|event| event.detail.as_str())
            .collect();
        assert_eq!(
            tiers,
            [
                "served by no tier -> tier 0 (api)",
                "served by tier 0 -> tier 1 (api)",
                "served by tier 1 -> tier 0 (api)"
            ]
        );
    });
}

#[test]
fn key_secret_is_shown_once_and_never_listed() {
    let mut daemon = Daemon::start();
    block_on(async {
        let client = daemon.ready().await;
        let created = client
            .create_key(&NewKey {
                name: "alice".to_owned(),
                rps: Some(50),
                burst: Some(100),
                max_connections: None,
                max_subscriptions: None,
            })
            .await
            .expect("created");
        assert!(created.secret.starts_with("lbk_"), "{}", created.secret);
        assert_eq!(created.secret.len(), 4 + 64);
        assert_eq!(
            created.rate_limit,
            Some(RateLimit {
                rps: 50,
                burst: 100
            })
        );
        let unlimited = client.create_key(&new_key("bob", None)).await.expect("bob");
        assert_ne!(unlimited.secret, created.secret);
        assert_eq!(unlimited.rate_limit, None);

        // Neither the secret nor its hash is in any listing.
        let (status, listing) = raw(Method::GET, "/v1/keys", Some(TOKEN), None).await;
        assert_eq!(status, 200);
        let text = listing.to_string();
        let hash: String = lb_control::keys::digest(&created.secret)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert!(!text.contains(&created.secret[4..]), "{text}");
        assert!(!text.contains(&hash), "{text}");
        assert!(!text.contains("secret"), "{text}");
        let events = raw(Method::GET, "/v1/events", Some(TOKEN), None).await.1;
        assert!(!events.to_string().contains(&created.secret[4..]));

        let limited = client
            .set_key_limit(
                created.id,
                &LimitChange {
                    rps: Some(10),
                    burst: None,
                },
            )
            .await
            .expect("limit");
        assert_eq!(limited.rate_limit, Some(RateLimit { rps: 10, burst: 10 }));
        let lifted = client
            .set_key_limit(
                created.id,
                &LimitChange {
                    rps: None,
                    burst: None,
                },
            )
            .await
            .expect("unlimited");
        assert_eq!(lifted.rate_limit, None);
        // `rps` must be given (null lifts the limit): an empty body changes nothing.
        assert_error(
            &raw(
                Method::PUT,
                &format!("/v1/keys/{}/limit", unlimited.id),
                Some(TOKEN),
                Some("{}"),
            )
            .await,
            400,
            "invalid",
            Some("rps"),
        );

        // The key's own WebSocket caps: null is the gateway's default, 0 is refused, and both
        // must be given.
        let capped = client
            .set_key_caps(
                created.id,
                &CapsChange {
                    max_connections: Some(5000),
                    max_subscriptions: None,
                },
            )
            .await
            .expect("caps");
        assert_eq!(
            (capped.max_connections, capped.max_subscriptions),
            (Some(5000), None)
        );
        let listed = raw(Method::GET, "/v1/keys", Some(TOKEN), None).await.1;
        assert_eq!(listed[0]["max_connections"], 5000, "{listed}");
        assert_eq!(listed[0]["max_subscriptions"], Value::Null, "{listed}");
        for (body, field) in [
            (
                r#"{"max_connections": 0, "max_subscriptions": null}"#,
                "max_connections",
            ),
            (r#"{"max_connections": null}"#, "max_subscriptions"),
        ] {
            assert_error(
                &raw(
                    Method::PUT,
                    &format!("/v1/keys/{}/caps", created.id),
                    Some(TOKEN),
                    Some(body),
                )
                .await,
                400,
                "invalid",
                Some(field),
            );
        }
        assert_eq!(
            api_error(
                client
                    .set_key_caps(
                        999,
                        &CapsChange {
                            max_connections: None,
                            max_subscriptions: None
                        }
                    )
                    .await
            ),
            (StatusCode::NOT_FOUND, ErrorCode::NotFound)
        );

        let revoked = client.revoke_key(created.id).await.expect("revoke");
        assert!(revoked.revoked.is_some());
        assert_eq!(
            api_error(
                client
                    .set_key_limit(
                        created.id,
                        &LimitChange {
                            rps: Some(1),
                            burst: None
                        }
                    )
                    .await
            ),
            (StatusCode::CONFLICT, ErrorCode::Conflict)
        );
        let keys = client.keys().await.expect("keys");
        let states: Vec<(&str, bool)> = keys
            .iter()
            .map(|k| (k.name.as_str(), k.revoked.is_some()))
            .collect();
        assert_eq!(states, [("alice", true), ("bob", false)]);
    });
}

// ---------------------------------------------------------------------------------------------
// Join tokens.

/// What a join token can see of the state: every backend (with its admin state) and event.
async fn backends_and_events(client: &AdminClient) -> (Value, usize) {
    let backends =
        serde_json::to_value(client.backends(None).await.expect("backends")).expect("JSON");
    let events = client.events(None, 1000).await.expect("events").len();
    (backends, events)
}

#[test]
fn join_tokens_reach_only_their_own_backends_and_bad_ones_change_nothing() {
    let mut daemon = Daemon::start();
    block_on(async {
        let admin = daemon.ready().await;
        // A second service, which the token does not name, and another node's backend.
        admin
            .add_service(&NewService {
                vip: "10.200.50.9".parse().expect("VIP"),
                port: 9944,
                protocol: Protocol::Tcp,
                mode: ForwardingMode::Nat,
                check: HealthCheck::None,
            })
            .await
            .expect("second service");
        let other = admin
            .add_backend(&NewBackend {
                service: Some(admin.services().await.expect("services")[0].service.id),
                ..new_backend("10.200.50.2:9944")
            })
            .await
            .expect("another node's backend");

        let created = admin
            .create_token(&new_token("eu", &[SERVICE_NAME]))
            .await
            .expect("token");
        assert!(created.secret.starts_with("lbj_"), "{}", created.secret);
        let listed = admin.tokens().await.expect("tokens");
        assert_eq!(listed.len(), 1);
        let listed_json = serde_json::to_string(&listed).expect("JSON");
        assert!(!listed_json.contains(&created.secret), "{listed_json}");
        // A token for a service that does not exist is refused, naming it.
        assert_error(
            &raw(
                Method::POST,
                "/v1/tokens",
                Some(TOKEN),
                Some(r#"{"name": "x", "services": ["10.200.50.77:9944"]}"#),
            )
            .await,
            400,
            "invalid",
            Some("services[0]"),
        );

        let join = |service: &str| {
            serde_json::to_string(&JoinRequest {
                service: service.to_owned(),
                port: 9944,
                rpc_port: 9944,
                weight: 1,
                tier: 0,
            })
            .expect("JSON")
        };
        let before = backends_and_events(&admin).await;
        // Wrong: 401.
        let wrong = format!("lbj_{}", "0".repeat(64));
        for token in [wrong.as_str(), "not-a-token"] {
            assert_error(
                &raw(
                    Method::POST,
                    "/v1/join",
                    Some(token),
                    Some(&join(SERVICE_NAME)),
                )
                .await,
                401,
                "unauthorized",
                None,
            );
        }
        // Out of scope: another service, the admin routes, another node's backend: 403.
        let secret = Some(created.secret.as_str());
        let forbidden = [
            raw(
                Method::POST,
                "/v1/join",
                secret,
                Some(&join("10.200.50.9:9944")),
            )
            .await,
            raw(Method::GET, "/v1/keys", secret, None).await,
            raw(Method::GET, "/v1/tokens", secret, None).await,
            raw(
                Method::POST,
                "/v1/backends",
                secret,
                Some(r#"{"address": "127.0.0.1:1"}"#),
            )
            .await,
            raw(Method::POST, "/v1/services", secret, Some("{}")).await,
            raw(Method::GET, "/v1/events", secret, None).await,
            raw(
                Method::POST,
                &format!("/v1/backends/{}/enable", other.backend.id),
                secret,
                None,
            )
            .await,
            raw(
                Method::POST,
                &format!("/v1/backends/{}/drain", other.backend.id),
                secret,
                None,
            )
            .await,
            raw(
                Method::DELETE,
                &format!("/v1/backends/{}", other.backend.id),
                secret,
                None,
            )
            .await,
        ];
        for answer in &forbidden {
            assert_error(answer, 403, "forbidden", None);
        }
        assert!(
            forbidden[0].1["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("join token 1 (eu) may not join 10.200.50.9:9944")),
            "{}",
            forbidden[0].1
        );
        // A join token sees only its own backends: none yet.
        assert_eq!(
            raw(Method::GET, "/v1/backends", secret, None).await.1,
            Value::Array(vec![])
        );
        assert_eq!(backends_and_events(&admin).await, before, "nothing changed");

        // In scope: its own address (127.0.0.1 here) joins; the event names the token.
        let node = AdminClient::new(ADMIN, &created.secret);
        let joined = node
            .join(&serde_json::from_str(&join(SERVICE_NAME)).expect("request"))
            .await
            .expect("joined");
        assert_eq!(joined.backend.def.address.to_string(), "127.0.0.1:9944");
        let again = node
            .join(&serde_json::from_str(&join(SERVICE_NAME)).expect("request"))
            .await
            .expect("joined again");
        assert_eq!(
            again.backend.id, joined.backend.id,
            "joining again changes nothing"
        );
        let own: Vec<i64> = node
            .backends(None)
            .await
            .expect("own backends")
            .iter()
            .map(|backend| backend.backend.id)
            .collect();
        assert_eq!(own, [joined.backend.id]);
        let added = admin.events(None, 1000).await.expect("events");
        let added = added
            .iter()
            .rfind(|event| event.kind == "backend.added")
            .expect("an added event");
        assert_eq!(added.detail, "join token 1 (eu)");

        // Revoked: 401, and its backend stays.
        admin.revoke_token(created.token.id).await.expect("revoked");
        let before = backends_and_events(&admin).await;
        let revoked = raw(
            Method::DELETE,
            &format!("/v1/backends/{}", joined.backend.id),
            secret,
            None,
        )
        .await;
        assert_error(&revoked, 401, "unauthorized", None);
        assert!(
            revoked.1["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("join token 1 (eu) is revoked")),
            "{}",
            revoked.1
        );
        assert_eq!(backends_and_events(&admin).await, before, "nothing changed");
    });
}

// ---------------------------------------------------------------------------------------------
// The document and the metrics.

#[test]
fn openapi_document_is_valid_and_matches_the_routes() {
    let mut daemon = Daemon::start();
    block_on(async {
        let client = daemon.ready().await;
        let document = client.openapi().await.expect("document");
        validate_openapi(&document);

        // Real ids for every `{id}`.
        let backend = client
            .add_backend(&new_backend("10.200.50.2:9944"))
            .await
            .expect("backend");
        let key = client
            .create_key(&new_key("probe", None))
            .await
            .expect("key");
        let token = client
            .create_token(&new_token("probe", &[SERVICE_NAME]))
            .await
            .expect("token");
        let service = client.services().await.expect("services")[0].service.id;
        let path_for = |template: &str| {
            let id = if template.starts_with("/v1/services/") {
                service
            } else if template.starts_with("/v1/backends/") {
                backend.backend.id
            } else if template.starts_with("/v1/tokens/") {
                token.token.id
            } else {
                key.id
            };
            template.replace("{id}", &id.to_string())
        };

        let mut operations: Vec<(Method, String)> = Vec::new();
        for (path, item) in document["paths"].as_object().expect("paths") {
            for method in item.as_object().expect("path item").keys() {
                let method = Method::from_bytes(method.to_uppercase().as_bytes()).expect("method");
                operations.push((method, path.clone()));
            }
        }
        assert!(operations.len() >= 20, "{operations:?}");
        // Deletions last, services after what they hold.
        operations.sort_by_key(|(method, path)| {
            (*method == Method::DELETE, path.starts_with("/v1/services"))
        });
        for (method, template) in &operations {
            let body = matches!(*method, Method::POST | Method::PUT).then_some("{}");
            let (status, answer) =
                raw(method.clone(), &path_for(template), Some(TOKEN), body).await;
            assert!(
                status != 404 && status != 405,
                "{method} {template}: {status} {answer}"
            );
        }
        // No documented path takes an undocumented method.
        for (_, template) in &operations {
            let (status, _) = raw(Method::PATCH, &path_for(template), Some(TOKEN), None).await;
            assert_eq!(status, 405, "PATCH {template}");
        }
        // The router matched each request under the documented template (not a fallback).
        let metrics = client.metrics_text().await.expect("metrics");
        for (method, template) in &operations {
            let series =
                format!("lb_admin_requests_total{{method=\"{method}\",route=\"{template}\"");
            assert!(metrics.contains(&series), "{series} missing:\n{metrics}");
        }
    });
}

/// Validates the document with @seriousme/openapi-schema-validator (tests/js, installed by
/// `cargo xtask setup`).
fn validate_openapi(document: &Value) {
    let js = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/js");
    assert!(
        js.join("node_modules/@seriousme/openapi-schema-validator/package.json")
            .exists(),
        "the OpenAPI validator is not installed: run `cargo xtask setup`"
    );
    let mut child = Command::new("node")
        .arg("validate-openapi.mjs")
        .current_dir(&js)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node runs (is Node.js 20 installed?)");
    serde_json::to_writer(child.stdin.take().expect("stdin"), document).expect("write document");
    let output = child.wait_with_output().expect("validator finishes");
    let verdict = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the OpenAPI document is not valid:\n{verdict}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let verdict: Value = serde_json::from_str(&verdict).expect("verdict JSON");
    assert_eq!(verdict["valid"], true);
    assert_eq!(verdict["version"], "3.1");
}

#[test]
fn metrics_show_control_plane_and_kernel_families() {
    let mut daemon = Daemon::start();
    block_on(async {
        let client = daemon.ready().await;
        client
            .add_backend(&new_backend("10.200.50.2:9944"))
            .await
            .expect("backend");
        let _ = raw(Method::GET, "/v1/services", None, None).await;
        let response = reqwest::get(format!("{ADMIN}/metrics"))
            .await
            .expect("metrics");
        assert_eq!(response.status(), StatusCode::OK);
        let content_type = response.headers()["content-type"]
            .to_str()
            .expect("ascii")
            .to_owned();
        assert!(
            content_type.starts_with("application/openmetrics-text"),
            "{content_type}"
        );
        let text = response.text().await.expect("text");
        for expected in [
            "# TYPE lb_admin_requests counter",
            "lb_admin_requests_total{method=\"GET\",route=\"/v1/services\",status=\"401\"} 1",
            "lb_admin_requests_total{method=\"POST\",route=\"/v1/backends\",status=\"201\"} 1",
            "lb_backend_in_rotation{service=\"10.200.50.1:9944/tcp\",backend=\"10.200.50.2:9944\"} 1",
            "lb_backend_set_changes_total",
            "lb_xdp_stats_readable 1",
            "# TYPE lb_xdp_packets counter",
            "lb_xdp_packets_total{protocol=\"ipv4_tcp\"}",
            "lb_xdp_bytes_total{protocol=\"ipv4_tcp\"}",
            "lb_xdp_drops_total{reason=\"blocked\"} 0",
            "lb_xdp_second_chance_packets_total{mode=\"handover\"} 0",
            "lb_xdp_second_chance_packets_total{mode=\"standing\"} 0",
            "lb_service_packets_total{service=\"10.200.50.1:9944/tcp\"}",
            "lb_service_bytes_total{service=\"10.200.50.1:9944/tcp\"}",
            "lb_service_new_flows_total{service=\"10.200.50.1:9944/tcp\"}",
            "lb_service_drops_total{service=\"10.200.50.1:9944/tcp\",reason=\"no_backend\"}",
            "lb_backend_packets_total{backend=\"10.200.50.2:9944\"}",
            "lb_backend_bytes_total{backend=\"10.200.50.2:9944\"}",
            "lb_backend_new_flows_total{backend=\"10.200.50.2:9944\"}",
        ] {
            assert!(text.contains(expected), "{expected:?} missing:\n{text}");
        }
        // The backend added above was written to the store.
        let store_writes: u64 = text
            .lines()
            .find_map(|line| line.strip_prefix("lb_store_calls_total{kind=\"write\"} "))
            .expect("lb_store_calls_total{kind=\"write\"}")
            .parse()
            .expect("a count");
        assert!(store_writes >= 1, "{text}");
        assert!(
            text.contains("lb_store_calls_total{kind=\"read\"}"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert_eq!(text.matches("# EOF").count(), 1);
    });
}

// ---------------------------------------------------------------------------------------------
// Durability.

#[test]
fn state_survives_a_restart() {
    let mut daemon = Daemon::start();
    block_on(async {
        let client = daemon.ready().await;
        let a = client
            .add_backend(&new_backend("10.200.50.2:9944"))
            .await
            .expect("a");
        let b = client
            .add_backend(&new_backend("10.200.50.3:9944"))
            .await
            .expect("b");
        let c = client
            .add_backend(&new_backend("10.200.50.4:9944"))
            .await
            .expect("c");
        client.set_weight(a.backend.id, 7).await.expect("weight");
        client
            .set_admin(b.backend.id, AdminState::Draining)
            .await
            .expect("drain");
        client
            .set_admin(c.backend.id, AdminState::Disabled)
            .await
            .expect("disable");
        let key = client
            .create_key(&new_key("alice", Some(9)))
            .await
            .expect("key");
        let revoked = client.create_key(&new_key("bob", None)).await.expect("key");
        client.revoke_key(revoked.id).await.expect("revoke");
        let before = (
            client.backends(None).await.expect("backends"),
            client.keys().await.expect("keys"),
        );

        let client = daemon.restart(libc::SIGTERM).await;
        let backends = client.backends(None).await.expect("backends");
        let keys = client.keys().await.expect("keys");
        let summary = |list: &[lb_control::api::model::BackendInfo]| {
            list.iter()
                .map(|x| (x.backend.clone(), x.state))
                .collect::<Vec<_>>()
        };
        assert_eq!(summary(&backends), summary(&before.0));
        assert_eq!(
            backends
                .iter()
                .map(|x| (x.backend.def.weight, x.backend.def.admin))
                .collect::<Vec<_>>(),
            [
                (7, AdminState::Enabled),
                (1, AdminState::Draining),
                (1, AdminState::Disabled)
            ]
        );
        assert_eq!(
            serde_json::to_value(&keys).expect("json"),
            serde_json::to_value(&before.1).expect("json")
        );
        assert_eq!(keys[0].id, key.id);
        assert_eq!(keys[0].rate_limit, Some(RateLimit { rps: 9, burst: 9 }));
    });
}

/// Every write the API acknowledged with a 2xx is there after a SIGKILL: the answer comes only
/// after the durable commit.
#[test]
fn acknowledged_writes_survive_kill_9() {
    let mut daemon = Daemon::start();
    let netns = daemon.name.clone();
    block_on(async {
        daemon.ready().await;
    });
    let acknowledged = Arc::new(Mutex::new(Vec::<Write>::new()));
    let failed = Arc::new(AtomicBool::new(false));
    let writer = {
        let acknowledged = acknowledged.clone();
        let failed = failed.clone();
        std::thread::spawn(move || {
            lb_control::netns::enter(&netns).expect("writer enters the namespace");
            block_on(write_until_refused(acknowledged, failed));
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while acknowledged.lock().expect("lock").len() < 40 {
        assert!(
            Instant::now() < deadline,
            "the writer made too little progress"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    daemon.signal(libc::SIGKILL);
    writer.join().expect("writer");
    assert!(
        failed.load(Ordering::Relaxed),
        "the writer never saw the daemon go"
    );
    let acknowledged = acknowledged.lock().expect("lock").clone();

    block_on(async {
        daemon.spawn();
        let client = daemon.ready().await;
        let backends: BTreeSet<SocketAddr> = client
            .backends(None)
            .await
            .expect("backends")
            .into_iter()
            .map(|x| x.backend.def.address)
            .collect();
        let keys: BTreeSet<String> = client
            .keys()
            .await
            .expect("keys")
            .into_iter()
            .map(|key| key.name)
            .collect();
        for write in &acknowledged {
            match write {
                Write::Backend(address) => assert!(
                    backends.contains(address),
                    "acknowledged backend {address} lost"
                ),
                Write::Key(name) => {
                    assert!(keys.contains(name), "acknowledged key {name} lost")
                }
            }
        }
    });
}

#[derive(Debug, Clone)]
enum Write {
    Backend(SocketAddr),
    Key(String),
}

/// Adds backends and creates keys, alternately, until the API stops answering; records each
/// write that got a 2xx answer.
async fn write_until_refused(acknowledged: Arc<Mutex<Vec<Write>>>, failed: Arc<AtomicBool>) {
    let client = AdminClient::new(ADMIN, TOKEN);
    for i in 0u16.. {
        let result = if i % 2 == 0 {
            let address = SocketAddr::from(([10, 200, 50, 2], 10_000 + i));
            let mut new = new_backend("10.200.50.2:9944");
            new.address = address;
            client
                .add_backend(&new)
                .await
                .map(|_| Write::Backend(address))
        } else {
            let name = format!("writer-{i}");
            client
                .create_key(&new_key(&name, None))
                .await
                .map(|_| Write::Key(name))
        };
        match result {
            Ok(write) => acknowledged.lock().expect("lock").push(write),
            Err(ClientError::Api { detail, .. }) => panic!("write {i} refused: {detail:?}"),
            Err(_) => {
                failed.store(true, Ordering::Relaxed);
                return;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
/// `lb-control` run as an operator runs it against the test's daemon (`--config`, no token in
/// the environment).
struct Cli<'a> {
    config: &'a Path,
}

impl Cli<'_> {
    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_lb-control"))
            .args(args)
            .arg("--config")
            .arg(self.config)
            .env_remove("LB_ADMIN_TOKEN")
            .output()
            .expect("lb-control runs")
    }

    /// Runs a command that must succeed; its standard output.
    fn ok(&self, args: &[&str]) -> String {
        let output = self.run(args);
        assert!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Runs a command that must fail (exit 1) saying `expected`.
    fn fails(&self, args: &[&str], expected: &str) {
        let output = self.run(args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}

// The CLI.

#[test]
fn cli_drives_the_api_and_reports_its_errors() {
    let mut daemon = Daemon::start();
    block_on(async {
        daemon.ready().await;
    });
    let config = daemon.config();
    let cli = Cli { config: &config };

    let added = cli.ok(&["backend", "add", "10.200.50.2:9944", "--weight", "2"]);
    assert!(
        added.contains("added backend 1 (10.200.50.2:9944) to 10.200.50.1:9944/tcp"),
        "{added}"
    );
    let backup = cli.ok(&["backend", "add", "10.200.50.3:9944", "--tier", "1"]);
    assert!(backup.ends_with(": standby\n"), "{backup}");
    assert!(cli.ok(&["backend", "drain", "1"]).contains("now draining"));
    // Tier 0's only backend draining: the backup tier serves.
    let status = cli.ok(&["status"]);
    assert!(status.contains(SERVICE_NAME), "{status}");
    assert!(status.contains("10.200.50.2:9944"), "{status}");
    assert!(status.contains("draining"), "{status}");
    assert!(
        status.contains("(1 of 2 backends up; served by backup tier 1)"),
        "{status}"
    );
    let listed: Value =
        serde_json::from_str(&cli.ok(&["backend", "list", "--json"])).expect("json");
    assert_eq!(listed[0]["weight"], 2);
    assert_eq!(listed[0]["state"], "draining");
    assert_eq!(
        (listed[1]["tier"].as_u64(), listed[1]["state"].as_str()),
        (Some(1), Some("up"))
    );
    assert!(
        cli.ok(&["backend", "tier", "2", "0"])
            .contains("backend 2 (10.200.50.3:9944) moved to tier 0: now up")
    );
    cli.ok(&["backend", "remove", "2"]);

    let output = cli.run(&["key", "create", "--name", "cli-key", "--rps", "5"]);
    assert!(output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    let secret = stdout
        .lines()
        .find_map(|line| line.strip_prefix("secret: "))
        .expect("the secret is printed");
    assert!(secret.starts_with("lbk_"), "{stdout}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot be shown again"));
    let keys = cli.ok(&["key", "list"]);
    assert!(
        keys.contains("cli-key") && keys.contains("5 rps, burst 5"),
        "{keys}"
    );
    assert!(!keys.contains(&secret[4..]), "{keys}");
    assert!(
        cli.ok(&["key", "limit", "1", "--unlimited"])
            .contains("unlimited")
    );
    assert_eq!(
        cli.ok(&["key", "caps", "1", "--max-connections", "5000"])
            .trim(),
        "key 1 (cli-key): 5000 connections, default subscriptions"
    );
    assert!(
        cli.ok(&["key", "list"])
            .contains("5000 connections, default subscriptions"),
        "{keys}"
    );
    cli.fails(
        &["key", "caps", "1", "--max-subscriptions", "0"],
        "error: max_subscriptions: 0 would shut the key out",
    );
    assert!(cli.ok(&["events", "--limit", "50"]).contains("key.created"));
    assert!(cli.ok(&["health"]).contains("10.200.50.2:9944"));

    cli.fails(
        &["backend", "remove", "99"],
        "error: backend 99 does not exist",
    );
    cli.fails(&["backend", "add", "10.200.50.2:9944"], "already exists");
    cli.fails(&["backend", "weight", "1", "0"], "weight");
    cli.fails(
        &["backend", "tier", "1", "12"],
        "error: 12 is not a tier: use 0 (primary) to 9",
    );
    cli.fails(
        &["status", "--admin", "http://127.0.0.1:9"],
        "is lb-control running? (admin API at http://127.0.0.1:9)",
    );
}

// ---------------------------------------------------------------------------------------------
// The blocklist.

/// What the kernel's blocklist holds, read from the pinned maps with aya alone (not through
/// lb-control's blocklist code): each prefix with its trie value (expiry in Unix seconds, 0 for
/// never), and the version the XDP program reads.
struct KernelBlocklist {
    entries: Vec<(IpNet, u32)>,
    version: u32,
}

fn kernel_blocklist(pin_dir: &Path) -> KernelBlocklist {
    let open = |name: &str| {
        let path = pin_dir.join(name);
        let data = MapData::from_pin(&path)
            .unwrap_or_else(|error| panic!("opening {}: {error}", path.display()));
        Map::from_map_data(data).unwrap_or_else(|error| panic!("map {name}: {error}"))
    };
    let v4: LpmTrie<_, BlockV4, u32> =
        LpmTrie::try_from(open(map_names::BLOCKLIST_V4)).expect("BLOCKLIST_V4");
    let v6: LpmTrie<_, BlockV6, u32> =
        LpmTrie::try_from(open(map_names::BLOCKLIST_V6)).expect("BLOCKLIST_V6");
    let version: Array<_, u32> =
        Array::try_from(open(map_names::BLOCKLIST_VERSION)).expect("BLOCKLIST_VERSION");
    let mut entries = Vec::new();
    for entry in v4.iter() {
        let (key, value) = entry.expect("read BLOCKLIST_V4");
        let prefix = IpNet::new(key.data().into(), key.prefix_len() as u8).expect("a prefix");
        entries.push((prefix, value));
    }
    for entry in v6.iter() {
        let (key, value) = entry.expect("read BLOCKLIST_V6");
        let prefix = IpNet::new(key.data().into(), key.prefix_len() as u8).expect("a prefix");
        entries.push((prefix, value));
    }
    entries.sort();
    KernelBlocklist {
        entries,
        version: version.get(&0, 0).expect("read BLOCKLIST_VERSION"),
    }
}

fn prefix(text: &str) -> IpNet {
    text.parse().expect("a prefix")
}

fn unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

#[test]
fn blocklist_round_trip_reaches_the_kernel() {
    let mut daemon = Daemon::start();
    let pin_dir = daemon.pin_dir();
    block_on(async {
        let client = daemon.ready().await;
        // Documented, with bearer auth like every /v1 route.
        let document = client.openapi().await.expect("document");
        let paths = &document["paths"];
        for (path, method) in [
            ("/v1/blocklist", "get"),
            ("/v1/blocklist", "post"),
            ("/v1/blocklist/{prefix}", "delete"),
        ] {
            let operation = &paths[path][method];
            assert_eq!(operation["tags"][0], "blocklist", "{method} {path}");
            assert!(operation["responses"]["401"].is_object(), "{method} {path}");
        }
        assert_eq!(
            paths["/v1/blocklist/{prefix}"]["delete"]["parameters"][0]["name"],
            "prefix"
        );
        let schemas = &document["components"]["schemas"];
        assert!(
            schemas["NewBlock"]["properties"]["for"].is_object(),
            "{schemas}"
        );
        assert!(
            schemas["BlockInfo"]["properties"]["expires"].is_object(),
            "{schemas}"
        );

        assert!(client.blocklist().await.expect("list").is_empty());
        assert_eq!(kernel_blocklist(&pin_dir).version, 0);

        // For a while, forever, and one address (its /32; host bits of a prefix are dropped).
        let before = SystemTime::now();
        let (status, answer) = raw(
            Method::POST,
            "/v1/blocklist",
            Some(TOKEN),
            Some(r#"{"prefix": "203.0.113.0/24", "for": "10m"}"#),
        )
        .await;
        assert_eq!(status, 201, "{answer}");
        assert_eq!(answer["prefix"], "203.0.113.0/24", "{answer}");
        let expires = humantime::parse_rfc3339(answer["expires"].as_str().expect("an expiry"))
            .expect("RFC 3339");
        let ten_minutes = Duration::from_secs(600);
        assert!(
            expires >= before + ten_minutes && expires <= SystemTime::now() + ten_minutes * 2,
            "{answer}"
        );
        let forever = client
            .block(&NewBlock {
                prefix: "2001:db8:7::/48".to_owned(),
                duration: None,
            })
            .await
            .expect("blocked");
        assert_eq!(
            (forever.prefix, forever.expires),
            (prefix("2001:db8:7::/48"), None)
        );
        let address = client
            .block(&NewBlock {
                prefix: "198.51.100.7".to_owned(),
                duration: Some("1h".to_owned()),
            })
            .await
            .expect("blocked");
        assert_eq!(address.prefix, prefix("198.51.100.7/32"));
        let trimmed = client
            .block(&NewBlock {
                prefix: "192.0.2.77/24".to_owned(),
                duration: None,
            })
            .await
            .expect("blocked");
        assert_eq!(trimmed.prefix, prefix("192.0.2.0/24"));

        // The listing, in prefix order, with RFC 3339 expiries (null: until removed).
        let (status, listing) = raw(Method::GET, "/v1/blocklist", Some(TOKEN), None).await;
        assert_eq!(status, 200, "{listing}");
        let listed: Vec<(String, Option<String>)> = listing
            .as_array()
            .expect("an array")
            .iter()
            .map(|entry| {
                (
                    entry["prefix"].as_str().expect("prefix").to_owned(),
                    entry["expires"].as_str().map(str::to_owned),
                )
            })
            .collect();
        let prefixes: Vec<&str> = listed.iter().map(|(prefix, _)| prefix.as_str()).collect();
        assert_eq!(
            prefixes,
            [
                "192.0.2.0/24",
                "198.51.100.7/32",
                "203.0.113.0/24",
                "2001:db8:7::/48"
            ]
        );
        assert_eq!(listed[2].1.as_deref(), answer["expires"].as_str());
        assert_eq!(listed[3].1, None);

        // The kernel has them, each with its expiry, and a version the XDP program rechecks by.
        let kernel = kernel_blocklist(&pin_dir);
        assert_ne!(kernel.version, 0);
        assert_eq!(
            kernel.entries,
            [
                (prefix("192.0.2.0/24"), 0),
                (
                    prefix("198.51.100.7/32"),
                    unix_seconds(address.expires.expect("expiry").0) as u32
                ),
                (prefix("203.0.113.0/24"), unix_seconds(expires) as u32),
                (prefix("2001:db8:7::/48"), 0),
            ]
        );
        let metrics = client.metrics_text().await.expect("metrics");
        assert!(metrics.contains("lb_blocklist_entries 4"), "{metrics}");

        // Removed by URL-encoded prefix; the answer is the entry as it was.
        let (status, removed) = raw(
            Method::DELETE,
            "/v1/blocklist/203.0.113.0%2F24",
            Some(TOKEN),
            None,
        )
        .await;
        assert_eq!(status, 200, "{removed}");
        assert_eq!(removed["prefix"], "203.0.113.0/24");
        assert_eq!(removed["expires"], answer["expires"]);
        let removed = client
            .unblock(prefix("2001:db8:7::/48"))
            .await
            .expect("unblocked");
        assert_eq!(removed.prefix, prefix("2001:db8:7::/48"));
        let kernel = kernel_blocklist(&pin_dir);
        let in_kernel: Vec<IpNet> = kernel.entries.iter().map(|(prefix, _)| *prefix).collect();
        assert_eq!(
            in_kernel,
            [prefix("192.0.2.0/24"), prefix("198.51.100.7/32")]
        );

        // Not blocked (any more, or at all, or only a covering prefix is): 404.
        for path in [
            "/v1/blocklist/203.0.113.0%2F24",
            "/v1/blocklist/10.9.9.0%2F24",
            "/v1/blocklist/192.0.2.1",
        ] {
            assert_error(
                &raw(Method::DELETE, path, Some(TOKEN), None).await,
                404,
                "not_found",
                None,
            );
        }
        assert_eq!(
            api_error(client.unblock(prefix("2001:db8:7::/48")).await),
            (StatusCode::NOT_FOUND, ErrorCode::NotFound)
        );

        // Every change is an operator's event.
        let events = client.events(None, 100).await.expect("events");
        let blocklist_events: Vec<(&str, &str)> = events
            .iter()
            .filter(|event| event.kind.starts_with("blocklist."))
            .map(|event| (event.kind.as_str(), event.subject.as_str()))
            .collect();
        assert_eq!(
            blocklist_events,
            [
                ("blocklist.added", "prefix 203.0.113.0/24"),
                ("blocklist.added", "prefix 2001:db8:7::/48"),
                ("blocklist.added", "prefix 198.51.100.7/32"),
                ("blocklist.added", "prefix 192.0.2.0/24"),
                ("blocklist.removed", "prefix 203.0.113.0/24"),
                ("blocklist.removed", "prefix 2001:db8:7::/48"),
            ]
        );

        // An entry expires by itself; when the last one goes, the version is 0 again.
        client
            .unblock(prefix("198.51.100.7/32"))
            .await
            .expect("unblocked");
        client
            .block(&NewBlock {
                prefix: "192.0.2.0/24".to_owned(),
                duration: Some("1s".to_owned()),
            })
            .await
            .expect("a shorter block replaces the expiry");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !client.blocklist().await.expect("list").is_empty() {
            assert!(Instant::now() < deadline, "the entry did not expire");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let kernel = kernel_blocklist(&pin_dir);
        assert!(kernel.entries.is_empty());
        assert_eq!(kernel.version, 0);
        assert!(
            client
                .metrics_text()
                .await
                .expect("metrics")
                .contains("lb_blocklist_entries 0")
        );
    });
}

/// The prefixes of the kernel's blocklist.
fn kernel_prefixes(pin_dir: &Path) -> Vec<IpNet> {
    kernel_blocklist(pin_dir)
        .entries
        .iter()
        .map(|(prefix, _)| *prefix)
        .collect()
}

#[test]
fn blocks_come_back_from_the_store_after_a_restart_that_lost_the_pinned_maps() {
    let mut daemon = Daemon::start();
    let pin_dir = daemon.pin_dir();
    block_on(async {
        let client = daemon.ready().await;
        let for_an_hour = client
            .block(&NewBlock {
                prefix: "203.0.113.0/24".to_owned(),
                duration: Some("1h".to_owned()),
            })
            .await
            .expect("blocked");
        client
            .block(&NewBlock {
                prefix: "2001:db8:7::/48".to_owned(),
                duration: None,
            })
            .await
            .expect("blocked");
        let before = kernel_blocklist(&pin_dir).entries;

        // A reboot: lb-control stopped, the BPF file system and its pinned maps gone.
        daemon.signal(libc::SIGINT);
        fs::remove_dir_all(&pin_dir).expect("removing the pinned maps");
        daemon.spawn();
        let client = daemon.ready().await;
        assert_eq!(
            kernel_blocklist(&pin_dir).entries,
            before,
            "the kernel has the blocks again, with their expiries"
        );
        let listed = client.blocklist().await.expect("list");
        let described: Vec<_> = listed
            .iter()
            .map(|entry| (entry.prefix.to_string(), entry.expires, entry.source))
            .collect();
        assert_eq!(
            described,
            [
                (
                    "203.0.113.0/24".to_owned(),
                    for_an_hour.expires,
                    Some(BlockSource::Admin)
                ),
                ("2001:db8:7::/48".to_owned(), None, Some(BlockSource::Admin)),
            ]
        );
    });
}

#[test]
fn the_first_start_adopts_the_kernels_blocks_and_later_starts_drop_what_the_store_lacks() {
    let mut daemon = Daemon::start();
    let pin_dir = daemon.pin_dir();
    let marker = daemon.dir.join("state").join(ADOPTED_MARKER);
    block_on(async {
        daemon.ready().await;
    });
    assert!(marker.exists(), "the first start marks the adoption done");

    // As an older lb-control leaves things when it hands its pinned maps over: a block in the
    // kernel only, and no mark in the state directory. (SIGQUIT leaves the program attached.)
    daemon.signal(libc::SIGQUIT);
    let older = prefix("198.51.100.0/24");
    Blocklist::open(&pin_dir)
        .expect("the pinned blocklist")
        .block(older, None)
        .expect("blocked in the kernel");
    fs::remove_file(&marker).expect("removing the mark");
    daemon.spawn();
    block_on(async {
        let client = daemon.ready().await;
        let listed = client.blocklist().await.expect("list");
        assert_eq!(
            listed
                .iter()
                .map(|entry| (entry.prefix, entry.source))
                .collect::<Vec<_>>(),
            [(older, Some(BlockSource::Adopted))]
        );
        let adopted: Vec<_> = client
            .events(None, 100)
            .await
            .expect("events")
            .into_iter()
            .filter(|event| event.kind == "blocklist.added")
            .map(|event| event.subject)
            .collect();
        assert_eq!(adopted, ["prefix 198.51.100.0/24"]);
    });

    // From now on the store decides: a block written into the maps behind lb-control's back is
    // gone at the next start, the adopted one stays.
    daemon.signal(libc::SIGQUIT);
    Blocklist::open(&pin_dir)
        .expect("the pinned blocklist")
        .block(prefix("192.0.2.0/24"), None)
        .expect("blocked in the kernel");
    daemon.spawn();
    block_on(async {
        daemon.ready().await;
    });
    assert_eq!(kernel_prefixes(&pin_dir), [older]);
}

#[test]
fn blocklist_refuses_bad_input_naming_the_field() {
    let mut daemon = Daemon::start();
    let pin_dir = daemon.pin_dir();
    block_on(async {
        daemon.ready().await;
        let post = |body: &'static str| raw(Method::POST, "/v1/blocklist", Some(TOKEN), Some(body));
        for (body, field) in [
            (r#"{"prefix": "203.0.113.0/33"}"#, "prefix"),
            (r#"{"prefix": "example.com", "for": "10m"}"#, "prefix"),
            (r#"{"prefix": 7}"#, "prefix"),
            (r#"{"for": "10m"}"#, "prefix"),
            (r#"{"prefix": "203.0.113.0/24", "for": "soon"}"#, "for"),
            (r#"{"prefix": "203.0.113.0/24", "for": "0s"}"#, "for"),
            (r#"{"prefix": "203.0.113.0/24", "for": "500years"}"#, "for"),
            (r#"{"prefix": "203.0.113.0/24", "for": 600}"#, "for"),
            (r#"{"prefix": "203.0.113.0/24", "until": "10m"}"#, "until"),
        ] {
            assert_error(&post(body).await, 400, "invalid", Some(field));
        }
        assert_error(
            &raw(
                Method::DELETE,
                "/v1/blocklist/not-a-prefix",
                Some(TOKEN),
                None,
            )
            .await,
            400,
            "invalid",
            Some("prefix"),
        );
        // Nothing refused reached the kernel.
        assert!(kernel_blocklist(&pin_dir).entries.is_empty());

        // 401 without the token, on every blocklist route.
        for (method, path, body) in [
            (Method::GET, "/v1/blocklist", None),
            (
                Method::POST,
                "/v1/blocklist",
                Some(r#"{"prefix": "203.0.113.0/24"}"#),
            ),
            (Method::DELETE, "/v1/blocklist/203.0.113.0%2F24", None),
        ] {
            assert_error(
                &raw(method.clone(), path, None, body).await,
                401,
                "unauthorized",
                None,
            );
            assert_error(
                &raw(method, path, Some("wrong-token"), body).await,
                401,
                "unauthorized",
                None,
            );
        }
        assert!(kernel_blocklist(&pin_dir).entries.is_empty());
    });
}

#[test]
fn block_cli_goes_through_the_api() {
    let mut daemon = Daemon::start();
    let pin_dir = daemon.pin_dir();
    block_on(async {
        daemon.ready().await;
    });
    let config = daemon.config();
    let cli = Cli { config: &config };

    assert_eq!(cli.ok(&["block", "list"]), "the blocklist is empty\n");
    assert_eq!(
        cli.ok(&["block", "add", "203.0.113.0/24", "--for", "10m"]),
        "blocked 203.0.113.0/24 for 10m\n"
    );
    assert_eq!(
        cli.ok(&["block", "add", "2001:db8::/48"]),
        "blocked 2001:db8::/48 until removed\n"
    );
    let listed = cli.ok(&["block", "list"]);
    let lines: Vec<&str> = listed.lines().collect();
    assert_eq!(lines.len(), 3, "{listed}");
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["PREFIX", "SOURCE", "EXPIRES"],
        "{listed}"
    );
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(row[..2], ["203.0.113.0/24", "admin"], "{listed}");
    let expiry = row[2];
    assert!(humantime::parse_rfc3339(expiry).is_ok(), "{listed}");
    assert!(
        lines[2].starts_with("2001:db8::/48 ") && lines[2].ends_with(" never"),
        "{listed}"
    );
    let json: Value = serde_json::from_str(&cli.ok(&["block", "list", "--json"])).expect("json");
    assert_eq!(json[1]["prefix"], "2001:db8::/48");
    assert_eq!(json[1]["expires"], Value::Null);
    // The daemon wrote the kernel's maps.
    let in_kernel: Vec<IpNet> = kernel_blocklist(&pin_dir)
        .entries
        .iter()
        .map(|(prefix, _)| *prefix)
        .collect();
    assert_eq!(
        in_kernel,
        [prefix("203.0.113.0/24"), prefix("2001:db8::/48")]
    );

    assert_eq!(
        cli.ok(&["block", "remove", "203.0.113.0/24"]),
        "unblocked 203.0.113.0/24\n"
    );
    assert_eq!(
        cli.ok(&["block", "remove", "2001:db8::/48"]),
        "unblocked 2001:db8::/48\n"
    );
    cli.fails(
        &["block", "remove", "203.0.113.0/24"],
        "error: 203.0.113.0/24 is not on the blocklist (`lb-control block list`)",
    );
    cli.fails(&["block", "add", "203.0.113.0/33"], "is not an IP prefix");
    cli.fails(
        &["block", "list", "--admin", "http://127.0.0.1:9"],
        "is lb-control running? (admin API at http://127.0.0.1:9)",
    );
    assert!(kernel_blocklist(&pin_dir).entries.is_empty());
}
