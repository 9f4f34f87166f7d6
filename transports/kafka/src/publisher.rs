//! Publishing: idempotent producer, topics created through the admin API.

use std::collections::HashSet;
use std::sync::Mutex;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{FutureProducer, FutureRecord};
use seambus::{Error, ErrorKind, Result};

use crate::config::KafkaConfig;
use crate::error::kafka_error;
use crate::ClientLog;

/// Creates topics once per process (idempotently on the broker).
pub(crate) struct Topics {
    admin: AdminClient<ClientLog>,
    known: Mutex<HashSet<String>>,
    partitions: i32,
    replication: i32,
}

impl Topics {
    pub(crate) fn new(config: &KafkaConfig, log: &ClientLog) -> Result<Self> {
        let admin = config
            .finish(config.client_config())
            .create_with_context(log.clone())
            .map_err(|e| kafka_error("create admin client", e))?;
        Ok(Self {
            admin,
            known: Mutex::default(),
            partitions: config.partitions,
            replication: config.replication,
        })
    }

    /// Forgets that `topic` exists (it was deleted).
    pub(crate) fn forget(&self, topic: &str) {
        self.known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(topic);
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

    pub(crate) fn admin(&self) -> &AdminClient<ClientLog> {
        &self.admin
    }
}

/// Sends one record and waits for its delivery report.
pub(crate) async fn send(
    producer: &FutureProducer<ClientLog>,
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
