//! Regression tests: panics outside the handler's future, cancelled
//! publishes, and a consumer leaving while another waits on the same key.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use futures_util::task::noop_waker_ref;
use seambus::conformance::Tally;
use seambus::transport::Transport;
use seambus::{
    Bus, Context, DeadLetterReason, HandlerError, InProcessConfig, InProcessTransport,
    PublishOptions, Received,
};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

#[derive(Debug, Clone, Serialize, Deserialize, seambus::Event)]
#[event(name = "orders.order_placed", version = 1)]
struct V1 {
    n: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, seambus::Event)]
#[event(name = "orders.order_placed", version = 2)]
struct V2 {
    n: u64,
}

impl From<V1> for V2 {
    fn from(v: V1) -> Self {
        assert!(v.n != 13, "unlucky number");
        Self { n: v.n }
    }
}

fn ok() -> Result<(), HandlerError> {
    Ok(())
}

#[tokio::test]
async fn a_panic_before_the_handlers_first_await_is_caught() {
    let bus = Bus::new();
    let tally = Tally::new();
    let t = tally.clone();
    let sub = bus
        .module("inventory")
        .subscribe(move |_e: Received<V1>, ctx: Context| {
            // Synchronous part of the handler, before any future exists.
            assert!(ctx.attempt() > 1, "fails on the first attempt");
            let t = t.clone();
            async move {
                t.record(ctx.envelope().id());
                ok()
            }
        })
        .backoff(Duration::from_millis(1), Duration::from_millis(1))
        .await
        .unwrap();
    let id = bus.module("orders").publish(V1 { n: 1 }).await.unwrap();
    tally.wait_for_all("the retried event", &[id].into()).await;
    assert_eq!(sub.stats().panicked, 1);
}

#[tokio::test]
async fn a_panic_in_an_upcast_dead_letters_the_event_and_the_worker_goes_on() {
    let bus = Bus::builder().upcast::<V1, V2>().build().unwrap();
    let tally = Tally::new();
    let t = tally.clone();
    let sub = bus
        .module("inventory")
        .subscribe(move |_e: Received<V2>, ctx: Context| {
            let t = t.clone();
            async move {
                t.record(ctx.envelope().id());
                ok()
            }
        })
        .await
        .unwrap();
    let orders = bus.module("orders");
    let bad = orders.publish(V1 { n: 13 }).await.unwrap();
    let good = orders.publish(V1 { n: 14 }).await.unwrap();
    tally
        .wait_for_all("the event after the panic", &[good].into())
        .await;
    let dead = sub.dead_letters().await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].envelope.id(), bad);
    assert_eq!(dead[0].reason, DeadLetterReason::Undecodable);
    assert!(
        dead[0].error.contains("unlucky number"),
        "{}",
        dead[0].error
    );
}

/// Polls a future once on this thread.
fn poll_once<F: Future>(f: F) -> Poll<F::Output> {
    let mut f = pin!(f);
    f.as_mut()
        .poll(&mut TaskContext::from_waker(noop_waker_ref()))
}

#[tokio::test(flavor = "current_thread")]
async fn a_cancelled_publish_gives_its_queue_slots_back() {
    let transport = InProcessTransport::new(InProcessConfig::default().with_queue_capacity(1));
    let bus = Bus::builder()
        .transport("memory", transport)
        .build()
        .unwrap();
    let gate = Arc::new(Notify::new());
    // Group "fast" always has room; group "slow" holds its one slot until
    // the gate opens.
    let fast = bus
        .module("fast")
        .subscribe(|_e: Received<V1>, _c: Context| async { ok() })
        .await
        .unwrap();
    let g = gate.clone();
    let slow = bus
        .module("slow")
        .subscribe(move |_e: Received<V1>, _c: Context| {
            let g = g.clone();
            async move {
                g.notified().await;
                ok()
            }
        })
        .await
        .unwrap();
    let orders = bus.module("orders");
    orders.publish(V1 { n: 1 }).await.unwrap();
    while fast.stats().succeeded < 1 {
        tokio::task::yield_now().await;
    }
    // "slow" is full: this publish takes fast's slot, waits for slow's, and
    // is dropped while waiting.
    assert!(poll_once(orders.publish(V1 { n: 2 })).is_pending());
    gate.notify_one();
    while slow.stats().succeeded < 1 {
        tokio::task::yield_now().await;
    }
    // Both groups have their slot again: the next publish does not wait.
    match poll_once(orders.publish(V1 { n: 3 })) {
        Poll::Ready(result) => {
            result.unwrap();
        }
        Poll::Pending => panic!("a queue slot leaked from the cancelled publish"),
    }
    gate.notify_one();
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
async fn a_waiting_same_key_event_is_not_stranded_when_the_other_consumer_leaves() {
    // Two buses (processes) share one transport: one group, two consumers.
    let transport: Arc<dyn Transport> = Arc::new(InProcessTransport::default());
    let (bus_a, bus_b) = (
        Bus::builder()
            .transport_arc("m", transport.clone())
            .build()
            .unwrap(),
        Bus::builder()
            .transport_arc("m", transport)
            .build()
            .unwrap(),
    );
    let tally = Tally::new();
    let (started, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let (t, s, r) = (tally.clone(), started.clone(), release.clone());
    let sub_a = bus_a
        .module("billing")
        .subscribe(move |_e: Received<V1>, ctx: Context| {
            let (t, s, r) = (t.clone(), s.clone(), r.clone());
            async move {
                s.notify_one();
                r.notified().await;
                t.record(ctx.envelope().id());
                ok()
            }
        })
        .await
        .unwrap();
    let key = || PublishOptions::new().key("customer-1");
    let orders = bus_a.module("orders");
    let first = orders.publish_with(V1 { n: 1 }, key()).await.unwrap();
    started.notified().await; // A holds the key
    let t = tally.clone();
    let _sub_b = bus_b
        .module("billing")
        .subscribe(move |_e: Received<V1>, ctx: Context| {
            let t = t.clone();
            async move {
                t.record(ctx.envelope().id());
                ok()
            }
        })
        .await
        .unwrap();
    // B takes the second event from the queue and parks it behind the key.
    let second = orders.publish_with(V1 { n: 2 }, key()).await.unwrap();
    let closing = tokio::spawn(sub_a.close());
    release.notify_one();
    closing.await.unwrap().unwrap();
    tally
        .wait_for_all(
            "both events, the second by the remaining consumer",
            &[first, second].into(),
        )
        .await;
}

#[tokio::test]
async fn a_handler_over_its_timeout_is_retried() {
    let bus = Bus::new();
    let tally = Tally::new();
    let t = tally.clone();
    let sub = bus
        .module("inventory")
        .subscribe(move |_e: Received<V1>, ctx: Context| {
            let t = t.clone();
            async move {
                if ctx.attempt() == 1 {
                    std::future::pending::<()>().await; // hangs
                }
                t.record(ctx.envelope().id());
                ok()
            }
        })
        .timeout(Duration::from_millis(20))
        .backoff(Duration::from_millis(1), Duration::from_millis(1))
        .await
        .unwrap();
    let id = bus.module("orders").publish(V1 { n: 1 }).await.unwrap();
    tally
        .wait_for_all("the event after a timeout", &[id].into())
        .await;
    assert_eq!(sub.stats().retried, 1);
}

#[tokio::test]
async fn a_waiting_retry_blocks_neither_other_keys_nor_other_groups() {
    let bus = Bus::new();
    let (ordered, other_group) = (Tally::new(), Tally::new());
    let t = ordered.clone();
    let sub = bus
        .module("billing")
        .subscribe(move |e: Received<V1>, ctx: Context| {
            let t = t.clone();
            async move {
                if e.n == 0 {
                    return Err(HandlerError::retry("key-0 is down"));
                }
                t.record(ctx.envelope().id());
                ok()
            }
        })
        .concurrency(1) // one worker: only a timer-based retry lets others pass
        .backoff(Duration::from_secs(3600), Duration::from_secs(3600))
        .await
        .unwrap();
    let t = other_group.clone();
    bus.module("audit")
        .subscribe(move |_e: Received<V1>, ctx: Context| {
            let t = t.clone();
            async move {
                t.record(ctx.envelope().id());
                ok()
            }
        })
        .await
        .unwrap();
    let orders = bus.module("orders");
    let stuck = orders
        .publish_with(V1 { n: 0 }, PublishOptions::new().key("key-0"))
        .await
        .unwrap();
    let behind_stuck = orders
        .publish_with(V1 { n: 1 }, PublishOptions::new().key("key-0"))
        .await
        .unwrap();
    let mut others = std::collections::HashSet::new();
    for n in 2..50 {
        let key = format!("key-{}", n % 5 + 1);
        others.insert(
            orders
                .publish_with(V1 { n }, PublishOptions::new().key(key))
                .await
                .unwrap(),
        );
    }
    ordered
        .wait_for_all("other keys during the retry wait", &others)
        .await;
    let mut everything = others.clone();
    everything.extend([stuck, behind_stuck]);
    other_group
        .wait_for_all("the other group", &everything)
        .await;
    // key-0 waits for its retry, and its successor waits behind it.
    assert!(!ordered.snapshot().contains_key(&behind_stuck));
    assert_eq!(sub.stats().retried, 1);
    let report = bus.shutdown(Duration::from_millis(50)).await.unwrap();
    let mut left: Vec<_> = report.unfinished.iter().map(|u| u.envelope.id()).collect();
    left.sort();
    let mut want = vec![stuck, behind_stuck];
    want.sort();
    assert_eq!(left, want, "the waiting key's events are handed back");
}
