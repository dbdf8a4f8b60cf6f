//! chainHead bookkeeping, after polkadot-sdk's `chain_head/subscription/inner.rs` and
//! `common/connections.rs`: which follow subscriptions each connection holds, which blocks each
//! subscription has pinned (and the node-wide pin limit that stops subscriptions), and the
//! operations each one has running.
//!
//! A block is registered twice per subscription, once when it is announced (`initialized` or
//! `newBlock`) and once when it is finalized; `chainHead_v1_unpin` may come before or after the
//! second, and the block leaves the subscription once both happened, as in Substrate.

use std::collections::{HashMap, HashSet, hash_map::Entry};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use jsonrpsee::ConnectionId;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::super::clock::BlockNumber;
use super::super::primitives::Hash32;
use super::ChainHeadLimits;
use super::events::FollowEvent;

/// Operation events waiting to be sent on one follow subscription (`BUF_CAP_PER_SUBSCRIPTION`).
const RESPONSES_PER_SUBSCRIPTION: usize = 16;

/// Why a block could not be pinned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinError {
    /// The subscription is gone (stopped, or never existed).
    SubscriptionAbsent,
    /// The node-wide pin limit is reached and this subscription was stopped to make room.
    ExceededLimits,
}

/// Why `chainHead_v1_unpin` unpinned nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnpinError {
    SubscriptionAbsent,
    /// A hash is not pinned by the subscription (never announced, or already unpinned).
    BlockHashAbsent,
    DuplicateHashes,
}

/// Why an operation (or `chainHead_v1_header`) could not use a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockError {
    SubscriptionAbsent,
    BlockHashAbsent,
    /// Every operation slot of the subscription is taken.
    ExceededLimits,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PinState {
    /// Announced or finalized, not both; not unpinned.
    Registered,
    /// Announced and finalized; not unpinned.
    FullyRegistered,
    /// Registered once, then unpinned: the second registration removes it.
    Unpinned,
}

struct PinnedBlock {
    number: BlockNumber,
    state: PinState,
    pinned_at: Instant,
}

/// The running operations of one subscription: at most `max_ongoing_operations` at once.
struct Operations {
    next_id: u64,
    permits: Arc<Semaphore>,
    running: Arc<Mutex<HashMap<String, CancellationToken>>>,
}

impl Operations {
    fn new(max_operations: usize) -> Self {
        Self {
            next_id: 0,
            permits: Arc::new(Semaphore::new(max_operations)),
            running: Arc::default(),
        }
    }

    /// Reserves between one and `wanted` operation slots; none free is `None`.
    fn start(&mut self, wanted: usize) -> Option<Operation> {
        let slots = self.permits.available_permits().min(wanted);
        if slots == 0 {
            return None;
        }
        let permit = self
            .permits
            .clone()
            .try_acquire_many_owned(u32::try_from(slots).ok()?)
            .ok()?;
        let id = self.next_id.to_string();
        self.next_id += 1;
        let cancel = CancellationToken::new();
        lock(&self.running).insert(id.clone(), cancel.clone());
        Some(Operation {
            id,
            cancel,
            running: self.running.clone(),
            _permit: permit,
        })
    }
}

/// A running operation; dropping it frees its slots.
pub struct Operation {
    pub id: String,
    /// Cancelled by `chainHead_v1_stopOperation`.
    pub cancel: CancellationToken,
    running: Arc<Mutex<HashMap<String, CancellationToken>>>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Operation {
    fn drop(&mut self) {
        lock(&self.running).remove(&self.id);
    }
}

/// A pinned block an operation may use, with the operation's slot.
pub struct BlockLock {
    pub number: BlockNumber,
    pub with_runtime: bool,
    /// Where the operation's events go: the follow subscription sends them.
    pub responses: mpsc::Sender<FollowEvent>,
    pub operation: Operation,
}

struct Follow {
    with_runtime: bool,
    /// Tells the follow task to send `stop` and end.
    stop: Option<oneshot::Sender<()>>,
    responses: mpsc::Sender<FollowEvent>,
    blocks: HashMap<Hash32, PinnedBlock>,
    operations: Operations,
}

impl Follow {
    fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// True the first time `hash` is registered.
    fn register_block(&mut self, hash: Hash32, number: BlockNumber) -> bool {
        match self.blocks.entry(hash) {
            Entry::Occupied(mut occupied) => {
                match occupied.get().state {
                    PinState::Registered => occupied.get_mut().state = PinState::FullyRegistered,
                    PinState::Unpinned => {
                        occupied.remove();
                    }
                    PinState::FullyRegistered => {}
                }
                false
            }
            Entry::Vacant(vacant) => {
                vacant.insert(PinnedBlock {
                    number,
                    state: PinState::Registered,
                    pinned_at: Instant::now(),
                });
                true
            }
        }
    }

    fn contains_block(&self, hash: &Hash32) -> bool {
        self.blocks
            .get(hash)
            .is_some_and(|block| block.state != PinState::Unpinned)
    }

    fn oldest_pin(&self) -> Instant {
        self.blocks
            .values()
            .map(|block| block.pinned_at)
            .min()
            .unwrap_or_else(Instant::now)
    }
}

/// A connection's follow subscriptions: slots reserved (while a follow is being set up) and the
/// subscription ids registered in them.
#[derive(Default)]
struct ConnectionFollows {
    reserved: usize,
    ids: HashSet<String>,
}

#[derive(Default)]
struct Inner {
    connections: HashMap<ConnectionId, ConnectionFollows>,
    follows: HashMap<String, Follow>,
    /// How many subscriptions pin each block; its size is what the node-wide limit counts.
    pinned: HashMap<Hash32, usize>,
}

impl Inner {
    fn remove_follow(&mut self, id: &str) {
        let Some(mut follow) = self.follows.remove(id) else {
            return;
        };
        follow.stop();
        for (hash, block) in &follow.blocks {
            if block.state != PinState::Unpinned {
                self.unpin_globally(hash);
            }
        }
    }

    fn unpin_globally(&mut self, hash: &Hash32) {
        if let Entry::Occupied(mut count) = self.pinned.entry(*hash) {
            *count.get_mut() -= 1;
            if *count.get() == 0 {
                count.remove();
            }
        }
    }

    /// Makes room for one more pinned block when the node-wide limit is reached: stops every
    /// subscription holding a block longer than `max_pinned_duration`, then, if that freed
    /// nothing, every subscription. True when `requester` was among them.
    fn ensure_block_space(&mut self, limits: &ChainHeadLimits, requester: &str) -> bool {
        if self.pinned.len() < limits.max_pinned_blocks {
            return false;
        }
        let now = Instant::now();
        let overdue: Vec<String> = self
            .follows
            .iter()
            .filter(|(_, follow)| {
                now.checked_duration_since(follow.oldest_pin())
                    .is_none_or(|held| held > limits.max_pinned_duration)
            })
            .map(|(id, _)| id.clone())
            .collect();
        let mut requester_stopped = false;
        for id in overdue {
            requester_stopped |= id == requester;
            self.remove_follow(&id);
        }
        if self.pinned.len() < limits.max_pinned_blocks {
            return requester_stopped;
        }
        let all: Vec<String> = self.follows.keys().cloned().collect();
        for id in all {
            requester_stopped |= id == requester;
            self.remove_follow(&id);
        }
        requester_stopped
    }
}

/// Every follow subscription of one node.
pub struct Subscriptions {
    limits: ChainHeadLimits,
    inner: Mutex<Inner>,
}

impl Subscriptions {
    pub fn new(limits: ChainHeadLimits) -> Self {
        Self {
            limits,
            inner: Mutex::default(),
        }
    }

    pub fn limits(&self) -> &ChainHeadLimits {
        &self.limits
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        lock(&self.inner)
    }

    /// Takes one of the connection's follow slots; `None` when all are taken.
    pub fn reserve_follow(self: &Arc<Self>, connection: ConnectionId) -> Option<FollowSlot> {
        let mut inner = self.lock();
        let entry = inner.connections.entry(connection).or_default();
        if entry.reserved >= self.limits.max_follow_subscriptions_per_connection {
            return None;
        }
        entry.reserved += 1;
        Some(FollowSlot {
            subscriptions: self.clone(),
            connection,
            id: None,
        })
    }

    /// Whether `id` is a follow subscription of `connection` (the chainHead methods only act
    /// on the caller's own subscriptions).
    pub fn contains_follow(&self, connection: ConnectionId, id: &str) -> bool {
        self.lock()
            .connections
            .get(&connection)
            .is_some_and(|follows| follows.ids.contains(id))
    }

    /// Pins `hash` for the subscription. `Ok(false)`: it was pinned already.
    pub fn pin_block(&self, id: &str, hash: Hash32, number: BlockNumber) -> Result<bool, PinError> {
        let mut inner = self.lock();
        let follow = inner
            .follows
            .get_mut(id)
            .ok_or(PinError::SubscriptionAbsent)?;
        if !follow.register_block(hash, number) {
            return Ok(false);
        }
        if !inner.pinned.contains_key(&hash) && inner.ensure_block_space(&self.limits, id) {
            return Err(PinError::ExceededLimits);
        }
        *inner.pinned.entry(hash).or_default() += 1;
        Ok(true)
    }

    /// Unpins all of `hashes` or, on error, none of them.
    pub fn unpin_blocks(&self, id: &str, hashes: &[Hash32]) -> Result<(), UnpinError> {
        let mut unique = HashSet::new();
        if !hashes.iter().all(|hash| unique.insert(*hash)) {
            return Err(UnpinError::DuplicateHashes);
        }
        let mut inner = self.lock();
        let follow = inner
            .follows
            .get_mut(id)
            .ok_or(UnpinError::SubscriptionAbsent)?;
        if !hashes.iter().all(|hash| follow.contains_block(hash)) {
            return Err(UnpinError::BlockHashAbsent);
        }
        for hash in hashes {
            if let Entry::Occupied(mut block) = follow.blocks.entry(*hash) {
                match block.get().state {
                    PinState::Registered => block.get_mut().state = PinState::Unpinned,
                    PinState::FullyRegistered => {
                        block.remove();
                    }
                    PinState::Unpinned => {}
                }
            }
        }
        for hash in hashes {
            inner.unpin_globally(hash);
        }
        Ok(())
    }

    /// A pinned block and an operation slot for `wanted` items (at least one is reserved).
    pub fn lock_block(
        &self,
        id: &str,
        hash: &Hash32,
        wanted: usize,
    ) -> Result<BlockLock, LockError> {
        let mut inner = self.lock();
        let follow = inner
            .follows
            .get_mut(id)
            .ok_or(LockError::SubscriptionAbsent)?;
        let number = follow
            .blocks
            .get(hash)
            .filter(|block| block.state != PinState::Unpinned)
            .map(|block| block.number)
            .ok_or(LockError::BlockHashAbsent)?;
        let operation = follow
            .operations
            .start(wanted)
            .ok_or(LockError::ExceededLimits)?;
        Ok(BlockLock {
            number,
            with_runtime: follow.with_runtime,
            responses: follow.responses.clone(),
            operation,
        })
    }

    /// Whether `operation` is still running on the subscription.
    pub fn has_operation(&self, id: &str, operation: &str) -> bool {
        self.lock()
            .follows
            .get(id)
            .is_some_and(|follow| lock(&follow.operations.running).contains_key(operation))
    }

    /// Interrupts a running operation; nothing if it is not running.
    pub fn stop_operation(&self, id: &str, operation: &str) {
        let inner = self.lock();
        if let Some(follow) = inner.follows.get(id)
            && let Some(cancel) = lock(&follow.operations.running).remove(operation)
        {
            cancel.cancel();
        }
    }

    /// Stops every follow subscription of the node.
    pub fn stop_all(&self) {
        let mut inner = self.lock();
        let all: Vec<String> = inner.follows.keys().cloned().collect();
        for id in all {
            inner.remove_follow(&id);
        }
    }

    /// Blocks pinned across all subscriptions.
    #[cfg(test)]
    fn pinned_blocks(&self) -> usize {
        self.lock().pinned.len()
    }
}

/// The channels of a registered follow subscription.
pub struct FollowChannels {
    /// Fires when the node stops the subscription (pin limit).
    pub stop: oneshot::Receiver<()>,
    /// Events of the subscription's operations.
    pub responses: mpsc::Receiver<FollowEvent>,
}

/// A reserved follow slot of one connection; once registered, the subscription itself.
/// Dropping it removes the subscription (unpinning its blocks) and frees the slot.
pub struct FollowSlot {
    subscriptions: Arc<Subscriptions>,
    connection: ConnectionId,
    id: Option<String>,
}

impl FollowSlot {
    /// Registers the accepted subscription; `None` if the id is taken (never, with random ids).
    pub fn register(&mut self, id: String, with_runtime: bool) -> Option<FollowChannels> {
        let mut inner = self.subscriptions.lock();
        let Entry::Vacant(vacant) = inner.follows.entry(id.clone()) else {
            return None;
        };
        let (stop, stop_rx) = oneshot::channel();
        let (responses, responses_rx) = mpsc::channel(RESPONSES_PER_SUBSCRIPTION);
        vacant.insert(Follow {
            with_runtime,
            stop: Some(stop),
            responses,
            blocks: HashMap::new(),
            operations: Operations::new(self.subscriptions.limits.max_ongoing_operations),
        });
        inner
            .connections
            .entry(self.connection)
            .or_default()
            .ids
            .insert(id.clone());
        self.id = Some(id);
        Some(FollowChannels {
            stop: stop_rx,
            responses: responses_rx,
        })
    }

    /// Stops every follow subscription of the node (the chain is too far from finality to
    /// follow).
    pub fn stop_all(&self) {
        self.subscriptions.stop_all();
    }
}

impl Drop for FollowSlot {
    fn drop(&mut self) {
        let mut inner = self.subscriptions.lock();
        if let Some(id) = &self.id {
            inner.remove_follow(id);
        }
        if let Entry::Occupied(mut follows) = inner.connections.entry(self.connection) {
            let follows_mut = follows.get_mut();
            follows_mut.reserved = follows_mut.reserved.saturating_sub(1);
            if let Some(id) = &self.id {
                follows_mut.ids.remove(id);
            }
            if follows_mut.reserved == 0 {
                follows.remove();
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update here completes under the lock; a panic elsewhere leaves the data usable.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn limits(max_pinned_blocks: usize) -> ChainHeadLimits {
        ChainHeadLimits {
            max_pinned_blocks,
            ..ChainHeadLimits::default()
        }
    }

    fn hash(number: BlockNumber) -> Hash32 {
        let mut bytes = [0; 32];
        bytes[..4].copy_from_slice(&number.to_le_bytes());
        Hash32(bytes)
    }

    fn follow(
        subscriptions: &Arc<Subscriptions>,
        connection: usize,
        id: &str,
    ) -> (FollowSlot, FollowChannels) {
        let mut slot = subscriptions
            .reserve_follow(ConnectionId(connection))
            .expect("a free slot");
        let channels = slot.register(id.into(), true).expect("new id");
        (slot, channels)
    }

    #[test]
    fn a_connection_holds_at_most_four_follows_and_gets_its_slot_back() {
        let subscriptions = Arc::new(Subscriptions::new(ChainHeadLimits::default()));
        let slots: Vec<FollowSlot> = (0..4)
            .map(|_| subscriptions.reserve_follow(ConnectionId(1)).expect("slot"))
            .collect();
        assert!(subscriptions.reserve_follow(ConnectionId(1)).is_none());
        assert!(
            subscriptions.reserve_follow(ConnectionId(2)).is_some(),
            "per connection"
        );
        drop(slots);
        assert!(subscriptions.reserve_follow(ConnectionId(1)).is_some());
    }

    #[test]
    fn follows_are_only_visible_to_their_own_connection() {
        let subscriptions = Arc::new(Subscriptions::new(ChainHeadLimits::default()));
        let (slot, _channels) = follow(&subscriptions, 1, "a");
        assert!(subscriptions.contains_follow(ConnectionId(1), "a"));
        assert!(!subscriptions.contains_follow(ConnectionId(2), "a"));
        drop(slot);
        assert!(!subscriptions.contains_follow(ConnectionId(1), "a"));
    }

    #[test]
    fn a_block_leaves_after_both_registrations_and_one_unpin_in_any_order() {
        let subscriptions = Arc::new(Subscriptions::new(ChainHeadLimits::default()));
        let (_slot, _channels) = follow(&subscriptions, 1, "a");
        assert_eq!(subscriptions.pin_block("a", hash(1), 1), Ok(true));
        assert_eq!(
            subscriptions.pin_block("a", hash(1), 1),
            Ok(false),
            "finalized"
        );
        assert_eq!(subscriptions.unpin_blocks("a", &[hash(1)]), Ok(()));
        assert_eq!(
            subscriptions.unpin_blocks("a", &[hash(1)]),
            Err(UnpinError::BlockHashAbsent)
        );
        // Unpinned before it is finalized: finalization does not pin it again.
        assert_eq!(subscriptions.pin_block("a", hash(2), 2), Ok(true));
        assert_eq!(subscriptions.unpin_blocks("a", &[hash(2)]), Ok(()));
        assert_eq!(subscriptions.pinned_blocks(), 0);
        assert_eq!(subscriptions.pin_block("a", hash(2), 2), Ok(false));
        assert_eq!(subscriptions.pinned_blocks(), 0);
        assert_eq!(
            subscriptions.lock_block("a", &hash(2), 1).err(),
            Some(LockError::BlockHashAbsent)
        );
    }

    #[test]
    fn unpin_is_all_or_nothing() {
        let subscriptions = Arc::new(Subscriptions::new(ChainHeadLimits::default()));
        let (_slot, _channels) = follow(&subscriptions, 1, "a");
        subscriptions.pin_block("a", hash(1), 1).expect("pins");
        assert_eq!(
            subscriptions.unpin_blocks("a", &[hash(1), hash(9)]),
            Err(UnpinError::BlockHashAbsent)
        );
        assert_eq!(
            subscriptions.unpin_blocks("a", &[hash(1), hash(1)]),
            Err(UnpinError::DuplicateHashes)
        );
        assert_eq!(subscriptions.pinned_blocks(), 1);
        assert_eq!(
            subscriptions.unpin_blocks("gone", &[hash(1)]),
            Err(UnpinError::SubscriptionAbsent)
        );
    }

    #[test]
    fn reaching_the_pin_limit_stops_the_subscriptions_and_unpins_their_blocks() {
        let subscriptions = Arc::new(Subscriptions::new(limits(3)));
        let (_slot_a, mut channels_a) = follow(&subscriptions, 1, "a");
        let (_slot_b, mut channels_b) = follow(&subscriptions, 2, "b");
        for number in 1..=3 {
            assert_eq!(subscriptions.pin_block("a", hash(number), number), Ok(true));
        }
        assert_eq!(
            subscriptions.pin_block("b", hash(3), 3),
            Ok(true),
            "shared block"
        );
        // None is older than a minute, so every subscription is stopped.
        assert_eq!(
            subscriptions.pin_block("b", hash(4), 4),
            Err(PinError::ExceededLimits)
        );
        assert_eq!(channels_a.stop.try_recv(), Ok(()));
        assert_eq!(channels_b.stop.try_recv(), Ok(()));
        assert_eq!(subscriptions.pinned_blocks(), 0);
        assert_eq!(
            subscriptions.pin_block("a", hash(5), 5),
            Err(PinError::SubscriptionAbsent)
        );
    }

    #[test]
    fn the_pin_limit_stops_only_subscriptions_holding_blocks_too_long_when_that_is_enough() {
        let subscriptions = Arc::new(Subscriptions::new(ChainHeadLimits {
            max_pinned_blocks: 2,
            max_pinned_duration: Duration::from_millis(20),
            ..ChainHeadLimits::default()
        }));
        let (_slot_a, mut channels_a) = follow(&subscriptions, 1, "a");
        let (_slot_b, mut channels_b) = follow(&subscriptions, 1, "b");
        subscriptions.pin_block("a", hash(1), 1).expect("pins");
        subscriptions.pin_block("a", hash(2), 2).expect("pins");
        // Ages a's pins past the limit (the limit is about time: nothing else to wait for).
        std::thread::sleep(Duration::from_millis(30));
        // b's only block is new, so only a is overdue; its two blocks make room.
        assert_eq!(subscriptions.pin_block("b", hash(3), 3), Ok(true));
        assert_eq!(channels_a.stop.try_recv(), Ok(()));
        assert!(channels_b.stop.try_recv().is_err(), "b keeps following");
    }

    #[test]
    fn operations_are_limited_per_subscription_and_freed_when_done() {
        let subscriptions = Arc::new(Subscriptions::new(ChainHeadLimits {
            max_ongoing_operations: 2,
            ..ChainHeadLimits::default()
        }));
        let (_slot, _channels) = follow(&subscriptions, 1, "a");
        subscriptions.pin_block("a", hash(1), 1).expect("pins");
        let first = subscriptions.lock_block("a", &hash(1), 1).expect("slot");
        let second = subscriptions
            .lock_block("a", &hash(1), 5)
            .expect("the last slot");
        assert_eq!(
            (first.operation.id.as_str(), second.operation.id.as_str()),
            ("0", "1")
        );
        assert_eq!(
            subscriptions.lock_block("a", &hash(1), 1).err(),
            Some(LockError::ExceededLimits)
        );
        assert!(subscriptions.has_operation("a", "1"));
        subscriptions.stop_operation("a", "1");
        assert!(second.operation.cancel.is_cancelled());
        assert!(!subscriptions.has_operation("a", "1"));
        drop(second);
        assert!(subscriptions.lock_block("a", &hash(1), 1).is_ok());
    }
}
