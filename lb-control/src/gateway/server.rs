//! The listening side: accepts TCP connections, admits them under the gateway's and the
//! client's connection limits ([`admission`](super::admission)), terminates TLS (with the certificate in force when the connection came), and serves
//! HTTP/1.1 or HTTP/2 on it (hyper-util's auto server, with upgrades: WebSocket sessions start
//! from HTTP/1.1 requests on the same port and keep the connection's [`ConnectionHold`]).
//!
//! A slow client cannot hold a connection past `header_timeout`: it bounds the TLS handshake
//! and the reading of each HTTP/1.1 request's headers. A connection with no bytes either way
//! for `idle_timeout` is closed (gracefully: an HTTP/2 client gets GOAWAY).

use std::{
    convert::Infallible,
    future::Future,
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

#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub http2_max_concurrent_streams: u32,
}

/// The body of a serving thread: a single-threaded runtime serving `listener` until `stop`
/// turns true. Connections, their requests and their WebSocket sessions stay on this thread.
pub fn serve_on(
    listener: std::net::TcpListener,
    tls: Option<Arc<Certificates>>,
    pipeline: Arc<Pipeline>,
    limits: ConnectionLimits,
    admission: Arc<Admission>,
    mut stop: watch::Receiver<bool>,
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
            let listener = match TcpListener::from_std(listener) {
                Ok(listener) => listener,
                Err(error) => {
                    error!("gateway: a listening socket: {error}");
                    return;
                }
            };
            let stopped = async move {
                let _ = stop.wait_for(|stop| *stop).await;
            };
            serve(listener, tls, pipeline, limits, admission, stopped).await;
        });
    }
}

/// Serves until `shutdown` resolves, then lets open requests finish for a while. `admission`
/// counts the open connections, shared by every listener of the gateway.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<Certificates>>,
    pipeline: Arc<Pipeline>,
    limits: ConnectionLimits,
    admission: Arc<Admission>,
    shutdown: impl Future<Output = ()>,
) {
    // Every connection holds a receiver: a send asks them to finish, and `closed()` tells when
    // the last one has.
    let (stop, _) = watch::channel(());
    tokio::pin!(shutdown);
    loop {
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
            () = &mut shutdown => break,
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
    }
    let _ = stop.send(());
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
    /// Changes when the gateway stops.
    pub stop: watch::Receiver<()>,
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
        let service = service_fn(move |request| {
            let pipeline = pipeline.clone();
            let hold = hold.clone();
            async move {
                let response = service::handle(&pipeline, request, client, hold).await;
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
        loop {
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(error) = result {
                        debug!(peer = %self.peer, "gateway: connection ended: {error}");
                    }
                    return;
                }
                _ = stop.changed(), if !closing => {
                    connection.as_mut().graceful_shutdown();
                    closing = true;
                }
                () = tokio::time::sleep_until(activity.last() + idle_timeout), if !closing => {
                    if activity.last().elapsed() >= idle_timeout {
                        debug!(peer = %self.peer, "gateway: closing a connection idle for {idle_timeout:?}");
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
