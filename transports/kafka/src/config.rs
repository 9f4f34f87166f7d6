//! Configuration of the Kafka transport.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use rdkafka::ClientConfig;
use serde::Deserialize;

use crate::error::config_error;

/// Security settings (librdkafka's `security.protocol`, SASL and SSL keys).
#[non_exhaustive]
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Security {
    /// `plaintext` (default), `ssl`, `sasl_plaintext` or `sasl_ssl`.
    pub protocol: Option<String>,
    /// `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`.
    pub sasl_mechanism: Option<String>,
    /// SASL user name.
    pub sasl_username: Option<String>,
    /// SASL password.
    pub sasl_password: Option<String>,
    /// PEM file of the certificate authorities to trust.
    pub ssl_ca_location: Option<String>,
    /// PEM client certificate file.
    pub ssl_certificate_location: Option<String>,
    /// PEM client key file.
    pub ssl_key_location: Option<String>,
    /// The client key itself, PEM (instead of a file).
    pub ssl_key_pem: Option<String>,
    /// Password of the client key.
    pub ssl_key_password: Option<String>,
}

impl fmt::Debug for Security {
    /// Never shows a password or a key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hidden = |v: &Option<String>| v.as_ref().map(|_| "<redacted>");
        f.debug_struct("Security")
            .field("protocol", &self.protocol)
            .field("sasl_mechanism", &self.sasl_mechanism)
            .field("sasl_username", &self.sasl_username)
            .field("sasl_password", &hidden(&self.sasl_password))
            .field("ssl_ca_location", &self.ssl_ca_location)
            .field("ssl_certificate_location", &self.ssl_certificate_location)
            .field("ssl_key_location", &self.ssl_key_location)
            .field("ssl_key_pem", &hidden(&self.ssl_key_pem))
            .field("ssl_key_password", &hidden(&self.ssl_key_password))
            .finish()
    }
}

/// Configuration of [`crate::KafkaTransport`].
///
/// ```
/// let config = seambus_kafka::KafkaConfig::default()
///     .with_bootstrap_servers("127.0.0.1:9092")
///     .with_topic_prefix("shop")
///     .with_partitions(6)
///     .with_librdkafka("sasl.password", "s3cr3t");
/// assert!(!format!("{config:?}").contains("s3cr3t"));
/// ```
#[non_exhaustive]
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// `bootstrap.servers`. Default `127.0.0.1:9092`.
    pub bootstrap_servers: String,
    /// Topics are `<topic_prefix>.<event name>`; a group's dead letters go
    /// to `<topic_prefix>.dlq.<module>.<subscription>`. Default `seambus`.
    pub topic_prefix: String,
    /// Consumer groups are `<group_prefix>.<module>.<subscription>`.
    /// Default `seambus`.
    pub group_prefix: String,
    /// Partitions of topics this transport creates. Default 3.
    pub partitions: i32,
    /// Replication factor of topics this transport creates. Default 1.
    pub replication: i32,
    /// Events one process holds per subscription (handled, waiting for
    /// their key, or waiting to retry). Default 256.
    pub max_in_flight: usize,
    /// How long a publish may take to be acknowledged, retries included
    /// (`message.timeout.ms`). Default 30 s.
    #[serde(with = "humantime_serde")]
    pub publish_timeout: Duration,
    /// A consumer that holds fetched records of a partition and has
    /// settled none of them for this long logs a warning naming the group,
    /// the partition and the records waiting, once per stall (and an info
    /// line when it moves again). Default 60 s.
    #[serde(with = "humantime_serde")]
    pub stall_warning: Duration,
    /// Deliveries of one record to its group after which it is
    /// dead-lettered as a crash loop (processes dying, or stopping, while
    /// they held it). Counted on the broker, in the metadata of the
    /// group's committed offset, for the record at that offset (the oldest
    /// one not settled: where a crash loop sits), and committed before the
    /// record is handled, so a crash counts. Rebalances that move the
    /// partition while that record is held count too. Default 20.
    pub delivery_limit: u32,
    /// Largest record, payload and headers (`message.max.bytes`); bigger
    /// ones are refused before sending. Default 1,000,000.
    pub message_max_bytes: usize,
    /// Where a new group starts. `latest` (the default): after the events
    /// the topic holds when the group first subscribes (pinned by
    /// committing the end offsets then, so nothing published afterwards is
    /// missed), as on every other transport. `earliest`: it replays what
    /// the topic keeps. Where a committed offset is gone (retention), the
    /// group resumes at the oldest record kept either way.
    pub auto_offset_reset: String,
    /// `enable.idempotence` on the producer (retried sends are written
    /// once). Default true; turn it off only for a broker that mishandles
    /// idempotent producers.
    pub idempotence: bool,
    /// Security settings.
    pub security: Security,
    /// Any other librdkafka property, applied last (for producer, consumer
    /// and admin clients alike). Values of keys that look secret are
    /// redacted in `Debug`.
    pub librdkafka: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            bootstrap_servers: "127.0.0.1:9092".into(),
            topic_prefix: "seambus".into(),
            group_prefix: "seambus".into(),
            partitions: 3,
            replication: 1,
            max_in_flight: 256,
            publish_timeout: Duration::from_secs(30),
            stall_warning: Duration::from_secs(60),
            delivery_limit: 20,
            message_max_bytes: 1_000_000,
            auto_offset_reset: "latest".into(),
            idempotence: true,
            security: Security::default(),
            librdkafka: BTreeMap::new(),
        }
    }
}

/// Whether a librdkafka key holds a secret.
fn is_secret(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    [
        "password",
        "secret",
        "key.pem",
        "token",
        "sasl.jaas",
        "private",
    ]
    .iter()
    .any(|s| k.contains(s))
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let raw: BTreeMap<&str, &str> = self
            .librdkafka
            .iter()
            .map(|(k, v)| {
                let v = if is_secret(k) {
                    "<redacted>"
                } else {
                    v.as_str()
                };
                (k.as_str(), v)
            })
            .collect();
        f.debug_struct("KafkaConfig")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("topic_prefix", &self.topic_prefix)
            .field("group_prefix", &self.group_prefix)
            .field("partitions", &self.partitions)
            .field("replication", &self.replication)
            .field("max_in_flight", &self.max_in_flight)
            .field("publish_timeout", &self.publish_timeout)
            .field("stall_warning", &self.stall_warning)
            .field("delivery_limit", &self.delivery_limit)
            .field("message_max_bytes", &self.message_max_bytes)
            .field("auto_offset_reset", &self.auto_offset_reset)
            .field("idempotence", &self.idempotence)
            .field("security", &self.security)
            .field("librdkafka", &raw)
            .finish()
    }
}

impl KafkaConfig {
    /// Sets `bootstrap.servers`.
    pub fn with_bootstrap_servers(mut self, servers: impl Into<String>) -> Self {
        self.bootstrap_servers = servers.into();
        self
    }

    /// Sets the topic prefix.
    pub fn with_topic_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.topic_prefix = prefix.into();
        self
    }

    /// Sets the consumer group prefix.
    pub fn with_group_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.group_prefix = prefix.into();
        self
    }

    /// Sets the partitions of created topics.
    pub fn with_partitions(mut self, partitions: i32) -> Self {
        self.partitions = partitions;
        self
    }

    /// Sets how long a publish may take.
    pub fn with_publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }

    /// Sets [`KafkaConfig::stall_warning`].
    pub fn with_stall_warning(mut self, after: Duration) -> Self {
        self.stall_warning = after;
        self
    }

    /// Sets [`KafkaConfig::delivery_limit`].
    pub fn with_delivery_limit(mut self, deliveries: u32) -> Self {
        self.delivery_limit = deliveries;
        self
    }

    /// Sets the largest record.
    pub fn with_message_max_bytes(mut self, bytes: usize) -> Self {
        self.message_max_bytes = bytes;
        self
    }

    /// Turns the idempotent producer on or off.
    pub fn with_idempotence(mut self, on: bool) -> Self {
        self.idempotence = on;
        self
    }

    /// Sets the security settings.
    pub fn with_security(mut self, security: Security) -> Self {
        self.security = security;
        self
    }

    /// Sets a raw librdkafka property.
    pub fn with_librdkafka(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.librdkafka.insert(key.into(), value.into());
        self
    }

    /// Whether a new group replays the topic.
    pub(crate) fn replays(&self) -> bool {
        self.auto_offset_reset == "earliest"
    }

    pub(crate) fn validate(&self) -> seambus::Result<()> {
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 100
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        };
        if !name_ok(&self.topic_prefix) || !name_ok(&self.group_prefix) {
            return Err(config_error(
                "topic and group prefixes must be 1 to 100 of A-Z a-z 0-9 . _ -",
            ));
        }
        if self.bootstrap_servers.trim().is_empty() {
            return Err(config_error("bootstrap_servers is empty"));
        }
        if self.partitions < 1 || self.replication < 1 {
            return Err(config_error(
                "partitions and replication must be at least 1",
            ));
        }
        if self.max_in_flight == 0 {
            return Err(config_error("max_in_flight must be at least 1"));
        }
        if self.delivery_limit == 0 {
            return Err(config_error("delivery_limit must be at least 1"));
        }
        if !matches!(self.auto_offset_reset.as_str(), "latest" | "earliest") {
            return Err(config_error(
                "auto_offset_reset must be \"latest\" or \"earliest\"",
            ));
        }
        Ok(())
    }

    /// The librdkafka settings every client of this transport shares.
    pub(crate) fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap_servers);
        let s = &self.security;
        for (key, value) in [
            ("security.protocol", &s.protocol),
            ("sasl.mechanism", &s.sasl_mechanism),
            ("sasl.username", &s.sasl_username),
            ("sasl.password", &s.sasl_password),
            ("ssl.ca.location", &s.ssl_ca_location),
            ("ssl.certificate.location", &s.ssl_certificate_location),
            ("ssl.key.location", &s.ssl_key_location),
            ("ssl.key.pem", &s.ssl_key_pem),
            ("ssl.key.password", &s.ssl_key_password),
        ] {
            if let Some(v) = value {
                c.set(key, v);
            }
        }
        c
    }

    /// Applies the raw properties last, so they win.
    pub(crate) fn finish(&self, mut c: ClientConfig) -> ClientConfig {
        for (k, v) in &self.librdkafka {
            c.set(k, v);
        }
        c
    }

    /// The topic of an event.
    pub(crate) fn topic(&self, event_type: &str) -> String {
        format!("{}.{event_type}", self.topic_prefix)
    }

    /// The consumer group of a group: `<group_prefix>.<module>.<subscription>`,
    /// or `<group_prefix>.<module>..<subscription>` when the module's name
    /// has a dot. Names have no empty segment, so `..` appears only there:
    /// distinct groups get distinct names (module `a.b` with subscription
    /// `c` is not module `a` with `b.c`), and groups of dot-free modules
    /// keep the names they always had.
    pub(crate) fn group_id(&self, group: &seambus::transport::GroupId) -> String {
        format!("{}.{}", self.group_prefix, group_path(group))
    }

    /// The dead-letter topic of a group (named like [`KafkaConfig::group_id`]).
    pub(crate) fn dead_letter_topic(&self, group: &seambus::transport::GroupId) -> String {
        format!("{}.dlq.{}", self.topic_prefix, group_path(group))
    }
}

/// `<module>.<subscription>`, or `<module>..<subscription>` when the module
/// has a dot.
fn group_path(group: &seambus::transport::GroupId) -> String {
    let join = if group.module().contains('.') {
        ".."
    } else {
        "."
    };
    format!("{}{join}{}", group.module(), group.subscription())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_groups_get_distinct_names() {
        use seambus::transport::GroupId;
        let config = KafkaConfig::default();
        let a = GroupId::new("a.b", "c");
        let b = GroupId::new("a", "b.c");
        assert_ne!(config.group_id(&a), config.group_id(&b));
        assert_ne!(config.dead_letter_topic(&a), config.dead_letter_topic(&b));
        // Dot-free modules keep their names.
        let plain = GroupId::new("inventory", "orders.order_placed");
        assert!(config
            .group_id(&plain)
            .ends_with(".inventory.orders.order_placed"));
    }

    #[test]
    fn debug_redacts_every_secret() {
        let config = KafkaConfig::default()
            .with_security(Security {
                sasl_password: Some("pw-1".into()),
                ssl_key_pem: Some("-----BEGIN PRIVATE KEY----- k".into()),
                ssl_key_password: Some("pw-2".into()),
                ..Security::default()
            })
            .with_librdkafka("sasl.password", "pw-3")
            .with_librdkafka("ssl.key.pem", "pem-4")
            .with_librdkafka("sasl.oauthbearer.client.secret", "pw-5")
            .with_librdkafka("linger.ms", "5");
        let shown = format!("{config:?}");
        for secret in ["pw-1", "PRIVATE KEY", "pw-2", "pw-3", "pem-4", "pw-5"] {
            assert!(!shown.contains(secret), "{secret} shown in {shown}");
        }
        assert!(shown.contains("linger.ms"));
    }

    #[test]
    fn bad_names_are_config_errors() {
        for config in [
            KafkaConfig::default().with_topic_prefix("a b"),
            KafkaConfig::default().with_topic_prefix(""),
            KafkaConfig::default().with_partitions(0),
            KafkaConfig {
                auto_offset_reset: "smallest".into(),
                ..KafkaConfig::default()
            },
        ] {
            assert_eq!(
                config.validate().unwrap_err().kind(),
                seambus::ErrorKind::Config
            );
        }
    }

    #[test]
    fn deserializes_with_defaults() {
        let config: KafkaConfig = serde_json::from_str(
            r#"{"bootstrap_servers":"k1:9092,k2:9092","partitions":12,"publish_timeout":"5s","librdkafka":{"linger.ms":"10"}}"#,
        )
        .unwrap();
        assert_eq!(config.partitions, 12);
        assert_eq!(config.publish_timeout, Duration::from_secs(5));
        assert_eq!(config.librdkafka["linger.ms"], "10");
        assert_eq!(config.topic_prefix, "seambus");
        assert!(
            !config.replays(),
            "a new group starts at the end by default"
        );
    }
}
