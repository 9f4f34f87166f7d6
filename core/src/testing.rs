//! Test support, for a bus built with
//! [`BusBuilder::testing`](crate::BusBuilder::testing): wait until the
//! bus is idle instead of polling, read back what was published and
//! consumed, and inject faults.
//!
//! ```
//! # use std::time::Duration;
//! # #[derive(Debug, Clone, serde::Serialize, serde::Deserialize, seambus::Event)]
//! # #[event(name = "orders.order_placed", version = 1)]
//! # struct OrderPlaced { id: u64 }
//! # #[derive(Debug, Clone, serde::Serialize, serde::Deserialize, seambus::Event)]
//! # #[event(name = "shipments.order_shipped", version = 1)]
//! # struct OrderShipped { id: u64 }
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> seambus::Result<()> {
//! use seambus::{Bus, Context, HandlerError, Received};
//!
//! let bus = Bus::builder().testing().build()?;
//! let shipments = bus.module("shipments");
//! let ship = shipments.clone();
//! let _sub = shipments
//!     .subscribe(move |o: Received<OrderPlaced>, _ctx: Context| {
//!         let ship = ship.clone();
//!         async move {
//!             ship.publish(OrderShipped { id: o.id }).await.map_err(HandlerError::retry)?;
//!             Ok(())
//!         }
//!     })
//!     .await?;
//! bus.module("orders").publish(OrderPlaced { id: 7 }).await?;
//! bus.idle(Duration::from_secs(5)).await?; // the handler, and what it published
//! let kit = bus.test_kit().expect("a testing bus");
//! assert_eq!(kit.published::<OrderShipped>().len(), 1);
//! assert_eq!(kit.consumed::<OrderPlaced>()[0].id, 7);
//! # Ok(())
//! # }
//! ```
//!
//! **Idle** means: every delivery this process's publishes caused (one per
//! local subscription of the event's name), and every delivery the events
//! those handlers published caused, ended: handled, or dead-lettered
//! (retries are still pending, so a retried handler is waited for). On the
//! in-process transport that is exact. On a broker the bus counts only
//! what this process published to the subscriptions this process has:
//! events from other processes are not waited for, and a redrive or
//! broker redelivery is not counted. It works with tokio's paused clock
//! (`#[tokio::test(start_paused = true)]`): retry backoffs take no real
//! time.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::watch;

use crate::error::{Error, ErrorKind, Result};
use crate::event::Event;
use crate::Bus;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One recorded event: its type and its bytes in the bus's codec.
struct Recorded {
    name: String,
    version: u32,
    bytes: Vec<u8>,
}

/// What a testing bus keeps.
pub(crate) struct Testing {
    /// Deliveries under way.
    pending: watch::Sender<i64>,
    /// Local subscriptions, by event name.
    groups: Mutex<HashMap<String, usize>>,
    published: Mutex<Vec<Recorded>>,
    consumed: Mutex<Vec<Recorded>>,
    fail_publishes: AtomicU32,
    twice: Mutex<HashSet<String>>,
    delays: Mutex<HashMap<String, Duration>>,
}

impl Testing {
    pub(crate) fn new() -> Self {
        Self {
            pending: watch::Sender::new(0),
            groups: Mutex::default(),
            published: Mutex::default(),
            consumed: Mutex::default(),
            fail_publishes: AtomicU32::new(0),
            twice: Mutex::default(),
            delays: Mutex::default(),
        }
    }

    pub(crate) fn group_added(&self, event: &str) {
        *lock(&self.groups).entry(event.to_owned()).or_default() += 1;
    }

    pub(crate) fn group_removed(&self, event: &str) {
        if let Some(n) = lock(&self.groups).get_mut(event) {
            *n = n.saturating_sub(1);
        }
    }

    /// Before a publish of `event`: fails it if a fault asks so, else
    /// counts the deliveries it will cause (returned, to undo on failure).
    pub(crate) fn before_send(&self, event: &str) -> Result<i64> {
        let failing = self
            .fail_publishes
            .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failing {
            return Err(Error::new(
                ErrorKind::Connection,
                "a publish failed on purpose (TestKit::fail_next_publishes)",
            ));
        }
        let n = lock(&self.groups).get(event).copied().unwrap_or(0) as i64;
        self.pending.send_modify(|p| *p += n);
        Ok(n)
    }

    /// A publish counted by [`Testing::before_send`] failed.
    pub(crate) fn undo(&self, n: i64) {
        self.pending.send_modify(|p| *p = (*p - n).max(0));
    }

    /// A delivery ended (handled or dead-lettered).
    pub(crate) fn done(&self) {
        self.pending.send_modify(|p| *p = (*p - 1).max(0));
    }

    pub(crate) fn record_published(&self, name: &str, version: u32, bytes: Vec<u8>) {
        lock(&self.published).push(Recorded {
            name: name.to_owned(),
            version,
            bytes,
        });
    }

    pub(crate) fn record_consumed(&self, name: &str, version: u32, bytes: Vec<u8>) {
        lock(&self.consumed).push(Recorded {
            name: name.to_owned(),
            version,
            bytes,
        });
    }

    /// Whether the next delivery of `event` runs its handler twice (once
    /// per call of [`TestKit::deliver_twice`]).
    pub(crate) fn take_twice(&self, event: &str) -> bool {
        lock(&self.twice).remove(event)
    }

    pub(crate) fn delay_of(&self, event: &str) -> Option<Duration> {
        lock(&self.delays).get(event).copied()
    }
}

/// The test kit of a bus built with
/// [`BusBuilder::testing`](crate::BusBuilder::testing); see
/// [`Bus::test_kit`].
#[derive(Clone, Debug)]
pub struct TestKit {
    pub(crate) bus: Bus,
}

impl TestKit {
    fn testing(&self) -> &Testing {
        self.bus
            .testing_state()
            .expect("a test kit exists only for a testing bus")
    }

    /// Waits until the bus is idle (see the [module docs](self)), at most
    /// `timeout`: a [`ErrorKind::Timeout`] error says how many deliveries
    /// were still under way.
    pub async fn idle(&self, timeout: Duration) -> Result<()> {
        let mut pending = self.testing().pending.subscribe();
        let reached = tokio::time::timeout(timeout, async {
            // The sender lives as long as the bus.
            let _ = pending.wait_for(|n| *n <= 0).await;
        })
        .await;
        match reached {
            Ok(()) => Ok(()),
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                format!(
                    "the bus was not idle within {timeout:?}: {} deliveries under way",
                    *pending.borrow()
                ),
            )),
        }
    }

    /// Every event of type `E` (its name and version) this bus published
    /// or forwarded, in order.
    pub fn published<E: Event>(&self) -> Vec<E> {
        self.read::<E>(&self.testing().published)
    }

    /// Every delivery of an `E` a handler finished with `Ok`, in order
    /// (an event handled by two groups is here twice).
    pub fn consumed<E: Event>(&self) -> Vec<E> {
        self.read::<E>(&self.testing().consumed)
    }

    fn read<E: Event>(&self, list: &Mutex<Vec<Recorded>>) -> Vec<E> {
        let codec = self.bus.default_codec();
        lock(list)
            .iter()
            .filter(|r| r.name == E::NAME && r.version == E::VERSION)
            .filter_map(|r| crate::codec::decode::<E>(codec, &r.bytes).ok())
            .collect()
    }

    /// The next `n` publishes fail with a retryable
    /// [`ErrorKind::Connection`] error, before reaching the transport.
    pub fn fail_next_publishes(&self, n: u32) {
        self.testing().fail_publishes.store(n, SeqCst);
    }

    /// The next delivery of `E` runs its handler twice, as a broker's
    /// redelivery would (the same envelope; the first run's outcome is
    /// dropped).
    pub fn deliver_twice<E: Event>(&self) {
        lock(&self.testing().twice).insert(E::NAME.to_owned());
    }

    /// Every handler of `E` waits `by` before it runs (tokio's clock, so
    /// a paused clock skips it).
    pub fn delay<E: Event>(&self, by: Duration) {
        lock(&self.testing().delays).insert(E::NAME.to_owned(), by);
    }
}
