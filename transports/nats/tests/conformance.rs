//! The core conformance suite against a real NATS JetStream server
//! (`SEAMBUS_TEST_NATS_URL`, default nats://127.0.0.1:4222). The broker
//! restart case runs in `tests/restart.rs`, alone, since it stops the
//! server every other case here is using.

mod common;

seambus::conformance_tests!(common::Nats { restart: false });
