//! The new spec's transaction methods, after polkadot-sdk's `sc-rpc-spec-v2` `transaction/`:
//! `transaction_v1_broadcast` / `transaction_v1_stop` and `transactionWatch_v1_submitAndWatch` /
//! `transactionWatch_v1_unwatch`.
//!
//! sim-node has no transaction pool and runs no runtime code, so it cannot validate or include
//! a transaction. It checks what a node checks before the pool (that the bytes decode as an
//! extrinsic: a length prefix that matches, format version 4 or 5), then treats the transaction
//! as valid and pending for ever: a watch reports `validated` and nothing more, a broadcast
//! stays active until `transaction_v1_stop`. Undecodable bytes are `invalid` when watched and
//! silently dropped when broadcast, as on a real node. For inclusion use chopsticks.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use jsonrpsee::server::{IdProvider, RandomStringIdProvider};
use jsonrpsee::types::{ErrorObjectOwned, SubscriptionId};
use jsonrpsee::{
    ConnectionId, Extensions, PendingSubscriptionSink, RpcModule, SubscriptionMessage,
};
use serde_json::json;

use super::primitives::HexBytes;
use super::rpc::RegisterError;
use super::rpc_errors;
use super::scale::decode_compact_len;
use super::state::NodeState;

/// Broadcasts one connection may run at once (`MAX_TRANSACTION_PER_CONNECTION` in
/// `sc-service`); the next is answered `null`.
const MAX_BROADCASTS_PER_CONNECTION: usize = 16;
/// Length of a broadcast's operation id (random alphanumerics, as Substrate's).
const OPERATION_ID_LEN: usize = 16;
/// The extrinsic format versions the `node` runtime decodes.
const EXTRINSIC_VERSIONS: [u8; 2] = [4, 5];

/// Registers the four transaction methods.
pub fn register(module: &mut RpcModule<Arc<NodeState>>) -> Result<(), RegisterError> {
    let broadcasts = Arc::new(Broadcasts::default());
    let starts = broadcasts.clone();
    module.register_method(
        "transaction_v1_broadcast",
        move |params, _, extensions| -> Result<Option<String>, ErrorObjectOwned> {
            let transaction: HexBytes = params.one()?;
            Ok(starts.start(connection(extensions), &transaction.0))
        },
    )?;
    module.register_method(
        "transaction_v1_stop",
        move |params, _, extensions| -> Result<(), ErrorObjectOwned> {
            let operation: String = params.one()?;
            if broadcasts.stop(connection(extensions), &operation) {
                Ok(())
            } else {
                Err(rpc_errors::invalid_operation_id())
            }
        },
    )?;
    module.register_subscription_raw(
        "transactionWatch_v1_submitAndWatch",
        "transactionWatch_v1_watchEvent",
        "transactionWatch_v1_unwatch",
        |params, pending, _, _| {
            let transaction = params.one::<HexBytes>();
            tokio::spawn(async move {
                match transaction {
                    Ok(transaction) => watch(pending, &transaction.0).await,
                    Err(error) => pending.reject(error).await,
                }
            });
        },
    )?;
    Ok(())
}

fn connection(extensions: &Extensions) -> Option<ConnectionId> {
    extensions.get::<ConnectionId>().copied()
}

/// The running broadcasts, by connection: a connection can only stop its own.
#[derive(Default)]
struct Broadcasts {
    running: Mutex<HashMap<ConnectionId, HashSet<String>>>,
}

impl Broadcasts {
    /// Starts broadcasting; the operation id, or `None` when the connection runs the most it may.
    fn start(&self, connection: Option<ConnectionId>, transaction: &[u8]) -> Option<String> {
        let connection = connection?;
        let mut running = self
            .running
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let ids = running.entry(connection).or_default();
        if ids.len() >= MAX_BROADCASTS_PER_CONNECTION {
            return None;
        }
        let id = operation_id();
        // Undecodable bytes get an id but no broadcast: the node drops them silently.
        if is_decodable_extrinsic(transaction) {
            ids.insert(id.clone());
        }
        Some(id)
    }

    /// Stops a broadcast of `connection`; false if it has no such broadcast running.
    fn stop(&self, connection: Option<ConnectionId>, id: &str) -> bool {
        let Some(connection) = connection else {
            return false;
        };
        let mut running = self
            .running
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let Some(ids) = running.get_mut(&connection) else {
            return false;
        };
        let stopped = ids.remove(id);
        if ids.is_empty() {
            running.remove(&connection);
        }
        stopped
    }
}

fn operation_id() -> String {
    match RandomStringIdProvider::new(OPERATION_ID_LEN).next_id() {
        SubscriptionId::Str(id) => id.into_owned(),
        SubscriptionId::Num(number) => number.to_string(),
    }
}

/// Whether `bytes` decode as an `UncheckedExtrinsic` header does: a compact length equal to the
/// rest, whose first byte is a known format version (the signed bit aside).
fn is_decodable_extrinsic(bytes: &[u8]) -> bool {
    let Some((length, prefix)) = decode_compact_len(bytes) else {
        return false;
    };
    let body = &bytes[prefix..];
    body.len() == length
        && body
            .first()
            .is_some_and(|version| EXTRINSIC_VERSIONS.contains(&(version & 0b0111_1111)))
}

/// One `transactionWatch_v1_submitAndWatch`: `invalid` for undecodable bytes, else `validated`,
/// then the subscription stays open until unwatched.
async fn watch(pending: PendingSubscriptionSink, transaction: &[u8]) {
    let Ok(sink) = pending.accept().await else {
        return;
    };
    let (event, is_final) = if is_decodable_extrinsic(transaction) {
        (json!({ "event": "validated" }), false)
    } else {
        (
            json!({ "event": "invalid", "error": "Extrinsic bytes cannot be decoded" }),
            true,
        )
    };
    let Ok(message) = serde_json::value::to_raw_value(&event) else {
        return;
    };
    if sink.send(SubscriptionMessage::from(message)).await.is_err() || is_final {
        return;
    }
    sink.closed().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extrinsics_need_a_matching_length_and_a_known_version() {
        // Length 3, version 4 unsigned, then a call.
        assert!(is_decodable_extrinsic(&[0x0c, 0x04, 0x03, 0x00]));
        // Version 4 signed (0x84), version 5 general.
        assert!(is_decodable_extrinsic(&[0x08, 0x84, 0x00]));
        assert!(is_decodable_extrinsic(&[0x08, 0x05, 0x00]));
        assert!(!is_decodable_extrinsic(&[0x0c, 0x04, 0x03]), "short");
        assert!(!is_decodable_extrinsic(&[0x08, 0x03, 0x00]), "version 3");
        assert!(!is_decodable_extrinsic(&[0x12, 0x34]));
        assert!(!is_decodable_extrinsic(&[]));
    }

    #[test]
    fn a_connection_broadcasts_at_most_sixteen_and_stops_only_its_own() {
        let broadcasts = Broadcasts::default();
        let (mine, theirs) = (Some(ConnectionId(1)), Some(ConnectionId(2)));
        let ids: Vec<String> = (0..MAX_BROADCASTS_PER_CONNECTION)
            .map(|_| broadcasts.start(mine, &[0x04, 0x04]).expect("room"))
            .collect();
        assert!(ids.iter().all(|id| id.len() == OPERATION_ID_LEN));
        assert_eq!(broadcasts.start(mine, &[0x04, 0x04]), None);
        assert!(broadcasts.start(theirs, &[0x04, 0x04]).is_some());
        assert!(!broadcasts.stop(theirs, &ids[0]));
        assert!(broadcasts.stop(mine, &ids[0]));
        assert!(!broadcasts.stop(mine, &ids[0]), "stopped already");
        let dropped = broadcasts.start(mine, &[0xff]).expect("an id all the same");
        assert!(!broadcasts.stop(mine, &dropped), "never broadcast");
        assert!(
            broadcasts.start(mine, &[0x04, 0x04]).is_some(),
            "room again"
        );
        assert_eq!(broadcasts.start(mine, &[0x04, 0x04]), None, "full again");
    }
}
