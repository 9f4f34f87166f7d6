//! Mapping rdkafka errors into `seambus::Error`. The client's error stays
//! behind `source()`.

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use seambus::{Error, ErrorKind};

pub(crate) fn config_error(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::Config, message.into())
}

/// A librdkafka error with what we were doing. Size errors are permanent,
/// configuration errors too; the rest is retryable.
pub(crate) fn kafka_error(what: &str, err: KafkaError) -> Error {
    let kind = match err.rdkafka_error_code() {
        Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessageSize) => {
            ErrorKind::PayloadTooLarge
        }
        _ => match &err {
            KafkaError::ClientConfig(..) | KafkaError::ClientCreation(_) => ErrorKind::Config,
            _ => ErrorKind::Connection,
        },
    };
    Error::new(kind, format!("{what}: {err}")).with_source(err)
}
