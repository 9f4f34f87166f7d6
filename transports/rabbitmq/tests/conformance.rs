//! The core conformance suite against a real RabbitMQ
//! (`SEAMBUS_TEST_AMQP_URL`, default amqp://guest:guest@127.0.0.1:5672/%2f).
//! The broker restart case runs in `tests/restart.rs`, alone.

mod common;

seambus::conformance_tests!(common::Rabbit { restart: false });
