//! The stored blocklist over a real SQLite store and the real pinned maps of a loaded XDP
//! program: a key guesser's block is in the kernel at once even while the store takes no
//! writes, stays there while the kernel follows the store, and is recorded once the store takes
//! writes again. (The store refuses here because another process holds SQLite's write lock;
//! an etcd without quorum refuses the same way.)
//!
//! Needs root (it loads the XDP program): run it as root or via `cargo xtask test`.

mod fixtures;

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use ipnet::IpNet;
use lb_control::{
    blocklist::StoredBlocklist,
    dataplane::{Blocklist, BlocklistHandle, DEFAULT_BPFFS},
    model::BlockSource,
    store::{Store, sqlite_path},
};
use prometheus_client::metrics::gauge::Gauge;

/// A fresh state directory, removed when dropped.
struct StateDir(PathBuf);

impl StateDir {
    fn new(tag: &str) -> StateDir {
        let dir = std::env::temp_dir().join(format!("lb-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("the state directory");
        StateDir(dir)
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The prefixes the kernel's blocklist holds, read through the pins as another process would.
fn in_kernel(pin_dir: &Path) -> Vec<IpNet> {
    Blocklist::open(pin_dir)
        .and_then(|blocklist| blocklist.list())
        .expect("the pinned blocklist")
        .into_iter()
        .map(|entry| entry.prefix)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guessers_block_the_store_refuses_is_enforced_at_once_and_recorded_later() {
    let tag = "stored-blocklist";
    let _program = fixtures::load_harness(tag);
    let pin_dir = Path::new(DEFAULT_BPFFS).join(fixtures::instance(tag));
    let state = StateDir::new(tag);
    let store = Store::open(&sqlite_path(&state.0)).expect("the store");
    let kernel = BlocklistHandle::open(&pin_dir, Gauge::default()).expect("the kernel blocklist");
    let blocklist = StoredBlocklist::start(store.clone(), kernel, &state.0)
        .await
        .expect("the blocklist starts");

    // Another process (the sqlite3 CLI in a transaction, say) holds the write lock: every
    // write fails once SQLite's busy timeout has passed.
    let holder = rusqlite::Connection::open(sqlite_path(&state.0)).expect("a second connection");
    holder
        .execute_batch("BEGIN IMMEDIATE")
        .expect("taking the write lock");

    let guesser: IpNet = "203.0.113.7/32".parse().expect("prefix");
    let until = SystemTime::now() + Duration::from_secs(600);
    blocklist
        .add_auth_failure_blocks(vec![(guesser, until)])
        .await;
    assert_eq!(
        in_kernel(&pin_dir),
        [guesser],
        "blocked in the kernel at once"
    );
    assert_eq!(
        store.blocklist().expect("read"),
        [],
        "the store took no write"
    );
    // An operator's block is refused, naming the store, and blocks nothing.
    let operator: IpNet = "198.51.100.0/24".parse().expect("prefix");
    let refused = blocklist
        .add(operator, None)
        .await
        .expect_err("no operator block without the store");
    assert!(refused.store().is_some(), "{refused}");
    // Following the store keeps this host's unrecorded block.
    blocklist.follow_store().await.expect("a pass");
    assert_eq!(in_kernel(&pin_dir), [guesser]);

    // The lock released, the next second's housekeeping records it.
    holder.execute_batch("COMMIT").expect("releasing the lock");
    blocklist.housekeeping(SystemTime::now()).await;
    let stored = store.blocklist().expect("read");
    assert_eq!(
        stored
            .iter()
            .map(|record| (record.prefix, record.source))
            .collect::<Vec<_>>(),
        [(guesser, BlockSource::AuthFailure)]
    );
    assert!(stored[0].until.is_some_and(|at| at >= until), "{stored:?}");
    // With one event for the batch, which says why.
    let events: Vec<(String, String, String)> = store
        .events(None, 10)
        .expect("events")
        .into_iter()
        .map(|event| (event.kind, event.subject, event.detail))
        .collect();
    assert!(
        events
            .iter()
            .any(|(kind, subject, detail)| kind == "blocklist.added"
                && subject == "prefix 203.0.113.7/32"
                && detail.starts_with("auth failures (gateway): 203.0.113.7/32 until ")),
        "{events:?}"
    );
    // From now on the store has it: another pass leaves it in the kernel.
    blocklist.follow_store().await.expect("a pass");
    assert_eq!(in_kernel(&pin_dir), [guesser]);
}
