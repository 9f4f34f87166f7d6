//! The core conformance suite against a real Kafka-protocol broker
//! (`SEAMBUS_TEST_KAFKA_BROKERS`, default 127.0.0.1:9092: the tansu that
//! `scripts/test` starts). The broker restart case runs in
//! `tests/restart.rs`, alone.
//!
//! Cases run one at a time: tansu 0.6.0's sqlite storage panics when
//! several idempotent producers initialise at once (its
//! `idempotent_message_check` finds more or less than one row), which takes
//! the whole broker down. A real Kafka does not need this.

mod common;

seambus::conformance_tests!(serial: common::Kafka { restart: false });
