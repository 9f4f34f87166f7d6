#![doc = include_str!("../README.md")]

mod config;
mod context;
mod error;
mod publisher;
mod source;
mod wire;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::{Header, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, Producer as _};
use rdkafka::{Offset, TopicPartitionList};
use seambus::transport::engine::Host;
use seambus::transport::support::{dead_letter_from, outgoing};
use seambus::transport::{
    Capabilities, Consumer, DeadLetter, DeliveryHandler, GroupId, ShutdownReport, SubscriptionSpec,
    Transport,
};
use seambus::{Envelope, Error, ErrorKind, Result};
use uuid::Uuid;

pub use config::{KafkaConfig, Security};
pub use context::ClientLog;

use crate::error::kafka_error;
use crate::publisher::{send, Topics};
use crate::wire::{envelope_of, header_pairs, headers_of, ATTEMPT, DL_PREFIX, REDRIVE_GROUP};

/// Room kept for headers below `message.max.bytes`.
const HEADER_ROOM: usize = 8 * 1024;

/// Header of a marker record in a dead-letter topic: the dead letter with
/// this id was redriven.
const REDRIVEN: &str = "seambus-redriven-id";

/// A [`Transport`] over Kafka (any broker that speaks the Kafka protocol).
/// See the crate docs for the mapping.
#[derive(Clone)]
pub struct KafkaTransport {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for KafkaTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaTransport")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

pub(crate) struct Inner {
    pub(crate) config: KafkaConfig,
    pub(crate) producer: FutureProducer<ClientLog>,
    /// The clients' log, shared (an outage is said once).
    pub(crate) log: ClientLog,
    pub(crate) topics: Topics,
    /// Shut down or not, the subscriptions and their signals.
    pub(crate) host: Host,
}

impl KafkaTransport {
    /// Creates the clients and checks that the cluster answers (within
    /// `publish_timeout`).
    pub async fn connect(config: KafkaConfig) -> Result<Self> {
        config.validate()?;
        let mut producer = config.client_config();
        producer
            .set("enable.idempotence", config.idempotence.to_string())
            .set("acks", "all")
            .set("linger.ms", "5")
            .set(
                "message.timeout.ms",
                config.publish_timeout.as_millis().max(1).to_string(),
            )
            .set("message.max.bytes", config.message_max_bytes.to_string());
        let log = ClientLog::default();
        let producer: FutureProducer<ClientLog> = config
            .finish(producer)
            .create_with_context(log.clone())
            .map_err(|e| kafka_error("create producer", e))?;
        let probe = producer.clone();
        let timeout = config.publish_timeout.min(Duration::from_secs(10));
        tokio::task::spawn_blocking(move || probe.client().fetch_metadata(None, timeout))
            .await
            .map_err(|e| Error::new(ErrorKind::Other, format!("metadata task: {e}")))?
            .map_err(|e| {
                kafka_error(
                    &format!("no Kafka cluster answers at {}", config.bootstrap_servers),
                    e,
                )
            })?;
        let topics = Topics::new(&config, &log)?;
        let host = Host::new("Kafka");
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                producer,
                log,
                topics,
                host,
            }),
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &KafkaConfig {
        &self.inner.config
    }

    /// The producer, for anything this crate does not cover.
    pub fn producer(&self) -> &FutureProducer<ClientLog> {
        &self.inner.producer
    }

    /// Deletes topics (by name); one that does not exist is not an error.
    /// For tests and tear-down.
    pub async fn delete_topics(&self, topics: &[&str]) -> Result<()> {
        use rdkafka::types::RDKafkaErrorCode as Code;
        let results = admin_retry(|| async {
            self.inner
                .topics
                .admin()
                .delete_topics(topics, &rdkafka::admin::AdminOptions::new())
                .await
                .map_err(|e| kafka_error("delete topics", e))
        })
        .await?;
        for result in results {
            match result {
                Ok(topic) | Err((topic, Code::UnknownTopicOrPartition)) => {
                    self.inner.topics.forget(&topic)
                }
                Err((topic, code)) => {
                    return Err(kafka_error(
                        &format!("delete topic {topic}"),
                        rdkafka::error::KafkaError::AdminOp(code),
                    ))
                }
            }
        }
        Ok(())
    }

    /// Deletes one group: its consumer group (committed offsets) and its
    /// dead-letter topic, without joining it: for a subscription that is
    /// retired, or a reset. The event topics stay for the other groups.
    /// Deleting a group that does not exist is Ok. There is no undo; the
    /// broker refuses to delete a group that still has members.
    pub async fn delete_group(&self, group: &GroupId) -> Result<()> {
        use rdkafka::types::RDKafkaErrorCode as Code;
        let admin = self.inner.topics.admin();
        let options = rdkafka::admin::AdminOptions::new();
        let group_id = self.inner.config.group_id(group);
        let results = admin_retry(|| async {
            admin
                .delete_groups(&[group_id.as_str()], &options)
                .await
                .map_err(|e| kafka_error(&format!("delete consumer group {group_id}"), e))
        })
        .await?;
        for result in results {
            match result {
                Ok(_) | Err((_, Code::GroupIdNotFound)) => {}
                Err((_, code)) => {
                    return Err(kafka_error(
                        &format!("delete consumer group {group_id}"),
                        rdkafka::error::KafkaError::AdminOp(code),
                    ))
                }
            }
        }
        let topic = self.inner.config.dead_letter_topic(group);
        self.delete_topics(&[topic.as_str()]).await
    }

    /// Every record of the group's dead-letter topic, oldest first.
    async fn read_dead_letter_topic(&self, group: &GroupId) -> Result<Vec<OwnedMessage>> {
        let topic = self.inner.config.dead_letter_topic(group);
        self.inner.topics.ensure(&topic).await?;
        let mut client = self.inner.config.client_config();
        client
            .set(
                "group.id",
                format!("seambus-dl-reader-{}", Uuid::now_v7().simple()),
            )
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false");
        let reader: BaseConsumer<ClientLog> = self
            .inner
            .config
            .finish(client)
            .create_with_context(self.inner.log.clone())
            .map_err(|e| kafka_error("create dead-letter reader", e))?;
        let timeout = self.inner.config.publish_timeout;
        tokio::task::spawn_blocking(move || read_all(&reader, &topic, timeout))
            .await
            .map_err(|e| Error::new(ErrorKind::Other, format!("dead-letter reader task: {e}")))?
    }

    /// The group's dead letters not yet redriven, with their records.
    async fn pending_dead_letters(
        &self,
        group: &GroupId,
    ) -> Result<Vec<(DeadLetter, OwnedMessage)>> {
        let records = self.read_dead_letter_topic(group).await?;
        let redriven: HashSet<String> = records
            .iter()
            .filter_map(|r| {
                header_pairs(r.headers())
                    .into_iter()
                    .find(|(k, _)| k == REDRIVEN)
                    .map(|(_, v)| v)
            })
            .collect();
        Ok(records
            .into_iter()
            .filter_map(|record| {
                let pairs = header_pairs(record.headers());
                if pairs.iter().any(|(k, _)| k == REDRIVEN) {
                    return None;
                }
                let dl = dead_letter_of(group, &pairs, record.payload().unwrap_or_default());
                (!redriven.contains(&dl.envelope.id().to_string())).then_some((dl, record))
            })
            .collect())
    }
}

/// Reads a topic from its start to its current end.
fn read_all(
    reader: &BaseConsumer<ClientLog>,
    topic: &str,
    timeout: Duration,
) -> Result<Vec<OwnedMessage>> {
    let metadata = reader
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| kafka_error(&format!("metadata of {topic}"), e))?;
    let mut ends = std::collections::HashMap::new();
    let mut assignment = TopicPartitionList::new();
    for partition in metadata.topics().iter().flat_map(|t| t.partitions()) {
        let (low, high) = reader
            .fetch_watermarks(topic, partition.id(), timeout)
            .map_err(|e| kafka_error(&format!("watermarks of {topic}"), e))?;
        if high > low {
            ends.insert(partition.id(), high);
            assignment
                .add_partition_offset(topic, partition.id(), Offset::Offset(low))
                .map_err(|e| kafka_error("assign", e))?;
        }
    }
    let mut out = Vec::new();
    if ends.is_empty() {
        return Ok(out);
    }
    reader
        .assign(&assignment)
        .map_err(|e| kafka_error(&format!("assign {topic}"), e))?;
    let deadline = std::time::Instant::now() + timeout;
    while !ends.is_empty() {
        if std::time::Instant::now() > deadline {
            return Err(Error::new(
                ErrorKind::Timeout,
                format!("reading {topic} did not finish within {timeout:?}"),
            ));
        }
        match reader.poll(Duration::from_millis(200)) {
            Some(Ok(message)) => {
                let (partition, offset) = (message.partition(), message.offset());
                out.push(message.detach());
                if ends.get(&partition).is_some_and(|&end| offset + 1 >= end) {
                    ends.remove(&partition);
                }
            }
            Some(Err(e)) => return Err(kafka_error(&format!("read {topic}"), e)),
            None => {}
        }
    }
    Ok(out)
}

fn dead_letter_of(group: &GroupId, pairs: &[(String, String)], payload: &[u8]) -> DeadLetter {
    dead_letter_from(group, envelope_of(pairs, payload), payload, |name| {
        let name = if name == "origin" { "topic" } else { name };
        pairs
            .iter()
            .find(|(k, _)| k.strip_prefix(DL_PREFIX) == Some(name))
            .map(|(_, v)| v.clone())
    })
}

#[async_trait]
impl Transport for KafkaTransport {
    fn name(&self) -> &str {
        "kafka"
    }

    fn capabilities(&self) -> Capabilities {
        let mut caps = Capabilities::none();
        caps.persistent = true;
        caps.consumer_groups = true;
        caps.per_key_order = true;
        caps.per_key_order_across_consumers = true;
        // Room for the headers below `message.max.bytes`, so a payload the
        // bus lets through is never refused here for its headers.
        caps.max_payload = Some(
            self.inner
                .config
                .message_max_bytes
                .saturating_sub(HEADER_ROOM),
        );
        caps.replay = self.inner.config.replays();
        caps.dead_letter_store = true;
        caps.duplicates = true;
        caps
    }

    async fn publish(&self, envelope: Envelope) -> Result<()> {
        let _open = self.inner.host.admit().await?;
        let payload = outgoing(&envelope, "Kafka", None)?;
        let room = self
            .inner
            .config
            .message_max_bytes
            .saturating_sub(HEADER_ROOM);
        if payload.len() > room {
            return Err(Error::new(
                ErrorKind::PayloadTooLarge,
                format!(
                    "a payload of {} bytes is over the {room} that message.max.bytes leaves after the room for headers",
                    payload.len()
                ),
            ));
        }
        let attrs = envelope.attributes();
        let headers = headers_of(attrs);
        let header_bytes: usize = header_pairs(Some(&headers))
            .iter()
            .map(|(k, v)| k.len() + v.len() + 8)
            .sum();
        let size =
            payload.len() + header_bytes + attrs.partition_key.as_ref().map_or(0, String::len);
        if size > self.inner.config.message_max_bytes {
            return Err(Error::new(
                ErrorKind::PayloadTooLarge,
                format!(
                    "record of {size} bytes is over message.max.bytes ({})",
                    self.inner.config.message_max_bytes
                ),
            ));
        }
        let topic = self.inner.config.topic(&attrs.event_type);
        self.inner.topics.ensure(&topic).await?;
        send(
            &self.inner.producer,
            &topic,
            attrs.partition_key.as_deref().map(str::as_bytes),
            payload,
            headers,
            self.inner.config.publish_timeout,
        )
        .await?;
        self.inner.log.reached();
        Ok(())
    }

    async fn subscribe(
        &self,
        spec: SubscriptionSpec,
        handler: Arc<dyn DeliveryHandler>,
    ) -> Result<Box<dyn Consumer>> {
        let _open = self.inner.host.admit().await?;
        if spec.concurrency == 0 {
            return Err(crate::error::config_error("concurrency must be at least 1"));
        }
        source::subscribe(&self.inner, spec, handler).await
    }

    async fn dead_letters(&self, group: &GroupId) -> Result<Vec<DeadLetter>> {
        Ok(self
            .pending_dead_letters(group)
            .await?
            .into_iter()
            .map(|(dl, _)| dl)
            .collect())
    }

    async fn redrive(&self, group: &GroupId, ids: Option<&[Uuid]>) -> Result<usize> {
        let dead_topic = self.inner.config.dead_letter_topic(group);
        let group_id = self.inner.config.group_id(group);
        let timeout = self.inner.config.publish_timeout;
        let mut n = 0;
        for (dl, record) in self.pending_dead_letters(group).await? {
            let id = dl.envelope.id();
            if ids.is_some_and(|ids| !ids.contains(&id)) {
                continue;
            }
            let pairs = header_pairs(record.headers());
            let Some((_, topic)) = pairs
                .iter()
                .find(|(k, _)| k == &format!("{DL_PREFIX}topic"))
            else {
                continue;
            };
            // Back to its topic for this group only, then marked redriven.
            let mut headers = OwnedHeaders::new();
            // Dead-letter headers and any attempt go: it starts at attempt 1.
            for (k, v) in pairs
                .iter()
                .filter(|(k, _)| !k.starts_with(DL_PREFIX) && k != ATTEMPT)
            {
                headers = headers.insert(Header {
                    key: k,
                    value: Some(v.as_bytes()),
                });
            }
            headers = headers.insert(Header {
                key: REDRIVE_GROUP,
                value: Some(group_id.as_bytes()),
            });
            send(
                &self.inner.producer,
                topic,
                record.key(),
                record.payload().unwrap_or_default(),
                headers,
                timeout,
            )
            .await?;
            let marker = OwnedHeaders::new().insert(Header {
                key: REDRIVEN,
                value: Some(id.to_string().as_bytes()),
            });
            send(
                &self.inner.producer,
                &dead_topic,
                None,
                &[],
                marker,
                timeout,
            )
            .await?;
            n += 1;
        }
        Ok(n)
    }

    async fn shutdown(&self, deadline: Duration) -> Result<ShutdownReport> {
        let report = self.inner.host.shut_down(deadline).await;
        let producer = self.inner.producer.clone();
        let flushed = tokio::task::spawn_blocking(move || producer.flush(deadline)).await;
        if let Ok(Err(e)) = flushed {
            tracing::warn!(error = %e, "flushing the Kafka producer on shutdown failed");
        }
        Ok(report)
    }
}

/// Runs an admin request again, backing off (at most 4 more tries, about
/// 3 s in all), while it fails with an error a retry can change: a request
/// that timed out, as one does while a restarted broker finds its group
/// coordinator.
async fn admin_retry<T, F, Fut>(request: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    use backon::{ExponentialBuilder, Retryable};
    let backoff = ExponentialBuilder::default()
        .with_min_delay(std::time::Duration::from_millis(200))
        .with_max_times(4);
    request
        .retry(backoff)
        .when(seambus::Error::is_retryable)
        .notify(
            |e, after| tracing::debug!(error = %e, ?after, "admin request failed; trying again"),
        )
        .await
}

#[async_trait::async_trait]
impl seambus::config::Configurable for KafkaTransport {
    const KIND: &'static str = "kafka";
    type Config = KafkaConfig;

    /// `SEAMBUS_KAFKA_BROKERS`: the bootstrap servers.
    fn apply_env(config: &mut KafkaConfig, env: seambus::config::Env<'_>) -> Result<()> {
        if let Some(servers) = env("SEAMBUS_KAFKA_BROKERS") {
            *config = std::mem::take(config).with_bootstrap_servers(servers);
        }
        Ok(())
    }

    /// Topics and consumer groups start with the namespace.
    fn apply_namespace(config: &mut KafkaConfig, namespace: &str) {
        *config = std::mem::take(config)
            .with_topic_prefix(namespace)
            .with_group_prefix(namespace);
    }

    async fn connect_config(config: KafkaConfig) -> Result<Self> {
        Self::connect(config).await
    }
}
