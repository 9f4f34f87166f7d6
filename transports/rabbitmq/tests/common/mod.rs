//! The test harness: a real RabbitMQ, fresh exchange and queues per case.

#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures_util::future::BoxFuture;
use seambus::conformance::Harness;
use seambus::transport::Transport;
use seambus_rabbitmq::{RabbitMqConfig, RabbitMqTransport};

pub const LOCAL_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The broker under test (`SEAMBUS_TEST_AMQP_URL`, default loopback).
pub fn url() -> String {
    std::env::var("SEAMBUS_TEST_AMQP_URL").unwrap_or_else(|_| LOCAL_URL.to_owned())
}

pub fn config(namespace: &str) -> RabbitMqConfig {
    RabbitMqConfig::default()
        .with_uri(url())
        .with_exchange(format!("t-{namespace}"))
        .with_publish_timeout(Duration::from_secs(60))
}

pub fn unreachable() -> Option<String> {
    let url = url();
    let rest = url.split_once("://").map_or(url.as_str(), |(_, r)| r);
    let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let host = host.split('/').next().unwrap_or(host);
    let addr = host.to_socket_addrs().ok().and_then(|mut a| a.next());
    match addr {
        Some(addr) if TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok() => None,
        _ => Some(format!("no RabbitMQ answers at {host}")),
    }
}

/// Whether the broker answers and is the local one, which `rabbitmqctl`
/// controls (a test that stops it or changes it on the node needs it; it
/// says SKIPPED otherwise).
pub fn local_broker_ready() -> bool {
    if !seambus::conformance::broker_ready(&Rabbit { restart: false }) {
        return false;
    }
    if url() != LOCAL_URL {
        eprintln!("SKIPPED: rabbitmqctl controls only the local broker");
        return false;
    }
    true
}

/// Transports made per namespace, so cleanup can delete what they declared.
fn made() -> &'static Mutex<HashMap<String, Vec<RabbitMqTransport>>> {
    static MADE: OnceLock<Mutex<HashMap<String, Vec<RabbitMqTransport>>>> = OnceLock::new();
    MADE.get_or_init(Mutex::default)
}

pub async fn transport(namespace: &str) -> RabbitMqTransport {
    let t = RabbitMqTransport::connect(config(namespace))
        .await
        .expect("connect to RabbitMQ");
    made()
        .lock()
        .unwrap()
        .entry(namespace.to_owned())
        .or_default()
        .push(t.clone());
    t
}

pub async fn cleanup(namespace: &str) {
    let made = made().lock().unwrap().remove(namespace).unwrap_or_default();
    for t in made {
        let _ = t.delete_topology().await;
    }
}

pub struct Rabbit {
    pub restart: bool,
}

#[async_trait::async_trait]
impl Harness for Rabbit {
    fn delete_group(
        &self,
        namespace: &str,
        group: &seambus::transport::GroupId,
    ) -> Option<BoxFuture<'static, seambus::Result<()>>> {
        let (namespace, group) = (namespace.to_owned(), group.clone());
        Some(Box::pin(async move {
            let t = RabbitMqTransport::connect(config(&namespace)).await?;
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
        (self.restart && url() == LOCAL_URL).then(|| {
            Box::pin(async {
                // Whatever happens (a failed case drops this half-way), the
                // broker is left running.
                let _restore = RestoreBroker;
                restart_local_broker().await
            }) as BoxFuture<'static, ()>
        })
    }

    fn restart_events(&self) -> u64 {
        10_000
    }
}

/// `scripts/broker ACTION rabbitmq` (the Debian package's node, with
/// `rabbitmqctl` and `rabbitmq-server -detached`).
pub fn broker(action: &str) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/broker");
    seambus::conformance::run_script(script, &[action, "rabbitmq"]);
}

/// Stops the local broker cleanly and starts it again, waiting until it
/// has booted.
pub async fn restart_local_broker() {
    tokio::task::spawn_blocking(|| broker("restart"))
        .await
        .expect("restart task");
}

/// Starts the local broker again when dropped, if a test left it stopped.
pub struct RestoreBroker;

impl Drop for RestoreBroker {
    fn drop(&mut self) {
        if url() == LOCAL_URL && unreachable().is_some() {
            broker("start");
        }
    }
}
