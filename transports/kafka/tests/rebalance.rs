//! A second worker of the same group joins and leaves mid-stream: no id is
//! missing (duplicates after a rebalance are allowed, gaps are not).

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use seambus::conformance::{block_on, broker_ready, Harness, Tally};
use seambus::{Bus, Context, HandlerError, Ordering, PublishOptions, Received};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, seambus::Event)]
#[event(name = "orders.order_placed")]
struct OrderPlaced {
    seq: u64,
}

fn recorder(
    tally: &Arc<Tally>,
) -> impl Fn(
    Received<OrderPlaced>,
    Context,
) -> futures_util::future::BoxFuture<'static, Result<(), HandlerError>>
       + Send
       + Sync
       + 'static {
    let tally = tally.clone();
    move |_e, ctx| {
        let tally = tally.clone();
        Box::pin(async move {
            tokio::time::sleep(Duration::from_micros(200)).await; // some work
            tally.record(ctx.envelope().id());
            Ok(())
        })
    }
}

#[test]
fn a_worker_joining_and_leaving_mid_stream_loses_nothing() {
    if !broker_ready(&common::Kafka { restart: false }) {
        return;
    }
    let _one = common::one_at_a_time();
    block_on(async {
        let ns = seambus::conformance::namespace("rebalance");
        let first = Bus::builder()
            .transport("kafka", common::transport(&ns).await)
            .build()
            .unwrap();
        let tally = Tally::new();
        first
            .module("billing")
            .subscribe(recorder(&tally))
            .concurrency(4)
            .ordering(Ordering::Unordered)
            .await
            .unwrap();
        let publishing = {
            let orders = first.module("orders");
            tokio::spawn(async move {
                let mut ids = HashSet::new();
                for seq in 0..6000u64 {
                    let key = PublishOptions::new().key(format!("k{}", seq % 32));
                    ids.insert(orders.publish_with(OrderPlaced { seq }, key).await.unwrap());
                }
                ids
            })
        };
        tally
            .wait_until("the first worker running", |seen| seen.len() >= 500)
            .await;
        // A second process of the same group joins ...
        let second = Bus::builder()
            .transport("kafka", common::transport(&ns).await)
            .build()
            .unwrap();
        let second_tally = Tally::new();
        second
            .module("billing")
            .subscribe(recorder(&second_tally))
            .concurrency(4)
            .ordering(Ordering::Unordered)
            .await
            .unwrap();
        second_tally
            .wait_until("the second worker taking partitions", |seen| {
                !seen.is_empty()
            })
            .await;
        // ... and leaves.
        second.shutdown(Duration::from_secs(10)).await.unwrap();
        let ids = publishing.await.unwrap();
        // The second worker is gone: what it handled is final. The first
        // must handle everything else, including what the second had taken
        // but not finished.
        let by_second: HashSet<_> = second_tally.snapshot().into_keys().collect();
        tally
            .wait_until("every id handled by one of the workers", |by_first| {
                ids.iter()
                    .all(|id| by_first.contains_key(id) || by_second.contains(id))
            })
            .await;
        first.shutdown(Duration::from_secs(10)).await.unwrap();
        common::Kafka { restart: false }.cleanup(&ns).await;
    });
}

/// A worker that holds as many records as it may (its handler blocked)
/// keeps polling, so a second worker of the group gets its partitions at
/// once (a worker that stopped polling held the rebalance up until it was
/// evicted); the records of the partitions it lost no longer count as
/// held, so once unblocked it goes on with everything that is still its.
#[test]
fn a_full_worker_keeps_polling_and_forgets_revoked_records() {
    if !broker_ready(&common::Kafka { restart: false }) {
        return;
    }
    let _one = common::one_at_a_time();
    block_on(async {
        let ns = seambus::conformance::namespace("fullrebalance");
        let mut config = common::config(&ns);
        config.max_in_flight = 4;
        let first = Bus::builder()
            .transport(
                "kafka",
                seambus_kafka::KafkaTransport::connect(config)
                    .await
                    .unwrap(),
            )
            .build()
            .unwrap();
        let (gate_tx, gate) = tokio::sync::watch::channel(false);
        let started = Arc::new(tokio::sync::Notify::new());
        let tally = Tally::new();
        let (t, s) = (tally.clone(), started.clone());
        first
            .module("billing")
            .subscribe(move |_e: Received<OrderPlaced>, ctx: Context| {
                let (t, s, mut gate) = (t.clone(), s.clone(), gate.clone());
                async move {
                    s.notify_one();
                    let _ = gate.wait_for(|open| *open).await;
                    t.record(ctx.envelope().id());
                    Ok::<(), HandlerError>(())
                }
            })
            .ordering(Ordering::Unordered)
            .await
            .unwrap();
        let orders = first.module("orders");
        let mut ids = HashSet::new();
        for seq in 0..60u64 {
            let key = PublishOptions::new().key(format!("k{}", seq % 12));
            ids.insert(orders.publish_with(OrderPlaced { seq }, key).await.unwrap());
        }
        started.notified().await;
        // The first worker is full and blocked. A second one joins.
        let second = Bus::builder()
            .transport("kafka", common::transport(&ns).await)
            .build()
            .unwrap();
        let second_tally = Tally::new();
        second
            .module("billing")
            .subscribe(recorder(&second_tally))
            .ordering(Ordering::Unordered)
            .await
            .unwrap();
        second_tally
            .wait_until(
                "the second worker getting records while the first is full",
                |seen| !seen.is_empty(),
            )
            .await;
        second.shutdown(Duration::from_secs(10)).await.unwrap();
        gate_tx.send_replace(true);
        let by_second: HashSet<_> = second_tally.snapshot().into_keys().collect();
        tally
            .wait_until("the first worker handling all the rest", |by_first| {
                ids.iter()
                    .all(|id| by_first.contains_key(id) || by_second.contains(id))
            })
            .await;
        first.shutdown(Duration::from_secs(10)).await.unwrap();
        common::Kafka { restart: false }.cleanup(&ns).await;
    });
}
