//! The core conformance suite against a real RabbitMQ
//! (`SEAMBUS_TEST_AMQP_URL`, default amqp://guest:guest@127.0.0.1:5672/%2f),
//! each case with a fresh exchange and queues. A `harness = false` test
//! target: one test per case, the cases that do not apply reported ignored.
//! The broker restart case (c15) stops the local broker (`rabbitmqctl
//! stop`) and starts it again (`rabbitmq-server -detached`) while 10,000
//! events flow through two groups; it runs alone, after every other case,
//! and leaves the broker running.

mod common;

seambus::conformance_tests!(common::Rabbit { restart: true });
