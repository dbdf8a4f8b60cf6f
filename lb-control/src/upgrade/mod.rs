//! `lb-control upgrade` (and `systemctl reload`): a new lb-control process takes over from the
//! running one, and no gateway request fails.
//!
//! The model is nginx's binary upgrade and HAProxy's seamless reload: the running process
//! starts the binary found at its own path (the new version once it is installed there) with
//! its own arguments, and passes it the listening sockets of the gateway and the admin API
//! ([`inherit`]). The same sockets, so nothing is closed and no connection waiting in a
//! listener's queue is lost (with `SO_REUSEPORT`, closing a listener drops its queue); for a
//! moment both processes accept on them. Passing them from the old process works with or
//! without systemd (the lab has none); systemd socket activation would hand over only the
//! sockets systemd made, and nothing of the running process's state.
//!
//! The handover, over a socket pair the new process inherits too (each step one line):
//!
//! 1. The new process reads its config, opens the store, loads its certificate and the XDP
//!    program (swapped into the pinned links: the kernel path never stops forwarding), on the
//!    sockets it was given. Meanwhile the old one serves and writes as before. Whatever fails
//!    here (a bad config, a program the verifier refuses) ends the new process and changes
//!    nothing: the old one carries on, and `lb-control upgrade` reports the failure.
//! 2. `stop-writing`: the old process stops its writers. Its admin API stops accepting (admin
//!    connections wait in the shared queue for the new process), and its backend set holds
//!    every change back (health results, store changes of a peer), so the kernel tables have
//!    one writer at a time: the old process's userspace copy of them is never used again once
//!    the new process writes. It answers `stopped-writing`.
//! 3. The new process re-reads the kernel tables, writes them from the store and its own
//!    health checks, starts its health checker, gateway and admin API, and says `serving`.
//! 4. The old process stops accepting, finishes its requests in flight (HTTP/1.1 answers
//!    carry `Connection: close`, HTTP/2 gets GOAWAY), closes its WebSocket sessions with 1012
//!    (service restart: clients reconnect, to the new process) and exits, leaving the XDP
//!    program attached.
//!
//! If the new process exits or stalls before `serving`, the old one resumes: it reads the
//! kernel tables back, writes them whole and restarts its admin API on the socket it kept.
//!
//! During the overlap (steps 1 to 4, about a second) both processes run health checks (a node
//! sees both for a moment: harmless); the SQLite store is open in both (SQLite serializes the
//! writes; the old one writes only its gateway's key last-used times); the old gateway stops
//! adding to the kernel blocklist once the new one serves (a change reads and writes back the
//! blocklist's version: one writer), and its backend set stays held back until it exits. A
//! key created or revoked through the new admin API is not seen by the old gateway, whose HTTP
//! connections serve at most one more request each and whose WebSocket sessions close at
//! step 4.

mod inherit;
pub mod systemd;

use std::{
    ffi::OsString,
    io::{self, BufRead, BufReader, Write},
    os::{fd::AsRawFd, unix::net::UnixStream as StdUnixStream},
    path::{Path, PathBuf},
    process::ExitStatus,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader as AsyncBufReader},
    net::{UnixListener, UnixStream},
    process::Child,
};
use tracing::warn;

/// Names the sockets the new process inherits: `channel=3 gateway=4,5 admin=6`.
const SOCKETS_VARIABLE: &str = "LB_CONTROL_UPGRADE_SOCKETS";

/// How long the old process waits for each step of the new one: a start takes a few seconds
/// (loading the program, reading the store); longer means it hangs.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// What `lb-control upgrade` waits for at most: the new process's steps, and some margin.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(150);

#[derive(Debug, Error)]
pub enum UpgradeError {
    #[error("upgrade socket {path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "no lb-control with state directory {state_dir} answers on {path}: is it running? \
         ({source})"
    )]
    NotRunning {
        state_dir: PathBuf,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("starting the new lb-control ({program}): {source}")]
    Spawn {
        program: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the new lb-control (pid {pid}) exited ({status}) before it served; see its log. The \
         running lb-control carries on"
    )]
    SuccessorExited { pid: u32, status: ExitStatus },
    #[error(
        "the new lb-control (pid {pid}) did not say '{step}' within {STEP_TIMEOUT:?} and was \
         killed. The running lb-control carries on"
    )]
    SuccessorStalled { pid: u32, step: &'static str },
    #[error("the {peer} lb-control said {said:?} where '{expected}' was due")]
    Protocol {
        peer: &'static str,
        said: String,
        expected: &'static str,
    },
    #[error("talking to the {peer} lb-control: {source}")]
    Channel {
        peer: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the sockets passed in {SOCKETS_VARIABLE}={value:?}: {problem}")]
    Inherited { value: String, problem: String },
    #[error("the running lb-control refused the upgrade: {0}")]
    Refused(String),
}

/// The steps of the handover, one line each on the channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// New to old: ready for the kernel tables; stop writing them.
    StopWriting,
    /// Old to new: nothing writes any more.
    StoppedWriting,
    /// New to old: serving; finish and exit.
    Serving,
}

impl Step {
    fn word(self) -> &'static str {
        match self {
            Step::StopWriting => "stop-writing",
            Step::StoppedWriting => "stopped-writing",
            Step::Serving => "serving",
        }
    }
}

/// One end of the handover's channel: lines, one step each.
struct Channel {
    stream: AsyncBufReader<UnixStream>,
    /// Who is at the other end, for errors: "old" or "new".
    peer: &'static str,
}

impl Channel {
    async fn send(&mut self, step: Step) -> Result<(), UpgradeError> {
        let line = format!("{}\n", step.word());
        self.stream
            .get_mut()
            .write_all(line.as_bytes())
            .await
            .map_err(|source| UpgradeError::Channel {
                peer: self.peer,
                source,
            })
    }

    /// The next step; None when the other end closed the channel.
    async fn receive(&mut self, expected: Step) -> Result<Option<()>, UpgradeError> {
        let mut line = String::new();
        let read =
            self.stream
                .read_line(&mut line)
                .await
                .map_err(|source| UpgradeError::Channel {
                    peer: self.peer,
                    source,
                })?;
        if read == 0 {
            return Ok(None);
        }
        if line.trim_end() != expected.word() {
            return Err(UpgradeError::Protocol {
                peer: self.peer,
                said: line.trim_end().to_owned(),
                expected: expected.word(),
            });
        }
        Ok(Some(()))
    }
}

/// Where a running lb-control takes upgrade requests: `<state_dir>/upgrade.sock`, private to
/// root like the directory.
pub fn request_socket(state_dir: &Path) -> PathBuf {
    state_dir.join("upgrade.sock")
}

/// What `lb-control upgrade` is told when the new process serves.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Upgraded {
    /// The new process.
    pub pid: u32,
    /// The old process, now finishing its requests.
    pub previous_pid: u32,
    /// From the request to the new process serving.
    pub took_ms: u64,
}

/// The answer line of an upgrade request.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Answer {
    Upgraded(Upgraded),
    Failed(String),
}

/// `lb-control upgrade`: asks the lb-control running with `state_dir` to hand over to a new
/// process and waits until it has (or failed, and carries on).
pub fn request(state_dir: &Path) -> Result<Upgraded, UpgradeError> {
    let path = request_socket(state_dir);
    let mut stream = StdUnixStream::connect(&path).map_err(|source| UpgradeError::NotRunning {
        state_dir: state_dir.to_owned(),
        path: path.clone(),
        source,
    })?;
    let socket_error = |source| UpgradeError::Socket {
        path: path.clone(),
        source,
    };
    stream
        .set_read_timeout(Some(REQUEST_TIMEOUT))
        .map_err(socket_error)?;
    stream.write_all(b"upgrade\n").map_err(socket_error)?;
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .map_err(socket_error)?;
    match serde_json::from_str(&line) {
        Ok(Answer::Upgraded(upgraded)) => Ok(upgraded),
        Ok(Answer::Failed(reason)) => Err(UpgradeError::Refused(reason)),
        Err(error) => Err(UpgradeError::Refused(format!(
            "it answered {line:?} ({error})"
        ))),
    }
}

/// The running process's side: upgrade requests, and the command line a new process is
/// started with.
pub struct Upgrades {
    requests: UnixListener,
    /// The executable at this process's path: the new version once it is installed there.
    program: PathBuf,
    args: Vec<OsString>,
}

impl Upgrades {
    /// Listens for upgrade requests in `state_dir`. A socket file left there by an earlier
    /// process is replaced: only the newest process listens.
    pub fn listen(state_dir: &Path) -> Result<Upgrades, UpgradeError> {
        let path = request_socket(state_dir);
        let socket_error = |source| UpgradeError::Socket {
            path: path.clone(),
            source,
        };
        match std::fs::remove_file(&path) {
            Err(error) if error.kind() != io::ErrorKind::NotFound => {
                return Err(socket_error(error));
            }
            _ => {}
        }
        let requests = UnixListener::bind(&path).map_err(socket_error)?;
        let program = std::env::current_exe().map_err(socket_error)?;
        Ok(Upgrades {
            requests,
            program,
            args: std::env::args_os().skip(1).collect(),
        })
    }

    /// The next upgrade request.
    pub async fn next(&self) -> UpgradeRequest {
        loop {
            match self.requests.accept().await {
                Ok((stream, _)) => {
                    let mut stream = AsyncBufReader::new(stream);
                    let mut line = String::new();
                    match stream.read_line(&mut line).await {
                        Ok(_) if line.trim_end() == "upgrade" => {
                            return UpgradeRequest { stream };
                        }
                        Ok(_) => warn!("upgrade socket: ignored the request {line:?}"),
                        Err(error) => warn!("upgrade socket: reading a request: {error}"),
                    }
                }
                Err(error) => {
                    warn!("upgrade socket: accepting a request: {error}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Starts the new process with this one's arguments, passing it `gateway` (the gateway's
    /// listening sockets) and `admin` (the admin API's).
    pub fn start_successor(
        &self,
        gateway: &[std::net::TcpListener],
        admin: &std::net::TcpListener,
    ) -> Result<Successor, UpgradeError> {
        let spawn_error = |source| UpgradeError::Spawn {
            program: self.program.clone(),
            source,
        };
        let (ours, theirs) = StdUnixStream::pair().map_err(spawn_error)?;
        let mut fds = vec![theirs.as_raw_fd()];
        fds.extend(gateway.iter().map(AsRawFd::as_raw_fd));
        fds.push(admin.as_raw_fd());
        let gateway_fds: Vec<String> = (1..=gateway.len())
            .map(|index| inherit::passed_fd(index).to_string())
            .collect();
        let sockets = format!(
            "channel={} gateway={} admin={}",
            inherit::passed_fd(0),
            gateway_fds.join(","),
            inherit::passed_fd(gateway.len() + 1)
        );
        let mut command = tokio::process::Command::new(&self.program);
        command.args(&self.args).env(SOCKETS_VARIABLE, sockets);
        inherit::pass_fds(&mut command, fds);
        let child = command.spawn().map_err(spawn_error)?;
        drop(theirs);
        ours.set_nonblocking(true).map_err(spawn_error)?;
        let stream = UnixStream::from_std(ours).map_err(spawn_error)?;
        Ok(Successor {
            pid: child.id().unwrap_or_default(),
            child,
            channel: Channel {
                stream: AsyncBufReader::new(stream),
                peer: "new",
            },
        })
    }
}

/// A request from `lb-control upgrade`, answered once the handover is done or failed.
pub struct UpgradeRequest {
    stream: AsyncBufReader<UnixStream>,
}

impl UpgradeRequest {
    pub async fn answer(mut self, outcome: &Result<Upgraded, UpgradeError>) {
        let answer = match outcome {
            Ok(upgraded) => Answer::Upgraded(upgraded.clone()),
            Err(error) => Answer::Failed(error.to_string()),
        };
        let line = serde_json::to_string(&answer).unwrap_or_default() + "\n";
        // A requester that went away misses its answer; the upgrade went on without it.
        let _ = self.stream.get_mut().write_all(line.as_bytes()).await;
    }
}

/// The new process, as the old one sees it during the handover.
pub struct Successor {
    pid: u32,
    child: Child,
    channel: Channel,
}

impl Successor {
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Waits until the new process is ready for the kernel tables.
    pub async fn ready_to_write(&mut self) -> Result<(), UpgradeError> {
        self.expect(Step::StopWriting).await
    }

    /// Tells the new process that nothing here writes any more.
    pub async fn stopped_writing(&mut self) -> Result<(), UpgradeError> {
        self.channel.send(Step::StoppedWriting).await
    }

    /// Waits until the new process serves.
    pub async fn serving(&mut self) -> Result<(), UpgradeError> {
        self.expect(Step::Serving).await
    }

    /// The next step, or why it will not come: the process exited (its status), stalled (it is
    /// killed) or said something else.
    async fn expect(&mut self, step: Step) -> Result<(), UpgradeError> {
        let received = tokio::time::timeout(STEP_TIMEOUT, self.channel.receive(step)).await;
        match received {
            Ok(Ok(Some(()))) => Ok(()),
            Ok(Ok(None)) => {
                // The channel closed with the process: its status says why.
                let status = tokio::time::timeout(STEP_TIMEOUT, self.child.wait()).await;
                match status {
                    Ok(Ok(status)) => Err(UpgradeError::SuccessorExited {
                        pid: self.pid,
                        status,
                    }),
                    _ => Err(self.kill(step)),
                }
            }
            Ok(Err(error)) => {
                let _ = self.kill(step);
                Err(error)
            }
            Err(_) => Err(self.kill(step)),
        }
    }

    fn kill(&mut self, step: Step) -> UpgradeError {
        if let Err(error) = self.child.start_kill() {
            warn!(pid = self.pid, "killing the new lb-control: {error}");
        }
        UpgradeError::SuccessorStalled {
            pid: self.pid,
            step: step.word(),
        }
    }
}

/// The process this one takes over from, with the sockets it passed.
pub struct Predecessor {
    channel: Channel,
    gateway: Vec<std::net::TcpListener>,
    admin: Option<std::net::TcpListener>,
}

impl Predecessor {
    /// The process that started this one to take over from it, if one did.
    pub fn inherited() -> Result<Option<Predecessor>, UpgradeError> {
        let Some(value) = std::env::var_os(SOCKETS_VARIABLE) else {
            return Ok(None);
        };
        let value = value.to_string_lossy().into_owned();
        let problem = |problem: String| UpgradeError::Inherited {
            value: value.clone(),
            problem,
        };
        let (mut channel, mut gateway, mut admin) = (None, Vec::new(), None);
        for field in value.split_whitespace() {
            let (name, fds) = field
                .split_once('=')
                .ok_or_else(|| problem(format!("{field:?} is not name=descriptors")))?;
            for fd in fds.split(',').filter(|fd| !fd.is_empty()) {
                let fd = fd
                    .parse()
                    .map_err(|_| problem(format!("{fd:?} is not a descriptor number")))?;
                let owned = inherit::take_fd(fd)
                    .map_err(|error| problem(format!("descriptor {fd}: {error}")))?;
                match name {
                    "channel" => channel = Some(StdUnixStream::from(owned)),
                    "gateway" => gateway.push(std::net::TcpListener::from(owned)),
                    "admin" => admin = Some(std::net::TcpListener::from(owned)),
                    _ => return Err(problem(format!("unknown socket {name:?}"))),
                }
            }
        }
        let channel = channel.ok_or_else(|| problem("no channel".to_owned()))?;
        let channel_error = |source| UpgradeError::Channel {
            peer: "old",
            source,
        };
        channel.set_nonblocking(true).map_err(channel_error)?;
        let stream = UnixStream::from_std(channel).map_err(channel_error)?;
        Ok(Some(Predecessor {
            channel: Channel {
                stream: AsyncBufReader::new(stream),
                peer: "old",
            },
            gateway,
            admin,
        }))
    }

    /// The gateway's listening sockets (one per serving thread of the old process).
    pub fn take_gateway_listeners(&mut self) -> Vec<std::net::TcpListener> {
        std::mem::take(&mut self.gateway)
    }

    /// The admin API's listening socket.
    pub fn take_admin_listener(&mut self) -> Option<std::net::TcpListener> {
        self.admin.take()
    }

    /// Asks the old process to stop writing the kernel tables and waits until it has.
    pub async fn stop_writing(&mut self) -> Result<(), UpgradeError> {
        self.channel.send(Step::StopWriting).await?;
        match self.channel.receive(Step::StoppedWriting).await? {
            Some(()) => Ok(()),
            None => Err(UpgradeError::Channel {
                peer: "old",
                source: io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "it closed the channel before it stopped writing",
                ),
            }),
        }
    }

    /// Tells the old process that this one serves: it finishes its requests and exits.
    pub async fn serving(mut self) -> Result<(), UpgradeError> {
        self.channel.send(Step::Serving).await
    }
}
