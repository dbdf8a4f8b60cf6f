//! subxt 0.51 through the gateway's `wss://` endpoint with a key: an `OnlineClient` with its
//! default backend (which takes `chainHead_v1` when `rpc_methods` lists it), over the jsonrpsee
//! WebSocket client subxt builds for a URL, but trusting the test CA, while a hundred other
//! WebSocket clients hold subscriptions and make calls over the same, single, upstream
//! connection to the node.

use std::time::Duration;

use anyhow::Context;
use lb_tests::{
    new_spec::assert_took_the_new_spec,
    sim_node::{BlockNumber, Hash32, SimNodeHandle},
};
use serde_json::{Value as Json, json};
use subxt::{
    OnlineClient, SubstrateConfig,
    config::HashFor,
    dynamic,
    ext::{
        jsonrpsee::{
            client_transport::ws::{Url, WsTransportClientBuilder},
            core::client::Client,
        },
        scale_decode::DecodeAsType,
    },
};

use super::{
    setup::{SYSTEM_NUMBER, call_straight},
    shared_upstream::SharedUpstream,
};

const SUBXT_TIMEOUT: Duration = Duration::from_secs(60);
const BEST_BLOCKS_WANTED: usize = 3;
/// What subxt's own client for a URL buffers per subscription.
const SUBSCRIPTION_BUFFER: usize = 4096;

/// The new spec's calls subxt's default backend makes for what the test asks: the genesis
/// hash, the follow subscription (finalized and best blocks), a header, the runtime version
/// and the metadata (runtime calls), and the storage read.
const SUBXT_NEW_SPEC_CALLS: [&str; 6] = [
    "rpc_methods",
    "chainSpec_v1_genesisHash",
    "chainHead_v1_follow",
    "chainHead_v1_header",
    "chainHead_v1_call",
    "chainHead_v1_storage",
];

/// A block as subxt reported it.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Block {
    number: BlockNumber,
    hash: Hash32,
}

impl Block {
    fn new(number: u64, hash: HashFor<SubstrateConfig>) -> anyhow::Result<Block> {
        Ok(Block {
            number: BlockNumber::try_from(number).context("a block number beyond u32")?,
            hash: Hash32(hash.0),
        })
    }
}

/// The runtime's `System.Version` constant, the fields the test compares, decoded from the
/// metadata's types.
#[derive(Debug, DecodeAsType)]
#[decode_as_type(crate_path = "subxt::ext::scale_decode")]
struct RuntimeVersion {
    spec_name: String,
    spec_version: u32,
    transaction_version: u32,
}

/// What subxt answered.
#[derive(Debug)]
struct SubxtSaw {
    genesis_hash: Hash32,
    finalized: Block,
    /// From the runtime call `Core_version` at the finalized block.
    spec_version: u32,
    transaction_version: u32,
    /// From the metadata at the finalized block.
    version_constant: RuntimeVersion,
    /// `System.Number` read at the finalized block.
    system_number: u32,
    /// The best blocks above the finalized one, in the order they came.
    best_blocks: Vec<Block>,
    /// The lowest block the best-block stream gave at or below the finalized one: a new
    /// `chainHead_v1_follow` starts with up to 16 finalized blocks (Substrate's
    /// `MAX_FINALIZED_BLOCKS`, which sim-node keeps), and subxt may pass those on first.
    lowest_replayed: Option<BlockNumber>,
}

/// subxt's client for `url` (`OnlineClient::from_url`) with `tls` in place of the system's
/// certificate store.
async fn connect(
    url: &str,
    tls: rustls::ClientConfig,
) -> anyhow::Result<OnlineClient<SubstrateConfig>> {
    let (sender, receiver) = WsTransportClientBuilder::default()
        .with_custom_cert_store(tls)
        .build(Url::parse(url)?)
        .await
        .context("the WebSocket handshake")?;
    let rpc = Client::builder()
        .max_buffer_capacity_per_subscription(SUBSCRIPTION_BUFFER)
        .build_with_tokio(sender, receiver);
    OnlineClient::from_rpc_client(rpc)
        .await
        .context("the client")
}

/// What a user of subxt reads first: the chain's genesis hash, the finalized block with its
/// runtime version, a storage value there (decoded with subxt's dynamic API), then the best
/// blocks as they come.
async fn read_and_follow(api: OnlineClient<SubstrateConfig>) -> anyhow::Result<SubxtSaw> {
    let finalized = api
        .at_current_block()
        .await
        .context("the finalized block")?;
    let version_constant = finalized
        .constants()
        .entry(dynamic::constant::<RuntimeVersion>("System", "Version"))
        .context("the System.Version constant")?;
    let system_number = finalized
        .storage()
        .fetch(dynamic::storage::<(), u32>("System", "Number"), ())
        .await
        .context("System.Number at the finalized block")?
        .decode()
        .context("System.Number decoded")?;

    let finalized_number = Block::new(finalized.block_number(), finalized.block_hash())?.number;
    let mut best = api.stream_best_blocks().await.context("the best blocks")?;
    let mut best_blocks: Vec<Block> = Vec::new();
    let mut lowest_replayed: Option<BlockNumber> = None;
    while best_blocks.len() < BEST_BLOCKS_WANTED {
        let block = best
            .next()
            .await
            .context("the best blocks ended")?
            .context("a best block")?;
        let block = Block::new(block.number(), block.hash())?;
        if block.number <= finalized_number {
            lowest_replayed =
                Some(lowest_replayed.map_or(block.number, |low| low.min(block.number)));
        } else if best_blocks.last() != Some(&block) {
            best_blocks.push(block);
        }
    }

    Ok(SubxtSaw {
        genesis_hash: Hash32(api.genesis_hash().0),
        finalized: Block::new(finalized.block_number(), finalized.block_hash())?,
        spec_version: finalized.spec_version(),
        transaction_version: finalized.transaction_version(),
        version_constant,
        system_number,
        best_blocks,
        lowest_replayed,
    })
}

/// `node`'s answer to `method` straight, the `result` of it.
async fn node_result(node: &SimNodeHandle, method: &str, params: Json) -> Json {
    let answer = call_straight(node, method, params).await;
    assert!(answer.get("error").is_none(), "{method}: {answer}");
    answer["result"].clone()
}

#[tokio::test]
async fn subxt_reads_and_follows_the_chain_through_wss_while_a_hundred_clients_share_its_upstream_connection()
 {
    let mut shared = SharedUpstream::start().await;
    let url = shared.url();
    let tls = shared.setup.tls_client_config();
    let saw = shared
        .run_beside(async move {
            tokio::time::timeout(SUBXT_TIMEOUT, async move {
                read_and_follow(connect(&url, tls).await?).await
            })
            .await
            .context("subxt did not finish")?
        })
        .await
        .unwrap_or_else(|error| panic!("subxt through the gateway: {error:#}"));

    let node = shared.node();
    // Taken before the straight calls below, which the node counts too.
    assert_took_the_new_spec(node, &SUBXT_NEW_SPEC_CALLS);
    shared.assert_all_served_on_one_upstream_connection();

    assert_eq!(
        json!(saw.genesis_hash),
        node_result(node, "chain_getBlockHash", json!([0])).await,
        "{saw:?}"
    );
    let finalized = saw.finalized;
    assert_eq!(
        json!(finalized.hash),
        node_result(node, "chain_getBlockHash", json!([finalized.number])).await,
        "the finalized block is the node's block of that number: {saw:?}"
    );
    assert!(
        finalized.number <= node.finalized_number(),
        "finalized at the node: {saw:?}"
    );
    let version = node_result(node, "state_getRuntimeVersion", json!([finalized.hash])).await;
    let constant = &saw.version_constant;
    assert_eq!(json!(constant.spec_name), version["specName"], "{saw:?}");
    for spec_version in [saw.spec_version, constant.spec_version] {
        assert_eq!(json!(spec_version), version["specVersion"], "{saw:?}");
    }
    for transaction_version in [saw.transaction_version, constant.transaction_version] {
        assert_eq!(
            json!(transaction_version),
            version["transactionVersion"],
            "{saw:?}"
        );
    }

    let stored = node_result(
        node,
        "state_getStorage",
        json!([SYSTEM_NUMBER, finalized.hash]),
    )
    .await;
    let stored = stored
        .as_str()
        .and_then(|value| value.strip_prefix("0x"))
        .and_then(|value| hex::decode(value).ok())
        .and_then(|bytes| <[u8; 4]>::try_from(bytes).ok())
        .map(u32::from_le_bytes)
        .unwrap_or_else(|| panic!("the node's System.Number: {stored}"));
    assert_eq!(saw.system_number, stored, "{saw:?}");
    assert_eq!(saw.system_number, finalized.number, "{saw:?}");

    let best = &saw.best_blocks;
    for block in best {
        assert_eq!(block.hash, node.block_hash(block.number), "{saw:?}");
    }
    assert!(
        best.windows(2).all(|pair| pair[0].number < pair[1].number),
        "best blocks move forward: {saw:?}"
    );
    // Nothing older than the follow's initial finalized blocks: the client's view never went
    // further back than a new follow of the node itself shows.
    if let Some(lowest) = saw.lowest_replayed {
        assert!(
            finalized.number - lowest < 16,
            "only the follow's initial finalized blocks come at or below the finalized one: \
             {saw:?}"
        );
    }
}
