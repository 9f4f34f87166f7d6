//! A message its consumers never get through (each process holding it
//! stops or dies) is dead-lettered by the engine once the quorum queue's
//! delivery count passes `delivery_limit`, before the broker would drop
//! it to the dead-letter queue on its own: so it is counted in `Stats`
//! and its dead letter says why.

mod common;

use std::sync::Arc;

use seambus::conformance::{block_on, broker_ready};
use seambus::transport::{DeadLetterReason, Transport};
use seambus_rabbitmq::RabbitMqTransport;

#[test]
fn a_message_redelivered_up_to_the_delivery_limit_is_dead_lettered_by_the_engine() {
    if !broker_ready(&common::Rabbit { restart: false }) {
        return;
    }
    block_on(async {
        let ns = seambus::conformance::namespace("crashloop");
        // With a limit of 2, the first process holds the message and stops
        // while its handler still runs; the second receives it as its
        // second delivery (or later: the stopping process may give it back
        // more than once), the last ones the broker allows.
        let (dead, id, counted) = seambus::conformance::crash_loop(1, || async {
            let t = RabbitMqTransport::connect(common::config(&ns).with_delivery_limit(2)).await;
            Arc::new(t.unwrap()) as Arc<dyn Transport>
        })
        .await;
        assert_eq!(dead.envelope.id(), id);
        assert_eq!(dead.reason, DeadLetterReason::MaxAttempts);
        assert!(
            dead.error.contains("over the delivery limit"),
            "{}",
            dead.error
        );
        assert_eq!(counted, 1, "counted");
        common::cleanup(&ns).await;
    });
}
