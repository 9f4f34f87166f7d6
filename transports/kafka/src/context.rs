//! The client context of every librdkafka client a transport makes (the
//! producer, the admin client, the consumers): librdkafka's log lines and
//! global errors go to `tracing`, and a broker outage is said once.

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode as Code;

/// What the transport's librdkafka clients log. While the brokers cannot
/// be reached, librdkafka reports every failed connection attempt of every
/// client (hundreds of lines in a few seconds): the first is logged at
/// warn level as "Kafka unreachable", the rest at debug, and "Kafka
/// reachable again" at info once a publish is delivered or a record
/// fetched. Every other line keeps librdkafka's level.
#[derive(Clone, Debug, Default)]
pub struct ClientLog {
    outage: Arc<AtomicBool>,
}

impl ClientLog {
    /// A publish was delivered or a record fetched: the brokers answer.
    pub(crate) fn reached(&self) {
        if self.outage.load(SeqCst) && self.outage.swap(false, SeqCst) {
            tracing::info!("Kafka reachable again");
        }
    }

    /// Whether `error` only says the brokers cannot be reached now
    /// (librdkafka reconnects on its own).
    pub(crate) fn is_outage(error: &KafkaError) -> bool {
        matches!(
            error.rdkafka_error_code(),
            Some(Code::AllBrokersDown | Code::BrokerTransportFailure | Code::Resolve)
        )
    }

    /// The brokers cannot be reached: said once until they are again.
    pub(crate) fn unreachable(&self, why: &str) {
        if self.outage.swap(true, SeqCst) {
            tracing::debug!(target: "librdkafka", why, "Kafka still unreachable");
        } else {
            tracing::warn!(
                why,
                "Kafka unreachable; librdkafka retries (said once until it is reached again)"
            );
        }
    }
}

impl ClientContext for ClientLog {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        use RDKafkaLogLevel as L;
        match level {
            // A failed connection to a broker.
            L::Emerg | L::Alert | L::Critical | L::Error if fac == "FAIL" => {
                self.unreachable(log_message)
            }
            L::Emerg | L::Alert | L::Critical | L::Error => {
                tracing::error!(target: "librdkafka", "librdkafka: {fac} {log_message}")
            }
            L::Warning => tracing::warn!(target: "librdkafka", "librdkafka: {fac} {log_message}"),
            L::Notice | L::Info => {
                tracing::info!(target: "librdkafka", "librdkafka: {fac} {log_message}")
            }
            L::Debug => tracing::debug!(target: "librdkafka", "librdkafka: {fac} {log_message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if Self::is_outage(&error) {
            self.unreachable(reason);
        } else {
            tracing::error!(target: "librdkafka", "librdkafka: {error}: {reason}");
        }
    }
}

impl ConsumerContext for ClientLog {}
