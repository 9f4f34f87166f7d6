//! A message its consumers never get through (each process holding it
//! stops or dies) is dead-lettered by the engine once the quorum queue's
//! delivery count passes `delivery_limit`, before the broker would drop
//! it to the dead-letter queue on its own: so it is counted in `Stats`
//! and its dead letter says why.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use seambus::conformance::{block_on, broker_ready, poll_until};
use seambus::transport::DeadLetterReason;
use seambus::{Bus, Context, HandlerError, Received};
use seambus_rabbitmq::RabbitMqTransport;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, seambus::Event)]
#[event(name = "orders.order_placed")]
struct OrderPlaced {
    id: u64,
}

#[test]
fn a_message_redelivered_up_to_the_delivery_limit_is_dead_lettered_by_the_engine() {
    if !broker_ready(&common::Rabbit { restart: false }) {
        return;
    }
    block_on(async {
        let ns = seambus::conformance::namespace("crashloop");
        let calls = Arc::new(AtomicUsize::new(0));
        let mut published = None;
        // With a limit of 2, the first process holds the message and stops
        // while its handler still runs; the second receives it as its
        // second delivery (or later), the last ones the broker allows.
        for round in 1..=2 {
            let transport = RabbitMqTransport::connect(common::config(&ns).with_delivery_limit(2))
                .await
                .unwrap();
            let bus = Bus::builder()
                .transport("rabbitmq", transport)
                .build()
                .unwrap();
            let c = calls.clone();
            let sub = bus
                .module("billing")
                .subscribe(move |_e: Received<OrderPlaced>, _ctx: Context| {
                    c.fetch_add(1, SeqCst);
                    std::future::pending::<Result<(), HandlerError>>()
                })
                .await
                .unwrap();
            if published.is_none() {
                published = Some(
                    bus.module("orders")
                        .publish(OrderPlaced { id: 1 })
                        .await
                        .unwrap(),
                );
            }
            if round == 1 {
                poll_until("the handler holding the message", || async {
                    calls.load(SeqCst) == 1
                })
                .await;
                bus.shutdown(Duration::from_millis(200)).await.unwrap();
                continue;
            }
            poll_until("the dead letter", || async {
                sub.dead_letters().await.is_ok_and(|d| !d.is_empty())
            })
            .await;
            let dead = sub.dead_letters().await.unwrap();
            assert_eq!(dead.len(), 1, "{dead:?}");
            assert_eq!(dead[0].envelope.id(), published.unwrap());
            assert_eq!(dead[0].reason, DeadLetterReason::MaxAttempts);
            // The stopping process may have given it back more than once
            // (the broker delivered it again before the channel closed).
            assert!(
                dead[0].error.contains("over the delivery limit"),
                "{}",
                dead[0].error
            );
            assert_eq!(calls.load(SeqCst), 1, "the handler did not run again");
            assert_eq!(sub.stats().dead_lettered, 1, "counted");
            bus.shutdown(Duration::from_secs(5)).await.unwrap();
        }
        common::cleanup(&ns).await;
    });
}
