//! Bad input against a real RabbitMQ: foreign messages, unroutable
//! publishes, oversized payloads, forged headers, an unreachable broker.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use seambus::conformance::{block_on, broker_ready, poll_until, Harness, Tally};
use seambus::transport::{DeadLetterReason, Transport};
use seambus::{Attributes, Bus, Envelope, ErrorKind};
use seambus_rabbitmq::{RabbitMqConfig, RabbitMqTransport};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, seambus::Event)]
#[event(name = "orders.order_placed")]
struct OrderPlaced {
    id: u64,
    note: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, seambus::Event)]
#[event(name = "orders.order_cancelled")]
struct OrderCancelled {
    id: u64,
}

fn ready() -> bool {
    broker_ready(&common::Rabbit { restart: false })
}

#[test]
fn a_foreign_message_is_dead_lettered_with_the_reason_and_the_flow_goes_on() {
    if !ready() {
        return;
    }
    block_on(async {
        let ns = seambus::conformance::namespace("foreign");
        let bus = Bus::builder()
            .transport("rabbitmq", common::transport(&ns).await)
            .build()
            .unwrap();
        let tally = Tally::new();
        let sub = bus
            .module("billing")
            .subscribe(seambus::conformance::record_into::<OrderPlaced>(&tally))
            .await
            .unwrap();
        // A plain AMQP client, knowing nothing of Seambus.
        let plain = Connection::connect(&common::url(), ConnectionProperties::default())
            .await
            .unwrap();
        let channel = plain.create_channel().await.unwrap();
        channel
            .basic_publish(
                format!("t-{ns}").into(),
                "orders.order_placed".into(),
                BasicPublishOptions::default(),
                b"hello, not an envelope",
                BasicProperties::default(),
            )
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
        // Listing does not consume: still there.
        assert_eq!(sub.dead_letters().await.unwrap().len(), 1);
        let _ = plain.close(200, "bye".into()).await;
        bus.shutdown(Duration::from_secs(5)).await.unwrap();
        common::cleanup(&ns).await;
    });
}

#[test]
fn an_unroutable_publish_is_ok_and_counted_as_unrouted() {
    if !ready() {
        return;
    }
    block_on(async {
        let ns = seambus::conformance::namespace("unroutable");
        let transport = common::transport(&ns).await;
        let bus = Bus::builder()
            .transport("rabbitmq", transport.clone())
            .build()
            .unwrap();
        let orders = bus.module("orders");
        // Before any group exists: only the exchange is declared.
        orders
            .publish(OrderCancelled { id: 1 })
            .await
            .expect("a publish no group receives is Ok");
        assert_eq!(transport.unrouted(), 1);
        // While a group subscribes to another event.
        let placed = Tally::new();
        bus.module("billing")
            .subscribe(seambus::conformance::record_into::<OrderPlaced>(&placed))
            .await
            .unwrap();
        orders
            .publish(OrderCancelled { id: 2 })
            .await
            .expect("a publish no group receives is Ok");
        assert_eq!(transport.unrouted(), 2);
        // A routed publish is not counted, and arrives.
        let routed = orders
            .publish(OrderPlaced {
                id: 3,
                note: "routed".into(),
            })
            .await
            .unwrap();
        placed
            .wait_for_all("the routed event", &HashSet::from([routed]))
            .await;
        assert_eq!(transport.unrouted(), 2);
        // The unrouted events were stored nowhere: a group that subscribes
        // now starts after them.
        let cancelled = Tally::new();
        bus.module("billing")
            .subscribe(seambus::conformance::record_into::<OrderCancelled>(
                &cancelled,
            ))
            .await
            .unwrap();
        let later = orders.publish(OrderCancelled { id: 4 }).await.unwrap();
        cancelled
            .wait_for_all(
                "the event published after the group",
                &HashSet::from([later]),
            )
            .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        cancelled.assert_exactly("the new group", &HashSet::from([later]), false);
        assert_eq!(transport.unrouted(), 2);
        bus.shutdown(Duration::from_secs(5)).await.unwrap();
        common::cleanup(&ns).await;
    });
}

#[test]
fn oversized_payloads_and_forged_headers_are_refused_before_sending() {
    if !ready() {
        return;
    }
    block_on(async {
        let ns = seambus::conformance::namespace("limits");
        let transport = Arc::new(
            RabbitMqTransport::connect(common::config(&ns).with_max_message_size(1024))
                .await
                .unwrap(),
        );
        let bus = Bus::builder()
            .transport_arc("rabbitmq", transport.clone())
            .build()
            .unwrap();
        let tally = Tally::new();
        bus.module("billing")
            .subscribe(seambus::conformance::record_into::<OrderPlaced>(&tally))
            .await
            .unwrap();
        let err = bus
            .module("orders")
            .publish(OrderPlaced {
                id: 1,
                note: "x".repeat(2000),
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
        // The publishing channel survived both refusals.
        let ok = bus
            .module("orders")
            .publish(OrderPlaced {
                id: 2,
                note: "small".into(),
            })
            .await
            .unwrap();
        tally
            .wait_for_all("the small event", &HashSet::from([ok]))
            .await;
        bus.shutdown(Duration::from_secs(5)).await.unwrap();
        transport.delete_topology().await.unwrap();
    });
}

#[test]
fn an_unreachable_broker_is_a_retryable_connection_error_without_the_password() {
    block_on(async {
        let err = RabbitMqTransport::connect(
            RabbitMqConfig::default().with_uri("amqp://app:hunter2@127.0.0.1:1/%2f"),
        )
        .await
        .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Connection);
        assert!(err.is_retryable());
        assert!(!err.to_string().contains("hunter2"), "{err}");
    });
}

/// Queues that exist with other arguments than this configuration
/// declares (classic queues, a quorum configuration): subscribing fails at
/// once with a configuration error that says retrying cannot help, naming
/// the queue and the argument.
#[test]
fn inequivalent_queues_are_a_configuration_error_not_retryable() {
    if !ready() {
        return;
    }
    block_on(async {
        let ns = seambus::conformance::namespace("inequivalent");
        let classic = RabbitMqTransport::connect(
            common::config(&ns).with_queue_type(seambus_rabbitmq::QueueType::Classic),
        )
        .await
        .unwrap();
        async fn subscribe(bus: &Bus) -> seambus::Result<seambus::Subscription> {
            bus.module("billing")
                .subscribe(
                    |_e: seambus::Received<OrderCancelled>, _ctx: seambus::Context| async {
                        Ok::<(), seambus::HandlerError>(())
                    },
                )
                .await
        }
        let first = Bus::builder()
            .transport("rabbitmq", classic.clone())
            .build()
            .unwrap();
        subscribe(&first).await.unwrap().close().await.unwrap();
        let quorum = Bus::builder()
            .transport("rabbitmq", common::transport(&ns).await)
            .build()
            .unwrap();
        let err = subscribe(&quorum)
            .await
            .expect_err("the queues exist as classic queues");
        assert_eq!(err.kind(), ErrorKind::Config, "{err}");
        assert!(!err.is_retryable(), "{err}");
        assert!(err.to_string().contains("x-queue-type"), "{err}");
        assert!(
            err.to_string().contains("billing:orders.order_cancelled"),
            "{err}"
        );
        first.shutdown(Duration::from_secs(5)).await.unwrap();
        quorum.shutdown(Duration::from_secs(5)).await.unwrap();
        let _ = classic.delete_topology().await;
        common::cleanup(&ns).await;
    });
}

/// CloudEvents from other producers, as the AMQP binding allows them: the
/// `cloudEvents_` prefix, the SDKs' `ce-`, a `time` sent as an AMQP
/// timestamp, an `id` that is not a UUID. All are handled. An attribute
/// with CR/LF in it is dead-lettered at once as undecodable (not retried
/// until `max_attempts`).
#[test]
fn foreign_cloudevents_in_every_amqp_binding_are_read() {
    use lapin::types::{AMQPValue, FieldTable, LongString};
    if !ready() {
        return;
    }
    block_on(async {
        let ns = seambus::conformance::namespace("bindings");
        let bus = Bus::builder()
            .transport("rabbitmq", common::transport(&ns).await)
            .build()
            .unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let sub = bus
            .module("billing")
            .subscribe(
                move |e: seambus::Received<OrderPlaced>, ctx: seambus::Context| {
                    let tx = tx.clone();
                    async move {
                        let a = ctx.envelope().attributes().clone();
                        let _ = tx.send((e.id, a));
                        Ok::<(), seambus::HandlerError>(())
                    }
                },
            )
            .await
            .unwrap();
        let plain = Connection::connect(&common::url(), ConnectionProperties::default())
            .await
            .unwrap();
        let channel = plain.create_channel().await.unwrap();
        let text = |s: &str| AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()));
        let send = |prefix: &'static str, id: u64, extra: Vec<(&'static str, AMQPValue)>| {
            let channel = channel.clone();
            let ns = ns.clone();
            async move {
                let mut headers = FieldTable::default();
                for (name, value) in [
                    ("id", text(&format!("shop-order-{id}"))),
                    ("source", text("a-foreign-shop")),
                    ("type", text("orders.order_placed")),
                    ("specversion", text("1.0")),
                    ("dataversion", text("1")),
                ]
                .into_iter()
                .chain(extra)
                {
                    headers.insert(format!("{prefix}{name}").into(), value);
                }
                let body = format!(r#"{{"id":{id},"note":"foreign"}}"#);
                channel
                    .basic_publish(
                        format!("t-{ns}").into(),
                        "orders.order_placed".into(),
                        BasicPublishOptions::default(),
                        body.as_bytes(),
                        BasicProperties::default()
                            .with_content_type("application/json".into())
                            .with_headers(headers),
                    )
                    .await
                    .unwrap()
                    .await
                    .unwrap();
            }
        };
        let when = 1_700_000_000;
        send(
            "cloudEvents_",
            1,
            vec![("time", AMQPValue::Timestamp(when))],
        )
        .await;
        send("cloudEvents:", 2, vec![]).await;
        send("ce-", 3, vec![]).await;
        send(
            "cloudEvents_",
            4,
            vec![("correlationid", text("c\r\nx-forged: yes"))],
        )
        .await;
        let mut seen = std::collections::BTreeMap::new();
        while seen.len() < 3 {
            let (id, attrs) = tokio::time::timeout(Duration::from_secs(30), rx.recv())
                .await
                .expect("the foreign events are handled")
                .unwrap();
            seen.insert(id, attrs);
        }
        let first = &seen[&1];
        assert_eq!(first.foreign_id.as_deref(), Some("shop-order-1"));
        assert_eq!(
            first.id,
            Attributes::foreign_uuid("a-foreign-shop", "shop-order-1")
        );
        assert_eq!(first.time.timestamp(), when as i64, "the AMQP timestamp");
        assert_eq!(first.source, "a-foreign-shop");
        assert!(seen.contains_key(&2) && seen.contains_key(&3), "{seen:?}");
        poll_until("the bad attribute's dead letter", || async {
            sub.dead_letters().await.unwrap().len() == 1
        })
        .await;
        let dl = &sub.dead_letters().await.unwrap()[0];
        assert_eq!(dl.reason, DeadLetterReason::Undecodable);
        assert_eq!(dl.attempts, 1);
        assert!(dl.error.contains("correlationid"), "{}", dl.error);
        assert!(!seen.contains_key(&4));
        bus.shutdown(Duration::from_secs(5)).await.unwrap();
        common::Rabbit { restart: false }.cleanup(&ns).await;
    });
}
