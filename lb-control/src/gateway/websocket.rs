//! JSON-RPC over WebSocket (`wss://…/<key>`), on the HTTP port.
//!
//! The upgrade request passes the same key check as an HTTP request (401 before the upgrade),
//! then the key's WebSocket connection limit. Each client connection is a session bound to one
//! node for its life (its reads see one node's view of the chain): the client's Maglev pick,
//! or the next node when the pick's upstream connections are full. The session's calls and
//! subscriptions ride that node's shared upstream connections ([`links`](super::links)).
//!
//! The session follows its key without waiting for the client: it watches the live keys and
//! looks its own up again on every change, so a revocation closes it (1008) at once, even when
//! the client only listens to notifications, and a new limit applies to its next message.
//!
//! Each message from the client passes the pipeline's stages (parse, rate limit), then per
//! call:
//! - `chain_subscribeNewHeads`, `chain_subscribeFinalizedHeads` and
//!   `state_subscribeRuntimeVersion` (and their aliases and unsubscribes) are served by the
//!   gateway from its node's shared feeds: the chain follower's one subscription of each per
//!   node, whatever the number of clients (every polkadot.js client subscribes to all three);
//! - calls the response cache may answer go through it, as over HTTP (a hit never touches the
//!   node); so do refused and invalid calls, and batches (a subscription in a batch is not
//!   served);
//! - everything else goes to the node on one of its shared connections, the client's id put
//!   back on the answer; a subscription (or `transaction_v1_broadcast` operation) stays on the
//!   connection that opened it, and so do the calls on it (`chainHead_v1` operations,
//!   unsubscribes). Subscriptions on the node are capped per key and per connection.
//!
//! The session ends with a close code the client can act on: 1012 (service restart: reconnect)
//! when its node goes down, is disabled or removed (a draining node keeps its clients, as the
//! kernel keeps a draining backend's flows), or a node connection holding its subscriptions
//! fails, so the client comes back to a live node; also 1012 when a drain of its node runs out
//! of time; 1001 when the gateway stops, 1012 when it stops for an upgrade (the new process
//! serves the reconnecting client) or drains for a planned handover (the other host of the
//! pair serves it). Those four close at the first moment none of the client's calls is in
//! flight and the client is calm (its last call just answered, or nothing sent for
//! `LEAVE_QUIET`), at most `ANSWER_GRACE` later: an answered call is not a lost one, and a
//! close that crosses a call on its way would cut that one off. 1009 for a message over the
//! size limit; 1008 when the key is revoked; 1013 (try again later) when the client reads too
//! slowly and its unread answers pass `max_queued_bytes_per_connection`; 1000 after
//! `idle_timeout` without a frame (the gateway pings).

use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
    sync::Arc,
    time::Duration,
};

use futures_util::{FutureExt, SinkExt, StreamExt};
use http_body_util::Full;
use hyper::{
    Request, Response,
    body::{Bytes, Incoming},
};
use hyper_tungstenite::{
    HyperWebsocketStream,
    tungstenite::{
        self, Message,
        error::CapacityError,
        protocol::{CloseFrame, WebSocketConfig, frame::coding::CloseCode},
    },
};
use rand::{Rng, distr::Alphanumeric};
use serde_json::value::RawValue;
use tokio::{io::AsyncReadExt, sync::watch, task::JoinSet, time::Instant};
use tokio_stream::{StreamMap, wrappers::WatchStream};
use tracing::debug;

use super::{
    clients::Seat,
    jsonrpc::{self, Body, Call, Entry, Outcome},
    links::{self, ClientInbox, ClientQueue, Held, Inbound, Link, NodePool, RequestKind},
    metrics::ClosedLabels,
    pipeline::{Pipeline, Rejection},
    server::{ConnectionHold, StopReason},
    service::refused,
    slots::Slot,
    upstream::UpstreamError,
};
use crate::{
    cache::{Feed, FeedItem},
    keys::LiveKey,
    methods::{self, FeedKind, Method, Subscription},
    model::ApiKeyId,
};

/// Calls of one connection answered by the gateway at once; past this the client's messages
/// wait (TCP pushes back) until answers have gone out.
const MAX_IN_FLIGHT: usize = 256;
/// How long a closing client gets to answer the close frame.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// How long a session told to leave (its node's drain ran out of time, the gateway stops or
/// hands over) may wait for a moment when none of its calls is in flight, to close then: an
/// answered call is not a lost one.
const ANSWER_GRACE: Duration = Duration::from_secs(2);
/// A client told to leave that sends no call is calm (closing it crosses no call) once it has
/// sent nothing for this long.
const LEAVE_QUIET: Duration = Duration::from_secs(1);
/// The read buffer of each client's WebSocket. tungstenite fills its whole read buffer with
/// zeros before every read (128 KiB by default), so the default made every connection resident
/// for 128 KiB: most of a client's memory in a crowd of 10,000. Client messages are small
/// calls; a larger one grows the buffer as it arrives (up to `max_body_bytes`).
const CLIENT_READ_BUFFER_BYTES: usize = 4 * 1024;
/// Length of the subscription ids the gateway makes (as jsonrpsee's, which Substrate uses).
const SUBSCRIPTION_ID_LEN: usize = 16;

/// The WebSocket limits of the gateway's config.
#[derive(Debug, Clone, Copy)]
pub struct WebSocketLimits {
    pub max_message_bytes: usize,
    pub max_connections_per_key: u32,
    pub max_subscriptions_per_connection: u32,
    /// Subscriptions on the nodes (not the shared head feeds) one key may hold.
    pub max_subscriptions_per_key: u32,
    pub idle_timeout: Duration,
}

impl WebSocketLimits {
    /// The WebSocket connections `key` may hold open: its own cap, else the default.
    pub fn connections_for(&self, key: &LiveKey) -> u32 {
        key.caps
            .max_connections
            .unwrap_or(self.max_connections_per_key)
    }

    /// The subscriptions on the nodes `key` may hold: its own cap, else the default.
    pub fn subscriptions_for(&self, key: &LiveKey) -> u32 {
        key.caps
            .max_subscriptions
            .unwrap_or(self.max_subscriptions_per_key)
    }
}

/// Where one call of a client message goes.
enum Route {
    /// A head subscription served from the node's shared feed of `kind`.
    Subscribe {
        kind: FeedKind,
        notification: &'static str,
    },
    /// The end of one of those.
    Unsubscribe,
    /// Answered by the pipeline (cache, refusal, error), as over HTTP.
    Pipeline,
    /// Sent to the node.
    Node,
}

/// Takes an authenticated upgrade request: the key's connection limit, the node connection,
/// then the upgrade. Any refusal is an HTTP answer with a JSON-RPC error body.
pub async fn accept(
    pipeline: Arc<Pipeline>,
    mut request: Request<Incoming>,
    client: IpAddr,
    digest: [u8; 32],
    key: Arc<LiveKey>,
    hold: ConnectionHold,
) -> Response<Full<Bytes>> {
    let limits = pipeline.websocket;
    let cap = limits.connections_for(&key);
    let Some(key_slot) = pipeline.key_connections.claim(key.id, cap) else {
        return refused(&pipeline, &Rejection::KeyConnectionLimit(cap), client);
    };
    let pool = match pool_for(&pipeline, client) {
        Ok(pool) => pool,
        Err(error) => return refused(&pipeline, &Rejection::NoNode(error), client),
    };
    let config = WebSocketConfig::default()
        .read_buffer_size(CLIENT_READ_BUFFER_BYTES)
        .max_message_size(Some(limits.max_message_bytes))
        .max_frame_size(Some(limits.max_message_bytes));
    let (response, upgrade) = match hyper_tungstenite::upgrade(&mut request, Some(config)) {
        Ok(upgrade) => upgrade,
        Err(error) => {
            return refused(&pipeline, &Rejection::Handshake(error.to_string()), client);
        }
    };
    tokio::spawn(async move {
        let client_socket = match upgrade.await {
            Ok(socket) => socket,
            Err(error) => {
                debug!(%client, "WebSocket upgrade did not complete: {error}");
                return;
            }
        };
        let key_changes = pipeline.auth.watch();
        let (queue, inbox) = links::client_queue(pipeline.queue_budget.clone());
        let seat = pipeline.clients.seat(pool.node());
        let session = Session {
            pipeline,
            client,
            digest,
            key,
            key_changes,
            pool,
            seat,
            hold,
            _key_slot: key_slot,
            shared: StreamMap::new(),
            notifications: HashMap::new(),
            queue,
            held: HashMap::new(),
            answering: JoinSet::new(),
            ready: VecDeque::new(),
        };
        session.run(client_socket, inbox).await;
    });
    response
}

/// Sends `message` to the client; false when it is gone or has not taken the message within
/// `limit` (a client that stops reading must not hold the session forever).
async fn deliver(client: &mut HyperWebsocketStream, message: Message, limit: Duration) -> bool {
    matches!(
        tokio::time::timeout(limit, client.send(message)).await,
        Ok(Ok(()))
    )
}

/// The pool of the client's node: its Maglev pick, or the next node of the table when the
/// pick's connections cannot take another subscription (then the pick still, when the next is
/// full too: its stateless calls are still served).
fn pool_for(pipeline: &Pipeline, client: IpAddr) -> Result<Arc<NodePool>, UpstreamError> {
    let (first, second) = pipeline
        .upstream
        .nodes_for(client)
        .ok_or(UpstreamError::NoNode)?;
    let first = pipeline.links.pool(first);
    if first.is_full()
        && let Some(second) = second.map(|node| pipeline.links.pool(node))
        && !second.is_full()
    {
        debug!(%client, node = %second.node(), "the client's node is full: the next one takes it");
        return Ok(second);
    }
    Ok(first)
}

/// One client connection.
struct Session {
    pipeline: Arc<Pipeline>,
    client: IpAddr,
    /// The digest of the client's key (never the secret itself): what the session looks its
    /// key up by again when the live keys change.
    digest: [u8; 32],
    /// The key as it is now: its limit applies to the next message.
    key: Arc<LiveKey>,
    /// Moves on every change of the live keys.
    key_changes: watch::Receiver<u64>,
    /// The connections of the client's node.
    pool: Arc<NodePool>,
    /// The session's place among its node's clients.
    seat: Seat,
    hold: ConnectionHold,
    _key_slot: Slot<ApiKeyId>,
    /// The shared head subscriptions of this client, by the id it was given...
    shared: StreamMap<String, WatchStream<Option<FeedItem>>>,
    /// ... and what each notifies.
    notifications: HashMap<String, SharedSubscription>,
    /// Where the node's answers and notifications for this client come in.
    queue: ClientQueue,
    /// The client's subscriptions on the node's connections, by id (raw JSON).
    held: HashMap<Box<str>, Held>,
    /// Answers being made by the pipeline; each yields the text to send.
    answering: JoinSet<String>,
    /// Answers made at once, waiting to be sent.
    ready: VecDeque<String>,
}

/// A client's shared head subscription: the notification method, and since when (what the
/// feed held before is the head current at the subscription).
struct SharedSubscription {
    method: &'static str,
    since: std::time::Instant,
}

/// Why a session ended, for the client (close frame) and the metrics.
struct Ending {
    reason: &'static str,
    close: Option<CloseFrame>,
}

/// When a leaving session looks again whether it may close: when its client has been quiet
/// for [`LEAVE_QUIET`] if that is still to come, else at the latest time to close.
fn leave_check(leaving: Option<(Instant, Leave)>, heard: Instant) -> Instant {
    let Some((by, _)) = leaving else {
        return Instant::now();
    };
    let quiet = heard + LEAVE_QUIET;
    if quiet > Instant::now() {
        quiet.min(by)
    } else {
        by
    }
}

/// Why a session leaves, once nothing of its client's is on its way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leave {
    /// A drain of its node ran out of time.
    Node,
    /// The gateway stops, or drains for a handover.
    Gateway(StopReason),
}

impl Leave {
    fn ending(self) -> Ending {
        match self {
            Leave::Node => Ending::with(
                "node_upgrading",
                CloseCode::Restart,
                "the node is being taken out for maintenance: reconnect".to_owned(),
            ),
            Leave::Gateway(StopReason::Upgrade) => Ending::with(
                "gateway_upgrading",
                CloseCode::Restart,
                "lb-control is being upgraded: reconnect".to_owned(),
            ),
            Leave::Gateway(StopReason::Handover) => Ending::with(
                "gateway_handover",
                CloseCode::Restart,
                "this load balancer hands over to the other of its pair: reconnect".to_owned(),
            ),
            Leave::Gateway(StopReason::Shutdown) => Ending::with(
                "gateway_stopping",
                CloseCode::Away,
                "the gateway is stopping".to_owned(),
            ),
        }
    }
}

impl Ending {
    fn by_client() -> Ending {
        Ending {
            reason: "client",
            close: None,
        }
    }

    fn with(reason: &'static str, code: CloseCode, text: String) -> Ending {
        Ending {
            reason,
            close: Some(CloseFrame {
                code,
                reason: text.into(),
            }),
        }
    }
}

impl Session {
    async fn run(mut self, mut client: HyperWebsocketStream, mut inbox: ClientInbox) {
        let metrics = self.pipeline.metrics.clone();
        metrics.websocket_sessions.inc();
        // The session's watches as streams: each stays registered with its channel between
        // turns of the loop below, where a `changed()` future would register and deregister
        // (a lock shared by every session) at each turn, that is at every notification.
        let mut serving = WatchStream::from_changes(self.pipeline.upstream.watch_serving());
        let mut stop = self.hold.stop.clone();
        // A change between the upgrade's key check and this session's start is looked at
        // first: by the stream's first item (the key as it is now), and by the first message
        // should it come before.
        let mut key_changes = WatchStream::new(self.key_changes.clone());
        self.key_changes.mark_changed();
        let idle_timeout = self.pipeline.websocket.idle_timeout;
        let mut ping = tokio::time::interval(idle_timeout / 2);
        let mut heard = Instant::now();
        // Set when the session is told to leave: it closes at the first moment nothing of the
        // client's is on its way (no call in flight, no answer unsent, nothing unread) and the
        // client is calm, or at this time. A session that starts while the gateway drains
        // leaves so from its start.
        let mut leaving: Option<(Instant, Leave)> = stop
            .borrow_and_update()
            .map(|reason| (Instant::now() + ANSWER_GRACE, Leave::Gateway(reason)));
        let mut stop = WatchStream::from_changes(stop);
        // Whether a call of the client's was on its way since it was told to leave. Once that
        // is answered the client is calm: it reads the answer before it sends its next call,
        // so the close crosses none. (Closed the moment nothing was in flight, a client calling
        // every half second had a call cut off by the close about once in a hundred closes.)
        let mut called_since_told = false;
        let ending = loop {
            if let Some((by, leave)) = leaving {
                let calls = !self.answering.is_empty()
                    || !self.ready.is_empty()
                    || inbox.has_calls_in_flight();
                called_since_told |= calls;
                let calm = called_since_told || heard.elapsed() >= LEAVE_QUIET;
                if (!calls && inbox.is_settled() && calm) || Instant::now() >= by {
                    // A call the client has sent meanwhile is taken first: it gets its answer.
                    if Instant::now() < by
                        && let Some(frame) = client.next().now_or_never()
                    {
                        heard = Instant::now();
                        match self.on_frame(frame) {
                            Ok(()) => continue,
                            Err(ending) => break ending,
                        }
                    }
                    break leave.ending();
                }
            }
            tokio::select! {
                frame = client.next(), if self.answering.len() < MAX_IN_FLIGHT => {
                    heard = Instant::now();
                    if let Err(ending) = self.on_frame(frame) {
                        break ending;
                    }
                }
                Some(inbound) = inbox.next() => {
                    let text = match self.take(inbound) {
                        Ok(Some(text)) => text,
                        Ok(None) => continue,
                        Err(ending) => break ending,
                    };
                    if !deliver(&mut client, Message::text(text), idle_timeout).await {
                        break Ending::by_client();
                    }
                }
                () = std::future::ready(()), if !self.ready.is_empty() => {
                    let answer = self.ready.pop_front().expect("not empty");
                    if !deliver(&mut client, Message::text(answer), idle_timeout).await {
                        break Ending::by_client();
                    }
                }
                Some(answer) = self.answering.join_next(), if !self.answering.is_empty() => {
                    // Notifications get no answer.
                    let Ok(answer) = answer else { continue };
                    if answer.is_empty() {
                        continue;
                    }
                    if !deliver(&mut client, Message::text(answer), idle_timeout).await {
                        break Ending::by_client();
                    }
                }
                Some((subscription, item)) = self.shared.next(), if !self.shared.is_empty() => {
                    let (Some(item), Some(shared)) = (item, self.notifications.get(&subscription)) else {
                        continue;
                    };
                    let notification = jsonrpc::notification(shared.method, &subscription, &item.value);
                    let live = item.received >= shared.since;
                    if !deliver(&mut client, Message::text(notification), idle_timeout).await {
                        break Ending::by_client();
                    }
                    // The head current at the subscription is sent at once, as a node does; its
                    // age is the chain's, not the gateway's delay.
                    if live {
                        metrics.feed_delivery_seconds.observe(item.received.elapsed().as_secs_f64());
                    }
                }
                Some(_) = key_changes.next() => {
                    self.key_changes.mark_unchanged();
                    if let Err(ending) = self.follow_key() {
                        break ending;
                    }
                }
                changed = serving.next() => {
                    if !changed.is_some_and(|serving| serving.contains(&self.pool.node())) {
                        break Ending::with(
                            "node_left",
                            CloseCode::Restart,
                            "the node left the rotation: reconnect".to_owned(),
                        );
                    }
                }
                () = self.seat.told_to_close(), if leaving.is_none() => {
                    leaving = Some((Instant::now() + ANSWER_GRACE, Leave::Node));
                }
                () = tokio::time::sleep_until(leave_check(leaving, heard)), if leaving.is_some() => {}
                Some(reason) = stop.next() => {
                    // The gateway's reason comes first (the client is told the gateway's
                    // news); the time to close stays the earlier one.
                    if let Some(reason) = reason {
                        let by = leaving.map_or(Instant::now() + ANSWER_GRACE, |(by, _)| by);
                        leaving = Some((by, Leave::Gateway(reason)));
                    }
                }
                _ = ping.tick() => {
                    if heard.elapsed() >= idle_timeout {
                        break Ending::with(
                            "idle",
                            CloseCode::Normal,
                            format!("nothing heard for {idle_timeout:?}"),
                        );
                    }
                    if !deliver(&mut client, Message::Ping(Bytes::new()), idle_timeout).await {
                        break Ending::by_client();
                    }
                }
            }
        };
        metrics
            .shared_subscriptions
            .dec_by(self.shared.len() as i64);
        metrics.websocket_sessions.dec();
        metrics
            .websocket_closed
            .get_or_create(&ClosedLabels {
                reason: ending.reason,
            })
            .inc();
        debug!(client = %self.client, node = %self.pool.node(), reason = ending.reason, "WebSocket session ended");
        for (id, held) in self.held.drain() {
            held.link.release(id, held.end);
        }
        // The session's places are free from here on: the closing below may take a while.
        drop((self._key_slot, self.seat));
        if let Some(frame) = ending.close {
            let closing = async move {
                // Wait for the client's answering close frame, so it reads the code.
                if client.close(Some(frame)).await.is_ok() {
                    while let Some(Ok(_)) = client.next().await {}
                }
                // Then read and drop what it still sends (the rest of a message too big) until
                // it closes: a socket closed with unread bytes resets the connection, and the
                // client would lose the close frame.
                let mut rest = client.into_inner();
                let mut sink = [0u8; 4096];
                while matches!(rest.read(&mut sink).await, Ok(read) if read > 0) {}
            };
            let _ = tokio::time::timeout(CLOSE_GRACE, closing).await;
        }
    }

    /// What the client sent (a frame, an error, or its end): a message taken, or the session's
    /// end.
    fn on_frame(
        &mut self,
        frame: Option<Result<Message, tungstenite::Error>>,
    ) -> Result<(), Ending> {
        let text = match frame {
            None | Some(Ok(Message::Close(_))) => return Err(Ending::by_client()),
            Some(Ok(Message::Text(text))) => text.to_string(),
            Some(Ok(Message::Binary(bytes))) => match String::from_utf8(bytes.to_vec()) {
                Ok(text) => text,
                Err(_) => {
                    return Err(Ending::with(
                        "client",
                        CloseCode::Unsupported,
                        "JSON-RPC messages are UTF-8 text".to_owned(),
                    ));
                }
            },
            Some(Ok(_)) => return Ok(()),
            Some(Err(tungstenite::Error::Capacity(CapacityError::MessageTooLong {
                size,
                max_size,
            }))) => {
                return Err(Ending::with(
                    "message_too_big",
                    CloseCode::Size,
                    format!("message of {size} bytes: this gateway takes at most {max_size}"),
                ));
            }
            Some(Err(error)) => {
                debug!(client = %self.client, "WebSocket client: {error}");
                return Err(Ending::by_client());
            }
        };
        self.on_message(text)
    }

    /// What the client gets for something a node connection brought: its text (if any), or
    /// the session's end.
    fn take(&mut self, inbound: Inbound) -> Result<Option<String>, Ending> {
        self.pipeline
            .metrics
            .queued_bytes
            .set(self.pipeline.queue_budget.queued() as i64);
        match inbound {
            Inbound::Message(text) => Ok(Some(text)),
            Inbound::Opened { answer, held } => {
                self.held.insert(held.id.clone(), held);
                Ok(Some(answer))
            }
            Inbound::Ended { notification, id } => {
                self.held.remove(&id);
                Ok(Some(notification))
            }
            Inbound::Retry(request) => {
                self.send_elsewhere(request);
                Ok(None)
            }
            Inbound::Lost => Err(Ending::with(
                "node_lost",
                CloseCode::Restart,
                "the node's connection was lost: reconnect".to_owned(),
            )),
            Inbound::Overflow => Err(Ending::with(
                "too_slow",
                CloseCode::Again,
                format!(
                    "the client read too slowly: more than {} bytes of answers waited",
                    self.pipeline.queue_budget.per_client()
                ),
            )),
        }
    }

    /// One message of the client: the pipeline's stages, then where each call goes.
    fn on_message(&mut self, text: String) -> Result<(), Ending> {
        // A key change the select loop has not taken yet still applies to this message.
        if self.key_changes.has_changed().unwrap_or(false) {
            self.key_changes.mark_unchanged();
            self.follow_key()?;
        }
        self.pipeline.auth.record_use(self.key.id);
        let body = match self.pipeline.parse(text.as_bytes()) {
            Ok(body) => body,
            Err(rejection) => {
                self.refuse(None, &rejection);
                return Ok(());
            }
        };
        if let Err(rejection) = self.pipeline.limit_rate(&self.key, &body) {
            // A batch gets one error, as over HTTP.
            let id = match &body {
                Body::Single(Entry::Call(call)) => call.id.as_deref(),
                Body::Single(Entry::Invalid { id, .. }) => id.as_deref(),
                Body::Batch(_) => None,
            };
            self.refuse(id, &rejection);
            return Ok(());
        }
        let call = match body {
            Body::Single(Entry::Call(call)) => call,
            body => {
                self.through_pipeline(body);
                return Ok(());
            }
        };
        let method = methods::lookup(&call.method);
        match self.route(&call, method) {
            Route::Pipeline => self.through_pipeline(Body::Single(Entry::Call(call))),
            Route::Node => self.send_to_node(call, method),
            Route::Subscribe { kind, notification } => self.subscribe(&call, kind, notification),
            Route::Unsubscribe => self.unsubscribe(&call),
        }
        Ok(())
    }

    /// Sends `call` to the node on the connection it belongs on: a new subscription where
    /// there is a place for it, a call on a subscription where that subscription is, anything
    /// else on the least busy connection.
    fn send_to_node(&mut self, call: Call, method: &Method) {
        let Some(id) = call.id.clone() else {
            return;
        };
        let kind = match method.subscription {
            Some(Subscription::Subscribe { unsubscribe, .. }) => {
                Some((unsubscribe, call.method == "chainHead_v1_follow"))
            }
            Some(Subscription::Operation { stop }) => Some((stop, false)),
            _ => None,
        };
        let (link, kind) = match kind {
            Some((end, follow)) => match self.place_for_subscription(follow) {
                Ok((link, permit)) => (
                    link,
                    RequestKind::Open {
                        end,
                        follow,
                        permit: Some(permit),
                    },
                ),
                Err(rejection) => {
                    self.refuse(Some(&id), &rejection);
                    return;
                }
            },
            None => {
                let subject = subject_of(&call).filter(|subject| self.held.contains_key(*subject));
                match (method.subscription, subject) {
                    (Some(Subscription::Unsubscribe { .. }), Some(subject)) => {
                        let held = self.held.remove(subject).expect("held");
                        (held.link, RequestKind::End { id: held.id })
                    }
                    (_, Some(subject)) => (
                        self.held[subject].link.clone(),
                        RequestKind::Plain { retry: false },
                    ),
                    // Not one of the client's: the node answers as it does for an unknown id.
                    _ => {
                        self.pipeline.count(method.class.name(), "forwarded");
                        let retry = method.class.is_retryable() && method.subscription.is_none();
                        self.send_stateless(links::Request {
                            client: self.queue.clone(),
                            id,
                            method: call.method,
                            params: call.params,
                            kind: RequestKind::Plain { retry },
                            in_flight: self.queue.call_in_flight(),
                        });
                        return;
                    }
                }
            }
        };
        self.pipeline.count(method.class.name(), "forwarded");
        link.send(links::Request {
            client: self.queue.clone(),
            id,
            method: call.method,
            params: call.params,
            kind,
            in_flight: self.queue.call_in_flight(),
        });
    }

    /// Sends a call of no lasting state on the node's least busy connection; when the node
    /// cannot be reached now, a call that may be sent twice goes to the next node.
    fn send_stateless(&self, request: links::Request) {
        match self.pool.for_call() {
            Some(link) => link.send(request),
            None => self.send_elsewhere(request),
        }
    }

    /// Sends a call whose node failed it to the next node of the client's Maglev order (once:
    /// it may not go further), or answers it with the failure.
    fn send_elsewhere(&self, request: links::Request) {
        let node = self.pool.node();
        let retry = matches!(request.kind, RequestKind::Plain { retry: true });
        let next = self
            .pipeline
            .upstream
            .nodes_for(self.client)
            .and_then(|(first, second)| {
                [Some(first), second]
                    .into_iter()
                    .flatten()
                    .find(|other| *other != node)
            })
            .filter(|_| retry)
            .and_then(|other| self.pipeline.links.pool(other).for_call());
        match next {
            Some(link) => {
                self.pipeline.upstream.count_retry(node);
                link.send(links::Request {
                    kind: RequestKind::Plain { retry: false },
                    ..request
                });
            }
            None => links::fail(request, &links::lost_error(node)),
        }
    }

    /// A place for one more subscription on the node: the key's and the connection's caps,
    /// then a node connection with room.
    fn place_for_subscription(
        &mut self,
        follow: bool,
    ) -> Result<(Arc<Link>, Slot<ApiKeyId>), Rejection> {
        let limits = self.pipeline.websocket;
        if self.shared.len() + self.held.len() >= limits.max_subscriptions_per_connection as usize {
            return Err(Rejection::SubscriptionLimit);
        }
        let cap = limits.subscriptions_for(&self.key);
        let permit = self
            .pipeline
            .key_subscriptions
            .claim(self.key.id, cap)
            .ok_or(Rejection::KeySubscriptionLimit(cap))?;
        let link = self
            .pool
            .for_subscription(follow)
            .ok_or(Rejection::NodeFull(self.pool.node()))?;
        Ok((link, permit))
    }

    /// Looks the session's key up again after a change of the live keys: its new limit, or the
    /// session's end when it was revoked. That end is counted as the session's
    /// (`key_revoked`), not as an auth failure of a request.
    fn follow_key(&mut self) -> Result<(), Ending> {
        match self.pipeline.auth.current(&self.digest) {
            Some(key) => {
                self.key = key;
                Ok(())
            }
            None => Err(Ending::with(
                "key_revoked",
                CloseCode::Policy,
                "the API key was revoked".to_owned(),
            )),
        }
    }

    fn route(&self, call: &Call, method: &Method) -> Route {
        if call.id.is_none() || self.pipeline.policy.refusal_of(call, method).is_some() {
            return Route::Pipeline;
        }
        match method.subscription {
            Some(Subscription::Subscribe {
                feed: Some(kind),
                notification,
                ..
            }) => Route::Subscribe { kind, notification },
            Some(Subscription::Unsubscribe { feed: Some(_) }) => Route::Unsubscribe,
            _ if self.pipeline.is_cacheable(call, method) => Route::Pipeline,
            _ => Route::Node,
        }
    }

    /// Answers `body` as over HTTP, without holding up the session.
    fn through_pipeline(&mut self, body: Body) {
        let pipeline = self.pipeline.clone();
        let client = self.client;
        self.answering
            .spawn(async move { pipeline.answer_body(body, client).await });
    }

    fn subscribe(&mut self, call: &Call, kind: FeedKind, notification: &'static str) {
        let max = self.pipeline.websocket.max_subscriptions_per_connection;
        let outcome = if self.shared.len() + self.held.len() >= max as usize {
            Outcome::from(
                self.pipeline
                    .refuse(&Rejection::SubscriptionLimit, self.client),
            )
        } else {
            let id: String = rand::rng()
                .sample_iter(Alphanumeric)
                .take(SUBSCRIPTION_ID_LEN)
                .map(char::from)
                .collect();
            let feed: Feed = self.pipeline.feeds.watch(self.pool.node(), kind);
            self.shared.insert(id.clone(), WatchStream::new(feed));
            self.notifications.insert(
                id.clone(),
                SharedSubscription {
                    method: notification,
                    since: std::time::Instant::now(),
                },
            );
            self.pipeline.metrics.shared_subscriptions.inc();
            Outcome::Result(jsonrpc::string_value(&id))
        };
        self.pipeline.count("read", "shared");
        self.reply(jsonrpc::answer(call.id.as_deref(), &outcome));
    }

    /// Ends a shared subscription: `true` when it was this client's, `false` otherwise, as a
    /// node answers.
    fn unsubscribe(&mut self, call: &Call) {
        let id = call
            .params
            .as_deref()
            .and_then(|params| serde_json::from_str::<(String,)>(params.get()).ok())
            .map(|(id,)| id);
        let removed = id.is_some_and(|id| {
            self.notifications.remove(&id);
            self.shared.remove(&id).is_some()
        });
        if removed {
            self.pipeline.metrics.shared_subscriptions.dec();
        }
        self.pipeline.count("read", "shared");
        let result = RawValue::from_string(removed.to_string()).expect("a JSON boolean");
        self.reply(jsonrpc::answer(
            call.id.as_deref(),
            &Outcome::Result(result),
        ));
    }

    /// Answers a call the session refused with its error for `rejection`, to `id`.
    fn refuse(&mut self, id: Option<&RawValue>, rejection: &Rejection) {
        let error = self.pipeline.refuse(rejection, self.client);
        self.reply(jsonrpc::answer(id, &Outcome::from(error)));
    }

    /// Queues an answer for the client.
    fn reply(&mut self, answer: String) {
        self.ready.push_back(answer);
    }
}

/// The subscription a call names: its first parameter, by position or by name.
fn subject_of(call: &Call) -> Option<&str> {
    #[derive(serde::Deserialize)]
    struct Named<'a> {
        #[serde(borrow, alias = "followSubscription", alias = "operationId")]
        subscription: &'a RawValue,
    }
    let params = call.params.as_deref()?.get();
    // Raw values borrow from the text only outside serde's untagged enums: look first.
    if params.trim_start().starts_with('[') {
        let values: Vec<&RawValue> = serde_json::from_str(params).ok()?;
        values.first().map(|value| value.get())
    } else {
        let named: Named = serde_json::from_str(params).ok()?;
        Some(named.subscription.get())
    }
}
