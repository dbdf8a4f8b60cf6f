//! Counted places: open connections per client address, open WebSocket connections per API
//! key. A place is taken with [`Slots::claim`] and given back when its [`Slot`] drops.

use std::{
    collections::HashMap,
    hash::Hash,
    sync::{Arc, Mutex},
};

/// Open places per holder.
pub struct Slots<K> {
    open: Mutex<HashMap<K, u32>>,
}

impl<K> Default for Slots<K> {
    fn default() -> Self {
        Slots {
            open: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Hash + Eq + Copy> Slots<K> {
    /// A place for one more of `holder`'s, unless it holds `max` already.
    pub fn claim(self: &Arc<Self>, holder: K, max: u32) -> Option<Slot<K>> {
        let mut open = self.lock();
        let count = open.entry(holder).or_insert(0);
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(Slot {
            slots: self.clone(),
            holder,
        })
    }

    /// The map holds no invariant a panicking holder could break.
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, u32>> {
        self.open
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// One taken place; given back when dropped.
pub struct Slot<K: Hash + Eq + Copy> {
    slots: Arc<Slots<K>>,
    holder: K,
}

impl<K: Hash + Eq + Copy> Drop for Slot<K> {
    fn drop(&mut self) {
        let mut open = self.slots.lock();
        if let Some(count) = open.get_mut(&self.holder) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.holder);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_given_back() {
        let slots = Arc::new(Slots::default());
        let first = slots.claim('a', 2).expect("room");
        let second = slots.claim('a', 2).expect("room");
        assert!(slots.claim('a', 2).is_none());
        assert!(slots.claim('b', 2).is_some(), "holders are counted apart");
        drop(first);
        let third = slots.claim('a', 2).expect("a place was given back");
        drop((second, third));
        assert!(slots.lock().is_empty(), "no holder is kept without places");
    }
}
