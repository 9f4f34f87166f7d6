//! Configuration of the RabbitMQ transport.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use lapin::ConnectionProperties;
use seambus::transport::support::redact_url;
use serde::Deserialize;

use crate::error::config_error;

/// The kind of queue a group gets.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueueType {
    /// Replicated, durable, with a delivery limit. The default.
    #[default]
    Quorum,
    /// Classic durable queue.
    Classic,
}

/// TLS for `amqps://` URIs.
#[non_exhaustive]
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct TlsSettings {
    /// PEM file of the certificate authorities to trust (otherwise the
    /// system's).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (with `client_key`) for mutual TLS.
    pub client_cert: Option<PathBuf>,
    /// PEM (PKCS#8) private key of `client_cert`.
    pub client_key: Option<PathBuf>,
}

type Customize = Arc<dyn Fn(ConnectionProperties) -> ConnectionProperties + Send + Sync>;

/// Configuration of [`crate::RabbitMqTransport`].
///
/// ```
/// let config = seambus_rabbitmq::RabbitMqConfig::default()
///     .with_uri("amqp://guest:guest@127.0.0.1:5672/%2f")
///     .with_exchange("shop");
/// assert!(!format!("{config:?}").contains("guest:guest"));
/// ```
#[non_exhaustive]
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RabbitMqConfig {
    /// AMQP URI. Default `amqp://guest:guest@127.0.0.1:5672/%2f`.
    pub uri: String,
    /// The topic exchange events are published to. Default `seambus`.
    /// Queues are named `<exchange>:<module>:<subscription>`.
    pub exchange: String,
    /// Queue type of the groups' work queues. Default [`QueueType::Quorum`].
    pub queue_type: QueueType,
    /// Unacknowledged events one process holds per group (`basic.qos`).
    /// Default 256.
    pub prefetch: u16,
    /// With true, only one process consumes a group at a time (RabbitMQ's
    /// single active consumer): per-key order across processes, no
    /// scale-out. Fixed when the queue is first declared. Default false.
    pub single_active_consumer: bool,
    /// Largest message the broker takes (its `max_message_size`, 128 MiB by
    /// default); bigger payloads are refused before sending. Default
    /// 128 MiB.
    pub max_message_size: usize,
    /// The broker's redelivery limit on quorum queues (`x-delivery-limit`),
    /// past which it dead-letters on its own (to the group's dead-letter
    /// queue). Seambus counts attempts itself; this only bounds crash loops.
    /// Default 100.
    pub delivery_limit: u32,
    /// How long `publish` keeps trying across reconnects before it fails.
    /// Default 30 s.
    #[serde(with = "humantime_serde")]
    pub publish_timeout: Duration,
    /// Longest pause between reconnection attempts. Default 5 s.
    #[serde(with = "humantime_serde")]
    pub max_reconnect_delay: Duration,
    /// Connection name shown by the broker. Default `seambus`.
    pub connection_name: Option<String>,
    /// TLS for `amqps://`.
    pub tls: TlsSettings,
    #[serde(skip)]
    customize: Option<Customize>,
}

impl Default for RabbitMqConfig {
    fn default() -> Self {
        Self {
            uri: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            exchange: "seambus".into(),
            queue_type: QueueType::Quorum,
            prefetch: 256,
            single_active_consumer: false,
            max_message_size: 128 * 1024 * 1024,
            delivery_limit: 100,
            publish_timeout: Duration::from_secs(30),
            max_reconnect_delay: Duration::from_secs(5),
            connection_name: Some("seambus".into()),
            tls: TlsSettings::default(),
            customize: None,
        }
    }
}

impl fmt::Debug for RabbitMqConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitMqConfig")
            .field("uri", &redact_url(&self.uri))
            .field("exchange", &self.exchange)
            .field("queue_type", &self.queue_type)
            .field("prefetch", &self.prefetch)
            .field("single_active_consumer", &self.single_active_consumer)
            .field("max_message_size", &self.max_message_size)
            .field("delivery_limit", &self.delivery_limit)
            .field("publish_timeout", &self.publish_timeout)
            .field("max_reconnect_delay", &self.max_reconnect_delay)
            .field("connection_name", &self.connection_name)
            .field("tls", &self.tls)
            .field("customize", &self.customize.as_ref().map(|_| "<fn>"))
            .finish()
    }
}

impl RabbitMqConfig {
    /// Sets the AMQP URI.
    pub fn with_uri(mut self, uri: impl Into<String>) -> Self {
        self.uri = uri.into();
        self
    }

    /// Sets the exchange name (and so the queue-name prefix).
    pub fn with_exchange(mut self, exchange: impl Into<String>) -> Self {
        self.exchange = exchange.into();
        self
    }

    /// Sets the queue type.
    pub fn with_queue_type(mut self, queue_type: QueueType) -> Self {
        self.queue_type = queue_type;
        self
    }

    /// Sets the prefetch.
    pub fn with_prefetch(mut self, prefetch: u16) -> Self {
        self.prefetch = prefetch;
        self
    }

    /// Turns single active consumer on or off.
    pub fn with_single_active_consumer(mut self, on: bool) -> Self {
        self.single_active_consumer = on;
        self
    }

    /// Sets the largest message size.
    pub fn with_max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// Sets [`RabbitMqConfig::delivery_limit`].
    pub fn with_delivery_limit(mut self, deliveries: u32) -> Self {
        self.delivery_limit = deliveries;
        self
    }

    /// Sets how long a publish may keep trying.
    pub fn with_publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }

    /// Sets TLS.
    pub fn with_tls(mut self, tls: TlsSettings) -> Self {
        self.tls = tls;
        self
    }

    /// Escape hatch: adjusts lapin's [`ConnectionProperties`] after Seambus
    /// has applied its settings.
    pub fn with_connection_properties(
        mut self,
        customize: impl Fn(ConnectionProperties) -> ConnectionProperties + Send + Sync + 'static,
    ) -> Self {
        self.customize = Some(Arc::new(customize));
        self
    }

    pub(crate) fn validate(&self) -> seambus::Result<()> {
        if !(self.uri.starts_with("amqp://") || self.uri.starts_with("amqps://")) {
            return Err(config_error(format!(
                "URI {} must start with amqp:// or amqps://",
                redact_url(&self.uri)
            )));
        }
        if self.exchange.is_empty()
            || self.exchange.len() > 120
            || !self
                .exchange
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(config_error(format!(
                "exchange name {:?} must be 1 to 120 of A-Z a-z 0-9 - _ .",
                self.exchange
            )));
        }
        if self.prefetch == 0 {
            return Err(config_error("prefetch must be at least 1"));
        }
        if self.delivery_limit == 0 {
            return Err(config_error("delivery_limit must be at least 1"));
        }
        if matches!(
            (&self.tls.client_cert, &self.tls.client_key),
            (Some(_), None) | (None, Some(_))
        ) {
            return Err(config_error(
                "tls.client_cert and tls.client_key go together",
            ));
        }
        Ok(())
    }

    pub(crate) fn properties(&self) -> ConnectionProperties {
        let mut props = ConnectionProperties::default();
        if let Some(name) = &self.connection_name {
            props = props.with_connection_name(name.clone().into());
        }
        match &self.customize {
            Some(customize) => customize(props),
            None => props,
        }
    }

    pub(crate) fn tls_config(&self) -> seambus::Result<lapin::tcp::OwnedTLSConfig> {
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|e| config_error(format!("cannot read {path:?}: {e}")))
        };
        let cert_chain = match &self.tls.ca_file {
            Some(path) => Some(
                String::from_utf8(read(path)?)
                    .map_err(|_| config_error(format!("{path:?} is not a PEM file")))?,
            ),
            None => None,
        };
        let identity = match (&self.tls.client_cert, &self.tls.client_key) {
            (Some(cert), Some(key)) => Some(lapin::tcp::OwnedIdentity::PKCS8 {
                pem: read(cert)?,
                key: read(key)?,
            }),
            _ => None,
        };
        Ok(lapin::tcp::OwnedTLSConfig {
            identity,
            cert_chain,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_the_password() {
        let config = RabbitMqConfig::default().with_uri("amqps://app:s3cr3t@mq.internal:5671/prod");
        let shown = format!("{config:?}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(shown.contains("app:<redacted>@mq.internal"));
    }

    #[test]
    fn bad_settings_are_config_errors() {
        for config in [
            RabbitMqConfig::default().with_uri("http://x"),
            RabbitMqConfig::default().with_exchange(""),
            RabbitMqConfig::default().with_exchange("a b"),
            RabbitMqConfig::default().with_prefetch(0),
        ] {
            assert_eq!(
                config.validate().unwrap_err().kind(),
                seambus::ErrorKind::Config
            );
        }
        RabbitMqConfig::default().validate().unwrap();
    }

    #[test]
    fn deserializes_with_defaults() {
        let config: RabbitMqConfig = serde_json::from_str(
            r#"{"exchange":"shop","queue_type":"classic","publish_timeout":"5s"}"#,
        )
        .unwrap();
        assert_eq!(config.exchange, "shop");
        assert_eq!(config.queue_type, QueueType::Classic);
        assert_eq!(config.publish_timeout, Duration::from_secs(5));
        assert_eq!(config.prefetch, 256);
    }
}
