//! One `chainHead_v1_follow` subscription, after polkadot-sdk's `chain_head_follow.rs`: the
//! `initialized` event with up to 16 finalized blocks, a `newBlock` for each block above the
//! finalized one and a `bestBlockChanged`; then, as the node's heads move, `newBlock` and
//! `bestBlockChanged` for every new best block and `finalized` for every newly finalized run;
//! the subscription's operation events in between; and `stop` when it ends.
//!
//! sim-node's chain has no forks, so nothing is ever pruned. When the head jumps further than
//! `max_lagging_distance` at once (a node catching up after falling behind) the subscription
//! gets `stop`, as Substrate stops one that would have a gap.
//!
//! One departure from a real node: the first block of each hash segment (every 2048 blocks, see
//! `chain`) names a stand-in link as its parent hash, which sim-node resolves to the previous
//! block everywhere. `newBlock` gives that block's own hash as `parentBlockHash`, so clients see
//! an unbroken chain; only that block's header (`chainHead_v1_header`) names the link.

use std::collections::VecDeque;
use std::sync::Arc;

use jsonrpsee::types::SubscriptionId;
use jsonrpsee::{PendingSubscriptionSink, SubscriptionMessage, SubscriptionSink};

use super::super::clock::BlockNumber;
use super::super::primitives::Hash32;
use super::super::rpc_errors;
use super::super::state::{Heads, NodeState};
use super::events::{FollowEvent, RuntimeEvent};
use super::subscriptions::{FollowChannels, PinError, Subscriptions};

/// Finalized blocks reported by `initialized` (`MAX_FINALIZED_BLOCKS`).
const MAX_FINALIZED_BLOCKS: BlockNumber = 16;

/// Why a subscription ended with `stop`.
#[derive(Debug)]
enum FollowEnd {
    /// The node stopped it (pin limit) or could not pin a block for it.
    Stopped,
    /// The head jumped too far to announce every block in between.
    Gap,
    /// Best and finalized are too far apart to report every block in between.
    DistanceTooLarge,
    /// The client went away (unfollowed or disconnected).
    Closed,
}

impl From<PinError> for FollowEnd {
    fn from(_: PinError) -> Self {
        FollowEnd::Stopped
    }
}

/// Runs one follow subscription to its end.
pub async fn follow(
    pending: PendingSubscriptionSink,
    node: Arc<NodeState>,
    subscriptions: Arc<Subscriptions>,
    with_runtime: bool,
) {
    let Some(mut slot) = subscriptions.reserve_follow(pending.connection_id()) else {
        pending.reject(rpc_errors::follow_limit_reached()).await;
        return;
    };
    let Ok(sink) = pending.accept().await else {
        return;
    };
    let id = subscription_id_text(&sink.subscription_id());
    let Some(channels) = slot.register(id.clone(), with_runtime) else {
        let _ = send(&sink, &FollowEvent::Stop).await;
        return;
    };
    let mut follower = Follower {
        node,
        subscriptions,
        id,
        with_runtime,
        best: 0,
        finalized: 0,
    };
    let end = follower.run(&sink, channels).await;
    tracing::debug!(subscription = %follower.id, ?end, "chainHead_v1_follow ended");
    // Sent at every end, as Substrate does; it goes nowhere when the client left.
    let _ = send(&sink, &FollowEvent::Stop).await;
    if let FollowEnd::DistanceTooLarge = end {
        slot.stop_all();
    }
}

struct Follower {
    node: Arc<NodeState>,
    subscriptions: Arc<Subscriptions>,
    id: String,
    with_runtime: bool,
    /// The last block announced as best.
    best: BlockNumber,
    /// The last block announced as finalized.
    finalized: BlockNumber,
}

impl Follower {
    async fn run(&mut self, sink: &SubscriptionSink, channels: FollowChannels) -> FollowEnd {
        let FollowChannels {
            mut stop,
            mut responses,
        } = channels;
        let mut heads = self.node.subscribe_heads();
        heads.mark_unchanged();
        let initial = match self.initial_events(self.node.heads()) {
            Ok(events) => events,
            Err(end) => return end,
        };
        if let Err(end) = send_all(sink, &initial).await {
            return end;
        }
        loop {
            let events = tokio::select! {
                _ = &mut stop => return FollowEnd::Stopped,
                () = sink.closed() => return FollowEnd::Closed,
                Some(event) = responses.recv() => vec![event],
                changed = heads.changed() => {
                    if changed.is_err() {
                        return FollowEnd::Closed;
                    }
                    let now = *heads.borrow_and_update();
                    // An unresponsive node announces nothing; it catches up once it answers.
                    if self.node.faults().unresponsive {
                        continue;
                    }
                    // What was announced before a gap or a failed pin still goes out, as a
                    // node sends each block's events as it imports it.
                    let mut events = Vec::new();
                    let moved = self.head_events(now, &mut events);
                    if let Err(end) = send_all(sink, &events).await {
                        return end;
                    }
                    match moved {
                        Ok(()) => continue,
                        Err(end) => return end,
                    }
                }
            };
            if let Err(end) = send_all(sink, &events).await {
                return end;
            }
        }
    }

    fn hash(&self, number: BlockNumber) -> Hash32 {
        self.node.chain.block_hash(number)
    }

    /// The hash of block `number`'s parent: the previous block's own hash, also where the header
    /// names a segment link (see the module doc); none for genesis.
    fn parent(&self, number: BlockNumber) -> Option<Hash32> {
        number.checked_sub(1).map(|parent| self.hash(parent))
    }

    fn pin(&self, number: BlockNumber) -> Result<Hash32, PinError> {
        let hash = self.hash(number);
        self.subscriptions.pin_block(&self.id, hash, number)?;
        Ok(hash)
    }

    fn new_runtime(&self) -> Option<Option<RuntimeEvent>> {
        // One runtime for the whole chain: never a new one.
        self.with_runtime.then_some(None)
    }

    fn initial_events(&mut self, heads: Heads) -> Result<Vec<FollowEvent>, FollowEnd> {
        let Heads { best, finalized } = heads;
        if best - finalized > self.subscriptions.limits().max_lagging_distance {
            return Err(FollowEnd::DistanceTooLarge);
        }
        // The blocks above the finalized one first, then the finalized block and its ancestors,
        // as far back as the parent links go and pinning succeeds.
        for number in finalized + 1..=best {
            self.pin(number)?;
        }
        let mut finalized_hashes = VecDeque::from([self.pin(finalized)?]);
        let mut oldest = finalized;
        while (finalized_hashes.len() as BlockNumber) < MAX_FINALIZED_BLOCKS && oldest > 0 {
            let Ok(hash) = self.pin(oldest - 1) else {
                break;
            };
            finalized_hashes.push_front(hash);
            oldest -= 1;
        }
        let finalized_block_runtime = self.with_runtime.then(|| RuntimeEvent::Valid {
            spec: self.node.runtime.chain_head_spec(),
        });
        let mut events = vec![FollowEvent::Initialized {
            finalized_block_hashes: finalized_hashes.into(),
            finalized_block_runtime,
        }];
        for number in finalized + 1..=best {
            let parent_block_hash = self.parent(number).ok_or(FollowEnd::Gap)?;
            events.push(FollowEvent::NewBlock {
                block_hash: self.hash(number),
                parent_block_hash,
                new_runtime: self.new_runtime(),
            });
        }
        events.push(FollowEvent::BestBlockChanged {
            best_block_hash: self.hash(best),
        });
        self.best = best;
        self.finalized = finalized;
        Ok(events)
    }

    /// Adds the events for heads that moved to `events`. Heads that moved back (the `behind`
    /// fault) are not announced: the blocks are announced again only once the head passes them.
    fn head_events(
        &mut self,
        heads: Heads,
        events: &mut Vec<FollowEvent>,
    ) -> Result<(), FollowEnd> {
        if heads.best > self.best {
            if heads.best - self.best > self.subscriptions.limits().max_lagging_distance {
                return Err(FollowEnd::Gap);
            }
            for number in self.best + 1..=heads.best {
                let parent_block_hash = self.parent(number).ok_or(FollowEnd::Gap)?;
                let block_hash = self.pin(number)?;
                events.push(FollowEvent::NewBlock {
                    block_hash,
                    parent_block_hash,
                    new_runtime: self.new_runtime(),
                });
                events.push(FollowEvent::BestBlockChanged {
                    best_block_hash: block_hash,
                });
                self.best = number;
            }
        }
        let finalized = heads.finalized.min(self.best);
        if finalized > self.finalized {
            let finalized_block_hashes = (self.finalized + 1..=finalized)
                .map(|number| self.pin(number))
                .collect::<Result<Vec<_>, _>>()?;
            events.push(FollowEvent::Finalized {
                finalized_block_hashes,
                pruned_block_hashes: Vec::new(),
            });
            self.finalized = finalized;
        }
        Ok(())
    }
}

fn subscription_id_text(id: &SubscriptionId<'_>) -> String {
    match id {
        SubscriptionId::Num(number) => number.to_string(),
        SubscriptionId::Str(text) => text.to_string(),
    }
}

async fn send(sink: &SubscriptionSink, event: &FollowEvent) -> Result<(), FollowEnd> {
    let message = serde_json::value::to_raw_value(event)
        .map(SubscriptionMessage::from)
        .map_err(|_| FollowEnd::Closed)?;
    sink.send(message).await.map_err(|_| FollowEnd::Closed)
}

async fn send_all(sink: &SubscriptionSink, events: &[FollowEvent]) -> Result<(), FollowEnd> {
    for event in events {
        send(sink, event).await?;
    }
    Ok(())
}
