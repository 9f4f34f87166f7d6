//! A broker outage is one warning, and its end one info line, whatever
//! number of connection attempts librdkafka makes meanwhile (it reports
//! each failed one; in a few seconds that was over a hundred ERROR lines).
//! Alone in this binary: it captures the logs and stops the local broker
//! for a few seconds (started again whatever happens).

mod common;

use std::time::Duration;

use seambus::conformance::{block_on, broker_ready, Harness, Logs};
use seambus::{Bus, Context, HandlerError, Received};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, seambus::Event)]
#[event(name = "orders.order_placed")]
struct OrderPlaced {
    id: u64,
}

/// How long the broker stays down: the outage the test is about.
const OUTAGE: Duration = Duration::from_secs(5);

#[test]
fn a_broker_outage_is_said_once_and_its_end_once() {
    let logs = Logs::capture();
    if !broker_ready(&common::Kafka { restart: false }) {
        return;
    }
    if common::brokers() != common::LOCAL {
        eprintln!("SKIPPED: only the local broker is stopped by the tests");
        return;
    }
    let _serial = common::one_at_a_time();
    block_on(async {
        let ns = seambus::conformance::namespace("outage");
        let bus = Bus::builder()
            .transport("kafka", common::transport(&ns).await)
            .build()
            .unwrap();
        let (handled, mut handled_rx) = tokio::sync::mpsc::unbounded_channel();
        let _sub = bus
            .module("billing")
            .subscribe(move |e: Received<OrderPlaced>, _c: Context| {
                let handled = handled.clone();
                async move {
                    let _ = handled.send(e.id);
                    Ok::<(), HandlerError>(())
                }
            })
            .await
            .unwrap();
        bus.module("orders")
            .publish(OrderPlaced { id: 1 })
            .await
            .unwrap();
        assert_eq!(handled_rx.recv().await, Some(1));

        let before = logs.text().len();
        {
            let _restore = common::RestoreBroker;
            tokio::task::spawn_blocking(|| common::broker("stop"))
                .await
                .unwrap();
            // The outage itself (nothing to wait for: the broker is down).
            tokio::time::sleep(OUTAGE).await;
            tokio::task::spawn_blocking(|| common::broker("start"))
                .await
                .unwrap();
        }
        // Published by another client (tansu forgets an idempotent
        // producer across its restart), fetched by this transport's
        // consumer: the brokers answer again.
        let other = common::transport(&ns).await;
        Bus::builder()
            .transport("kafka", other.clone())
            .build()
            .unwrap()
            .module("orders")
            .publish(OrderPlaced { id: 2 })
            .await
            .expect("publish after the restart");
        let next = tokio::time::timeout(Duration::from_secs(120), handled_rx.recv())
            .await
            .expect("the consumer fetches again after the restart");
        assert_eq!(next, Some(2));

        let text = logs.text();
        let during: Vec<&str> = text[before..].lines().collect();
        let count = |what: &str| during.iter().filter(|l| l.contains(what)).count();
        let loud: Vec<&&str> = during
            .iter()
            .filter(|l| l.contains(" ERROR ") || l.contains(" WARN "))
            .collect();
        let errors = loud.iter().filter(|l| l.contains(" ERROR ")).count();
        assert_eq!(errors, 0, "nothing at error level: {loud:#?}");
        // What the outage itself says, at warn level: once. (Its
        // consequences, such as a group session that timed out and
        // rejoined, are other news and may be said too.)
        let about_the_outage = loud
            .iter()
            .filter(|l| {
                [
                    "unreachable",
                    "brokers are down",
                    "Connection refused",
                    "cannot fetch",
                ]
                .iter()
                .any(|w| l.contains(w))
            })
            .count();
        assert_eq!(
            (count("Kafka unreachable"), about_the_outage),
            (1, 1),
            "one warning for the outage, no other: {loud:#?}"
        );
        assert_eq!(count("Kafka reachable again"), 1, "{during:#?}");
        bus.shutdown(Duration::from_secs(10)).await.unwrap();
        let _ = seambus::transport::Transport::shutdown(&other, Duration::from_secs(5)).await;
        common::Kafka { restart: false }.cleanup(&ns).await;
    });
}
