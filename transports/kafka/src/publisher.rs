//! Publishing: the CloudEvents Kafka binding, idempotent producer, topics
//! created through the admin API.

use std::collections::HashSet;
use std::sync::Mutex;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use seambus::{Attributes, Envelope, Error, ErrorKind, Result};

use crate::config::KafkaConfig;
use crate::error::kafka_error;

/// Prefix of CloudEvents attribute headers (binary content mode).
pub(crate) const CE_PREFIX: &str = "ce_";
/// The header that carries `datacontenttype`.
pub(crate) const CONTENT_TYPE: &str = "content-type";

/// Headers Seambus adds that are not user headers.
pub(crate) fn is_transport_header(name: &str) -> bool {
    name.eq_ignore_ascii_case(CONTENT_TYPE) || name.to_ascii_lowercase().starts_with("seambus-")
}

/// The envelope's attributes as Kafka headers.
pub(crate) fn headers_of(attrs: &Attributes) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new_with_capacity(12 + attrs.headers.len());
    for (name, value) in attrs.to_wire_headers(CE_PREFIX) {
        let name = if name == "ce_datacontenttype" {
            CONTENT_TYPE.to_owned()
        } else {
            name
        };
        headers = headers.insert(Header {
            key: &name,
            value: Some(value.as_bytes()),
        });
    }
    headers
}

/// Header pairs with text values (others are skipped).
pub(crate) fn header_pairs(headers: Option<&impl Headers>) -> Vec<(String, String)> {
    let Some(headers) = headers else {
        return Vec::new();
    };
    headers
        .iter()
        .filter_map(|h| {
            let value = std::str::from_utf8(h.value.unwrap_or_default()).ok()?;
            Some((h.key.to_owned(), value.to_owned()))
        })
        .collect()
}

/// Reads an envelope back from a record's headers and payload.
pub(crate) fn envelope_of(pairs: &[(String, String)], payload: &[u8]) -> Result<Envelope> {
    let mut attrs = Attributes::from_wire_headers(
        CE_PREFIX,
        pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        is_transport_header,
    )?;
    if let Some((_, ct)) = pairs
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(CONTENT_TYPE))
    {
        attrs.data_content_type = ct.clone().into();
    }
    Ok(Envelope::from_bytes(attrs, payload.to_vec()))
}

/// Creates topics once per process (idempotently on the broker).
pub(crate) struct Topics {
    admin: AdminClient<DefaultClientContext>,
    known: Mutex<HashSet<String>>,
    partitions: i32,
    replication: i32,
}

impl Topics {
    pub(crate) fn new(config: &KafkaConfig) -> Result<Self> {
        let admin = config
            .finish(config.client_config())
            .create()
            .map_err(|e| kafka_error("create admin client", e))?;
        Ok(Self {
            admin,
            known: Mutex::default(),
            partitions: config.partitions,
            replication: config.replication,
        })
    }

    pub(crate) async fn ensure(&self, topic: &str) -> Result<()> {
        if self
            .known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(topic)
        {
            return Ok(());
        }
        let new = NewTopic::new(
            topic,
            self.partitions,
            TopicReplication::Fixed(self.replication),
        );
        let results = self
            .admin
            .create_topics([&new], &AdminOptions::new())
            .await
            .map_err(|e| kafka_error(&format!("create topic {topic}"), e))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => {
                    return Err(Error::new(
                        if matches!(
                            code,
                            RDKafkaErrorCode::InvalidTopic
                                | RDKafkaErrorCode::InvalidPartitions
                                | RDKafkaErrorCode::InvalidReplicationFactor
                        ) {
                            ErrorKind::Config
                        } else {
                            ErrorKind::Connection
                        },
                        format!("create topic {name}: {code}"),
                    ))
                }
            }
        }
        self.known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(topic.to_owned());
        Ok(())
    }

    pub(crate) fn admin(&self) -> &AdminClient<DefaultClientContext> {
        &self.admin
    }
}

/// Sends one record and waits for its delivery report.
pub(crate) async fn send(
    producer: &FutureProducer,
    topic: &str,
    key: Option<&[u8]>,
    payload: &[u8],
    headers: OwnedHeaders,
    timeout: std::time::Duration,
) -> Result<()> {
    let mut record = FutureRecord::<[u8], [u8]>::to(topic)
        .payload(payload)
        .headers(headers);
    if let Some(key) = key {
        record = record.key(key);
    }
    producer
        .send(record, timeout)
        .await
        .map(|_| ())
        .map_err(|(e, _)| kafka_error(&format!("publish to {topic}"), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip() {
        let mut attrs = Attributes::new("orders", "orders.order_placed", 2);
        attrs.partition_key = Some("k".into());
        attrs.headers.push(("x-tenant".into(), "acme".into()));
        let headers = headers_of(&attrs);
        let pairs = header_pairs(Some(&headers));
        assert!(pairs
            .iter()
            .any(|(k, v)| k == CONTENT_TYPE && v == "application/json"));
        let env = envelope_of(&pairs, b"{}").unwrap();
        assert_eq!(env.attributes(), &attrs);
    }

    #[test]
    fn a_plain_record_is_not_an_envelope() {
        assert_eq!(
            envelope_of(&[], b"x").unwrap_err().kind(),
            ErrorKind::Decode
        );
    }
}
