//! One connection per transport, re-established with backoff when it
//! drops; confirm-mode channels for publishing, one per destination;
//! topology declarations.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use lapin::options::{
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ExchangeKind};
use seambus::transport::GroupId;
use seambus::Result;
use tokio::sync::Mutex;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use seambus::transport::support::redact_url;

use crate::config::{QueueType, RabbitMqConfig};
use crate::error::{amqp_error, connection_error};

/// How long one attempt to connect (TCP, TLS and the AMQP handshake) may
/// take: a broker that accepts the socket and never answers (one that is
/// starting, or refuses the vhost) must not hold up every reconnect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long closing a connection may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most publishing lanes kept open; past it idle ones are closed.
const MAX_LANES: usize = 64;

/// One AMQP connection, opened on demand and again after a loss.
#[derive(Default)]
struct Link {
    current: Mutex<Option<Arc<Connection>>>,
}

impl Link {
    /// Closes the connection, waiting a bounded time.
    async fn close(&self, why: &str) {
        let current = self.current.lock().await.take();
        if let Some(c) = current {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, c.close(200, why.into())).await;
        }
    }
}

/// A publishing lane: its own connection and confirm-mode channel.
pub(crate) struct Lane {
    name: String,
    link: Link,
    channel: Mutex<Option<Channel>>,
}

/// Keeps the connections: one for consuming (and declaring, scanning
/// dead letters), and one per publishing lane. A lane is an event's
/// publishes, or one group's retry and dead-letter copies. RabbitMQ's flow
/// control blocks a whole connection when a queue it publishes to stops
/// taking messages (a quorum queue without a leader), so one queue's
/// trouble holds up only the lane that routes to it.
pub(crate) struct Connector {
    config: RabbitMqConfig,
    consuming: Link,
    lanes: std::sync::Mutex<HashMap<String, Arc<Lane>>>,
    closing: CancellationToken,
    /// The broker was found unreachable and has not been reached since
    /// (logged once per outage, not once per connection and retry).
    outage: AtomicBool,
}

impl Connector {
    pub(crate) fn new(config: RabbitMqConfig, closing: CancellationToken) -> Self {
        Self {
            config,
            consuming: Link::default(),
            lanes: std::sync::Mutex::default(),
            closing,
            outage: AtomicBool::new(false),
        }
    }

    async fn connect_once(&self) -> Result<Connection> {
        let uri = &self.config.uri;
        let connect = async {
            if uri.starts_with("amqps://") {
                let runtime = lapin::runtime::default_runtime()
                    .map_err(|e| amqp_error("no async runtime for lapin", e))?;
                Connection::connect_with_config(
                    uri,
                    self.config.properties(),
                    self.config.tls_config()?,
                    runtime,
                )
                .await
            } else {
                Connection::connect(uri, self.config.properties()).await
            }
            .map_err(|e| connection_error(format!("cannot connect to {}: {e}", redact_url(uri)), e))
        };
        tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .unwrap_or_else(|_| {
                Err(seambus::Error::new(
                    seambus::ErrorKind::Connection,
                    format!(
                        "cannot connect to {}: no answer within {CONNECT_TIMEOUT:?}",
                        redact_url(uri)
                    ),
                ))
            })
    }

    /// The consuming connection: the current one, or a new one, trying
    /// with backoff until `deadline` (or forever with `None`) unless
    /// closing.
    pub(crate) async fn connection(&self, deadline: Option<Instant>) -> Result<Arc<Connection>> {
        self.connect(&self.consuming, deadline).await
    }

    /// A new channel on the consuming connection (declarations, scans,
    /// deletions), waiting for the connection as long as it takes.
    pub(crate) async fn channel(&self) -> Result<Channel> {
        self.connection(None)
            .await?
            .create_channel()
            .await
            .map_err(|e| amqp_error("open channel", e))
    }

    async fn connect(&self, link: &Link, deadline: Option<Instant>) -> Result<Arc<Connection>> {
        let mut pause = Duration::from_millis(100);
        loop {
            let error = {
                let mut current = link.current.lock().await;
                if let Some(c) = current.as_ref().filter(|c| c.status().connected()) {
                    return Ok(c.clone());
                }
                match self.connect_once().await {
                    Ok(c) => {
                        let c = Arc::new(c);
                        *current = Some(c.clone());
                        if self.outage.swap(false, SeqCst) {
                            tracing::info!(uri = %redact_url(&self.config.uri), "RabbitMQ reachable again");
                        } else {
                            tracing::debug!(uri = %redact_url(&self.config.uri), "connected to RabbitMQ");
                        }
                        return Ok(c);
                    }
                    Err(e) => e,
                }
            };
            let now = Instant::now();
            if self.closing.is_cancelled() || deadline.is_some_and(|d| now + pause >= d) {
                return Err(error);
            }
            if !self.outage.swap(true, SeqCst) {
                tracing::warn!(%error, "RabbitMQ unreachable; retrying (said once until it is reached again)");
            } else {
                tracing::debug!(%error, ?pause, "RabbitMQ still unreachable; retrying");
            }
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = self.closing.cancelled() => {}
            }
            pause = (pause * 2).min(self.config.max_reconnect_delay);
        }
    }

    /// The lane of a publish, named after the event when it goes to the
    /// transport's exchange, else after the group's work queue (retry
    /// queues, dead letters and redrives are named after it). Event names
    /// hold no `:` and work queues do, so the names never meet.
    fn lane_of<'a>(&self, exchange: &str, routing_key: &'a str) -> &'a str {
        if exchange == self.config.exchange {
            routing_key
        } else {
            routing_key
                .rsplit_once(":retry:")
                .map_or(routing_key, |(work, _)| work)
        }
    }

    /// The publishing lane for `exchange` and `routing_key`.
    pub(crate) fn lane(&self, exchange: &str, routing_key: &str) -> Arc<Lane> {
        let name = self.lane_of(exchange, routing_key);
        let mut lanes = self.lanes.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(lane) = lanes.get(name) {
            return lane.clone();
        }
        if lanes.len() >= MAX_LANES {
            // Close the lanes no publish uses right now.
            lanes.retain(|_, lane| {
                let busy = Arc::strong_count(lane) > 1;
                if !busy {
                    close_in_background(lane.clone(), "idle");
                }
                busy
            });
        }
        let lane = Arc::new(Lane {
            name: name.to_owned(),
            link: Link::default(),
            channel: Mutex::new(None),
        });
        lanes.insert(name.to_owned(), lane.clone());
        lane
    }

    /// The lane's publishing channel (publisher confirms on), re-created
    /// after a connection or channel loss.
    pub(crate) async fn publisher(
        &self,
        lane: &Lane,
        deadline: Option<Instant>,
    ) -> Result<Channel> {
        let mut channel = lane.channel.lock().await;
        if let Some(ch) = channel.as_ref().filter(|c| c.status().connected()) {
            return Ok(ch.clone());
        }
        let connection = self.connect(&lane.link, deadline).await?;
        let fresh = connection
            .create_channel()
            .await
            .map_err(|e| amqp_error("open publishing channel", e))?;
        fresh
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| amqp_error("enable publisher confirms", e))?;
        *channel = Some(fresh.clone());
        Ok(fresh)
    }

    /// Gives up `lane` after a publish on it was not confirmed in time: its
    /// connection may be blocked by the queue that did not confirm, so the
    /// next publish there opens a fresh one. A lane already replaced stays
    /// replaced (publishes timing out late do not close the new one).
    pub(crate) fn discard(&self, lane: &Arc<Lane>) {
        let mut lanes = self.lanes.lock().unwrap_or_else(PoisonError::into_inner);
        if lanes.get(&lane.name).is_some_and(|l| Arc::ptr_eq(l, lane)) {
            lanes.remove(&lane.name);
            close_in_background(lane.clone(), "publish not confirmed in time");
        }
    }

    /// Closes every connection (shutdown), each waiting a bounded time.
    pub(crate) async fn close(&self) {
        let lanes: Vec<Arc<Lane>> = self
            .lanes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain()
            .map(|(_, lane)| lane)
            .collect();
        let closing = lanes.iter().map(|lane| lane.link.close("shutdown"));
        futures_util::future::join(
            futures_util::future::join_all(closing),
            self.consuming.close("shutdown"),
        )
        .await;
    }
}

/// Closes a lane's connection in the background, waiting a bounded time
/// for the broker's answer.
fn close_in_background(lane: Arc<Lane>, why: &'static str) {
    tokio::spawn(async move { lane.link.close(why).await });
}

/// Names of one group's queues.
#[derive(Clone, Debug)]
pub(crate) struct GroupQueues {
    pub(crate) work: String,
    pub(crate) dead: String,
    retry_prefix: String,
}

impl GroupQueues {
    /// `<exchange>:<module>:<subscription>` (names never hold `:`), with
    /// `:dlq` and `:retry:<n>` beside it.
    pub(crate) fn new(exchange: &str, group: &GroupId) -> Self {
        let work = format!("{exchange}:{}:{}", group.module(), group.subscription());
        Self {
            dead: format!("{work}:dlq"),
            retry_prefix: format!("{work}:retry:"),
            work,
        }
    }

    /// Whether `queue` is one of the group's queues.
    pub(crate) fn holds(&self, queue: &str) -> bool {
        queue == self.work || queue == self.dead || queue.starts_with(&self.retry_prefix)
    }

    /// The queue that holds events before attempt `next_attempt`.
    pub(crate) fn retry(&self, next_attempt: u32) -> String {
        format!("{}{next_attempt}", self.retry_prefix)
    }
}

/// The dead-letter exchange of an exchange.
pub(crate) fn dead_letter_exchange(exchange: &str) -> String {
    format!("{exchange}.dlx")
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

fn durable_queue() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

/// Declares (idempotently) the exchange, the dead-letter exchange, and the
/// group's work, retry and dead-letter queues, bound to `event_type`.
pub(crate) async fn declare_group(
    channel: &Channel,
    config: &RabbitMqConfig,
    queues: &GroupQueues,
    event_type: &str,
    max_attempts: u32,
) -> Result<()> {
    let exchange_opts = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    let dlx = dead_letter_exchange(&config.exchange);
    channel
        .exchange_declare(
            config.exchange.as_str().into(),
            ExchangeKind::Topic,
            exchange_opts,
            FieldTable::default(),
        )
        .await
        .map_err(|e| amqp_error("declare exchange", e))?;
    channel
        .exchange_declare(
            dlx.as_str().into(),
            ExchangeKind::Direct,
            exchange_opts,
            FieldTable::default(),
        )
        .await
        .map_err(|e| amqp_error("declare dead-letter exchange", e))?;

    let queue_type = match config.queue_type {
        QueueType::Classic => "classic",
        _ => "quorum",
    };
    let mut dead_args = FieldTable::default();
    dead_args.insert("x-queue-type".into(), text(queue_type));
    channel
        .queue_declare(queues.dead.as_str().into(), durable_queue(), dead_args)
        .await
        .map_err(|e| amqp_error(&format!("declare queue {}", queues.dead), e))?;
    channel
        .queue_bind(
            queues.dead.as_str().into(),
            dlx.as_str().into(),
            queues.work.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| amqp_error("bind dead-letter queue", e))?;

    // The work queue dead-letters to the group's DLQ whatever the broker
    // drops (quorum delivery limit), so nothing vanishes.
    let mut work_args = FieldTable::default();
    work_args.insert("x-queue-type".into(), text(queue_type));
    work_args.insert("x-dead-letter-exchange".into(), text(&dlx));
    work_args.insert("x-dead-letter-routing-key".into(), text(&queues.work));
    if config.queue_type == QueueType::Quorum {
        work_args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(i64::from(config.delivery_limit)),
        );
    }
    if config.single_active_consumer {
        work_args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    }
    channel
        .queue_declare(queues.work.as_str().into(), durable_queue(), work_args)
        .await
        .map_err(|e| amqp_error(&format!("declare queue {}", queues.work), e))?;
    channel
        .queue_bind(
            queues.work.as_str().into(),
            config.exchange.as_str().into(),
            ShortString::from(event_type),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| amqp_error("bind work queue", e))?;

    // One retry queue per attempt: messages wait there for their TTL, then
    // go back to the work queue through the default exchange.
    for next_attempt in 2..=max_attempts.max(2) {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), text("classic"));
        args.insert("x-dead-letter-exchange".into(), text(""));
        args.insert("x-dead-letter-routing-key".into(), text(&queues.work));
        let name = queues.retry(next_attempt);
        channel
            .queue_declare(name.as_str().into(), durable_queue(), args)
            .await
            .map_err(|e| amqp_error(&format!("declare queue {name}"), e))?;
    }
    Ok(())
}
