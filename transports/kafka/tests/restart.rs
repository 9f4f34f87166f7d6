//! The broker process is stopped and started again on the same storage
//! while 10,000 events flow through two groups; every id arrives in both.
//! Alone in this binary; the broker is left running.

mod common;

use seambus::conformance::{block_on, broker_ready, broker_restart_with, Harness};

#[test]
fn ten_thousand_events_survive_a_broker_restart_in_two_groups() {
    let _restore = common::RestoreBroker;
    block_on(async {
        let harness = common::Kafka { restart: true };
        if !broker_ready(&harness) {
            return;
        }
        let Some(restart) = harness.restart_broker() else {
            eprintln!(
                "SKIPPED: {} is not the local broker this test may restart",
                common::brokers()
            );
            return;
        };
        broker_restart_with(&harness, restart, 10_000).await;
    });
}
