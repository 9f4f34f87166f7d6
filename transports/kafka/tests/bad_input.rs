//! Bad input against a real Kafka-protocol broker: foreign records,
//! oversized payloads, forged headers, an unreachable cluster.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::producer::FutureRecord;
use seambus::conformance::{block_on, broker_ready, poll_until, Harness, Tally};
use seambus::transport::{DeadLetterReason, Transport};
use seambus::{Attributes, Bus, Envelope, ErrorKind};
use seambus_kafka::{KafkaConfig, KafkaTransport};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, seambus::Event)]
#[event(name = "orders.order_placed")]
struct OrderPlaced {
    id: u64,
    note: String,
}

fn ready() -> bool {
    broker_ready(&common::Kafka { restart: false })
}

#[test]
fn a_foreign_record_is_dead_lettered_with_the_reason_and_consumption_goes_on() {
    if !ready() {
        return;
    }
    let _serial = common::one_at_a_time();
    block_on(async {
        let ns = seambus::conformance::namespace("foreign");
        let transport = common::transport(&ns).await;
        let producer = transport.producer().clone();
        let bus = Bus::builder()
            .transport("kafka", transport)
            .build()
            .unwrap();
        let tally = Tally::new();
        let sub = bus
            .module("billing")
            .subscribe(seambus::conformance::record_into::<OrderPlaced>(&tally))
            .await
            .unwrap();
        // A plain rdkafka producer, knowing nothing of Seambus.
        let topic = format!("t-{ns}.orders.order_placed");
        producer
            .send(
                FutureRecord::<str, str>::to(&topic).payload("hello, not an envelope"),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
        let good = bus
            .module("orders")
            .publish(OrderPlaced {
                id: 1,
                note: "fine".into(),
            })
            .await
            .unwrap();
        tally
            .wait_for_all("the good event", &HashSet::from([good]))
            .await;
        poll_until("the dead letter", || async {
            sub.dead_letters().await.unwrap().len() == 1
        })
        .await;
        // Dead-lettered before any handler ran, and still counted.
        poll_until("the dead letters in the subscription's stats", || async {
            sub.stats().dead_lettered == 1
        })
        .await;
        let dl = &sub.dead_letters().await.unwrap()[0];
        assert_eq!(dl.reason, DeadLetterReason::Undecodable);
        assert_eq!(dl.attempts, 1);
        assert!(dl.error.contains("not a Seambus envelope"), "{}", dl.error);
        bus.shutdown(Duration::from_secs(10)).await.unwrap();
        common::Kafka { restart: false }.cleanup(&ns).await;
    });
}

#[test]
fn oversized_payloads_and_forged_headers_are_refused_before_sending() {
    if !ready() {
        return;
    }
    let _serial = common::one_at_a_time();
    block_on(async {
        let ns = seambus::conformance::namespace("limits");
        let transport = Arc::new(
            KafkaTransport::connect(common::config(&ns).with_message_max_bytes(2048))
                .await
                .unwrap(),
        );
        let bus = Bus::builder()
            .transport_arc("kafka", transport.clone())
            .build()
            .unwrap();
        let err = bus
            .module("orders")
            .publish(OrderPlaced {
                id: 1,
                note: "x".repeat(4096),
            })
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::PayloadTooLarge, "{err}");
        let mut attrs = Attributes::new("orders", "orders.order_placed", 1);
        attrs.headers.push(("x-bad".into(), "a\r\nb".into()));
        let err = transport
            .publish(Envelope::from_bytes(attrs, &b"{}"[..]))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidHeader);
        common::Kafka { restart: false }.cleanup(&ns).await;
    });
}

#[test]
fn an_unreachable_cluster_is_a_retryable_connection_error() {
    block_on(async {
        let err = KafkaTransport::connect(
            KafkaConfig::default()
                .with_bootstrap_servers("127.0.0.1:1")
                .with_publish_timeout(Duration::from_secs(2)),
        )
        .await
        .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
        assert!(err.is_retryable());
    });
}
