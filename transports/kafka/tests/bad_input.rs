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
        assert_eq!(
            dl.error.matches("not a Seambus envelope").count(),
            1,
            "said once: {}",
            dl.error
        );
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

/// A foreign record under `message.max.bytes` whose dead-letter copy (the
/// record plus the dead-letter headers) is over it: dead-lettered once as
/// `too_large`, without its payload, and its offset moves on.
#[test]
fn a_record_too_large_to_dead_letter_whole_is_dead_lettered_as_too_large() {
    if !ready() {
        return;
    }
    let _serial = common::one_at_a_time();
    block_on(async {
        let ns = seambus::conformance::namespace("toolarge");
        let max = 64 * 1024;
        let transport = KafkaTransport::connect(common::config(&ns).with_message_max_bytes(max))
            .await
            .unwrap();
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
        let topic = format!("t-{ns}.orders.order_placed");
        let id = uuid::Uuid::now_v7().to_string();
        let pairs = [
            ("ce_specversion", "1.0"),
            ("ce_id", id.as_str()),
            ("ce_source", "a-foreign-producer"),
            ("ce_type", "orders.order_placed"),
            ("ce_dataversion", "1"),
            ("content-type", "application/json"),
        ];
        let mut headers = rdkafka::message::OwnedHeaders::new();
        for (key, value) in pairs {
            headers = headers.insert(rdkafka::message::Header {
                key,
                value: Some(value),
            });
        }
        let header_bytes: usize = pairs.iter().map(|(k, v)| k.len() + v.len() + 4).sum();
        // Not JSON: dead-lettered as undecodable, with a copy over the limit.
        let body = "x".repeat(max - header_bytes - 250);
        producer
            .send(
                FutureRecord::<str, str>::to(&topic)
                    .key("k")
                    .payload(&body)
                    .headers(headers),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("the broker takes the record");
        let good = bus
            .module("orders")
            .publish_with(
                OrderPlaced {
                    id: 1,
                    note: "fine".into(),
                },
                seambus::PublishOptions::new().key("k"),
            )
            .await
            .unwrap();
        tally
            .wait_for_all("the event after it", &HashSet::from([good]))
            .await;
        poll_until("the too-large dead letter", || async {
            !sub.dead_letters().await.unwrap().is_empty()
        })
        .await;
        let dead = sub.dead_letters().await.unwrap();
        assert_eq!(dead.len(), 1, "{dead:?}");
        let dl = &dead[0];
        assert_eq!(dl.reason, DeadLetterReason::TooLarge);
        assert_eq!(dl.envelope.id().to_string(), id);
        assert!(dl.error.contains("undecodable"), "{}", dl.error);
        assert_eq!(dl.envelope.payload_bytes().map(|p| p.len()), Some(0));
        assert_eq!(sub.stats().dead_lettered, 1);
        bus.shutdown(Duration::from_secs(10)).await.unwrap();
        common::Kafka { restart: false }.cleanup(&ns).await;
    });
}

/// A foreign CloudEvent whose `id` is not a UUID is handled with the id it
/// came with; one with CR/LF in an attribute is dead-lettered at once as
/// undecodable, not retried until `max_attempts`.
#[test]
fn foreign_ids_are_read_and_bad_attributes_dead_lettered_at_decode() {
    if !ready() {
        return;
    }
    let _serial = common::one_at_a_time();
    block_on(async {
        let ns = seambus::conformance::namespace("foreignid");
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
        let topic = format!("t-{ns}.orders.order_placed");
        for (n, correlation) in [(7, "fine"), (8, "c\r\nx-forged: yes")] {
            let id = format!("shop-order-{n}");
            let mut headers = rdkafka::message::OwnedHeaders::new();
            for (key, value) in [
                ("ce_specversion", "1.0"),
                ("ce_id", id.as_str()),
                ("ce_source", "a-foreign-shop"),
                ("ce_type", "orders.order_placed"),
                ("ce_dataversion", "1"),
                ("ce_correlationid", correlation),
                ("content-type", "application/json"),
            ] {
                headers = headers.insert(rdkafka::message::Header {
                    key,
                    value: Some(value),
                });
            }
            let body = format!(r#"{{"id":{n},"note":"foreign"}}"#);
            producer
                .send(
                    FutureRecord::<str, str>::to(&topic)
                        .payload(&body)
                        .headers(headers),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|(e, _)| e)
                .unwrap();
        }
        let id = Attributes::foreign_uuid("a-foreign-shop", "shop-order-7");
        tally
            .wait_for_all("the foreign event", &HashSet::from([id]))
            .await;
        poll_until("the bad attribute's dead letter", || async {
            sub.dead_letters().await.unwrap().len() == 1
        })
        .await;
        let dl = &sub.dead_letters().await.unwrap()[0];
        assert_eq!(dl.reason, DeadLetterReason::Undecodable);
        assert_eq!(dl.attempts, 1);
        assert!(dl.error.contains("correlationid"), "{}", dl.error);
        assert_eq!(sub.stats().retried, 0);
        bus.shutdown(Duration::from_secs(10)).await.unwrap();
        common::Kafka { restart: false }.cleanup(&ns).await;
    });
}
