//! The bus of one harness run: the chosen transport, under names no other
//! run uses, and the clean-up of what it declared on the broker.

use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use seambus::{Bus, InProcessTransport};
use seambus_kafka::{KafkaConfig, KafkaTransport};
use seambus_nats::{NatsConfig, NatsTransport};
use seambus_rabbitmq::{RabbitMqConfig, RabbitMqTransport};

use super::{HarnessError, LoadEvent, Options, TransportKind};

/// How long connecting to a broker may take before the run gives up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// What to delete on the broker after the run.
pub(crate) enum Cleanup {
    None,
    Nats(Box<NatsConfig>),
    Rabbit(RabbitMqTransport),
    Kafka(KafkaTransport, Vec<String>),
}

/// A name prefix no other run shares: time and process id.
pub(crate) fn run_id() -> String {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    format!("{millis:x}{:x}", std::process::id())
}

/// The broker address as shown in reports: passwords in URLs redacted.
pub(crate) fn broker_address(options: &Options) -> Option<String> {
    match options.transport {
        TransportKind::InProcess => None,
        TransportKind::Nats => Some(redact(&options.nats_url)),
        TransportKind::Rabbitmq => Some(redact(&options.amqp_url)),
        TransportKind::Kafka => Some(options.kafka_brokers.clone()),
    }
}

/// `scheme://user:secret@host` -> `scheme://user:***@host`.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rsplit_once('@') {
        Some((user_info, host)) => {
            let user = user_info.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}{}", &rest[authority_end..])
        }
        None => url.to_owned(),
    }
}

/// `scheme://user:pw@host:port/path,...` -> `host:port` of the first server.
fn host_port(url: &str) -> String {
    let first = url.split(',').next().unwrap_or(url).trim();
    let rest = first.split_once("://").map_or(first, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest).to_owned()
}

/// Why the broker of `options` cannot be used: `None` when its first
/// address accepts a TCP connection (or the transport is in-process).
pub fn unavailable(options: &Options) -> Option<String> {
    let (what, url, flag) = match options.transport {
        TransportKind::InProcess => return None,
        TransportKind::Nats => ("NATS server", &options.nats_url, "--nats-url"),
        TransportKind::Rabbitmq => ("RabbitMQ broker", &options.amqp_url, "--amqp-url"),
        TransportKind::Kafka => ("Kafka broker", &options.kafka_brokers, "--kafka-brokers"),
    };
    let addr = host_port(url);
    let up = addr
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .is_some_and(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok());
    (!up).then(|| {
        format!(
            "no {what} answers at {addr} (start one, or point {flag} / its environment variable at one)"
        )
    })
}

/// Connects within [`CONNECT_TIMEOUT`], with a message that names the broker.
async fn connect<T>(
    what: &str,
    address: &str,
    connecting: impl std::future::Future<Output = seambus::Result<T>>,
) -> Result<T, HarnessError> {
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(e)) => Err(HarnessError::new(format!(
            "cannot connect to {what} at {address}: {e}"
        ))),
        Err(_) => Err(HarnessError::new(format!(
            "cannot connect to {what} at {address}: no answer within {CONNECT_TIMEOUT:?}"
        ))),
    }
}

/// Builds the bus on the chosen transport, checking first that its broker
/// answers.
pub(crate) async fn bus(options: &Options, id: &str) -> Result<(Bus, Cleanup), HarnessError> {
    if let Some(why) = unavailable(options) {
        return Err(HarnessError::new(why));
    }
    let builder = Bus::builder();
    let (builder, cleanup) = match options.transport {
        TransportKind::InProcess => (
            builder.transport(seambus::IN_PROCESS, InProcessTransport::default()),
            Cleanup::None,
        ),
        TransportKind::Nats => {
            let config = NatsConfig::default()
                .with_servers([options.nats_url.clone()])
                .with_stream_name(format!("BENCH_{id}"))
                .with_subject_prefix(format!("bench-{id}"));
            let address = redact(&options.nats_url);
            let t = connect("NATS", &address, NatsTransport::connect(config.clone())).await?;
            (
                builder.transport("nats", t),
                Cleanup::Nats(Box::new(config)),
            )
        }
        TransportKind::Rabbitmq => {
            let config = RabbitMqConfig::default()
                .with_uri(options.amqp_url.clone())
                .with_exchange(format!("bench-{id}"));
            let address = redact(&options.amqp_url);
            let t = connect("RabbitMQ", &address, RabbitMqTransport::connect(config)).await?;
            (builder.transport("rabbitmq", t.clone()), Cleanup::Rabbit(t))
        }
        TransportKind::Kafka => {
            let prefix = format!("bench-{id}");
            let config = KafkaConfig::default()
                .with_bootstrap_servers(options.kafka_brokers.clone())
                .with_topic_prefix(prefix.clone())
                .with_group_prefix(prefix.clone());
            let t = connect(
                "Kafka",
                &options.kafka_brokers,
                KafkaTransport::connect(config),
            )
            .await?;
            // `<prefix>.<event>`, and `<prefix>.dlq.<module>.<subscription>`
            // if anything was dead-lettered.
            let event = <LoadEvent as seambus::Event>::NAME;
            let mut topics = vec![format!("{prefix}.{event}")];
            topics.extend((0..options.modules).map(|m| format!("{prefix}.dlq.m{m}.{event}")));
            (
                builder.transport("kafka", t.clone()),
                Cleanup::Kafka(t, topics),
            )
        }
    };
    Ok((builder.build()?, cleanup))
}

impl Cleanup {
    /// Deletes the run's streams, queues, exchanges or topics (best effort:
    /// a failure is reported on stderr, not returned).
    pub(crate) async fn run(self) {
        let result = match self {
            Self::None => Ok(()),
            Self::Nats(config) => match NatsTransport::connect(*config).await {
                Ok(t) => t.delete_streams().await,
                Err(e) => Err(e),
            },
            Self::Rabbit(t) => t.delete_topology().await,
            Self::Kafka(t, topics) => {
                let names: Vec<&str> = topics.iter().map(String::as_str).collect();
                t.delete_topics(&names).await
            }
        };
        if let Err(e) = result {
            eprintln!("seambus-bench: warning: could not delete the run's broker state: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            redact("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
        assert_eq!(host_port("amqp://u:p@h:5672/%2f"), "h:5672");
        assert_eq!(host_port("nats://a:4222,nats://b:4222"), "a:4222");
        assert_eq!(host_port("k1:9092,k2:9092"), "k1:9092");
    }
}
