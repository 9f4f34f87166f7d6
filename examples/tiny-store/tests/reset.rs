//! `tiny-store reset` only deletes: it starts no module, declares
//! nothing and consumes nothing. Here the namespace's queues were declared
//! with other settings than the shop's (classic queues, the shop declares
//! quorum queues) and an event waits in one: a reset that subscribed would
//! fail on the inequivalent queue (and consume the event); this one deletes
//! the group's queues with the event in them.

mod common;

use std::time::Duration;

use seambus::transport::{GroupId, Transport};
use seambus::{Bus, Context, HandlerError, Received};
use seambus_rabbitmq::{QueueType, RabbitMqConfig, RabbitMqTransport};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, seambus::Event)]
#[event(name = "orders.order_placed")]
struct OrderPlaced {
    order: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_deletes_without_starting_a_module() {
    let settings = common::settings("reset", "*=rabbitmq");
    if !common::broker_ready("rabbitmq") {
        return;
    }
    let config = RabbitMqConfig::default()
        .with_uri(common::brokers().rabbitmq_url)
        .with_exchange(settings.namespace.clone())
        .with_queue_type(QueueType::Classic);
    let transport = RabbitMqTransport::connect(config.clone()).await.unwrap();
    let bus = Bus::builder()
        .transport("rabbitmq", transport)
        .build()
        .unwrap();
    // Inventory's group on `orders.order_placed`, declared, then closed
    // with an event waiting in it.
    let subscription = bus
        .module("inventory")
        .subscribe(|_e: Received<OrderPlaced>, _ctx: Context| async { Ok::<(), HandlerError>(()) })
        .await
        .unwrap();
    subscription.close().await.unwrap();
    bus.module("orders")
        .publish(OrderPlaced { order: 1 })
        .await
        .unwrap();
    bus.shutdown(Duration::from_secs(5)).await.unwrap();

    tiny_store::reset(&settings)
        .await
        .expect("reset deletes whatever settings the queues were declared with");

    // The group's queues are gone, and the event with them.
    let check = RabbitMqTransport::connect(config).await.unwrap();
    let group = GroupId::new("inventory", "orders.order_placed");
    let err = check
        .dead_letters(&group)
        .await
        .expect_err("the group's dead-letter queue was deleted");
    assert!(err.to_string().contains("NOT_FOUND"), "{err}");
    check.shutdown(Duration::from_secs(5)).await.unwrap();
}
