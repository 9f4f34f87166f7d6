//! The core conformance suite against a real Kafka-protocol broker
//! (`SEAMBUS_TEST_KAFKA_BROKERS`, default 127.0.0.1:9092: the tansu that
//! `scripts/test` starts). The broker restart case runs in
//! `tests/restart.rs`, alone.

mod common;

seambus::conformance_tests!(common::Kafka { restart: false });
