//! NATS-specific behaviour: progress acks for slow handlers, and redrive
//! that reaches only its own group.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use seambus::conformance::{block_on, broker_ready, poll_until, Harness, Tally};
use seambus::{Bus, Context, HandlerError, Received};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, seambus::Event)]
#[event(name = "orders.order_placed")]
struct OrderPlaced {
    id: u64,
}

fn harness() -> common::Nats {
    common::Nats { restart: false }
}

#[test]
fn a_handler_slower_than_ack_wait_is_not_redelivered_meanwhile() {
    if !broker_ready(&harness()) {
        return;
    }
    block_on(async {
        let ns = seambus::conformance::namespace("slow");
        // ack_wait is 2 s in the test configuration; the handler takes 5 s.
        let bus = Bus::builder()
            .transport("nats", common::transport(&ns).await)
            .build()
            .unwrap();
        let (calls, tally) = (Arc::new(AtomicUsize::new(0)), Tally::new());
        let (c, t) = (calls.clone(), tally.clone());
        bus.module("billing")
            .subscribe(move |_e: Received<OrderPlaced>, ctx: Context| {
                let (c, t) = (c.clone(), t.clone());
                async move {
                    c.fetch_add(1, SeqCst);
                    tokio::time::sleep(Duration::from_secs(5)).await; // slow work
                    t.record(ctx.envelope().id());
                    Ok::<(), HandlerError>(())
                }
            })
            .concurrency(2)
            .await
            .unwrap();
        let id = bus
            .module("orders")
            .publish(OrderPlaced { id: 1 })
            .await
            .unwrap();
        tally
            .wait_for_all("the slow event", &HashSet::from([id]))
            .await;
        assert_eq!(
            calls.load(SeqCst),
            1,
            "progress acks kept the server from redelivering a running event"
        );
        bus.shutdown(Duration::from_secs(5)).await.unwrap();
        harness().cleanup(&ns).await;
    });
}

#[test]
fn redrive_reaches_only_the_group_that_dead_lettered() {
    if !broker_ready(&harness()) {
        return;
    }
    block_on(async {
        let ns = seambus::conformance::namespace("redrive");
        let bus = Bus::builder()
            .transport("nats", common::transport(&ns).await)
            .build()
            .unwrap();
        let (picky, audit) = (Tally::new(), Tally::new());
        let healed = Arc::new(AtomicBool::new(false));
        let (t, h) = (picky.clone(), healed.clone());
        let sub = bus
            .module("picky")
            .subscribe(move |_e: Received<OrderPlaced>, ctx: Context| {
                let (t, h) = (t.clone(), h.clone());
                async move {
                    if !h.load(SeqCst) {
                        return Err(HandlerError::reject("not today"));
                    }
                    t.record(ctx.envelope().id());
                    Ok(())
                }
            })
            .await
            .unwrap();
        let t = audit.clone();
        bus.module("audit")
            .subscribe(move |_e: Received<OrderPlaced>, ctx: Context| {
                let t = t.clone();
                async move {
                    t.record(ctx.envelope().id());
                    Ok::<(), HandlerError>(())
                }
            })
            .await
            .unwrap();
        let id = bus
            .module("orders")
            .publish(OrderPlaced { id: 7 })
            .await
            .unwrap();
        audit.wait_for_all("audit", &HashSet::from([id])).await;
        poll_until("the dead letter", || async {
            sub.dead_letters().await.unwrap().len() == 1
        })
        .await;
        healed.store(true, SeqCst);
        assert_eq!(sub.redrive(None).await.unwrap(), 1);
        picky
            .wait_for_all("the redriven event", &HashSet::from([id]))
            .await;
        assert!(sub.dead_letters().await.unwrap().is_empty());
        // A later event shows the audit group has moved past the redrive.
        let marker = bus
            .module("orders")
            .publish(OrderPlaced { id: 8 })
            .await
            .unwrap();
        audit
            .wait_for_all("the marker", &HashSet::from([marker]))
            .await;
        assert_eq!(audit.snapshot()[&id], 1, "audit did not handle the redrive");
        bus.shutdown(Duration::from_secs(5)).await.unwrap();
        harness().cleanup(&ns).await;
    });
}

/// Subscribing updates the group's consumer to the transport's settings:
/// one created without a delivery limit (as before there was one) gets it.
#[test]
fn subscribing_sets_the_delivery_limit_on_an_existing_consumer() {
    if !broker_ready(&harness()) {
        return;
    }
    block_on(async {
        use async_nats::jetstream::consumer::pull;
        let ns = seambus::conformance::namespace("maxdeliver");
        let transport = common::transport(&ns).await;
        let js = async_nats::jetstream::new(transport.client().clone());
        let bus = Bus::builder().transport("nats", transport).build().unwrap();
        let subscribe = || async {
            bus.module("billing")
                .subscribe(|_e: Received<OrderPlaced>, _ctx: Context| async {
                    Ok::<_, HandlerError>(())
                })
                .await
                .unwrap()
        };
        subscribe().await.close().await.unwrap();
        let stream = js.get_stream(format!("T_{ns}")).await.unwrap();
        let mut names = stream.consumer_names();
        let name = futures_util::StreamExt::next(&mut names)
            .await
            .unwrap()
            .unwrap();
        let mut consumer = stream.get_consumer::<pull::Config>(&name).await.unwrap();
        let mut old = consumer.cached_info().config.clone();
        old.max_deliver = -1;
        stream.create_consumer(old).await.unwrap();
        assert_eq!(consumer.info().await.unwrap().config.max_deliver, -1);
        let _sub = subscribe().await;
        let limit = common::config(&ns).delivery_limit;
        assert_eq!(
            consumer.info().await.unwrap().config.max_deliver,
            i64::from(limit) + 1
        );
        bus.shutdown(Duration::from_secs(5)).await.unwrap();
        harness().cleanup(&ns).await;
    });
}
