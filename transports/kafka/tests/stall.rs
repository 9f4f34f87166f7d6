//! A consumer that stops moving on a partition with records waiting says
//! so, at warn level, with the group and the partition; and says when it
//! moves again.

mod common;

use std::sync::Arc;
use std::time::Duration;

use seambus::conformance::{block_on, broker_ready, poll_until, Harness, Logs};
use seambus::{Bus, Context, HandlerError, PublishOptions, Received};
use seambus_kafka::KafkaTransport;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, seambus::Event)]
#[event(name = "orders.order_placed")]
struct OrderPlaced {
    id: u64,
}

#[test]
fn a_stalled_partition_is_reported_with_group_and_partition() {
    let logs = Logs::capture();
    if !broker_ready(&common::Kafka { restart: false }) {
        return;
    }
    let _serial = common::one_at_a_time();
    block_on(async {
        let ns = seambus::conformance::namespace("stall");
        let transport =
            KafkaTransport::connect(common::config(&ns).with_stall_warning(Duration::from_secs(2)))
                .await
                .unwrap();
        let bus = Bus::builder()
            .transport("kafka", transport)
            .build()
            .unwrap();
        // The handler waits until the test lets it go: nothing settles.
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let g = gate.clone();
        let _sub = bus
            .module("billing")
            .subscribe(move |_e: Received<OrderPlaced>, _c: Context| {
                let g = g.clone();
                async move {
                    g.acquire().await.unwrap().forget();
                    Ok::<(), HandlerError>(())
                }
            })
            .await
            .unwrap();
        let orders = bus.module("orders");
        for id in 0..3 {
            orders
                .publish_with(OrderPlaced { id }, PublishOptions::new().key("k"))
                .await
                .unwrap();
        }
        poll_until("the stall warning", || async {
            logs.text().contains("no progress on a partition")
        })
        .await;
        let line = logs
            .text()
            .lines()
            .find(|l| l.contains("no progress on a partition"))
            .unwrap()
            .to_owned();
        assert!(line.contains("WARN"), "{line}");
        assert!(
            line.contains("billing") && line.contains("partition="),
            "{line}"
        );
        assert!(line.contains("waiting="), "{line}");
        gate.add_permits(3);
        poll_until("the all-clear", || async {
            logs.text().contains("consuming again after a stall")
        })
        .await;
        bus.shutdown(Duration::from_secs(10)).await.unwrap();
        common::Kafka { restart: false }.cleanup(&ns).await;
    });
}
