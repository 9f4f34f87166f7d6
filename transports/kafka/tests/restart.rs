//! The broker process is stopped and started again on the same storage
//! while 10,000 events flow through two groups; every id arrives in both.
//! Alone in this binary; the broker is left running.
//!
//! The events are all published (and acknowledged) before the restart, and
//! the restart happens while both groups are consuming them: tansu 0.6.0
//! loses track of an idempotent producer across its own restart and its
//! storage panics on that producer's next send (see the crate README), so
//! against tansu no producer may send across the restart. Publishing
//! through an outage is covered by the NATS and RabbitMQ transports' tests
//! and, against a real Kafka, by the conformance suite's restart case.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
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
            tokio::time::sleep(Duration::from_micros(500)).await; // some work
            tally.record(ctx.envelope().id());
            Ok(())
        })
    }
}

#[test]
fn ten_thousand_events_survive_a_broker_restart_in_two_groups() {
    let _restore = common::RestoreBroker;
    let harness = common::Kafka { restart: true };
    if !broker_ready(&harness) {
        return;
    }
    let Some(restart) = harness.restart_broker() else {
        eprintln!(
            "SKIPPED: {} is not the local broker this test may restart",
            common::brokers()
        );
        return;
    };
    block_on(async {
        let ns = seambus::conformance::namespace("restart");
        let bus = Bus::builder()
            .transport("kafka", common::transport(&ns).await)
            .build()
            .unwrap();
        let (first, second) = (Tally::new(), Tally::new());
        for (module, tally) in [("first", &first), ("second", &second)] {
            bus.module(module)
                .subscribe(recorder(tally))
                .concurrency(4)
                .ordering(Ordering::Unordered)
                .await
                .unwrap();
        }
        let orders = bus.module("orders");
        // Both groups joined and assigned before the bulk arrives.
        let warm_up = orders.publish(OrderPlaced { seq: u64::MAX }).await.unwrap();
        first
            .wait_for_all("first group joined", &HashSet::from([warm_up]))
            .await;
        second
            .wait_for_all("second group joined", &HashSet::from([warm_up]))
            .await;
        let mut ids: HashSet<_> = futures_util::stream::iter(0..10_000u64)
            .map(|seq| {
                let orders = orders.clone();
                async move {
                    let key = PublishOptions::new().key(format!("k{}", seq % 64));
                    orders.publish_with(OrderPlaced { seq }, key).await
                }
            })
            .buffer_unordered(32)
            .map(|r| r.expect("publish"))
            .collect()
            .await;
        assert_eq!(ids.len(), 10_000);
        ids.insert(warm_up);
        // Restart while both groups are working through the events.
        assert!(
            first.distinct() < ids.len(),
            "the restart must come mid-stream"
        );
        restart.await;
        first
            .wait_for_all("first group after the restart", &ids)
            .await;
        second
            .wait_for_all("second group after the restart", &ids)
            .await;
        first.assert_exactly("first group", &ids, true);
        second.assert_exactly("second group", &ids, true);
        bus.shutdown(Duration::from_secs(10)).await.unwrap();
        harness.cleanup(&ns).await;
    });
}
