//! A record that its consumers never get through (each process holding it
//! dies or stops) is not delivered forever: the group's deliveries of it
//! are counted on the broker, and past `delivery_limit` it is
//! dead-lettered as a crash loop without running the handler again.
//!
//! The count lives in the metadata of the group's committed offset. A
//! broker that does not keep that metadata (tansu 0.6.0 answers every
//! offset fetch with empty metadata) cannot count: the case is then
//! reported ignored, with the reason.

mod common;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use libtest_mimic::{Arguments, Trial};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use seambus::conformance::{block_on, broker_ready};
use seambus::transport::{DeadLetterReason, Transport};
use seambus::Bus;
use seambus_kafka::KafkaTransport;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, seambus::Event)]
#[event(name = "orders.order_placed")]
struct OrderPlaced {
    id: u64,
}

fn main() -> ExitCode {
    let args = Arguments::from_args();
    let ready = broker_ready(&common::Kafka { restart: false });
    let skip = match ready {
        false => Some("no Kafka broker".to_owned()),
        true => block_on(keeps_commit_metadata()),
    };
    if let Some(why) = &skip {
        eprintln!("SKIPPED: a_record_delivered_past_the_delivery_limit_is_dead_lettered: {why}");
    }
    let trial = Trial::test(
        "a_record_delivered_past_the_delivery_limit_is_dead_lettered",
        || {
            a_record_delivered_past_the_delivery_limit_is_dead_lettered();
            Ok(())
        },
    )
    .with_ignored_flag(skip.is_some());
    libtest_mimic::run(&args, vec![trial]).exit_code()
}

/// None when the broker keeps the metadata of a committed offset, else
/// why not.
async fn keeps_commit_metadata() -> Option<String> {
    let ns = seambus::conformance::namespace("metadata");
    let bus = Bus::builder()
        .transport("kafka", common::transport(&ns).await)
        .build()
        .unwrap();
    bus.module("orders")
        .publish(OrderPlaced { id: 0 })
        .await
        .unwrap();
    bus.shutdown(Duration::from_secs(5)).await.unwrap();
    let topic = format!("t-{ns}.orders.order_placed");
    let group = format!("t-{ns}.probe");
    let kept = tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", common::brokers())
            .set("group.id", group)
            .create()
            .unwrap();
        let mut offsets = TopicPartitionList::new();
        offsets
            .add_partition_offset(&topic, 0, Offset::Offset(0))
            .unwrap();
        offsets
            .find_partition(&topic, 0)
            .unwrap()
            .set_metadata("probe");
        consumer.commit(&offsets, CommitMode::Sync).unwrap();
        let back = consumer
            .committed_offsets(offsets, Duration::from_secs(10))
            .unwrap();
        let metadata = back
            .find_partition(&topic, 0)
            .unwrap()
            .metadata()
            .to_owned();
        metadata
    })
    .await
    .unwrap();
    common::cleanup(&ns).await;
    (kept != "probe").then(|| {
        format!("the broker does not keep offset-commit metadata (committed \"probe\", read back {kept:?})")
    })
}

fn a_record_delivered_past_the_delivery_limit_is_dead_lettered() {
    let _serial = common::one_at_a_time();
    block_on(async {
        let ns = seambus::conformance::namespace("crashloop");
        // Two processes in turn take the record and stop while their
        // handler still runs; the third receives it as its third delivery.
        let (dead, id, counted) = seambus::conformance::crash_loop(2, || async {
            let t = KafkaTransport::connect(common::config(&ns).with_delivery_limit(2)).await;
            Arc::new(t.unwrap()) as Arc<dyn Transport>
        })
        .await;
        assert_eq!(dead.envelope.id(), id);
        assert_eq!(dead.reason, DeadLetterReason::MaxAttempts);
        assert!(dead.error.contains("delivered 3 times"), "{}", dead.error);
        assert_eq!(counted, 1);
        common::cleanup(&ns).await;
    });
}
