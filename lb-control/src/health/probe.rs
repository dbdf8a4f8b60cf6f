//! One check of one node, I/O only: for a Substrate node its health, best block, finalized
//! block and genesis hash, asked over a connection the checker keeps, and whether the node
//! still admits new connections.
//!
//! A node whose RPC connection slots are all taken by clients (Substrate's
//! `--rpc-max-connections`, 100 by default) answers every new connection, HTTP request or
//! WebSocket alike, with `HTTP 429 Too Many Requests` "Too many connections". So the checker
//! asks its questions over one WebSocket per node that it opens once and keeps across checks
//! (a WebSocket, not a keep-alive HTTP connection: jsonrpsee takes a slot per HTTP request but
//! per WebSocket for the WebSocket's life), and a full node is still checked on it. A connection
//! found broken is made again within the same check, so a dead node fails its very next check
//! as before ("connect: Connection refused"). A node that refuses that new connection with 429,
//! or that answers on the held connection but refuses a new one with 429 (one `GET /` per check,
//! which jsonrpsee answers 405 without running a method once it has a slot for it), is
//! **saturated**: alive, but taking no new clients. Any other refusal of a new connection fails
//! the check, as a node that accepts no new connections cannot take new flows.
//!
//! A check cut short by its timeout keeps the connection: the next check first waits (within
//! its own timeout) for the answers the node still owes, so a slow node keeps timing out and at
//! most one check's calls are ever outstanding.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    time::Duration,
};

use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::{
    Method, Request, StatusCode,
    body::Bytes,
    client::conn::http1,
    header::{CONNECTION, HOST},
};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, de::DeserializeOwned};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{self, Message, error::ProtocolError, protocol::WebSocketConfig},
};

use super::{
    Target,
    judge::{ChainStatus, Observation, ProbeFailure, Saturation},
};
use crate::model::HealthCheck;

/// Far more than any answer to the check's calls; a node sending more is not answering them.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// What jsonrpsee, so Substrate, answers a new connection while every connection slot is
/// taken.
const TOO_MANY_CONNECTIONS: StatusCode = StatusCode::TOO_MANY_REQUESTS;

/// The checks of one node and the connection they share.
pub struct Prober {
    target: Target,
    held: Option<Box<HeldConnection>>,
}

impl Prober {
    pub fn new(target: Target) -> Prober {
        Prober { target, held: None }
    }

    /// Checks the node the way its target says, all of it (a reconnection included) within
    /// `timeout`.
    pub async fn check(&mut self, timeout: Duration) -> Observation {
        let target = self.target;
        let checked = tokio::time::timeout(timeout, async {
            match target.check {
                HealthCheck::Substrate => self.check_substrate().await,
                HealthCheck::Tcp => connect(target.endpoint)
                    .await
                    .map(|_| Observation::Connected),
                // Nothing to ask: such a node counts as answering.
                HealthCheck::None => Ok(Observation::Connected),
            }
        })
        .await;
        match checked {
            Ok(Ok(observation)) => observation,
            Ok(Err(failure)) => Observation::Failed(failure),
            Err(_) => Observation::Failed(ProbeFailure::Timeout(timeout)),
        }
    }

    async fn check_substrate(&mut self) -> Result<Observation, ProbeFailure> {
        let endpoint = self.target.endpoint;
        if let Some(held) = self.held.as_mut() {
            let asked = held.ask_chain_status().await;
            if held.broken {
                // Broken since the last check (the node restarted, or is dying): a new
                // connection tells which.
                self.held = None;
            } else {
                let status = asked?;
                return Ok(match refusal_of_new_connection(endpoint).await? {
                    None => Observation::Chain(status),
                    Some(refusal) => Observation::Saturated(Saturation {
                        status: Some(status),
                        refusal,
                    }),
                });
            }
        }
        // A new connection; that it opens shows that the node admits new ones.
        let held = match open(endpoint).await? {
            Opened::Connection(held) => self.held.insert(held),
            Opened::Refused(refusal) => {
                return Ok(Observation::Saturated(Saturation {
                    status: None,
                    refusal,
                }));
            }
        };
        let asked = held.ask_chain_status().await;
        if held.broken {
            self.held = None;
        }
        asked.map(Observation::Chain)
    }
}

async fn connect(endpoint: SocketAddr) -> Result<TcpStream, ProbeFailure> {
    TcpStream::connect(endpoint)
        .await
        .map_err(|error| ProbeFailure::Unreachable(format!("connect: {error}")))
}

enum Opened {
    Connection(Box<HeldConnection>),
    /// The node refused the connection with "too many connections".
    Refused(String),
}

/// Opens the WebSocket the checks of `endpoint` will share.
async fn open(endpoint: SocketAddr) -> Result<Opened, ProbeFailure> {
    let stream = connect(endpoint).await?;
    // Small requests and answers: do not let Nagle hold them back.
    let _ = stream.set_nodelay(true);
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_ANSWER_BYTES))
        .max_frame_size(Some(MAX_ANSWER_BYTES));
    let url = format!("ws://{endpoint}/");
    match tokio_tungstenite::client_async_with_config(url, stream, Some(config)).await {
        Ok((socket, _)) => Ok(Opened::Connection(Box::new(HeldConnection {
            socket,
            next_id: 0,
            awaiting: BTreeSet::new(),
            broken: false,
        }))),
        Err(tungstenite::Error::Http(response)) => {
            let text = String::from_utf8_lossy(response.body().as_deref().unwrap_or_default());
            let refusal = describe_refusal(response.status(), &text);
            if response.status() == TOO_MANY_CONNECTIONS {
                Ok(Opened::Refused(refusal))
            } else {
                Err(ProbeFailure::BadAnswer(format!(
                    "WebSocket handshake: {refusal}"
                )))
            }
        }
        Err(error) => Err(websocket_failure("WebSocket handshake", &error)),
    }
}

/// How the node refused: `HTTP 429 Too Many Requests: Too many connections. …`.
fn describe_refusal(status: StatusCode, text: &str) -> String {
    let text = text.trim();
    if text.is_empty() {
        format!("HTTP {status}")
    } else {
        format!("HTTP {status}: {text:.200}")
    }
}

/// Whether `endpoint` refuses a new connection with "too many connections": `None` when it
/// admits it. One `GET /` with `Connection: close`: jsonrpsee takes a connection slot for the
/// request (or answers 429) and then answers 405, running no method.
async fn refusal_of_new_connection(endpoint: SocketAddr) -> Result<Option<String>, ProbeFailure> {
    let new_connection = |failure: ProbeFailure| match failure {
        ProbeFailure::Unreachable(error) => {
            ProbeFailure::Unreachable(format!("new connection: {error}"))
        }
        other => other,
    };
    let stream = connect(endpoint).await.map_err(new_connection)?;
    let _ = stream.set_nodelay(true);
    let (mut sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|error| new_connection(transport_failure("HTTP handshake", &error)))?;
    // It ends with the request (`Connection: close`) or when `sender` is dropped.
    tokio::spawn(connection);
    let request = Request::builder()
        .method(Method::GET)
        .uri("/")
        .header(HOST, endpoint.to_string())
        .header(CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|error| ProbeFailure::Unreachable(format!("building the request: {error}")))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|error| new_connection(transport_failure("request", &error)))?;
    let status = response.status();
    if status != TOO_MANY_CONNECTIONS {
        return Ok(None);
    }
    let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
        .collect()
        .await
        .map(|body| body.to_bytes())
        .unwrap_or_default();
    Ok(Some(describe_refusal(
        status,
        &String::from_utf8_lossy(&body),
    )))
}

/// The WebSocket the checks of one node share.
struct HeldConnection {
    socket: WebSocketStream<TcpStream>,
    next_id: u64,
    /// Calls sent and not answered yet: a check cut short by its timeout leaves some.
    awaiting: BTreeSet<u64>,
    /// Reading or writing failed, or the node sent what is not JSON-RPC: the connection is of
    /// no further use.
    broken: bool,
}

impl HeldConnection {
    async fn ask_chain_status(&mut self) -> Result<ChainStatus, ProbeFailure> {
        // The answers owed to a check cut short come first: a node still working through them
        // is as slow as it was.
        while !self.awaiting.is_empty() {
            self.read_answer().await?;
        }
        let answers = self
            .call_all(&[
                ("system_health", json!([])),
                ("chain_getHeader", json!([])),
                ("chain_getFinalizedHead", json!([])),
                ("chain_getBlockHash", json!([0])),
            ])
            .await?;
        let health: SystemHealth = result_of(&answers[0], "system_health")?;
        let best: Header = result_of(&answers[1], "chain_getHeader")?;
        let finalized_hash: String = result_of(&answers[2], "chain_getFinalizedHead")?;
        let genesis: String = result_of(&answers[3], "chain_getBlockHash")?;
        let answers = self
            .call_all(&[("chain_getHeader", json!([finalized_hash]))])
            .await?;
        let finalized: Header = result_of(&answers[0], "chain_getHeader(finalized)")?;
        Ok(ChainStatus {
            genesis,
            best: best.number()?,
            finalized: finalized.number()?,
            peers: health.peers,
            is_syncing: health.is_syncing,
            should_have_peers: health.should_have_peers,
        })
    }

    /// Sends `calls`, a message each (no batch: a node may refuse batches, and the calls share
    /// the connection anyway), and returns their answers in the same order.
    async fn call_all(&mut self, calls: &[(&str, Value)]) -> Result<Vec<Value>, ProbeFailure> {
        let mut ids = Vec::with_capacity(calls.len());
        for (method, params) in calls {
            let id = self.next_id;
            self.next_id += 1;
            let call = json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params });
            self.awaiting.insert(id);
            ids.push(id);
            if let Err(error) = self.socket.feed(Message::text(call.to_string())).await {
                return Err(self.broke(websocket_failure("sending", &error)));
            }
        }
        if let Err(error) = self.socket.flush().await {
            return Err(self.broke(websocket_failure("sending", &error)));
        }
        let mut answers = BTreeMap::new();
        while answers.len() < ids.len() {
            let (id, answer) = self.read_answer().await?;
            if ids.contains(&id) {
                answers.insert(id, answer);
            }
        }
        Ok(ids.iter().filter_map(|id| answers.remove(id)).collect())
    }

    /// The next answer to one of the calls awaited, with its id.
    async fn read_answer(&mut self) -> Result<(u64, Value), ProbeFailure> {
        loop {
            let text = match self.socket.next().await {
                Some(Ok(Message::Text(text))) => text,
                // Pings are answered by the stream itself.
                Some(Ok(Message::Binary(_) | Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(Message::Frame(_))) => continue,
                Some(Ok(Message::Close(frame))) => {
                    let why = frame
                        .map(|frame| format!(" ({} {})", frame.code, frame.reason))
                        .unwrap_or_default();
                    return Err(self.broke(ProbeFailure::Unreachable(format!(
                        "connection closed by the node{why}"
                    ))));
                }
                Some(Err(error)) => return Err(self.broke(websocket_failure("reading", &error))),
                None => {
                    return Err(self.broke(ProbeFailure::Unreachable(
                        "connection closed by the node".to_owned(),
                    )));
                }
            };
            let answer: Value = match serde_json::from_str(&text) {
                Ok(answer) => answer,
                Err(error) => {
                    return Err(self.broke(ProbeFailure::BadAnswer(format!(
                        "answer is not JSON: {error}"
                    ))));
                }
            };
            // Anything else (a notification) is not an answer to a call.
            if let Some(id) = answer.get("id").and_then(Value::as_u64)
                && self.awaiting.remove(&id)
            {
                return Ok((id, answer));
            }
        }
    }

    fn broke(&mut self, failure: ProbeFailure) -> ProbeFailure {
        self.broken = true;
        failure
    }
}

/// A lost connection is the node being unreachable; anything else is a bad answer.
fn websocket_failure(step: &str, error: &tungstenite::Error) -> ProbeFailure {
    let message = format!("{step}: {error}");
    match error {
        tungstenite::Error::Io(_)
        | tungstenite::Error::ConnectionClosed
        | tungstenite::Error::AlreadyClosed
        | tungstenite::Error::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
            ProbeFailure::Unreachable(message)
        }
        _ => ProbeFailure::BadAnswer(message),
    }
}

/// A broken connection is the node being unreachable; an answer that is not HTTP is a bad
/// answer.
fn transport_failure(step: &str, error: &hyper::Error) -> ProbeFailure {
    let message = match std::error::Error::source(error) {
        Some(source) => format!("{step}: {error}: {source}"),
        None => format!("{step}: {error}"),
    };
    if error.is_parse() || error.is_parse_status() {
        ProbeFailure::BadAnswer(message)
    } else {
        ProbeFailure::Unreachable(message)
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SystemHealth {
    peers: u64,
    is_syncing: bool,
    should_have_peers: bool,
}

#[derive(Deserialize)]
struct Header {
    /// Hex, as Substrate prints block numbers: `"0x1a"`.
    number: String,
}

impl Header {
    fn number(&self) -> Result<u64, ProbeFailure> {
        self.number
            .strip_prefix("0x")
            .and_then(|hex| u64::from_str_radix(hex, 16).ok())
            .ok_or_else(|| {
                ProbeFailure::BadAnswer(format!("block number {:?} is not hex", self.number))
            })
    }
}

/// The result in `answer` (to a call of `method`), as a `T`.
fn result_of<T: DeserializeOwned>(answer: &Value, method: &str) -> Result<T, ProbeFailure> {
    let bad = |what: String| ProbeFailure::BadAnswer(format!("{method}: {what}"));
    if let Some(error) = answer.get("error") {
        return Err(bad(format!("error {error}")));
    }
    let result = answer
        .get("result")
        .ok_or_else(|| bad("no result".to_owned()))?;
    serde_json::from_value(result.clone()).map_err(|error| bad(format!("{error} in {result}")))
}

#[cfg(test)]
mod tests {
    use std::{
        convert::Infallible,
        sync::{
            Arc,
            atomic::{AtomicU64, AtomicUsize, Ordering},
        },
    };

    use http_body_util::Full;
    use hyper::{
        Response, body::Incoming, server::conn::http1 as server_http1, service::service_fn,
    };
    use tokio::{net::TcpListener, sync::watch};

    use super::*;
    use crate::model::HealthCheck;

    const PATIENCE: Duration = Duration::from_secs(5);

    /// A node serving HTTP and WebSocket on one port, as Substrate does, with jsonrpsee's
    /// connection limit: while `limit` WebSockets are open, every new request, upgrade or not,
    /// gets 429 "Too many connections".
    struct MockNode {
        address: SocketAddr,
        state: Arc<MockState>,
        /// Bumped to close every open WebSocket.
        generation: watch::Sender<u64>,
        listener: tokio::task::JoinHandle<()>,
    }

    #[derive(Default)]
    struct MockState {
        limit: AtomicUsize,
        open: AtomicUsize,
        opened: AtomicUsize,
        delay_ms: AtomicU64,
    }

    impl MockNode {
        async fn start(limit: usize) -> MockNode {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let address = listener.local_addr().unwrap();
            let state = Arc::new(MockState::default());
            state.limit.store(limit, Ordering::SeqCst);
            let generation = watch::Sender::new(0);
            let (served, closing) = (state.clone(), generation.clone());
            let listener = tokio::spawn(async move {
                loop {
                    let (stream, _) = listener.accept().await.unwrap();
                    let (state, closing) = (served.clone(), closing.clone());
                    let service = service_fn(move |request| {
                        let (state, closing) = (state.clone(), closing.clone());
                        async move { Ok::<_, Infallible>(serve(request, state, closing)) }
                    });
                    tokio::spawn(
                        server_http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .with_upgrades(),
                    );
                }
            });
            MockNode {
                address,
                state,
                generation,
                listener,
            }
        }

        fn target(&self) -> Target {
            Target {
                endpoint: self.address,
                check: HealthCheck::Substrate,
                joining: false,
            }
        }

        fn set_limit(&self, limit: usize) {
            self.state.limit.store(limit, Ordering::SeqCst);
        }

        fn websockets_opened(&self) -> usize {
            self.state.opened.load(Ordering::SeqCst)
        }

        /// Closes every open WebSocket and waits until they are gone.
        async fn close_connections(&self) {
            self.generation.send_modify(|generation| *generation += 1);
            let deadline = tokio::time::Instant::now() + PATIENCE;
            while self.state.open.load(Ordering::SeqCst) > 0 {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "websockets still open"
                );
                tokio::task::yield_now().await;
            }
        }

        /// Stops listening and closes every connection, as a node that exits.
        async fn exit(mut self) {
            self.listener.abort();
            let _ = (&mut self.listener).await;
            self.close_connections().await;
        }
    }

    fn serve(
        mut request: Request<Incoming>,
        state: Arc<MockState>,
        closing: watch::Sender<u64>,
    ) -> Response<Full<Bytes>> {
        if state.open.load(Ordering::SeqCst) >= state.limit.load(Ordering::SeqCst) {
            return Response::builder()
                .status(StatusCode::TOO_MANY_REQUESTS)
                .body(Full::from("Too many connections. Please try again later."))
                .unwrap();
        }
        if !hyper_tungstenite::is_upgrade_request(&request) {
            return Response::builder()
                .status(StatusCode::METHOD_NOT_ALLOWED)
                .body(Full::default())
                .unwrap();
        }
        let (response, websocket) = hyper_tungstenite::upgrade(&mut request, None).unwrap();
        state.open.fetch_add(1, Ordering::SeqCst);
        state.opened.fetch_add(1, Ordering::SeqCst);
        let mut closed = closing.subscribe();
        tokio::spawn(async move {
            if let Ok(mut socket) = websocket.await {
                loop {
                    let message = tokio::select! {
                        biased;
                        _ = closed.changed() => break,
                        message = socket.next() => message,
                    };
                    let Some(Ok(Message::Text(text))) = message else {
                        break;
                    };
                    let call: Value = serde_json::from_str(&text).unwrap();
                    let delay = Duration::from_millis(state.delay_ms.load(Ordering::SeqCst));
                    tokio::time::sleep(delay).await;
                    let answer =
                        json!({"jsonrpc": "2.0", "id": call["id"], "result": result(&call)});
                    if socket
                        .send(Message::text(answer.to_string()))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
            state.open.fetch_sub(1, Ordering::SeqCst);
        });
        response
    }

    fn result(call: &Value) -> Value {
        match call["method"].as_str() {
            Some("system_health") => {
                json!({"peers": 3, "isSyncing": false, "shouldHavePeers": true})
            }
            Some("chain_getHeader") if call["params"] == json!([]) => json!({"number": "0x64"}),
            Some("chain_getHeader") => json!({"number": "0x62"}),
            Some("chain_getFinalizedHead") => json!("0xf1"),
            _ => json!("0x91b1"),
        }
    }

    fn answered() -> ChainStatus {
        ChainStatus {
            genesis: "0x91b1".to_owned(),
            best: 100,
            finalized: 98,
            peers: 3,
            is_syncing: false,
            should_have_peers: true,
        }
    }

    #[tokio::test]
    async fn checks_share_one_connection_while_the_node_admits_new_ones() {
        let node = MockNode::start(10).await;
        let mut prober = Prober::new(node.target());
        for _ in 0..3 {
            assert_eq!(prober.check(PATIENCE).await, Observation::Chain(answered()));
        }
        assert_eq!(node.websockets_opened(), 1);
    }

    #[tokio::test]
    async fn a_full_node_is_saturated_and_still_checked_on_the_held_connection() {
        let node = MockNode::start(10).await;
        let mut prober = Prober::new(node.target());
        assert_eq!(prober.check(PATIENCE).await, Observation::Chain(answered()));

        // Clients take every other slot: the held connection still answers.
        node.set_limit(1);
        let Observation::Saturated(saturation) = prober.check(PATIENCE).await else {
            panic!("not saturated")
        };
        assert_eq!(saturation.status, Some(answered()));
        assert_eq!(
            saturation.refusal,
            "HTTP 429 Too Many Requests: Too many connections. Please try again later."
        );

        // The held connection is lost while the node is full: saturated, nothing to ask on.
        node.set_limit(0);
        node.close_connections().await;
        let Observation::Saturated(saturation) = prober.check(PATIENCE).await else {
            panic!("not saturated")
        };
        assert_eq!(saturation.status, None);

        node.set_limit(10);
        assert_eq!(prober.check(PATIENCE).await, Observation::Chain(answered()));
        assert_eq!(node.websockets_opened(), 2);
    }

    #[tokio::test]
    async fn a_node_that_exits_fails_its_next_check_as_unreachable() {
        let node = MockNode::start(10).await;
        let mut prober = Prober::new(node.target());
        assert_eq!(prober.check(PATIENCE).await, Observation::Chain(answered()));
        node.exit().await;
        let observation = prober.check(PATIENCE).await;
        let Observation::Failed(ProbeFailure::Unreachable(error)) = &observation else {
            panic!("{observation:?}")
        };
        assert!(error.starts_with("connect: "), "{error}");
    }

    #[tokio::test]
    async fn a_check_cut_short_keeps_the_connection_and_the_next_reads_past_late_answers() {
        let node = MockNode::start(10).await;
        node.state.delay_ms.store(200, Ordering::SeqCst);
        let mut prober = Prober::new(node.target());
        let timeout = Duration::from_millis(50);
        assert_eq!(
            prober.check(timeout).await,
            Observation::Failed(ProbeFailure::Timeout(timeout))
        );

        node.state.delay_ms.store(0, Ordering::SeqCst);
        assert_eq!(prober.check(PATIENCE).await, Observation::Chain(answered()));
        assert_eq!(node.websockets_opened(), 1);
    }

    #[test]
    fn errors_are_named_by_method() {
        let error = json!({"jsonrpc": "2.0", "id": 0, "error": {"code": -32601, "message": "Method not found"}});
        let Err(ProbeFailure::BadAnswer(message)) =
            result_of::<SystemHealth>(&error, "system_health")
        else {
            panic!("not a bad answer")
        };
        assert!(message.starts_with("system_health: error"), "{message}");
        assert!(message.contains("Method not found"), "{message}");

        let header: Header = result_of(
            &json!({"id": 1, "result": {"number": "0x1a"}}),
            "chain_getHeader",
        )
        .unwrap();
        assert_eq!(header.number().unwrap(), 26);
        assert!(result_of::<Header>(&json!({"id": 2, "result": null}), "chain_getHeader").is_err());
        assert!(result_of::<Header>(&json!({"id": 3}), "chain_getHeader").is_err());
    }

    #[test]
    fn block_numbers_must_be_hex() {
        let header = |number: &str| Header {
            number: number.to_owned(),
        };
        assert_eq!(header("0x0").number().unwrap(), 0);
        assert!(header("26").number().is_err());
        assert!(header("0xzz").number().is_err());
    }
}
