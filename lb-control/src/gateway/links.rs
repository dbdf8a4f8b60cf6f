//! The WebSocket upstream: the calls and subscriptions of every WebSocket client ride a
//! bounded pool of WebSocket connections per node ("links"), so a node carries a few
//! connections whatever the number of clients (a Substrate node takes 100 by default, and
//! 1024 subscriptions on each).
//!
//! - A link puts its own id (a counter) on each call and the client's id back on the answer.
//!   Subscription ids are the node's own, unique on the link: notifications go unchanged to
//!   the client that holds the subscription.
//! - A link's task runs on the serving thread that opened it ([`Home`]), and a call or a
//!   subscription goes first on a link of its client's own thread: the call, its answer and
//!   the notifications then stay on one thread, with no wake-up of another (a cache miss is
//!   one hop to an open connection). The pool is still one per node, so its cap holds for the
//!   node whatever thread the clients came in on; a thread whose own links are busy or full
//!   opens one of its own while the pool may grow, else uses another thread's.
//! - A pool grows on demand: a new link when every link of the thread has `calls_per_link`
//!   calls in flight (or none has room for a subscription), up to `max_links_per_node`. A
//!   link takes at most `max_subscriptions_per_link` subscriptions, of which at most
//!   `max_follows_per_link` `chainHead_v1_follow`s (a node's limit per connection). Calls on
//!   a subscription (`chainHead_v1` operations, unsubscribes, `transaction_v1_stop`) go on
//!   the link that holds it: the session keeps which one.
//! - A slow client cannot stall a link: its answers and notifications wait in its own queue,
//!   bounded in bytes, as the queues of all clients together are; what does not fit is dropped
//!   and the client told ([`Inbound::Overflow`]).
//! - When a link fails, the clients with subscriptions on it are told ([`Inbound::Lost`]); its
//!   calls in flight that may be sent twice go back to their sessions ([`Inbound::Retry`]),
//!   which send them once to another node, as a failed read over HTTP goes; the others get an
//!   error. A node whose link could not connect gets no new link for [`UNREACHABLE_FOR`]: its
//!   calls go elsewhere at once instead of each waiting for a connect timeout.
//! - When a client goes, its subscriptions are ended upstream ([`Link::release`]); answers to
//!   its calls still in flight are dropped, and a subscription one of them opened is ended.
//! - A link with no call and no subscription for `idle_timeout` leaves its pool (no new call
//!   picks it), and closes once nothing it was given in the meantime is still in flight.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex, MutexGuard, Weak,
        atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::{
    net::TcpStream,
    runtime::{Handle, RuntimeFlavor},
    sync::{mpsc, oneshot, watch},
};
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream,
    tungstenite::{Message, protocol::WebSocketConfig},
};
use tracing::{debug, warn};

use super::{
    jsonrpc::{self, Outcome, RpcError},
    metrics::{GatewayMetrics, UpstreamLabels},
    slots::Slot,
};
use crate::{methods, model::ApiKeyId};

/// The limits of the pools, from the gateway's config.
#[derive(Debug, Clone, Copy)]
pub struct LinkLimits {
    pub max_links_per_node: u32,
    pub max_subscriptions_per_link: u32,
    pub max_follows_per_link: u32,
    /// Calls in flight on every link before the pool opens another.
    pub calls_per_link: u32,
    /// Time a node has to take a new link, and to answer each call: past it the call goes to
    /// the next node (a read) or is answered with the timeout, as over HTTP.
    pub timeout: Duration,
    /// A link with no call and no subscription for this long closes.
    pub idle_timeout: Duration,
    /// Largest message a node may send (its answers run to megabytes: metadata, blocks).
    pub max_message_bytes: usize,
}

/// The byte budget of the client queues: per client and for all together.
#[derive(Debug)]
pub struct QueueBudget {
    per_client: usize,
    total: usize,
    queued: AtomicUsize,
}

impl QueueBudget {
    pub fn new(per_client: usize, total: usize) -> QueueBudget {
        QueueBudget {
            per_client,
            total,
            queued: AtomicUsize::new(0),
        }
    }

    /// Bytes waiting in every client queue.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    pub fn per_client(&self) -> usize {
        self.per_client
    }
}

/// What a link hands a client session.
pub enum Inbound {
    /// An answer or a notification, as the client gets it.
    Message(String),
    /// The answer to a call that opened subscription (or operation) `id` on `link`, ended by
    /// the method `end`.
    Opened { answer: String, held: Held },
    /// The node's last notification of subscription `id`: the node ended it.
    Ended { notification: String, id: Box<str> },
    /// A link that held subscriptions of the client failed.
    Lost,
    /// A call of the client that may be sent twice, whose link failed before it was answered.
    Retry(Request),
    /// The client's queue went over its budget; what did not fit was dropped.
    Overflow,
}

impl Inbound {
    fn bytes(&self) -> usize {
        match self {
            Inbound::Message(text)
            | Inbound::Opened { answer: text, .. }
            | Inbound::Ended {
                notification: text, ..
            } => text.len(),
            Inbound::Lost | Inbound::Overflow | Inbound::Retry(_) => 0,
        }
    }
}

/// A subscription a client holds on a link.
pub struct Held {
    pub id: Box<str>,
    pub link: Arc<Link>,
    /// The method that ends it.
    pub end: &'static str,
    /// The key's place for it, given back when it ends.
    pub _permit: Option<Slot<ApiKeyId>>,
}

/// The sending side of a client's queue, which links push to.
#[derive(Clone)]
pub struct ClientQueue {
    shared: Arc<QueueShared>,
}

struct QueueShared {
    sender: mpsc::UnboundedSender<Inbound>,
    /// The client's calls at nodes, not answered yet (see [`CallInFlight`]).
    calls: AtomicUsize,
    queued: AtomicUsize,
    overflowed: AtomicBool,
    budget: Arc<QueueBudget>,
}

/// The session's side of its queue.
pub struct ClientInbox {
    receiver: mpsc::UnboundedReceiver<Inbound>,
    shared: Arc<QueueShared>,
}

/// A new client queue under `budget`.
pub fn client_queue(budget: Arc<QueueBudget>) -> (ClientQueue, ClientInbox) {
    let (sender, receiver) = mpsc::unbounded_channel();
    let shared = Arc::new(QueueShared {
        sender,
        calls: AtomicUsize::new(0),
        queued: AtomicUsize::new(0),
        overflowed: AtomicBool::new(false),
        budget,
    });
    (
        ClientQueue {
            shared: shared.clone(),
        },
        ClientInbox { receiver, shared },
    )
}

impl ClientQueue {
    /// Queues `inbound` for the client: false when the client is gone. Over the budget it is
    /// dropped and the client told once.
    fn push(&self, inbound: Inbound) -> bool {
        let shared = &self.shared;
        if shared.sender.is_closed() {
            return false;
        }
        let bytes = inbound.bytes();
        let budget = &shared.budget;
        let over = shared.queued.load(Ordering::Relaxed) + bytes > budget.per_client
            || budget.queued.load(Ordering::Relaxed) + bytes > budget.total;
        if over && bytes > 0 {
            if !shared.overflowed.swap(true, Ordering::Relaxed) {
                let _ = shared.sender.send(Inbound::Overflow);
            }
            return true;
        }
        shared.queued.fetch_add(bytes, Ordering::Relaxed);
        budget.queued.fetch_add(bytes, Ordering::Relaxed);
        if shared.sender.send(inbound).is_err() {
            shared.give_back(bytes);
            return false;
        }
        true
    }

    fn is_gone(&self) -> bool {
        self.shared.sender.is_closed()
    }

    /// Counts a call of the client going to a node until the guard drops, which its
    /// [`Request`] does once the answer (or the failure) is queued.
    pub fn call_in_flight(&self) -> CallInFlight {
        self.shared.calls.fetch_add(1, Ordering::Relaxed);
        CallInFlight {
            shared: self.shared.clone(),
        }
    }
}

/// One call of a client at a node: counted while it lives (in its [`Request`]).
pub struct CallInFlight {
    shared: Arc<QueueShared>,
}

impl Drop for CallInFlight {
    fn drop(&mut self) {
        self.shared.calls.fetch_sub(1, Ordering::Relaxed);
    }
}

impl QueueShared {
    fn give_back(&self, bytes: usize) {
        self.queued.fetch_sub(bytes, Ordering::Relaxed);
        self.budget.queued.fetch_sub(bytes, Ordering::Relaxed);
    }
}

impl ClientInbox {
    /// Whether every call the client sent to a node has its answer here, and every answer
    /// has been taken: nothing of the client's is on its way.
    pub fn is_settled(&self) -> bool {
        !self.has_calls_in_flight() && self.receiver.is_empty()
    }

    /// Whether a call the client sent to a node still waits for its answer.
    pub fn has_calls_in_flight(&self) -> bool {
        self.shared.calls.load(Ordering::Relaxed) > 0
    }

    pub async fn next(&mut self) -> Option<Inbound> {
        let inbound = self.receiver.recv().await?;
        self.shared.give_back(inbound.bytes());
        Some(inbound)
    }
}

impl Drop for ClientInbox {
    fn drop(&mut self) {
        self.receiver.close();
        while let Ok(inbound) = self.receiver.try_recv() {
            self.shared.give_back(inbound.bytes());
        }
    }
}

/// A call for a node, from a client.
pub struct Request {
    pub client: ClientQueue,
    /// The client's id, put back on the answer.
    pub id: Box<RawValue>,
    pub method: String,
    pub params: Option<Box<RawValue>>,
    pub kind: RequestKind,
    /// Dropped with the request, after its answer is queued.
    pub in_flight: CallInFlight,
}

pub enum RequestKind {
    /// A call of no lasting state; `retry`: it may go to another link when its link fails.
    Plain { retry: bool },
    /// Opens a subscription or operation ended by `end` (a `chainHead_v1_follow` when
    /// `follow`), on a link that has a place for it reserved.
    Open {
        end: &'static str,
        follow: bool,
        permit: Option<Slot<ApiKeyId>>,
    },
    /// Ends the client's subscription `id` on this link: none of its notifications follows
    /// the answer.
    End { id: Box<str> },
}

enum Command {
    Call(Request),
    /// A call of no lasting state whose outcome goes back whole to the one caller waiting for
    /// it ([`Link::call`]).
    Once {
        method: Box<str>,
        params: Option<Box<RawValue>>,
        reply: oneshot::Sender<Result<Outcome, String>>,
    },
    /// Ends subscription `id` of a client that went (the answer is dropped).
    Release {
        id: Box<str>,
        end: &'static str,
    },
}

/// What a link carries now.
#[derive(Debug, Default)]
struct Load {
    calls: AtomicU32,
    subscriptions: AtomicU32,
    follows: AtomicU32,
    closed: AtomicBool,
}

/// One upstream WebSocket connection, shared by many clients.
pub struct Link {
    node: SocketAddr,
    home: Home,
    commands: mpsc::UnboundedSender<Command>,
    load: Arc<Load>,
}

/// Where a link's task runs: the single-threaded runtime of the serving thread that opened it,
/// or the daemon's runtime when it was opened from there (a multi-threaded runtime has no one
/// thread to keep its clients on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Home(Option<std::thread::ThreadId>);

impl Home {
    /// The caller's home, and the runtime a link opened here runs on.
    fn here(daemon: &Handle) -> (Home, Handle) {
        match Handle::try_current() {
            Ok(current) if current.runtime_flavor() == RuntimeFlavor::CurrentThread => {
                (Home(Some(std::thread::current().id())), current)
            }
            _ => (Home(None), daemon.clone()),
        }
    }
}

impl Link {
    /// Sends a client's call on this link.
    pub fn send(&self, request: Request) {
        self.load.calls.fetch_add(1, Ordering::Relaxed);
        if let Err(mpsc::error::SendError(Command::Call(request))) =
            self.commands.send(Command::Call(request))
        {
            // The link ended between the pick and the send: as for a call it had in flight.
            self.load.calls.fetch_sub(1, Ordering::Relaxed);
            give_back_unsent(request, &lost_error(self.node));
        }
    }

    /// Makes a call of no lasting state for a caller that waits for it (an HTTP client's call,
    /// a cache miss): the node's result or error, or why there is none (the link was lost, or
    /// the node did not answer within the link's timeout).
    pub async fn call(&self, method: &str, params: Option<&RawValue>) -> Result<Outcome, String> {
        let (reply, outcome) = oneshot::channel();
        self.load.calls.fetch_add(1, Ordering::Relaxed);
        let once = Command::Once {
            method: method.into(),
            params: params.map(RawValue::to_owned),
            reply,
        };
        if self.commands.send(once).is_err() {
            self.load.calls.fetch_sub(1, Ordering::Relaxed);
            return Err(LOST.to_owned());
        }
        outcome.await.unwrap_or_else(|_| Err(LOST.to_owned()))
    }

    /// Ends subscription `id` of a client that went.
    pub fn release(&self, id: Box<str>, end: &'static str) {
        let _ = self.commands.send(Command::Release { id, end });
    }

    pub fn node(&self) -> SocketAddr {
        self.node
    }

    /// Not closed, and its task still there (a task ends with its runtime, without closing).
    fn is_open(&self) -> bool {
        !self.load.closed.load(Ordering::Relaxed) && !self.commands.is_closed()
    }
}

/// Why a link's call has no answer when the link failed under it.
const LOST: &str = "its connection was lost";

pub fn lost_error(node: SocketAddr) -> RpcError {
    RpcError::upstream_unavailable(format!("node {node}: {LOST}"))
}

/// A call its link could not carry to the end: back to its session to be sent elsewhere when
/// it may be sent twice, else answered with `error`.
fn give_back_unsent(request: Request, error: &RpcError) {
    match request.kind {
        RequestKind::Plain { retry: true } => {
            let client = request.client.clone();
            client.push(Inbound::Retry(request));
        }
        _ => fail(request, error),
    }
}

/// Answers `request` with `error` (nothing when the client is gone).
pub fn fail(request: Request, error: &RpcError) {
    let error = error.to_raw();
    request.client.push(Inbound::Message(jsonrpc::answer_text(
        Some(&request.id),
        Err(&error),
    )));
}

/// The links of every node the gateway serves from.
pub struct Links {
    pools: Mutex<HashMap<SocketAddr, Arc<NodePool>>>,
    limits: LinkLimits,
    metrics: Arc<GatewayMetrics>,
    /// Where the links opened from outside a serving thread run.
    runtime: Handle,
}

impl Links {
    /// Pools whose links opened from outside a serving thread run on the current runtime.
    pub fn new(limits: LinkLimits, metrics: Arc<GatewayMetrics>) -> Links {
        Links {
            pools: Mutex::default(),
            limits,
            metrics,
            runtime: Handle::current(),
        }
    }

    /// The pool of `node`, made on first use.
    pub fn pool(&self, node: SocketAddr) -> Arc<NodePool> {
        lock(&self.pools)
            .entry(node)
            .or_insert_with(|| {
                let labels = UpstreamLabels {
                    node: node.to_string(),
                };
                // The node's links and subscriptions show from the start, at 0.
                for family in [
                    &self.metrics.upstream_links,
                    &self.metrics.upstream_subscriptions,
                ] {
                    drop(family.get_or_create(&labels));
                }
                Arc::new(NodePool {
                    node,
                    limits: self.limits,
                    links: Mutex::default(),
                    unreachable_until: Mutex::default(),
                    metrics: self.metrics.clone(),
                    labels,
                    runtime: self.runtime.clone(),
                })
            })
            .clone()
    }

    /// Drops the pools of nodes not in `serving`: their links close once their clients went
    /// (the sessions of a node that left are closed).
    pub fn retain(&self, serving: &[SocketAddr]) {
        lock(&self.pools).retain(|node, _| serving.contains(node));
    }
}

/// Drops the pools of nodes that leave `serving`, until its sender goes.
pub async fn follow_serving(links: Arc<Links>, mut serving: watch::Receiver<Vec<SocketAddr>>) {
    loop {
        links.retain(&serving.borrow_and_update());
        if serving.changed().await.is_err() {
            return;
        }
    }
}

/// How long a node whose link could not connect gets no new link.
pub const UNREACHABLE_FOR: Duration = Duration::from_secs(1);

/// The links of one node.
pub struct NodePool {
    node: SocketAddr,
    limits: LinkLimits,
    links: Mutex<Vec<Arc<Link>>>,
    /// Set when a link could not connect: no new link before then.
    unreachable_until: Mutex<Option<Instant>>,
    metrics: Arc<GatewayMetrics>,
    labels: UpstreamLabels,
    runtime: Handle,
}

impl NodePool {
    pub fn node(&self) -> SocketAddr {
        self.node
    }

    /// The link for a call of no lasting state: the least busy of the caller's thread while
    /// it is not busy, else a new one while the pool may grow, else the least busy of all.
    /// None when the node has no link and cannot be reached now.
    pub fn for_call(self: &Arc<Self>) -> Option<Arc<Link>> {
        let (home, runtime) = Home::here(&self.runtime);
        let mut links = self.open_links();
        let calls = |link: &&Arc<Link>| link.load.calls.load(Ordering::Relaxed);
        if let Some(own) = links
            .iter()
            .filter(|link| link.home == home)
            .min_by_key(calls)
            && calls(&own) < self.limits.calls_per_link
        {
            return Some(own.clone());
        }
        if self.may_grow(&links) {
            return Some(self.open(&mut links, home, runtime));
        }
        links.iter().min_by_key(calls).cloned()
    }

    fn may_grow(&self, links: &[Arc<Link>]) -> bool {
        links.len() < self.limits.max_links_per_node as usize && !self.is_unreachable()
    }

    fn is_unreachable(&self) -> bool {
        lock(&self.unreachable_until).is_some_and(|until| Instant::now() < until)
    }

    fn mark_unreachable(&self) {
        *lock(&self.unreachable_until) = Some(Instant::now() + UNREACHABLE_FOR);
    }

    /// A link with a place reserved for one more subscription (a `chainHead_v1_follow` when
    /// `follow`); None when every link is full and the pool may not grow.
    pub fn for_subscription(self: &Arc<Self>, follow: bool) -> Option<Arc<Link>> {
        let (home, runtime) = Home::here(&self.runtime);
        let mut links = self.open_links();
        let with_room = |own: bool| {
            links
                .iter()
                .find(|link| (link.home == home) == own && self.has_room(link, follow))
                .cloned()
        };
        let link = match with_room(true) {
            Some(link) => link,
            None if self.may_grow(&links) => self.open(&mut links, home, runtime),
            None => with_room(false)?,
        };
        link.load.subscriptions.fetch_add(1, Ordering::Relaxed);
        if follow {
            link.load.follows.fetch_add(1, Ordering::Relaxed);
        }
        Some(link)
    }

    /// True when no link may take another subscription and the pool may not grow: new
    /// clients are better served by another node.
    pub fn is_full(&self) -> bool {
        let links = self.open_links();
        links.len() >= self.limits.max_links_per_node as usize
            && !links.iter().any(|link| self.has_room(link, false))
    }

    fn has_room(&self, link: &Link, follow: bool) -> bool {
        link.load.subscriptions.load(Ordering::Relaxed) < self.limits.max_subscriptions_per_link
            && (!follow
                || link.load.follows.load(Ordering::Relaxed) < self.limits.max_follows_per_link)
    }

    /// The pool's links, closed ones left out (their tasks are ending).
    fn open_links(&self) -> MutexGuard<'_, Vec<Arc<Link>>> {
        let mut links = lock(&self.links);
        links.retain(|link| link.is_open());
        links
    }

    fn open(
        self: &Arc<Self>,
        links: &mut Vec<Arc<Link>>,
        home: Home,
        runtime: Handle,
    ) -> Arc<Link> {
        let (commands, receiver) = mpsc::unbounded_channel();
        let link = Arc::new(Link {
            node: self.node,
            home,
            commands,
            load: Arc::default(),
        });
        links.push(link.clone());
        self.metrics
            .upstream_links
            .get_or_create(&self.labels)
            .inc();
        let task = LinkTask {
            node: self.node,
            link: Arc::downgrade(&link),
            load: link.load.clone(),
            pool: Arc::downgrade(self),
            metrics: self.metrics.clone(),
            labels: self.labels.clone(),
            next_id: 0,
            pending: HashMap::new(),
            routes: HashMap::new(),
        };
        runtime.spawn(task.run(receiver, self.limits));
        link
    }
}

/// The std mutexes here guard plain maps and lists, valid whatever a panicking holder did.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

type NodeSocket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A call sent on the link, waiting for its answer.
enum Pending {
    Client {
        request: Request,
        sent: Instant,
    },
    /// A [`Command::Once`] call.
    Once {
        reply: oneshot::Sender<Result<Outcome, String>>,
        sent: Instant,
    },
    /// A call of the gateway's own (ending a gone client's subscription): its answer is
    /// dropped.
    Own,
}

impl Pending {
    /// When a caller's call went to the node (None for the gateway's own).
    fn sent(&self) -> Option<Instant> {
        match self {
            Pending::Client { sent, .. } | Pending::Once { sent, .. } => Some(*sent),
            Pending::Own => None,
        }
    }
}

/// Where a subscription's notifications go.
struct Route {
    client: ClientQueue,
    follow: bool,
    end: &'static str,
}

/// The task that owns one link's socket.
struct LinkTask {
    node: SocketAddr,
    /// Weak: the link ends when the pool and every session let go of it.
    link: Weak<Link>,
    load: Arc<Load>,
    pool: Weak<NodePool>,
    metrics: Arc<GatewayMetrics>,
    labels: UpstreamLabels,
    next_id: u64,
    pending: HashMap<u64, Pending>,
    /// The link's subscriptions by id (raw JSON, as the node wrote it).
    routes: HashMap<Box<str>, Route>,
}

/// A message from the node: an answer (`id`) or a notification (`params.subscription`).
#[derive(Deserialize)]
struct FromNode<'a> {
    #[serde(default)]
    id: Option<u64>,
    #[serde(borrow, default)]
    method: Option<&'a str>,
    #[serde(borrow, default)]
    params: Option<NotificationParams<'a>>,
    #[serde(borrow, default, deserialize_with = "present")]
    result: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    error: Option<&'a RawValue>,
}

/// A member that is there, `null` included (serde reads a `null` Option as None).
fn present<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(deserializer).map(Some)
}

#[derive(Deserialize)]
struct NotificationParams<'a> {
    #[serde(borrow)]
    subscription: &'a RawValue,
    #[serde(borrow)]
    result: &'a RawValue,
}

impl LinkTask {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>, limits: LinkLimits) {
        let failure = match connect(self.node, limits.timeout, limits.max_message_bytes).await {
            Ok(mut socket) => {
                let failure = self
                    .serve(
                        &mut socket,
                        &mut commands,
                        limits.timeout,
                        limits.idle_timeout,
                    )
                    .await;
                let _ = socket.close(None).await;
                failure
            }
            Err(failure) => {
                if let Some(pool) = self.pool.upgrade() {
                    pool.mark_unreachable();
                }
                Some(failure)
            }
        };
        self.load.closed.store(true, Ordering::Relaxed);
        self.metrics
            .upstream_links
            .get_or_create(&self.labels)
            .dec();
        // What the callers waiting on the link are told (the refusal of a node that would not
        // take it, say).
        let lost = failure
            .as_ref()
            .map_or_else(|| LOST.to_owned(), |failure| format!("{LOST}: {failure}"));
        if let Some(failure) = &failure {
            warn!(node = %self.node, "upstream WebSocket connection ended: {failure}");
            self.metrics
                .upstream_link_failures
                .get_or_create(&self.labels)
                .inc();
        }
        // Nothing more comes in: what was sent for this link is answered or moved.
        commands.close();
        let mut unsent = Vec::new();
        while let Ok(command) = commands.try_recv() {
            match command {
                Command::Call(request) => unsent.push(request),
                Command::Once { reply, .. } => {
                    let _ = reply.send(Err(lost.clone()));
                }
                Command::Release { .. } => {}
            }
        }
        self.fail_all(unsent, &lost);
    }

    /// Carries commands and the node's messages until the link fails (the reason) or every
    /// holder of the link let go (None).
    async fn serve(
        &mut self,
        socket: &mut NodeSocket,
        commands: &mut mpsc::UnboundedReceiver<Command>,
        timeout: Duration,
        idle_timeout: Duration,
    ) -> Option<String> {
        let mut deadlines = tokio::time::interval(timeout.min(idle_timeout) / 4);
        deadlines.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut busy_at = Instant::now();
        loop {
            tokio::select! {
                _ = deadlines.tick() => {
                    self.expire(timeout);
                    if !self.is_quiet() {
                        busy_at = Instant::now();
                    } else if !self.is_open() {
                        // Left its pool a tick ago or more, and a call picked just before
                        // that has been answered.
                        return None;
                    } else if busy_at.elapsed() >= idle_timeout {
                        self.leave_pool();
                    }
                }
                command = commands.recv() => {
                    let command = command?;
                    // Whatever else is waiting goes in the same write.
                    let mut next = Some(command);
                    while let Some(command) = next {
                        if let Some(text) = self.outgoing(command)
                            && let Err(error) = socket.feed(Message::text(text)).await
                        {
                            return Some(format!("sending: {error}"));
                        }
                        next = commands.try_recv().ok();
                    }
                    if let Err(error) = socket.flush().await {
                        return Some(format!("sending: {error}"));
                    }
                }
                message = socket.next() => match message {
                    Some(Ok(Message::Text(text))) => self.incoming(text.as_str()),
                    Some(Ok(Message::Binary(bytes))) => match std::str::from_utf8(&bytes) {
                        Ok(text) => self.incoming(text),
                        Err(_) => return Some("the node sent a binary frame that is not UTF-8".to_owned()),
                    },
                    Some(Ok(Message::Close(frame))) => {
                        return Some(format!("the node closed it ({frame:?})"));
                    }
                    Some(Ok(_)) => {}
                    Some(Err(error)) => return Some(format!("receiving: {error}")),
                    None => return Some("the node closed it".to_owned()),
                },
            }
        }
    }

    /// No call in flight, no subscription held.
    fn is_quiet(&self) -> bool {
        self.pending.is_empty()
            && self.load.calls.load(Ordering::Relaxed) == 0
            && self.load.subscriptions.load(Ordering::Relaxed) == 0
    }

    fn is_open(&self) -> bool {
        !self.load.closed.load(Ordering::Relaxed)
    }

    /// Takes the link out of its pool, under the pool's lock, so no call picks it from now on.
    fn leave_pool(&self) {
        match self.pool.upgrade() {
            Some(pool) => {
                let _links = pool.open_links();
                self.load.closed.store(true, Ordering::Relaxed);
            }
            None => self.load.closed.store(true, Ordering::Relaxed),
        }
        debug!(node = %self.node, "an upstream WebSocket connection closes, idle");
    }

    /// The text a command puts on the wire, if any.
    fn outgoing(&mut self, command: Command) -> Option<String> {
        let id = self.next_id;
        self.next_id += 1;
        match command {
            Command::Call(request) => {
                if let RequestKind::End { id: subscription } = &request.kind {
                    // The client's unsubscribe: nothing of the subscription after its answer.
                    self.unroute(subscription);
                }
                let text =
                    jsonrpc::upstream_request(id, &request.method, request.params.as_deref());
                self.pending.insert(
                    id,
                    Pending::Client {
                        request,
                        sent: Instant::now(),
                    },
                );
                Some(text)
            }
            Command::Once {
                method,
                params,
                reply,
            } => {
                let text = jsonrpc::upstream_request(id, &method, params.as_deref());
                self.pending.insert(
                    id,
                    Pending::Once {
                        reply,
                        sent: Instant::now(),
                    },
                );
                Some(text)
            }
            Command::Release {
                id: subscription,
                end,
            } => {
                self.unroute(&subscription)?;
                Some(self.own_call(id, end, &subscription))
            }
        }
    }

    /// A call of the gateway's own ending `subscription` with `end`, under `id`.
    fn own_call(&mut self, id: u64, end: &str, subscription: &str) -> String {
        self.pending.insert(id, Pending::Own);
        let params = format!("[{subscription}]");
        let params = RawValue::from_string(params).ok();
        jsonrpc::upstream_request(id, end, params.as_deref())
    }

    /// Forgets subscription `id`, giving its place back.
    fn unroute(&mut self, id: &str) -> Option<Route> {
        let route = self.routes.remove(id)?;
        self.give_back(route.follow);
        self.metrics
            .upstream_subscriptions
            .get_or_create(&self.labels)
            .dec();
        Some(route)
    }

    /// Gives back a subscription's place on the link.
    fn give_back(&self, follow: bool) {
        self.load.subscriptions.fetch_sub(1, Ordering::Relaxed);
        if follow {
            self.load.follows.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn incoming(&mut self, text: &str) {
        let message: FromNode = match serde_json::from_str(text) {
            Ok(message) => message,
            Err(error) => {
                debug!(node = %self.node, "a message from the node that is not JSON-RPC: {error}");
                return;
            }
        };
        match (message.id, message.params) {
            (Some(id), _) => self.answer(id, message.result, message.error),
            (None, Some(params)) => {
                self.notification(text, message.method.unwrap_or_default(), &params);
            }
            (None, None) => {}
        }
    }

    fn answer(&mut self, id: u64, result: Option<&RawValue>, error: Option<&RawValue>) {
        let outcome = match (result, error) {
            (Some(result), _) => Ok(result),
            (None, Some(error)) => Err(error),
            (None, None) => Err(RawValue::NULL),
        };
        let request = match self.pending.remove(&id) {
            Some(Pending::Client { request, .. }) => request,
            Some(Pending::Once { reply, .. }) => {
                self.load.calls.fetch_sub(1, Ordering::Relaxed);
                let outcome = match outcome {
                    Ok(result) => Outcome::Result(result.to_owned()),
                    Err(error) => Outcome::Error(error.to_owned()),
                };
                let _ = reply.send(Ok(outcome));
                return;
            }
            Some(Pending::Own) | None => return,
        };
        self.load.calls.fetch_sub(1, Ordering::Relaxed);
        let answer = jsonrpc::answer_text(Some(&request.id), outcome);
        let RequestKind::Open {
            end,
            follow,
            permit,
        } = request.kind
        else {
            request.client.push(Inbound::Message(answer));
            return;
        };
        // An operation may be refused with a null result (`transaction_v1_broadcast` over the
        // node's limit): nothing opened.
        let opened = result.filter(|result| result.get() != "null");
        let (Some(subscription), Some(link)) = (opened, self.link.upgrade()) else {
            self.give_back(follow);
            request.client.push(Inbound::Message(answer));
            return;
        };
        let id: Box<str> = subscription.get().into();
        self.metrics
            .upstream_subscriptions
            .get_or_create(&self.labels)
            .inc();
        self.routes.insert(
            id.clone(),
            Route {
                client: request.client.clone(),
                follow,
                end,
            },
        );
        let held = Held {
            id: id.clone(),
            link,
            end,
            _permit: permit,
        };
        if !request.client.push(Inbound::Opened { answer, held }) {
            // The client went while it was opened.
            self.end_own(&id);
        }
    }

    fn notification(&mut self, text: &str, method: &str, params: &NotificationParams) {
        let id = params.subscription.get();
        let Some(route) = self.routes.get(id) else {
            return;
        };
        let last = methods::is_last_notification(method, params.result.get());
        let delivered = if last {
            let route = self.unroute(id).expect("routed");
            route.client.push(Inbound::Ended {
                notification: text.to_owned(),
                id: id.into(),
            })
        } else {
            route.client.push(Inbound::Message(text.to_owned()))
        };
        if !delivered && !last {
            self.end_own(id);
        }
    }

    /// Ends subscription `id` of a client that is gone; its call goes out with the next write.
    fn end_own(&mut self, id: &str) {
        if let Some(route) = self.routes.get(id)
            && let Some(link) = self.link.upgrade()
        {
            link.release(id.into(), route.end);
        }
    }

    /// Takes back the calls the node has not answered within `timeout` (a node that hangs
    /// keeps its connection open): as when the link fails, a read goes to the next node and
    /// anything else gets the timeout. A subscription the node opens after that is not routed
    /// and ends with the link.
    fn expire(&mut self, timeout: Duration) {
        let late: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, pending)| pending.sent().is_some_and(|sent| sent.elapsed() >= timeout))
            .map(|(id, _)| *id)
            .collect();
        if late.is_empty() {
            return;
        }
        warn!(node = %self.node, calls = late.len(), "no answer within {timeout:?}");
        let error = RpcError::upstream_unavailable(format!(
            "node {}: no answer within {timeout:?}",
            self.node
        ));
        for id in late {
            let request = match self.pending.remove(&id) {
                Some(Pending::Client { request, .. }) => request,
                Some(Pending::Once { reply, .. }) => {
                    self.load.calls.fetch_sub(1, Ordering::Relaxed);
                    let _ = reply.send(Err(format!("no answer within {timeout:?}")));
                    continue;
                }
                Some(Pending::Own) | None => continue,
            };
            self.load.calls.fetch_sub(1, Ordering::Relaxed);
            if let RequestKind::Open { follow, .. } = request.kind {
                self.give_back(follow);
            }
            give_back_unsent(request, &error);
        }
    }

    /// The link is gone (`lost` says why): its clients with subscriptions are told, its calls
    /// (those sent and the `unsent`) answered or moved.
    fn fail_all(&mut self, unsent: Vec<Request>, lost: &str) {
        for (_, route) in self.routes.drain() {
            self.metrics
                .upstream_subscriptions
                .get_or_create(&self.labels)
                .dec();
            route.client.push(Inbound::Lost);
        }
        let sent = self
            .pending
            .drain()
            .filter_map(|(_, pending)| match pending {
                Pending::Client { request, .. } => Some(request),
                Pending::Once { reply, .. } => {
                    let _ = reply.send(Err(lost.to_owned()));
                    None
                }
                Pending::Own => None,
            });
        for request in sent.chain(unsent) {
            if request.client.is_gone() {
                continue;
            }
            give_back_unsent(request, &lost_error(self.node));
        }
    }
}

/// A new WebSocket connection to `node`.
async fn connect(
    node: SocketAddr,
    timeout: Duration,
    max_message_bytes: usize,
) -> Result<NodeSocket, String> {
    let config = WebSocketConfig::default()
        .max_message_size(Some(max_message_bytes))
        .max_frame_size(Some(max_message_bytes));
    let connecting =
        tokio_tungstenite::connect_async_with_config(format!("ws://{node}/"), Some(config), true);
    match tokio::time::timeout(timeout, connecting).await {
        Ok(Ok((socket, _))) => Ok(socket),
        Ok(Err(error)) => Err(format!("connecting: {error}")),
        Err(_) => Err(format!("no WebSocket within {timeout:?}")),
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::registry::Registry;

    use super::*;

    /// A serving thread of its own (a single-threaded runtime on a thread of its own) that
    /// asks `pool` for a call's link, then keeps its runtime (and the tasks of links it opened)
    /// until `hold`'s sender goes.
    fn call_from_another_thread(
        pool: &Arc<NodePool>,
        hold: std::sync::mpsc::Receiver<()>,
    ) -> (Arc<Link>, std::thread::JoinHandle<()>) {
        let pool = pool.clone();
        let (picked, link) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async { picked.send(pool.for_call()).unwrap() });
            let _ = hold.recv();
        });
        (link.recv().unwrap().expect("a link"), thread)
    }

    #[tokio::test]
    async fn calls_stay_on_a_link_of_their_thread_until_the_pool_is_full() {
        // A node that takes the connection and never answers the upgrade: the links stay open
        // (connecting) for the whole test.
        let node = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let limits = LinkLimits {
            max_links_per_node: 2,
            max_subscriptions_per_link: 10,
            max_follows_per_link: 4,
            calls_per_link: 16,
            timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(60),
            max_message_bytes: 1024,
        };
        let metrics = Arc::new(GatewayMetrics::register(&mut Registry::default()));
        let pool = Links::new(limits, metrics).pool(node.local_addr().unwrap());

        let here = pool.for_call().expect("a link");
        assert!(
            Arc::ptr_eq(&here, &pool.for_call().unwrap()),
            "the thread's link, not busy, takes its next call"
        );
        let (hold_second, second) = std::sync::mpsc::channel();
        let (there, second) = call_from_another_thread(&pool, second);
        assert!(
            !Arc::ptr_eq(&here, &there),
            "another thread opens its own while the pool may grow"
        );
        let (_hold_third, third) = std::sync::mpsc::channel();
        let (lent, _) = call_from_another_thread(&pool, third);
        assert!(
            Arc::ptr_eq(&lent, &here) || Arc::ptr_eq(&lent, &there),
            "a full pool lends another thread's link"
        );
        assert_eq!(pool.open_links().len(), 2, "the node's cap holds");

        // The second thread ends, and the link whose task ran there with it.
        drop(hold_second);
        second.join().unwrap();
        let (_hold_fourth, fourth) = std::sync::mpsc::channel();
        let (new, _) = call_from_another_thread(&pool, fourth);
        assert!(
            !Arc::ptr_eq(&new, &here) && !Arc::ptr_eq(&new, &there),
            "a link whose runtime ended is not lent: the pool opens another in its place"
        );
    }

    fn message(bytes: usize) -> Inbound {
        Inbound::Message("x".repeat(bytes))
    }

    #[tokio::test]
    async fn a_client_over_its_budget_is_told_once_and_loses_only_what_did_not_fit() {
        let budget = Arc::new(QueueBudget::new(100, 1000));
        let (queue, mut inbox) = client_queue(budget.clone());
        assert!(queue.push(message(60)));
        assert!(
            queue.push(message(60)),
            "over: dropped, the client still there"
        );
        assert!(queue.push(message(60)));
        assert_eq!(budget.queued(), 60);
        assert!(matches!(inbox.next().await, Some(Inbound::Message(text)) if text.len() == 60));
        assert!(matches!(inbox.next().await, Some(Inbound::Overflow)));
        assert_eq!(budget.queued(), 0, "read bytes are given back");
        drop(inbox);
        assert!(!queue.push(message(1)), "the client is gone");
    }

    #[tokio::test]
    async fn the_clients_together_stay_under_the_gateway_budget() {
        let budget = Arc::new(QueueBudget::new(100, 150));
        let (first, first_inbox) = client_queue(budget.clone());
        let (second, mut second_inbox) = client_queue(budget.clone());
        assert!(first.push(message(100)));
        assert!(second.push(message(60)));
        assert!(matches!(second_inbox.next().await, Some(Inbound::Overflow)));
        drop(first_inbox);
        assert_eq!(
            budget.queued(),
            0,
            "a gone client's unread bytes are given back"
        );
    }
}
