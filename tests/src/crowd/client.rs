//! One client of the crowd: connect from its source address, TLS, the WebSocket upgrade, its
//! subscriptions, rounds of calls until the crowd stops, and what it saw on the way.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
    sync::{Arc, atomic::Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use rustls::pki_types::ServerName;
use serde::{Deserialize, de::IgnoredAny};
use serde_json::{Value, json};
use tokio::{net::TcpSocket, time::Instant};
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{self, Message, protocol::WebSocketConfig},
};

use super::{
    Phase, Shared,
    arrival::{Arrival, StampedStream},
};

/// Time to connect, to finish the TLS handshake and to finish the upgrade, each.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A call unanswered for this long counts as failed.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a closing client waits for the gateway's answer to its close frame.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Each client's WebSocket read buffer (the gateway's messages to it are small).
const READ_BUFFER_BYTES: usize = 8 * 1024;
/// The longest body of a refusal kept for the report.
const MAX_KEPT_BODY: usize = 300;

/// A call the gateway answers from its cache (until the runtime changes).
pub const CACHED_METHOD: &str = "system_chain";
/// A call nobody caches: each one reaches the client's node.
pub const UNCACHED_METHOD: &str = "system_localPeerId";
/// `System.Number`'s storage key: changes every block, so the subscription is busy.
const SYSTEM_NUMBER_KEY: &str =
    "0x26aa394eea5630e07c48ae0c9558cef702a5c1b19ab7a04f536c519aca4983ac";

/// How a client's connection attempt ended.
#[derive(Debug, Clone, Default)]
pub enum Admission {
    /// It never got to try (the crowd stopped first).
    #[default]
    NotTried,
    Connected,
    /// The gateway answered the upgrade with an HTTP error.
    Refused {
        status: u16,
        body: String,
    },
    /// No connection: `stage` is `tcp`, `tls` or `websocket`.
    Failed {
        stage: &'static str,
        error: String,
    },
}

/// One kind of call: how many were answered, failed, or still open at the close, and how long
/// the answered ones took.
#[derive(Debug, Clone, Default)]
pub struct CallTally {
    pub ok: u64,
    pub errors: u64,
    pub unanswered_at_close: u64,
    pub latencies_us: Vec<u32>,
}

/// Everything one client saw.
#[derive(Debug, Clone, Default)]
pub struct ClientTally {
    pub admission: Admission,
    /// Closed by the gateway before the crowd stopped: its close code, or how the connection
    /// ended without one.
    pub dropped: Option<String>,
    pub heads_subscribed: bool,
    pub storage_subscribed: bool,
    pub subscription_errors: u64,
    pub first_subscription_error: Option<String>,
    pub heads: u64,
    pub heads_in_steady: u64,
    pub storage_notifications: u64,
    /// Node-to-client delay of each head received in the steady phase, in µs: until its
    /// bytes arrived at the client's socket ([`Arrival`]).
    pub head_delays_us: Vec<u32>,
    /// The same heads' delay until the client read them (the crowd's own wait for a CPU
    /// included).
    pub head_read_delays_us: Vec<u32>,
    pub cached: CallTally,
    pub uncached: CallTally,
    pub first_call_error: Option<String>,
}

type Socket = WebSocketStream<TlsStream<StampedStream>>;

/// A message from the gateway: an answer (`id`, `result` or `error`) or a notification
/// (`method`, `params.result`); everything else is skipped unread.
#[derive(Deserialize)]
struct FromGateway<'a> {
    #[serde(default)]
    id: Option<u64>,
    /// Present and not null: the call succeeded.
    #[serde(default)]
    result: Option<IgnoredAny>,
    #[serde(borrow, default)]
    method: Option<&'a str>,
    #[serde(borrow, default)]
    params: Option<NotificationParams<'a>>,
}

#[derive(Deserialize)]
struct NotificationParams<'a> {
    #[serde(borrow)]
    result: NotificationResult<'a>,
}

/// A header's `number` (a storage change has none).
#[derive(Deserialize)]
struct NotificationResult<'a> {
    #[serde(borrow, default)]
    number: Option<&'a str>,
}

/// What a call in flight was.
#[derive(Debug, Clone, Copy)]
enum Pending {
    SubscribeHeads,
    SubscribeStorage,
    Cached(Instant),
    Uncached(Instant),
}

/// Client `index` of the crowd, from connect to close.
pub async fn run(shared: Arc<Shared>, index: usize) -> ClientTally {
    let mut tally = ClientTally::default();
    let plan = &shared.plan;
    let source = plan.sources[index % plan.sources.len()];
    let connected = tokio::select! {
        () = shared.stop.cancelled() => None,
        connected = connect(&shared, source) => Some(connected),
    };
    let (socket, arrival) = match connected {
        None => {
            shared.settle();
            return tally;
        }
        Some(Err(admission)) => {
            tally.admission = admission;
            shared.settle();
            return tally;
        }
        Some(Ok(connected)) => connected,
    };
    tally.admission = Admission::Connected;
    shared.connected.fetch_add(1, Ordering::Relaxed);
    Session {
        shared: &shared,
        tally: &mut tally,
        pending: HashMap::new(),
        next_id: 0,
        settled: false,
        arrival,
    }
    .run(socket)
    .await;
    tally
}

/// TCP from `source`, TLS trusting the lab CA, then the upgrade to `wss://gateway/<key>`.
async fn connect(shared: &Shared, source: IpAddr) -> Result<(Socket, Arrival), Admission> {
    let plan = &shared.plan;
    let failed = |stage: &'static str| move |error: String| Admission::Failed { stage, error };
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, connect_from(source, plan.gateway))
        .await
        .map_err(|_| format!("no connection within {CONNECT_TIMEOUT:?}"))
        .and_then(|connected| connected.map_err(|error| error.to_string()))
        .map_err(failed("tcp"))?;
    let (tcp, arrival) =
        StampedStream::new(tcp).map_err(|error| failed("tcp")(error.to_string()))?;
    let tls = tokio::time::timeout(
        CONNECT_TIMEOUT,
        shared
            .tls
            .connect(ServerName::IpAddress(plan.gateway.ip().into()), tcp),
    )
    .await
    .map_err(|_| format!("no TLS handshake within {CONNECT_TIMEOUT:?}"))
    .and_then(|handshake| handshake.map_err(|error| error.to_string()))
    .map_err(failed("tls"))?;
    let url = format!("wss://{}/{}", plan.gateway, plan.key);
    // A small read buffer: tungstenite's default keeps 128 KiB resident per connection, which
    // for thousands of clients is the crowd's own memory, not the gateway's.
    let config = WebSocketConfig::default().read_buffer_size(READ_BUFFER_BYTES);
    let upgrade = tokio_tungstenite::client_async_with_config(url, tls, Some(config));
    let upgraded = tokio::time::timeout(CONNECT_TIMEOUT, upgrade)
        .await
        .map_err(|_| failed("websocket")(format!("no upgrade within {CONNECT_TIMEOUT:?}")))?;
    match upgraded {
        Ok((socket, _)) => Ok((socket, arrival)),
        Err(tungstenite::Error::Http(response)) => {
            let body = response
                .body()
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default();
            Err(Admission::Refused {
                status: response.status().as_u16(),
                body: body.chars().take(MAX_KEPT_BODY).collect(),
            })
        }
        Err(error) => Err(failed("websocket")(error.to_string())),
    }
}

/// A TCP connection to `target` from `source`.
async fn connect_from(
    source: IpAddr,
    target: SocketAddr,
) -> std::io::Result<tokio::net::TcpStream> {
    let socket = match source {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    // Let connect() pick the port for the whole 4-tuple: a bind to port 0 would have to find a
    // port free for every destination, and thousands of clients on one address run out.
    super::set_socket_option(
        socket.as_raw_fd(),
        libc::IPPROTO_IP,
        libc::IP_BIND_ADDRESS_NO_PORT,
        1,
    )?;
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(target).await
}

/// A connected client's life: its subscriptions, rounds of calls, what comes in.
struct Session<'a> {
    shared: &'a Shared,
    tally: &'a mut ClientTally,
    pending: HashMap<u64, Pending>,
    next_id: u64,
    /// Whether it has told the crowd it is in place (subscribed, or refused a subscription).
    settled: bool,
    arrival: Arrival,
}

impl Session<'_> {
    async fn run(mut self, mut socket: Socket) {
        let shared = self.shared;
        let plan = &shared.plan;
        let mut first = vec![self.request(
            Pending::SubscribeHeads,
            "chain_subscribeNewHeads",
            json!([]),
        )];
        if plan.storage_subscription {
            first.push(self.request(
                Pending::SubscribeStorage,
                "state_subscribeStorage",
                json!([[SYSTEM_NUMBER_KEY]]),
            ));
        }
        for request in first {
            if socket.send(Message::text(request)).await.is_err() {
                self.tally.dropped = Some("closed before the subscriptions".to_owned());
                self.settle();
                return;
            }
        }
        let interval = Duration::from_millis(plan.call_interval_ms);
        // The first round anywhere in the first interval, so rounds spread over time.
        let mut next_round = Instant::now() + interval.mul_f64(rand::rng().random::<f64>());
        loop {
            tokio::select! {
                () = shared.stop.cancelled() => {
                    self.close(socket).await;
                    break;
                }
                message = socket.next() => match message {
                    Some(Ok(Message::Text(text))) => self.take(&text),
                    Some(Ok(Message::Close(frame))) => {
                        self.tally.dropped = Some(frame.map_or_else(
                            || "close without a code".to_owned(),
                            |frame| u16::from(frame.code).to_string(),
                        ));
                        break;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(error)) => {
                        self.tally.dropped = Some(format!("connection lost: {error}"));
                        break;
                    }
                    None => {
                        self.tally.dropped = Some("connection ended without a close".to_owned());
                        break;
                    }
                },
                () = tokio::time::sleep_until(next_round) => {
                    self.expire_calls();
                    let calls = [
                        self.request(Pending::Cached(Instant::now()), CACHED_METHOD, json!([])),
                        self.request(Pending::Uncached(Instant::now()), UNCACHED_METHOD, json!([])),
                    ];
                    for call in calls {
                        // A failed send shows as the connection's end on the next read.
                        let _ = socket.feed(Message::text(call)).await;
                    }
                    let _ = socket.flush().await;
                    next_round += interval.mul_f64(rand::rng().random_range(0.5..1.5));
                }
            }
        }
        self.settle();
    }

    /// A JSON-RPC call with the next id, remembered as `pending`.
    fn request(&mut self, pending: Pending, method: &str, params: Value) -> String {
        self.next_id += 1;
        self.pending.insert(self.next_id, pending);
        json!({ "jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params })
            .to_string()
    }

    /// An answer or a notification from the gateway, read into only the fields the crowd
    /// needs (a whole JSON tree per message would make the crowd, not the gateway, what its
    /// clients wait on).
    fn take(&mut self, text: &str) {
        let received = SystemTime::now();
        let Ok(message) = serde_json::from_str::<FromGateway>(text) else {
            self.call_failed(None, format!("not JSON-RPC: {text}"));
            return;
        };
        if let Some(id) = message.id {
            self.answer(id, message.result.is_some(), text);
            return;
        }
        match message.method {
            Some("chain_newHead") => {
                let number = message.params.and_then(|params| params.result.number);
                self.head(number, received);
            }
            Some("state_storage") => self.tally.storage_notifications += 1,
            _ => {}
        }
    }

    /// The answer to call `id`: `ok` when it has a (non-null) result, else `text` is the error.
    fn answer(&mut self, id: u64, ok: bool, text: &str) {
        let Some(pending) = self.pending.remove(&id) else {
            return;
        };
        match pending {
            Pending::SubscribeHeads | Pending::SubscribeStorage => {
                if ok {
                    match pending {
                        Pending::SubscribeHeads => self.tally.heads_subscribed = true,
                        _ => self.tally.storage_subscribed = true,
                    }
                } else {
                    self.tally.subscription_errors += 1;
                    self.tally
                        .first_subscription_error
                        .get_or_insert_with(|| text.to_owned());
                }
                if !self.pending.values().any(|pending| {
                    matches!(pending, Pending::SubscribeHeads | Pending::SubscribeStorage)
                }) {
                    self.settle();
                }
            }
            Pending::Cached(sent) | Pending::Uncached(sent) => {
                let calls = self.calls(pending);
                if ok {
                    calls.ok += 1;
                    calls
                        .latencies_us
                        .push(sent.elapsed().as_micros().min(u32::MAX as u128) as u32);
                } else {
                    self.call_failed(Some(pending), text.to_owned());
                }
            }
        }
    }

    /// A `chain_newHead` notification (of block `number`, hex) received at `received`:
    /// counted, and in the steady phase its delay from when the node made the block.
    fn head(&mut self, number: Option<&str>, received: SystemTime) {
        self.tally.heads += 1;
        if self.shared.phase() != Phase::Steady {
            return;
        }
        self.tally.heads_in_steady += 1;
        let Some(number) =
            number.and_then(|hex| u64::from_str_radix(hex.trim_start_matches("0x"), 16).ok())
        else {
            return;
        };
        let plan = &self.shared.plan;
        // Block `number` is made (and announced) when the wall clock reaches its slot.
        let made_us = (plan.genesis_unix_ms + number * plan.block_time_ms) * 1000;
        let since_made = |at: SystemTime| {
            let at_us = at
                .duration_since(UNIX_EPOCH)
                .map_or(0, |at| at.as_micros() as u64);
            at_us.saturating_sub(made_us).min(u64::from(u32::MAX)) as u32
        };
        // The notification's bytes came in the latest read, or in one before it.
        let arrived = self.arrival.latest().unwrap_or(received);
        self.tally.head_delays_us.push(since_made(arrived));
        self.tally.head_read_delays_us.push(since_made(received));
    }

    fn calls(&mut self, pending: Pending) -> &mut CallTally {
        match pending {
            Pending::Uncached(_) => &mut self.tally.uncached,
            _ => &mut self.tally.cached,
        }
    }

    fn call_failed(&mut self, pending: Option<Pending>, error: String) {
        if let Some(pending) = pending {
            self.calls(pending).errors += 1;
        }
        self.tally.first_call_error.get_or_insert(error);
    }

    /// Calls unanswered for [`CALL_TIMEOUT`] fail.
    fn expire_calls(&mut self) {
        let expired: Vec<(u64, Pending)> = self
            .pending
            .iter()
            .filter(|(_, pending)| match pending {
                Pending::Cached(sent) | Pending::Uncached(sent) => sent.elapsed() > CALL_TIMEOUT,
                Pending::SubscribeHeads | Pending::SubscribeStorage => false,
            })
            .map(|(&id, &pending)| (id, pending))
            .collect();
        for (id, pending) in expired {
            self.pending.remove(&id);
            self.call_failed(Some(pending), format!("no answer within {CALL_TIMEOUT:?}"));
        }
    }

    /// The crowd stops: calls still open are counted as such, then a close frame and a short
    /// wait for the gateway's.
    async fn close(&mut self, mut socket: Socket) {
        let open: Vec<Pending> = self.pending.drain().map(|(_, pending)| pending).collect();
        for pending in open {
            if matches!(pending, Pending::Cached(_) | Pending::Uncached(_)) {
                self.calls(pending).unanswered_at_close += 1;
            }
        }
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
            if socket.close(None).await.is_ok() {
                while let Some(Ok(_)) = socket.next().await {}
            }
        })
        .await;
    }

    fn settle(&mut self) {
        if !self.settled {
            self.settled = true;
            self.shared.settle();
        }
    }
}
