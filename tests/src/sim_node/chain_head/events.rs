//! What `chainHead_v1_follow` sends and what the chainHead methods answer, serialized exactly as
//! polkadot-sdk's `sc-rpc-spec-v2` does (`chain_head/event.rs`, `common/events.rs`).

use serde::{Deserialize, Serialize, Serializer};

use super::super::primitives::Hash32;
use super::super::runtime::RuntimeSpec;

/// One `chainHead_v1_followEvent` notification.
#[derive(Debug, Clone, PartialEq)]
pub enum FollowEvent {
    Initialized {
        finalized_block_hashes: Vec<Hash32>,
        /// `Some` exactly when the subscription was made `withRuntime`.
        finalized_block_runtime: Option<RuntimeEvent>,
    },
    NewBlock {
        block_hash: Hash32,
        parent_block_hash: Hash32,
        /// `Some(None)` (`"newRuntime": null`) when `withRuntime` and the runtime did not
        /// change; `None` (no field) without `withRuntime`.
        new_runtime: Option<Option<RuntimeEvent>>,
    },
    BestBlockChanged {
        best_block_hash: Hash32,
    },
    Finalized {
        finalized_block_hashes: Vec<Hash32>,
        pruned_block_hashes: Vec<Hash32>,
    },
    OperationBodyDone {
        operation_id: String,
        value: Vec<String>,
    },
    OperationCallDone {
        operation_id: String,
        output: String,
    },
    OperationStorageItems {
        operation_id: String,
        items: Vec<StorageResult>,
    },
    OperationStorageDone {
        operation_id: String,
    },
    OperationError {
        operation_id: String,
        error: String,
    },
    Stop,
}

impl Serialize for FollowEvent {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(None)?;
        match self {
            FollowEvent::Initialized {
                finalized_block_hashes,
                finalized_block_runtime,
            } => {
                map.serialize_entry("event", "initialized")?;
                map.serialize_entry("finalizedBlockHashes", finalized_block_hashes)?;
                if let Some(runtime) = finalized_block_runtime {
                    map.serialize_entry("finalizedBlockRuntime", runtime)?;
                }
            }
            FollowEvent::NewBlock {
                block_hash,
                parent_block_hash,
                new_runtime,
            } => {
                map.serialize_entry("event", "newBlock")?;
                map.serialize_entry("blockHash", block_hash)?;
                map.serialize_entry("parentBlockHash", parent_block_hash)?;
                if let Some(new_runtime) = new_runtime {
                    map.serialize_entry("newRuntime", new_runtime)?;
                }
            }
            FollowEvent::BestBlockChanged { best_block_hash } => {
                map.serialize_entry("event", "bestBlockChanged")?;
                map.serialize_entry("bestBlockHash", best_block_hash)?;
            }
            FollowEvent::Finalized {
                finalized_block_hashes,
                pruned_block_hashes,
            } => {
                map.serialize_entry("event", "finalized")?;
                map.serialize_entry("finalizedBlockHashes", finalized_block_hashes)?;
                map.serialize_entry("prunedBlockHashes", pruned_block_hashes)?;
            }
            FollowEvent::OperationBodyDone {
                operation_id,
                value,
            } => {
                map.serialize_entry("event", "operationBodyDone")?;
                map.serialize_entry("operationId", operation_id)?;
                map.serialize_entry("value", value)?;
            }
            FollowEvent::OperationCallDone {
                operation_id,
                output,
            } => {
                map.serialize_entry("event", "operationCallDone")?;
                map.serialize_entry("operationId", operation_id)?;
                map.serialize_entry("output", output)?;
            }
            FollowEvent::OperationStorageItems {
                operation_id,
                items,
            } => {
                map.serialize_entry("event", "operationStorageItems")?;
                map.serialize_entry("operationId", operation_id)?;
                map.serialize_entry("items", items)?;
            }
            FollowEvent::OperationStorageDone { operation_id } => {
                map.serialize_entry("event", "operationStorageDone")?;
                map.serialize_entry("operationId", operation_id)?;
            }
            FollowEvent::OperationError {
                operation_id,
                error,
            } => {
                map.serialize_entry("event", "operationError")?;
                map.serialize_entry("operationId", operation_id)?;
                map.serialize_entry("error", error)?;
            }
            FollowEvent::Stop => map.serialize_entry("event", "stop")?,
        }
        map.end()
    }
}

/// `finalizedBlockRuntime` / `newRuntime`: `{"type":"valid","spec":{...}}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum RuntimeEvent {
    Valid { spec: RuntimeSpec },
}

/// The answer of `chainHead_v1_body`, `_call` and `_storage`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "result", rename_all = "camelCase")]
pub enum MethodResponse {
    #[serde(rename_all = "camelCase")]
    Started {
        operation_id: String,
    },
    LimitReached,
}

/// One item of `chainHead_v1_storage`'s `items` parameter.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StorageQuery {
    pub key: String,
    #[serde(rename = "type")]
    pub query_type: StorageQueryType,
    // `paginationStartKey` is ignored (serde skips unknown fields): sim-node's storage is two
    // keys, never paginated.
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum StorageQueryType {
    Value,
    Hash,
    ClosestDescendantMerkleValue,
    DescendantsValues,
    DescendantsHashes,
}

/// One item of an `operationStorageItems` event: the key and exactly one of the result fields.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StorageResult {
    pub key: String,
    #[serde(flatten)]
    pub result: StorageResultType,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub child_trie_key: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum StorageResultType {
    Value(String),
    Hash(String),
    ClosestDescendantMerkleValue(String),
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::json;

    use super::*;

    fn hash(byte: u8) -> Hash32 {
        Hash32([byte; 32])
    }

    #[test]
    fn initialized_carries_the_runtime_only_with_runtime() {
        let without = FollowEvent::Initialized {
            finalized_block_hashes: vec![hash(1)],
            finalized_block_runtime: None,
        };
        assert_eq!(
            serde_json::to_string(&without).expect("serializes"),
            format!(
                r#"{{"event":"initialized","finalizedBlockHashes":["{}"]}}"#,
                hash(1)
            )
        );
        let spec = RuntimeSpec {
            spec_name: "ABC".into(),
            impl_name: "Impl".into(),
            spec_version: 1,
            impl_version: 0,
            apis: BTreeMap::new(),
            transaction_version: 0,
        };
        let with = FollowEvent::Initialized {
            finalized_block_hashes: vec![hash(1)],
            finalized_block_runtime: Some(RuntimeEvent::Valid { spec }),
        };
        // The same bytes as sc-rpc-spec-v2's own serialization test.
        assert_eq!(
            serde_json::to_string(&with).expect("serializes"),
            format!(
                concat!(
                    r#"{{"event":"initialized","finalizedBlockHashes":["{}"],"#,
                    r#""finalizedBlockRuntime":{{"type":"valid","spec":{{"specName":"ABC","implName":"Impl","#,
                    r#""specVersion":1,"implVersion":0,"apis":{{}},"transactionVersion":0}}}}}}"#
                ),
                hash(1)
            )
        );
    }

    #[test]
    fn new_block_has_a_null_new_runtime_only_with_runtime() {
        let with = FollowEvent::NewBlock {
            block_hash: hash(2),
            parent_block_hash: hash(1),
            new_runtime: Some(None),
        };
        assert_eq!(
            serde_json::to_value(&with).expect("serializes"),
            json!({ "event": "newBlock", "blockHash": hash(2), "parentBlockHash": hash(1), "newRuntime": null })
        );
        let without = FollowEvent::NewBlock {
            block_hash: hash(2),
            parent_block_hash: hash(1),
            new_runtime: None,
        };
        assert_eq!(
            serde_json::to_value(&without).expect("serializes"),
            json!({ "event": "newBlock", "blockHash": hash(2), "parentBlockHash": hash(1) })
        );
    }

    #[test]
    fn operation_events_and_method_responses_use_the_spec_names() {
        let items = FollowEvent::OperationStorageItems {
            operation_id: "0".into(),
            items: vec![StorageResult {
                key: "0x01".into(),
                result: StorageResultType::Hash("0x02".into()),
                child_trie_key: None,
            }],
        };
        assert_eq!(
            serde_json::to_value(&items).expect("serializes"),
            json!({ "event": "operationStorageItems", "operationId": "0", "items": [{ "key": "0x01", "hash": "0x02" }] })
        );
        assert_eq!(
            serde_json::to_value(FollowEvent::Stop).expect("serializes"),
            json!({ "event": "stop" })
        );
        assert_eq!(
            serde_json::to_value(MethodResponse::Started {
                operation_id: "7".into()
            })
            .expect("serializes"),
            json!({ "result": "started", "operationId": "7" })
        );
        assert_eq!(
            serde_json::to_value(MethodResponse::LimitReached).expect("serializes"),
            json!({ "result": "limitReached" })
        );
        let query: StorageQuery = serde_json::from_value(
            json!({ "key": "0x01", "type": "closestDescendantMerkleValue" }),
        )
        .expect("parses");
        assert_eq!(
            query.query_type,
            StorageQueryType::ClosestDescendantMerkleValue
        );
    }
}
