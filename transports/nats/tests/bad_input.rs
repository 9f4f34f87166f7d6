//! Bad input against a real NATS server: foreign messages, oversized
//! payloads, forged headers, duplicates, an unreachable server.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use seambus::conformance::{block_on, poll_until, Harness, Tally};
use seambus::transport::{DeadLetterReason, Transport};
use seambus::{Attributes, Bus, Envelope, ErrorKind};
use seambus_nats::{NatsConfig, NatsTransport};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, seambus::Event)]
#[event(name = "orders.order_placed")]
struct OrderPlaced {
    id: u64,
    note: String,
}

fn ready() -> bool {
    seambus::conformance::broker_ready(&common::Nats { restart: false })
}

#[test]
fn a_foreign_message_is_dead_lettered_with_the_reason_and_the_flow_goes_on() {
    if !ready() {
        return;
    }
    block_on(async {
        let ns = seambus::conformance::namespace("foreign");
        let transport = common::transport(&ns).await;
        let client = transport.client().clone();
        let bus = Bus::builder().transport("nats", transport).build().unwrap();
        let tally = Tally::new();
        let sub = bus
            .module("billing")
            .subscribe(seambus::conformance::record_into::<OrderPlaced>(&tally))
            .await
            .unwrap();
        let subject = format!("t-{ns}.orders.order_placed");
        // A plain NATS client, knowing nothing of Seambus.
        let js = async_nats::jetstream::new(client);
        js.publish(subject.clone(), "hello, not an envelope".into())
            .await
            .unwrap()
            .await
            .unwrap();
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("ce-specversion", "1.0");
        headers.insert("ce-id", "not-a-uuid");
        js.publish_with_headers(subject, headers, "{}".into())
            .await
            .unwrap()
            .await
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
        poll_until("two dead letters", || async {
            sub.dead_letters().await.unwrap().len() == 2
        })
        .await;
        // Dead-lettered before any handler ran, and still counted.
        poll_until("the dead letters in the subscription's stats", || async {
            sub.stats().dead_lettered == 2
        })
        .await;
        for dl in sub.dead_letters().await.unwrap() {
            assert_eq!(dl.reason, DeadLetterReason::Undecodable);
            assert_eq!(dl.attempts, 1);
            assert!(dl.error.contains("not a Seambus envelope"), "{}", dl.error);
        }
        assert_eq!(sub.stats().retried, 0);
        bus.shutdown(Duration::from_secs(5)).await.unwrap();
        common::Nats { restart: false }.cleanup(&ns).await;
    });
}

#[test]
fn the_same_envelope_published_twice_is_stored_once() {
    if !ready() {
        return;
    }
    block_on(async {
        let ns = seambus::conformance::namespace("dedupe");
        let transport = Arc::new(common::transport(&ns).await);
        let bus = Bus::builder()
            .transport_arc("nats", transport.clone())
            .build()
            .unwrap();
        let tally = Tally::new();
        bus.module("billing")
            .subscribe(seambus::conformance::record_into::<OrderPlaced>(&tally))
            .await
            .unwrap();
        let envelope = Envelope::from_bytes(
            Attributes::new("orders", "orders.order_placed", 1),
            &br#"{"id":1,"note":""}"#[..],
        );
        transport.publish(envelope.clone()).await.unwrap();
        transport.publish(envelope.clone()).await.unwrap();
        let marker = bus
            .module("orders")
            .publish(OrderPlaced {
                id: 2,
                note: String::new(),
            })
            .await
            .unwrap();
        tally
            .wait_for_all("both events", &HashSet::from([envelope.id(), marker]))
            .await;
        assert_eq!(tally.snapshot()[&envelope.id()], 1, "stored once");
        bus.shutdown(Duration::from_secs(5)).await.unwrap();
        common::Nats { restart: false }.cleanup(&ns).await;
    });
}

#[test]
fn oversized_payloads_and_forged_headers_are_refused_before_sending() {
    if !ready() {
        return;
    }
    block_on(async {
        let ns = seambus::conformance::namespace("limits");
        let transport = Arc::new(common::transport(&ns).await);
        let limit = transport.capabilities().max_payload.unwrap();
        let bus = Bus::builder()
            .transport_arc("nats", transport.clone())
            .max_payload(usize::MAX)
            .build()
            .unwrap();
        let err = bus
            .module("orders")
            .publish(OrderPlaced {
                id: 1,
                note: "x".repeat(limit + 1),
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
        let attrs = Attributes::new("orders", "orders.*", 1);
        let err = transport
            .publish(Envelope::from_bytes(attrs, &b"{}"[..]))
            .await
            .unwrap_err();
        assert_eq!(
            err.kind(),
            ErrorKind::InvalidName,
            "no wildcards in subjects"
        );
        common::Nats { restart: false }.cleanup(&ns).await;
    });
}

#[test]
fn an_unreachable_server_is_a_retryable_connection_error() {
    block_on(async {
        let err = NatsTransport::connect(
            NatsConfig::default().with_servers(["nats://user:hunter2@127.0.0.1:1"]),
        )
        .await
        .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Connection);
        assert!(err.is_retryable());
        assert!(!err.to_string().contains("hunter2"), "{err}");
    });
}
