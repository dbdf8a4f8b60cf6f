//! Real etcd for tests: `etcd` (Debian's etcd-server, which `cargo xtask setup` installs) on
//! 127.0.0.1 ports of its own, with a data directory of its own, removed with it.
//!
//! Here rather than in the tests crate because the store's own unit tests run on it too.
//! [`EtcdCluster::start`] makes one or more members; [`EtcdCluster::stop_member`] kills one
//! (the quorum tests). [`shared`] is one member for the whole test process, each test on a
//! prefix of its own.

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        OnceLock,
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use super::EtcdSettings;

/// How long a member may take to answer its health check after start.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// One or more etcd members forming one cluster; killed and removed when dropped.
pub struct EtcdCluster {
    members: Vec<Member>,
    data_root: PathBuf,
}

struct Member {
    client_url: String,
    child: Option<Child>,
}

impl EtcdCluster {
    /// Starts `size` members and waits until the cluster answers.
    pub fn start(size: usize) -> EtcdCluster {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let data_root = std::env::temp_dir().join(format!(
            "lb-etcd-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        remove_stale_data_dirs();
        let ports: Vec<(u16, u16)> = (0..size).map(|_| (free_port(), free_port())).collect();
        let initial_cluster = ports
            .iter()
            .enumerate()
            .map(|(index, (_, peer))| format!("m{index}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let members = ports
            .iter()
            .enumerate()
            .map(|(index, &(client, peer))| {
                let name = format!("m{index}");
                let data_dir = data_root.join(&name);
                let client_url = format!("http://127.0.0.1:{client}");
                let peer_url = format!("http://127.0.0.1:{peer}");
                let mut command = Command::new("etcd");
                command
                    .args(["--name", &name])
                    .arg("--data-dir")
                    .arg(&data_dir)
                    .args(["--listen-client-urls", &client_url])
                    .args(["--advertise-client-urls", &client_url])
                    .args(["--listen-peer-urls", &peer_url])
                    .args(["--initial-advertise-peer-urls", &peer_url])
                    .args(["--initial-cluster", &initial_cluster])
                    .args(["--initial-cluster-state", "new"])
                    .args([
                        "--initial-cluster-token",
                        &format!("{}", data_root.display()),
                    ])
                    // Fast elections: a lost quorum shows in about half a second.
                    .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
                    .args(["--max-txn-ops", "4096"])
                    .args(["--logger", "zap", "--log-level", "error"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null());
                // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
                unsafe {
                    command.pre_exec(|| {
                        // The member dies with the thread that started it: a test that panics
                        // or a test process that exits leaves no etcd behind.
                        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
                let child = command.spawn().unwrap_or_else(|error| {
                    panic!(
                        "cannot start etcd ({error}): install Debian's etcd-server \
                         (cargo xtask setup)"
                    )
                });
                Member {
                    client_url,
                    child: Some(child),
                }
            })
            .collect();
        let cluster = EtcdCluster { members, data_root };
        for member in &cluster.members {
            wait_healthy(&member.client_url);
        }
        cluster
    }

    /// The client URLs of every member, stopped ones included.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    /// Store settings for this cluster under `prefix`.
    pub fn settings(&self, prefix: &str) -> EtcdSettings {
        EtcdSettings::plain(self.endpoints(), prefix)
    }

    /// Kills member `index` (SIGKILL, as a crash).
    pub fn stop_member(&mut self, index: usize) {
        if let Some(mut child) = self.members[index].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for index in 0..self.members.len() {
            self.stop_member(index);
        }
        let _ = std::fs::remove_dir_all(&self.data_root);
    }
}

/// One member shared by every test of this process; each test takes a prefix of its own.
/// Started from a thread that lives as long as the process, so the member does too.
pub fn shared() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        let (started, url) = mpsc::channel();
        std::thread::spawn(move || {
            let cluster = EtcdCluster::start(1);
            let _ = started.send(cluster.endpoints()[0].clone());
            loop {
                std::thread::park();
            }
        });
        url.recv().expect("the shared etcd member started")
    })
}

/// A prefix no other test of this process uses.
pub fn unique_prefix(name: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!("/test-{name}-{}/", NEXT.fetch_add(1, Ordering::Relaxed))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free port on 127.0.0.1")
}

/// Polls the member's `/health` until it reports healthy (a leader elected).
fn wait_healthy(client_url: &str) {
    let address = client_url.trim_start_matches("http://");
    let deadline = Instant::now() + START_TIMEOUT;
    while Instant::now() < deadline {
        let healthy = TcpStream::connect(address).ok().and_then(|mut stream| {
            stream
                .write_all(b"GET /health HTTP/1.0\r\nHost: etcd\r\n\r\n")
                .ok()?;
            let mut answer = String::new();
            stream.read_to_string(&mut answer).ok()?;
            Some(answer.contains("\"health\":\"true\""))
        });
        if healthy == Some(true) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("etcd at {client_url} not healthy within {START_TIMEOUT:?}");
}

/// Data directories of test processes that are gone (killed before they could clean up).
fn remove_stale_data_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_prefix("lb-etcd-test-")
            .and_then(|rest| rest.split('-').next());
        if let Some(pid) = pid
            && !std::path::Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
