//! No password or token reaches a log, at any level, also from the NATS
//! client library: credentials in a server URL are handed to the client as
//! options, never inside the URLs it prints.

mod common;

use seambus::conformance::{block_on, Harness, Logs};
use seambus_nats::NatsTransport;

#[test]
fn credentials_in_a_server_url_never_reach_the_logs() {
    if !seambus::conformance::broker_ready(&common::Nats { restart: false }) {
        return;
    }
    let captured = Logs::capture();
    block_on(async {
        let ns = seambus::conformance::namespace("secrets");
        let url = common::url().replacen("nats://", "nats://alice:hunter2-pw@", 1);
        let token_url = common::url().replacen("nats://", "nats://s3cr3t-token@", 1);
        for server in [url, token_url] {
            let config = common::config(&ns).with_servers([server]);
            // The test server has no authentication: it takes any.
            let transport = NatsTransport::connect(config).await.expect("connect");
            transport.client().flush().await.unwrap();
            drop(transport);
        }
        common::Nats { restart: false }.cleanup(&ns).await;
    });
    let logs = captured.text();
    assert!(
        logs.contains("connect"),
        "the client's debug logs were captured: {logs}"
    );
    for secret in ["hunter2-pw", "s3cr3t-token"] {
        assert!(!logs.contains(secret), "{secret} in the logs:\n{logs}");
    }
}
