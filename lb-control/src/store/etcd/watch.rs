//! Watches the prefix and moves [`StoreChanges`] with every change of services, backends, API
//! keys or the blocklist, whoever made it; the backend set, the key registry and the blocklist
//! re-read their part then.
//!
//! The watch only says *that* something changed: the reader re-reads the state as it is, so
//! a lost or compacted watch costs nothing but a re-read. After a watch error (a member gone,
//! the revision compacted) the watch is made again from the current revision and every part
//! moves, so their readers re-list whatever happened meanwhile.

use std::{sync::Arc, time::Duration};

use etcd_client::{Client, WatchOptions};
use tokio::sync::watch;
use tracing::{info, warn};

use super::{Dir, Layout, header_revision};
use crate::store::StoreChanges;

/// How long to wait before making a failed watch again.
const RETRY_AFTER: Duration = Duration::from_millis(500);

/// Runs until the store is dropped (its runtime ends the task).
pub(super) async fn follow(
    mut client: Client,
    layout: Layout,
    endpoints: String,
    start: i64,
    changes: Arc<watch::Sender<StoreChanges>>,
) {
    let mut from = start + 1;
    loop {
        let ended = watch_from(&mut client, &layout, from, &changes).await;
        warn!(
            "etcd ({endpoints}): the watch of {} ended: {ended}; making it again",
            layout.prefix
        );
        loop {
            tokio::time::sleep(RETRY_AFTER).await;
            match client.get(layout.ids(), None).await {
                Ok(response) => {
                    from = header_revision(response.header()) + 1;
                    break;
                }
                Err(error) => warn!("etcd ({endpoints}): {error}; the watch waits"),
            }
        }
        changes.send_modify(|changes| {
            changes.backends += 1;
            changes.keys += 1;
            changes.blocklist += 1;
        });
        info!("etcd ({endpoints}): watching {} again", layout.prefix);
    }
}

/// Follows the prefix from revision `from` until the watch fails; returns why.
async fn watch_from(
    client: &mut Client,
    layout: &Layout,
    from: i64,
    changes: &watch::Sender<StoreChanges>,
) -> String {
    let options = WatchOptions::new().with_prefix().with_start_revision(from);
    let mut stream = match client.watch(layout.prefix.clone(), Some(options)).await {
        Ok(stream) => stream,
        Err(error) => return error.to_string(),
    };
    loop {
        let response = match stream.message().await {
            Ok(Some(response)) => response,
            Ok(None) => return "the member closed it".to_owned(),
            Err(error) => return error.to_string(),
        };
        if response.canceled() {
            return match response.compact_revision() {
                0 => format!("cancelled: {}", response.cancel_reason()),
                compacted => format!("revision {from} is compacted (up to {compacted})"),
            };
        }
        let (mut backends, mut keys, mut blocklist) = (false, false, false);
        for event in response.events() {
            match event.kv().and_then(|kv| layout.dir_of(kv.key())) {
                Some(Dir::Services | Dir::Backends) => backends = true,
                Some(Dir::Keys) => keys = true,
                Some(Dir::Blocklist) => blocklist = true,
                // Last use and events change nothing anyone serves from; join tokens are read
                // from the store at each use.
                Some(Dir::KeyUsed | Dir::JoinTokens | Dir::Events) | None => {}
            }
        }
        if backends || keys || blocklist {
            changes.send_modify(|changes| {
                changes.backends += u64::from(backends);
                changes.keys += u64::from(keys);
                changes.blocklist += u64::from(blocklist);
            });
        }
    }
}
