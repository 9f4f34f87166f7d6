//! Per-key lanes: the one scheduler behind every consumer (the delivery
//! engine of the broker transports and the in-process groups).
//!
//! Events of one key run one at a time in arrival order, also across
//! retries: the first event of a key owns it until it is settled for good,
//! and later events of the key wait in its lane. Events of other keys, and
//! events without a key, are ready at once. A retry keeps its key while it
//! waits for its time, so no later event of the key overtakes it.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::BuildHasher;

use tokio::time::Instant;

use crate::envelope::Envelope;

/// Something scheduled in [`Lanes`]: it knows its lane key.
pub(crate) trait Laned {
    /// The lane, or `None` for an event that waits for no other.
    fn key(&self) -> Option<u64>;
}

/// The lane key of an envelope: its partition key's hash when the
/// subscription orders by key.
pub(crate) fn lane_key(
    hasher: &impl BuildHasher,
    ordered: bool,
    envelope: &Envelope,
) -> Option<u64> {
    if !ordered {
        return None;
    }
    let key = envelope.attributes().partition_key.as_deref()?;
    Some(hasher.hash_one(key))
}

/// Ready, waiting and delayed items of one subscription.
pub(crate) struct Lanes<I> {
    /// May run now (and own their key, if any).
    ready: VecDeque<I>,
    /// Busy keys, with the items waiting behind their owner.
    waiting: HashMap<u64, VecDeque<I>>,
    /// Retries waiting for their time (they own their key).
    delayed: BTreeMap<(Instant, u64), I>,
    /// Tie-break of `delayed`.
    seq: u64,
}

impl<I> Default for Lanes<I> {
    fn default() -> Self {
        Self {
            ready: VecDeque::new(),
            waiting: HashMap::new(),
            delayed: BTreeMap::new(),
            seq: 0,
        }
    }
}

impl<I: Laned> Lanes<I> {
    /// A new item: ready if its key is free (it then owns it; true), else
    /// it waits behind the key's owner (false).
    pub(crate) fn push(&mut self, item: I) -> bool {
        if let Some(key) = item.key() {
            match self.waiting.entry(key) {
                Entry::Vacant(slot) => {
                    slot.insert(VecDeque::new());
                }
                Entry::Occupied(mut lane) => {
                    lane.get_mut().push_back(item);
                    return false;
                }
            }
        }
        self.ready.push_back(item);
        true
    }

    /// The next item that may run.
    pub(crate) fn pop(&mut self) -> Option<I> {
        self.ready.pop_front()
    }

    /// Whether an item may run now.
    pub(crate) fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// The owner of `key` is settled for good: the next item of its lane
    /// becomes ready (true) or the key is free.
    pub(crate) fn release(&mut self, key: Option<u64>) -> bool {
        let Some(key) = key else { return false };
        if let Entry::Occupied(mut lane) = self.waiting.entry(key) {
            match lane.get_mut().pop_front() {
                Some(next) => {
                    self.ready.push_back(next);
                    return true;
                }
                None => {
                    lane.remove();
                }
            }
        }
        false
    }

    /// Holds an item (keeping its key) until `at`.
    pub(crate) fn delay(&mut self, at: Instant, item: I) {
        self.seq += 1;
        self.delayed.insert((at, self.seq), item);
    }

    /// When the first delayed item is due.
    pub(crate) fn next_due(&self) -> Option<Instant> {
        self.delayed.keys().next().map(|(at, _)| *at)
    }

    /// Makes the items due by `now` ready, ahead of the others (they waited
    /// longest); returns how many.
    pub(crate) fn due(&mut self, now: Instant) -> usize {
        let mut moved = 0;
        while let Some(entry) = self.delayed.first_entry() {
            if entry.key().0 > now {
                break;
            }
            self.ready.push_front(entry.remove());
            moved += 1;
        }
        moved
    }

    /// Takes every item out: ready, delayed, then waiting.
    pub(crate) fn drain(&mut self) -> impl Iterator<Item = I> + '_ {
        self.ready
            .drain(..)
            .chain(std::mem::take(&mut self.delayed).into_values())
            .chain(self.waiting.drain().flat_map(|(_, lane)| lane))
    }

    /// Keeps the items for which `keep` is true; an owner dropped frees its
    /// key for the next item of its lane.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&I) -> bool) {
        for lane in self.waiting.values_mut() {
            lane.retain(&mut keep);
        }
        let mut freed = Vec::new();
        let mut owner = |item: &I| {
            let kept = keep(item);
            if !kept {
                freed.push(item.key());
            }
            kept
        };
        self.ready.retain(&mut owner);
        self.delayed.retain(|_, item| owner(item));
        for key in freed {
            self.release(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct It(Option<u64>, u32);

    impl Laned for It {
        fn key(&self) -> Option<u64> {
            self.0
        }
    }

    #[test]
    fn a_key_runs_one_at_a_time_in_order_and_others_go_on() {
        let mut lanes = Lanes::default();
        lanes.push(It(Some(1), 1));
        lanes.push(It(Some(1), 2));
        lanes.push(It(Some(2), 3));
        lanes.push(It(None, 4));
        assert_eq!(lanes.pop(), Some(It(Some(1), 1)));
        assert_eq!(lanes.pop(), Some(It(Some(2), 3)));
        assert_eq!(lanes.pop(), Some(It(None, 4)));
        assert_eq!(lanes.pop(), None);
        assert!(lanes.release(Some(1)));
        assert_eq!(lanes.pop(), Some(It(Some(1), 2)));
        assert!(!lanes.release(Some(1)));
        lanes.push(It(Some(1), 5));
        assert_eq!(lanes.pop(), Some(It(Some(1), 5)));
    }

    #[test]
    fn a_delayed_owner_keeps_its_key_until_due() {
        let mut lanes = Lanes::default();
        let now = Instant::now();
        lanes.push(It(Some(1), 1));
        let first = lanes.pop().unwrap();
        lanes.push(It(Some(1), 2));
        lanes.push(It(None, 3));
        lanes.delay(now + std::time::Duration::from_secs(1), first);
        assert_eq!(lanes.due(now), 0);
        assert_eq!(lanes.pop(), Some(It(None, 3)));
        assert_eq!(lanes.pop(), None);
        assert_eq!(lanes.due(now + std::time::Duration::from_secs(1)), 1);
        assert_eq!(lanes.pop(), Some(It(Some(1), 1)));
        assert!(lanes.release(Some(1)));
        assert_eq!(lanes.pop(), Some(It(Some(1), 2)));
    }

    #[test]
    fn dropping_an_owner_frees_its_key() {
        let mut lanes = Lanes::default();
        lanes.push(It(Some(1), 1));
        lanes.push(It(Some(1), 2));
        lanes.push(It(Some(1), 3));
        lanes.retain(|it| it.1 != 1 && it.1 != 2);
        assert_eq!(lanes.pop(), Some(It(Some(1), 3)));
        assert_eq!(lanes.drain().count(), 0);
    }
}
