//! One connection per transport, re-established with backoff when it
//! drops; a confirm-mode channel for publishing; topology declarations.

use std::sync::Arc;
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

/// Keeps one live connection and the publishing channel.
pub(crate) struct Connector {
    config: RabbitMqConfig,
    current: Mutex<Option<Arc<Connection>>>,
    publisher: Mutex<Option<Channel>>,
    closing: CancellationToken,
}

impl Connector {
    pub(crate) fn new(config: RabbitMqConfig, closing: CancellationToken) -> Self {
        Self {
            config,
            current: Mutex::new(None),
            publisher: Mutex::new(None),
            closing,
        }
    }

    async fn connect_once(&self) -> Result<Connection> {
        let uri = &self.config.uri;
        let result = if uri.starts_with("amqps://") {
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
        };
        result
            .map_err(|e| connection_error(format!("cannot connect to {}: {e}", redact_url(uri)), e))
    }

    /// A live connection: the current one, or a new one, trying with
    /// backoff until `deadline` (or forever with `None`) unless closing.
    pub(crate) async fn connection(&self, deadline: Option<Instant>) -> Result<Arc<Connection>> {
        let mut pause = Duration::from_millis(100);
        loop {
            let error = {
                let mut current = self.current.lock().await;
                if let Some(c) = current.as_ref().filter(|c| c.status().connected()) {
                    return Ok(c.clone());
                }
                match self.connect_once().await {
                    Ok(c) => {
                        let c = Arc::new(c);
                        *current = Some(c.clone());
                        tracing::info!(uri = %redact_url(&self.config.uri), "connected to RabbitMQ");
                        return Ok(c);
                    }
                    Err(e) => e,
                }
            };
            let now = Instant::now();
            if self.closing.is_cancelled() || deadline.is_some_and(|d| now + pause >= d) {
                return Err(error);
            }
            tracing::warn!(%error, ?pause, "RabbitMQ unreachable; retrying");
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = self.closing.cancelled() => {}
            }
            pause = (pause * 2).min(self.config.max_reconnect_delay);
        }
    }

    /// The publishing channel (publisher confirms on), re-created after a
    /// connection or channel loss.
    pub(crate) async fn publisher(&self, deadline: Option<Instant>) -> Result<Channel> {
        let mut publisher = self.publisher.lock().await;
        if let Some(ch) = publisher.as_ref().filter(|c| c.status().connected()) {
            return Ok(ch.clone());
        }
        let connection = self.connection(deadline).await?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| amqp_error("open publishing channel", e))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| amqp_error("enable publisher confirms", e))?;
        *publisher = Some(channel.clone());
        Ok(channel)
    }

    /// Closes the connection (shutdown).
    pub(crate) async fn close(&self) {
        if let Some(c) = self.current.lock().await.take() {
            let _ = c.close(200, "shutdown".into()).await;
        }
    }
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
