//! The NATS server restarts while 10,000 events flow through two groups;
//! every id arrives in both. The test stops and starts the local server
//! itself (the Debian package's binary, with the documented command) and
//! leaves it running. Alone in this binary, so no other test sees the
//! outage.

mod common;

use seambus::conformance::{block_on, broker_ready, broker_restart_with, Harness};

#[test]
fn ten_thousand_events_survive_a_server_restart_in_two_groups() {
    // Whatever happens, the server is left running.
    let _restore = common::RestoreServer;
    block_on(async {
        let harness = common::Nats { restart: true };
        if !broker_ready(&harness) {
            return;
        }
        let Some(restart) = harness.restart_broker() else {
            eprintln!(
                "SKIPPED: {} is not the local server this test may restart",
                common::url()
            );
            return;
        };
        broker_restart_with(&harness, restart, 10_000).await;
    });
}
