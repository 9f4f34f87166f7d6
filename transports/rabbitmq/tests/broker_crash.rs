//! Whether the broker itself survives `kill -9` with no Seambus code
//! involved: quorum queues declared with a raw lapin client just before
//! the broker is killed and started again must each take a confirmed
//! publish afterwards.
//!
//! Ignored by default: it kills the local broker, and RabbitMQ 3.10.8 (the
//! Debian package this machine runs) fails it: the queue declared last
//! comes back with no leader (`rabbitmq-queues quorum_status`: follower,
//! term 0, log index 0) and every publish to it is refused, while queues
//! that existed for a few seconds before the kill recover (see the crate
//! README, "Broker crashes"). Run it with
//! `cargo test -p seambus-rabbitmq --test broker_crash -- --ignored`.

mod common;

use std::time::Duration;

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};

const QUEUES: usize = 30;

async fn channel() -> lapin::Channel {
    let connection = Connection::connect(&common::url(), ConnectionProperties::default())
        .await
        .expect("connect");
    let channel = connection.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    channel
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "kills the local broker; RabbitMQ 3.10.8 fails it (see the crate README)"]
async fn quorum_queues_declared_just_before_kill_9_take_publishes_after_it() {
    if !common::local_broker_ready() {
        return;
    }
    let _restore = common::RestoreBroker;
    let ns = seambus::conformance::namespace("brokercrash");
    let names: Vec<String> = (0..QUEUES).map(|i| format!("t-{ns}.{i}")).collect();
    let ch = channel().await;
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    for name in &names {
        ch.queue_declare(
            name.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args.clone(),
        )
        .await
        .unwrap();
    }
    tokio::task::spawn_blocking(|| {
        common::broker("kill");
        common::broker("start");
    })
    .await
    .unwrap();
    let ch = channel().await;
    let mut refused = Vec::new();
    for name in &names {
        let confirm = async {
            ch.basic_publish(
                "".into(),
                name.as_str().into(),
                BasicPublishOptions::default(),
                b"after",
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?
            .await
        };
        match tokio::time::timeout(Duration::from_secs(40), confirm).await {
            Ok(Ok(c)) if c.is_ack() => {}
            other => refused.push(format!("{name}: {other:?}")),
        }
    }
    let ch = channel().await;
    for name in &names {
        let _ = ch
            .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    assert!(
        refused.is_empty(),
        "not confirmed after the crash: {refused:#?}"
    );
}
