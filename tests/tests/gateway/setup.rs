//! Sim-nodes, a gateway in front of them, a key, and clients that trust the lab CA.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use lb_common::{
    flow::{FAMILY_IPV4, FlowKey, flow_hash},
    maglev::{MaglevBackend, build_table},
};
use lb_control::{
    backends::{BackendView, ClusterView, ServiceView, State},
    gateway::{
        Bind, BlockRequest, Gateway, GatewayContext, GatewayMetrics, GatewaySection, NodeClients,
    },
    keys::ApiKeys,
    model::{
        AdminState, Backend, BackendDef, ForwardingMode, HealthCheck, KeyCaps, Origin, Protocol,
        Service, ServiceDef,
    },
    store::Store,
};
use lb_tests::{
    lab::certs::{LabCa, write_pem},
    sim_node::{SimNode, SimNodeConfig, SimNodeHandle},
    ws_client::WsClient,
};
use prometheus_client::registry::Registry;
use reqwest::StatusCode;
use rustls::pki_types::pem::PemObject;
use serde_json::{Value, json};
use tokio::{
    io::AsyncReadExt,
    net::TcpStream,
    sync::{mpsc, watch},
};
use tokio_rustls::{TlsConnector, client::TlsStream};
use tokio_tungstenite::tungstenite::{Error as WsError, client::IntoClientRequest};

/// A small table keeps the per-test rebuilds cheap; the test computes the same one.
pub const TABLE_SIZE: u32 = 251;
pub const PATIENCE: Duration = Duration::from_secs(10);
pub const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// A throwaway directory for one test's store and certificates.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "lb-gateway-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).expect("temp dir");
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Sim-nodes, a gateway in front of them, a key, and a client that trusts the lab CA.
pub struct Setup {
    pub nodes: Vec<SimNodeHandle>,
    /// The gateway's WebSocket clients per node, as the admin API reads and closes them.
    pub clients: Arc<NodeClients>,
    pub gateway: Gateway,
    pub keys: ApiKeys,
    pub store: Store,
    pub secret: String,
    pub ca: LabCa,
    pub ca_pem: String,
    pub registry: Registry,
    pub dir: TempDir,
    pub blocks: mpsc::UnboundedReceiver<BlockRequest>,
    pub _view: watch::Sender<Arc<ClusterView>>,
}

/// What the gateway's chain follower subscribes to on every node (for the response cache).
pub const FOLLOWER_SUBSCRIPTIONS: [&str; 3] = [
    "chain_subscribeNewHeads",
    "chain_subscribeFinalizedHeads",
    "state_subscribeRuntimeVersion",
];

/// `System.Number` (twox128("System") ++ twox128("Number")): changes with every block; its
/// value is the block's number (SCALE `u32`).
pub const SYSTEM_NUMBER: &str =
    "0x26aa394eea5630e07c48ae0c9558cef702a5c1b19ab7a04f536c519aca4983ac";

/// The WebSockets the gateway's own chain follower holds at `node`, once it has subscribed
/// there: what a node carries before any client comes.
pub async fn follower_websockets(node: &SimNodeHandle) -> usize {
    lb_tests::poll::until("the chain follower subscribes at the node", || async {
        FOLLOWER_SUBSCRIPTIONS
            .iter()
            .all(|method| node.request_count(method) >= 1)
    })
    .await;
    node.websockets()
}

/// A safe read the gateway never caches (it is not in the cache's method table), answered
/// differently by each node: what the routing tests count.
pub const UNCACHED_READ: &str = "system_localPeerId";

impl Setup {
    pub async fn start(node_count: usize) -> Setup {
        Setup::start_with(node_count, |_| {}).await
    }

    pub async fn start_with(node_count: usize, adjust: impl FnOnce(&mut GatewaySection)) -> Setup {
        Setup::start_with_blocks(node_count, Duration::from_secs(3600), adjust).await
    }

    /// Nodes making a block every `block_time`.
    pub async fn start_with_blocks(
        node_count: usize,
        block_time: Duration,
        adjust: impl FnOnce(&mut GatewaySection),
    ) -> Setup {
        let dir = TempDir::new();
        let mut nodes = Vec::new();
        for index in 0..node_count {
            let mut config = SimNodeConfig::new(format!("node{index}"));
            config.block_time = block_time;
            nodes.push(SimNode::start(config).await.expect("sim-node starts"));
        }
        let ca = LabCa::new().expect("lab CA");
        let leaf = ca.issue(&[LOCALHOST]).expect("gateway certificate");
        let (cert, key) = (dir.0.join("gateway.crt"), dir.0.join("gateway.key"));
        write_pem(&cert, &leaf.cert_pem).expect("cert written");
        write_pem(&key, &leaf.key_pem).expect("key written");

        let store = Store::open(&dir.0.join("state.db")).expect("store opens");
        let keys = ApiKeys::open(store.clone()).expect("keys load");
        let secret = keys
            .create("client", None, KeyCaps::default())
            .expect("key created")
            .secret;
        let (view_tx, view) = watch::channel(Arc::new(cluster_view(&nodes)));
        let mut registry = Registry::default();
        let metrics = Arc::new(GatewayMetrics::register(&mut registry));
        let mut section = GatewaySection {
            listen: Some(SocketAddr::from((LOCALHOST, 0))),
            tls_cert: Some(cert),
            tls_key: Some(key),
            max_body_bytes: 64 * 1024,
            max_batch: 10,
            upstream_timeout: Duration::from_secs(2),
            ..GatewaySection::default()
        };
        adjust(&mut section);
        let bound = Gateway::bind(&section, Bind::LocalAddress).expect("gateway binds");
        let (blocks_tx, blocks) = mpsc::unbounded_channel();
        let clients = Arc::new(NodeClients::default());
        let gateway = Gateway::start(
            bound,
            GatewayContext {
                view,
                keys: keys.clone(),
                store: store.clone(),
                metrics,
                maglev_table_size: TABLE_SIZE,
                blocks: blocks_tx,
                clients: clients.clone(),
                // No remote gateways here: nothing to judge.
                health: watch::channel(Arc::default()).1,
            },
        )
        .expect("gateway starts");
        Setup {
            clients,
            nodes,
            gateway,
            keys,
            store,
            secret,
            ca_pem: ca.cert_pem(),
            ca,
            registry,
            dir,
            blocks,
            _view: view_tx,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!(
            "https://localhost:{}{path}",
            self.gateway.local_addr().port()
        )
    }

    /// A client trusting the lab CA; HTTP/2 when the server offers it (ALPN).
    pub fn client(&self) -> reqwest::Client {
        self.client_builder().build().expect("client")
    }

    pub fn client_builder(&self) -> reqwest::ClientBuilder {
        reqwest::Client::builder()
            .add_root_certificate(
                reqwest::Certificate::from_pem(self.ca_pem.as_bytes()).expect("CA"),
            )
            .resolve("localhost", self.gateway.local_addr())
            .tls_info(true)
    }

    pub async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client()
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .expect("request")
    }

    pub async fn call(&self, method: &str, params: Value) -> Value {
        let response = self
            .post(&format!("/{}", self.secret), &request(1, method, params))
            .await;
        assert_eq!(response.status(), StatusCode::OK);
        response.json().await.expect("JSON answer")
    }

    /// Calls the nodes got from clients, leaving out the chain follower's subscriptions.
    pub fn node_requests(&self) -> u64 {
        self.nodes
            .iter()
            .map(|node| {
                let follower: u64 = FOLLOWER_SUBSCRIPTIONS
                    .iter()
                    .map(|method| node.request_count(method))
                    .sum();
                node.total_requests() - follower
            })
            .sum()
    }

    /// Publishes a view with `node` in `state` and the others up, as the control plane does.
    pub fn set_state(&self, node: SocketAddr, state: State) {
        self.set_states(|address| (address == node).then_some(state));
    }

    /// The view with each node in the state `state_of` gives it (Up when None).
    pub fn set_states(&self, state_of: impl Fn(SocketAddr) -> Option<State>) {
        let mut view = cluster_view(&self.nodes);
        for backend in &mut view.services[0].backends {
            if let Some(state) = state_of(backend.backend.def.address) {
                backend.state = state;
            }
        }
        self._view.send_replace(Arc::new(view));
    }

    /// A JSON-RPC WebSocket client over TLS (`wss://localhost:port{path}`).
    pub async fn websocket(&self, path: &str) -> Result<WsClient<TlsStream<TcpStream>>, WsError> {
        self.websocket_with(path, &[]).await
    }

    /// [`Setup::websocket`] with extra headers on the upgrade request.
    pub async fn websocket_with(
        &self,
        path: &str,
        headers: &[(&'static str, &str)],
    ) -> Result<WsClient<TlsStream<TcpStream>>, WsError> {
        let tls = self.tls().await?;
        let url = format!("wss://localhost:{}{path}", self.gateway.local_addr().port());
        let mut request = url.into_client_request()?;
        for (name, value) in headers {
            request
                .headers_mut()
                .insert(*name, value.parse().expect("a header value"));
        }
        let (stream, _) = tokio_tungstenite::client_async(request, tls).await?;
        Ok(WsClient::new(stream))
    }

    pub fn metrics_text(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("metrics");
        text
    }
}

impl Setup {
    pub async fn tcp(&self) -> TcpStream {
        TcpStream::connect(self.gateway.local_addr())
            .await
            .expect("TCP connect")
    }

    /// A TCP connection from `source` (any of 127.0.0.0/8 is a local address).
    pub async fn tcp_from(&self, source: IpAddr) -> TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::new(source, 0))
            .expect("bind the source address");
        socket
            .connect(self.gateway.local_addr())
            .await
            .expect("TCP connect")
    }

    /// A raw TLS connection speaking HTTP/1.1 (ALPN), for clients that misbehave on purpose.
    pub async fn tls(&self) -> std::io::Result<TlsStream<TcpStream>> {
        self.tls_over(self.tcp().await).await
    }

    /// [`Setup::tls`] over a given TCP connection.
    pub async fn tls_over(&self, tcp: TcpStream) -> std::io::Result<TlsStream<TcpStream>> {
        self.tls_with_alpn(tcp, b"http/1.1").await
    }

    /// TLS client settings that trust the lab CA alone, and check the gateway's certificate.
    pub fn tls_client_config(&self) -> rustls::ClientConfig {
        let mut roots = rustls::RootCertStore::empty();
        let ca = rustls::pki_types::CertificateDer::from_pem_slice(self.ca_pem.as_bytes())
            .expect("CA PEM");
        roots.add(ca).expect("CA added");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth()
    }

    /// A TLS connection that asks for `protocol` by ALPN (`h2`, `http/1.1`).
    pub async fn tls_with_alpn(
        &self,
        tcp: TcpStream,
        protocol: &[u8],
    ) -> std::io::Result<TlsStream<TcpStream>> {
        let mut config = self.tls_client_config();
        config.alpn_protocols = vec![protocol.to_vec()];
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
    }
}

/// Reads until the peer closes; returns what came and how long the close took. Fails the test
/// if the connection is still open after `PATIENCE`.
pub async fn read_until_closed(stream: &mut (impl AsyncReadExt + Unpin)) -> (Vec<u8>, Duration) {
    let started = Instant::now();
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(PATIENCE, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (received, started.elapsed()),
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
            Err(_) => panic!("the gateway kept the connection open for {PATIENCE:?}"),
        }
    }
}

pub fn request(id: impl Into<Value>, method: &str, params: Value) -> Value {
    json!({ "jsonrpc": "2.0", "id": id.into(), "method": method, "params": params })
}

/// `node`'s own answer to a call over plain HTTP, past the gateway: what the gateway's answers
/// are checked against.
pub async fn call_straight(node: &SimNodeHandle, method: &str, params: Value) -> Value {
    reqwest::Client::new()
        .post(node.http_url())
        .json(&request(1, method, params))
        .send()
        .await
        .unwrap_or_else(|error| panic!("{method} straight to the node: {error}"))
        .json()
        .await
        .unwrap_or_else(|error| panic!("{method} straight to the node, the answer: {error}"))
}

/// One service with every node as an `Up` backend, as the backend set publishes it.
pub fn cluster_view(nodes: &[SimNodeHandle]) -> ClusterView {
    let service = Service {
        id: 1,
        def: ServiceDef {
            vip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)),
            port: 9944,
            protocol: Protocol::Tcp,
            mode: ForwardingMode::Nat,
            check: HealthCheck::None,
        },
        origin: Origin::Config,
    };
    let backends = nodes
        .iter()
        .zip(1..)
        .map(|(node, id)| BackendView {
            backend: Backend {
                id,
                service: 1,
                def: BackendDef {
                    address: node.rpc_addr(),
                    rpc_port: node.rpc_addr().port(),
                    weight: 1,
                    admin: AdminState::Enabled,
                    tier: 0,
                },
                origin: Origin::Config,
            },
            state: State::Up,
            fallback: false,
            saturated: false,
        })
        .collect();
    ClusterView {
        services: vec![ServiceView {
            service,
            name: "192.0.2.10:9944/tcp".to_owned(),
            serving_tier: Some(0),
            backends,
        }],
    }
}

/// The node the kernel's Maglev table and flow hash give a client at `client`, computed here
/// from lb_common alone.
pub fn predicted_node(nodes: &[SimNodeHandle], client: Ipv4Addr) -> SocketAddr {
    let backends: Vec<MaglevBackend> = nodes
        .iter()
        .zip(0u32..)
        .map(|(node, id)| MaglevBackend {
            id,
            key: MaglevBackend::socket_addr_key(node.rpc_addr()),
            weight: 1,
        })
        .collect();
    let table = build_table(&backends, TABLE_SIZE).expect("table");
    let mut src = [0u8; 16];
    src[..4].copy_from_slice(&client.octets());
    let hash = flow_hash(&FlowKey::client_key(&src, FAMILY_IPV4));
    nodes[table[hash as usize % table.len()] as usize].rpc_addr()
}

pub fn error_code(answer: &Value) -> i64 {
    answer["error"]["code"]
        .as_i64()
        .unwrap_or_else(|| panic!("not an error: {answer}"))
}
