//! An operator's tooling writing through the admin API while something happens to the store or
//! the pair: API keys and backends created one after another from a lab namespace, each
//! recorded as acknowledged when its answer was a 2xx and as refused otherwise, so a test or a
//! benchmark can check afterwards that every acknowledged write is there.
//!
//! The backends go to a service of the loop's own (check `none`, no traffic), so the writes
//! move no flow of a service under load.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use lb_control::{
    admin_client::{AdminClient, ClientError},
    api::model::{NewBackend, NewKey, NewService},
    model::{AdminState, ForwardingMode, HealthCheck, Protocol, ServiceId},
};

use crate::lab::{Member, PairLab, in_netns};

/// The port of the loop's service; its backends differ by port, from this one up.
const SERVICE_PORT: u16 = 9944;
const FIRST_BACKEND_PORT: u16 = 10_000;

/// One write: a key by its name, a backend by its address.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Write {
    Key(String),
    Backend(SocketAddr),
}

impl std::fmt::Display for Write {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Write::Key(name) => write!(f, "key {name}"),
            Write::Backend(address) => write!(f, "backend {address}"),
        }
    }
}

/// A write answered with a 2xx, when the answer came.
#[derive(Debug, Clone)]
pub struct Acknowledged {
    pub write: Write,
    pub at: Instant,
}

/// A write that was not acknowledged: the API's error answer, or why there was none.
#[derive(Debug, Clone)]
pub struct Refused {
    pub write: Write,
    pub at: Instant,
    /// The HTTP status of the API's error answer; None when there was no answer.
    pub status: Option<u16>,
    pub error: String,
}

/// Every write so far, in order.
#[derive(Debug, Clone, Default)]
pub struct WriteLog {
    pub acknowledged: Vec<Acknowledged>,
    pub refused: Vec<Refused>,
}

impl WriteLog {
    /// Writes acknowledged at or after `since`.
    pub fn acknowledged_since(&self, since: Instant) -> usize {
        self.acknowledged
            .iter()
            .filter(|write| write.at >= since)
            .count()
    }

    /// The first write acknowledged at or after `since`.
    pub fn first_acknowledged_since(&self, since: Instant) -> Option<&Acknowledged> {
        self.acknowledged.iter().find(|write| write.at >= since)
    }

    /// Writes refused at or after `since`.
    pub fn refused_since(&self, since: Instant) -> impl Iterator<Item = &Refused> {
        self.refused.iter().filter(move |write| write.at >= since)
    }
}

/// Where the loop writes and how.
#[derive(Debug, Clone)]
pub struct WriteTarget {
    /// The lab namespace the loop connects from.
    pub netns: String,
    /// The admin API, e.g. `http://10.200.1.1:9900`.
    pub admin_url: String,
    pub token: String,
    /// The VIP of the loop's own service, which it creates first.
    pub service_vip: Ipv4Addr,
    /// Where its backends' addresses are (they are never contacted).
    pub backend_host: Ipv4Addr,
    /// The pause after each answer before the next write.
    pub pace: Duration,
    /// How long a write may wait for its answer; past it, it counts as refused.
    pub answer_timeout: Duration,
}

/// The VIP of the loop's service in the HA lab: on the client segment, floating nowhere, no
/// traffic.
const PAIR_WRITES_VIP: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 20);
/// Where the loop's backends are in the HA lab: an unused address on the node segment.
const PAIR_WRITES_BACKEND_HOST: Ipv4Addr = Ipv4Addr::new(10, 200, 10, 250);

impl WriteTarget {
    /// The HA lab's client writing to the admin API at the floating address, as an operator's
    /// tooling would: whichever LB holds the addresses answers.
    pub fn pair_floating_address(
        lab: &PairLab,
        pace: Duration,
        answer_timeout: Duration,
    ) -> WriteTarget {
        WriteTarget {
            netns: lab.client().netns.clone(),
            admin_url: lab.floating_admin_url(),
            token: lab.admin_token().to_owned(),
            service_vip: PAIR_WRITES_VIP,
            backend_host: PAIR_WRITES_BACKEND_HOST,
            pace,
            answer_timeout,
        }
    }
}

/// The loop, running on a thread of its own in the target's namespace until stopped.
pub struct WriteLoop {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
    service: ServiceId,
}

struct Shared {
    stop: AtomicBool,
    log: Mutex<WriteLog>,
}

impl WriteLoop {
    /// Creates the loop's service through the admin API, then starts writing.
    pub fn start(target: WriteTarget) -> anyhow::Result<WriteLoop> {
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            log: Mutex::new(WriteLog::default()),
        });
        let (started, service) = mpsc::channel();
        let thread = {
            let shared = shared.clone();
            std::thread::spawn(move || {
                let netns = target.netns.clone();
                in_netns(&netns, move || {
                    // Sockets belong to the namespace of the thread that makes them: a runtime
                    // on this thread alone.
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .context("starting a runtime for the write loop")?;
                    runtime.block_on(write_until_stopped(&target, &shared, started))
                })?
            })
        };
        match service.recv() {
            Ok(id) => Ok(WriteLoop {
                shared,
                thread: Some(thread),
                service: id,
            }),
            // The thread ended before it had a service: its result says why.
            Err(_) => Err(thread
                .join()
                .map_err(|_| anyhow::anyhow!("the write loop panicked"))?
                .err()
                .unwrap_or_else(|| anyhow::anyhow!("the write loop ended without a service"))),
        }
    }

    /// The loop's service, which its backends are added to.
    pub fn service(&self) -> ServiceId {
        self.service
    }

    /// The writes so far.
    pub fn log(&self) -> WriteLog {
        self.shared.log.lock().expect("write log").clone()
    }

    /// Stops after the write in progress; every write made.
    pub fn stop(mut self) -> anyhow::Result<WriteLog> {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            thread
                .join()
                .map_err(|_| anyhow::anyhow!("the write loop panicked"))??;
        }
        Ok(self.log())
    }
}

impl Drop for WriteLoop {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
    }
}

async fn write_until_stopped(
    target: &WriteTarget,
    shared: &Shared,
    started: mpsc::Sender<ServiceId>,
) -> anyhow::Result<()> {
    let client = AdminClient::new(&target.admin_url, &target.token);
    let service = client
        .add_service(&NewService {
            vip: IpAddr::V4(target.service_vip),
            port: SERVICE_PORT,
            protocol: Protocol::Tcp,
            mode: ForwardingMode::Nat,
            check: HealthCheck::None,
        })
        .await
        .with_context(|| format!("creating the write loop's service at {}", target.admin_url))?
        .service
        .id;
    // The receiver waits for this; it is gone only if start() was abandoned.
    let _ = started.send(service);
    for number in 0_u16.. {
        if shared.stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        let write = if number % 2 == 0 {
            Write::Key(format!("write-{number}"))
        } else {
            let port = FIRST_BACKEND_PORT
                .checked_add(number)
                .context("the write loop ran out of backend ports")?;
            Write::Backend(SocketAddr::from((target.backend_host, port)))
        };
        let outcome =
            match tokio::time::timeout(target.answer_timeout, send(&client, &write, service)).await
            {
                Ok(Ok(())) => Ok(()),
                Ok(Err(error)) => Err((status_of(&error), error.to_string())),
                Err(_) => Err((
                    None,
                    format!("no answer within {:?}", target.answer_timeout),
                )),
            };
        shared.record(write, outcome);
        tokio::time::sleep(target.pace).await;
    }
    bail!("the write loop ran out of write numbers")
}

/// The HTTP status of an error answer from the API; None when there was no answer.
fn status_of(error: &ClientError) -> Option<u16> {
    match error {
        ClientError::Api { status, .. } | ClientError::Unexpected { status, .. } => {
            Some(status.as_u16())
        }
        ClientError::Unreachable { .. } | ClientError::Http { .. } => None,
    }
}

impl Shared {
    /// Logs `write` as acknowledged now, or as refused (with the API's status, if it answered,
    /// and why).
    fn record(&self, write: Write, outcome: Result<(), (Option<u16>, String)>) {
        let at = Instant::now();
        let mut log = self.log.lock().expect("write log");
        match outcome {
            Ok(()) => log.acknowledged.push(Acknowledged { write, at }),
            Err((status, error)) => log.refused.push(Refused {
                write,
                at,
                status,
                error,
            }),
        }
    }
}

async fn send(client: &AdminClient, write: &Write, service: ServiceId) -> Result<(), ClientError> {
    match write {
        Write::Key(name) => client
            .create_key(&NewKey {
                name: name.clone(),
                rps: None,
                burst: None,
                max_connections: None,
                max_subscriptions: None,
            })
            .await
            .map(drop),
        Write::Backend(address) => client
            .add_backend(&NewBackend {
                address: *address,
                service: Some(service),
                rpc_port: SERVICE_PORT,
                weight: 1,
                admin: AdminState::Enabled,
                tier: 0,
            })
            .await
            .map(drop),
    }
}

/// The acknowledged writes of `log` (a loop on `service`) that the admin API of the HA lab's
/// LB `member` does not list, asked from the client at the LB's own address: keys by name,
/// backends by address.
pub fn missing_on(
    lab: &PairLab,
    member: Member,
    service: ServiceId,
    log: &WriteLog,
) -> anyhow::Result<Vec<Write>> {
    let admin_url = lab.admin_url(member);
    let client = AdminClient::new(&admin_url, lab.admin_token());
    let listed = in_netns(&lab.client().netns, || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting a runtime to read the writes back")?;
        runtime.block_on(async {
            let keys = client.keys().await?;
            let backends = client.backends(Some(service)).await?;
            let listed: BTreeSet<Write> = keys
                .into_iter()
                .map(|key| Write::Key(key.name))
                .chain(
                    backends
                        .into_iter()
                        .map(|backend| Write::Backend(backend.backend.def.address)),
                )
                .collect();
            anyhow::Ok(listed)
        })
    })?
    .with_context(|| format!("reading keys and backends back from {admin_url}"))?;
    Ok(log
        .acknowledged
        .iter()
        .map(|acknowledged| &acknowledged.write)
        .filter(|write| !listed.contains(write))
        .cloned()
        .collect())
}
