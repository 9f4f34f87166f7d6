#![doc = include_str!("../README.md")]

mod config;
mod connection;
mod error;
mod source;
mod wire;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::ExchangeKind;
use seambus::transport::engine::Host;
use seambus::transport::support::{dead_letter_from, outgoing};
use seambus::transport::{
    Capabilities, Consumer, DeadLetter, DeliveryHandler, GroupId, ShutdownReport, SubscriptionSpec,
    Transport,
};
use seambus::{Envelope, Error, Result};
use uuid::Uuid;

pub use config::{QueueType, RabbitMqConfig, TlsSettings};

use crate::connection::{dead_letter_exchange, Connector, GroupQueues};
use crate::error::amqp_error;
use crate::wire::{
    envelope_of, properties_of, publish_confirmed, publish_routed, value_text, Routed, ATTEMPT,
    DL_PREFIX,
};

/// The retry queues [`RabbitMqTransport::delete_group`] deletes: those of
/// attempts 2 to this.
const RETRY_QUEUES_SWEPT: u32 = 64;

/// A [`Transport`] over RabbitMQ. See the crate docs for the mapping.
#[derive(Clone)]
pub struct RabbitMqTransport {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RabbitMqTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitMqTransport")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

pub(crate) struct Inner {
    pub(crate) config: RabbitMqConfig,
    pub(crate) connector: Connector,
    /// Shut down or not, the subscriptions and their signals.
    pub(crate) host: Host,
    /// Queues declared by this transport, for [`RabbitMqTransport::delete_topology`].
    declared: Mutex<BTreeSet<String>>,
    /// Publishes confirmed that no group's queue received.
    unrouted: AtomicU64,
    /// One lock per group's dead-letter queue: a scan holds the messages it
    /// read unacknowledged until it ends, so two scans at once (listings, a
    /// redrive) would each miss what the other holds.
    scans: Mutex<HashMap<GroupId, Arc<tokio::sync::Mutex<()>>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl RabbitMqTransport {
    /// Connects (failing fast if the broker cannot be reached now; later
    /// losses are recovered on their own) and declares the exchange, so a
    /// publish succeeds before any group subscribes.
    pub async fn connect(config: RabbitMqConfig) -> Result<Self> {
        config.validate()?;
        let host = Host::new("RabbitMQ");
        let connector = Connector::new(config.clone(), host.closing().clone());
        let connection = connector
            .connection(Some(tokio::time::Instant::now()))
            .await?;
        declare_exchange(&connection, &config.exchange).await?;
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                connector,
                host,
                declared: Mutex::default(),
                unrouted: AtomicU64::new(0),
                scans: Mutex::default(),
            }),
        })
    }

    /// How many publishes this transport made that no group received: the
    /// broker confirmed them but no group's queue is bound to their event
    /// (no group subscribes to it yet). Such a publish is Ok, like on every
    /// transport; it is counted here and logged at debug level as
    /// "unrouted".
    pub fn unrouted(&self) -> u64 {
        self.inner.unrouted.load(SeqCst)
    }

    /// The configuration in use.
    pub fn config(&self) -> &RabbitMqConfig {
        &self.inner.config
    }

    /// Deletes the queues of the groups this transport subscribed, and the
    /// exchanges. For tests and tear-down; there is no undo.
    pub async fn delete_topology(&self) -> Result<()> {
        let channel = self.inner.connector.channel().await?;
        let queues: Vec<String> = lock(&self.inner.declared).iter().cloned().collect();
        for queue in queues {
            channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await
                .map_err(|e| amqp_error(&format!("delete queue {queue}"), e))?;
        }
        for exchange in [
            self.inner.config.exchange.clone(),
            dead_letter_exchange(&self.inner.config.exchange),
        ] {
            channel
                .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                .await
                .map_err(|e| amqp_error(&format!("delete exchange {exchange}"), e))?;
        }
        let _ = channel.close(200, "deleted".into()).await;
        Ok(())
    }

    /// Deletes one group's queues (work, dead-letter, and retry queues up
    /// to attempt 64), its events and dead letters with them, without
    /// subscribing: for a subscription that is retired, or a reset. Deleting a group that does
    /// not exist is Ok. There is no undo; a process still consuming from
    /// the group loses its consumer and declares the queues again.
    pub async fn delete_group(&self, group: &GroupId) -> Result<()> {
        let queues = GroupQueues::new(&self.inner.config.exchange, group);
        let channel = self.inner.connector.channel().await?;
        // Deleting a queue that does not exist is Ok on RabbitMQ, so the
        // retry queues are deleted up to attempt `RETRY_QUEUES_SWEPT`
        // whatever the subscription's max attempts were.
        let names = [queues.work.clone(), queues.dead.clone()]
            .into_iter()
            .chain((2..=RETRY_QUEUES_SWEPT).map(|n| queues.retry(n)));
        for queue in names {
            channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await
                .map_err(|e| amqp_error(&format!("delete queue {queue}"), e))?;
        }
        let _ = channel.close(200, "deleted".into()).await;
        let mut declared = lock(&self.inner.declared);
        declared.retain(|q| !queues.holds(q));
        Ok(())
    }

    /// Reads the group's dead-letter queue. Messages stay unacknowledged on
    /// a private channel; `keep(id)` says which to take out (acked after
    /// `take` stored them), the rest return to the queue when the channel
    /// closes. Scans of one group in this process take turns, so each sees
    /// the whole queue (a scan from another process at the same moment
    /// still hides what it holds; see the README).
    async fn scan_dead_letters<F, Fut>(
        &self,
        group: &GroupId,
        mut take: F,
    ) -> Result<Vec<DeadLetter>>
    where
        F: FnMut(DeadLetter, Vec<u8>, lapin::BasicProperties) -> Fut,
        Fut: std::future::Future<Output = Result<bool>>,
    {
        let turn = lock(&self.inner.scans)
            .entry(group.clone())
            .or_default()
            .clone();
        let _turn = turn.lock().await;
        let queues = GroupQueues::new(&self.inner.config.exchange, group);
        let channel = self.inner.connector.channel().await?;
        let mut seen = Vec::new();
        let result = async {
            loop {
                let got = channel
                    .basic_get(queues.dead.as_str().into(), BasicGetOptions::default())
                    .await
                    .map_err(|e| amqp_error(&format!("read {}", queues.dead), e))?;
                let Some(message) = got else { break };
                let delivery = message.delivery;
                let dl = dead_letter_of(group, &delivery.properties, &delivery.data);
                seen.push(dl.clone());
                if take(dl, delivery.data.clone(), delivery.properties.clone()).await? {
                    delivery
                        .acker
                        .ack(BasicAckOptions::default())
                        .await
                        .map_err(|e| amqp_error("ack a redriven dead letter", e))?;
                }
            }
            Ok::<_, Error>(())
        }
        .await;
        let _ = channel.close(200, "scanned".into()).await;
        result.map(|()| seen)
    }
}

/// Declares (idempotently, as [`connection::declare_group`] does) the
/// topic exchange events are published to.
async fn declare_exchange(connection: &lapin::Connection, exchange: &str) -> Result<()> {
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| amqp_error("open channel", e))?;
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| amqp_error(&format!("declare exchange {exchange}"), e))?;
    let _ = channel.close(200, "declared".into()).await;
    Ok(())
}

/// Reads a dead letter back from its message.
fn dead_letter_of(group: &GroupId, properties: &lapin::BasicProperties, data: &[u8]) -> DeadLetter {
    let headers = properties.headers().clone().unwrap_or_default();
    let (envelope, _) = envelope_of(properties, data);
    dead_letter_from(group, envelope, data, |name| {
        let name = if name == "origin" {
            "routing-key"
        } else {
            name
        };
        headers
            .inner()
            .get(format!("{DL_PREFIX}{name}").as_str())
            .and_then(value_text)
    })
}

#[async_trait]
impl Transport for RabbitMqTransport {
    fn name(&self) -> &str {
        "rabbitmq"
    }

    fn capabilities(&self) -> Capabilities {
        let mut caps = Capabilities::none();
        caps.persistent = true;
        caps.consumer_groups = true;
        caps.per_key_order = true;
        caps.max_payload = Some(self.inner.config.max_message_size);
        caps.dead_letter_store = true;
        caps.duplicates = true;
        caps
    }

    async fn publish(&self, envelope: Envelope) -> Result<()> {
        let _open = self.inner.host.admit().await?;
        let max = self.inner.config.max_message_size;
        let payload = outgoing(&envelope, "RabbitMQ", Some(max))?;
        let attrs = envelope.attributes();
        let routed = publish_routed(
            &self.inner.connector,
            &self.inner.config.exchange,
            &attrs.event_type,
            payload,
            properties_of(attrs, 1),
            self.inner.config.publish_timeout,
        )
        .await?;
        if routed == Routed::Unrouted {
            self.inner.unrouted.fetch_add(1, SeqCst);
            tracing::debug!(
                event = %attrs.event_type,
                id = %attrs.id,
                exchange = %self.inner.config.exchange,
                "unrouted: no group subscribes to the event; accepted and stored nowhere"
            );
        }
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
        let queues = GroupQueues::new(&self.inner.config.exchange, &spec.group);
        {
            let mut declared = lock(&self.inner.declared);
            declared.insert(queues.work.clone());
            declared.insert(queues.dead.clone());
            for n in 2..=spec.retry.max_attempts.max(2) {
                declared.insert(queues.retry(n));
            }
        }
        source::subscribe(&self.inner, spec, handler).await
    }

    async fn dead_letters(&self, group: &GroupId) -> Result<Vec<DeadLetter>> {
        self.scan_dead_letters(group, |_, _, _| async { Ok(false) })
            .await
    }

    async fn redrive(&self, group: &GroupId, ids: Option<&[Uuid]>) -> Result<usize> {
        let queues = GroupQueues::new(&self.inner.config.exchange, group);
        let count = std::sync::atomic::AtomicUsize::new(0);
        let count = &count;
        let inner = &self.inner;
        self.scan_dead_letters(group, |dl, data, properties| {
            let wanted = ids.is_none_or(|ids| ids.contains(&dl.envelope.id()));
            let work = queues.work.clone();
            async move {
                if !wanted {
                    return Ok(false);
                }
                // Straight to this group's work queue (no other group sees
                // it), attempts counted afresh, reason headers dropped.
                let properties = wire::with_headers(&properties, |h| {
                    let kept: std::collections::BTreeMap<_, _> = h
                        .inner()
                        .iter()
                        .filter(|(k, _)| !k.as_str().starts_with(DL_PREFIX))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                    *h = kept.into();
                    h.insert(ATTEMPT.into(), AMQPValue::LongLongInt(1));
                });
                publish_confirmed(
                    &inner.connector,
                    "",
                    &work,
                    &data,
                    properties,
                    inner.config.publish_timeout,
                )
                .await?;
                count.fetch_add(1, SeqCst);
                Ok(true)
            }
        })
        .await?;
        Ok(count.load(SeqCst))
    }

    async fn shutdown(&self, deadline: Duration) -> Result<ShutdownReport> {
        let report = self.inner.host.shut_down(deadline).await;
        self.inner.connector.close().await;
        Ok(report)
    }
}

#[async_trait::async_trait]
impl seambus::config::Configurable for RabbitMqTransport {
    const KIND: &'static str = "rabbitmq";
    type Config = RabbitMqConfig;

    /// `SEAMBUS_RABBITMQ_URL`: the AMQP URI.
    fn apply_env(config: &mut RabbitMqConfig, env: seambus::config::Env<'_>) -> Result<()> {
        if let Some(uri) = env("SEAMBUS_RABBITMQ_URL") {
            *config = std::mem::take(config).with_uri(uri);
        }
        Ok(())
    }

    /// The exchange (and so every queue's name) is the namespace.
    fn apply_namespace(config: &mut RabbitMqConfig, namespace: &str) {
        *config = std::mem::take(config).with_exchange(namespace);
    }

    async fn connect_config(config: RabbitMqConfig) -> Result<Self> {
        Self::connect(config).await
    }
}
