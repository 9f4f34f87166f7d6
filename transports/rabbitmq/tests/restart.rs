//! RabbitMQ restarts (`rabbitmqctl stop`, `rabbitmq-server -detached`)
//! while 10,000 events flow through two groups; every id arrives in both,
//! and the broker is left running. Alone in this binary.

mod common;

use seambus::conformance::{block_on, broker_ready, broker_restart_with, Harness};

#[test]
fn ten_thousand_events_survive_a_broker_restart_in_two_groups() {
    // Whatever happens, the broker is left running.
    let _restore = common::RestoreBroker;
    block_on(async {
        let harness = common::Rabbit { restart: true };
        if !broker_ready(&harness) {
            return;
        }
        let Some(restart) = harness.restart_broker() else {
            eprintln!(
                "SKIPPED: {} is not the local broker this test may restart",
                common::url()
            );
            return;
        };
        broker_restart_with(&harness, restart, 10_000).await;
    });
}
