//! Shared pieces of the Seambus benchmarks: the event they publish and a
//! counter that says when every delivery has been handled.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;
pub mod harness;

/// A small event (about 128 bytes encoded as JSON).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, seambus::Event)]
#[event(name = "bench.tick", version = 1)]
pub struct Tick {
    /// Sequence number.
    pub seq: u64,
    /// Some text, to give the event its size.
    pub note: String,
}

impl Tick {
    /// The `seq`-th event.
    pub fn new(seq: u64) -> Self {
        Self {
            seq,
            note: "x".repeat(96),
        }
    }
}

/// Counts handled deliveries and wakes the waiter at the target.
#[derive(Debug, Default)]
pub struct Done {
    count: AtomicU64,
    target: AtomicU64,
    notify: Notify,
}

impl Done {
    /// A counter shared by handlers and the waiter.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Starts a round: `target` deliveries to wait for.
    pub fn reset(&self, target: u64) {
        self.count.store(0, Ordering::SeqCst);
        self.target.store(target, Ordering::SeqCst);
    }

    /// One delivery handled (the trivial handler's whole work).
    pub fn hit(&self) {
        if self.count.fetch_add(1, Ordering::AcqRel) + 1 == self.target.load(Ordering::Acquire) {
            self.notify.notify_one();
        }
    }

    /// Waits until the round's target is reached.
    pub async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            if self.count.load(Ordering::Acquire) >= self.target.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }
}
