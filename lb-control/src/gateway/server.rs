//! The listening side: accepts TCP connections, admits them under the gateway's and the
//! client's connection limits ([`admission`](super::admission)), terminates TLS (with the certificate in force when the connection came), and serves
//! HTTP/1.1 or HTTP/2 on it (hyper-util's auto server, with upgrades: WebSocket sessions start
//! from HTTP/1.1 requests on the same port and keep the connection's [`ConnectionHold`]).
//!
//! A slow client cannot hold a connection past `header_timeout`: it bounds the TLS handshake
//! and the reading of each HTTP/1.1 request's headers. A connection with no bytes either way
//! for `idle_timeout` is closed (gracefully: an HTTP/2 client gets GOAWAY).
//!
//! When the gateway stops, no request is cut off: an HTTP/2 connection gets GOAWAY at once
//! (the client sends its next requests on a new connection), an HTTP/1.1 connection answers
//! its next request with `Connection: close` and is closed after it, or once it has been
//! quiet for [`QUIET_BEFORE_CLOSE`]. Closing a quiet HTTP/1.1 connection at once would race
//! with the request its client may be sending that moment: it would meet a closed socket.
//!
//! A draining gateway ([`Mode::Draining`], a planned handover) finishes its connections the
//! same way but keeps accepting: a connection whose handshake this host began before its
//! address moved completes here (its segments come back through second chance), and finishes
//! after its first answer.

use std::{
    convert::Infallible,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use hyper::{
    StatusCode, Version,
    header::{CONNECTION, HeaderValue},
    rt::{Read, Write},
    service::service_fn,
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::watch,
    time::Instant,
};
use tracing::{debug, error, info, warn};

use super::{
    admission::{Admission, Admitted},
    pipeline::Pipeline,
    service,
    tls::Certificates,
};

/// How long open requests may finish after the gateway is told to stop.
const DRAIN_TIME: Duration = Duration::from_secs(5);

/// A stopping gateway closes an HTTP/1.1 connection that sent nothing for this long: longer
/// than a busy client's pause between an answer and its next request, which then gets
/// `Connection: close` instead; well within [`DRAIN_TIME`].
const QUIET_BEFORE_CLOSE: Duration = Duration::from_secs(1);

/// Why the gateway's connections finish: what its WebSocket clients are told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// lb-control stops: WebSocket sessions close with 1001 (going away).
    Shutdown,
    /// A new lb-control process serves on the same sockets: sessions close with 1012 (service
    /// restart), so clients reconnect, to the new process.
    Upgrade,
    /// This host handed its addresses over to the other of its pair: sessions close with
    /// 1012, so clients reconnect, to the other host.
    Handover,
}

/// What the serving threads do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Serving,
    /// Every connection finishes (`Connection: close`, GOAWAY, WebSockets closed once their
    /// calls are answered), new ones after their first answer, while the listeners keep
    /// accepting.
    Draining(StopReason),
    /// Stop accepting; open connections finish within [`DRAIN_TIME`].
    Stopped(StopReason),
}

#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub http2_max_concurrent_streams: u32,
}

/// The body of a serving thread: a single-threaded runtime serving `listener` as `mode` says,
/// until it says stop. Connections, their requests and their WebSocket sessions stay on this
/// thread.
pub fn serve_on(
    listener: std::net::TcpListener,
    tls: Option<Arc<Certificates>>,
    pipeline: Arc<Pipeline>,
    limits: ConnectionLimits,
    admission: Arc<Admission>,
    mode: watch::Receiver<Mode>,
    seat: ServingSeat,
) -> impl FnOnce() + Send + 'static {
    move || {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(error) => {
                error!("gateway: a serving thread's runtime: {error}");
                return;
            }
        };
        runtime.block_on(async move {
            match TcpListener::from_std(listener) {
                Ok(listener) => serve(listener, tls, pipeline, limits, admission, mode).await,
                Err(error) => error!("gateway: a listening socket: {error}"),
            }
            seat.leave().await;
        });
    }
}

/// A serving thread's place among all of them. A serving thread's runtime ends only once
/// every one has finished: the upstream links it runs may carry other threads' clients to the
/// end of their requests. A seat whose thread never ran leaves when it is dropped.
pub struct ServingSeat(Arc<watch::Sender<usize>>);

impl ServingSeat {
    /// One seat for each of `count` serving threads.
    pub fn all(count: usize) -> Vec<ServingSeat> {
        let serving = Arc::new(watch::Sender::new(count));
        (0..count).map(|_| ServingSeat(serving.clone())).collect()
    }

    /// Leaves, then waits until every other seat has left.
    async fn leave(self) {
        let mut others = self.0.subscribe();
        drop(self);
        let _ = others.wait_for(|serving| *serving == 0).await;
    }
}

impl Drop for ServingSeat {
    fn drop(&mut self) {
        self.0
            .send_modify(|serving| *serving = serving.saturating_sub(1));
    }
}

/// Serves as `mode` says until it says stop, then lets open requests finish for a while.
/// `admission` counts the open connections, shared by every listener of the gateway.
///
/// The listener is dropped on return; on an upgrade the new process holds the same socket
/// already, so the connections still in its queue are accepted there.
async fn serve(
    listener: TcpListener,
    tls: Option<Arc<Certificates>>,
    pipeline: Arc<Pipeline>,
    limits: ConnectionLimits,
    admission: Arc<Admission>,
    mut mode: watch::Receiver<Mode>,
) {
    // Every connection holds a receiver: a send asks them to finish, and `closed()` tells when
    // the last one has.
    let (stop, _) = watch::channel(None);
    // A mode set before this thread started counts too.
    mode.mark_changed();
    let reason = loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: pause instead of spinning.
                    warn!("gateway: accepting a connection: {error}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            changed = mode.changed() => {
                // The gateway gone without a word is as good as a shutdown.
                let now = match changed {
                    Ok(()) => *mode.borrow_and_update(),
                    Err(_) => Mode::Stopped(StopReason::Shutdown),
                };
                match now {
                    Mode::Serving => stop.send_replace(None),
                    Mode::Draining(reason) => stop.send_replace(Some(reason)),
                    Mode::Stopped(reason) => break reason,
                };
                continue;
            }
        };
        let admitted = match admission.admit(peer.ip()) {
            Ok(admitted) => admitted,
            Err(refused) => {
                debug!(%peer, "gateway: connection closed at once: {refused}");
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let connection = Connection {
            pipeline: pipeline.clone(),
            peer,
            limits,
            hold: ConnectionHold {
                _admitted: Arc::new(admitted),
                stop: stop.subscribe(),
            },
        };
        let tls = tls.clone();
        tokio::spawn(connection.run(tcp, tls));
    };
    let _ = stop.send(Some(reason));
    if tokio::time::timeout(DRAIN_TIME, stop.closed())
        .await
        .is_err()
    {
        info!("gateway: stopped with requests still open after {DRAIN_TIME:?}");
    }
}

/// What a connection lends its requests: a WebSocket session outlives the HTTP exchange that
/// opened it and keeps these for its life.
#[derive(Clone)]
pub struct ConnectionHold {
    /// The connection's place under the gateway's and its client's connection limits.
    _admitted: Arc<Admitted>,
    /// Says why once the gateway stops.
    pub stop: watch::Receiver<Option<StopReason>>,
}

struct Connection {
    pipeline: Arc<Pipeline>,
    peer: SocketAddr,
    limits: ConnectionLimits,
    hold: ConnectionHold,
}

impl Connection {
    async fn run(self, tcp: TcpStream, tls: Option<Arc<Certificates>>) {
        let activity = Arc::new(Activity::new());
        let tcp = Tracked {
            inner: tcp,
            activity: activity.clone(),
        };
        let Some(tls) = tls else {
            return self.serve_http(TokioIo::new(tcp), &activity).await;
        };
        let handshake = tls.acceptor().accept(tcp);
        match tokio::time::timeout(self.limits.header_timeout, handshake).await {
            Ok(Ok(stream)) => self.serve_http(TokioIo::new(stream), &activity).await,
            Ok(Err(error)) => debug!(peer = %self.peer, "gateway: TLS handshake failed: {error}"),
            Err(_) => debug!(peer = %self.peer, "gateway: TLS handshake timed out"),
        }
    }

    async fn serve_http<I>(self, io: I, activity: &Activity)
    where
        I: Read + Write + Unpin + Send + 'static,
    {
        let client = self.peer.ip();
        let pipeline = self.pipeline;
        let hold = self.hold;
        let mut stop = hold.stop.clone();
        // Turns true with the first HTTP/2 request: such a connection finishes by GOAWAY.
        let (http2_seen, mut http2) = watch::channel(false);
        let http2_seen = Arc::new(http2_seen);
        let service = service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
            let pipeline = pipeline.clone();
            let hold = hold.clone();
            let version = request.version();
            if version == Version::HTTP_2 {
                http2_seen.send_if_modified(|seen| !std::mem::replace(seen, true));
            }
            async move {
                let stop = hold.stop.clone();
                let mut response = service::handle(&pipeline, request, client, hold).await;
                // The answer to the last request of a stopping HTTP/1.x connection says so;
                // hyper closes the connection once it is written. Not a WebSocket
                // upgrade's answer, whose session finishes by a close frame.
                if stop.borrow().is_some()
                    && version < Version::HTTP_2
                    && response.status() != StatusCode::SWITCHING_PROTOCOLS
                {
                    response
                        .headers_mut()
                        .insert(CONNECTION, HeaderValue::from_static("close"));
                }
                Ok::<_, Infallible>(response)
            }
        });
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.limits.header_timeout);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(self.limits.http2_max_concurrent_streams);
        let connection = builder.serve_connection_with_upgrades(io, service);
        tokio::pin!(connection);
        let idle_timeout = self.limits.idle_timeout;
        let mut closing = false;
        // A connection accepted while the gateway drains finishes from the start.
        let mut stopping = stop.borrow_and_update().is_some();
        loop {
            // HTTP/2 has GOAWAY, which no request in flight can cross: send it as soon as both
            // are known.
            if stopping && !closing && *http2.borrow_and_update() {
                connection.as_mut().graceful_shutdown();
                closing = true;
            }
            // A stopping gateway waits less for a quiet HTTP/1.1 connection.
            let quiet_for = if stopping {
                QUIET_BEFORE_CLOSE
            } else {
                idle_timeout
            };
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(error) = result {
                        debug!(peer = %self.peer, "gateway: connection ended: {error}");
                    }
                    return;
                }
                Ok(()) = stop.changed(), if !stopping => {
                    stopping = stop.borrow_and_update().is_some();
                }
                Ok(()) = http2.changed(), if !closing => {}
                () = tokio::time::sleep_until(activity.last() + quiet_for), if !closing => {
                    if activity.last().elapsed() >= quiet_for {
                        debug!(peer = %self.peer, "gateway: closing a connection quiet for {quiet_for:?}");
                        connection.as_mut().graceful_shutdown();
                        closing = true;
                    }
                }
            }
        }
    }
}

/// When a connection last moved a byte.
struct Activity {
    start: Instant,
    /// Milliseconds after `start`.
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let now = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(now, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// A socket that records its activity (under TLS, so handshakes count too).
struct Tracked<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(result, Poll::Ready(Ok(written)) if written > 0) {
            self.activity.touch();
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(result, Poll::Ready(Ok(written)) if written > 0) {
            self.activity.touch();
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
