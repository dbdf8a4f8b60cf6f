//! Client load through a service, from a lab host, for tests and benchmarks that watch what
//! happens to requests around an event (a node dying, a backend leaving the table): workers
//! that each open a new connection per request, and keep-alive connections that send requests
//! in a loop. Every request's outcome is kept with its start and end, so the caller splits them
//! around the event afterwards.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::{lab::in_netns, rpc_client::RpcConnection};

/// Connect, read and write timeout of every request: far above an answer's time in the lab,
/// short enough that a request lost to a dead node shows as a failure within the run.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// How a request travelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// On a connection of its own (`Connection: close`).
    NewConnection,
    /// On a long-lived connection (a new one only after the last failed).
    KeepAlive,
}

/// One request: when it started and ended, and the node that answered or why it failed.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub kind: Kind,
    pub started: Instant,
    pub finished: Instant,
    pub answer: Result<String, String>,
}

impl Outcome {
    pub fn is_ok(&self) -> bool {
        self.answer.is_ok()
    }
}

/// What load to send.
#[derive(Debug, Clone, Copy)]
pub struct LoadShape {
    /// Workers each sending one request per new connection, as fast as answers come.
    pub new_connection_workers: usize,
    /// Connections each sending requests one after the other.
    pub keep_alive_connections: usize,
    /// A worker's pause after a failed request, as a client would back off: without it a node
    /// that refuses connections at once would turn the count of failures into a measure of how
    /// fast a loop can spin.
    pub pause_after_failure: Duration,
}

/// Load running in threads of its own until [`Load::stop`].
pub struct Load {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    workers: Vec<JoinHandle<Vec<Outcome>>>,
}

impl Load {
    /// Starts `shape` against `target` from inside `netns`.
    pub fn start(netns: &str, target: SocketAddr, shape: LoadShape) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let kinds = std::iter::repeat_n(Kind::NewConnection, shape.new_connection_workers).chain(
            std::iter::repeat_n(Kind::KeepAlive, shape.keep_alive_connections),
        );
        let workers = kinds
            .map(|kind| {
                let worker = Worker {
                    kind,
                    target,
                    pause_after_failure: shape.pause_after_failure,
                    stop: stop.clone(),
                    answered: answered.clone(),
                    failed: failed.clone(),
                };
                let netns = netns.to_owned();
                std::thread::spawn(move || {
                    in_netns(&netns, || worker.run()).unwrap_or_else(|error| {
                        let now = Instant::now();
                        vec![Outcome {
                            kind,
                            started: now,
                            finished: now,
                            answer: Err(error.to_string()),
                        }]
                    })
                })
            })
            .collect();
        Load {
            stop,
            answered,
            failed,
            workers,
        }
    }

    /// Requests answered so far.
    pub fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }

    /// Requests failed so far.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// Stops every worker after its current request; returns every outcome, in no order.
    pub fn stop(mut self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::Relaxed);
        std::mem::take(&mut self.workers)
            .into_iter()
            .flat_map(|worker| {
                worker.join().unwrap_or_else(|_| {
                    let now = Instant::now();
                    vec![Outcome {
                        kind: Kind::NewConnection,
                        started: now,
                        finished: now,
                        answer: Err("a load worker panicked".to_owned()),
                    }]
                })
            })
            .collect()
    }
}

impl Drop for Load {
    /// A caller that bails out early leaves no worker sending requests.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

struct Worker {
    kind: Kind,
    target: SocketAddr,
    pause_after_failure: Duration,
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
}

impl Worker {
    fn run(self) -> Vec<Outcome> {
        let mut outcomes = Vec::new();
        let mut connection: Option<RpcConnection> = None;
        while !self.stop.load(Ordering::Relaxed) {
            let started = Instant::now();
            let answer = match self.kind {
                Kind::NewConnection => RpcConnection::connect(self.target, REQUEST_TIMEOUT)
                    .and_then(|mut fresh| fresh.system_health_and_close()),
                Kind::KeepAlive => {
                    let open = match connection.take() {
                        Some(open) => Ok(open),
                        None => RpcConnection::connect(self.target, REQUEST_TIMEOUT),
                    };
                    open.and_then(|mut open| {
                        let answer = open.system_health()?;
                        connection = Some(open);
                        Ok(answer)
                    })
                }
            };
            let answer = answer
                .and_then(|answer| Ok(answer.node()?.to_owned()))
                .map_err(|error| format!("{error:#}"));
            let counter = if answer.is_ok() {
                &self.answered
            } else {
                &self.failed
            };
            counter.fetch_add(1, Ordering::Relaxed);
            let failed = answer.is_err();
            outcomes.push(Outcome {
                kind: self.kind,
                started,
                finished: Instant::now(),
                answer,
            });
            if failed {
                std::thread::sleep(self.pause_after_failure);
            }
        }
        outcomes
    }
}
