//! The core conformance suite against a real NATS JetStream server
//! (`SEAMBUS_TEST_NATS_URL`, default nats://127.0.0.1:4222), each case on
//! fresh streams. A `harness = false` test target: one test per case, the
//! cases that do not apply reported ignored. The broker restart case (c15)
//! stops and starts the local server while 10,000 events flow through two
//! groups; it runs alone, after every other case, and leaves the server
//! running.

mod common;

seambus::conformance_tests!(common::Nats { restart: true });
