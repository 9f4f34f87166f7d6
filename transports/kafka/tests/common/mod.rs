//! The test harness: a real Kafka-protocol broker, fresh topics and groups
//! per case.

#![allow(dead_code, unreachable_pub)]

use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use rdkafka::producer::Producer as _;
use seambus::conformance::Harness;
use seambus::transport::Transport;
use seambus_kafka::{KafkaConfig, KafkaTransport};

pub const LOCAL: &str = "127.0.0.1:9092";

/// The brokers under test (`SEAMBUS_TEST_KAFKA_BROKERS`, default loopback).
pub fn brokers() -> String {
    std::env::var("SEAMBUS_TEST_KAFKA_BROKERS").unwrap_or_else(|_| LOCAL.to_owned())
}

pub fn config(namespace: &str) -> KafkaConfig {
    KafkaConfig::default()
        .with_bootstrap_servers(brokers())
        .with_topic_prefix(format!("t-{namespace}"))
        .with_group_prefix(format!("t-{namespace}"))
        .with_publish_timeout(Duration::from_secs(60))
}

pub fn unreachable() -> Option<String> {
    let brokers = brokers();
    let first = brokers
        .split(',')
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned();
    let addr = first.to_socket_addrs().ok().and_then(|mut a| a.next());
    match addr {
        Some(addr) if TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok() => None,
        _ => Some(format!("no Kafka broker answers at {brokers}")),
    }
}

pub async fn transport(namespace: &str) -> KafkaTransport {
    KafkaTransport::connect(config(namespace))
        .await
        .expect("connect to Kafka")
}

/// `scripts/kafka-broker ACTION` (the local tansu the test suite runs).
pub fn broker(action: &str) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/kafka-broker");
    seambus::conformance::run_script(script, &[action]);
}

pub struct Kafka {
    pub restart: bool,
}

#[async_trait::async_trait]
impl Harness for Kafka {
    /// Not on the local tansu: tansu 0.6.0's storage panics on the next
    /// send of an idempotent producer that wrote to a topic since deleted
    /// (the group's dead-letter topic here), and the broker answers nothing
    /// after; against a real Kafka (`SEAMBUS_TEST_KAFKA_BROKERS`) the case
    /// runs.
    fn delete_group(
        &self,
        namespace: &str,
        group: &seambus::transport::GroupId,
    ) -> Option<BoxFuture<'static, seambus::Result<()>>> {
        if brokers() == LOCAL {
            return None;
        }
        let (namespace, group) = (namespace.to_owned(), group.clone());
        Some(Box::pin(async move {
            let t = KafkaTransport::connect(config(&namespace)).await?;
            let deleted = t.delete_group(&group).await;
            let _ = t.shutdown(Duration::from_secs(5)).await;
            deleted
        }))
    }

    async fn transport(&self, namespace: &str) -> Arc<dyn Transport> {
        Arc::new(transport(namespace).await)
    }

    async fn cleanup(&self, namespace: &str) {
        cleanup(namespace).await
    }

    fn unavailable(&self) -> Option<String> {
        unreachable()
    }

    fn restart_broker(&self) -> Option<BoxFuture<'static, ()>> {
        (self.restart && brokers() == LOCAL).then(|| {
            Box::pin(async {
                // Whatever happens (a failed case drops this half-way), the
                // broker is left running.
                let _restore = RestoreBroker;
                tokio::task::spawn_blocking(|| broker("restart"))
                    .await
                    .expect("restart task");
            }) as BoxFuture<'static, ()>
        })
    }

    /// Only the local tansu is restarted, and tansu 0.6.0 loses track of an
    /// idempotent producer across its own restart (its storage panics on
    /// that producer's next send; see the crate README): the restart case
    /// publishes everything first and restarts while the groups consume.
    fn publishes_across_restart(&self) -> bool {
        false
    }

    fn restart_events(&self) -> u64 {
        10_000
    }
}

/// Starts the local broker again when dropped, if a test left it stopped.
pub struct RestoreBroker;

impl Drop for RestoreBroker {
    fn drop(&mut self) {
        if brokers() == LOCAL && unreachable().is_some() {
            broker("start");
        }
    }
}

/// Deletes the namespace's topics (best effort: a broker may refuse).
pub async fn cleanup(namespace: &str) {
    let Ok(t) = KafkaTransport::connect(config(namespace)).await else {
        return;
    };
    let client = t.producer().clone();
    let prefix = format!("t-{namespace}.");
    let names = tokio::task::spawn_blocking(move || {
        client
            .client()
            .fetch_metadata(None, Duration::from_secs(10))
            .map(|m| {
                m.topics()
                    .iter()
                    .map(|t| t.name().to_owned())
                    .filter(|n| n.starts_with(&prefix))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    })
    .await
    .unwrap_or_default();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    if !names.is_empty() {
        let _ = t.delete_topics(&names).await;
    }
}

/// Tests of one binary that talk to the broker take this lock, one at a
/// time (see `tests/conformance.rs` for why tansu needs it).
pub fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}
