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
            assert_eq!(
                dl.error.matches("not a Seambus envelope").count(),
                1,
                "said once: {}",
                dl.error
            );
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

/// A foreign message that fits the server's limit, but whose dead-letter
/// copy (payload plus the dead-letter headers) does not: dead-lettered once
/// as `too_large`, without its payload, and never redelivered.
#[test]
fn a_message_too_large_to_dead_letter_whole_is_dead_lettered_as_too_large() {
    if !ready() {
        return;
    }
    block_on(async {
        let ns = seambus::conformance::namespace("toolarge");
        let transport = common::transport(&ns).await;
        let client = transport.client().clone();
        let max = client.server_info().max_payload;
        let bus = Bus::builder().transport("nats", transport).build().unwrap();
        let tally = Tally::new();
        let sub = bus
            .module("billing")
            .subscribe(seambus::conformance::record_into::<OrderPlaced>(&tally))
            .await
            .unwrap();
        let subject = format!("t-{ns}.orders.order_placed");
        let id = uuid::Uuid::now_v7();
        let id_text = id.to_string();
        let pairs = [
            ("ce-specversion", "1.0"),
            ("ce-id", id_text.as_str()),
            ("ce-source", "a-foreign-producer"),
            ("ce-type", "orders.order_placed"),
            ("ce-dataversion", "1"),
            ("content-type", "application/json"),
        ];
        let mut headers = async_nats::HeaderMap::new();
        for (name, value) in pairs {
            headers.insert(name, value);
        }
        // The header block as the client writes it ("NATS/1.0\r\n", one
        // "name: value\r\n" per header, "\r\n"), then a body just under
        // the limit: not JSON, so it is dead-lettered as undecodable.
        let header_bytes: usize = 12
            + pairs
                .iter()
                .map(|(n, v)| n.len() + v.len() + 4)
                .sum::<usize>();
        let body = vec![b'x'; max - header_bytes - 200];
        let js = async_nats::jetstream::new(client);
        js.publish_with_headers(subject, headers, body.into())
            .await
            .expect("the server takes the message")
            .await
            .expect("stored");
        let dl = &the_flow_goes_on_past_one_dead_letter(&bus, &tally, &sub).await;
        assert_eq!(dl.reason, DeadLetterReason::TooLarge);
        assert_eq!(dl.envelope.id(), id);
        assert!(dl.error.contains("undecodable"), "{}", dl.error);
        assert_eq!(dl.envelope.payload_bytes().map(|p| p.len()), Some(0));
        assert_eq!(sub.stats().dead_lettered, 1);
        // Acknowledged once stored: the group's consumer holds nothing.
        let stream = js.get_stream(format!("T_{ns}")).await.unwrap();
        poll_until("no message left unacknowledged", || async {
            let mut consumers = stream.consumers();
            let mut pending = 0;
            while let Some(info) = futures_util::StreamExt::next(&mut consumers).await {
                pending += info.unwrap().num_ack_pending;
            }
            pending == 0
        })
        .await;
        assert_eq!(sub.stats().dead_lettered, 1, "counted once");
        bus.shutdown(Duration::from_secs(5)).await.unwrap();
        common::Nats { restart: false }.cleanup(&ns).await;
    });
}

/// Publishes a good event, waits until it is handled and the one dead
/// letter the subscription should have is there, and returns it.
async fn the_flow_goes_on_past_one_dead_letter(
    bus: &Bus,
    tally: &Tally,
    sub: &seambus::Subscription,
) -> seambus::transport::DeadLetter {
    let good = bus
        .module("orders")
        .publish(OrderPlaced {
            id: 1,
            note: "fine".into(),
        })
        .await
        .unwrap();
    tally
        .wait_for_all("the event after it", &HashSet::from([good]))
        .await;
    // A listing may fail while the client reconnects (a message it cannot
    // read drops its connection): retryable, so asked again.
    poll_until("the dead letter", || async {
        sub.dead_letters().await.is_ok_and(|d| !d.is_empty())
    })
    .await;
    let mut dead = sub.dead_letters().await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    dead.remove(0)
}

/// A foreign CloudEvent whose `id` is not a UUID (the spec allows any
/// string) is handled, with the id it came with.
#[test]
fn a_foreign_event_with_a_non_uuid_id_is_handled() {
    if !ready() {
        return;
    }
    block_on(async {
        let ns = seambus::conformance::namespace("foreignid");
        let transport = common::transport(&ns).await;
        let client = transport.client().clone();
        let bus = Bus::builder().transport("nats", transport).build().unwrap();
        let tally = Tally::new();
        let _sub = bus
            .module("billing")
            .subscribe(seambus::conformance::record_into::<OrderPlaced>(&tally))
            .await
            .unwrap();
        let mut headers = async_nats::HeaderMap::new();
        for (name, value) in [
            ("ce-specversion", "1.0"),
            ("ce-id", "shop-order-7"),
            ("ce-source", "a-foreign-shop"),
            ("ce-type", "orders.order_placed"),
            ("ce-dataversion", "1"),
            ("content-type", "application/json"),
        ] {
            headers.insert(name, value);
        }
        async_nats::jetstream::new(client)
            .publish_with_headers(
                format!("t-{ns}.orders.order_placed"),
                headers,
                r#"{"id":7,"note":"foreign"}"#.into(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        let id = Attributes::foreign_uuid("a-foreign-shop", "shop-order-7");
        tally
            .wait_for_all("the foreign event", &HashSet::from([id]))
            .await;
        bus.shutdown(Duration::from_secs(5)).await.unwrap();
        common::Nats { restart: false }.cleanup(&ns).await;
    });
}

/// Publishes with the NATS protocol itself (no client library, which would
/// refuse these headers): `HPUB` with `header_block` as it is, waiting for
/// JetStream's ack. Returns the stream sequence.
fn publish_raw(subject: &str, header_block: &[u8], payload: &[u8]) -> u64 {
    use std::io::{BufRead, BufReader, Read, Write};
    let addr = common::url()
        .trim_start_matches("nats://")
        .rsplit('@')
        .next()
        .unwrap()
        .to_owned();
    let stream = std::net::TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).expect("INFO");
    let mut w = stream;
    write!(
        w,
        "CONNECT {{\"verbose\":false,\"headers\":true,\"protocol\":1}}\r\nSUB raw-ack 1\r\nHPUB {subject} raw-ack {} {}\r\n",
        header_block.len(),
        header_block.len() + payload.len()
    )
    .unwrap();
    w.write_all(header_block).unwrap();
    w.write_all(payload).unwrap();
    w.write_all(b"\r\n").unwrap();
    w.flush().unwrap();
    loop {
        line.clear();
        reader.read_line(&mut line).expect("the stream's ack");
        if let Some(args) = line.strip_prefix("MSG ") {
            let len: usize = args.split_whitespace().last().unwrap().parse().unwrap();
            let mut body = vec![0; len + 2];
            reader.read_exact(&mut body).unwrap();
            let ack: serde_json::Value = serde_json::from_slice(&body[..len]).unwrap();
            return ack["seq"]
                .as_u64()
                .unwrap_or_else(|| panic!("not stored: {ack}"));
        }
    }
}

/// A header block async-nats cannot read (a line without a colon, as an
/// unescaped line break in a value gives) makes the client drop its
/// connection on every delivery, so Seambus never sees the message. The
/// server's delivery limit stops the redeliveries and its advisory names
/// the message, which is then read from the stream as it is stored and
/// dead-lettered as undecodable; the flow goes on.
#[test]
fn a_message_whose_headers_the_client_cannot_read_is_dead_lettered() {
    if !ready() {
        return;
    }
    block_on(async {
        let ns = seambus::conformance::namespace("badheaders");
        let config = common::config(&ns)
            .with_ack_wait(Duration::from_secs(1))
            .with_delivery_limit(2);
        let transport = NatsTransport::connect(config).await.unwrap();
        let bus = Bus::builder().transport("nats", transport).build().unwrap();
        let tally = Tally::new();
        let sub = bus
            .module("billing")
            .subscribe(seambus::conformance::record_into::<OrderPlaced>(&tally))
            .await
            .unwrap();
        let subject = format!("t-{ns}.orders.order_placed");
        let raw = "NATS/1.0\r\nce-specversion: 1.0\r\nce-correlationid: abc\r\ndef\r\n\r\n";
        tokio::task::spawn_blocking(move || {
            publish_raw(&subject, raw.as_bytes(), br#"{"id":9,"note":"x"}"#)
        })
        .await
        .unwrap();
        let dl = &the_flow_goes_on_past_one_dead_letter(&bus, &tally, &sub).await;
        assert_eq!(dl.reason, DeadLetterReason::Undecodable);
        assert!(dl.error.contains("header"), "{}", dl.error);
        assert!(!dl.error.contains("def"), "no header text: {}", dl.error);
        assert_eq!(
            dl.envelope.payload_bytes().map(|p| p.to_vec()),
            Some(br#"{"id":9,"note":"x"}"#.to_vec())
        );
        assert_eq!(sub.stats().dead_lettered, 1);
        assert_eq!(
            tally.distinct(),
            1,
            "the unreadable message reached no handler"
        );
        bus.shutdown(Duration::from_secs(5)).await.unwrap();
        common::Nats { restart: false }.cleanup(&ns).await;
    });
}
