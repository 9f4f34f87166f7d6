//! The core conformance suite against a real Kafka-protocol broker
//! (`SEAMBUS_TEST_KAFKA_BROKERS`, default 127.0.0.1:9092: the tansu that
//! `scripts/test` starts). A `harness = false` test target: one test per
//! case, the cases that do not apply reported ignored.
//!
//! Cases run one at a time: tansu 0.6.0's sqlite storage panics when
//! several idempotent producers initialise at once (its
//! `idempotent_message_check` finds more or less than one row), which takes
//! the whole broker down. A real Kafka does not need this.
//!
//! The broker restart case (c15) runs last: it restarts the local broker
//! on the same storage while two groups consume 10,000 events, all
//! published before the restart (tansu 0.6.0 cannot take a producer that
//! sends across its restart; see `common::Kafka`), and leaves it running.

mod common;

seambus::conformance_tests!(serial: common::Kafka { restart: true });
