//! The test harness: a real NATS server, fresh streams per case.

#![allow(dead_code, unreachable_pub)]

use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use seambus::conformance::Harness;
use seambus::transport::Transport;
use seambus_nats::{NatsConfig, NatsTransport};

pub const LOCAL_URL: &str = "nats://127.0.0.1:4222";

/// The server under test (`SEAMBUS_TEST_NATS_URL`, default loopback).
pub fn url() -> String {
    std::env::var("SEAMBUS_TEST_NATS_URL").unwrap_or_else(|_| LOCAL_URL.to_owned())
}

/// Stream and subject names of one test namespace.
pub fn config(namespace: &str) -> NatsConfig {
    NatsConfig::default()
        .with_servers([url()])
        .with_stream_name(format!("T_{namespace}"))
        .with_subject_prefix(format!("t-{namespace}"))
        // Short, so events a stopped consumer held come back quickly.
        .with_ack_wait(Duration::from_secs(2))
}

pub fn unreachable() -> Option<String> {
    let url = url();
    let host = url
        .trim_start_matches("nats://")
        .trim_start_matches("tls://");
    let host = host.rsplit('@').next().unwrap_or(host);
    let addr = host.to_socket_addrs().ok().and_then(|mut a| a.next());
    match addr {
        Some(addr) if TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok() => None,
        _ => Some(format!("no NATS server answers at {url}")),
    }
}

pub async fn transport(namespace: &str) -> NatsTransport {
    NatsTransport::connect(config(namespace))
        .await
        .expect("connect to NATS")
}

pub struct Nats {
    pub restart: bool,
}

#[async_trait::async_trait]
impl Harness for Nats {
    fn delete_group(
        &self,
        namespace: &str,
        group: &seambus::transport::GroupId,
    ) -> Option<BoxFuture<'static, seambus::Result<()>>> {
        let (namespace, group) = (namespace.to_owned(), group.clone());
        Some(Box::pin(async move {
            let t = NatsTransport::connect(config(&namespace)).await?;
            let deleted = t.delete_group(&group).await;
            let _ = t.shutdown(Duration::from_secs(5)).await;
            deleted
        }))
    }

    async fn transport(&self, namespace: &str) -> Arc<dyn Transport> {
        Arc::new(transport(namespace).await)
    }

    async fn cleanup(&self, namespace: &str) {
        if let Ok(t) = NatsTransport::connect(config(namespace)).await {
            let _ = t.delete_streams().await;
        }
    }

    fn unavailable(&self) -> Option<String> {
        unreachable()
    }

    fn restart_broker(&self) -> Option<BoxFuture<'static, ()>> {
        (self.restart
            && url() == LOCAL_URL
            && std::path::Path::new("/usr/sbin/nats-server").exists())
        .then(|| {
            Box::pin(async {
                // Whatever happens (a failed case drops this half-way),
                // the server is left running.
                let _restore = RestoreServer;
                restart_local_server().await
            }) as BoxFuture<'static, ()>
        })
    }

    fn restart_events(&self) -> u64 {
        10_000
    }
}

/// `scripts/broker ACTION nats` (the Debian package's server, with the
/// documented commands).
pub fn server(action: &str) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/broker");
    seambus::conformance::run_script(script, &[action, "nats"]);
}

/// Stops the local server and starts it again, then waits until it answers.
pub async fn restart_local_server() {
    tokio::task::spawn_blocking(|| server("restart"))
        .await
        .expect("restart task");
}

/// Starts the local server again when dropped, if a test left it stopped.
pub struct RestoreServer;

impl Drop for RestoreServer {
    fn drop(&mut self) {
        if url() == LOCAL_URL && unreachable().is_some() {
            server("start");
        }
    }
}
