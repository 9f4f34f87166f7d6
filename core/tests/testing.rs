//! The test kit of a testing bus: idle waits for chained handlers and
//! retries (with tokio's paused clock, retry backoffs take no real time),
//! dead letters end a delivery, typed records of what was published and
//! consumed, and the faults it injects.

use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use seambus::{Bus, Context, ErrorKind, HandlerError, Received, RetryPolicy};

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, seambus::Event)]
#[event(name = "orders.order_placed", version = 1)]
struct OrderPlaced {
    id: u64,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, seambus::Event)]
#[event(name = "shipments.order_shipped", version = 1)]
struct OrderShipped {
    id: u64,
}

fn bus() -> Bus {
    Bus::builder().testing().build().expect("bus")
}

/// Shipments ships every order (after `failures` failed attempts each)
/// and orders counts the shipments.
async fn chain(bus: &Bus, failures: u32, backoff: Duration) -> Arc<AtomicU32> {
    let shipments = bus.module("shipments");
    let ship = shipments.clone();
    let attempts = Arc::new(AtomicU32::new(0));
    let counted = attempts.clone();
    // Dropping a subscription leaves it running.
    drop(
        shipments
            .subscribe(move |o: Received<OrderPlaced>, ctx: Context| {
                let (ship, counted) = (ship.clone(), counted.clone());
                async move {
                    counted.fetch_add(1, SeqCst);
                    if ctx.attempt() <= failures {
                        return Err(HandlerError::retry("not yet"));
                    }
                    ship.publish(OrderShipped { id: o.id })
                        .await
                        .map_err(HandlerError::retry)?;
                    Ok(())
                }
            })
            .retry(
                RetryPolicy::default()
                    .with_max_attempts(failures + 1)
                    .with_backoff(backoff, backoff),
            )
            .await
            .expect("subscribe"),
    );
    drop(
        bus.module("orders")
            .subscribe(|_s: Received<OrderShipped>, _ctx: Context| async {
                Ok::<(), HandlerError>(())
            })
            .await
            .expect("subscribe"),
    );
    attempts
}

#[tokio::test(start_paused = true)]
async fn idle_waits_for_retries_and_chained_handlers_on_a_paused_clock() {
    let bus = bus();
    let attempts = chain(&bus, 2, Duration::from_secs(600)).await;
    let started = tokio::time::Instant::now();
    for id in 0..3 {
        bus.module("orders")
            .publish(OrderPlaced { id })
            .await
            .unwrap();
    }
    bus.idle(Duration::from_secs(24 * 3600))
        .await
        .expect("idle");
    // Two backoffs of ten minutes each passed on tokio's clock.
    assert!(started.elapsed() >= Duration::from_secs(1200));
    assert_eq!(attempts.load(SeqCst), 9);
    let kit = bus.test_kit().unwrap();
    let mut shipped: Vec<u64> = kit
        .consumed::<OrderShipped>()
        .iter()
        .map(|s| s.id)
        .collect();
    shipped.sort_unstable();
    assert_eq!(shipped, [0, 1, 2]);
    assert_eq!(kit.published::<OrderPlaced>().len(), 3);
    assert_eq!(kit.consumed::<OrderPlaced>().len(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_dead_letter_ends_a_delivery_and_a_stuck_one_times_out() {
    let bus = bus();
    let sub = bus
        .module("shipments")
        .subscribe(|_o: Received<OrderPlaced>, _ctx: Context| async {
            Err::<(), _>(HandlerError::reject("never"))
        })
        .await
        .unwrap();
    bus.module("orders")
        .publish(OrderPlaced { id: 1 })
        .await
        .unwrap();
    bus.idle(Duration::from_secs(60)).await.expect("idle");
    assert_eq!(sub.stats().dead_lettered, 1);
    assert!(bus.test_kit().unwrap().consumed::<OrderPlaced>().is_empty());

    // A handler delayed an hour: idle for a minute times out, saying so.
    let kit = bus.test_kit().unwrap();
    kit.delay::<OrderPlaced>(Duration::from_secs(3600));
    bus.module("orders")
        .publish(OrderPlaced { id: 2 })
        .await
        .unwrap();
    let err = bus.idle(Duration::from_secs(60)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout);
    assert!(
        err.message().contains("1 deliveries under way"),
        "{}",
        err.message()
    );
    bus.idle(Duration::from_secs(7200))
        .await
        .expect("idle after the delay");
    assert_eq!(sub.stats().dead_lettered, 2);
}

#[tokio::test]
async fn faults_fail_a_publish_and_deliver_twice() {
    let bus = bus();
    let kit = bus.test_kit().unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    let counted = calls.clone();
    let _sub = bus
        .module("shipments")
        .subscribe(move |_o: Received<OrderPlaced>, _ctx: Context| {
            let counted = counted.clone();
            async move {
                counted.fetch_add(1, SeqCst);
                Ok::<(), HandlerError>(())
            }
        })
        .await
        .unwrap();
    let orders = bus.module("orders");
    kit.fail_next_publishes(1);
    let err = orders.publish(OrderPlaced { id: 1 }).await.unwrap_err();
    assert!(err.is_retryable(), "{err}");
    orders.publish(OrderPlaced { id: 2 }).await.unwrap();
    bus.idle(Duration::from_secs(5)).await.unwrap();
    assert_eq!(calls.load(SeqCst), 1, "the failed publish reached no one");

    kit.deliver_twice::<OrderPlaced>();
    orders.publish(OrderPlaced { id: 3 }).await.unwrap();
    bus.idle(Duration::from_secs(5)).await.unwrap();
    assert_eq!(calls.load(SeqCst), 3, "the handler ran twice for id 3");
    let ids: Vec<u64> = kit.consumed::<OrderPlaced>().iter().map(|o| o.id).collect();
    assert_eq!(ids, [2, 3], "one delivery each");
}

#[tokio::test]
async fn idle_needs_a_testing_bus() {
    let bus = Bus::new();
    assert!(bus.test_kit().is_none());
    let err = bus.idle(Duration::from_secs(1)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
}
